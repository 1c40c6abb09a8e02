"""The master's records: workers, generations being started, upgrades, counters, and how exits read.

Plain data and pure functions, so the master's loop (master.py) holds only behaviour.
"""

from __future__ import annotations

import enum
import os
import signal
from dataclasses import dataclass, field

import psutil

from prefork.config import Config
from prefork.control import ControlConnection
from prefork.listeners import Listener
from prefork.worker import WORKER_BOOT_ERROR

EARLY_DEATH = 10.0  # a worker that dies younger than this counts towards backoff
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0


class WorkerState(enum.Enum):
    BOOTING = "booting"  # forked, loading the handler
    READY = "ready"  # accepting connections
    DRAINING = "draining"  # told to stop: finishing open connections
    KILLING = "killing"  # hung or out of time: SIGABRT/SIGKILL sent


@dataclass
class Worker:
    """The master's record of one child."""

    pid: int
    slot: int
    generation: int
    record: int
    started: float
    state: WorkerState = WorkerState.BOOTING
    kill_at: float | None = None  # when SIGKILL is due (draining or killing)
    boot_error: str | None = None
    stop_reason: str = ""
    proc: psutil.Process | None = None


@dataclass
class Backoff:
    failures: int = 0
    respawn_at: float | None = None


@dataclass
class Reload:
    """A generation being started; the current one keeps serving until it is READY."""

    generation: int
    config: Config
    listeners: list[Listener]
    new_listeners: list[Listener]  # bound for this reload: closed if it fails
    deadline: float
    slots: dict[int, Worker] = field(default_factory=dict)
    waiters: list[ControlConnection] = field(default_factory=list)


@dataclass
class Upgrade:
    """A new master program starting on our sockets; we keep serving until it says ready."""

    pid: int
    pipe_fd: int
    deadline: float
    waiters: list[ControlConnection] = field(default_factory=list)
    buffer: bytes = b""


@dataclass
class Totals:
    """Counters of workers that are gone (live ones are read from the scoreboard)."""

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
    failed_reloads: int = 0
    memory_recycles: int = 0
    respawns: int = 0  # replacements started for workers that exited unasked


def describe_exit(status: int) -> tuple[str, bool]:
    """('exited with status 3', clean?) from a waitpid status, by meaning."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGKILL:
            return "was killed by SIGKILL (out of memory?)", False
        return f"was killed by {name}", False
    code = os.waitstatus_to_exitcode(status)
    if code == WORKER_BOOT_ERROR:
        return "could not load its handler", False
    return f"exited with status {code}", code == 0


def backoff_delay(failures: int) -> float:
    """0 for the first death, then 0.1 s doubling per early death, capped at BACKOFF_MAX."""
    if failures <= 1:
        return 0.0
    return float(min(BACKOFF_FIRST * 2.0 ** min(failures - 2, 64), BACKOFF_MAX))
