"""The ``async`` worker class: an asyncio event loop (uvloop when installed) per worker.

Handlers are an ``asyncio.Protocol`` subclass or an ``async def handle(reader,
writer)`` coroutine function. The worker keeps the daemon's contract: the
heartbeat is a timer on the loop (a blocked loop goes stale and the master
replaces the worker), SIGTERM stops accepting and lets open connections
finish up to the graceful timeout, ``--max-requests`` recycles, the
scoreboard counts connections, PROXY headers are read before the handler
sees a byte, and ``--max-connections`` caps open connections per worker (at
the cap the worker stops accepting, so the kernel hands new connections to
its siblings).

Counting happens in ``connection_made`` / ``connection_lost`` of a subclass
made once per worker: nothing is added per ``data_received``, so supervision
costs the hot path nothing. Bytes come from the kernel (``TCP_INFO``) when a
connection ends, when they are exported or logged (``--metrics-bind``,
``--access-log``). The built-in echo runs on :mod:`prefork.fastecho` rather
than on transports, unless a connection needs more than its bytes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prefork import logs
from prefork.config import Config
from prefork.fastecho import EchoEngine
from prefork.handlers.aio import EchoProtocol
from prefork.proxy_protocol import DEFAULT_MAX_LENGTH, ProxyProtocolError, parse
from prefork.scoreboard import Record
from prefork.worker import ProxyPolicy, account, log_access

log = logging.getLogger(__name__)

_FD_RESERVE = 32  # descriptors kept free for what a worker opens besides connections (logs, upstream retries)

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def is_async_handler(obj: Any) -> bool:
    """An asyncio Protocol subclass or a coroutine function."""
    return (isinstance(obj, type) and issubclass(obj, asyncio.BaseProtocol)) or inspect.iscoroutinefunction(obj)


def new_event_loop(kind: str | None = "uvloop") -> asyncio.AbstractEventLoop:
    """``kind`` as ``Config.event_loop`` resolves it: uvloop (``pip install prefork[fast]``) or asyncio's own."""
    if kind != "uvloop":
        return asyncio.new_event_loop()
    import uvloop

    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class _PeerTransport:
    """A transport that reports the PROXY header's client as ``peername``; all else is the real one."""

    def __init__(self, transport: asyncio.Transport, peername: Any) -> None:
        self._transport = transport
        self._peername = peername
        # the hot methods as plain attributes: no __getattr__ on every write
        self.write = transport.write
        self.writelines = transport.writelines
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        return self._transport.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _ProxyHeaderReader(asyncio.Protocol):
    """Reads the PROXY header, then hands the connection (and the bytes after it) to the real protocol."""

    def __init__(self, worker: AsyncWorker, make_inner: Callable[[], asyncio.BaseProtocol]) -> None:
        self.worker = worker
        self.make_inner = make_inner
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if not self.worker.proxy_applies(peer):
            self._hand_over(transport, b"")  # not a peer that sends headers: serve it as it is
            return
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.worker.config.proxy_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._reject(f"no complete PROXY header within {self.worker.config.proxy_timeout:g}s")

    def _reject(self, why: str) -> None:
        assert self.transport is not None
        self.worker.record.proxy_errors += 1
        peer = self.transport.get_extra_info("peername")
        log.warning("connection from %s: %s; closing it", peer, why)
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
        if header.command == "LOCAL" and self.worker.record.lb_drain:
            self.transport.abort()  # a health check while draining for the load balancer
            return
        transport: Any = self.transport
        if header.command == "PROXY" and header.source is not None:
            transport = _PeerTransport(self.transport, header.source)
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


class AsyncWorker:
    """One worker's event loop: servers on the shared listeners, counters, drain."""

    def __init__(self, listeners: tuple[socket.socket, ...], handler: Any, config: Config, record: Record, *,
                 max_requests: int, heartbeat_interval: float, master_pid: int,
                 on_retire: Callable[[str], None], on_stop: Callable[[], None], on_ready: Callable[[], None],
                 proxy: ProxyPolicy | None = None) -> None:
        self.listeners = listeners
        self.config = config
        self.record = record
        self.max_requests = max_requests
        self.heartbeat_interval = heartbeat_interval
        self.master_pid = master_pid
        self.on_retire = on_retire
        self.on_stop = on_stop
        self.on_ready = on_ready
        self.proxy_policy = proxy
        self.max_connections = config.max_connections
        self.access_log = not logging.getLogger(logs.ACCESS_LOGGER).disabled
        self.open = 0
        self.accepted = 0
        self.stopping = False
        self.fast = False
        self.listeners_closed = False
        self.servers: list[asyncio.base_events.Server] = []
        self.paused = False
        self.done: asyncio.Future[None] | None = None
        self.counts_own_bytes = hasattr(handler, "record")  # the relay
        self.factory = self._make_factory(handler)
        # the built-in echo needs no transports unless a connection needs more than its bytes
        self.engine: EchoEngine | None = None
        if handler is EchoProtocol and proxy is None and not self.access_log:
            self.engine = EchoEngine(listeners, record, on_open=self.opened, on_close=self.closed,
                                     can_accept=self.can_accept)
        # bytes per connection from the kernel (one TCP_INFO read) when someone looks at them; the relay
        # and the echo engine count their own as they pass
        self.count_bytes = config.count_bytes and not self.counts_own_bytes and self.engine is None
        self.account = self.access_log or self.count_bytes

    # -- connection counting (per connection, never per byte) --------------------------------------

    def opened(self) -> None:
        self.open += 1
        self.accepted += 1
        self.record.active += 1
        if self.max_requests and self.accepted >= self.max_requests:
            self.retire()
        elif self.max_connections and self.open >= self.max_connections and not self.paused:
            self.pause_accepting()

    def closed(self) -> None:
        self.open -= 1
        record = self.record
        record.active -= 1
        record.requests += 1
        if self.stopping:
            if self.open <= 0 and self.done is not None and not self.done.done():
                self.done.set_result(None)
        elif self.paused and not self.listeners_closed and self.open < self.max_connections:
            self.resume_accepting()

    def can_accept(self) -> bool:
        return not (self.stopping or self.paused or self.listeners_closed)

    def proxy_applies(self, peer: Any) -> bool:
        return self.proxy_policy is not None and bool(self.proxy_policy.applies(peer))

    def _make_factory(self, handler: Any) -> Callable[[], asyncio.BaseProtocol]:
        worker = self
        inner: Callable[[], asyncio.BaseProtocol]
        if isinstance(handler, type) and issubclass(handler, asyncio.BaseProtocol):
            proto_class: type[Any] = handler

            class Counted(proto_class):  # type: ignore[misc]
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    worker.opened()
                    if worker.account:
                        self._prefork_account = (transport, time.monotonic())
                    super().connection_made(transport)

                def connection_lost(self, exc: Exception | None) -> None:
                    try:
                        super().connection_lost(exc)
                    finally:
                        worker.closed()
                        if worker.account:
                            # the socket is still open here, under asyncio and uvloop alike
                            transport, started = self._prefork_account
                            counts = account(worker.record if worker.count_bytes else None,
                                             transport.get_extra_info("socket"))
                            if worker.access_log:
                                log_access(transport.get_extra_info("peername"), started, counts,
                                           "ok" if exc is None else "error")

            Counted.__name__ = Counted.__qualname__ = handler.__name__
            if self.counts_own_bytes:
                Counted.record = self.record
            inner = Counted
        else:
            handle: StreamHandler = handler

            async def serve_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                worker.opened()
                started = time.monotonic()
                outcome = "error"
                try:
                    await handle(reader, writer)
                    outcome = "ok"
                except (ConnectionError, TimeoutError) as exc:
                    log.info("connection from %s: %s", writer.get_extra_info("peername"), exc)
                except Exception:
                    worker.record.errors += 1
                    log.exception("error handling connection from %s", writer.get_extra_info("peername"))
                finally:
                    if worker.account:
                        counts = account(worker.record if worker.count_bytes else None,
                                         writer.get_extra_info("socket"))
                        if worker.access_log:
                            log_access(writer.get_extra_info("peername"), started, counts, outcome)
                    writer.close()
                    worker.closed()

            def inner() -> asyncio.BaseProtocol:
                return asyncio.StreamReaderProtocol(asyncio.StreamReader(), serve_stream)

        if self.proxy_policy is None:
            return inner
        return lambda: _ProxyHeaderReader(worker, inner)

    # -- accepting ----------------------------------------------------------------------------------

    async def start_serving(self) -> None:
        if self.engine is not None:
            self.engine.set_accepting(True)
            self.record.serving = 1
            return
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            # a duplicate per server: closing a server (to pause, or to drain) closes only the duplicate
            dup = socket.socket(fileno=os.dup(sock.fileno()))
            dup.setblocking(False)
            server = await loop.create_server(self.factory, sock=dup, backlog=self.config.backlog)
            self.servers.append(server)
        self.record.serving = 1

    def stop_serving(self) -> None:
        if self.engine is not None:
            self.engine.set_accepting(False)
        for server in self.servers:
            server.close()
        self.servers.clear()
        self.record.serving = 0

    def pause_accepting(self) -> None:
        self.paused = True
        self.stop_serving()

    def resume_accepting(self) -> None:
        self.paused = False
        if self.engine is not None:
            self.engine.set_accepting(True)
            self.record.serving = 1
            return
        asyncio.get_running_loop().create_task(self.start_serving())

    # -- lifecycle ----------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        self.record.heartbeat = time.monotonic()
        if os.getppid() != self.master_pid and not self.stopping:
            log.warning("master (pid %d) is gone; stopping", self.master_pid)
            self.begin_stop()
        asyncio.get_running_loop().call_later(self.heartbeat_interval, self.heartbeat)

    def retire(self) -> None:
        if not self.stopping:
            self.on_retire(f"max-requests ({self.max_requests}) reached")
            self.begin_stop()

    def begin_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_serving()
        if os.getppid() != self.master_pid:
            self.close_listeners()
        self.on_stop()
        loop = asyncio.get_running_loop()
        assert self.done is not None
        if self.open <= 0:
            self.done.set_result(None)
        else:
            loop.call_later(self.config.graceful_timeout, self._deadline)

    def _deadline(self) -> None:
        if self.done is not None and not self.done.done():
            log.warning("worker (pid %d): graceful timeout with %d connection(s) still open; closing them",
                        os.getpid(), self.open)
            self.done.set_result(None)

    def close_listeners(self) -> None:
        """SIGUSR2: drain for a load balancer by closing the listening sockets (see preforkctl drain)."""
        self.listeners_closed = True
        self.stop_serving()
        if self.engine is not None:
            self.engine.drop_listeners()
        for sock in self.listeners:
            sock.close()

    def fast_exit(self) -> None:
        self.fast = True
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def cap_within_fd_limit(self) -> None:
        """Stop accepting before the file-descriptor limit rather than at it, as HAProxy derives maxconn.

        At the limit uvloop's accept (libuv's) takes the waiting connections
        and closes them, resetting their clients; a worker at its cap leaves
        them queued for a sibling instead. The echo engine pauses at EMFILE
        itself, so it needs no cap.
        """
        if self.engine is not None:
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
        per_connection = 2 if self.counts_own_bytes else 1  # the relay holds the upstream too
        room = max(1, (soft - in_use - _FD_RESERVE) // per_connection)
        if not self.max_connections or room < self.max_connections:
            log.info("worker (pid %d): %d open files allowed (RLIMIT_NOFILE): at most %d connections at once",
                     os.getpid(), soft, room)
            self.max_connections = room

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        loop.set_exception_handler(self._on_loop_error)
        for signum, action in ((signal.SIGTERM, self.begin_stop), (signal.SIGINT, self.fast_exit),
                               (signal.SIGQUIT, self.fast_exit), (signal.SIGUSR1, logs.reopen),
                               (signal.SIGUSR2, self.close_listeners)):
            loop.add_signal_handler(signum, action)
        if self.engine is not None:
            self.engine.start(loop)
        await self.start_serving()
        self.cap_within_fd_limit()
        # the master forked us with its signals blocked: now that handlers are in place, take them
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        self.heartbeat()
        self.on_ready()
        await self.done

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception in a protocol callback: logged with its traceback, that connection only."""
        self.record.errors += 1
        exc = context.get("exception")
        log.error("%s", context.get("message", "error in the event loop"),
                  exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)


def serve(listeners: tuple[socket.socket, ...], handler: Any, config: Config, record: Record,
          **kwargs: Any) -> None:
    """Run an async worker until it has stopped; returns normally (the caller exits the process)."""
    worker = AsyncWorker(listeners, handler, config, record, **kwargs)
    loop = new_event_loop(config.event_loop)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(worker.run())
    finally:
        if not worker.fast:
            log.debug("async worker (pid %d) stopped", os.getpid())
