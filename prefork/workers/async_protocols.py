"""The protocols an ``async`` worker serves its handler with: counted, behind a PROXY header or a TLS handshake.

:func:`make_factories` gives each listener its protocol factory: the
handler (an ``asyncio.Protocol`` subclass, or an ``async def handle(reader,
writer)`` as a stream protocol) wrapped so the worker counts connections as
they open and close (and reads their bytes from the kernel as they end,
when someone looks at them); on a plain listener behind a
:class:`ProxyHeaderReader` when peers send PROXY headers; on a TLS listener
behind :class:`prefork.workers.async_tls.TlsAccept`, which reads the header
and runs the handshake first. Nothing here is added per ``data_received``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from prefork.logs import RateLimitedLog
from prefork.proxy_protocol import DEFAULT_MAX_LENGTH, ProxyProtocolError, parse
from prefork.scoreboard import count_error
from prefork.tls import ServerTls
from prefork.workers.async_tls import ConnectionTransport, TlsAccept, TlsHost, release
from prefork.workers.async_watch import AsyncWatch

log = logging.getLogger(__name__)
_client_failures = RateLimitedLog(log)  # timeouts and resets: a client's doing, repeatable at will

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class CountingWorker(TlsHost, Protocol):
    """What the protocols need of their worker (:class:`prefork.workers.async_worker.AsyncWorker`)."""

    tls: tuple[ServerTls | None, ...]
    proxy: Any
    counts_own_bytes: bool
    account: bool
    watch: AsyncWatch

    def opened(self, accepted: bool = True) -> None: ...
    def closed(self) -> None: ...
    def connection_ended(self, connection: Any, started: float, outcome: str) -> None: ...


class ProxyHeaderReader(asyncio.Protocol):
    """Reads the PROXY header, then hands the connection (and the bytes after it) to the real protocol."""

    def __init__(self, worker: CountingWorker, make_inner: Callable[[], asyncio.BaseProtocol]) -> None:
        self.worker = worker
        self.make_inner = make_inner
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timeout = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        proxy = self.worker.proxy_for(transport.get_extra_info("peername"))
        if proxy is None:
            self._hand_over(transport, b"")  # not a peer that sends headers: serve it as it is
            return
        self.timeout = proxy.timeout
        self.timer = asyncio.get_running_loop().call_later(proxy.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._reject(f"no complete PROXY header within {self.timeout:g}s")

    def _reject(self, why: str) -> None:
        assert self.transport is not None
        self.worker.proxy_header_failed(self.transport.get_extra_info("peername"), why)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            header = parse(self.buffer, max_length=DEFAULT_MAX_LENGTH)
        except ProxyProtocolError as exc:
            self._reject(str(exc))
            return
        if header is None:
            return  # a valid beginning: wait for more
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        if self.worker.closes_health_check(header):
            self.transport.abort()
            return
        transport: Any = self.transport
        if header.command == "PROXY" and header.source is not None:
            transport = ConnectionTransport(self.transport, header.source)
        self._hand_over(transport, self.buffer[header.length:])

    def _hand_over(self, transport: Any, rest: bytes) -> None:
        inner = self.make_inner()
        assert self.transport is not None
        self.transport.set_protocol(inner)
        inner.connection_made(transport)
        if rest and isinstance(inner, asyncio.Protocol):
            inner.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


def make_factories(worker: CountingWorker, handler: Any) -> list[Callable[[], asyncio.BaseProtocol] | TlsAccept]:
    """Each listener's protocol factory (the handler's, behind a PROXY header reader when peers send
    one), or for a TLS listener what takes each connection to its handshake (:class:`TlsAccept`)."""
    plain: Callable[[], asyncio.BaseProtocol] | None = None
    after_handshake: Callable[[], asyncio.BaseProtocol] | None = None
    factories: list[Callable[[], asyncio.BaseProtocol] | TlsAccept] = []
    for server_tls in worker.tls:
        if server_tls is None:
            if plain is None:
                inner = _inner(worker, handler, accepted=True)
                plain = inner if worker.proxy is None else functools.partial(ProxyHeaderReader, worker, inner)
            factories.append(plain)
        else:
            if after_handshake is None:
                after_handshake = _inner(worker, handler, accepted=False)  # counted as accepted at its handshake
            factories.append(TlsAccept(worker, server_tls, after_handshake))
    return factories

def _always() -> bool:
    return True


def _inner(worker: CountingWorker, handler: Any, accepted: bool) -> Callable[[], asyncio.BaseProtocol]:
    if isinstance(handler, type) and issubclass(handler, asyncio.BaseProtocol):
        return _counted(worker, handler, accepted)
    return _streamed(worker, handler, accepted)

def _counted(worker: CountingWorker, handler: type[asyncio.BaseProtocol],
             accepted: bool) -> type[asyncio.BaseProtocol]:
    """``handler`` counted in the scoreboard (and in the access log) as connections open and close."""
    proto_class: type[Any] = handler
    counts_own = worker.counts_own_bytes
    track = worker.account or worker.keeps_sockets

    class Counted(proto_class):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            worker.opened(accepted)
            if counts_own:  # a protocol that counts its bytes counts them in this worker's record
                self.record = worker.record
            if track:
                self._prefork_account = (transport, time.monotonic())
            self._prefork_transport = transport
            # a protocol cannot block: silent, it waits on its client (or on a write the client does not read)
            worker.watch.open(transport, _always)
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            worker.watch.ended(self._prefork_transport)
            try:
                super().connection_lost(exc)
            finally:
                if track:
                    # the socket is still open here under asyncio and uvloop alike (a TLS connection's:
                    # the descriptor async_tls kept for this). Its bytes are in before it counts as
                    # handled, so whoever sees it handled sees its bytes.
                    transport, started = self._prefork_account
                    if worker.account:
                        worker.connection_ended(transport, started, "ok" if exc is None else "error")
                    release(transport)
                worker.closed()

    Counted.__name__ = Counted.__qualname__ = handler.__name__
    return Counted

def _streamed(worker: CountingWorker, handle: StreamHandler, accepted: bool) -> Callable[[], asyncio.BaseProtocol]:
    """An ``async def handle(reader, writer)`` as a protocol factory, counted like a protocol."""

    async def serve_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        outcome = "error"
        worker.watch.serving(writer.transport, asyncio.current_task())
        try:
            await handle(reader, writer)
            outcome = "ok"
        except asyncio.CancelledError:
            if writer.transport not in worker.watch.closed_by_us:
                raise
            # cancelled by the worker with its connection (--handler-timeout): ends as a closed one
        except (ConnectionError, TimeoutError) as exc:
            _client_failures.info("connection from %s: %s", writer.get_extra_info("peername"), exc)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # sys.exit() in handle(): this connection only
            if writer.transport not in worker.watch.closed_by_us:
                count_error(worker.record, exc)
                log.exception("error handling connection from %s", writer.get_extra_info("peername"))
        finally:
            if worker.watch.ended(writer.transport) and outcome == "error":
                outcome = "closed"  # by the worker (idle timeout, reclaimed): counted as such, not an error
            if worker.account:
                worker.connection_ended(writer, started, outcome)
            writer.close()
            worker.closed()
            release(writer.transport)

    class Streamed(asyncio.StreamReaderProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # counted here, not when serve_stream starts: a draining worker must not end in between
            worker.opened(accepted)
            # the handler waits on its client while it awaits a read from it, or a drain it does not read
            reader = getattr(self, "_stream_reader", None)
            worker.watch.open(transport, lambda: reader is not None and (
                getattr(reader, "_waiter", None) is not None or transport.get_write_buffer_size() > 0))  # type: ignore[attr-defined]
            super().connection_made(transport)

    def protocol() -> asyncio.BaseProtocol:
        return Streamed(asyncio.StreamReader(), serve_stream)

    return protocol
