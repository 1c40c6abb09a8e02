"""The ``sync`` and ``thread`` worker classes: socketserver servers on the listeners the master bound.

A worker serves with a socketserver server whose ``serve_forever()`` is a
selector loop (not socketserver's 0.5 s poll): the listeners are non-blocking
and registered with ``EPOLLEXCLUSIVE``, so a new connection wakes one idle
worker rather than all of them, and a worker that loses the accept race gets
``EAGAIN`` instead of blocking in ``accept()``. Each turn of the loop stamps
the worker's heartbeat in the scoreboard; the master kills a worker whose
heartbeat goes stale. The lifecycle (signals, stop, retire, orphan check,
PROXY decisions) is :class:`~prefork.workers.base.WorkerLifecycle`'s; this
module supplies the I/O.

Two server classes run any ``socketserver.BaseRequestHandler`` subclass:

* :class:`SyncServer` (``--worker-class sync``): ``TCPServer`` semantics, one
  connection at a time, handled in the serving loop itself.
* :class:`ThreadServer` (``--worker-class thread``): a bounded pool of
  threads; when every thread is busy the worker stops accepting, so the
  kernel hands new connections to its siblings.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from prefork import logs, tls
from prefork.listeners import ACCEPT_PAUSE, accept_failed, describe, watch
from prefork.proxy_protocol import ProxyProtocolError, read_header
from prefork.scoreboard import Record, count_error
from prefork.workers.balance import RECHECK
from prefork.workers.base import (
    FAST_EXIT_SIGNALS,
    LISTENER_GONE_ERRNOS,
    FastExit,
    WorkerLifecycle,
    WorkerOptions,
)
from prefork.workers.connection import account, counts_own_bytes, format_peer, log_access
from prefork.workers.handshakes import Handshakes

log = logging.getLogger(__name__)
_client_failures = logs.RateLimitedLog(log)  # timeouts, resets, TLS errors (keys): a client can repeat them

_ACCEPT_BATCH = 16  # connections accepted per readiness event before the loop polls again
SHUTDOWN_REASON = "a handler called self.server.shutdown()"
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP})  # see WorkerServer._on_stop_signal


class WorkerServer(socketserver.TCPServer, WorkerLifecycle):
    """A ``TCPServer`` serving sockets the master already bound, under the worker lifecycle.

    Keeps socketserver's hooks and their contracts (``verify_request``,
    ``process_request``, ``finish_request``, ``shutdown_request``,
    ``handle_error``), so a handler sees ``self.server`` and
    ``self.client_address`` as it would under ``TCPServer`` (and
    ``self.server.record``, the worker's scoreboard record). Subclasses
    override :meth:`process_request`, :meth:`open_connections` and :meth:`full`.
    """

    def __init__(
        self,
        listeners: Sequence[socket.socket],
        handler_class: type[socketserver.BaseRequestHandler],
        record: Record,
        options: WorkerOptions,
        *,
        count_bytes: bool = False,
    ) -> None:
        # TCPServer.__init__ would make a fresh socket; ours are bound already.
        socketserver.BaseServer.__init__(self, listeners[0].getsockname(), handler_class)
        WorkerLifecycle.__init__(self, listeners, record, options)
        self.socket = listeners[0]
        self.address_family = self.socket.family
        self.access_log = not logging.getLogger(logs.ACCESS_LOGGER).disabled
        # bytes per connection from the kernel, when someone looks at them (the relay counts its own)
        self.count_bytes = count_bytes and not counts_own_bytes(handler_class)
        self.account = self.access_log or self.count_bytes
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll = select.epoll()
        self._by_fd = {s.fileno(): s for s in self.listeners}
        # TLS listeners: their connections' handshakes run in this loop before the handler sees them
        self._tls_by_fd = {s.fileno(): t for s, t in zip(self.listeners, self.tls, strict=True) if t is not None}
        self._handshakes = Handshakes(record, self._handshake_done, self.proxy_header_failed,
                                      self.closes_health_check)
        self._addresses = {fd: describe(s) for fd, s in self._by_fd.items()}  # for the log, once one is gone
        self._accepting = False
        self._accept_paused_until = 0.0
        self._signals: dict[int, Callable[[], None]] = {}  # by number, as they arrive on the wakeup socket
        # socketserver ignores these on a plain BaseRequestHandler; a user who sets them means them
        is_stream = issubclass(handler_class, socketserver.StreamRequestHandler)
        timeout = getattr(handler_class, "timeout", None)
        self._extra_timeout: float | None = None if is_stream else timeout
        self._extra_nodelay = not is_stream and bool(getattr(handler_class, "disable_nagle_algorithm", False))
        self._signal_pending = False  # SIGTERM or SIGUSR2 arrived and the loop has not read it yet
        self._loop_thread = threading.get_ident()  # the thread running serve_forever()
        self._shutdown_asked = False  # shutdown() was called from another thread: the loop retires us
        self._not_accepting = threading.Event()  # set once this worker stops for good (shutdown() waits on it)

    # -- wiring -------------------------------------------------------------------------------------

    @property
    def wakeup_fd(self) -> int:
        """The fd to pass to ``signal.set_wakeup_fd``: signal numbers arrive as bytes."""
        return self._wake_w.fileno()

    def wake(self) -> None:
        """Make the serving loop turn (a 0 byte: no signal has number 0). Safe from any thread."""
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def fileno(self) -> int:
        return self.socket.fileno()

    def server_close(self) -> None:
        self._handshakes.close_all()
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def install_signals(self) -> None:
        """Signal numbers arrive as bytes on the wakeup socket and the loop runs their actions.

        The Python-level handlers do nothing, except SIGINT's and SIGQUIT's:
        they raise :class:`FastExit` in the main thread wherever it is, so a
        ``handle()`` blocked on a socket is interrupted too.
        """
        self._signals = {int(signum): action for signum, action in self.signal_actions().items()}
        for signum in self._signals:
            signal.signal(signum, _raise_fast_exit if signum in FAST_EXIT_SIGNALS
                          else self._on_stop_signal if signum in _STOP_SIGNALS else _noop)
        signal.set_wakeup_fd(self.wakeup_fd, warn_on_full_buffer=False)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM or SIGUSR2 arrived: a batch of accepts stops there, the loop acts on it first."""
        self._signal_pending = True

    def shutdown(self) -> None:
        _shutdown(self)

    def on_stopping(self) -> None:
        self._not_accepting.set()

    # -- the lifecycle's I/O ------------------------------------------------------------------------

    def serve(self) -> None:
        self.install_signals()
        self.announce_ready()
        self.serve_forever()

    def stop_accepting(self) -> None:
        self.set_accepting(False)

    def fast_exit(self) -> None:
        raise FastExit("fast exit")

    def open_connections(self) -> int:
        return len(self._handshakes)

    def full(self) -> bool:
        """True while the worker cannot take another connection."""
        return self._handshakes.full()

    def forget_listeners(self) -> None:  # closed on purpose: not a listener lost under us (_check_listeners)
        self._by_fd.clear()
        self._tls_by_fd.clear()

    # -- the loop -----------------------------------------------------------------------------------

    def set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        gone: list[tuple[int, OSError]] = []
        for fd in self._by_fd:
            try:
                if on:
                    watch(self._epoll, fd)
                else:
                    self._epoll.unregister(fd)
            except OSError as exc:
                if exc.errno not in (*LISTENER_GONE_ERRNOS, errno.ENOENT):
                    raise
                gone.append((fd, exc))
        self._accepting = on
        self.mark_accepting(on)
        for fd, error in gone:
            self._lose_listener(fd, error)

    def _check_listeners(self) -> None:
        """On an idle turn: a listener a handler closed (``self.server.socket.close()``) is gone."""
        for fd, sock in list(self._by_fd.items()):
            if sock.fileno() == -1:
                self._lose_listener(fd, OSError(errno.EBADF, os.strerror(errno.EBADF)))

    def _lose_listener(self, fd: int, exc: OSError) -> None:
        """The listening socket on ``fd`` is gone under us: forget it, and retire.

        Its epoll registration cannot be removed any more (``epoll_ctl``
        needs the descriptor, and the registration lives on while the master
        and siblings hold the socket open), so it would report readiness for
        ever: the epoll set is made afresh without it.
        """
        sock = self._by_fd.pop(fd, None)
        if sock is None:
            return
        if sock.fileno() != -1:
            sock.detach()  # its number may be someone else's descriptor now: never close it
        old, self._epoll = self._epoll, select.epoll()
        old.close()
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._handshakes.watch_on(self._epoll)
        if self._accepting:
            for other in self._by_fd:
                watch(self._epoll, other)
        self.listener_gone(self._addresses.get(fd, f"fd {fd}"), exc)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until asked to stop and drained. ``poll_interval`` is ignored: nothing here polls."""
        self._loop_thread = threading.get_ident()
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._handshakes.watch_on(self._epoll)
        self.set_accepting(True)
        wake_fd = self._wake_r.fileno()
        while True:
            timeout = self._next_timeout(self.heartbeat())
            if timeout is None:
                break
            events = self._epoll.poll(timeout)
            if not events:
                self.check_master()
                self._check_listeners()
            # signals before connections: after a SIGTERM this worker must not take another one
            if any(fd == wake_fd for fd, _ in events):
                self._drain_wakeups()
            if self._shutdown_asked:
                self.retire(SHUTDOWN_REASON)
            self.service_actions()
            for fd, _ in events:
                if fd == wake_fd or self._handshakes.on_event(fd):
                    continue
                if self._accepting and (sock := self._by_fd.get(fd)) is not None:
                    self._accept_batch(sock)
            if self._handshakes:
                self._handshakes.expire(time.monotonic())

    def _next_timeout(self, now: float) -> float | None:
        """How long the loop may wait for an event; None once a stopping worker is drained or out of time."""
        if self.stopping:
            if not self.open_connections() or now >= self.stop_deadline:
                return None
            return self._handshake_timeout(now, min(self.heartbeat_interval, self.stop_deadline - now))
        if self.stepped_back:
            self.still_over_share()  # siblings' counts change without waking us: look on every turn
        if (not self._accepting and now >= self._accept_paused_until and not self.full()
                and not self.listeners_closed and not self.stepped_back):
            self.set_accepting(True)
        timeout = RECHECK if self.stepped_back else self.heartbeat_interval
        if self._accept_paused_until > now:
            timeout = min(timeout, self._accept_paused_until - now)
        return self._handshake_timeout(now, timeout)

    def _handshake_timeout(self, now: float, timeout: float) -> float:
        """``timeout``, or less when a connection's header or handshake comes due sooner."""
        deadline = self._handshakes.next_deadline()
        return timeout if deadline is None else max(0.0, min(timeout, deadline - now))

    def _drain_wakeups(self) -> None:
        self._signal_pending = False
        while True:
            try:
                data = self._wake_r.recv(512)
            except BlockingIOError:
                return
            for signum in data:
                action = self._signals.get(signum)
                if action is not None:
                    action()

    def _accept_batch(self, sock: socket.socket) -> None:
        # under load the backlog rarely empties: take a few in a row before polling again
        for _ in range(_ACCEPT_BATCH):
            if not self._accept(sock):
                return
            if self.over_share():
                self.set_accepting(False)  # the kernel wakes a sibling for the next one
                return
            self.heartbeat()
            self.service_actions()
            if not self._accepting or self._signal_pending:
                return  # a stop or a drain came meanwhile: take no more before the loop acts on it

    def _accept(self, sock: socket.socket) -> bool:
        """Accept and process one connection; False when there was none to take."""
        try:
            request, client_address = sock.accept()
        except BlockingIOError:
            return False  # a sibling took it
        except OSError as exc:
            if exc.errno in LISTENER_GONE_ERRNOS:
                self._lose_listener(next((fd for fd, s in self._by_fd.items() if s is sock), -1), exc)
            elif accept_failed(sock, exc):
                self.set_accepting(False)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
            return False
        if self._extra_nodelay and request.family != socket.AF_UNIX:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server_tls = self._tls_by_fd.get(sock.fileno())
        if server_tls is not None:
            self._handshakes.begin(request, client_address, server_tls, self.proxy_for(client_address))
            if self._handshakes.full():
                self.set_accepting(False)  # siblings take new connections until handshakes finish
        else:
            self._serve_request(request, client_address)
        self.count_accepted()
        return True

    def _handshake_done(self, request: ssl.SSLSocket, client_address: Any) -> None:
        """A TLS connection's handshake is done: serve it as socketserver would a plain one, blocking."""
        request.setblocking(True)
        self._serve_request(request, client_address)

    def _serve_request(self, request: Any, client_address: Any) -> None:
        """Run one accepted connection through socketserver's hooks (its ``_handle_request_noblock``)."""
        if self._extra_timeout is not None:
            request.settimeout(self._extra_timeout)
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except (Exception, SystemExit, KeyboardInterrupt):
                # the handler's (sys.exit() in handle(), say): that connection only, as under thread
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:  # FastExit: SIGINT/SIGQUIT
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    # -- socketserver's hooks -----------------------------------------------------------------------

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Read the PROXY header first when the policy asks for one, then run the handler.

        The handler sees the original client as ``client_address``. A health
        check (a ``LOCAL`` header) is served like any connection, unless the
        master set this instance to drain for its load balancer: then it is
        closed at once, so the balancer takes the instance out of its pool.
        """
        # a TLS connection's PROXY header was read before its handshake (prefork.workers.handshakes)
        proxy = None if isinstance(request, ssl.SSLSocket) else self.proxy_for(client_address)
        if proxy is not None:
            try:
                header, _ = read_header(request, timeout=proxy.timeout)
            except (ProxyProtocolError, TimeoutError) as exc:
                self.proxy_header_failed(client_address, exc)
                return
            if self.closes_health_check(header):
                return
            if header.command == "LOCAL":  # a load balancer's health check
                try:
                    super().finish_request(request, client_address)
                except ConnectionError as exc:  # balancers end their checks with a reset (HAProxy does)
                    log.debug("health check from %s: %s", format_peer(client_address), exc)
                return
            if header.command == "PROXY" and header.source is not None:
                client_address = header.source
        if not self.account:
            super().finish_request(request, client_address)
            return
        started = time.monotonic()
        outcome = "error"
        try:
            super().finish_request(request, client_address)
            outcome = "ok"
        finally:
            counts = account(self.record if self.count_bytes else None, request)
            if self.access_log:
                log_access(client_address, started, counts, outcome)

    def shutdown_request(self, request: Any) -> None:
        """Close a connection; a TLS one says so first (close_notify), so its client sees a clean end."""
        if isinstance(request, ssl.SSLSocket):
            tls.close_notify(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log the handler's exception (socketserver would print it to stderr); this connection only."""
        exc = sys.exc_info()[1]
        count_error(self.record, exc)
        if isinstance(exc, TimeoutError):
            _client_failures.warning("connection from %s timed out", format_peer(client_address), key="timeout")
        elif isinstance(exc, ConnectionError):
            _client_failures.info("connection from %s: %s", format_peer(client_address), exc, key="reset")
        elif isinstance(exc, ssl.SSLError) and isinstance(request, ssl.SSLSocket) and tls.from_the_peer(exc, request):
            # the client broke TLS after the handshake (garbage, a renegotiation we refuse): its doing, one line
            _client_failures.info("connection from %s: TLS error after the handshake: %s; closing it",
                                  format_peer(client_address), tls.describe_error(exc), key="tls")
            log.debug("the TLS error of %s", format_peer(client_address), exc_info=True)
        else:
            log.exception("error handling connection from %s", format_peer(client_address))


class SyncServer(WorkerServer):
    """One connection at a time, handled in the serving loop (socketserver ``TCPServer``)."""

    _in_handler = False  # the loop's own thread is running a handler

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        """Inside a handler, act on SIGTERM, SIGUSR2 or SIGHUP now.

        The loop would see it only once that connection ends, which a
        long-lived one may never do: meanwhile the worker would keep its
        listeners open (a drain or stop waits on it) and the handler could
        not see the drain (``self.server.draining``). The loop is not touching
        its listeners while a handler runs, so acting here is safe; the loop
        runs the action again when it resumes, which does nothing the second time.
        """
        super()._on_stop_signal(signum, frame)
        if self._in_handler:
            self._signals[signum]()

    def process_request(self, request: Any, client_address: Any) -> None:
        record = self.record
        record.active += 1
        self._in_handler = True
        try:
            self.finish_request(request, client_address)
        finally:
            self._in_handler = False
            record.active -= 1
            record.requests += 1
        self.shutdown_request(request)


class ThreadServer(WorkerServer):
    """A bounded pool of ``threads`` threads; at capacity the worker stops accepting.

    Threads start on demand and stay for the worker's life, so a connection
    flood never creates more than ``threads`` of them and a steady load
    creates none.
    """

    def __init__(self, listeners: Sequence[socket.socket], handler_class: type[socketserver.BaseRequestHandler],
                 record: Record, options: WorkerOptions, *, threads: int, count_bytes: bool = False) -> None:
        super().__init__(listeners, handler_class, record, options, count_bytes=count_bytes)
        self.threads = threads
        self._queue: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open = 0  # connections handed to the pool and not yet finished
        # idle threads not yet promised a queued connection, less connections queued for no thread
        # (negative while every thread is busy or closing a socket: the next free one takes the work)
        self._spare = 0
        self._pool: list[threading.Thread] = []

    def open_connections(self) -> int:
        return self._open + len(self._handshakes)

    def full(self) -> bool:
        return self._open >= self.threads or self._handshakes.full()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open += 1
            self.record.active += 1
            start_thread = self._spare <= 0 and len(self._pool) < self.threads
            if not start_thread:
                self._spare -= 1
        if start_thread:  # born promised to this connection
            thread = threading.Thread(target=self._run, name=f"prefork-conn-{len(self._pool)}", daemon=True)
            self._pool.append(thread)
            thread.start()
        self._queue.put((request, client_address))
        if self._open >= self.threads:
            self.set_accepting(False)  # siblings take new connections until a thread frees

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except BaseException:  # SystemExit too: it would end this pool thread and leak its place
                self.handle_error(request, client_address)
            with self._lock:
                self._open -= 1
                self.record.active -= 1
                self.record.requests += 1
                turn_loop = self._open == self.threads - 1 or self.stopping or self.stepped_back
            if turn_loop:
                self.wake()  # the loop resumes accepting (a thread free, or back to its share), or ends the drain
            self.shutdown_request(request)
            with self._lock:
                self._spare += 1


def _shutdown(server: WorkerServer) -> None:
    """socketserver's ``shutdown()`` from a handler, any thread: the worker retires gracefully.

    The master replaces it. Returns once the worker stopped accepting:
    waiting for the loop to end, as socketserver's does, would wait for the
    calling handler (a deadlock).
    """
    if threading.get_ident() == server._loop_thread:
        server.retire(SHUTDOWN_REASON)  # sync: the loop is in this handler
        return
    server._shutdown_asked = True
    server.wake()
    server._not_accepting.wait()


def _raise_fast_exit(signum: int, frame: FrameType | None) -> None:
    raise FastExit(signal.Signals(signum).name)


def _noop(signum: int, frame: FrameType | None) -> None:
    """Python-level handler that does nothing: the wakeup fd carries the signal to the loop."""
