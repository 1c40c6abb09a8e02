"""The master's periodic duties: the systemd watchdog and ``--max-worker-memory``."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Protocol

from prefork import logs
from prefork.config import Config
from prefork.master.generations import Generations
from prefork.master.pool import WorkerPool
from prefork.master.report import DRAINING_STATES, Snapshot, drain_progress
from prefork.master.state import StopMode, WorkerState
from prefork.master.timers import Timers
from prefork.memory import Memory
from prefork.systemd import Notifier

log = logging.getLogger(__name__)

MEMORY_CHECK_INTERVAL = 1.0  # seconds between --max-worker-memory checks (jittered): one smaps_rollup read each
RECYCLE_SHARE = 4  # at most one worker in this many replaced for memory at a time
DRAIN_PROGRESS = 5.0  # seconds between the log lines that say what draining workers still hold


class Host(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def stopping(self) -> StopMode | None: ...

    def status_line(self) -> str: ...

    def snapshot(self, *, processes: bool = True) -> Snapshot: ...


class PeriodicChecks:
    def __init__(self, host: Host, gens: Generations, pool: WorkerPool, timers: Timers, notifier: Notifier) -> None:
        self.host = host
        self.gens = gens
        self.pool = pool
        self.timers = timers
        self.notifier = notifier

    def start(self) -> None:
        try:
            watchdog_every = self.notifier.watchdog_interval()
        except ValueError as exc:
            log.warning("ignoring the systemd watchdog: %s", exc)
            watchdog_every = None
        if watchdog_every is not None:
            self.timers.every("watchdog", watchdog_every, self.ping_watchdog, first=0.0)
        self.timers.every("held log lines", logs.RATE_LIMIT_INTERVAL, logs.flush_held)
        self.gens.on_grown = self.recycle_fattest  # a worker that saw itself pass the limit: look now
        self.watch_memory()
        self.timers.every("drain-progress", DRAIN_PROGRESS, self.drain_progress)

    def drain_progress(self) -> None:
        """While workers drain (a stop, a reload's old generation, scaling down): say what they still hold."""
        if any(w.state.value in DRAINING_STATES for w in self.pool.workers.values()):
            for line in drain_progress(self.host.snapshot(processes=False)):
                log.info("%s", line)

    def watch_memory(self) -> None:
        """Check --max-worker-memory periodically, when set (also after a reload turned it on)."""
        if self.host.config.max_worker_memory and "memory" not in self.timers:
            # jittered; how many are replaced at once is memory_recycles' decision
            self.timers.every("memory", MEMORY_CHECK_INTERVAL, self.recycle_fattest, jitter=0.2)

    def ping_watchdog(self) -> None:
        """WATCHDOG=1, but only while this loop turns and no worker's heartbeat is stale."""
        stale = self.pool.stale(time.monotonic())
        if stale:
            log.warning("not pinging the systemd watchdog: %d worker(s) with a stale heartbeat", len(stale))
            return
        self.notifier.watchdog()
        self.notifier.status(self.host.status_line())

    def recycle_fattest(self) -> None:
        """Replace the workers whose own memory (USS) is over --max-worker-memory, largest first.

        Each stops accepting at once (it drains) and its successor starts now; as
        many at once as keep three quarters of the pool serving (one at least).
        """
        config = self.host.config
        if not config.max_worker_memory:
            return  # a reload turned it off
        if self.host.stopping is not None or self.gens.reloads.in_flight is not None:
            return
        sizes: dict[int, tuple[int, Memory | None]] = {}
        for w in self.gens.slots.values():
            if w.state is WorkerState.READY:
                sizes[w.pid] = self.pool.own_memory(w)
        not_serving = sum(1 for w in self.gens.slots.values() if w.state is not WorkerState.READY)
        chosen = memory_recycles({pid: size for pid, (size, _) in sizes.items()},
                                 config.max_worker_memory * 2**20, not_serving, self.gens.target)
        workers = {w.pid: w for w in self.gens.slots.values()}
        for pid in chosen:
            worker, (size, own) = workers[pid], sizes[pid]
            self.pool.totals.memory_recycles += 1
            measure = "its own memory (USS)" if own is not None else "RSS (its smaps_rollup is hidden)"
            log.warning("worker %d (pid %d): %s is %.0f MiB, over --max-worker-memory %d MiB; replacing it",
                        worker.slot, worker.pid, measure, size / 2**20, config.max_worker_memory)
            self.gens.replace(worker, "over the memory limit")


def memory_recycles(sizes: Mapping[int, int], limit: int, not_serving: int, target: int) -> list[int]:
    """Which of the serving workers (pid: bytes of their own memory) to replace now, largest first.

    Those over ``limit``, as many as leave at most a quarter of ``target`` not
    serving (one at least), counting the ``not_serving`` slots (successors
    still starting): a leak in every worker cannot take the pool's capacity
    down with it.
    """
    budget = max(1, target // RECYCLE_SHARE) - not_serving
    over = sorted(((size, pid) for pid, size in sizes.items() if size > limit), reverse=True)
    return [pid for _, pid in over[:max(0, budget)]]
