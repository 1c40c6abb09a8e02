"""The built-in TCP relay: each client connection is forwarded to an upstream, bytes both ways.

One connection is one call of :meth:`RelayHandler.handle`, in one thread (a
``sync`` worker's serving loop or a ``thread`` worker's pool thread). That
thread connects upstream (with failover) and sends the PROXY header, with
blocking sockets; then it hands the two sockets to the process's relay loop
and waits until the loop says the connection is over. So socketserver still
closes the client's socket after ``handle()`` returns, and the worker counts
the connection as open (and a draining worker waits for it) while it is relayed.

The relay loop is one thread per process, started by the first connection
(in the worker, after the fork), copying bytes for every relayed connection
with one level-triggered ``epoll``. A round trip costs that thread two wakeups
at most (often less: one ``epoll_wait`` reports many sockets under load), where
a thread per connection cost two thread switches and two GIL handovers.

Each direction reads its source only while it holds no unsent bytes, and
sends what it read at once: on the fast path (an echo round trip) the bytes
leave in the turn they arrived, through the loop's one read buffer, and the
epoll registration never changes. Only a short send leaves bytes behind (a
copy, at most ``buffer_size``), and then the direction waits for its sink to
be writable instead of reading more, so a slow reader slows the writer through
TCP flow control and a connection never holds more than two such copies. An
EOF is passed on as ``shutdown(SHUT_WR)`` once the bytes before it are
delivered (half-close propagated each way).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import socketserver
import threading
import time
from collections import deque
from typing import Any

from prefork.handlers import relay_core
from prefork.handlers.relay_core import RelaySettings, Upstream
from prefork.workers.connection import format_peer

__all__ = ["RelayHandler"]

log = logging.getLogger(__name__)

# Events that make each role's call worth trying: a read or a send then moves bytes, sees EOF or
# raises the socket's error. (EPOLLHUP and EPOLLERR are reported whatever a socket is registered for.)
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_STALE_TIMERS = 64  # finished connections' timers tolerated in the heap before it is rebuilt
_CANCEL_WAIT = 1.0  # seconds an interrupted handle() waits for the loop to let go of its sockets


class _PeerError(Exception):
    """A socket call failed on one side of the relay (``side`` is ``"client"`` or ``"upstream"``)."""

    def __init__(self, side: str, error: OSError) -> None:
        super().__init__(side, error)
        self.side = side
        self.error = error


class _Pipe:
    """One direction of a relay: bytes read from ``source`` are sent to ``sink`` at once.

    What the sink does not take waits in ``pending`` (a copy: ``view`` is the
    loop's read buffer, shared by every connection) until the sink is
    writable, and the source is not read meanwhile. ``count_in`` and
    ``count_out`` are the worker's record when this direction's source or
    sink is the client: received bytes count as ``bytes_in``, sent ones as
    ``bytes_out``. Used by the relay loop thread only.
    """

    __slots__ = ("count_in", "count_out", "done", "eof", "pending", "recv_into", "send", "sink", "sink_side",
                 "source_side", "view")

    def __init__(self, source: socket.socket, sink: socket.socket, source_side: str, sink_side: str,
                 view: memoryview) -> None:
        self.recv_into = source.recv_into
        self.send = sink.send
        self.sink = sink
        self.source_side = source_side
        self.sink_side = sink_side
        self.view = view
        self.pending: memoryview | None = None  # bytes read and not yet taken by the sink
        self.eof = False  # the source sent EOF (never while bytes are pending: it is read only without)
        self.done = False  # ... and it was passed on: the sink is shut for writing
        self.count_in: Any = None
        self.count_out: Any = None

    def pull(self) -> bool:
        """Read once from the source and send it on; True when the events this direction needs changed."""
        view = self.view
        try:
            n = self.recv_into(view)
        except BlockingIOError:
            return False  # readiness was stale: wait for the next event
        except OSError as exc:
            raise _PeerError(self.source_side, exc) from exc
        if not n:
            self.eof = True
            self._shut_sink()  # nothing is pending (the source is read only then): pass EOF on now
            return True
        if self.count_in is not None:
            self.count_in.bytes_in += n
        try:
            sent = self.send(view[:n])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        if self.count_out is not None:
            self.count_out.bytes_out += sent
        if sent == n:
            return False
        self.pending = memoryview(view[sent:n].tobytes())  # the read buffer is the next read's
        return True

    def push(self) -> bool:
        """Send pending bytes to the sink; True when none are left (the events needed changed)."""
        pending = self.pending
        assert pending is not None
        try:
            sent = self.send(pending)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        if self.count_out is not None:
            self.count_out.bytes_out += sent
        if sent < len(pending):
            self.pending = pending[sent:]
            return False
        self.pending = None
        return True

    def _shut_sink(self) -> None:
        try:
            self.sink.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        self.done = True


class _Connection:
    """A client and its upstream, relayed by the loop from :meth:`_RelayLoop.submit` until ``ended`` is set.

    The handler's thread makes it and then only waits; the loop owns every
    other field until it sets ``ended``, and then says why it ended: ``error``
    (a socket failed), ``idle``, or ``crash`` (an unexpected exception in the
    loop, for this connection or for the loop as a whole). None of them: both
    directions were done.
    """

    __slots__ = ("active_at", "client_events", "client_fd", "crash", "ended", "error", "finished", "idle",
                 "idle_timeout", "inbound", "outbound", "timed", "upstream_events", "upstream_fd")

    def __init__(self, client: socket.socket, upstream: socket.socket, view: memoryview, record: Any,
                 idle_timeout: float | None) -> None:
        self.outbound = _Pipe(client, upstream, "client", "upstream", view)
        self.inbound = _Pipe(upstream, client, "upstream", "client", view)
        self.outbound.count_in = record
        self.inbound.count_out = record
        self.client_fd = client.fileno()
        self.upstream_fd = upstream.fileno()
        self.client_events = 0  # what each socket is registered for in the loop's epoll (0: not registered)
        self.upstream_events = 0
        self.idle_timeout = idle_timeout
        self.active_at = time.monotonic()  # the loop's clock when either socket last had an event
        self.timed = False  # an entry for this connection is in the loop's timer heap
        self.finished = False
        self.ended = threading.Event()
        self.error: _PeerError | None = None
        self.idle = False
        self.crash: BaseException | None = None


class _RelayLoop:
    """One thread with one epoll relaying every connection submitted to it, for the life of the process.

    Thread-safe entry points are :meth:`submit`, :meth:`cancel` and
    :meth:`read_buffer`; everything else runs in the loop's thread. A new
    connection waits in a queue until the loop turns (an eventfd wakes it), so
    the epoll set, the fd table and the timer heap have one owner and no lock.

    The idle timeout is a heap of deadlines re-armed lazily: a connection's
    entry is looked at only when it comes due, and then either ends the
    connection or moves to ``active_at + idle_timeout``. The epoll timeout is
    the nearest deadline (no timer: wait forever).
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.closed = False  # the loop thread is gone (it crashed): a new loop serves new connections
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._lock = threading.Lock()  # guards closed, _incoming against the crash path, _buffer
        self._incoming: deque[tuple[_Connection, bool]] = deque()  # (connection, True: start / False: cancel)
        self._buffer = memoryview(bytearray(0))
        self._ends: dict[int, tuple[_Pipe, _Pipe, _Connection]] = {}  # fd -> (pipe it feeds, pipe it drains, ...)
        self._timers: list[tuple[float, int, _Connection]] = []
        self._stale = 0  # entries in _timers for connections already finished
        self._order = itertools.count()  # heap tie-breaker: connections do not compare
        self.thread = threading.Thread(target=self._run, name=f"prefork-relay-{self.pid}", daemon=True)
        self.thread.start()

    # -- from any thread ---------------------------------------------------------------------------

    def read_buffer(self, size: int) -> memoryview:
        """The loop's read buffer, ``size`` bytes of it (grown for the largest ``buffer_size`` seen).

        Shared by every connection: a read's bytes are sent, or copied aside,
        before the loop reads again. Growing makes a new buffer; connections
        holding the old one keep it alive.
        """
        with self._lock:
            if len(self._buffer) < size:
                self._buffer = memoryview(bytearray(size))
            return self._buffer[:size]

    def submit(self, connection: _Connection) -> bool:
        """Queue a connection for the loop; False when the loop has stopped (ask :func:`_relay_loop` again)."""
        return self._tell(connection, start=True)

    def cancel(self, connection: _Connection) -> None:
        """Ask the loop to let go of a connection at once (its handler is leaving); ``ended`` is set."""
        self._tell(connection, start=False)

    def _tell(self, connection: _Connection, start: bool) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._incoming.append((connection, start))
            os.eventfd_write(self._wake_fd, 1)
            return True

    def forget(self) -> None:
        """In a forked child: close this process's copies of the parent's loop fds (its thread is not here)."""
        if self.closed:
            return  # it crashed in the parent: closed them already
        self.closed = True
        self._epoll.close()
        os.close(self._wake_fd)

    # -- the loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug in the loop itself: fail its connections rather than hang them
            with self._lock:
                self.closed = True
                left = [connection for connection, start in self._incoming if start]
                self._incoming.clear()
            left += {id(end[2]): end[2] for end in self._ends.values()}.values()
            log.critical("relay loop (pid %d) failed; closing its %d connection(s)", self.pid, len(left),
                         exc_info=True)
            self._epoll.close()
            os.close(self._wake_fd)
            for connection in left:
                connection.crash = exc
                connection.ended.set()

    def _serve(self) -> None:
        poll = self._epoll.poll
        ends = self._ends
        wake_fd = self._wake_fd
        monotonic = time.monotonic
        while True:
            events = poll(self._expire(monotonic()) if self._timers else -1.0)
            now = monotonic()
            woken = False
            for fd, mask in events:
                end = ends.get(fd)
                if end is None:  # the wakeup, or the other socket of a connection this turn ended
                    woken = woken or fd == wake_fd
                    continue
                feeds, drains, connection = end
                connection.active_at = now
                try:
                    changed = False
                    if mask & _READABLE and feeds.pending is None and not feeds.eof and feeds.pull():
                        changed = True
                    if mask & _WRITABLE and drains.pending is not None and drains.push():
                        changed = True
                    if changed:
                        if feeds.done and drains.done:
                            self._finish(connection)
                        else:
                            self._watch(connection)
                except _PeerError as exc:
                    connection.error = exc
                    self._finish(connection)
                except Exception as exc:  # a bug, or a user's socket subclass: this connection ends, not the loop
                    connection.crash = exc
                    self._finish(connection)
            if woken:
                # after the turn's events: an fd a finished connection freed may be reused by a new one
                self._take_incoming()

    def _take_incoming(self) -> None:
        with contextlib.suppress(BlockingIOError):  # read the count before emptying the queue
            os.eventfd_read(self._wake_fd)
        incoming = self._incoming
        while incoming:
            connection, start = incoming.popleft()
            if not start:
                if not connection.finished:
                    self._finish(connection)
                continue
            try:
                self._start(connection)
            except Exception as exc:  # e.g. a socket closed before it got here: this connection only
                connection.crash = exc
                self._finish(connection)

    def _start(self, connection: _Connection) -> None:
        self._ends[connection.client_fd] = (connection.outbound, connection.inbound, connection)
        self._ends[connection.upstream_fd] = (connection.inbound, connection.outbound, connection)
        connection.active_at = time.monotonic()
        self._watch(connection)
        if connection.idle_timeout is not None:
            heapq.heappush(self._timers, (connection.active_at + connection.idle_timeout, next(self._order),
                                          connection))
            connection.timed = True

    def _watch(self, connection: _Connection) -> None:
        """Register each socket for exactly the events its two directions need now (none: unregistered)."""
        outbound, inbound = connection.outbound, connection.inbound
        wanted = ((select.EPOLLIN if outbound.pending is None and not outbound.eof else 0)
                  | (select.EPOLLOUT if inbound.pending is not None else 0))
        if wanted != connection.client_events:
            self._register(connection.client_fd, connection.client_events, wanted)
            connection.client_events = wanted
        wanted = ((select.EPOLLIN if inbound.pending is None and not inbound.eof else 0)
                  | (select.EPOLLOUT if outbound.pending is not None else 0))
        if wanted != connection.upstream_events:
            self._register(connection.upstream_fd, connection.upstream_events, wanted)
            connection.upstream_events = wanted

    def _register(self, fd: int, current: int, wanted: int) -> None:
        if not current:
            self._epoll.register(fd, wanted)
        elif not wanted:
            self._epoll.unregister(fd)
        else:
            self._epoll.modify(fd, wanted)

    def _finish(self, connection: _Connection) -> None:
        """Let go of the connection's sockets (its handler closes them) and wake the handler."""
        connection.finished = True
        try:
            for fd, events in ((connection.client_fd, connection.client_events),
                               (connection.upstream_fd, connection.upstream_events)):
                self._ends.pop(fd, None)
                if events:
                    try:
                        self._epoll.unregister(fd)
                    except OSError as exc:
                        # a socket closed under us (by a user's hook) already left the epoll set
                        if exc.errno not in (errno.ENOENT, errno.EBADF):
                            raise
            connection.client_events = connection.upstream_events = 0
            connection.outbound.pending = connection.inbound.pending = None
            if connection.timed:
                self._stale += 1
                if self._stale > _STALE_TIMERS and 2 * self._stale > len(self._timers):
                    # many short connections: drop their timers now rather than when each comes due
                    self._timers[:] = [entry for entry in self._timers if not entry[2].finished]
                    heapq.heapify(self._timers)
                    self._stale = 0
        finally:
            connection.ended.set()

    def _expire(self, now: float) -> float:
        """End connections idle past their timeout; the seconds until the next deadline (-1: none)."""
        timers = self._timers
        while timers:
            due, _, connection = timers[0]
            if connection.finished:
                heapq.heappop(timers)
                self._stale -= 1
                continue
            if due > now:
                return due - now
            assert connection.idle_timeout is not None
            deadline = connection.active_at + connection.idle_timeout
            if deadline > now:  # active since the entry was made: look again then
                heapq.heapreplace(timers, (deadline, next(self._order), connection))
                continue
            heapq.heappop(timers)
            connection.timed = False
            connection.idle = True
            self._finish(connection)
        return -1.0


_loop: _RelayLoop | None = None
_loop_lock = threading.Lock()


def _relay_loop() -> _RelayLoop:
    """This process's relay loop, started on first use.

    Checked against ``os.getpid()``: a worker is forked, and a loop object
    copied into a child by ``fork`` has no thread there.
    """
    global _loop
    loop = _loop
    if loop is None or loop.closed or loop.pid != os.getpid():
        with _loop_lock:
            loop = _loop
            if loop is None or loop.closed or loop.pid != os.getpid():
                loop = _loop = _RelayLoop()
    return loop


def _after_fork_in_child() -> None:
    global _loop, _loop_lock
    _loop_lock = threading.Lock()  # a thread of the parent may have held it at the fork
    if _loop is not None:
        _loop.forget()
        _loop = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class RelayHandler(RelaySettings, socketserver.BaseRequestHandler):
    """Forward the connection to an upstream and copy bytes both ways until both sides are done.

    Configure by subclassing (the daemon's ``--relay`` options make such a
    subclass with ``type(...)``)::

        class Backend(RelayHandler):
            upstreams = (("10.0.0.1", 7000), ("10.0.0.2", 7000))
            idle_timeout = 60.0

    The settings (``upstreams``, ``connect_timeout``, ``idle_timeout``,
    ``send_proxy``, and ``buffer_size`` here) are checked when the subclass is
    made: a mistake raises there, once. Connections take the upstreams in turn;
    when one refuses or times out the next is tried. To pick the upstream per
    connection, override :meth:`upstream_candidates`. These decisions, the
    PROXY header and the log lines are :mod:`prefork.handlers.relay_core`'s,
    shared with the asyncio form (:class:`prefork.handlers.aio.RelayProtocol`).

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
    as ``bytes_out`` in ``self.server.record`` as they move, when the server
    has one (a prefork worker does; a plain ``socketserver`` server does not).

    ``handle()`` connects upstream and sends the PROXY header in its own
    thread, then leaves the copying to the process's relay loop and waits for
    it: an override of :meth:`connect_upstream` or :meth:`upstream_candidates`
    runs in the handler's thread as before, while the relayed sockets are
    used by the loop's thread only.
    """

    buffer_size: int = 65536  # per direction
    counts_bytes = True  # into self.server.record as they move: the worker need not read TCP_INFO too

    upstream_address: Upstream | None = None  # set per connection by connect_upstream()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.buffer_size = relay_core.check_buffer_size(cls.__name__, cls.buffer_size)

    # -- hooks --------------------------------------------------------------------------------------

    def upstream_candidates(self) -> list[Upstream]:
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
        return self._rotation.candidates(self.upstreams)

    def connect_upstream(self) -> socket.socket | None:
        """Connect to the first reachable candidate; None (logged, counted) when none is.

        May be extended (for example to wrap the socket in TLS); the result
        must be a connected stream socket, and ``self.upstream_address`` names it in log lines.
        """
        failures: list[str] = []
        for address in self.upstream_candidates():
            try:
                upstream = socket.create_connection(address, timeout=self.connect_timeout)
            except OSError as exc:
                failures.append(relay_core.attempt_failed(address, exc, self.connect_timeout))
                continue
            if failures:
                self._report(relay_core.failed_over(self.client_address, failures, address))
            self.upstream_address = address
            return upstream
        self._report(relay_core.no_upstream(self.client_address, failures))
        return None

    def proxy_header(self, client: socket.socket) -> bytes:
        """The PROXY v2 header announcing this connection: the client and the address it connected to.

        A LOCAL header (the receiver uses the connection's own addresses) when
        they are not IP addresses, e.g. on a Unix socket listener. May be
        overridden (to add TLVs, say).
        """
        return relay_core.proxy_header(self.client_address, client.getsockname())

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
                self._report(relay_core.upstream_failed(self.client_address, self.upstream_address, exc.error))
            else:
                self._report(relay_core.client_failed(self.client_address, self.upstream_address, exc.error))
        finally:
            upstream.close()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        """Hand both sockets to the process's relay loop and wait until it is done with them.

        Returns when both directions are done or the connection was idle too
        long; raises :class:`_PeerError` when a socket call fails on either
        side, ``RuntimeError`` when the loop failed unexpectedly.
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
        record = getattr(self.server, "record", None)
        while True:
            loop = _relay_loop()
            connection = _Connection(client, upstream, loop.read_buffer(self.buffer_size), record,
                                     self.idle_timeout)
            if loop.submit(connection):
                break
        try:
            connection.ended.wait()
        except BaseException:
            # leaving early (FastExit in a sync worker): the loop lets go of the sockets before they are closed
            loop.cancel(connection)
            connection.ended.wait(_CANCEL_WAIT)
            raise
        if connection.crash is not None:
            raise RuntimeError(f"the relay loop failed on the connection from "
                               f"{format_peer(self.client_address)}") from connection.crash
        if connection.error is not None:
            raise connection.error
        if connection.idle:
            assert self.idle_timeout is not None  # a connection without one is never idle
            self._report(relay_core.idle(self.client_address, self.upstream_address, self.idle_timeout))

    def _report(self, event: relay_core.Event) -> None:
        """Log ``event``; count it in the worker's record when it is an error."""
        log.log(event.level, event.message, *event.args)
        record = getattr(self.server, "record", None)
        if event.error and record is not None:
            record.errors += 1
