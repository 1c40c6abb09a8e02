"""The master's records and modes: plain data, so the modules that act on them hold only behaviour."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil

from prefork.kernelstats import oom_kills
from prefork.scoreboard import CLOSE_REASONS
from prefork.tls import FAILURE_REASONS

# a worker's TLS counters, by their scoreboard field: handshakes completed, by version, and failed, by reason
TLS_COUNTERS = ("tls_handshakes", "tls_v12", "tls_v13", *(f"tls_failed_{reason}" for reason in FAILURE_REASONS))


class WorkerState(enum.Enum):
    BOOTING = "booting"  # forked, loading the handler
    READY = "ready"  # accepting connections
    DRAINING = "draining"  # told to stop: finishing open connections
    KILLING = "killing"  # hung or out of time: SIGABRT/SIGKILL sent


class StopMode(enum.Enum):
    GRACEFUL = "graceful"  # SIGTERM, preforkctl stop: workers finish their connections
    FAST = "fast"  # SIGINT, SIGQUIT, preforkctl stop --fast: workers leave at once


class LbDrain(enum.Enum):
    """How the instance is leaving its load balancer's pool (``preforkctl drain``)."""

    HEALTH_CHECKS = "health-checks"  # behind PROXY protocol: LOCAL health checks are closed at once
    LISTENERS_CLOSED = "listeners-closed"  # every process closed its listening sockets


@dataclass
class Worker:
    """The master's record of one child."""

    pid: int
    slot: int
    generation: int
    record_index: int  # its record in the scoreboard
    started: float
    state: WorkerState = WorkerState.BOOTING
    boot_error: str | None = None
    stop_reason: str = ""
    proc: psutil.Process | None = None  # made on the first look at its memory or CPU
    signals_sent: dict[int, str] = field(default_factory=dict)  # a signal that ends a worker -> why we sent it
    oom_kills_at_start: int | None = field(default_factory=oom_kills)  # the kernel's count when it was forked

    def oom_kills_since_start(self) -> int | None:
        """Processes the kernel's OOM killer killed during this worker's life; None when unknown."""
        now = oom_kills()
        return None if now is None or self.oom_kills_at_start is None else now - self.oom_kills_at_start


@dataclass
class Backoff:
    """Early deaths in a row of the workers in one slot."""

    failures: int = 0


@dataclass
class Totals:
    """Counters of workers that are gone (live ones are read from the scoreboard), and of the master's work."""

    requests: int = 0
    errors: int = 0
    proxy_errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    spawned: int = 0
    exits: int = 0
    crashes: int = 0
    timeouts: int = 0
    reloads: int = 0
    failed_reloads: int = 0  # the new generation could not start (configuration, bind, boot, timeout)
    rolled_back_reloads: int = 0  # the new generation started but did worse than the old one (canary, probation)
    memory_recycles: int = 0
    respawns: int = 0  # replacements started for workers that exited unasked
    master_errors: int = 0  # exceptions that escaped a callback of the master's loop (logged, survived)
    log_lines_dropped: int = 0  # the master's log lines that could not be written (copied in at a snapshot)
    tls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TLS_COUNTERS, 0))  # by TLS_COUNTERS name
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))  # closed by workers

    def add_closed(self, counts: Mapping[str, int]) -> None:
        """Fold a gone worker's connections closed by reason (CLOSE_REASONS) into the totals."""
        for name in CLOSE_REASONS:
            self.closed[name] = self.closed.get(name, 0) + counts.get(name, 0)

    def add_tls(self, counts: Mapping[str, int]) -> None:
        """Fold a gone worker's TLS counters (by TLS_COUNTERS name) into the totals."""
        for name in TLS_COUNTERS:
            self.tls[name] = self.tls.get(name, 0) + counts.get(name, 0)


@dataclass
class ErrorBudget:
    """How many of the master's internal errors get a traceback in the log.

    The first ``per_window`` in each ``window`` seconds are logged in full;
    the rest are counted and reported in one line when the next window opens,
    so a callback failing on every turn cannot fill the disk.
    """

    per_window: int = 10
    window: float = 60.0
    started: float = -math.inf
    logged: int = 0
    left_out: int = 0

    def admit(self, now: float) -> tuple[bool, int]:
        """(log this error's traceback?, errors left out of the log in the window that just closed)."""
        closed = 0
        if now - self.started >= self.window:
            closed, self.left_out = self.left_out, 0
            self.started, self.logged = now, 0
        if self.logged < self.per_window:
            self.logged += 1
            return True, closed
        self.left_out += 1
        return False, closed
