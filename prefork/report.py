"""What the master reports: the ``status`` and ``stats`` payloads (control socket, metrics)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import psutil

from prefork import __version__

if TYPE_CHECKING:
    from prefork.master import Master
    from prefork.records import Worker


def worker_info(master: Master, worker: Worker, now: float) -> dict[str, Any]:
    record = master.scoreboard[worker.record]
    rss = 0
    cpu = 0.0
    try:
        if worker.proc is None:
            worker.proc = psutil.Process(worker.pid)
            times = worker.proc.cpu_times()
            age = max(now - worker.started, 1e-3)
            cpu = 100.0 * (times.user + times.system) / age  # lifetime average on the first look
            worker.proc.cpu_percent(None)
        else:
            cpu = worker.proc.cpu_percent(None)  # since the previous look
        rss = worker.proc.memory_info().rss
    except psutil.Error:
        pass
    return {
        "pid": worker.pid,
        "slot": worker.slot,
        "generation": worker.generation,
        "state": worker.state.value,
        "requests": int(record.requests),
        "active": int(record.active),
        "errors": int(record.errors),
        "proxy_errors": int(record.proxy_errors),
        "bytes_in": int(record.bytes_in),
        "bytes_out": int(record.bytes_out),
        "rss_bytes": rss,
        "cpu_percent": round(cpu, 1),
        "age_s": round(now - worker.started, 3),
        "heartbeat_age_s": round(max(0.0, now - record.heartbeat), 3),
    }

def status(master: Master) -> dict[str, Any]:
    now = time.monotonic()
    workers = sorted(master.workers.values(), key=lambda w: (w.generation, w.slot, w.pid))
    backoff = [
        {"slot": slot, "failures": b.failures,
         "restart_in_s": round(max(0.0, b.respawn_at - now), 3) if b.respawn_at is not None else None}
        for slot, b in sorted(master.backoff.items()) if b.failures > 1 or b.respawn_at is not None
    ]
    return {
        "pid": master.pid,
        "name": master.config.name,
        "version": __version__,
        "generation": master.generation,
        "uptime_s": round(now - master.started, 3),
        "state": "stopping" if master.stopping else ("reloading" if master.reload else
                                                    ("serving" if master.serving else "starting")),
        "drain": master.lb_drain,
        "worker_class": master.config.worker_class,
        "event_loop": master.config.event_loop,
        "handler": master.config.effective_handler,
        "target_workers": master.target,
        "listeners": [li.address for li in master.listeners],
        "control": master.control.path,
        "workers": [worker_info(master, w, now) for w in workers],
        "backoff": backoff,
    }

def stats(master: Master) -> dict[str, Any]:
    now = time.monotonic()
    totals = master.totals
    live = [master.scoreboard[w.record] for w in master.workers.values()]
    return {
        "pid": master.pid,
        "name": master.config.name,
        "generation": master.generation,
        "uptime_s": round(now - master.started, 3),
        "requests": totals.requests + sum(int(r.requests) for r in live),
        "active": sum(int(r.active) for r in live),
        "errors": totals.errors + sum(int(r.errors) for r in live),
        "proxy_errors": totals.proxy_errors + sum(int(r.proxy_errors) for r in live),
        "bytes_in": totals.bytes_in + sum(int(r.bytes_in) for r in live),
        "bytes_out": totals.bytes_out + sum(int(r.bytes_out) for r in live),
        "workers": len(master.workers),
        "workers_spawned": totals.spawned,
        "worker_exits": totals.exits,
        "worker_crashes": totals.crashes,
        "worker_timeouts": totals.timeouts,
        "reloads": totals.reloads,
        "failed_reloads": totals.failed_reloads,
        "memory_recycles": totals.memory_recycles,
        "worker_respawns": totals.respawns,
        "per_worker": [
            {"pid": w.pid, "slot": w.slot, "generation": w.generation, "state": w.state.value,
             "requests": int(master.scoreboard[w.record].requests),
             "active": int(master.scoreboard[w.record].active),
             "errors": int(master.scoreboard[w.record].errors)}
            for w in sorted(master.workers.values(), key=lambda w: (w.generation, w.slot, w.pid))
        ],
    }
