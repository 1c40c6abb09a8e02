"""The ``status`` and ``stats`` payloads (control socket, ``/metrics``), built from a typed snapshot.

The master takes a :class:`Snapshot` of itself (plain values, copied from
its records and the scoreboard); these functions only shape it, so they are
tested without a master.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefork import __version__
from prefork.config import Config
from prefork.listeners import Listener
from prefork.master.state import TLS_COUNTERS, Totals
from prefork.scoreboard import CLOSE_REASONS
from prefork.tls import FAILURE_REASONS, VERSIONS, CertInfo, TlsSetup


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
    tls: Mapping[str, int] = field(default_factory=dict)  # its TLS counters, by TLS_COUNTERS name
    uss_bytes: int | None = None  # its own memory (prefork.memory); None: unknown (not looked, or hidden)
    pss_bytes: int | None = None
    closed: Mapping[str, int] = field(default_factory=dict)  # connections it closed itself, by CLOSE_REASONS
    oldest_silent_s: float = 0.0  # how long its silent-longest connection has received nothing
    oldest_handler_s: float = 0.0  # how long a handler has held its oldest connection (--handler-timeout)
    stuck_handlers: int = 0  # handlers that did not return after --handler-timeout closed their connection


@dataclass(frozen=True)
class BackoffSample:
    slot: int
    failures: int
    restart_in_s: float | None  # None: not scheduled


@dataclass(frozen=True)
class ListenerTls:
    """A listener that speaks TLS: the certificates it serves and what it asks of clients."""

    address: str
    certs: tuple[CertInfo, ...]  # the default one first, then one per SNI name
    cert_reqs: str  # none, optional or required: client certificates
    min_version: str  # "1.2" or "1.3"
    alpn: tuple[str, ...]
    handshake_timeout: float


@dataclass(frozen=True)
class RelayTls:
    """How the relay speaks TLS to its upstreams (--relay-tls)."""

    upstreams: tuple[str, ...]
    server_name: str | None  # --relay-sni; None: each upstream's host
    ca_certs: str | None  # None: the system's CAs
    certfile: str | None  # the client certificate it presents, if any
    certificate: CertInfo | None = None  # what is in it (subject, expiry)


@dataclass(frozen=True)
class TlsView:
    """The serving generation's TLS: each TLS listener (plain ones are left out) and the relay's."""

    listeners: tuple[ListenerTls, ...] = ()
    relay: RelayTls | None = None


def tls_view(setup: TlsSetup, listeners: Iterable[Listener], config: Config) -> TlsView:
    """What ``status`` shows of a generation's TLS (``setup``, built from ``config``) on ``listeners``."""
    found = []
    for listener in listeners:
        server = setup.for_listener(listener.spec)
        if server is not None:
            found.append(ListenerTls(listener.address, server.certs, server.options.cert_reqs,
                                     server.options.tls_min_version, tuple(server.options.alpn),
                                     server.handshake_timeout))
    relay = None
    if config.relay_tls:
        relay = RelayTls(tuple(config.relay), config.relay_sni, config.relay_ca_certs, config.relay_certfile,
                         setup.relay_certificate)
    return TlsView(tuple(found), relay)


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
    tls: TlsView = TlsView()
    wall_time: float = field(default_factory=time.time)  # what certificates' days left count from
    # the relay's upstreams as every worker shares them (prefork.handlers.upstreams.UpstreamBoard.describe)
    upstreams: tuple[Mapping[str, Any], ...] = ()
    molds: list[dict[str, Any]] = field(default_factory=list)  # generation, pid, state, threads: by generation
    reload: Mapping[str, Any] | None = None  # the reload in flight: its phase, a canary's figures so far
    cut_in: Mapping[int, float] = field(default_factory=dict)  # a draining worker's pid -> seconds until it is killed


DRAINING_STATES = ("draining", "killing")  # WorkerState values of workers told to go


def draining_generations(snap: Snapshot) -> list[dict[str, Any]]:
    """Each generation with workers told to go: how many, what they still hold, and when the rest is cut."""
    by_generation: dict[int, list[WorkerSample]] = {}
    for w in snap.workers:
        if w.state in DRAINING_STATES:
            by_generation.setdefault(w.generation, []).append(w)
    out = []
    for generation, workers in sorted(by_generation.items()):
        cuts = [snap.cut_in[w.pid] for w in workers if w.pid in snap.cut_in]
        out.append({"generation": generation, "workers": len(workers),
                    "open_connections": sum(max(w.active, 0) for w in workers),
                    "oldest_silent_s": max((w.oldest_silent_s for w in workers if w.active > 0), default=0.0),
                    "cut_in_s": round(max(0.0, min(cuts)), 3) if cuts else None})
    return out


def drain_progress(snap: Snapshot) -> list[str]:
    """The log lines while generations drain: one per generation still holding connections."""
    lines = []
    for g in draining_generations(snap):
        if not g["open_connections"]:
            continue
        left = f", {g['cut_in_s']:.0f}s left before they are cut" if g["cut_in_s"] is not None else ""
        lines.append(f"generation {g['generation']} draining: {g['workers']} worker(s) with "
                     f"{g['open_connections']} open connection(s), the oldest silent for "
                     f"{g['oldest_silent_s']:.0f}s{left}")
    return lines


def listening(listeners: Iterable[Listener], tls: TlsSetup | None) -> str:
    """The listening addresses for the startup log: ``127.0.0.1:8443 (TLS), 127.0.0.1:8000``."""
    return ", ".join(li.address + (" (TLS)" if tls is not None and tls.for_listener(li.spec) else "")
                     for li in listeners)


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


def tls_counts(record: Any) -> dict[str, int]:
    """A scoreboard record's TLS counters, by TLS_COUNTERS name (copied: the record keeps changing)."""
    return {name: int(getattr(record, name)) for name in TLS_COUNTERS}


def closed_counts(record: Any) -> dict[str, int]:
    """A scoreboard record's connections closed by the worker itself, by reason (copied)."""
    return {name: int(getattr(record, f"closed_{name}")) for name in CLOSE_REASONS}


def oldest_silent(record: Any, now: float) -> float:
    """Seconds the record's silent-longest connection has received nothing (0 when it tracks none, or holds
    none: the worker clears the figure on its next tick, within a second)."""
    since = float(record.oldest_silent_since)
    return round(max(0.0, now - since), 3) if since and record.active > 0 else 0.0


def oldest_handler(record: Any, now: float) -> float:
    """Seconds a handler has held the record's oldest connection (0 when none is held, or nothing samples)."""
    since = float(record.oldest_handler_since)
    return round(max(0.0, now - since), 3) if since and record.active > 0 else 0.0


def tls_totals(totals: Totals, workers: Iterable[WorkerSample]) -> dict[str, int]:
    """TLS counters of the daemon's life: the gone workers' totals plus the live workers' own."""
    counts = {name: totals.tls.get(name, 0) for name in TLS_COUNTERS}
    for w in workers:
        for name in TLS_COUNTERS:
            counts[name] += w.tls.get(name, 0)
    return counts


def tls_stats(counts: Mapping[str, int]) -> dict[str, Any]:
    """The ``stats`` section of TLS counters: handshakes, by negotiated version, and failures by reason.

    Versions other than those the scoreboard counts apart are "other", shown only when there are some.
    """
    handshakes = counts.get("tls_handshakes", 0)
    versions = {version: counts.get(name, 0) for version, name in VERSIONS.items()}
    other = handshakes - sum(versions.values())
    if other > 0:
        versions["other"] = other
    failures = {reason: counts.get(f"tls_failed_{reason}", 0) for reason in FAILURE_REASONS}
    return {"handshakes": handshakes, "versions": versions, "failures": failures,
            "failed": sum(failures.values())}


def listener_tls_info(li: ListenerTls, now: float) -> dict[str, Any]:
    certificates = [cert.describe(now) for cert in li.certs]
    return {"certificates": certificates, "cert_reqs": li.cert_reqs, "min_version": li.min_version,
            "alpn": list(li.alpn), "handshake_timeout_s": li.handshake_timeout}


def relay_tls_info(relay: RelayTls | None) -> dict[str, Any] | None:
    if relay is None:
        return None
    cert = relay.certificate
    return {"upstreams": list(relay.upstreams), "server_name": relay.server_name, "ca_certs": relay.ca_certs,
            "certfile": relay.certfile,
            "certificate": cert.describe() if cert is not None else None}


# what ``stats`` counts per relay upstream (``status`` shows these and its settings and checks)
UPSTREAM_STATS = ("name", "state", "active", "connections", "failed", "failovers", "over_maxconn", "state_changes",
                  "checks", "checks_failed")


def worker_info(w: WorkerSample, generation_open: int = 0) -> dict[str, Any]:
    return {
        "pid": w.pid, "slot": w.slot, "generation": w.generation, "state": w.state,
        "requests": w.requests, "active": w.active, "share": share(w, generation_open),
        "errors": w.errors, "proxy_errors": w.proxy_errors,
        "bytes_in": w.bytes_in, "bytes_out": w.bytes_out, "rss_bytes": w.rss_bytes,
        "uss_bytes": w.uss_bytes, "pss_bytes": w.pss_bytes,
        "cpu_percent": round(w.cpu_percent, 1), "age_s": round(w.age_s, 3),
        "heartbeat_age_s": round(max(0.0, w.heartbeat_age_s), 3),
        "closed": dict(w.closed), "oldest_silent_s": w.oldest_silent_s,
        "oldest_handler_s": w.oldest_handler_s, "stuck_handlers": w.stuck_handlers,
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
        # the TLS listeners by address (a plain one is not there), and the relay's TLS to its upstreams
        "tls": {li.address: listener_tls_info(li, snap.wall_time) for li in snap.tls.listeners},
        "relay_tls": relay_tls_info(snap.tls.relay),
        # each --relay upstream: state, weight, open connections, failures, last check (docs/relay.md)
        "upstreams": [dict(u) for u in snap.upstreams],
        "control": snap.control,
        "workers": [worker_info(w, by_generation.get(w.generation, 0)) for w in snap.workers],
        "molds": list(snap.molds),
        "reload": dict(snap.reload) if snap.reload is not None else None,
        "draining": draining_generations(snap),
        "backoff": [
            {"slot": b.slot, "failures": b.failures,
             "restart_in_s": round(max(0.0, b.restart_in_s), 3) if b.restart_in_s is not None else None}
            for b in snap.backoff
        ],
    }


def tls_section(snap: Snapshot) -> dict[str, Any]:
    """``{"tls": ...}`` when a listener speaks TLS or a worker ever counted a handshake; else nothing."""
    counts = tls_totals(snap.totals, snap.workers)
    if not snap.tls.listeners and not any(counts.values()):
        return {}
    return {"tls": tls_stats(counts)}


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
        "rolled_back_reloads": totals.rolled_back_reloads,
        "memory_recycles": totals.memory_recycles,
        "worker_respawns": totals.respawns,
        "master_errors": totals.master_errors,
        "log_lines_dropped": totals.log_lines_dropped,
        **tls_section(snap),
        "upstreams": [{key: u[key] for key in UPSTREAM_STATS if key in u} for u in snap.upstreams],
        # connections the workers closed themselves (prefork.workers.admission), and the longest silence now
        "closed": {name: totals.closed.get(name, 0) + sum(w.closed.get(name, 0) for w in live)
                   for name in CLOSE_REASONS},
        "oldest_silent_s": max((w.oldest_silent_s for w in live), default=0.0),
        "oldest_handler_s": max((w.oldest_handler_s for w in live), default=0.0),
        "stuck_handlers": sum(w.stuck_handlers for w in live),
        "per_worker": [
            {"pid": w.pid, "slot": w.slot, "generation": w.generation, "state": w.state,
             "requests": w.requests, "active": w.active, "errors": w.errors}
            for w in live
        ],
    }
