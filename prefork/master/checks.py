"""The master's periodic duties: the systemd watchdog and ``--max-worker-memory``."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from prefork.config import Config
from prefork.master.generations import Generations
from prefork.master.pool import WorkerPool
from prefork.master.report import DRAINING_STATES, Snapshot, drain_progress
from prefork.master.state import StopMode, WorkerState
from prefork.master.timers import Timers
from prefork.systemd import Notifier

log = logging.getLogger(__name__)

MEMORY_CHECK_INTERVAL = 5.0  # seconds between --max-worker-memory checks (jittered)
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
            # jittered, and one worker per check: replacements do not all start at once
            self.timers.every("memory", MEMORY_CHECK_INTERVAL, self.recycle_fattest, jitter=0.5)

    def ping_watchdog(self) -> None:
        """WATCHDOG=1, but only while this loop turns and no worker's heartbeat is stale."""
        stale = self.pool.stale(time.monotonic())
        if stale:
            log.warning("not pinging the systemd watchdog: %d worker(s) with a stale heartbeat", len(stale))
            return
        self.notifier.watchdog()
        self.notifier.status(self.host.status_line())

    def recycle_fattest(self) -> None:
        """Replace the current worker with the largest RSS over --max-worker-memory, gracefully (it drains)."""
        config = self.host.config
        if not config.max_worker_memory:
            return  # a reload turned it off
        limit = config.max_worker_memory * 1024 * 1024
        over = [(rss, w) for w in self.gens.slots.values() if w.state is WorkerState.READY
                and (rss := self.pool.rss(w) or 0) > limit]
        if not over or self.host.stopping is not None or self.gens.reloads.in_flight is not None:
            return
        rss, worker = max(over, key=lambda item: item[0])
        self.pool.totals.memory_recycles += 1
        log.warning("worker %d (pid %d) uses %.0f MiB, over --max-worker-memory %d MiB; replacing it",
                    worker.slot, worker.pid, rss / 2**20, config.max_worker_memory)
        self.gens.replace(worker, "over the memory limit")
