"""The admission core's adapter for the ``sync`` and ``thread`` classes: a waiting room and a watch on handlers.

A connection accepted on a plain listener goes to its handler only once it
is readable: until then it sits on the worker's epoll (:class:`Watch`'s
waiting room), costing a descriptor and no thread. A handler's connection is
sampled on each tick without touching the handler's socket object: the
kernel's count of bytes received (``TCP_INFO``) says whether the client
spoke, and the handler thread's current system call
(``/proc/self/task/TID/syscall``) whether it waits on the client (blocked
reading or writing) or works. A connection closed for a reason is shut down
(``shutdown(SHUT_RDWR)``) under its handler: an unchanged socketserver
handler sees end of file (or a broken pipe) and returns, and the worker
goes on (:meth:`Watch.close`, the one way a connection is ended for a
reason).

A connection that stays silent still gets a free place after
:data:`FIRST_BYTES_GRACE` (a protocol where the server speaks first, a
greeting, works unchanged); once every place is taken, the next readable
connection reclaims the quietest one (see :mod:`prefork.workers.admission`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from prefork.scoreboard import SourceCounts
from prefork.workers.admission import Admission, Policy, Reason, Sample, source_key, tick_interval
from prefork.workers.connection import tcp_activity

log = logging.getLogger(__name__)

RECHECK_RECLAIMABLE = 0.1  # seconds between two looks whether a full pool holds a connection to reclaim
PARK_AFTER = 5  # idle ticks after which the sync class's watchdog waits to be woken
FIRST_BYTES_GRACE = 0.1  # seconds a silent connection waits before a free place takes it anyway

# system calls a thread blocked on its client sits in (x86-64 and aarch64 numbers): read, write, recvfrom,
# sendto, recvmsg, sendmsg, poll, ppoll, select, pselect6, readv, writev
_IO_SYSCALLS = {
    "x86_64": frozenset({0, 1, 7, 19, 20, 23, 44, 45, 46, 47, 270, 271}),
    "aarch64": frozenset({63, 64, 65, 66, 72, 73, 206, 207, 211, 212}),
}.get(os.uname().machine, frozenset())


def waits_on_io(tid: int) -> bool:
    """True when thread ``tid`` of this process is blocked in socket I/O (reading or writing, or polling).

    Unknown (no /proc, another architecture) counts as waiting: the rules
    then fall back to the bytes received alone.
    """
    try:
        with open(f"/proc/self/task/{tid}/syscall", "rb") as f:
            first = f.read(24).split(None, 1)[0]
    except OSError:
        return True
    if first == b"running":
        return False
    try:
        number = int(first)
    except ValueError:
        return True
    return number in _IO_SYSCALLS if _IO_SYSCALLS else True


@dataclass
class Handled:
    """A connection a handler has: its socket and the handler's thread."""

    sock: socket.socket
    tid: int
    source: str | None
    ident: int = 0  # the handler thread's Python ident (its stack, for --handler-timeout)


class Watch:
    """One worker's connections between accept and close, for the admission core (thread-safe).

    ``hand(sock, peer)`` gives a readable connection to the handler side;
    ``record`` gets the close counts and the oldest silent connection's age;
    ``sources`` (None: no per-source limit) counts connections per client
    address across the daemon.
    """

    def __init__(self, policy: Policy, record: Any, sources: SourceCounts | None,
                 hand: Callable[[socket.socket, Any], None], lock: threading.RLock | None = None) -> None:
        self.admission = Admission(policy, self._count)
        self.policy = policy
        self.record = record
        self.sources = sources if policy.max_per_source else None
        self.hand = hand
        self.tick = tick_interval(policy)
        self.stuck_threads: set[int] = set()  # Python idents of handlers past --handler-timeout, not yet returned
        # told the number of handler threads that did not return a full --handler-timeout after their connection
        # was closed for it, when it grows (the worker recycles itself)
        self.on_stuck: Callable[[int], None] = _ignore
        # the handler's thread waits while another thread does its I/O (the relay's loop): never taken for stuck
        self.io_elsewhere = False
        self.lock = lock or threading.RLock()  # also the worker's, around the record's counts
        self.epoll: select.epoll | None = None
        self.waiting: dict[int, tuple[socket.socket, Any]] = {}  # fd -> (socket, peer)
        self.handled: dict[int, Handled] = {}
        self.since: dict[int, float] = {}  # fd -> accepted, until a handler has it
        self.ready: list[int] = []  # waiting connections reported readable on this turn (sync)
        self.closed_by_us: set[int] = set()  # handled connections shut down for a reason: quiet ends
        self._source_of: dict[int, str] = {}
        self.next_tick = 0.0
        self._reclaimable = False
        self._reclaimable_at = 0.0

    def _count(self, reason: Reason) -> None:
        field = f"closed_{reason.value}"
        setattr(self.record, field, getattr(self.record, field) + 1)

    def __len__(self) -> int:
        return len(self.waiting)

    def watch_on(self, epoll: select.epoll) -> None:
        """Use ``epoll`` from now on (the worker made a new one): every waiting connection moves to it."""
        self.epoll = epoll
        for fd in self.waiting:
            epoll.register(fd, select.EPOLLIN)

    # -- per source --------------------------------------------------------------------------------

    def admit_source(self, sock: socket.socket, peer: Any) -> bool:
        """Count ``sock`` under its source; False (counted, the caller closes it) when over the limit."""
        if self.sources is None:
            return True
        key = source_key(peer)
        if key is None:
            return True
        with self.lock:
            if self.sources.count(key) >= self.policy.max_per_source:
                self.admission.closing(None, Reason.PER_SOURCE)
                return False
            self.sources.add(key, 1)
            self._source_of[sock.fileno()] = key
        return True

    def counted(self, sock: Any) -> bool:
        """True when ``sock`` was counted under its source already (or no source is counted at all)."""
        return self.sources is None or sock.fileno() in self._source_of

    def release_source(self, fd: int) -> None:
        if self.sources is None:
            return
        with self.lock:
            key = self._source_of.pop(fd, None)
            if key is not None:
                self.sources.add(key, -1)

    # -- the waiting room ----------------------------------------------------------------------------

    def take(self, sock: socket.socket, peer: Any, hand: bool = True) -> None:
        """A connection just accepted: to the handler if its first bytes are there (and ``hand``), else to
        the waiting room (a readable one is reported by the epoll at once)."""
        if hand and readable_now(sock):
            self.hand(sock, peer)  # accepted this instant: nothing to remember (accepted_at says now)
        else:
            self.wait(sock, peer)

    def wait(self, sock: socket.socket, peer: Any) -> None:
        """A connection just accepted goes to the waiting room (a readable one is reported by the epoll at once)."""
        assert self.epoll is not None
        fd = sock.fileno()
        now = time.monotonic()
        with self.lock:
            self.waiting[fd] = (sock, peer)
            self.since[fd] = now
            self.record.active += 1  # open here: siblings balance on it
            self.admission.wait(fd, now)
        self.epoll.register(fd, select.EPOLLIN)

    def accepted_at(self, sock: Any) -> float:
        """When ``sock`` was accepted (now for one the watch did not take: a TLS one, after its handshake)."""
        return self.since.pop(sock.fileno(), None) or time.monotonic()

    def on_event(self, fd: int, defer: bool = False) -> bool:
        """An event on ``fd``; False when it is not a waiting connection's. A readable one goes to its handler,
        or with ``defer`` is noted for :meth:`hand_newest_ready` (the sync class serves one at a time)."""
        with self.lock:
            if defer:
                if fd not in self.waiting:
                    return False
                self.ready.append(fd)
                return True
            item = self.waiting.pop(fd, None)
            if item is None:
                return False
            self.record.active -= 1  # the handler side counts it from here
            self.admission.waiting.pop(fd, None)
        self._unwatch(fd)
        self.hand(*item)
        return True

    def hand_newest_ready(self) -> None:
        """Of the connections noted readable on this turn, the newest goes to the handler (the others stay
        readable, and the epoll reports them again). Newest first: under a flood of slow clients a new one
        is the likeliest still waiting for its answer."""
        with self.lock:
            ready, self.ready = self.ready, []
            fd = max((f for f in ready if f in self.waiting), key=lambda f: self.admission.waiting.get(f, 0.0),
                     default=None)
            if fd is None:
                return
            item = self.waiting.pop(fd)
            self.record.active -= 1
            self.admission.waiting.pop(fd, None)
        self._unwatch(fd)
        self.hand(*item)

    def grace_due(self) -> float | None:
        """When the oldest silent connection may take a free place (None: none waits)."""
        first = next(iter(self.admission.waiting.values()), None)
        return None if first is None else first + FIRST_BYTES_GRACE

    def hand_overdue(self, now: float, places: int) -> None:
        """Up to ``places`` free: the silent connections waiting longer than the grace take them, oldest first."""
        while places > 0:
            with self.lock:
                due = self.grace_due()
                if due is None or due > now:
                    return
                fd = next(iter(self.admission.waiting))
                assert isinstance(fd, int)
                item = self.waiting.pop(fd)
                self.record.active -= 1
                self.admission.waiting.pop(fd, None)
            self._unwatch(fd)
            self.hand(*item)
            places -= 1

    def readable_waiting(self) -> bool:
        """True when a waiting connection has its first bytes (one poll over the waiting room)."""
        with self.lock:
            fds = list(self.waiting)
        if not fds:
            return False
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return any(ev & select.POLLIN for _, ev in poller.poll(0))

    def _unwatch(self, fd: int) -> None:
        if self.epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(fd)

    def drop_oldest_waiting(self) -> bool:
        """Out of descriptors: the longest-waiting silent connection gives way. False when none waits."""
        with self.lock:
            key = self.admission.oldest_waiting()
            if not isinstance(key, int):
                return False
            self.close(key, Reason.RECLAIMED)
        return True

    # -- handlers' connections -----------------------------------------------------------------------

    def begin(self, sock: Any, tid: int | None = None, since: float | None = None, ident: int | None = None) -> None:
        """A handler takes ``sock`` (its fd is the key): the calling thread's, or thread ``tid``'s (Python
        ``ident``) since ``since`` (the sync class's watchdog registers the loop's handler once it runs past a
        tick)."""
        fd = sock.fileno()
        with self.lock:
            self.since.pop(fd, None)
            self.handled[fd] = Handled(sock, _native_id() if tid is None else tid, self._source_of.get(fd),
                                       threading.get_ident() if ident is None else ident)
            self.admission.handed(fd, time.monotonic() if since is None else since)

    def end(self, sock: Any) -> bool:
        """The handler is done with ``sock``; True when the worker had closed it for a reason."""
        fd = sock.fileno()
        with self.lock:
            handled = self.handled.pop(fd, None)
            if handled is not None:
                self.stuck_threads.discard(handled.ident)
            self.admission.forget(fd)
            ours = fd in self.closed_by_us
            self.closed_by_us.discard(fd)
        self.release_source(fd)
        return ours

    def was_closed(self, sock: Any) -> bool:
        with self.lock:
            return sock.fileno() in self.closed_by_us

    # -- decisions ----------------------------------------------------------------------------------

    def due(self, now: float, handlers_busy: bool = False) -> float | None:
        """When the loop should call :meth:`turn` next (None: nothing to watch); ``handlers_busy``: the
        handlers have connections (some may not have said so yet)."""
        if handlers_busy or self.admission or self.record.oldest_silent_since:
            # a tick (at most a second apart) while anything is tracked, and one more once nothing is, so the
            # oldest silent connection's age in the scoreboard is never staler than that, timeouts or not
            tick = max(self.next_tick, now - 1.0)
            deadline = self.admission.next_deadline()
            return tick if deadline is None else min(tick, deadline)
        return None

    def turn(self, now: float, pressure: bool = False) -> None:
        """Sample the handlers' connections; close those past the idle timeout; under ``pressure`` (a
        connection waits and every place is taken) reclaim one."""
        with self.lock:
            received = self._samples()
            for key in self.admission.tick(now, received, self._on_client):
                self._close_key(key)
            for key in self.admission.stuck(now, received, _always if self.io_elsewhere else self._on_client):
                self._stuck(key, now)
            stuck = self._still_stuck(now) if self.stuck_threads else 0
            if stuck > self.record.stuck_handlers:
                self.record.stuck_handlers = stuck
                self.on_stuck(stuck)
            if pressure:
                self._reclaim(now, received)
            self.record.oldest_silent_since = self.admission.oldest_silent_since()
            self.record.oldest_handler_since = self.admission.oldest_held_since()
            self.admission.flush_log(now)
        self.next_tick = now + self.admission.interval()

    def drain(self) -> None:
        """The worker drains: ``--drain-idle`` applies from the next turn (safe from a signal handler)."""
        self.admission.drain()
        self.next_tick = 0.0

    def _stuck(self, fd: Hashable, now: float) -> None:
        """A handler past ``--handler-timeout``: its stack logged once, its connection shut down under it."""
        handled = self.handled.get(fd) if isinstance(fd, int) else None
        if handled is None or not isinstance(fd, int):
            return
        held = now - self.admission.handling[fd].since if fd in self.admission.handling else 0.0
        log_stuck(handled.ident, handled.sock, held)
        self.stuck_threads.add(handled.ident)
        self._shut(fd)

    def _still_stuck(self, now: float) -> int:
        """Handlers whose connection was closed for ``--handler-timeout`` a full timeout ago and that have not
        returned: each holds a thread for good."""
        return sum(1 for fd, h in self.handled.items() if h.ident in self.stuck_threads
                       and (conn := self.admission.handling.get(fd)) is not None
                       and now - conn.since >= 2 * self.policy.handler_timeout)

    def reclaim(self, now: float) -> bool:
        """Every place is taken and a connection waits: reclaim one; False when every handler works."""
        with self.lock:
            return self._reclaim(now, self._samples())

    def _samples(self) -> dict[int, Sample]:
        return {fd: activity(h.sock) for fd, h in self.handled.items()}

    def _reclaim(self, now: float, received: dict[int, Sample]) -> bool:
        victim = self.admission.make_room(now, received, self._on_client) if self.handled else None
        self._close_key(victim)
        return victim is not None

    def reclaimable(self, now: float) -> bool:
        """True when a handler's connection could be reclaimed for a waiting one (looked at once per tick)."""
        with self.lock:
            if now >= self._reclaimable_at:
                self.admission.observe_all(now, self._samples())
                self._reclaimable = self.admission.any_reclaimable(now, self._on_client)
                self._reclaimable_at = now + RECHECK_RECLAIMABLE
            return self._reclaimable

    def stuck(self) -> int:
        """Handlers whose connection was closed for ``--handler-timeout`` and that have not returned yet."""
        return len(self.stuck_threads)

    def reclaiming(self) -> int:
        """Handlers' connections shut down for a reason whose handler has not returned yet."""
        return len(self.closed_by_us)

    def _on_client(self, key: Hashable) -> bool:
        handled = self.handled.get(key) if isinstance(key, int) else None
        return handled is not None and waits_on_io(handled.tid)

    def _close_key(self, key: Hashable | None) -> None:
        if isinstance(key, int):
            self._shut(key)

    def close_counted(self, reason: Reason) -> None:
        """A connection the caller closed (not one of the watch's) for ``reason``: counted, logged rate-limited."""
        with self.lock:
            self.admission.closing(None, reason)

    def close(self, fd: int, reason: Reason) -> None:
        """Close connection ``fd`` cleanly for ``reason``: counted and logged (rate-limited) once."""
        with self.lock:
            self.admission.closing(fd, reason)
            self._shut(fd)

    def _shut(self, fd: int) -> None:
        """A waiting connection is closed; a handler's is shut down under it (it sees end of file and returns)."""
        item = self.waiting.pop(fd, None)
        if item is not None:
            self.record.active -= 1
            self.since.pop(fd, None)
            self._unwatch(fd)
            self.release_source(fd)
            with contextlib.suppress(OSError):
                item[0].close()
            return
        handled = self.handled.get(fd)
        if handled is not None:
            self.closed_by_us.add(fd)
            with contextlib.suppress(OSError):
                handled.sock.shutdown(socket.SHUT_RDWR)

    def close_all(self) -> None:
        """The worker is leaving: close what still waits."""
        with self.lock:
            for fd, (sock, _) in list(self.waiting.items()):
                self.waiting.pop(fd)
                self.since.pop(fd, None)
                self.record.active -= 1
                self.admission.forget(fd)
                self._unwatch(fd)
                self.release_source(fd)
                with contextlib.suppress(OSError):
                    sock.close()


def _ignore(stuck: int) -> None:
    pass


def _always(key: Hashable) -> bool:
    return True


def log_stuck(ident: int, sock: Any, held: float) -> None:
    """The stack of handler thread ``ident``, stuck on ``sock`` (one ERROR line with the stack, as a hung worker's)."""
    frame = sys._current_frames().get(ident)
    stack = "".join(traceback.format_stack(frame)) if frame is not None else "(its stack is gone)\n"
    try:
        peer = sock.getpeername()
    except OSError:
        peer = "?"
    log.error("a handler has held the connection from %s for %.0fs without returning or exchanging a byte "
              "(--handler-timeout); closing it. Its stack:\n%s", peer, held, stack.rstrip())


_this_thread = threading.local()


def _native_id() -> int:
    """The calling thread's kernel id, asked of the kernel once per thread (``gettid`` is a system call)."""
    tid: int | None = getattr(_this_thread, "tid", None)
    if tid is None:
        tid = _this_thread.tid = threading.get_native_id()
    return tid


# the flags as a plain int: ``socket.MSG_PEEK | socket.MSG_DONTWAIT`` is an IntFlag operation, Python code run
# on every connection accepted
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


def readable_now(sock: socket.socket) -> bool:
    """True when bytes (or the end) are there already: one non-blocking peek."""
    try:
        sock.recv(1, _PEEK_NOW)
    except BlockingIOError:
        return False
    except OSError:
        return True  # an error: the handler sees it at once
    return True


def activity(sock: Any) -> Sample:
    """What the kernel knows of a connection's client: bytes received, and since when nothing came (TCP_INFO)."""
    if getattr(sock, "family", None) == socket.AF_UNIX:
        return Sample(None)
    seen = tcp_activity(sock)
    return Sample(None) if seen is None else Sample(seen[0], silent_for=seen[1], quiet_for=seen[2], unsent=seen[3])


class Watchdog(threading.Thread):
    """The ``sync`` class's watch while its one handler runs in the serving loop's own thread.

    Every tick while a handler runs: ``turn()`` (the server's: a stop signal
    that came inside the handler, what waits on the listeners to the waiting
    room, then the same :meth:`Watch.turn` as the thread class's loop, all
    under the server's lock and only while the handler is still running).
    It ticks while connections keep coming and parks
    after :data:`PARK_AFTER` idle ticks, so a connection costs it nothing (no
    wake-up) unless it is the first after a pause; :meth:`poke` makes it turn
    at once, parked or not.
    """

    def __init__(self, watch: Watch, turn: Callable[[], None]) -> None:
        super().__init__(name="prefork-watchdog", daemon=True)
        self.watch = watch
        self.server_turn = turn
        self.cond = threading.Condition()
        self.busy = False
        self.parked = True
        self.poked = False
        self.interval = min(0.2, watch.tick)

    def handling(self, on: bool) -> None:
        self.busy = on
        if on and self.parked:
            with self.cond:
                self.parked = False
                self.cond.notify()

    def poke(self) -> None:
        """Turn now (safe from a signal handler: the condition's lock is re-entrant, and never held long)."""
        with self.cond:
            self.poked = True
            self.cond.notify()

    def run(self) -> None:
        idle = 0
        while True:
            with self.cond:
                while self.parked and not self.poked:
                    self.cond.wait()
                if not self.poked:
                    self.cond.wait(self.interval)  # a tick (handling() notifies only a parked watchdog)
                poked, self.poked = self.poked, False
                if not self.busy and not poked:
                    idle += 1
                    if idle >= PARK_AFTER:
                        self.parked = not self.busy  # a handler that began meanwhile keeps it ticking
                        idle = 0
                    continue
            idle = 0
            self.server_turn()
