"""The ``status`` and ``stats`` payloads (control socket, ``/metrics``), built from a typed snapshot.

The master takes a :class:`Snapshot` of itself (plain values, copied from
its records and the scoreboard); these functions only shape it, so they are
tested without a master.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefork import __version__
from prefork.master.state import Totals


@dataclass(frozen=True)
class WorkerSample:
    """One live worker: its master record and its scoreboard counters, as of the snapshot."""

    pid: int
    slot: int
    generation: int
    state: str
    requests: int
    active: int
    errors: int
    proxy_errors: int
    bytes_in: int
    bytes_out: int
    rss_bytes: int
    cpu_percent: float
    age_s: float
    heartbeat_age_s: float


@dataclass(frozen=True)
class BackoffSample:
    slot: int
    failures: int
    restart_in_s: float | None  # None: not scheduled


@dataclass(frozen=True)
class Snapshot:
    pid: int
    name: str
    generation: int
    uptime_s: float
    state: str  # starting, serving, reloading or stopping
    drain: str | None
    worker_class: str
    event_loop: str | None
    handler: str
    target_workers: int
    listeners: list[str]
    control: str
    workers: list[WorkerSample]  # by generation, slot, pid
    backoff: list[BackoffSample]
    totals: Totals


def open_by_generation(workers: list[WorkerSample]) -> dict[int, int]:
    """Connections open now in each generation."""
    totals: dict[int, int] = {}
    for w in workers:
        totals[w.generation] = totals.get(w.generation, 0) + max(w.active, 0)
    return totals


def share(w: WorkerSample, generation_open: int) -> float:
    """The worker's fraction of its generation's open connections (0 when the generation has none)."""
    return round(max(w.active, 0) / generation_open, 3) if generation_open > 0 else 0.0


def imbalance(actives: list[int]) -> float:
    """Max over mean of open connections per worker: 1.0 when even or idle, up to the number of workers."""
    total = sum(max(a, 0) for a in actives)
    if not actives or total == 0:
        return 1.0
    return round(max(actives) * len(actives) / total, 3)


def worker_info(w: WorkerSample, generation_open: int = 0) -> dict[str, Any]:
    return {
        "pid": w.pid, "slot": w.slot, "generation": w.generation, "state": w.state,
        "requests": w.requests, "active": w.active, "share": share(w, generation_open),
        "errors": w.errors, "proxy_errors": w.proxy_errors,
        "bytes_in": w.bytes_in, "bytes_out": w.bytes_out, "rss_bytes": w.rss_bytes,
        "cpu_percent": round(w.cpu_percent, 1), "age_s": round(w.age_s, 3),
        "heartbeat_age_s": round(max(0.0, w.heartbeat_age_s), 3),
    }


def status(snap: Snapshot) -> dict[str, Any]:
    by_generation = open_by_generation(snap.workers)
    return {
        "pid": snap.pid,
        "name": snap.name,
        "version": __version__,
        "generation": snap.generation,
        "uptime_s": round(snap.uptime_s, 3),
        "state": snap.state,
        "drain": snap.drain,
        "worker_class": snap.worker_class,
        "event_loop": snap.event_loop,
        "handler": snap.handler,
        "target_workers": snap.target_workers,
        "listeners": list(snap.listeners),
        "control": snap.control,
        "workers": [worker_info(w, by_generation.get(w.generation, 0)) for w in snap.workers],
        "backoff": [
            {"slot": b.slot, "failures": b.failures,
             "restart_in_s": round(max(0.0, b.restart_in_s), 3) if b.restart_in_s is not None else None}
            for b in snap.backoff
        ],
    }


def stats(snap: Snapshot) -> dict[str, Any]:
    totals = snap.totals
    live = snap.workers
    return {
        "pid": snap.pid,
        "name": snap.name,
        "generation": snap.generation,
        "uptime_s": round(snap.uptime_s, 3),
        "requests": totals.requests + sum(w.requests for w in live),
        "active": sum(w.active for w in live),
        # how unevenly the serving generation's workers hold connections: alert when well over 1
        "active_max_mean": imbalance([w.active for w in live if w.generation == snap.generation
                                      and w.state != "draining"]),
        "errors": totals.errors + sum(w.errors for w in live),
        "proxy_errors": totals.proxy_errors + sum(w.proxy_errors for w in live),
        "bytes_in": totals.bytes_in + sum(w.bytes_in for w in live),
        "bytes_out": totals.bytes_out + sum(w.bytes_out for w in live),
        "workers": len(live),
        "workers_spawned": totals.spawned,
        "worker_exits": totals.exits,
        "worker_crashes": totals.crashes,
        "worker_timeouts": totals.timeouts,
        "reloads": totals.reloads,
        "failed_reloads": totals.failed_reloads,
        "memory_recycles": totals.memory_recycles,
        "worker_respawns": totals.respawns,
        "master_errors": totals.master_errors,
        "log_lines_dropped": totals.log_lines_dropped,
        "per_worker": [
            {"pid": w.pid, "slot": w.slot, "generation": w.generation, "state": w.state,
             "requests": w.requests, "active": w.active, "errors": w.errors}
            for w in live
        ],
    }
