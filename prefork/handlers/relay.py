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

Either socket may be TLS (an ``ssl.SSLSocket``: a client the worker did the
handshake with, an upstream reached with ``--relay-tls``); such a connection
gets :class:`_TlsPipe` for both directions, chosen once when it starts, so
plain connections never pay for the checks TLS needs: a non-blocking TLS call
wants the socket readable or writable (``SSLWantReadError`` /
``SSLWantWriteError``, which are not ``BlockingIOError``), bytes may wait
decrypted inside the TLS object where epoll cannot see them, a write that
did not complete must be retried with the same bytes, and an EOF is passed on
as a TLS ``close_notify`` before the TCP half-close.
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
import ssl
import threading
import time
from collections import deque
from typing import Any

from prefork import tls
from prefork.handlers import relay_core
from prefork.handlers.relay_core import Upstream
from prefork.handlers.upstreams import Balanced, connect_first
from prefork.workers.connection import format_peer

__all__ = ["RelayHandler"]

log = logging.getLogger(__name__)

# Events that make each role's call worth trying: a read or a send then moves bytes, sees EOF or
# raises the socket's error. (EPOLLHUP and EPOLLERR are reported whatever a socket is registered for.)
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_IN_OUT = select.EPOLLIN | select.EPOLLOUT  # what a registration asks for; HUP and ERR come anyway
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

    __slots__ = ("count_in", "count_out", "done", "eof", "pending", "read_events", "recv_into", "send", "sink",
                 "sink_side", "source_side", "view", "write_events")

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
        # The events after which pull() (on the source) and push() (on the sink) are worth trying. A
        # plain socket's never change; a TLS one's may, for a while: see _TlsPipe.
        self.read_events = _READABLE
        self.write_events = _WRITABLE

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


class _TlsPipe(_Pipe):
    """One direction of a connection with a TLS socket at either end (or both).

    What differs from a plain pipe, and why:

    * A TLS call that cannot go on raises ``SSLWantReadError`` or
      ``SSLWantWriteError`` (``OSError``s, not ``BlockingIOError``). Reading
      may need the socket writable and writing may need it readable (a
      renegotiation, a key update to answer): ``read_events`` and
      ``write_events`` say which the loop waits for meanwhile.
    * A read returns at most one TLS record (16 KiB), so the source is read
      until the buffer is full or it has nothing more, and the lot is sent
      as one write. Decrypted bytes the buffer had no room for stay inside the
      TLS object, where epoll does not see them: they are read in the same
      turn (``pending()``), once the sink took what came before.
    * A TLS write is all or nothing (no partial writes): one that has to wait
      is retried later with the same bytes.
    * An EOF is passed to a TLS sink as ``close_notify`` and then the TCP
      half-close, and the peer may go on sending (TLS 1.3 half-close): see
      :func:`_close_notify` for how it is sent without reading. The TCP
      half-close is the plain socket's ``shutdown``: ``SSLSocket.shutdown``
      would drop the TLS layer, and later reads would return raw records.
    """

    __slots__ = ("closing", "ended", "sink_tls", "source_tls")

    def __init__(self, source: socket.socket, sink: socket.socket, source_side: str, sink_side: str,
                 view: memoryview) -> None:
        super().__init__(source, sink, source_side, sink_side, view)
        self.source_tls = source if isinstance(source, ssl.SSLSocket) else None
        self.sink_tls = sink if isinstance(sink, ssl.SSLSocket) else None
        self.ended = False  # the source's EOF was read while bytes before it still wait for the sink
        self.closing = False  # pending holds the sink's close_notify record, to be sent as it is

    def pull(self) -> bool:
        changed = self.read_events != _READABLE
        self.read_events = _READABLE
        view = self.view
        size = len(view)
        recv_into = self.recv_into
        tls_source = self.source_tls
        draining = False  # a second round: only what waits in the TLS object, not more from the kernel
        while True:
            filled = 0
            while filled < size and (not draining or (tls_source is not None and tls_source.pending())):
                try:
                    n = recv_into(view[filled:] if filled else view)
                except (ssl.SSLWantReadError, BlockingIOError):
                    break
                except ssl.SSLWantWriteError:
                    self.read_events = _WRITABLE  # the TLS layer must send something before it reads on
                    changed = True
                    break
                except ssl.SSLZeroReturnError:
                    n = 0  # the peer's close_notify after ours: Python reads 0 only when we sent none
                except OSError as exc:
                    raise _PeerError(self.source_side, exc) from exc
                if not n:
                    self.ended = True
                    break
                filled += n
                if tls_source is None:
                    break  # a plain socket gave what it had
            if filled:
                if self.count_in is not None:
                    self.count_in.bytes_in += filled
                if not self._send(view[:filled]):
                    return True  # the sink is full: the source waits
            if self.ended:
                self._pass_eof()
                return True
            if filled < size or tls_source is None or not tls_source.pending():
                return changed
            # the buffer filled up and decrypted bytes wait in the TLS object, where epoll does not see
            # them: read those (at most a record) now, and leave the kernel's to the next turn
            draining = True

    def push(self) -> bool:
        pending = self.pending
        assert pending is not None
        changed = self.write_events != _WRITABLE
        self.write_events = _WRITABLE
        try:
            sent = socket.socket.send(self.sink, pending) if self.closing else self.send(pending)
        except (ssl.SSLWantWriteError, BlockingIOError):
            return changed
        except ssl.SSLWantReadError:
            self.write_events = _READABLE
            return True
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        if sent < len(pending):  # a plain sink took part of it (a TLS one takes all or raises)
            self.pending = pending[sent:]
            return changed
        self.pending = None
        if self.closing:
            self._shut_write()
        else:
            if self.count_out is not None:
                self.count_out.bytes_out += sent
            if self.ended:
                self._pass_eof()
            elif self.source_tls is not None and self.source_tls.pending():
                self.pull()  # bytes that waited in the TLS object while the sink was full
        return True

    def _send(self, data: memoryview) -> bool:
        """Send ``data`` to the sink; False when some of it waits in ``pending`` (a copy) for the sink."""
        try:
            sent = self.send(data)
        except (ssl.SSLWantWriteError, BlockingIOError):
            sent = 0
        except ssl.SSLWantReadError:
            sent = 0
            self.write_events = _READABLE
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        if self.count_out is not None:
            self.count_out.bytes_out += sent
        if sent == len(data):
            return True
        self.pending = memoryview(data[sent:].tobytes())  # a TLS sink is retried with these same bytes
        return False

    def _pass_eof(self) -> None:
        """The source's EOF to the sink, once every byte before it was delivered: close_notify, then FIN."""
        self.eof = True
        if self.sink_tls is not None:
            try:
                record = _close_notify(self.sink_tls)
            except OSError as exc:  # an SSLError: the TLS connection had failed already
                raise _PeerError(self.sink_side, exc) from exc
            try:
                sent = socket.socket.send(self.sink, record) if record else 0
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _PeerError(self.sink_side, exc) from exc
            if sent < len(record):
                self.pending = memoryview(record[sent:])  # sent once the sink is writable, then the FIN
                self.closing = True
                return
        self._shut_write()

    def _shut_write(self) -> None:
        try:
            socket.socket.shutdown(self.sink, socket.SHUT_WR)  # not SSLSocket.shutdown: it drops the TLS layer
        except OSError as exc:
            raise _PeerError(self.sink_side, exc) from exc
        self.done = True


def _close_notify(sslsock: ssl.SSLSocket) -> bytes:
    """Have ``sslsock`` write its close_notify alert and return it, to be sent as it is; the TLS layer stays.

    ``unwrap()`` is the only way Python has to send a close_notify, and it
    calls ``SSL_shutdown`` twice: once to send ours, once more to read the
    peer's. That second call, if it finds application data instead (a peer
    still sending, as TLS 1.3 allows and a half-closed relay expects), makes
    OpenSSL fail the connection ("application data after close notify") and
    the data is lost; the GIL, taken back between the two calls, makes the
    window wide. So for the one call the socket's descriptor is, briefly, one
    end of an empty socket pair: the alert is written there and taken back,
    and the read finds nothing (``SSLWantReadError``). The caller sends the
    record on the real socket; later reads of the peer's bytes go on as before.

    Raises ``OSError`` (an ``SSLError`` when the TLS connection failed before).
    """
    fd = sslsock.fileno()
    here, there = socket.socketpair()
    try:
        here.setblocking(False)
        there.setblocking(False)
        saved = os.dup(fd)
        try:
            os.dup2(here.fileno(), fd, inheritable=False)
            with contextlib.suppress(ssl.SSLWantReadError):  # ours is written, the peer's not awaited
                sslsock.unwrap()  # returns when the peer's close_notify came before: nothing more to read then
        finally:
            os.dup2(saved, fd, inheritable=False)  # the TCP socket again, and its epoll registration with it
            os.close(saved)
        record = bytearray()
        with contextlib.suppress(BlockingIOError):
            while chunk := there.recv(4096):
                record += chunk
        return bytes(record)
    finally:
        here.close()
        there.close()


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
        if isinstance(client, ssl.SSLSocket) or isinstance(upstream, ssl.SSLSocket):
            self.outbound: _Pipe = _TlsPipe(client, upstream, "client", "upstream", view)
            self.inbound: _Pipe = _TlsPipe(upstream, client, "upstream", "client", view)
        else:  # chosen once here, so a plain connection's bytes never pass a TLS check
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
                    if mask & feeds.read_events and feeds.pending is None and not feeds.eof and feeds.pull():
                        changed = True
                    if mask & drains.write_events and drains.pending is not None and drains.push():
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
        wanted = ((outbound.read_events & _IN_OUT if outbound.pending is None and not outbound.eof else 0)
                  | (inbound.write_events & _IN_OUT if inbound.pending is not None else 0))
        if wanted != connection.client_events:
            self._register(connection.client_fd, connection.client_events, wanted)
            connection.client_events = wanted
        wanted = ((inbound.read_events & _IN_OUT if inbound.pending is None and not inbound.eof else 0)
                  | (outbound.write_events & _IN_OUT if outbound.pending is not None else 0))
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


class RelayHandler(Balanced, socketserver.BaseRequestHandler):
    """Forward the connection to an upstream and copy bytes both ways until both sides are done.

    Configure by subclassing (the daemon's ``--relay`` options make such a
    subclass with ``type(...)``)::

        class Backend(RelayHandler):
            upstreams = (("10.0.0.1", 7000), ("10.0.0.2", 7000))
            idle_timeout = 60.0

    The settings (``upstreams``, ``connect_timeout``, ``idle_timeout``,
    ``send_proxy``, ``upstream_tls``, ``upstream_server_name``, and
    ``buffer_size`` here) are checked when the subclass is made: a mistake
    raises there, once. Connections are balanced over the upstreams by
    :class:`prefork.handlers.upstreams.Balancer` (``upstream_specs``:
    weights, backups, caps; ``balance``; ``check_interval``;
    ``slow_start``); when one refuses, times out or fails its TLS handshake
    it is marked down for every worker and the next is tried. To pick
    the upstream per connection, override :meth:`upstream_candidates`. These decisions, the
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

    TLS: the client's socket may be an ``ssl.SSLSocket`` (a TLS listener: the
    worker did the handshake), and ``upstream_tls`` (``--relay-tls``) makes
    the upstream's one; either, or both. An EOF is passed to a TLS side as a
    ``close_notify`` and the TCP half-close, and the other direction goes on
    (as HAProxy and stunnel do); with ``send_proxy`` a TLS client is
    announced with what it negotiated (:func:`relay_core.ssl_tlv`).

    Bytes read from the client count as ``bytes_in`` and bytes written to it
    as ``bytes_out`` in ``self.server.record`` as they move, when the server
    has one (a prefork worker does; a plain ``socketserver`` server does not).
    Through TLS these are the plaintext bytes.

    ``handle()`` connects upstream, sends the PROXY header and does the
    upstream's TLS handshake in its own thread (blocking, bounded by
    ``connect_timeout``), then leaves the copying to the process's relay
    loop and waits for it: an override of :meth:`connect_upstream` or :meth:`upstream_candidates`
    runs in the handler's thread as before, while the relayed sockets are
    used by the loop's thread only.
    """

    buffer_size: int = 65536  # per direction
    counts_bytes = True  # into self.server.record as they move: the worker need not read TCP_INFO too
    # its thread waits while the process's relay loop does the I/O: a silent connection is idle, never a
    # handler stuck on it (--handler-timeout)
    io_elsewhere = True

    upstream_address: Upstream | None = None  # set per connection by connect_upstream()
    _upstream_index: int | None = None  # its index in the balancer (None: not one of ours), for finished()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.buffer_size = relay_core.check_buffer_size(cls.__name__, cls.buffer_size)

    # -- hooks --------------------------------------------------------------------------------------

    def upstream_candidates(self) -> list[Upstream]:
        """The upstreams to try for this connection, in order; the first that accepts is used.

        May be overridden. The default is the balancer's choice
        (:func:`relay_core.choose`: least connections over every worker for
        their weight, or weighted round robin; down upstreams left out,
        backups only while every primary is down), the rest following as
        failover. An
        override may use ``self.client_address`` and ``self.server``; for
        example, to keep each client on one upstream while it is up::

            class Sticky(RelayHandler):
                upstreams = (("10.0.0.1", 7000), ("10.0.0.2", 7000))

                def upstream_candidates(self) -> list[tuple[str, int]]:
                    first = zlib.crc32(self.client_address[0].encode()) % len(self.upstreams)
                    return [*self.upstreams[first:], *self.upstreams[:first]]

        Returning an empty list closes the client's connection (logged as no upstream).
        """
        return self.balancer.candidates()

    def connect_upstream(self) -> socket.socket | None:
        """Connect to the first reachable candidate; None (logged, counted) when none is.

        Each attempt connects, sends the PROXY header (``send_proxy``) and,
        with ``upstream_tls``, does the TLS handshake, all within
        ``connect_timeout``; an attempt that fails at any of these steps
        (refused, timed out, a certificate that does not verify) is logged
        with the step and the next candidate is tried. The header goes first
        and in clear, as HAProxy's ``send-proxy`` does before its ``ssl``.

        May be extended; the result must be a connected stream socket (an
        ``ssl.SSLSocket`` for TLS), and ``self.upstream_address`` names it in log lines.
        """
        failures: list[str] = []
        balancer = self.balancer
        candidates = self.upstream_candidates()
        for n, address in enumerate(candidates):
            i = balancer.attempt(address)
            try:
                upstream = self._open_upstream(address)
            except relay_core.AttemptFailed as failed:
                balancer.failed(i, failed.error, failed.stage, failover=n < len(candidates) - 1)
                failures.append(failed.words(address, self.connect_timeout))
                continue
            except BaseException:
                balancer.give_up(i)
                raise
            balancer.connected(i)
            if failures:
                self._report(relay_core.failed_over(self.client_address, failures, address))
            self.upstream_address = address
            self._upstream_index = i
            return upstream
        self._report(relay_core.no_upstream(self.client_address, failures, skipped=bool(self.upstreams)))
        return None

    def _open_upstream(self, address: Upstream) -> socket.socket:
        """Connect to ``address``, send the PROXY header, do the TLS handshake; raises ``AttemptFailed``."""
        deadline = time.monotonic() + self.connect_timeout
        try:
            upstream = connect_first(self.balancer.addresses_for(address), self.connect_timeout)
        except OSError as exc:
            raise relay_core.AttemptFailed("", exc) from exc
        stage = "PROXY header"
        try:
            if self.send_proxy:
                upstream.sendall(self.proxy_header(self.request))  # still bounded by connect_timeout
            if self.upstream_tls is not None:
                stage = "TLS handshake"
                upstream = self._start_tls(upstream, address[0], deadline)
        except OSError as exc:
            upstream.close()
            raise relay_core.AttemptFailed(stage, exc) from exc
        except BaseException:
            upstream.close()
            raise
        return upstream

    def _start_tls(self, upstream: socket.socket, host: str, deadline: float) -> ssl.SSLSocket:
        """The TLS handshake on ``upstream`` by ``deadline``, verifying its certificate; raises ``OSError``.

        The name asked for and verified is ``upstream_server_name`` or the
        upstream's host (an IP address is matched against the certificate's
        IP entries). ``upstream`` is taken over: closed when this fails.
        """
        assert self.upstream_tls is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError()
        try:
            wrapped = self.upstream_tls.wrap_socket(upstream, server_hostname=relay_core.server_name(
                self.upstream_server_name, host), do_handshake_on_connect=False)
        except ValueError as exc:  # a server name Python refuses (empty, a leading dot)
            raise OSError(f"cannot ask for that server name: {exc}") from exc
        try:
            wrapped.settimeout(remaining)
            wrapped.do_handshake()  # the whole handshake within the timeout, not each step (Python's deadline)
        except BaseException:
            wrapped.close()
            raise
        return wrapped

    def proxy_header(self, client: socket.socket) -> bytes:
        """The PROXY v2 header announcing this connection: the client and the address it connected to.

        A LOCAL header (the receiver uses the connection's own addresses) when
        they are not IP addresses, e.g. on a Unix socket listener. A TLS
        client (an ``ssl.SSLSocket``) is announced with what it negotiated
        (PP2_TYPE_SSL: version, cipher, its certificate's CN; PP2_TYPE_ALPN).
        May be overridden (to add TLVs, say).
        """
        tls = relay_core.ClientTls.of(client) if isinstance(client, ssl.SSLSocket) else None
        return relay_core.proxy_header(self.client_address, client.getsockname(), tls)

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
            tls.close_notify(upstream)  # a TLS upstream left early (idle, the client failed) sees a clean end
            upstream.close()
            self.balancer.finished(self._upstream_index)
            self._upstream_index = None

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
