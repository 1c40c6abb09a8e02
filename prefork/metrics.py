"""Prometheus text exposition (format 0.0.4) of a daemon's ``status`` and ``stats`` replies.

Pure functions of the two JSON replies, so ``preforkctl stats --format
prometheus`` and any future ``/metrics`` endpoint render the same text.
Totals come from ``stats`` (they include workers that have exited); per-worker
series come from ``status`` and carry the labels ``slot``, ``pid`` and
``generation``. TLS: each certificate's expiry comes from ``status`` (its
``tls`` section), handshakes by version and failures by reason from
``stats``. A key missing from a reply (an older daemon) drops that
series instead of failing; a family left without samples is not written.

The format is small enough to write by hand, which keeps the daemon free of
dependencies; the tests check it with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "prefork_"

MetricType = Literal["counter", "gauge"]
Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric: its HELP and TYPE lines and its samples."""

    name: str
    type: MetricType
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: object, labels: Labels = ()) -> None:
        """Add a sample; a missing or non-numeric ``value`` is skipped."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        self.samples.append((labels, value))


def escape_label_value(value: str) -> str:
    """Backslash, double quote and line feed are the three characters escaped in a label value."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escapes backslash and line feed (a double quote stays as it is)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def format_family(family: Family) -> list[str]:
    lines = [f"# HELP {family.name} {escape_help(family.help)}", f"# TYPE {family.name} {family.type}"]
    for labels, value in family.samples:
        if labels:
            inner = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels)
            lines.append(f"{family.name}{{{inner}}} {format_value(value)}")
        else:
            lines.append(f"{family.name} {format_value(value)}")
    return lines


def render(families: Iterable[Family]) -> str:
    """The exposition text of ``families``, skipping empty ones; ends with a line feed."""
    lines: list[str] = []
    for family in families:
        if family.samples:
            lines += format_family(family)
    return "\n".join(lines) + "\n" if lines else ""


def worker_labels(worker: Mapping[str, Any]) -> Labels:
    return (("slot", str(worker.get("slot", ""))), ("pid", str(worker.get("pid", ""))),
            ("generation", str(worker.get("generation", ""))))


# (stats key, metric name without prefix, type, help): totals over the daemon's life, or gauges now
_TOTALS: tuple[tuple[str, str, MetricType, str], ...] = (
    ("requests", "connections_total", "counter", "Connections handled to the end, by all workers ever."),
    ("active", "connections_open", "gauge", "Connections open now."),
    ("active_max_mean", "connections_imbalance", "gauge",
     "Open connections of the busiest worker over the mean, across the serving generation (1 when even or idle)."),
    ("errors", "errors_total", "counter", "Handler exceptions."),
    ("proxy_errors", "proxy_errors_total", "counter", "Connections closed for a missing or bad PROXY header."),
    ("bytes_in", "received_bytes_total", "counter", "Bytes received from clients."),
    ("bytes_out", "sent_bytes_total", "counter", "Bytes sent to clients."),
    ("workers", "workers", "gauge", "Worker processes alive now, of every generation."),
    ("workers_spawned", "workers_spawned_total", "counter", "Worker processes started."),
    ("worker_respawns", "worker_respawns_total", "counter", "Workers started to replace one that exited."),
    ("worker_exits", "worker_exits_total", "counter", "Worker processes that exited, for any reason."),
    ("worker_crashes", "worker_crashes_total", "counter",
     "Worker processes that exited uncleanly (non-zero status or a signal)."),
    ("worker_timeouts", "worker_timeouts_total", "counter", "Workers killed for a stale heartbeat."),
    ("memory_recycles", "worker_memory_recycles_total", "counter", "Workers replaced for using too much memory."),
    ("reloads", "reloads_total", "counter", "Reloads that completed (a new generation serves)."),
    ("failed_reloads", "reloads_failed_total", "counter", "Reloads that failed (the old generation kept serving)."),
    ("master_errors", "master_errors_total", "counter",
     "Internal errors the master logged and survived (an exception escaped one of its loop's callbacks)."),
    ("log_lines_dropped", "master_log_lines_dropped_total", "counter",
     "Log lines the master could not write (a full disk, a removed file) and dropped."),
    ("generation", "generation", "gauge", "The generation of workers the master serves with."),
    ("uptime_s", "uptime_seconds", "gauge", "Seconds since the master started."),
)

# (status worker key, metric name without prefix, type, help)
_PER_WORKER: tuple[tuple[str, str, MetricType, str], ...] = (
    ("requests", "worker_connections_total", "counter", "Connections this worker handled to the end."),
    ("active", "worker_connections_open", "gauge", "Connections this worker has open now."),
    ("share", "worker_connections_share", "gauge",
     "This worker's fraction of its generation's open connections (0 when they have none)."),
    ("errors", "worker_errors_total", "counter", "Handler exceptions in this worker."),
    ("bytes_in", "worker_received_bytes_total", "counter", "Bytes this worker received from clients."),
    ("bytes_out", "worker_sent_bytes_total", "counter", "Bytes this worker sent to clients."),
    ("rss_bytes", "worker_rss_bytes", "gauge", "Resident memory of this worker, pages shared with others included."),
    ("uss_bytes", "worker_uss_bytes", "gauge",
     "Memory only this worker maps (USS), what --max-worker-memory compares and replacing it gives back."),
    ("pss_bytes", "worker_pss_bytes", "gauge",
     "This worker's proportional share of memory (PSS): its own pages, and shared ones divided among sharers."),
    ("cpu_percent", "worker_cpu_percent", "gauge",
     "CPU use of this worker since the previous status request (its lifetime average on the first)."),
    ("heartbeat_age_s", "worker_heartbeat_age_seconds", "gauge", "Seconds since this worker's last heartbeat."),
    ("age_s", "worker_age_seconds", "gauge", "Seconds since this worker was started."),
)


def tls_families(status: Mapping[str, Any], stats: Mapping[str, Any]) -> list[Family]:
    """Certificate expiry (from ``status``), handshakes by version and failures by reason (from ``stats``)."""
    expiry = Family(PREFIX + "tls_certificate_expiry_timestamp_seconds", "gauge",
                    "When each certificate in use expires (its notAfter), in seconds since the epoch: those a "
                    "listener serves, and the relay's client certificate (listener=\"relay\").")
    listeners = dict(status.get("tls") or {}) if isinstance(status.get("tls"), Mapping) else {}
    relay = status.get("relay_tls")
    if isinstance(relay, Mapping) and isinstance(relay.get("certificate"), Mapping):
        listeners["relay"] = {"certificates": [relay["certificate"]]}
    for listener, info in sorted(listeners.items()):
        certificates = info.get("certificates", []) if isinstance(info, Mapping) else []
        for cert in (c for c in certificates if isinstance(c, Mapping)):
            expiry.add(cert.get("not_after_epoch"),
                       (("listener", str(listener)), ("certfile", str(cert.get("certfile", ""))),
                        ("subject", str(cert.get("subject", ""))), ("server_name", str(cert.get("server_name") or ""))))
    handshakes = Family(PREFIX + "tls_handshakes_total", "counter", "TLS handshakes completed, by negotiated version.")
    failures = Family(PREFIX + "tls_handshake_failures_total", "counter",
                      "TLS handshakes that failed, by reason (timeout, not_tls, version, cipher, certificate, closed, "
                      "other).")
    counts = stats.get("tls")
    if isinstance(counts, Mapping):
        for name, key, family in (("version", "versions", handshakes), ("reason", "failures", failures)):
            by_label = counts.get(key)
            for label, value in by_label.items() if isinstance(by_label, Mapping) else ():
                family.add(value, ((name, str(label)),))
    return [expiry, handshakes, failures]


def upstream_families(status: Mapping[str, Any], stats: Mapping[str, Any]) -> list[Family]:
    """The relay's upstreams: state, weight, open connections and checks (``status``); counters (``stats``)."""
    up = Family(PREFIX + "upstream_up", "gauge", "1 while the relay sends clients to this upstream, 0 while it "
                "is down or half-open (one connection or check trying it again).")
    weight = Family(PREFIX + "upstream_weight", "gauge", "The upstream's configured weight.")
    active = Family(PREFIX + "upstream_active_connections", "gauge",
                    "Connections open to this upstream now, over every worker.")
    latency = Family(PREFIX + "upstream_check_latency_seconds", "gauge", "How long the last active check took.")
    for u in (u for u in status.get("upstreams", []) if isinstance(u, Mapping)):
        labels = (("upstream", str(u.get("name", ""))),)
        if isinstance(u.get("state"), str):
            up.add(int(u["state"] == "up"), labels)
        weight.add(u.get("weight"), labels)
        active.add(u.get("active"), labels)
        latency.add(u["check_latency_ms"] / 1000 if isinstance(u.get("check_latency_ms"), int | float) else None,
                    labels)
    counters = [(key, Family(PREFIX + name, "counter", text)) for key, name, text in (
        ("connections", "upstream_connections_total", "Connections relayed to this upstream."),
        ("failovers", "upstream_failovers_total", "Clients this upstream failed that another upstream took."),
        ("over_maxconn", "upstream_over_maxconn_total",
         "Connections sent elsewhere (or closed) because this upstream was at its maxconn."),
        ("state_changes", "upstream_state_changes_total", "Times this upstream went down or came back up."),
        ("checks", "upstream_checks_total", "Active checks of this upstream."),
        ("checks_failed", "upstream_check_failures_total", "Active checks of this upstream that failed."),
    )]
    failed = Family(PREFIX + "upstream_failures_total", "counter",
                    "Failed attempts to connect to this upstream, by reason (refused, timeout, tls, other).")
    for u in (u for u in stats.get("upstreams", []) if isinstance(u, Mapping)):
        labels = (("upstream", str(u.get("name", ""))),)
        for key, family in counters:
            family.add(u.get(key), labels)
        by_reason = u.get("failed")
        for reason, value in by_reason.items() if isinstance(by_reason, Mapping) else ():
            failed.add(value, (*labels, ("reason", str(reason))))
    return [up, weight, active, latency, *(family for _, family in counters), failed]


def admission_families(stats: Mapping[str, Any]) -> list[Family]:
    """Connections the workers closed themselves, by reason, and the oldest silent connection's age."""
    closed = Family(PREFIX + "connections_closed_total", "counter",
                    "Connections the workers closed themselves, by reason (idle_timeout, reclaimed, per_source, "
                    "handshake_dropped, drain_idle, handler_timeout, relay_loop).")
    by_reason = stats.get("closed")
    for reason, value in sorted(by_reason.items()) if isinstance(by_reason, Mapping) else ():
        closed.add(value, (("reason", str(reason)),))
    silent = Family(PREFIX + "oldest_silent_connection_seconds", "gauge",
                    "Seconds the connection silent longest (waiting for its first bytes, or in a handler) "
                    "has received nothing.")
    silent.add(stats.get("oldest_silent_s"))
    held = Family(PREFIX + "oldest_handler_connection_seconds", "gauge",
                  "Seconds a handler has held the oldest connection any handler holds now (--handler-timeout).")
    held.add(stats.get("oldest_handler_s"))
    stuck = Family(PREFIX + "stuck_handlers", "gauge",
                   "Handlers still running a full --handler-timeout after their connection was closed for it.")
    stuck.add(stats.get("stuck_handlers"))
    return [closed, silent, held, stuck]


def families(status: Mapping[str, Any], stats: Mapping[str, Any]) -> list[Family]:
    """The metric families of a ``status`` and a ``stats`` reply taken at about the same time."""
    out: list[Family] = []
    info = Family(PREFIX + "info", "gauge", "Always 1; the labels describe the daemon.")
    info.add(1, (("name", str(status.get("name", stats.get("name", "")))),
                 ("version", str(status.get("version", ""))),
                 ("worker_class", str(status.get("worker_class", ""))),
                 ("event_loop", str(status.get("event_loop") or "")),
                 ("handler", str(status.get("handler", "")))))
    out.append(info)
    master_pid = Family(PREFIX + "master_pid", "gauge", "Process id of the master.")
    master_pid.add(stats.get("pid", status.get("pid")))
    out.append(master_pid)
    for key, name, kind, text in _TOTALS:
        family = Family(PREFIX + name, kind, text)
        family.add(stats.get(key))
        out.append(family)
    outcomes = Family(PREFIX + "reload_outcomes_total", "counter",
                      "Reloads by outcome: committed (the new generation serves), rolled_back (its canary did "
                      "worse than the old generation), failed (it could not start).")
    for outcome, key in (("committed", "reloads"), ("rolled_back", "rolled_back_reloads"),
                         ("failed", "failed_reloads")):
        outcomes.add(stats.get(key, 0), (("outcome", outcome),))
    out.append(outcomes)
    target = Family(PREFIX + "workers_target", "gauge", "Workers per generation the master keeps.")
    target.add(status.get("target_workers"))
    out.append(target)
    state = Family(PREFIX + "state", "gauge", "1 for the master's current state, 0 for the others.")
    if isinstance(status.get("state"), str):
        current = status["state"]
        for name in sorted({"starting", "serving", "reloading", "stopping", current}):
            state.add(int(name == current), (("state", name),))
    out.append(state)

    workers = [w for w in status.get("workers", []) if isinstance(w, Mapping)]
    worker_state = Family(PREFIX + "worker_state", "gauge", "Always 1; the state label is the worker's state.")
    for w in workers:
        worker_state.add(1, (*worker_labels(w), ("state", str(w.get("state", "")))))
    out.append(worker_state)
    for key, name, kind, text in _PER_WORKER:
        family = Family(PREFIX + name, kind, text)
        for w in workers:
            family.add(w.get(key), worker_labels(w))
        out.append(family)
    return out + tls_families(status, stats) + upstream_families(status, stats) + admission_families(stats)


def render_prometheus(status: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    """The Prometheus text exposition (0.0.4) of a daemon's ``status`` and ``stats`` replies."""
    return render(families(status, stats))
