"""The built-in TCP relay: each client connection is forwarded to an upstream, bytes both ways.

One connection is one call of :meth:`RelayHandler.handle`, in one thread (a
``sync`` worker's serving loop or a ``thread`` worker's pool thread): it
connects upstream, then copies bytes in both directions with a selector over
the two non-blocking sockets until both directions are done.

Each direction owns one buffer of ``buffer_size`` bytes and reads its source
only while that buffer is empty, so a slow reader slows the writer through
TCP flow control and a connection never holds more than two buffers,
however fast the other side sends. An EOF is passed on as ``shutdown(SHUT_WR)``
once the bytes before it are delivered (half-close propagated each way).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import selectors
import socket
import socketserver
from collections.abc import Sequence
from typing import Any, ClassVar

from prefork.proxy_protocol import build_v2

__all__ = ["RelayHandler"]

log = logging.getLogger(__name__)

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class _PeerError(Exception):
    """A socket call failed on one side of the relay (``side`` is ``"client"`` or ``"upstream"``)."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error


class _Pipe:
    """One direction of a relay: bytes read from ``source`` wait in one buffer until ``sink`` takes them.

    The source is read only while the buffer is empty (``end == 0``), and what
    was read is sent at once: on a fast path (an echo round trip) the bytes
    leave in the same turn they arrived and the selector registration never
    changes. Only a short send leaves bytes behind, and then the loop waits
    for the sink to be writable instead of reading more.
    """

    __slots__ = ("done", "end", "eof", "received", "sent", "sink", "sink_side", "source", "source_side", "start",
                 "view")

    def __init__(self, source: socket.socket, sink: socket.socket, source_side: str, sink_side: str,
                 size: int) -> None:
        self.source = source
        self.sink = sink
        self.source_side = source_side
        self.sink_side = sink_side
        self.view = memoryview(bytearray(size))
        self.start = 0  # buffered bytes are view[start:end]; end == 0 when the buffer is empty
        self.end = 0
        self.eof = False  # the source sent EOF
        self.done = False  # ... and it was passed on: the sink is shut for writing
        self.received = 0  # bytes counted since the handler last moved them to the scoreboard
        self.sent = 0

    def source_events(self) -> int:
        """The selector events this direction needs on its source: read while the buffer is empty."""
        return _READ if not self.end and not self.eof else 0

    def sink_events(self) -> int:
        """The selector events this direction needs on its sink: write while bytes wait."""
        return _WRITE if self.end else 0

    def pull(self) -> bool:
        """Read once from the source and send it on; True when the events this direction needs changed."""
        view = self.view
        try:
            n = self.source.recv_into(view)
        except BlockingIOError:
            return False  # readiness was stale: wait for the next event
        except OSError as exc:
            raise _PeerError(self.source_side, exc) from exc
        if not n:
            self.eof = True
            self._shut_sink()  # the buffer is empty (we only read into an empty one): pass EOF on now
            return True
        self.received += n
        try:
            sent = self.sink.send(view[:n])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        self.sent += sent
        if sent == n:
            return False
        self.start = sent
        self.end = n
        return True

    def push(self) -> bool:
        """Send buffered bytes to the sink; True when the buffer emptied (the events needed changed)."""
        try:
            sent = self.sink.send(self.view[self.start:self.end])
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        self.sent += sent
        self.start += sent
        if self.start < self.end:
            return False
        self.start = self.end = 0
        if self.eof:
            self._shut_sink()
        return True

    def _shut_sink(self) -> None:
        try:
            self.sink.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        self.done = True


class RelayHandler(socketserver.BaseRequestHandler):
    """Forward the connection to an upstream and copy bytes both ways until both sides are done.

    Configure by subclassing (the daemon's ``--relay`` options make such a
    subclass with ``type(...)``)::

        class Backend(RelayHandler):
            upstreams = (("10.0.0.1", 7000), ("10.0.0.2", 7000))
            idle_timeout = 60.0

    Connections take the upstreams in turn; when one refuses or times out the
    next is tried. To pick the upstream per connection, override
    :meth:`upstream_candidates`.

    How a connection ends:

    * both sides sent EOF and everything was delivered: closed normally;
    * no upstream reachable: one warning, the client's connection is closed
      (the client sees EOF), ``errors`` is counted in the worker's record;
    * the upstream fails mid-stream (reset, broken pipe): one warning, the
      client's connection is closed normally so bytes already relayed still
      arrive, ``errors`` is counted;
    * the client fails mid-stream: one info line, the upstream is closed;
    * no byte either way for ``idle_timeout`` seconds: one info line, both closed.

    Bytes read from the client count as ``bytes_in`` and bytes written to it
    as ``bytes_out`` in ``self.server.record``, when the server has one (a
    prefork worker does; a plain ``socketserver`` server does not).
    """

    upstreams: tuple[tuple[str, int], ...] = ()
    connect_timeout: float = 5.0  # seconds per upstream address tried
    idle_timeout: float | None = 300.0  # None: never
    send_proxy: bool = False  # announce the client with a PROXY protocol v2 header before any data
    buffer_size: int = 65536  # per direction

    upstream_address: tuple[str, int] | None = None  # set per connection by connect_upstream()

    # The one piece of class-level state: the round-robin position must outlive a handler
    # instance (one connection). Each subclass gets its own counter (__init_subclass__), so two
    # configured relays in one process do not share a rotation. next() on it is atomic under the GIL.
    _turns: ClassVar[itertools.count[int]] = itertools.count()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._turns = itertools.count()
        # a mistake in the configuration fails here, once, rather than on every connection
        cls.upstreams = _check_upstreams(cls.__name__, cls.upstreams)
        if not (isinstance(cls.buffer_size, int) and cls.buffer_size > 0):
            raise ValueError(f"{cls.__name__}.buffer_size must be a positive number of bytes, "
                             f"not {cls.buffer_size!r}")
        if not (isinstance(cls.connect_timeout, (int, float)) and cls.connect_timeout > 0):
            raise ValueError(f"{cls.__name__}.connect_timeout must be positive seconds, not {cls.connect_timeout!r}")
        if cls.idle_timeout is not None and not (isinstance(cls.idle_timeout, (int, float)) and cls.idle_timeout > 0):
            raise ValueError(f"{cls.__name__}.idle_timeout must be positive seconds or None (never), "
                             f"not {cls.idle_timeout!r}")

    # -- hooks --------------------------------------------------------------------------------------

    def upstream_candidates(self) -> list[tuple[str, int]]:
        """The upstreams to try for this connection, in order; the first that accepts is used.

        May be overridden. The default rotates over :attr:`upstreams` (round
        robin per class and process), the rest following as failover. An
        override may use ``self.client_address`` and ``self.server``; for
        example, to keep each client on one upstream while it is up::

            class Sticky(RelayHandler):
                upstreams = (("10.0.0.1", 7000), ("10.0.0.2", 7000))

                def upstream_candidates(self) -> list[tuple[str, int]]:
                    first = zlib.crc32(self.client_address[0].encode()) % len(self.upstreams)
                    return [*self.upstreams[first:], *self.upstreams[:first]]

        Returning an empty list closes the client's connection (logged as no upstream).
        """
        upstreams = self.upstreams
        if len(upstreams) < 2:
            return list(upstreams)
        first = next(self._turns) % len(upstreams)
        return [*upstreams[first:], *upstreams[:first]]

    def connect_upstream(self) -> socket.socket | None:
        """Connect to the first reachable candidate; None (logged, counted) when none is.

        May be extended (for example to wrap the socket in TLS); the result
        must be a connected stream socket, and ``self.upstream_address`` names it in log lines.
        """
        candidates = self.upstream_candidates()
        failures: list[str] = []
        for address in candidates:
            try:
                upstream = socket.create_connection(address, timeout=self.connect_timeout)
            except OSError as exc:
                failures.append(f"{_format_address(address)} ({_reason(exc, self.connect_timeout)})")
                continue
            if failures:
                log.info("relay for client %s: upstream %s unavailable, connected to %s instead",
                         _format_address(self.client_address), ", ".join(failures), _format_address(address))
            self.upstream_address = address
            return upstream
        why = ", ".join(failures) if failures else "no upstream configured"
        log.warning("relay for client %s: cannot connect upstream: %s; closing the client connection",
                    _format_address(self.client_address), why)
        self._count_error()
        return None

    # -- the connection -----------------------------------------------------------------------------

    def handle(self) -> None:
        upstream = self.connect_upstream()
        if upstream is None:
            return  # the server closes the client's connection: it sees EOF
        client: socket.socket = self.request
        try:
            self._relay(client, upstream)
        except _PeerError as exc:
            if exc.side == "upstream":
                log.warning("relay for client %s: upstream %s failed: %s; closing the client connection",
                            _format_address(self.client_address), _format_address(self.upstream_address),
                            _reason(exc.error))
                self._count_error()
            else:
                log.info("relay for client %s: client connection failed: %s; closing upstream %s",
                         _format_address(self.client_address), _reason(exc.error),
                         _format_address(self.upstream_address))
        finally:
            upstream.close()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways until both directions are done or the connection is idle too long.

        Raises :class:`_PeerError` when a socket call fails on either side.
        """
        for sock in (client, upstream):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # Nagle only delays; a socket that fails here fails its next recv/send, with its side known
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.send_proxy:
            try:
                upstream.sendall(self.proxy_header(client))  # still blocking, bounded by connect_timeout
            except OSError as exc:
                raise _PeerError("upstream", exc) from exc
        client.setblocking(False)
        upstream.setblocking(False)
        size = self.buffer_size
        outbound = _Pipe(client, upstream, "client", "upstream", size)
        inbound = _Pipe(upstream, client, "upstream", "client", size)
        record = getattr(self.server, "record", None)
        timeout = self.idle_timeout
        # what each socket is registered for (0: not registered) and what its events mean
        registered = {client: 0, upstream: 0}
        roles = {client: (outbound, inbound), upstream: (inbound, outbound)}  # (pipe it feeds, pipe it drains)
        try:
            with selectors.DefaultSelector() as selector:
                select = selector.select
                _update(selector, registered, roles)
                while True:
                    ready = select(timeout)
                    if not ready:
                        # every turn with events moved bytes or saw EOF, so an empty one means idle
                        log.info("relay for client %s: idle for %gs, closing it and upstream %s",
                                 _format_address(self.client_address), timeout,
                                 _format_address(self.upstream_address))
                        return
                    changed = False
                    for key, events in ready:
                        feeds, drains = key.data
                        if events & _READ and feeds.pull():
                            changed = True
                        if events & _WRITE and drains.push():
                            changed = True
                    if record is not None:
                        _count_bytes(record, outbound, inbound)
                    if changed:
                        if outbound.done and inbound.done:
                            return
                        _update(selector, registered, roles)
        finally:
            if record is not None:
                _count_bytes(record, outbound, inbound)

    def proxy_header(self, client: socket.socket) -> bytes:
        """The PROXY v2 header announcing this connection: the client and the address it connected to.

        A LOCAL header (the receiver uses the connection's own addresses) when
        they are not IP addresses, e.g. on a Unix socket listener.
        """
        try:
            source = _ip_pair(self.client_address)
            destination = _ip_pair(client.getsockname())
        except ValueError:
            return build_v2(None, None)
        if ":" in source[0] and ":" not in destination[0]:  # a PROXY header has one family for both
            destination = ("::ffff:" + destination[0], destination[1])
        elif ":" in destination[0] and ":" not in source[0]:
            source = ("::ffff:" + source[0], source[1])
        try:
            return build_v2(source, destination)
        except ValueError:
            return build_v2(None, None)

    def _count_error(self) -> None:
        record = getattr(self.server, "record", None)
        if record is not None:
            record.errors += 1


def _update(selector: selectors.BaseSelector, registered: dict[socket.socket, int],
            roles: dict[socket.socket, tuple[_Pipe, _Pipe]]) -> None:
    """Register each socket for exactly the events its two directions need now (none: unregistered)."""
    for sock, (feeds, drains) in roles.items():
        wanted = feeds.source_events() | drains.sink_events()
        current = registered[sock]
        if wanted == current:
            continue
        if not current:
            selector.register(sock, wanted, (feeds, drains))
        elif not wanted:
            selector.unregister(sock)
        else:
            selector.modify(sock, wanted, (feeds, drains))
        registered[sock] = wanted


def _count_bytes(record: Any, outbound: _Pipe, inbound: _Pipe) -> None:
    """Move the client-side byte counts to the worker's scoreboard record."""
    if outbound.received:
        record.bytes_in += outbound.received
        outbound.received = 0
    if inbound.sent:
        record.bytes_out += inbound.sent
        inbound.sent = 0


def _check_upstreams(owner: str, upstreams: Any) -> tuple[tuple[str, int], ...]:
    if isinstance(upstreams, (str, bytes)) or not isinstance(upstreams, Sequence):
        raise TypeError(f"{owner}.upstreams must be a tuple of (host, port) pairs, not {upstreams!r}")
    checked: list[tuple[str, int]] = []
    for item in upstreams:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], int) and not isinstance(item[1], bool) and 0 < item[1] < 65536):
            raise TypeError(f"{owner}.upstreams: {item!r} is not a (host, port) pair with a port in 1-65535")
        checked.append((item[0], item[1]))
    return tuple(checked)


def _ip_pair(address: Any) -> tuple[str, int]:
    if isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], str):
        return address[0], int(address[1])
    raise ValueError(f"not an IP address: {address!r}")


def _format_address(address: Any) -> str:
    if address is None:
        return "(unknown)"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "unix socket"


def _reason(exc: OSError, timeout: float | None = None) -> str:
    """Why a socket call failed, in words that fit mid-sentence: "connection refused"."""
    if isinstance(exc, TimeoutError) and not exc.errno and timeout is not None:
        return f"timed out after {timeout:g}s"
    text = exc.strerror or str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]
