"""The worker table: every live child by pid, how it is forked, told to drain, killed, watched and reaped.

The pool owns what is per worker: its scoreboard record, its deadlines (a
heartbeat that must stay fresh while it serves, a kill due when a drain or an
abort runs out of time) and the counters of workers that are gone. What a
worker's exit *means* for the daemon (respawn, abort a reload, stop) is the
master's decision (:mod:`prefork.master.exits`); the pool only reports exits.

Each worker leads a process group of its own, so whatever its handler starts
(a forked child, a subprocess) is in that group: when the worker ends, however
it ends, the group gets SIGTERM, then SIGKILL :data:`GROUP_GRACE` later, and
the master exits only once that is done. Nothing a handler started outlives
its worker and holds the port. The master signals the worker alone otherwise
(a drain must not disturb what a handler runs); a worker whose master died
ends its group itself (:mod:`prefork.workers.entry`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Collection, Iterable

import psutil

from prefork import memory
from prefork.config import Config
from prefork.master.handover import HandedWorker, Handover
from prefork.master.report import WorkerSample, closed_counts, oldest_handler, oldest_silent, tls_counts
from prefork.master.state import Totals, Worker, WorkerState
from prefork.master.timers import Timers
from prefork.memory import Memory
from prefork.scoreboard import Record, Scoreboard
from prefork.tls import TlsSetup
from prefork.workers.entry import WorkerSpec, run_worker

log = logging.getLogger(__name__)

MoldFork = Callable[[int, int, int], int]  # (slot, record index, max_requests) -> the pid a mold forked

ABORT_GRACE = 2.0  # after SIGABRT (stacks to the log), SIGKILL this much later
DRAIN_MARGIN = 1.0  # the worker enforces the graceful timeout itself; the master kills this much later
FAST_STOP_GRACE = 5.0
GROUP_GRACE = 0.5  # what a worker left in its process group gets SIGTERM, then SIGKILL this much later
# a full pool, a reload's second one, and workers still draining: about 4.3 KB each, most of it the per-source
# counts (18 MB of memory file in all, paged in only as records are used)
SCOREBOARD_CAPACITY = 4096


def _lead_own_group(pid: int) -> None:
    """Make ``pid`` (0: this process) the leader of a new process group."""
    with contextlib.suppress(OSError):  # ESRCH, EACCES: the child is gone or already on its way
        os.setpgid(pid, 0)


def kill_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone: its SIGCHLD is on the way
        os.kill(pid, sig)


class WorkerPool:
    """Live children by pid, with their records and deadlines.

    ``close_in_child`` runs in each new child before it becomes a worker, to
    close the master's own descriptors except those in the set it is given
    (the worker's listeners). ``blocked`` are the signals the master handles:
    they stay blocked across ``fork`` so none sent to a new worker before it
    installed its own handlers is lost.
    """

    def __init__(self, *, master_pid: int, channel_fd: int, timers: Timers, timeout: float,
                 close_in_child: Callable[[set[int]], None], blocked: Iterable[int]) -> None:
        self.master_pid = master_pid
        self.channel_fd = channel_fd
        self.timers = timers
        self.timeout = timeout  # seconds a heartbeat may age before the worker counts as hung
        self.close_in_child = close_in_child
        self.blocked = set(blocked)
        self.scoreboard = Scoreboard(capacity=SCOREBOARD_CAPACITY)
        self.workers: dict[int, Worker] = {}
        self.peak = 0  # the most workers alive at once since the last mark_peak()
        self.groups: set[int] = set()  # process groups of gone workers, with members, due for SIGKILL
        self.totals = Totals()

    def mark_peak(self) -> None:
        """Start counting the peak number of live workers from now (a reload reports it)."""
        self.peak = len(self.workers)

    def record(self, worker: Worker) -> Record:
        return self.scoreboard[worker.record_index]

    # -- starting ---------------------------------------------------------------------------------

    def fork(self, slot: int, generation: int, config: Config, listeners: Collection[socket.socket], *,
             max_requests: int, lb_drain: bool, tls: TlsSetup | None = None,
             listener_specs: tuple[str, ...] = (), mold: MoldFork | None = None) -> Worker:
        """Fork a worker (here, or by ``mold``, given the slot, record and max_requests: the new pid).

        Raises OSError (no process) or IndexError (no free scoreboard record).
        """
        now = time.monotonic()
        self.scoreboard.upstreams.assign(config.relay_specs)  # the relay's upstreams, by name, for every worker
        index = self.scoreboard.allocate(0, generation, now)
        self.scoreboard[index].lb_drain = 1 if lb_drain else 0  # before the worker can look
        try:
            pid = mold(slot, index, max_requests) if mold is not None else self._fork_here(
                WorkerSpec(slot=slot, generation=generation, record_index=index, master_pid=self.master_pid,
                           config=config, listeners=tuple(listeners), channel_fd=self.channel_fd,
                           max_requests=max_requests, tls=tls, listener_specs=listener_specs))
        except OSError:
            self.scoreboard.release(index)
            raise
        self.scoreboard[index].pid = pid
        worker = Worker(pid=pid, slot=slot, generation=generation, record_index=index, started=now)
        self.workers[pid] = worker
        self.peak = max(self.peak, len(self.workers))
        self.totals.spawned += 1
        self._watch_heartbeat(worker, now + self.timeout)
        log.info("worker %d (pid %d) started, generation %d", slot, pid, generation)
        return worker

    def _fork_here(self, spec: WorkerSpec) -> int:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.blocked)
        try:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                _lead_own_group(0)
                self.close_in_child({sock.fileno() for sock in spec.listeners})
                run_worker(spec, self.scoreboard)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        _lead_own_group(pid)  # both sides, so no killpg of ours can come before the group exists
        return pid

    def take_over(self, state: Handover) -> None:
        """A previous image of this master handed over (an upgrade in place): its scoreboard and counters."""
        self.scoreboard = Scoreboard(state.scoreboard_capacity, fd=state.scoreboard_fd,
                                     taken=[w.record_index for w in state.workers])
        known = {f.name for f in dataclasses.fields(Totals)}
        self.totals = Totals(**{k: v for k, v in state.totals.items() if k in known})

    def adopt(self, handed: Iterable[HandedWorker], graceful_timeout: float) -> list[Worker]:
        """The workers a previous image of this master handed over (an upgrade in place), watched again."""
        now = time.monotonic()
        adopted = []
        for h in handed:
            worker = Worker(pid=h.pid, slot=h.slot, generation=h.generation, record_index=h.record_index,
                            started=h.started, state=WorkerState(h.state), stop_reason=h.stop_reason)
            self.workers[worker.pid] = worker
            if worker.state in (WorkerState.DRAINING, WorkerState.KILLING):
                self._kill_at(worker, now + graceful_timeout + DRAIN_MARGIN,
                              f"still busy {graceful_timeout:g}s after it was told to stop (--graceful-timeout)")
            else:
                self._watch_heartbeat(worker, now + self.timeout)
            adopted.append(worker)
        self.peak = max(self.peak, len(self.workers))
        return adopted

    # -- telling workers to go --------------------------------------------------------------------

    def drain(self, worker: Worker, reason: str, graceful_timeout: float) -> None:
        """Stop accepting and finish open connections (SIGTERM); SIGKILL once the graceful timeout passed."""
        if worker.state in (WorkerState.DRAINING, WorkerState.KILLING):
            return
        worker.state = WorkerState.DRAINING
        worker.stop_reason = reason
        if worker.pid not in self.workers:
            return  # already reaped (its last words are read after its exit): nothing to signal
        self._kill_at(worker, time.monotonic() + graceful_timeout + DRAIN_MARGIN,
                      f"still busy {graceful_timeout:g}s after it was told to stop (--graceful-timeout)")
        kill_pid(worker.pid, signal.SIGTERM)

    def quit(self, worker: Worker) -> None:
        """Leave at once (SIGQUIT), SIGKILL if still there after FAST_STOP_GRACE."""
        worker.state = WorkerState.KILLING
        if worker.pid not in self.workers:
            return  # already reaped
        self._kill_at(worker, time.monotonic() + FAST_STOP_GRACE, f"still there {FAST_STOP_GRACE:g}s after SIGQUIT")
        kill_pid(worker.pid, signal.SIGQUIT)

    def signal_all(self, sig: signal.Signals) -> None:
        for worker in self.workers.values():
            kill_pid(worker.pid, sig)

    def set_lb_drain(self, on: bool) -> None:
        """Every live worker fails (or again answers) load-balancer health checks."""
        for worker in self.workers.values():
            self.record(worker).lb_drain = 1 if on else 0

    def _kill_at(self, worker: Worker, when: float, why: str) -> None:
        self.timers.cancel(("heartbeat", worker.pid))  # no longer expected to serve
        self.timers.set(("kill", worker.pid), when, lambda: self._kill_now(worker, why))

    def _kill_now(self, worker: Worker, why: str) -> None:
        if worker.state is WorkerState.DRAINING:
            log.warning("worker %d (pid %d) still busy after the graceful timeout; killing it",
                        worker.slot, worker.pid)
        worker.state = WorkerState.KILLING
        worker.signals_sent[signal.SIGKILL] = why
        kill_pid(worker.pid, signal.SIGKILL)

    # -- heartbeats -------------------------------------------------------------------------------

    def _watch_heartbeat(self, worker: Worker, when: float) -> None:
        self.timers.set(("heartbeat", worker.pid), when, lambda: self._check_heartbeat(worker))

    def _check_heartbeat(self, worker: Worker) -> None:
        now = time.monotonic()
        beat = self.record(worker).heartbeat
        age = now - beat
        if age <= self.timeout:
            self._watch_heartbeat(worker, beat + self.timeout + 1e-3)
            return
        self.totals.timeouts += 1
        log.error("worker %d (pid %d) timed out: no heartbeat for %.1fs; "
                  "dumping its stacks (SIGABRT), then killing it", worker.slot, worker.pid, age)
        worker.signals_sent[signal.SIGABRT] = f"no heartbeat for {age:.1f}s, over --timeout; its stacks are in the log"
        kill_pid(worker.pid, signal.SIGABRT)
        worker.state = WorkerState.KILLING
        self._kill_at(worker, now + ABORT_GRACE, f"no heartbeat for {age:.1f}s, and SIGABRT did not end it")

    def stale(self, now: float) -> list[Worker]:
        """Workers expected to serve whose heartbeat is older than the timeout."""
        return [w for w in self.workers.values() if w.state in (WorkerState.BOOTING, WorkerState.READY)
                and now - self.record(w).heartbeat > self.timeout]

    # -- reaping ----------------------------------------------------------------------------------

    def reap(self) -> list[tuple[int, int, Worker | None]]:
        """Every child that exited: (pid, wait status, its worker or None for a child that is not one)."""
        exited: list[tuple[int, int, Worker | None]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._forget(worker)
                self._end_group(worker)
            exited.append((pid, status, worker))
        return exited

    # -- what a worker leaves behind ----------------------------------------------------------------

    def _end_group(self, worker: Worker) -> None:
        """SIGTERM to what the gone worker left in its process group; SIGKILL after GROUP_GRACE."""
        pgid = worker.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return  # the usual case: nothing of it is left
        log.warning("worker %d (pid %d) left processes behind in its process group: SIGTERM now, "
                    "SIGKILL in %.1fs", worker.slot, pgid, GROUP_GRACE)
        self.groups.add(pgid)
        self.timers.set(("group", pgid), time.monotonic() + GROUP_GRACE, lambda: self._kill_group(pgid))

    def _kill_group(self, pgid: int) -> None:
        self.groups.discard(pgid)
        self.timers.cancel(("group", pgid))
        if pgid in self.workers:
            return  # the group emptied and its number went to a new worker of ours: not its to end
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def end_groups_now(self) -> None:
        """The master exits: no grace left for what gone workers left behind."""
        for pgid in list(self.groups):
            self._kill_group(pgid)

    def _forget(self, worker: Worker) -> None:
        """Fold a gone worker's counters into the totals and free its record and deadlines."""
        record = self.record(worker)
        totals = self.totals
        totals.requests += record.requests
        totals.errors += record.errors
        totals.proxy_errors += record.proxy_errors
        totals.bytes_in += record.bytes_in
        totals.bytes_out += record.bytes_out
        totals.add_tls(tls_counts(record))
        totals.add_closed(closed_counts(record))
        totals.exits += 1
        self.scoreboard.release(worker.record_index)
        self.timers.cancel(("heartbeat", worker.pid))
        self.timers.cancel(("kill", worker.pid))

    # -- looking at workers -----------------------------------------------------------------------

    def rss(self, worker: Worker) -> int | None:
        try:
            if worker.proc is None:
                worker.proc = psutil.Process(worker.pid)
            rss: int = worker.proc.memory_info().rss
        except psutil.Error:
            return None
        return rss

    def cpu_percent(self, worker: Worker, now: float) -> float:
        """CPU use since the previous look (the lifetime average on the first look)."""
        try:
            if worker.proc is None:
                worker.proc = psutil.Process(worker.pid)
                times = worker.proc.cpu_times()
                worker.proc.cpu_percent(None)
                return 100.0 * (times.user + times.system) / max(now - worker.started, 1e-3)
            return float(worker.proc.cpu_percent(None))
        except psutil.Error:
            return 0.0

    def own_memory(self, worker: Worker) -> tuple[int, Memory | None]:
        """(the bytes --max-worker-memory compares, its USS/PSS/RSS): the USS, or the RSS when the kernel hides
        the worker's smaps_rollup (see prefork.memory); (0, None) when it is gone."""
        found = memory.read(worker.pid)
        return (found.uss, found) if found is not None else (self.rss(worker) or 0, None)

    def sample(self, worker: Worker, now: float, *, processes: bool) -> WorkerSample:
        """The worker's counters as of now; ``processes`` adds its memory and CPU."""
        record = self.record(worker)
        cpu = self.cpu_percent(worker, now) if processes else 0.0
        own = memory.read(worker.pid) if processes else None
        rss = own.rss if own is not None else (self.rss(worker) or 0) if processes else 0
        return WorkerSample(
            pid=worker.pid, slot=worker.slot, generation=worker.generation, state=worker.state.value,
            requests=int(record.requests), active=int(record.active), errors=int(record.errors),
            proxy_errors=int(record.proxy_errors), bytes_in=int(record.bytes_in), bytes_out=int(record.bytes_out),
            rss_bytes=rss, uss_bytes=own.uss if own else None, pss_bytes=own.pss if own else None,
            cpu_percent=cpu, age_s=now - worker.started, heartbeat_age_s=now - record.heartbeat,
            tls=tls_counts(record), closed=closed_counts(record), oldest_silent_s=oldest_silent(record, now),
            oldest_handler_s=oldest_handler(record, now), stuck_handlers=int(record.stuck_handlers))
