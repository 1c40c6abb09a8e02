"""A reload's probation: the new generation on trial, and what a rollback to the old one needs.

With ``--reload-probation SECS``, a reload that committed is on trial for
SECS: the old generation's workers drain as usual, but its mold (the
process that imported its code, and forks its workers) is kept. If a
worker of the new generation ends unasked or hangs, or the new workers'
errors per connection pass the old generation's (:func:`judge_canary`'s
rule), the reload is rolled back: the old mold forks the old generation's
workers again, running its own code whatever is on disk, and the new ones
drain. The listening sockets stay open in the master meanwhile, so no
connection is refused. The cost of a probation is one process, the old
mold, for SECS: its own memory (the interpreter and the handler's import,
no connection); only the last reload's old generation is kept, and a
reload asked meanwhile waits for the probation to end.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

from prefork.config import Config
from prefork.master.pool import WorkerPool
from prefork.master.state import Worker
from prefork.master.verdicts import CanaryFigures, judge_canary
from prefork.tls import TlsSetup

PROBATION_CHECK = 0.25  # seconds between looks at the new generation's counters while on probation


@dataclass
class Probation:
    """A committed generation on trial, with the old generation's figures and what a rollback restores."""

    generation: int
    old_generation: int
    old_config: Config
    old_tls: TlsSetup | None
    began: float
    ends: float
    old_connections: int  # the old generation's connections and errors, over its workers' lives
    old_errors: int
    waiters: list[Any] = field(default_factory=list)  # answered when the probation ends
    message: dict[str, Any] = field(default_factory=dict)  # the reply they get if it passes
    accepting: set[int] = field(default_factory=set)  # old workers whose stop the reply also waits for
    base: dict[int, tuple[int, int]] = field(default_factory=dict)  # new worker pid -> counts when it began
    exits: int = 0
    exit_how: str = ""
    hung: int = 0

    @classmethod
    def start(cls, pool: WorkerPool, seconds: float, generation: int, new: dict[int, Worker],
              old: dict[int, Worker], old_config: Config, old_tls: TlsSetup | None) -> Probation:
        now = time.monotonic()
        old_connections = sum(int(pool.record(w).requests) for w in old.values())
        old_errors = sum(int(pool.record(w).errors) for w in old.values())
        probation = cls(generation=generation, old_generation=next(iter(old.values())).generation,
                        old_config=old_config, old_tls=old_tls, began=now, ends=now + seconds,
                        old_connections=old_connections, old_errors=old_errors)
        probation.base = {w.pid: counts(pool, w) for w in new.values()}
        return probation

    def on_exit(self, worker: Worker, how: str) -> str | None:
        """A worker is gone: why to roll back, when it was one of the new generation's and went unasked."""
        if worker.generation != self.generation or worker.stop_reason:  # told to go (recycled, scaled down)
            return None
        self.exits += 1
        self.exit_how = f"(pid {worker.pid}) {how}"
        self.hung += int(signal.SIGABRT in worker.signals_sent)
        return self.judge_now(pool=None)

    def figures(self, pool: WorkerPool | None) -> CanaryFigures:
        connections = errors = 0
        error_type = ""
        for worker in pool.workers.values() if pool is not None else ():
            if worker.generation != self.generation:
                continue
            requests, errs = counts(pool, worker) if pool is not None else (0, 0)
            base = self.base.get(worker.pid, (0, 0))
            errors += errs - base[1]
            connections += max(requests - base[0], errs - base[1])
            if errs > base[1] and pool is not None:
                error_type = pool.record(worker).error_type.decode("ascii", "replace")
        return CanaryFigures(seconds=min(time.monotonic(), self.ends) - self.began, connections=connections,
                             errors=errors, error_type=error_type, exits=self.exits, exit_how=self.exit_how,
                             hung=self.hung, old_connections=self.old_connections, old_errors=self.old_errors)

    def judge_now(self, pool: WorkerPool | None) -> str | None:
        """Why to roll back now (None: the new generation does no worse so far)."""
        return judge_canary(self.figures(pool), "probation", f"a worker of generation {self.generation}")

    def progress(self, pool: WorkerPool) -> dict[str, Any]:
        return {"generation": self.generation, "phase": "probation", "old_generation": self.old_generation,
                "probation": {"window_s": round(self.ends - self.began, 3),
                              "remaining_s": round(max(0.0, self.ends - time.monotonic()), 3),
                              **self.figures(pool).as_dict()}}


def counts(pool: WorkerPool, worker: Worker) -> tuple[int, int]:
    """A worker's (connections, errors) so far."""
    record = pool.record(worker)
    return int(record.requests), int(record.errors)
