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

import errno
import heapq
import itertools
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from prefork import logs, tls
from prefork.listeners import ACCEPT_PAUSE, accept_failed, connection_pending, describe, watch
from prefork.scoreboard import Record
from prefork.workers.admission import ACCEPT_BATCH, Reason
from prefork.workers.balance import RECHECK
from prefork.workers.base import (
    FAST_EXIT_SIGNALS,
    LISTENER_GONE_ERRNOS,
    FastExit,
    WorkerLifecycle,
    WorkerOptions,
)
from prefork.workers.connection import counts_own_bytes
from prefork.workers.handshakes import Handshakes
from prefork.workers.hooks import ConnectionHooks
from prefork.workers.wakeup import Wakeup
from prefork.workers.watch import Watch, Watchdog, readable_now

log = logging.getLogger(__name__)

SHUTDOWN_REASON = "a handler called self.server.shutdown()"
_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGUSR2, signal.SIGHUP})  # see WorkerServer._on_stop_signal
WATCHDOG_ACCEPTS = 1024  # connections the sync watchdog takes into the waiting room per listener and tick
RELIEF_RETRY = 0.05  # seconds between two looks for a connection to reclaim while one waits for a thread


class WorkerServer(ConnectionHooks):
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
        self._wakeup = Wakeup()  # signals and other threads make the loop turn
        self._epoll = select.epoll()
        self._by_fd = {s.fileno(): s for s in self.listeners}
        # TLS listeners: their connections' handshakes run in this loop before the handler sees them
        self._tls_by_fd = {s.fileno(): t for s, t in zip(self.listeners, self.tls, strict=True) if t is not None}
        self._handshakes = Handshakes(record, self._handshake_done, self.proxy_header_failed,
                                      self.closes_health_check, self._handshake_dropped)
        self.one_at_a_time = False  # the sync class: readable connections go to the handler newest first
        # plain connections wait for their first bytes here, and handlers' connections are watched
        self._lock = threading.RLock()  # the record's counts, changed by the loop, the watch and handler threads
        self._watch = Watch(self.admission_policy, record, self.sources, self._serve_request, self._lock)
        self._watch.on_stuck = self.handlers_stuck
        self._watch.io_elsewhere = bool(getattr(handler_class, "io_elsewhere", False))
        self.on_drain(self._watch.drain)  # --drain-idle from the drain's first turn
        self._stuck_handlers = 0  # handler threads stuck past --handler-timeout: the loop retires the worker
        self._addresses = {fd: describe(s) for fd, s in self._by_fd.items()}  # for the log, once one is gone
        self._accepting = False
        self._accept_paused_until = 0.0
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

    def wake(self) -> None:
        """Make the serving loop turn. Safe from any thread."""
        self._wakeup.wake()

    def fileno(self) -> int:
        return self.socket.fileno()

    def server_close(self) -> None:
        self._handshakes.close_all()
        self._watch.close_all()
        self._epoll.close()
        self._wakeup.close()

    def install_signals(self) -> None:
        """Signal numbers arrive as bytes on the wakeup socket and the loop runs their actions.

        The Python-level handlers do nothing, except SIGINT's and SIGQUIT's:
        they raise :class:`FastExit` in the main thread wherever it is, so a
        ``handle()`` blocked on a socket is interrupted too.
        """
        self._wakeup.install(self.signal_actions(), lambda signum: _raise_fast_exit if signum in FAST_EXIT_SIGNALS
                             else self._on_stop_signal if signum in _STOP_SIGNALS else _noop)

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
        return len(self._handshakes) + len(self._watch)

    def full(self) -> bool:
        """True while the worker cannot take another connection."""
        return False

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
        self._epoll.register(self._wakeup.fileno(), select.EPOLLIN)
        self._handshakes.watch_on(self._epoll)
        self._watch.watch_on(self._epoll)
        if self._accepting:
            for other in self._by_fd:
                watch(self._epoll, other)
        self.listener_gone(self._addresses.get(fd, f"fd {fd}"), exc)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until asked to stop and drained. ``poll_interval`` is ignored: nothing here polls."""
        self._loop_thread = threading.get_ident()
        self._epoll.register(self._wakeup.fileno(), select.EPOLLIN)
        self._handshakes.watch_on(self._epoll)
        self._watch.watch_on(self._epoll)
        self.set_accepting(True)
        wake_fd = self._wakeup.fileno()
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
                self._signal_pending = False
                self._wakeup.drain()
            if self._shutdown_asked:
                self.retire(SHUTDOWN_REASON)
            if self._stuck_handlers:
                self.retire(stuck_reason(self._stuck_handlers))
            self.service_actions()
            for fd, _ in events:
                if fd == wake_fd or self._watch.on_event(fd, self.one_at_a_time) or self._handshakes.on_event(fd):
                    continue
                if self._accepting and (sock := self._by_fd.get(fd)) is not None:
                    self._accept_batch(sock)
            now = time.monotonic()
            if self._handshakes:
                self._handshakes.expire(now)
            due = self._watch.due(now, self.handlers_busy())
            if due is not None and due <= now:
                self._watch.turn(now)
            self.relieve(now)
            if self.one_at_a_time:
                self._watch.hand_newest_ready()
            self._watch.hand_overdue(now, self.free_places())

    def handlers_stuck(self, stuck: int) -> None:
        """``stuck`` handler threads still have not returned a full ``--handler-timeout`` after their connection
        was closed for it: the loop retires this worker (the master replaces it). May be extended."""
        self._stuck_handlers = stuck
        self.wake()

    def relieve(self, now: float) -> None:
        """Connections wait for a place that every handler holds: reclaim (the thread class). May be extended."""

    def free_places(self) -> int:
        """Handlers that could take a connection now (sync: one, the loop itself). May be overridden."""
        return 1

    def relief_due(self) -> float | None:
        """When :meth:`relieve` should look again (None: nothing waits for a place). May be overridden."""
        return None

    def handlers_busy(self) -> bool:
        """True while handlers in other threads have connections (the loop watches them). May be overridden."""
        return False

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
        """``timeout``, or less when a connection's header or handshake, or the watch, comes due sooner."""
        grace = self._watch.grace_due() if self.free_places() > 0 else None
        watch = self._watch.due(now, self.handlers_busy())
        for deadline in (self._handshakes.next_deadline(), watch, grace, self.relief_due()):
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - now))
        return timeout

    def _accept_batch(self, sock: socket.socket) -> None:
        # under load the backlog rarely empties: take a few in a row before polling again
        for _ in range(ACCEPT_BATCH):
            if not self._accept(sock):
                return
            if self.over_share() or self.full():
                self.set_accepting(False)  # the kernel wakes a sibling for the next one
                return
            self.heartbeat()
            self.service_actions()
            if not self._accepting or self._signal_pending:
                return  # a stop or a drain came meanwhile: take no more before the loop acts on it

    def _accept(self, sock: socket.socket, hand: bool = True) -> bool:
        """Accept and process one connection; False when there was none to take.

        ``hand`` False: a plain connection goes to the waiting room even when readable (the sync class's
        watchdog takes connections while the handler runs).
        """
        try:
            request, client_address = sock.accept()
        except BlockingIOError:
            return False  # a sibling took it
        except OSError as exc:
            if exc.errno in LISTENER_GONE_ERRNOS:
                self._lose_listener(next((fd for fd, s in self._by_fd.items() if s is sock), -1), exc)
            elif exc.errno in (errno.EMFILE, errno.ENFILE) and not connection_pending(sock):
                return False  # at the limit with nobody queued: no connection to make room for, none to close
            elif exc.errno in (errno.EMFILE, errno.ENFILE) and self._watch.drop_oldest_waiting():
                return True  # out of descriptors: the longest-waiting silent connection gave way; try again
            elif accept_failed(sock, exc):
                self.set_accepting(False)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
            return False
        if self._extra_nodelay and request.family != socket.AF_UNIX:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.count_accepted()
        if (self.sources is not None and self.proxy_for(client_address) is None
                and not self._watch.admit_source(request, client_address)):
            request.close()  # over --max-connections-per-source: counted
            return True
        server_tls = self._tls_by_fd.get(sock.fileno())
        if server_tls is not None:
            self._handshakes.begin(request, client_address, server_tls, self.proxy_for(client_address))
        elif hand and readable_now(request):
            # readable already, it goes to the handler at once: the newest, it comes first anyway (sync), and the
            # connections waiting meanwhile are not polled again once for each one served
            self._serve_request(request, client_address)
        else:
            self._watch.wait(request, client_address)
        return True

    def _handshake_dropped(self) -> None:
        self._watch.close_counted(Reason.HANDSHAKE_DROPPED)

    def _handshake_done(self, request: ssl.SSLSocket, client_address: Any) -> None:
        """A TLS connection's handshake is done: serve it as socketserver would a plain one, blocking.

        One that sent a PROXY header is counted under the header's client only now."""
        if not self._watch.counted(request) and not self._watch.admit_source(request, client_address):
            self._handshakes_closed(request)
            return
        request.setblocking(True)
        self._serve_request(request, client_address)

    def _handshakes_closed(self, request: ssl.SSLSocket) -> None:
        """Over --max-connections-per-source after its handshake (counted): closed as a TLS one is."""
        tls.close_notify(request)
        request.close()

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


class SyncServer(WorkerServer):
    """One connection at a time, handled in the serving loop (socketserver ``TCPServer``).

    While a handler runs, a watchdog thread keeps the watch the loop would:
    the idle timeout, and reclaiming the connection when another waits. Who
    touches the listeners, the epoll set and ``_by_fd``: the loop's thread,
    except while a handler runs, when only the watchdog does (under
    ``_lock``, so the loop takes them back only once a watchdog turn under
    way is over). A stop signal that arrives inside a handler is handed to
    the watchdog, which acts on it at once (see :meth:`_on_stop_signal`).

    The record's ``active`` and ``requests`` have one writer at a time, so
    the loop changes them without a lock: the watchdog changes ``active``
    (the waiting room) only in a turn under ``_lock`` while a handler runs,
    and the loop changes them only before the handler begins and after
    :meth:`handler_ends` took ``_lock`` to say it is over (no turn under way,
    none to come until the next handler).
    """

    def __init__(self, listeners: Sequence[socket.socket], handler_class: type[socketserver.BaseRequestHandler],
                 record: Record, options: WorkerOptions, *, count_bytes: bool = False) -> None:
        super().__init__(listeners, handler_class, record, options, count_bytes=count_bytes)
        self._watchdog = Watchdog(self._watch, self._watchdog_turn)
        self.one_at_a_time = True
        self._signals_in_handler: list[int] = []  # stop signals the watchdog acts on (see _on_stop_signal)
        # the handler's connection, and since when: the watchdog registers it with the watch (``_watched``) only
        # once it finds the handler running on a tick, so a short connection costs the watch nothing
        self._handling: Any = None
        self._handling_since = 0.0
        self._watched: Any = None
        self._watchdog_started = False
        self._loop_tid = 0  # the loop thread's kernel id (the watch looks at its system call)

    def full(self) -> bool:
        """A connection waits here for its first bytes while an idle sibling could take the next one."""
        return bool(self._watch.waiting) and self.sibling_has_room(busy_at=1)

    def _watchdog_turn(self) -> None:
        """The watchdog's thread, while the handler runs: a stop signal that came meanwhile, what waits on the
        listeners to the waiting room, then the watch's turn, with pressure when a waiting connection is
        readable (someone spoke and the worker is taken). Nothing once the handler is over: the loop has the
        listeners and the record's counts back."""
        with self._lock:
            if not self._watchdog.busy:
                return
            self._watch_handler()  # running past a tick: watched from now on
            while self._signals_in_handler:
                self._wakeup.actions[self._signals_in_handler.pop(0)]()
            self._accept_waiting()
            watch = self._watch
            watch.turn(time.monotonic(), watch.readable_waiting() and not watch.reclaiming())

    def _accept_waiting(self) -> None:
        """What waits on the listeners, to the waiting room, when the handler waits on its client and could
        give way, unless an idle sibling can take it (the watchdog's turn, under the lock)."""
        if not self._accepting or self.stopping or self.sibling_has_room(busy_at=1):
            return
        if not self._watch.reclaimable(time.monotonic()):
            return  # the handler works: what waits could not be served sooner here, so it stays queued
        for fd, sock in list(self._by_fd.items()):
            if sock.fileno() != fd or fd in self._tls_by_fd:
                continue  # (a TLS connection's handshake runs in the loop's thread, never in this one)
            for _ in range(WATCHDOG_ACCEPTS):
                if not self._accept(sock, hand=False):
                    break

    def handler_begins(self, request: Any) -> None:
        """No watch work per connection: the watchdog registers the handler's connection if it finds it
        running on a tick (see :meth:`_watchdog_turn`); a connection served within a tick costs nothing more."""
        self.record.active += 1  # no lock: no watchdog turn runs before the handler is said to run (class doc)
        since = self._watch.since
        if since:  # from the waiting room
            since.pop(request.fileno(), None)
        self._handling_since = time.monotonic()
        self._handling = request
        if not self._watchdog_started:
            self._loop_tid = threading.get_native_id()
            self._watchdog.start()
            self._watchdog_started = True
        watchdog = self._watchdog
        watchdog.busy = True  # the loop's own thread is running a handler (a stop signal goes to the watchdog)
        if watchdog.parked:
            watchdog.handling(True)
        if self._signals_in_handler:
            watchdog.poke()  # one arrived as the handler began

    def handler_ends(self, request: Any) -> None:
        with self._lock:  # a watchdog turn under way ends first: then the loop's thread has the listeners
            self._watchdog.busy = False
            self._handling = None
            if self._watched is not None:
                self._watched = None
                self._watch.end(request)
        record = self.record  # the loop's alone again (class doc)
        record.active -= 1
        record.requests += 1

    def _watch_handler(self) -> None:
        """Register the running handler's connection with the watch, once (under the lock)."""
        request = self._handling
        if request is not None and self._watched is None:
            self._watch.begin(request, self._loop_tid, self._handling_since, self._loop_thread)
            self._watched = request

    def handlers_stuck(self, stuck: int) -> None:
        """The one handler (in the loop's own thread) is stuck for good: retire from the watchdog's thread,
        as a stop signal does inside a handler (the loop is not touching its listeners meanwhile)."""
        super().handlers_stuck(stuck)
        if self._watchdog.busy:
            self.retire(stuck_reason(stuck))

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        """Inside a handler, have SIGTERM, SIGUSR2 or SIGHUP acted on now.

        The loop would see it only once that connection ends, which a
        long-lived one may never do: meanwhile the worker would keep its
        listeners open (a drain or stop waits on it) and the handler could
        not see the drain (``self.server.draining``). This handler interrupts
        the loop's thread anywhere, maybe in the middle of a change to the
        listeners (a handler's ``self.server.shutdown()``), so it acts on
        nothing itself: the watchdog, the one thread that touches them while a
        handler runs, acts on it at once. The loop runs the action again when
        it resumes, which does nothing the second time.
        """
        super()._on_stop_signal(signum, frame)
        if self._watchdog.busy:
            self._signals_in_handler.append(signum)
            if self._watchdog.is_alive():
                self._watchdog.poke()

    # process_request: socketserver's own (finish_request, then shutdown_request); the counts and the watchdog's
    # hand-over are handler_begins' and handler_ends', which finish_request calls


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
        # Connections for the pool: the one accepted last first. Under overload the newest is the likeliest to
        # be a client still waiting for its answer, and a probe is not stuck behind a flood of slow ones. The
        # queue carries one token per connection (a thread takes one, then the newest connection).
        self._queue: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._ready: list[tuple[float, int, Any, Any]] = []  # a heap: (-accepted, order, request, address)
        self._order = itertools.count()
        self._open = 0  # connections handed to the pool and not yet finished
        # idle threads not yet promised a queued connection, less connections queued for no thread
        # (negative while every thread is busy or closing a socket: the next free one takes the work)
        self._spare = 0
        self._pool: list[threading.Thread] = []
        self._starved = False  # connections wait for a thread and every handler works
        self._relief_at: float | None = None  # when to look for a connection to reclaim again

    def open_connections(self) -> int:
        # a handler stuck past --handler-timeout has lost its connection already: a drain does not wait on it
        return self._open - self._watch.stuck() + len(self._handshakes) + len(self._watch)

    def full(self) -> bool:
        """Every thread is taken and none holds a connection to reclaim: siblings take the next ones."""
        if self._open + len(self._watch) < self.threads:
            return False  # a thread for each, counting those waiting for their first bytes
        if self.sibling_has_room():
            return True  # a sibling takes the next connections; nothing of ours is reclaimed for them
        if self._open < self.threads:
            return False  # threads free: the waiting connections take them (now, or after the grace)
        if self._starved:
            return True
        return not self._watch.reclaiming() and not self._watch.reclaimable(time.monotonic())

    def free_places(self) -> int:
        return max(0, self.threads - self._open)

    def handlers_busy(self) -> bool:
        return self._open > 0

    def relieve(self, now: float) -> None:
        """Readable connections queued for a thread: reclaim as many handlers' connections, the quietest first.

        After a look that found none, the next waits RELIEF_RETRY (a flood queues many at once)."""
        if self._relief_at is not None and now < self._relief_at:
            return
        self._relief_at = None
        for _ in range(self._open - self.threads - self._watch.reclaiming()):
            if not self._watch.reclaim(now):
                self._relief_at = now + RELIEF_RETRY  # a handler's client may fall silent meanwhile
                break
        # starved: connections wait for a thread and none is on its way (every handler works)
        starved = self._open > self.threads and not self._watch.reclaiming()
        if starved and not self._starved:
            self.set_accepting(False)  # siblings take new connections
        self._starved = starved

    def relief_due(self) -> float | None:
        if self._relief_at is None and not self._accepting and self._open >= self.threads:
            return time.monotonic() + RELIEF_RETRY  # full: look again whether a handler's client fell silent
        return self._relief_at

    def process_request(self, request: Any, client_address: Any) -> None:
        accepted = self._watch.accepted_at(request)
        with self._lock:
            heapq.heappush(self._ready, (-accepted, next(self._order), request, client_address))
            self._open += 1
            self.record.active += 1
            start_thread = self._spare <= 0 and len(self._pool) < self.threads
            if not start_thread:
                self._spare -= 1
        if start_thread:  # born promised to this connection
            thread = threading.Thread(target=self._run, name=f"prefork-conn-{len(self._pool)}", daemon=True)
            self._pool.append(thread)
            thread.start()
        self._queue.put(True)
        if self._open > self.threads:
            self.relieve(time.monotonic())  # a connection waits for a thread: make room if one waits on its client
        if self.full():
            self.set_accepting(False)  # siblings take new connections until a thread frees or can be reclaimed

    def _run(self) -> None:
        get = self._queue.get
        while True:
            if not get():
                return
            with self._lock:
                _, _, request, client_address = heapq.heappop(self._ready)
            try:
                self.finish_request(request, client_address)
            except BaseException:  # SystemExit too: it would end this pool thread and leak its place
                self.handle_error(request, client_address)
            with self._lock:
                self._open -= 1
                self.record.active -= 1
                self.record.requests += 1
                if self._open < self.threads:
                    self._starved = False
                # a thread free, a connection still waiting for one (the loop reclaims again), or the drain's end
                turn_loop = (self._open == self.threads - 1 or self._open >= self.threads or self.stopping
                             or self.stepped_back)
            if turn_loop:
                self.wake()  # the loop resumes accepting (a thread free, or back to its share), or ends the drain
            self.shutdown_request(request)
            with self._lock:
                self._spare += 1


def stuck_reason(stuck: int) -> str:
    return (f"{stuck} handler(s) still running a full --handler-timeout after their connection was closed "
            "(see the stack logged then)")


def _shutdown(server: WorkerServer) -> None:
    """socketserver's ``shutdown()`` from a handler, any thread: the worker retires gracefully.

    The master replaces it. Returns once the worker stopped accepting:
    waiting for the loop to end, as socketserver's does, would wait for the
    calling handler (a deadlock).
    """
    if threading.get_ident() == server._loop_thread:
        with server._lock:  # sync: the loop is in this handler, and the watchdog may be touching the listeners
            server.retire(SHUTDOWN_REASON)
        return
    server._shutdown_asked = True
    server.wake()
    server._not_accepting.wait()


def _raise_fast_exit(signum: int, frame: FrameType | None) -> None:
    raise FastExit(signal.Signals(signum).name)


def _noop(signum: int, frame: FrameType | None) -> None:
    """Python-level handler that does nothing: the wakeup fd carries the signal to the loop."""
