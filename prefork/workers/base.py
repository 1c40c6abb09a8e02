"""The one lifecycle every worker class obeys, whatever its I/O.

A worker class (``sync``, ``thread``, ``async``) subclasses
:class:`WorkerLifecycle` and supplies only how it serves: how signals reach
its loop, how it stops accepting, its serving loop and its count of open
connections. The rules a worker keeps towards its master are written here
once:

* the signal table: SIGTERM begins a graceful stop, SIGUSR1 reopens the log
  files, SIGUSR2 closes the listening sockets (``preforkctl drain --close``,
  a stop), SIGHUP says the daemon stops and first serves what is
  queued (handlers see the drain, the worker still accepts), SIGINT and
  SIGQUIT leave at once (:class:`FastExit`);
* a graceful stop: stop accepting, free the address when orphaned, tell the
  master (``STOPPED``: a reload's reply waits for every old worker's), let
  open connections finish until the graceful deadline, then warn about the
  ones cut short;
* ``--max-requests``: count accepted connections, and at the limit tell the
  master (``RETIRING``: it starts the replacement at once) and stop;
* a listening socket gone under the worker (a handler closed
  ``self.server.socket``, or a descriptor of it was closed and its number
  reused): ``accept()`` fails with ``EBADF``, ``ENOTSOCK`` or ``EINVAL``
  for ever, so the worker logs it once and retires the same way, rather
  than spin;
* a process a handler forks holds no descriptor of the listening sockets
  (a child that leaves with ``setsid()`` would keep the port);
* the orphan check (the master's pid is no longer our parent);
* the PROXY protocol decisions: which peers must send a header, what a
  missing or malformed one costs, and when a load balancer's health check
  (a ``LOCAL`` header) is closed at once;
* the heartbeat in the scoreboard and ``READY`` on the channel;
* ``--balance``: when a worker holding more than its share of its
  generation's connections steps back from accepting, and when it comes
  back (:mod:`prefork.workers.balance` decides).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prefork import drain, logs, memory
from prefork.channel import Channel, Event
from prefork.handlers import relay_loops
from prefork.proxy_protocol import ProxyHeader
from prefork.scoreboard import Record, SourceCounts
from prefork.tls import ServerTls
from prefork.workers.admission import LISTENER_GONE_ERRNOS, Policy, Reason
from prefork.workers.balance import ACCEPTING, NOT_ACCEPTING, STEPPED_BACK, WAKE_SIGNAL, Balance
from prefork.workers.connection import ProxyPolicy, format_peer

log = logging.getLogger(__name__)

MEMORY_LOOK = 0.1  # seconds between two looks at its own memory, as connections come (--max-worker-memory)

# Signals that end a worker at once, skipping the drain.
FAST_EXIT_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT})
__all__ = ["FAST_EXIT_SIGNALS", "LISTENER_GONE_ERRNOS", "FastExit", "WorkerLifecycle", "WorkerOptions"]


class FastExit(BaseException):
    """Raised by SIGINT/SIGQUIT in a worker: leave now, skipping the drain.

    A BaseException so socketserver's ``except Exception`` around a request
    does not swallow it.
    """


def heartbeat_interval(timeout: float) -> float:
    """How often an idle worker stamps its heartbeat: often enough that ``timeout`` means a hang."""
    return max(0.05, min(timeout / 4, 5.0))


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker class needs to keep the lifecycle, from the master's spec and the config."""

    slot: int
    master_pid: int
    channel: Channel  # to the master
    max_requests: int = 0  # 0: never recycle; jitter already applied
    graceful_timeout: float = 30.0
    heartbeat_interval: float = 1.0
    deadman: float = 0.0  # seconds without a heartbeat after which the kernel ends the worker (0: never)
    proxy: ProxyPolicy | None = None  # None: no peer sends a PROXY header
    balance: Balance | None = None  # None: --balance off
    tls: tuple[ServerTls | None, ...] = ()  # each listener's TLS, in the order of the listeners (None: plain)
    memory_limit: int = 0  # bytes of its own memory (--max-worker-memory) past which it tells the master; 0: off
    # idle timeout, reclaim window, per-source limit (prefork.workers.admission)
    admission: Policy = dataclasses.field(default_factory=Policy)
    peers: Balance | None = None  # the generation's workers in the scoreboard (who has room)
    sources: SourceCounts | None = None  # connections per source across the daemon (None: no per-source limit)


class WorkerLifecycle:
    """A worker's life between loading its handler and exiting; subclasses supply the I/O.

    A subclass implements :meth:`serve` (install signal delivery for
    :meth:`signal_actions`, start accepting, call :meth:`announce_ready`,
    stamp :meth:`heartbeat` and call :meth:`check_master` as its loop turns,
    and return once :attr:`stopping` and drained or past
    :attr:`stop_deadline`; raise :class:`FastExit` on a fast exit),
    :meth:`stop_accepting`, :meth:`open_connections` and :meth:`fast_exit`.
    It may extend :meth:`on_stopping` and :meth:`forget_listeners`. It calls
    :meth:`count_accepted` for each connection it takes, and
    :meth:`mark_accepting` each time it starts or stops accepting. With
    ``--balance on`` it asks :meth:`over_share` after each connection it
    takes (stepping back when true, :attr:`stepped_back`) and, while stepped
    back, asks :meth:`still_over_share` when one of its connections ends,
    every :data:`~prefork.workers.balance.RECHECK` seconds and on
    :meth:`rebalance`.
    """

    def __init__(self, listeners: Sequence[socket.socket], record: Record, options: WorkerOptions) -> None:
        self.listeners = tuple(listeners)
        self.record = record
        self.slot = options.slot
        self.master_pid = options.master_pid
        self.channel = options.channel
        self.max_requests = options.max_requests
        self.graceful_timeout = options.graceful_timeout
        self.heartbeat_interval = options.heartbeat_interval
        self.deadman = options.deadman
        self._deadman_due = 0.0  # when the dead-man timer is pushed back next
        self.proxy = options.proxy
        self.memory_limit = options.memory_limit
        self.next_memory_look = 0.0
        self.proxy_failures_log = logs.RateLimitedLog(log)  # one client can send bad headers in a loop
        self.balance = options.balance
        self.tls = options.tls or tuple(None for _ in self.listeners)  # each listener's TLS (None: plain)
        self.admission_policy = options.admission
        self.sources = options.sources
        self.peers = options.peers
        self.stepped_back = False  # not accepting while it holds more than its share (--balance)
        self.accepted = 0  # connections taken, for --max-requests
        self.stopping = False
        self.stop_deadline = 0.0  # time.monotonic() after which open connections are cut
        self.listeners_closed = False
        self.listener_lost = False  # a listening socket went away under us: retiring
        self._on_drain: list[Callable[[], None]] = []  # told once, when the drain begins (prefork.drain.wait)
        self.wrapping_up = False  # the daemon stops: handlers should end, while the queue is still served

    # -- what each worker class supplies ------------------------------------------------------------

    def serve(self) -> None:
        """Serve until stopped and drained or past the deadline (see the class docstring). Must be overridden."""
        raise NotImplementedError

    def stop_accepting(self) -> None:
        """Take no new connection; the listening sockets stay open. Must be overridden."""
        raise NotImplementedError

    def open_connections(self) -> int:
        """Connections open now (a stopping worker waits for none). Must be overridden."""
        raise NotImplementedError

    def fast_exit(self) -> None:
        """SIGINT/SIGQUIT: leave now, skipping the drain (``serve`` ends in :class:`FastExit`). Must be overridden."""
        raise NotImplementedError

    def on_stopping(self) -> None:
        """The last step of :meth:`begin_stop`, after :attr:`stop_deadline` is set. May be extended."""

    def rebalance(self) -> None:
        """A sibling asks a stepped-back worker to look again (:data:`~prefork.workers.balance.WAKE_SIGNAL`).

        The base does nothing: a class whose loop turns on every signal looks
        then. May be extended.
        """

    def forget_listeners(self) -> None:
        """Drop every reference to the listening descriptors, about to close (their numbers get reused).

        May be extended.
        """

    # -- the drain, as handlers see it (prefork.drain) -----------------------------------------------

    @property
    def draining(self) -> bool:
        """True once a stop began or the listeners closed: a handler should end at a message boundary."""
        return self.stopping or self.listeners_closed or self.wrapping_up

    @property
    def drain_deadline(self) -> float | None:
        """When (``time.monotonic()``) the connections still open are cut; None while not stopping."""
        return self.stop_deadline if self.stopping else None

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the drain begins (at once if it has); it may run in a signal handler."""
        if self.draining:
            callback()
        else:
            self._on_drain.append(callback)

    def wrap_up(self) -> None:
        """SIGHUP: the daemon stops; its queue is served first, and handlers may end their connections now."""
        self.wrapping_up = True
        self._drain_began()

    def _drain_began(self) -> None:
        callbacks, self._on_drain = self._on_drain, []
        for callback in callbacks:
            callback()

    # -- the lifecycle ------------------------------------------------------------------------------

    def run(self) -> None:
        """The worker's life once its handler is loaded: serve, then say what a graceful timeout cut short.

        Raises :class:`FastExit` on SIGINT/SIGQUIT; the caller exits the process.
        """
        listening = _inodes(self.listeners)
        os.register_at_fork(after_in_child=lambda: _close_listening(listening))
        drain.attach(self)
        self.serve()
        still_open = self.open_connections()
        if still_open:
            log.warning("worker %d (pid %d): graceful timeout with %d connection(s) still open; closing them",
                        self.slot, os.getpid(), still_open)

    def signal_actions(self) -> dict[signal.Signals, Callable[[], None]]:
        """The signal table of every worker class (how each signal reaches its loop is the class's I/O)."""
        return {
            signal.SIGTERM: self.begin_stop,
            signal.SIGUSR1: logs.reopen,
            signal.SIGUSR2: self.close_listeners,
            signal.SIGHUP: self.wrap_up,
            signal.SIGINT: self.fast_exit,
            signal.SIGQUIT: self.fast_exit,
            WAKE_SIGNAL: self.rebalance,
        }

    def announce_ready(self) -> None:
        """Take the signals held back since the fork, stamp the heartbeat, and tell the master we accept."""
        # the master forked us with its signals blocked: now that their delivery is in place, take them
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        self.heartbeat()
        self.channel.send(Event.READY)

    def heartbeat(self) -> float:
        """Stamp the heartbeat the master watches (a stale one means a hung worker); returns the stamp."""
        now = time.monotonic()
        self.record.heartbeat = now
        if self.deadman and now >= self._deadman_due:
            self.push_deadman(now)
        logs.flush_held()  # what a client's flood held back, once its interval is over
        return now

    def push_deadman(self, now: float) -> None:
        """Push back the kernel's dead-man timer (``SIGALRM``, left at its default action: the end).

        The master ends a worker whose heartbeat stops (``--timeout``); this
        ends one whose master cannot, because it is gone and the worker's own
        Python code cannot run any more (a handler holding the interpreter
        for ever): the kernel delivers the signal, no Python code runs. A
        stopping worker gets its graceful timeout first. (A handler that uses
        ``signal.alarm`` of its own takes this timer over: its alarm, its handler.)
        """
        signal.setitimer(signal.ITIMER_REAL, self.deadman + (self.graceful_timeout if self.stopping else 0.0))
        self._deadman_due = now + self.heartbeat_interval

    def orphaned(self) -> bool:
        """True once the master is no longer our parent (it was killed, or exited without stopping us)."""
        return os.getppid() != self.master_pid

    def check_master(self) -> None:
        """Stop when orphaned: PR_SET_PDEATHSIG covers most cases, this the rest (a master thread exiting)."""
        if not self.stopping and self.orphaned():
            log.warning("master (pid %d) is gone; stopping", self.master_pid)
            self.begin_stop()

    def count_accepted(self) -> None:
        """One more connection taken; at ``--max-requests`` the worker retires.

        Counting accepted (not finished) connections means a worker never
        takes one more than its limit.
        """
        self.accepted += 1
        if self.max_requests and self.accepted >= self.max_requests:
            self.retire(f"max-requests ({self.max_requests}) reached")
        if self.memory_limit:
            self.look_at_memory(time.monotonic())

    def look_at_memory(self, now: float) -> None:
        """At most every MEMORY_LOOK seconds, as connections come: tell the master once when our own memory
        (USS) passed --max-worker-memory, so that it need not wait for its next periodic look (it decides)."""
        if now < self.next_memory_look:
            return
        self.next_memory_look = now + MEMORY_LOOK
        own = memory.read(os.getpid())  # our own smaps_rollup is readable even when we are not dumpable
        if own is not None and own.uss > self.memory_limit:
            self.channel.send(Event.GREW, str(own.uss))
            self.next_memory_look = float("inf")  # once: from now on the master's periodic look decides

    def mark_accepting(self, on: bool) -> None:
        """Say in the scoreboard whether this worker takes new connections (its siblings balance on it)."""
        self.record.accepting = ACCEPTING if on else STEPPED_BACK if self.stepped_back else NOT_ACCEPTING

    def sibling_has_room(self, busy_at: int | None = None) -> bool:
        """True when a sibling accepts (holding fewer than ``busy_at`` connections, when given): a full
        worker leaves the next connections to it instead of reclaiming one of its own."""
        return self.peers is not None and self.peers.sibling_has_room(busy_at)

    def holding(self) -> int:
        """Connections this worker holds, for ``--balance``: its handlers' (the scoreboard's ``active``).
        May be extended (connections still waiting for their first bytes count too)."""
        return int(self.record.active)

    def over_share(self) -> bool:
        """After taking a connection: True when this worker should step back, and it is now stepped back.

        The caller stops accepting. Never true for a stopping worker, nor
        with ``--balance off``.
        """
        if self.balance is None or self.stopping or self.stepped_back:
            return False
        if self.balance.steps_back(self.holding()):
            self.stepped_back = True
            self.record.accepting = STEPPED_BACK
        return self.stepped_back

    def still_over_share(self) -> bool:
        """While stepped back: True while this worker should stay back; once False, it may accept again."""
        if self.stepped_back and self.balance is not None and not self.stopping:
            self.stepped_back = self.balance.steps_back(self.holding())
        else:
            self.stepped_back = False
        if not self.stepped_back and self.record.accepting == STEPPED_BACK:
            self.record.accepting = NOT_ACCEPTING  # until the class accepts again (a full pool may hold it)
        return self.stepped_back

    def listener_gone(self, address: str, exc: OSError) -> None:
        """``accept()`` on ``address`` failed with one of LISTENER_GONE_ERRNOS: log once, retire.

        The caller has already stopped watching that descriptor. The master
        starts a replacement (its listening sockets are intact), and this
        worker finishes its open connections.
        """
        if self.listener_lost or self.listeners_closed:
            return  # closed on purpose (a stop, a drain): no handler to blame
        self.listener_lost = True
        log.error("worker %d (pid %d): listening socket %s is gone (%s: %s; did a handler close "
                  "self.server.socket?); retiring", self.slot, os.getpid(), address,
                  errno.errorcode.get(exc.errno or 0, exc.errno), exc.strerror)
        self.retire(f"its listening socket {address} is gone")

    def retire(self, reason: str) -> None:
        """Recycle this worker: tell the master (it starts a replacement at once), then stop."""
        if self.stopping:
            return
        self.channel.send(Event.RETIRING, reason)
        self.begin_stop()

    def begin_stop(self) -> None:
        """Stop accepting and tell the master; open connections finish until the graceful deadline."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.graceful_timeout
        if self.deadman:
            self.push_deadman(time.monotonic())  # a drain may hold a sync worker past its heartbeat
        self.stop_accepting()
        if self.orphaned():
            self.close_listeners()  # the master was killed: free the address so a new one can bind it now
        self.channel.send(Event.STOPPED)  # the master holds a reload's reply until no old worker accepts
        self.on_stopping()
        self._drain_began()

    def close_listeners(self) -> None:
        """SIGUSR2 (``preforkctl drain --close``, a stop): close our copies of the listening sockets.

        Once every process has, new connections are refused and a load
        balancer's connect check sees the instance down; open connections
        carry on.
        """
        if self.listeners_closed:
            return
        self.listeners_closed = True
        self.stop_accepting()
        self.forget_listeners()
        for sock in self.listeners:
            sock.close()
        self._drain_began()

    # -- PROXY protocol decisions -------------------------------------------------------------------

    def proxy_for(self, peer: Any) -> ProxyPolicy | None:
        """The policy when ``peer`` must start with a PROXY header; None when it sends none."""
        proxy = self.proxy
        return proxy if proxy is not None and proxy.applies(peer) else None

    def proxy_header_failed(self, peer: Any, why: object) -> None:
        """A missing or malformed header: counted and logged once; the caller closes the connection."""
        self.record.proxy_errors += 1
        self.proxy_failures_log.warning("connection from %s: %s; closing it", format_peer(peer), why)

    def closes_health_check(self, header: ProxyHeader) -> bool:
        """True when the connection is closed on its PROXY header alone, before any handler has it.

        A load balancer's health check (a ``LOCAL`` header) while the master
        drains us for it: closed at once, the check fails and the balancer
        takes the instance out of its pool (otherwise a health check is served
        like any connection). And a connection that came back through a relay
        loop, or through too many relays (:mod:`prefork.handlers.relay_loops`):
        counted as ``relay_loop``.
        """
        if header.command == "LOCAL":
            return bool(self.record.lb_drain)
        via = relay_loops.via_of(header.source)
        if not via or not relay_loops.looped(via, relay_loops.own_id()):
            return False
        self.closed_for(Reason.RELAY_LOOP)
        return True

    def closed_for(self, reason: Reason) -> None:
        """A connection closed for ``reason`` before any handler had it: counted, logged rate-limited (by the
        class's admission core)."""
        raise NotImplementedError


def _inodes(listeners: Sequence[socket.socket]) -> frozenset[int]:
    """The listening sockets' inodes: every descriptor of one of them (a duplicate too) has its inode."""
    inodes = set()
    for sock in listeners:
        with contextlib.suppress(OSError):
            inodes.add(os.fstat(sock.fileno()).st_ino)
    return frozenset(inodes)


def _close_listening(inodes: frozenset[int]) -> None:
    """In a process a handler forks: close every descriptor of the listening sockets.

    Otherwise a child that outlives its worker (one that called
    ``setsid()``, a daemon it started) keeps the port: the next start fails
    with "address already in use", and connections queue where nobody
    accepts them. Duplicates a worker class made (asyncio's servers) are
    found by their inode. Each is replaced by ``/dev/null`` rather than
    closed: the socket objects the child inherited still name those
    numbers, and must not close someone else's descriptor later.
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue  # the listing's own descriptor, gone
        if stat.S_ISSOCK(st.st_mode) and st.st_ino in inodes:
            with contextlib.suppress(OSError):
                os.dup2(null, fd, inheritable=False)
    os.close(null)
