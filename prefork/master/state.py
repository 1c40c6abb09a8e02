"""The master's records and modes: plain data, so the modules that act on them hold only behaviour."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import psutil


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
    failed_reloads: int = 0
    memory_recycles: int = 0
    respawns: int = 0  # replacements started for workers that exited unasked
