"""The relay's decisions, shared by its two forms: what each form only carries out.

The built-in relay exists twice: :class:`prefork.handlers.relay.RelayHandler`
(socketserver: a blocking connect, then the process's epoll loop) and
:class:`prefork.handlers.aio.RelayProtocol` (asyncio). Everything that does
not depend on how bytes are moved is decided here, once, so the two cannot
drift apart:

* the settings, checked when a configured subclass is made
  (:class:`RelaySettings`, :func:`check_upstreams`, :func:`check_timeouts`,
  :func:`check_buffer_size`), so a mistake fails once and not per connection;
* which upstreams a connection tries, in what order (:class:`Rotation`:
  round robin with failover, one rotation per configured subclass);
* the PROXY v2 header announcing a client (:func:`proxy_header`);
* how a connection attempt or a relayed socket failed, in words (:func:`reason`);
* what is logged at which level, and what counts as an error in the worker's
  record (:class:`Event` and the functions that make one: :func:`failed_over`,
  :func:`no_upstream`, :func:`upstream_failed`, :func:`client_failed`,
  :func:`idle`).

Nothing here touches a socket, a loop or a logger: each form logs an
:class:`Event` with its own logger and counts it in its own record.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from prefork.proxy_protocol import build_v2
from prefork.workers.connection import format_peer

__all__ = [
    "Event",
    "RelaySettings",
    "Rotation",
    "Upstream",
    "attempt_failed",
    "check_buffer_size",
    "check_timeouts",
    "check_upstreams",
    "client_failed",
    "failed_over",
    "idle",
    "no_upstream",
    "proxy_header",
    "reason",
]

Upstream: TypeAlias = tuple[str, int]  # (host, port), as socket.create_connection and loop.create_connection take it


# -- settings ----------------------------------------------------------------------------------------------


def check_upstreams(owner: str, upstreams: Any) -> tuple[Upstream, ...]:
    """``upstreams`` as a tuple of ``(host, port)`` tuples; ``TypeError`` naming ``owner`` when it is not one.

    Any sequence of two-item sequences is accepted (a list of lists from a
    configuration file, say) and normalised; an empty one is valid (every
    connection is then closed, logged as having no upstream).
    """
    if isinstance(upstreams, (str, bytes)) or not isinstance(upstreams, Sequence):
        raise TypeError(f"{owner}.upstreams must be a tuple of (host, port) pairs, not {upstreams!r}")
    checked: list[Upstream] = []
    for item in upstreams:
        if not (isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2
                and isinstance(item[0], str) and _is_int(item[1]) and 0 < item[1] < 65536):
            raise TypeError(f"{owner}.upstreams: {item!r} is not a (host, port) pair with a port in 1-65535")
        checked.append((item[0], item[1]))
    return tuple(checked)


def check_timeouts(owner: str, connect_timeout: Any, idle_timeout: Any) -> None:
    """``ValueError`` naming ``owner`` unless both timeouts are positive finite seconds (``idle_timeout``: or None)."""
    if not _is_seconds(connect_timeout):
        raise ValueError(f"{owner}.connect_timeout must be positive seconds, not {connect_timeout!r}")
    if idle_timeout is not None and not _is_seconds(idle_timeout):
        raise ValueError(f"{owner}.idle_timeout must be positive seconds or None (never), not {idle_timeout!r}")


def check_buffer_size(owner: str, buffer_size: Any) -> int:
    """``buffer_size`` when it is a positive number of bytes; ``ValueError`` naming ``owner`` otherwise."""
    if not (_is_int(buffer_size) and buffer_size > 0):
        raise ValueError(f"{owner}.buffer_size must be a positive number of bytes, not {buffer_size!r}")
    return int(buffer_size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int, but never meant as one


def _is_seconds(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


class Rotation:
    """Round robin with failover: each connection starts one upstream further, the rest follow in order.

    One per configured relay class (see :class:`RelaySettings`), so two relays
    in one process do not share a rotation. A single upstream (or none) does
    not turn it. Safe from several threads: ``next()`` on the counter is atomic
    under the GIL.
    """

    __slots__ = ("_turns",)

    def __init__(self) -> None:
        self._turns = itertools.count()

    def candidates(self, upstreams: Sequence[Upstream]) -> list[Upstream]:
        """The upstreams to try for the next connection, in order."""
        if len(upstreams) < 2:
            return list(upstreams)
        first = next(self._turns) % len(upstreams)
        return [*upstreams[first:], *upstreams[:first]]


class RelaySettings:
    """The settings both relay forms are configured by, checked once when a subclass is made.

    Configure a relay by subclassing its form (the daemon's ``--relay`` options
    make such a subclass with ``type(...)``); a bad value raises ``TypeError``
    or ``ValueError`` from the class statement, naming the class and the
    setting. Each subclass also gets its own :class:`Rotation`.
    """

    upstreams: tuple[Upstream, ...] = ()
    connect_timeout: float = 5.0  # seconds per upstream address tried
    idle_timeout: float | None = 300.0  # no byte either way for this long closes both sides; None: never
    send_proxy: bool = False  # announce the client with a PROXY protocol v2 header before any data
    upstream_tls: ssl.SSLContext | None = None  # connect upstream with TLS (--relay-tls), verified by this context
    upstream_server_name: str | None = None  # the name asked for (SNI) and verified; None: the upstream's host

    # The one piece of class-level state: the round-robin position must outlive a connection.
    # Each subclass gets its own (__init_subclass__).
    _rotation: ClassVar[Rotation] = Rotation()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._rotation = Rotation()
        cls.upstreams = check_upstreams(cls.__name__, cls.upstreams)
        check_timeouts(cls.__name__, cls.connect_timeout, cls.idle_timeout)


# -- the PROXY header --------------------------------------------------------------------------------------


def proxy_header(client_address: Any, local_address: Any) -> bytes:
    """The PROXY v2 header announcing a relayed client: its address and the one it connected to.

    Both are socket addresses as Python gives them (``(host, port)``,
    ``(host, port, flowinfo, scope_id)``, or a Unix path). A header has one
    family for both addresses, so an IPv4 one beside an IPv6 one is written
    IPv4-mapped (``::ffff:192.0.2.1``). A LOCAL header (the receiver uses the
    connection's own addresses) when either is not an IP address, e.g. on a
    Unix socket listener. Never raises.
    """
    source, destination = _ip_address(client_address), _ip_address(local_address)
    if source is None or destination is None:
        return build_v2(None, None)
    if source[0].version != destination[0].version:
        source, destination = _as_ipv6(source), _as_ipv6(destination)
    try:
        return build_v2((str(source[0]), source[1]), (str(destination[0]), destination[1]))
    except ValueError:  # nothing known reaches here; an address build_v2 refuses still gets a valid header
        return build_v2(None, None)


_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_address(address: Any) -> tuple[_IPAddress, int] | None:
    """``(ip, port)`` of an IP socket address, None for anything else (a Unix path, an unnamed socket)."""
    if not (isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], str)
            and _is_int(address[1]) and 0 <= address[1] < 65536):
        return None
    try:
        ip = ipaddress.ip_address(address[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        ip = ipaddress.IPv6Address(ip.packed)  # a header carries no scope ("fe80::1%eth0")
    return ip, address[1]


def _as_ipv6(address: tuple[_IPAddress, int]) -> tuple[_IPAddress, int]:
    ip, port = address
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{ip}"), port
    return ip, port


# -- failures in words -------------------------------------------------------------------------------------


def reason(exc: BaseException, timeout: float | None = None) -> str:
    """Why a socket call failed, in words that fit mid-sentence: "connection refused".

    An error with an errno is said in the errno's words, whoever raised it.
    ``timeout`` is the limit the call had: a timeout of its own (no errno,
    as ``socket.create_connection`` and ``asyncio.wait_for`` raise it) reads
    "timed out after 5s".
    """
    if isinstance(exc, TimeoutError) and not exc.errno:
        return "timed out" if timeout is None else f"timed out after {timeout:g}s"
    if isinstance(exc, OSError) and type(exc).__module__ == "builtins" and isinstance(exc.errno, int) \
            and exc.errno > 0:
        # the errno's own words: asyncio's create_connection puts "Connect call failed ('10.0.0.1', 7000)"
        # in strerror. (Not for socket.gaierror or ssl.SSLError: their numbers are not errnos.)
        text = os.strerror(exc.errno)
    else:
        text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    if not text:
        return type(exc).__name__  # nothing said but its kind: ConnectionResetError
    return text[:1].lower() + text[1:]


def attempt_failed(address: Any, exc: BaseException, timeout: float | None = None) -> str:
    """One failed connection attempt for a log line: "127.0.0.1:7000 (connection refused)"."""
    return f"{format_peer(address)} ({reason(exc, timeout)})"


# -- what happened, and what is logged and counted ---------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Something a relayed connection did that is worth a log line.

    A form logs it as ``log.log(event.level, event.message, *event.args)``
    (so formatting stays lazy) and, when ``error`` is set, adds one to its
    worker record's ``errors``: the relay counts failures of its upstream, not
    of its clients.
    """

    level: int
    message: str
    args: tuple[str, ...]
    error: bool = False


def failed_over(client: Any, failures: Sequence[str], upstream: Any) -> Event:
    """Connected to ``upstream`` after the ``failures`` (:func:`attempt_failed` texts) before it."""
    return Event(logging.INFO, "relay for client %s: upstream %s unavailable, connected to %s instead",
                 (format_peer(client), ", ".join(failures), format_peer(upstream)))


def no_upstream(client: Any, failures: Sequence[str]) -> Event:
    """No upstream accepted (``failures``: every attempt), or none was configured: the client is closed."""
    why = ", ".join(failures) if failures else "no upstream configured"
    return Event(logging.WARNING, "relay for client %s: cannot connect upstream: %s; closing the client connection",
                 (format_peer(client), why), error=True)


def upstream_failed(client: Any, upstream: Any, exc: BaseException) -> Event:
    """The upstream's socket failed mid-stream (reset, broken pipe): the client is closed."""
    return Event(logging.WARNING, "relay for client %s: upstream %s failed: %s; closing the client connection",
                 (format_peer(client), format_peer(upstream), reason(exc)), error=True)


def client_failed(client: Any, upstream: Any, exc: BaseException) -> Event:
    """The client's socket failed mid-stream: the upstream is closed. Clients go away; not an error."""
    return Event(logging.INFO, "relay for client %s: client connection failed: %s; closing upstream %s",
                 (format_peer(client), reason(exc), format_peer(upstream)))


def idle(client: Any, upstream: Any, idle_timeout: float) -> Event:
    """No byte either way for ``idle_timeout`` seconds: both sides are closed."""
    return Event(logging.INFO, "relay for client %s: idle for %ss, closing it and upstream %s",
                 (format_peer(client), f"{idle_timeout:g}", format_peer(upstream)))
