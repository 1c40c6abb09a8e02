"""The ``async`` worker class: an asyncio event loop (uvloop when installed) per worker.

Handlers are an ``asyncio.Protocol`` subclass or an ``async def handle(reader,
writer)`` coroutine function. The lifecycle is
:class:`~prefork.workers.base.WorkerLifecycle`'s; this module supplies its I/O
on the loop: the heartbeat is a timer on the loop (a blocked loop goes stale
and the master replaces the worker), signals arrive through
``loop.add_signal_handler``, accepting is an asyncio server per listener
(closed to pause), and ``--max-connections`` caps open connections per worker
(at the cap the worker stops accepting, so the kernel hands new connections
to its siblings).

Counting happens in ``connection_made`` / ``connection_lost`` of a subclass
made once per worker: nothing is added per ``data_received``, so supervision
costs the hot path nothing. Bytes come from the kernel (``TCP_INFO``) when a
connection ends, when they are exported or logged (``--metrics-bind``,
``--access-log``). The built-in echo runs on
:mod:`prefork.workers.echo_engine` rather than on transports, unless a
connection needs more than its bytes, and not when a listener speaks TLS.

TLS listeners (:mod:`prefork.workers.async_tls`): the worker reads the PROXY
header and runs the handshake itself, bounded by their timeouts, counts
handshakes and failures, then hands the handler a TLS transport: the client's
verified certificate is ``transport.get_extra_info("peercert")`` (a Protocol)
or ``writer.get_extra_info("peercert")`` (a stream handler), with
``"ssl_object"`` and ``"cipher"`` beside it. Plain listeners beside TLS ones
are served as ever.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prefork import logs
from prefork.config import Config
from prefork.handlers.aio import EchoProtocol
from prefork.listeners import accept_failed, describe
from prefork.scoreboard import Record, count_error
from prefork.workers.admission import FD_RESERVE, LISTENER_GONE_ERRNOS, MAX_PENDING_HANDSHAKES, Reason
from prefork.workers.async_protocols import make_factories
from prefork.workers.async_tls import TlsAccept, TlsListener
from prefork.workers.async_watch import AsyncWatch
from prefork.workers.balance import RECHECK
from prefork.workers.base import FastExit, WorkerLifecycle, WorkerOptions
from prefork.workers.connection import account, counts_own_bytes, log_access
from prefork.workers.echo_engine import EchoEngine

log = logging.getLogger(__name__)


# what accepts on a listener: asyncio's server, or a TLS listener's own accept (async_tls.TlsListener)
Server = asyncio.base_events.Server | TlsListener
StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def new_event_loop(kind: str | None = "uvloop") -> asyncio.AbstractEventLoop:
    """``kind`` as ``Config.event_loop`` resolves it: uvloop (``pip install prefork[fast]``) or asyncio's own."""
    if kind != "uvloop":
        return asyncio.new_event_loop()
    import uvloop

    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class AsyncWorker(WorkerLifecycle):
    """One worker's event loop: servers on the shared listeners, counters, the connection cap."""

    def __init__(self, listeners: Sequence[socket.socket], handler: Any, config: Config, record: Record,
                 options: WorkerOptions) -> None:
        super().__init__(listeners, record, options)
        self.config = config
        self.max_connections = config.max_connections
        self.access_log = not logging.getLogger(logs.ACCESS_LOGGER).disabled
        self.open = 0  # connections a handler has
        self.handshaking = 0  # connections on TLS listeners still in their PROXY header or handshake
        # their tasks, oldest first (the loop keeps only weak references)
        self.handshakes: dict[asyncio.Task[None], None] = {}
        self.fast = False
        self.servers: list[Server] = []
        self.paused = False
        self.recheck: asyncio.TimerHandle | None = None  # the next look while stepped back (--balance)
        self.done: asyncio.Future[None] | None = None
        self.counts_own_bytes = counts_own_bytes(handler)  # the relay
        # the built-in echo needs no transports unless a connection needs more than its bytes
        self.engine: EchoEngine | None = None
        # (nor with --max-connections-per-source, which needs each connection's peer as a transport gives it)
        if (handler is EchoProtocol and self.proxy is None and not self.access_log and not any(self.tls)
                and not self.admission_policy.max_per_source):
            self.engine = EchoEngine(self.listeners, record, on_open=self.opened, on_close=self.closed,
                                     can_accept=self.can_accept, on_listener_gone=self.listener_gone,
                                     on_accepting=self.mark_accepting, on_reclaim=self._engine_reclaimed,
                                     reclaims=bool(self.admission_policy.reclaim_window))
        # every listening descriptor of ours (the listeners, each server's duplicate) -> (its inode, address),
        # to notice one closed under us (the heartbeat looks)
        self.listening: dict[int, tuple[int, str]] = {}
        self.server_fds: dict[Server, int] = {}  # each server's duplicate of its listener
        self.abandoned: list[Server] = []  # servers on a lost descriptor, never closed
        # bytes per connection from the kernel (one TCP_INFO read) when someone looks at them; the relay
        # and the echo engine count their own as they pass
        self.count_bytes = config.count_bytes and not self.counts_own_bytes and self.engine is None
        self.account = self.access_log or self.count_bytes
        # TLS connections whose bytes someone counts hold a descriptor of their own (async_tls.ConnectionTransport)
        self.keeps_sockets = any(self.tls) and (self.account or self.counts_own_bytes)
        self.factories = make_factories(self, handler)  # one per listener, in the order of the listeners
        # the handlers' connections (their transports), for --idle-timeout and reclaiming at the cap
        self.watch = AsyncWatch(self, self.admission_policy, self.sources)
        if self.engine is not None:
            self.watch.elsewhere = self.engine

    # -- connection counting (per connection, never per byte) --------------------------------------

    def opened(self, accepted: bool = True) -> None:
        """A handler has a connection; ``accepted`` False when it was counted as accepted at its handshake."""
        self.open += 1
        self.record.active += 1
        if accepted:
            self.count_accepted()
        self._took()

    def _engine_reclaimed(self) -> None:
        self.closed_for(Reason.RECLAIMED)

    def closed_for(self, reason: Reason) -> None:
        self.watch.admission.closing(None, reason)

    def begin_handshake(self) -> None:
        """A connection on a TLS listener, before its handshake: open and accepted, not yet a handler's."""
        self.handshaking += 1
        self.count_accepted()
        if not (self.stopping or self.paused) and self.at_cap():
            self.pause_accepting()

    def end_handshake(self, handed_over: bool) -> None:
        """Its handshake is over: the handler has it (``opened`` follows at once), or it failed and is closed."""
        self.handshaking -= 1
        if not handed_over:
            self._let_go()

    def track(self, task: asyncio.Task[None]) -> None:
        """A connection's header and handshake task. No cap closes the door: at MAX_PENDING_HANDSHAKES the
        oldest unfinished one is dropped (its task cancelled: the connection is closed) for the new one."""
        while len(self.handshakes) >= MAX_PENDING_HANDSHAKES:
            oldest = next(iter(self.handshakes))
            del self.handshakes[oldest]
            oldest.cancel()
            self.watch.admission.closing(None, Reason.HANDSHAKE_DROPPED)
        self.handshakes[task] = None
        task.add_done_callback(self._handshake_over)

    def _handshake_over(self, task: asyncio.Task[None]) -> None:
        self.handshakes.pop(task, None)

    def connections(self) -> int:
        """Open connections: those a handler has and those still in their handshake."""
        return self.open + self.handshaking

    def at_cap(self) -> bool:
        """True while the worker holds --max-connections connections (none: no cap)."""
        return bool(self.max_connections) and self.connections() >= self.max_connections

    def _took(self) -> None:
        if self.stopping or self.paused:
            return
        if self.at_cap():
            self.pause_accepting()
            self.watch.at_cap_now()
        elif self.over_share():
            self.pause_accepting()  # the kernel wakes a sibling for the next one
            if self.recheck is None:
                self.recheck = asyncio.get_running_loop().call_later(RECHECK, self._recheck_share)

    def closed(self) -> None:
        self.open -= 1
        record = self.record
        record.active -= 1
        record.requests += 1
        self._let_go()

    def _let_go(self) -> None:
        """A connection has ended: the drain may be over, or there is room to accept again."""
        if self.stopping:
            if self.connections() <= 0 and self.done is not None and not self.done.done():
                self.done.set_result(None)
        elif self.paused:
            self._resume_if_free()

    def _resume_if_free(self) -> None:
        """Paused (at the cap, or stepped back for balance): accept again once neither holds."""
        if self.listeners_closed or self.stopping:
            return
        if self.at_cap():
            return
        if self.still_over_share():
            return
        self.resume_accepting()

    def rebalance(self) -> None:
        """A sibling holding more than its share woke us: accept again unless still over ours."""
        if self.stepped_back and self.paused:
            self._resume_if_free()

    def _recheck_share(self) -> None:
        """While stepped back, look again: siblings' counts change without waking this worker."""
        self.recheck = None
        if not self.stepped_back:
            return
        if self.paused:
            self._resume_if_free()
        if self.stepped_back:
            self.recheck = asyncio.get_running_loop().call_later(RECHECK, self._recheck_share)

    def can_accept(self) -> bool:
        return not (self.stopping or self.paused or self.listeners_closed)

    def connection_ended(self, connection: Any, started: float, outcome: str) -> None:
        """A connection's bytes from the kernel, into the record and the access log as configured.

        ``connection`` is its transport or stream writer, its socket still open.
        """
        counts = account(self.record if self.count_bytes else None, connection.get_extra_info("socket"))
        if self.access_log:
            log_access(connection.get_extra_info("peername"), started, counts, outcome)

    # -- accepting ----------------------------------------------------------------------------------

    async def start_serving(self) -> None:
        if self.engine is not None:
            self.engine.set_accepting(True)
            return
        if self.servers:
            return  # serving already: a resume raced another
        loop = asyncio.get_running_loop()
        for sock, factory in zip(self.listeners, self.factories, strict=True):
            if sock.fileno() < 0 or self.listener_lost:
                continue
            # a duplicate per server: closing a server (to pause, or to drain) closes only the duplicate
            dup = socket.socket(fileno=os.dup(sock.fileno()))
            dup.setblocking(False)
            fd = dup.fileno()
            self.listening[fd] = (os.fstat(fd).st_ino, describe(dup))
            server: Server
            if isinstance(factory, TlsAccept):  # a TLS listener: the worker accepts itself (async_tls)
                server = TlsListener(dup, factory.take, self._accept_failed)
            else:
                server = await loop.create_server(factory, sock=dup, backlog=self.config.backlog)
            self.servers.append(server)
            self.server_fds[server] = fd
        if self.paused or self.stopping or self.listeners_closed:
            self.stop_accepting()  # paused again, or told to stop, while the servers were being made
            return
        self.mark_accepting(bool(self.servers))

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> bool:
        """A TLS listener's ``accept()`` failed: True when it should pause (out of descriptors)."""
        if exc.errno in LISTENER_GONE_ERRNOS:
            self.check_listeners()  # abandons it, and this worker retires
            return False
        return accept_failed(sock, exc)

    def stop_accepting(self) -> None:
        if self.engine is not None:
            self.engine.set_accepting(False)
        for server in self.servers:
            self.listening.pop(self.server_fds.pop(server, -1), None)
            server.close()
        self.servers.clear()
        if self.engine is None:
            self.mark_accepting(False)

    def check_listeners(self) -> None:
        """Each listening descriptor still the socket it was; one closed under us means that listener is gone.

        asyncio and uvloop keep waking for a descriptor closed behind their
        back (its registration outlives it) without saying so, so the
        heartbeat looks: a couple of ``fstat`` calls a second.
        """
        for fd, (ino, address) in list(self.listening.items()):
            try:
                if os.fstat(fd).st_ino == ino:
                    continue
                error = OSError(errno.ENOTSOCK, "the descriptor is now another file")
            except OSError as exc:
                error = exc
            self._lose_listener(fd, address, error)
            return

    def _lose_listener(self, fd: int, address: str, exc: OSError) -> None:
        """A listening descriptor closed under us: abandon what serves it (never closing that number
        again: it may be a connection now), and retire."""
        self.listening.pop(fd, None)
        for server in list(self.servers):
            if self.server_fds.get(server) == fd:
                del self.server_fds[server]
                self.servers.remove(server)
                self.abandoned.append(server)
                if isinstance(server, TlsListener):
                    server.abandon()
        for sock in self.listeners:
            if sock.fileno() == fd:
                sock.detach()
        self.listener_gone(address, exc)

    def pause_accepting(self) -> None:
        self.paused = True
        self.stop_accepting()

    def resume_accepting(self) -> None:
        self.paused = False
        if self.engine is not None:
            self.engine.set_accepting(True)
            return
        asyncio.get_running_loop().create_task(self.start_serving())

    def forget_listeners(self) -> None:
        self.listening.clear()
        if self.engine is not None:
            self.engine.drop_listeners()

    # -- the lifecycle's I/O ------------------------------------------------------------------------

    def open_connections(self) -> int:
        return max(self.connections(), 0)

    def on_stopping(self) -> None:
        assert self.done is not None
        if self.connections() <= 0:
            self.done.set_result(None)
        else:
            asyncio.get_running_loop().call_later(self.graceful_timeout, self._deadline)

    def _deadline(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)  # run() says how many connections this cuts short

    def fast_exit(self) -> None:
        self.fast = True
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def beat(self) -> None:
        """The heartbeat timer: stamp, check the master and the listeners are still there, and come back."""
        asyncio.get_running_loop().call_later(self.heartbeat_interval, self.beat)  # first: whatever follows
        self.heartbeat()
        self.check_master()
        if not self.stopping:
            self.check_listeners()

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
        if self.keeps_sockets:
            per_connection += 1  # a TLS connection's descriptor kept to count its bytes
        room = max(1, (soft - in_use - FD_RESERVE) // per_connection)
        if not self.max_connections or room < self.max_connections:
            log.info("worker (pid %d): %d open files allowed (RLIMIT_NOFILE): at most %d connections at once",
                     os.getpid(), soft, room)
            self.max_connections = room

    def serve(self) -> None:
        """Run the event loop until the worker has stopped; raises FastExit after SIGINT/SIGQUIT."""
        loop = new_event_loop(self.config.event_loop)
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._main())
        if self.fast:
            raise FastExit("fast exit")
        log.debug("async worker (pid %d) stopped", os.getpid())

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        loop.set_exception_handler(self._on_loop_error)
        for signum, action in self.signal_actions().items():
            loop.add_signal_handler(signum, action)
        if self.engine is not None:
            self.engine.start(loop)
        for sock in self.listeners:
            self.listening[sock.fileno()] = (os.fstat(sock.fileno()).st_ino, describe(sock))
        await self.start_serving()
        self.cap_within_fd_limit()
        self.announce_ready()
        self.beat()
        self.watch.schedule()
        self.on_drain(self.watch.drain_began)  # --drain-idle from the drain's first tick
        await self.done

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception in a protocol callback: logged with its traceback, that connection only.

        asyncio's own accept failing on a descriptor closed under it is not a
        handler's error: it is a listener gone (once), and silence after that.
        """
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in LISTENER_GONE_ERRNOS and "_accept_connection" in str(
                context.get("message", "")):
            if not self.listener_lost:
                self.check_listeners()
            return
        count_error(self.record, exc if isinstance(exc, BaseException) else None)
        log.error("%s", context.get("message", "error in the event loop"),
                  exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
