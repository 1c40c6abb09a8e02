"""The relay's decisions, shared by its two forms: what each form only carries out.

The built-in relay exists twice: :class:`prefork.handlers.relay.RelayHandler`
(socketserver: a blocking connect, then the process's epoll loop) and
:class:`prefork.handlers.aio.RelayProtocol` (asyncio). Everything that does
not depend on how bytes are moved is decided here, once, so the two cannot
drift apart:

* the settings, checked when a configured subclass is made
  (:class:`RelaySettings`, :func:`check_upstreams`, :func:`check_timeouts`,
  :func:`check_buffer_size`), so a mistake fails once and not per connection;
* which upstreams a connection tries, in what order (:func:`choose`: least
  connections over every worker or weighted round robin, backups, caps, the
  half-open try of an upstream that was down, failover), and how an
  upstream's health moves on a failure or a success (:func:`admission`,
  :func:`after_failure`, :func:`after_success`, :func:`backoff`,
  :func:`change`, :func:`failure_kind`); the shared state these read and
  write is :mod:`prefork.handlers.upstreams`;
* the PROXY v2 header announcing a client (:func:`proxy_header`), with the
  TLS the client spoke (:class:`ClientTls`, :func:`ssl_tlv`) when it did;
* the name a TLS upstream is asked for and verified against (:func:`server_name`);
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
import logging
import math
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from prefork.config import UpstreamSpec
from prefork.handlers import relay_loops
from prefork.proxy_protocol import PP2_TYPE_ALPN, PP2_TYPE_SSL, build_v2
from prefork.workers.connection import format_peer

__all__ = [
    "AttemptFailed",
    "Choice",
    "ClientTls",
    "Event",
    "Health",
    "RelaySettings",
    "Turns",
    "Upstream",
    "admission",
    "after_failure",
    "after_success",
    "attempt_failed",
    "backoff",
    "change",
    "check_buffer_size",
    "check_specs",
    "check_timeouts",
    "check_upstreams",
    "choose",
    "claimed",
    "client_failed",
    "effective_weight",
    "failed_over",
    "failure_kind",
    "idle",
    "no_upstream",
    "proxy_header",
    "reason",
    "server_name",
    "ssl_tlv",
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


def check_specs(owner: str, upstreams: tuple[Upstream, ...], specs: Any) -> tuple[UpstreamSpec, ...]:
    """Each upstream's balancing options: ``specs`` when given (one per upstream, same order), else weight 1 each."""
    if not specs:
        return tuple(UpstreamSpec(host, port) for host, port in upstreams)
    if not (isinstance(specs, Sequence) and all(isinstance(s, UpstreamSpec) for s in specs)
            and [(s.host, s.port) for s in specs] == list(upstreams)):
        raise TypeError(f"{owner}.upstream_specs must be one UpstreamSpec per upstream, in the same order")
    return tuple(specs)


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


class RelaySettings:
    """The settings both relay forms are configured by, checked once when a subclass is made.

    Configure a relay by subclassing its form (the daemon's ``--relay`` options
    make such a subclass with ``type(...)``); a bad value raises ``TypeError``
    or ``ValueError`` from the class statement, naming the class and the
    setting. (:class:`prefork.handlers.upstreams.Balanced` adds the balancer both forms use.)
    """

    upstreams: tuple[Upstream, ...] = ()
    connect_timeout: float = 5.0  # seconds per upstream address tried
    idle_timeout: float | None = 300.0  # no byte either way for this long closes both sides; None: never
    send_proxy: bool = False  # announce the client with a PROXY protocol v2 header before any data
    upstream_tls: ssl.SSLContext | None = None  # connect upstream with TLS (--relay-tls), verified by this context
    upstream_server_name: str | None = None  # the name asked for (SNI) and verified; None: the upstream's host

    # the relay as a load balancer (prefork.handlers.upstreams.Balancer)
    upstream_specs: tuple[UpstreamSpec, ...] = ()  # per upstream (same order): weight, backup, maxconn
    balance: str = "leastconn"  # or "roundrobin"; both weighted
    check_interval: float = 0.0  # seconds between active checks (start_checks); 0: passive health only
    slow_start: float = 0.0  # seconds an upstream that came back takes to reach its full weight
    check_send: bytes | None = None  # what a check sends once connected (and its TLS is up)
    check_expect: bytes | None = None  # what the answer must contain; None: no answer awaited
    upstream_board: Any = None  # the daemon's shared UpstreamBoard (in a worker); None: this process's own
    worker_index: int = 0  # this worker's index in upstream_board

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.upstreams = check_upstreams(cls.__name__, cls.upstreams)
        check_timeouts(cls.__name__, cls.connect_timeout, cls.idle_timeout)
        cls.upstream_specs = check_specs(cls.__name__, cls.upstreams, cls.upstream_specs)
        if cls.balance not in (LEASTCONN, ROUNDROBIN):
            raise ValueError(f"{cls.__name__}.balance must be {LEASTCONN!r} or {ROUNDROBIN!r}, not {cls.balance!r}")


def server_name(configured: str | None, host: str) -> str:
    """The name a TLS upstream is asked for (SNI) and its certificate verified against.

    ``configured`` (--relay-sni) when set, else the upstream's own host. An
    IP address is verified against the certificate's IP address entries
    (Python sends no SNI for one).
    """
    return configured or host


# -- the PROXY header --------------------------------------------------------------------------------------

# The PP2_TYPE_SSL TLV (proxy-protocol.txt, 2.2.5): its client flags and sub-types
PP2_CLIENT_SSL: Final = 0x01  # the client connected over TLS
PP2_CLIENT_CERT_CONN: Final = 0x02  # ... and presented a certificate on this connection
PP2_CLIENT_CERT_SESS: Final = 0x04  # ... on this connection or on the earlier one whose session it resumed
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
# <verify> when no certificate was presented: the spec wants non-zero ("zero if the client presented a
# certificate and it was successfully verified, and non-zero otherwise"); X509_V_ERR_UNSPECIFIED
VERIFY_NO_CERTIFICATE: Final = 1


@dataclass(frozen=True)
class ClientTls:
    """What a TLS client's connection is announced with in the PROXY header (PP2_TYPE_SSL, PP2_TYPE_ALPN)."""

    version: str | None  # "TLSv1.3"
    cipher: str | None  # "TLS_AES_256_GCM_SHA384"
    common_name: str | None = None  # the client certificate's subject CN; None: no certificate (or no CN)
    certificate: bool = False  # the client presented a certificate (it verified: else no handshake)
    resumed: bool = False  # the session was resumed: the certificate came with the session, not this connection
    alpn: str | None = None  # the protocol ALPN chose

    @classmethod
    def of(cls, ssl_object: ssl.SSLSocket | ssl.SSLObject) -> ClientTls:
        """Read from a completed server-side handshake (an ``SSLSocket``, or asyncio's ``SSLObject``).

        A certificate the server's context accepted has verified: a failed
        verification fails the handshake, so there is no "presented but not
        verified" connection to describe.
        """
        peer = ssl_object.getpeercert()
        cipher = ssl_object.cipher()
        return cls(version=ssl_object.version(), cipher=cipher[0] if cipher else None,
                   common_name=_common_name(peer) if peer else None, certificate=bool(peer),
                   resumed=bool(ssl_object.session_reused), alpn=ssl_object.selected_alpn_protocol())


def _common_name(peer: Any) -> str | None:
    """The subject's commonName in ``getpeercert()``'s form: ``{"subject": ((("commonName", "x"),), ...)}``."""
    for rdn in peer.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def ssl_tlv(tls: ClientTls) -> bytes:
    """The value of the PP2_TYPE_SSL TLV for ``tls``, as HAProxy's ``send-proxy-v2-ssl-cn`` (+ ``ssl-cipher``).

    One byte of client flags, the 32-bit verify result (big endian: 0 when
    the client's certificate verified), then the sub-TLVs: the version, the
    certificate's CN when there is one, the cipher. HAProxy writes 0 for
    "verified" also when there was no certificate; this follows the spec and
    writes non-zero then, so a receiver that checks only ``verify == 0`` does
    not take an anonymous client for an authenticated one.
    """
    flags = PP2_CLIENT_SSL
    if tls.certificate:
        flags |= PP2_CLIENT_CERT_SESS | (0 if tls.resumed else PP2_CLIENT_CERT_CONN)
    verify = 0 if tls.certificate else VERIFY_NO_CERTIFICATE
    value = bytearray((flags,)) + verify.to_bytes(4, "big")
    for subtype, text in ((PP2_SUBTYPE_SSL_VERSION, tls.version), (PP2_SUBTYPE_SSL_CN, tls.common_name),
                          (PP2_SUBTYPE_SSL_CIPHER, tls.cipher)):
        if text:
            raw = text.encode("utf-8", "surrogateescape")[:_MAX_SUB_TLV]
            value += bytes((subtype,)) + len(raw).to_bytes(2, "big") + raw
    return bytes(value)


_MAX_SUB_TLV: Final = 1024  # a CN is at most 64 characters (RFC 5280); a longer one is cut, never refused


def proxy_header(client_address: Any, local_address: Any, tls: ClientTls | None = None) -> bytes:
    """The PROXY v2 header announcing a relayed client: its address and the one it connected to.

    Both are socket addresses as Python gives them (``(host, port)``,
    ``(host, port, flowinfo, scope_id)``, or a Unix path). A header has one
    family for both addresses, so an IPv4 one beside an IPv6 one is written
    IPv4-mapped (``::ffff:192.0.2.1``). A LOCAL header (the receiver uses the
    connection's own addresses) when either is not an IP address, e.g. on a
    Unix socket listener. ``tls``: the client spoke TLS to us; the header
    then carries PP2_TYPE_ALPN (when a protocol was chosen) and PP2_TYPE_SSL
    (:func:`ssl_tlv`), as HAProxy's ``send-proxy-v2-ssl-cn`` does (a LOCAL
    header carries no TLV). Every PROXY header lists the prefork relays the
    connection came through, this one last (:mod:`prefork.handlers.relay_loops`:
    a loop through another instance is cut). Never raises.
    """
    source, destination = _ip_address(client_address), _ip_address(local_address)
    if source is None or destination is None:
        return build_v2(None, None)
    if source[0].version != destination[0].version:
        source, destination = _as_ipv6(source), _as_ipv6(destination)
    tlvs: list[tuple[int, bytes]] = []
    if tls is not None:
        if tls.alpn:
            tlvs.append((PP2_TYPE_ALPN, tls.alpn.encode("ascii", "replace")))
        tlvs.append((PP2_TYPE_SSL, ssl_tlv(tls)))
    tlvs.append(relay_loops.via_tlv(client_address, relay_loops.own_id()))
    try:
        return build_v2((str(source[0]), source[1]), (str(destination[0]), destination[1]), tlvs=tlvs)
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
    elif isinstance(exc, ssl.SSLError):
        text = _ssl_words(exc)
        if text[1:2].isupper():
            return text  # OpenSSL's acronyms keep their case: "EOF occurred in violation of protocol"
    else:
        text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    if not text:
        return type(exc).__name__  # nothing said but its kind: ConnectionResetError
    return text[:1].lower() + text[1:]


# "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: ... (_ssl.c:1006)": OpenSSL's words stay
_SSL_NOISE = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\] |\.?\s*\(_ssl\.c:\d+\)$|\.$")


def _ssl_words(exc: ssl.SSLError) -> str:
    """An ``ssl.SSLError`` in OpenSSL's words, without the reason code in brackets and the C file and line.

    A failed certificate check says which check ("certificate verify failed:
    Hostname mismatch, certificate is not valid for 'db.example'").
    """
    text = _SSL_NOISE.sub("", (exc.strerror or str(exc)).strip())
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message and exc.verify_message not in text:
        text = f"certificate verify failed: {exc.verify_message.rstrip('.')}"
    return text


class AttemptFailed(Exception):
    """One connection attempt failed: at ``stage`` ("" for the connect itself, "PROXY header", "TLS handshake")."""

    def __init__(self, stage: str, error: OSError) -> None:
        super().__init__(stage, error)
        self.stage = stage
        self.error = error

    def words(self, address: Any, timeout: float | None = None) -> str:
        """For a log line, as :func:`attempt_failed` says it."""
        return attempt_failed(address, self.error, timeout, stage=self.stage)


def attempt_failed(address: Any, exc: BaseException, timeout: float | None = None, *, stage: str = "") -> str:
    """One failed connection attempt for a log line: "127.0.0.1:7000 (connection refused)".

    ``stage`` names the step that failed when it was not the connect itself:
    "127.0.0.1:7000 (TLS handshake: certificate verify failed: ...)".
    """
    why = reason(exc, timeout)
    return f"{format_peer(address)} ({stage}: {why})" if stage else f"{format_peer(address)} ({why})"


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


def no_upstream(client: Any, failures: Sequence[str], *, skipped: bool = False) -> Event:
    """No upstream accepted (``failures``: every attempt), or none was tried: the client is closed.

    ``skipped``: upstreams are configured but none could be tried (every one
    down or at its maxconn); else nothing tried means none is configured.
    """
    if failures:
        why = ", ".join(failures)
    else:
        why = "every upstream is down or at its maxconn" if skipped else "no upstream configured"
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


# -- upstream health ---------------------------------------------------------------------------------------

# An upstream's state, as the shared upstream board stores it (prefork.handlers.upstreams)
UP: Final = 0  # clients are sent to it
DOWN: Final = 1  # a connect or a check failed: nobody tries it before its retry time
HALF_OPEN: Final = 2  # its retry time came: one connection (or one check) is trying it now
STATE_NAMES: Final = ("up", "down", "half-open")

BACKOFF_FIRST: Final = 1.0  # seconds a failed upstream stays down after its first failure ...
BACKOFF_MAX: Final = 30.0  # ... doubling with each failure in a row, up to this


def backoff(failures: int) -> float:
    """Seconds an upstream that failed ``failures`` times in a row stays down before it is tried again."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(failures - 1, 16))


@dataclass(frozen=True)
class Health:
    """What every worker knows of one upstream (copied in and out of the shared board)."""

    state: int = UP
    failures: int = 0  # failed connects or checks in a row
    retry_at: float = 0.0  # monotonic: when a DOWN upstream may be tried again (HALF_OPEN: the try's deadline)


# What a connection may do with an upstream, by its health
USE: Final = "use"
PROBE: Final = "probe"  # the one half-open try: the connection that claims it tries it first
SKIP: Final = "skip"


def admission(state: int, retry_at: float, now: float) -> str:
    """Whether a connection may use an upstream now: USE it, PROBE it (its retry time came) or SKIP it.

    A HALF_OPEN upstream whose try outlived its deadline (the worker trying it
    died) may be claimed again.
    """
    if state == UP:
        return USE
    return PROBE if now >= retry_at else SKIP


def claimed(health: Health, now: float, deadline: float) -> Health:
    """``health`` once a connection or a check claimed the half-open try, which must end by ``deadline``."""
    return Health(HALF_OPEN, health.failures, max(now, deadline))


def after_failure(health: Health, now: float) -> Health:
    """``health`` after a failed connect or check: down, until a retry time that backs off as failures go on."""
    failures = health.failures + 1
    return Health(DOWN, failures, now + backoff(failures))


def after_success(health: Health) -> Health:
    """``health`` after a connect or a check that worked: up, its failures forgotten."""
    return Health()


def change(before: int, after: int) -> str | None:
    """What a transition is called in the log and counted as, or None when it is no change anyone sees.

    Only up <-> down counts: a half-open try that fails leaves the upstream down.
    """
    if before == UP and after != UP:
        return "down"
    if before != UP and after == UP:
        return "up"
    return None


def failure_kind(exc: BaseException, stage: str = "") -> str:
    """How a connection attempt failed, as counted per upstream: refused, timeout, tls or other."""
    if stage == "TLS handshake" or isinstance(exc, ssl.SSLError):
        return "tls" if not (isinstance(exc, TimeoutError) and not exc.errno) else "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "other"


FAILURE_KINDS: Final = ("refused", "timeout", "tls", "other")


# -- choosing an upstream ----------------------------------------------------------------------------------

LEASTCONN: Final = "leastconn"
ROUNDROBIN: Final = "roundrobin"


def effective_weight(weight: int, up_for: float | None, slow_start: float) -> float:
    """``weight`` while an upstream that came back ``up_for`` seconds ago slow-starts (grows to it linearly).

    ``up_for`` None: it never came back (up since the start), full weight.
    A tenth of the weight at least, so a restarted upstream is not starved.
    """
    if slow_start <= 0 or up_for is None or up_for >= slow_start:
        return float(weight)
    return weight * max(0.1, up_for / slow_start)


@dataclass(frozen=True)
class Choice:
    """The upstreams one connection tries, in order (indexes into the configured list)."""

    order: tuple[int, ...]  # the first is the pick, the rest failover
    probe: int | None = None  # the one due for its half-open try: the caller claims it
    background: bool = False  # ... and tries it apart from this connection (not in order), which has others
    full: tuple[int, ...] = ()  # left out for being at their maxconn (counted)


class Turns:
    """Smooth weighted round robin (nginx's): over any window, each upstream's picks follow its weight.

    One per configured relay in a process; what it remembers is each
    upstream's running credit. Picks among a subset (the usable ones, or the
    least loaded) spread by weight too. Not shared between workers: each
    worker's sequence follows the weights, so their sum does.
    """

    __slots__ = ("_credit",)

    def __init__(self) -> None:
        self._credit: dict[int, float] = {}

    def pick(self, indexes: Sequence[int], weights: Sequence[float]) -> int:
        """One of ``indexes`` (non-empty), by ``weights`` (by index)."""
        if len(indexes) == 1:
            return indexes[0]
        credit = self._credit
        total = 0.0
        best = indexes[0]
        best_credit = -math.inf
        for i in indexes:
            w = weights[i]
            total += w
            c = credit.get(i, 0.0) + w
            credit[i] = c
            if c > best_credit:
                best, best_credit = i, c
        credit[best] = best_credit - total
        return best


def choose(admissions: Sequence[str], weights: Sequence[float], backups: Sequence[bool],
           actives: Sequence[int], maxconns: Sequence[int], turns: Turns, balance: str = LEASTCONN) -> Choice:
    """Which upstreams a new connection tries, in order, from what every worker shares of them.

    Per upstream (by index): its :func:`admission`, effective weight, whether
    it is a backup, its connections open now over every worker, and its cap
    (0: none). The rules:

    * a SKIPped (down) upstream is not tried; one at its cap neither (``full``);
    * the primaries are used while any is usable; the backups only when none is,
      and then after the primaries as failover;
    * an upstream due for its half-open try (PROBE) is claimed, one per
      connection (the others due wait for the next one): tried apart, in
      the ``background``, when the connection has other upstreams to use,
      so no client waits on an upstream that may still be dead; first in
      the order when it has nothing else;
    * LEASTCONN: the fewest open connections for their weight first; the
      upstreams less than one connection per unit of weight above the least
      loaded take turns by weight (an idle daemon: all of them), so one that
      holds connections is skipped until the others catch up;
      ROUNDROBIN: weighted round robin, the rest in configured order.

    Nothing usable at all: an empty order (the client is closed at once).
    """
    usable: list[int] = []
    usable_backups: list[int] = []
    probe: int | None = None
    probe_backup: int | None = None
    full: list[int] = []
    for i, admitted in enumerate(admissions):
        if admitted == SKIP:
            continue
        if maxconns[i] and actives[i] >= maxconns[i]:
            full.append(i)
            continue
        if admitted == PROBE:
            if backups[i]:
                probe_backup = i if probe_backup is None else probe_backup
            elif probe is None:
                probe = i
            continue
        (usable_backups if backups[i] else usable).append(i)
    if not usable and probe is None:  # every primary is down or full: the backups step in
        usable, usable_backups, probe = usable_backups, [], probe_backup
    order = _ranked(usable, weights, actives, turns, balance)
    order += _ranked(usable_backups, weights, actives, turns, balance, pick=False)
    if probe is not None and not order:
        return Choice((probe,), probe, False, tuple(full))
    return Choice(tuple(order), probe, probe is not None, tuple(full))


def _ranked(indexes: list[int], weights: Sequence[float], actives: Sequence[int], turns: Turns, balance: str,
            *, pick: bool = True) -> list[int]:
    """``indexes`` in the order to try them: the pick first (when ``pick``), then the rest."""
    if not indexes:
        return []
    if balance == LEASTCONN:
        ranked = sorted(indexes, key=lambda i: actives[i] / weights[i])
        if not pick:
            return ranked
        # within one connection per unit of weight of the least loaded: close enough to take turns by
        # weight. Short connections (counts of 0 or 1, one often still closing) then split by weight,
        # while an upstream that holds connections is a round ahead and left out until the others catch up.
        bound = actives[ranked[0]] / weights[ranked[0]] + 1
        close = [i for i in ranked if actives[i] / weights[i] < bound]
        first = turns.pick(close, weights)
    else:
        if not pick:
            return list(indexes)
        first = turns.pick(indexes, weights)
        ranked = indexes
    return [first, *(i for i in ranked if i != first)]
