"""Prometheus exposition of status and stats: the text is checked with prometheus_client's own parser."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from conftest import Daemon, exchange, wait_for
from conftest import preforkctl as ctl
from prefork.metrics import CONTENT_TYPE, escape_label_value, format_value, render_prometheus

Families = dict[str, Any]


def parse(text: str) -> Families:
    """Families by sample-name stem: prometheus_client names a counter ``x`` for its ``x_total`` samples."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: Families, sample: str, /, **labels: str) -> float:
    """The value of the one sample called ``sample`` with exactly ``labels``."""
    found = [s.value for f in families.values() for s in f.samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, f"{sample}{labels}: {len(found)} samples"
    return float(found[0])


def worker(slot: int, pid: int, **extra: Any) -> dict[str, Any]:
    w: dict[str, Any] = {
        "pid": pid, "slot": slot, "generation": 3, "state": "ready", "requests": 10 * (slot + 1),
        "active": slot, "errors": slot, "proxy_errors": 0, "bytes_in": 100 + slot, "bytes_out": 200 + slot,
        "rss_bytes": 20_000_000 + slot, "cpu_percent": 1.5 + slot, "age_s": 60.25, "heartbeat_age_s": 0.5 + slot,
    }
    w.update(extra)
    return w


STATUS: dict[str, Any] = {
    "ok": True, "pid": 4000, "name": "web", "version": "0.1.0", "generation": 3, "uptime_s": 3600.5,
    "state": "serving", "worker_class": "thread", "event_loop": None, "handler": "prefork.handlers.echo:EchoHandler",
    "target_workers": 2, "listeners": ["127.0.0.1:8000"], "workers": [worker(0, 4711), worker(1, 4712)],
    "backoff": [],
}
STATS: dict[str, Any] = {
    "ok": True, "pid": 4000, "name": "web", "generation": 3, "uptime_s": 3600.5, "requests": 1234, "active": 1,
    "errors": 5, "proxy_errors": 2, "bytes_in": 10_000, "bytes_out": 20_000, "workers": 2, "workers_spawned": 9,
    "worker_exits": 7, "worker_crashes": 3, "worker_timeouts": 1, "reloads": 2, "failed_reloads": 1,
    "memory_recycles": 0, "per_worker": [],
}


def test_hand_built_families_types_and_values() -> None:
    families = parse(render_prometheus(STATUS, STATS))
    expected_types = {
        "prefork_connections": "counter", "prefork_connections_open": "gauge", "prefork_errors": "counter",
        "prefork_workers": "gauge", "prefork_worker_exits": "counter", "prefork_worker_crashes": "counter",
        "prefork_worker_timeouts": "counter", "prefork_reloads": "counter", "prefork_reloads_failed": "counter",
        "prefork_generation": "gauge", "prefork_uptime_seconds": "gauge", "prefork_received_bytes": "counter",
        "prefork_sent_bytes": "counter", "prefork_worker_connections": "counter",
        "prefork_worker_connections_open": "gauge", "prefork_worker_rss_bytes": "gauge",
        "prefork_worker_cpu_percent": "gauge", "prefork_worker_heartbeat_age_seconds": "gauge",
        "prefork_worker_age_seconds": "gauge", "prefork_info": "gauge", "prefork_workers_target": "gauge",
    }
    assert {name: families[name].type for name in expected_types} == expected_types
    assert all(name.startswith("prefork_") for name in families)
    totals = {
        "prefork_connections_total": 1234, "prefork_connections_open": 1, "prefork_errors_total": 5,
        "prefork_proxy_errors_total": 2, "prefork_received_bytes_total": 10_000, "prefork_sent_bytes_total": 20_000,
        "prefork_workers": 2, "prefork_workers_spawned_total": 9, "prefork_worker_exits_total": 7,
        "prefork_worker_crashes_total": 3, "prefork_worker_timeouts_total": 1, "prefork_reloads_total": 2,
        "prefork_reloads_failed_total": 1, "prefork_generation": 3, "prefork_uptime_seconds": 3600.5,
        "prefork_workers_target": 2, "prefork_master_pid": 4000,
    }
    assert {name: value(families, name) for name in totals} == totals
    assert value(families, "prefork_state", state="serving") == 1
    assert value(families, "prefork_state", state="reloading") == 0
    assert value(families, "prefork_info", name="web", version="0.1.0", worker_class="thread", event_loop="",
                 handler="prefork.handlers.echo:EchoHandler") == 1
    async_status = {**STATUS, "worker_class": "async", "event_loop": "uvloop"}
    assert value(parse(render_prometheus(async_status, STATS)), "prefork_info", name="web", version="0.1.0",
                 worker_class="async", event_loop="uvloop", handler="prefork.handlers.echo:EchoHandler") == 1


def test_hand_built_per_worker_samples() -> None:
    families = parse(render_prometheus(STATUS, STATS))
    per_worker = {
        "prefork_worker_connections_total": (10, 20), "prefork_worker_connections_open": (0, 1),
        "prefork_worker_errors_total": (0, 1), "prefork_worker_received_bytes_total": (100, 101),
        "prefork_worker_sent_bytes_total": (200, 201), "prefork_worker_rss_bytes": (20_000_000, 20_000_001),
        "prefork_worker_cpu_percent": (1.5, 2.5), "prefork_worker_heartbeat_age_seconds": (0.5, 1.5),
        "prefork_worker_age_seconds": (60.25, 60.25),
    }
    for name, (first, second) in per_worker.items():
        assert value(families, name, slot="0", pid="4711", generation="3") == first, name
        assert value(families, name, slot="1", pid="4712", generation="3") == second, name
        stem = name.removesuffix("_total")
        assert len(families[stem].samples) == 2, name
    assert value(families, "prefork_worker_state", slot="1", pid="4712", generation="3", state="ready") == 1


def test_text_format_details() -> None:
    text = render_prometheus(STATUS, STATS)
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text.splitlines()
    assert "# TYPE prefork_connections_total counter" in lines
    assert "prefork_connections_total 1234" in lines
    assert 'prefork_worker_rss_bytes{slot="0",pid="4711",generation="3"} 20000000' in lines
    # every family: HELP, then TYPE, then its samples, each family once
    helps = [line.split()[2] for line in lines if line.startswith("# HELP ")]
    types = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert helps == types and len(set(helps)) == len(helps)
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_missing_keys_drop_their_series() -> None:
    stats = {k: v for k, v in STATS.items() if k not in ("bytes_in", "bytes_out", "memory_recycles")}
    status = dict(STATUS, workers=[{k: v for k, v in w.items() if k not in ("bytes_in", "bytes_out")}
                                   for w in STATUS["workers"]])
    families = parse(render_prometheus(status, stats))
    for gone in ("prefork_received_bytes", "prefork_sent_bytes", "prefork_worker_received_bytes",
                 "prefork_worker_sent_bytes", "prefork_worker_memory_recycles"):
        assert gone not in families
    assert value(families, "prefork_connections_total") == 1234


def test_forward_compatible_respawns() -> None:
    assert "prefork_worker_respawns" not in parse(render_prometheus(STATUS, STATS))
    families = parse(render_prometheus(STATUS, dict(STATS, worker_respawns=4)))
    assert families["prefork_worker_respawns"].type == "counter"
    assert value(families, "prefork_worker_respawns_total") == 4


def test_no_workers_and_empty_replies() -> None:
    families = parse(render_prometheus(dict(STATUS, workers=[]), STATS))
    assert "prefork_worker_rss_bytes" not in families
    assert value(families, "prefork_workers") == 2
    assert render_prometheus({}, {}).startswith("# HELP prefork_info ")


def test_non_numbers_are_skipped() -> None:
    status = dict(STATUS, workers=[worker(0, 1, rss_bytes=None, cpu_percent="n/a", active=True)])
    families = parse(render_prometheus(status, STATS))
    assert "prefork_worker_rss_bytes" not in families
    assert "prefork_worker_cpu_percent" not in families
    assert "prefork_worker_connections_open" not in families  # a bool is not a count
    assert value(families, "prefork_worker_connections_total", slot="0", pid="1", generation="3") == 10


@pytest.mark.parametrize(("raw", "escaped"), [
    ("plain", "plain"),
    ('say "hi"', 'say \\"hi\\"'),
    ("C:\\dir", "C:\\\\dir"),
    ("two\nlines", "two\\nlines"),
    ('\\"\n', '\\\\\\"\\n'),
    ("tab\tand é", "tab\tand é"),
])
def test_escape_label_value(raw: str, escaped: str) -> None:
    assert escape_label_value(raw) == escaped


def test_escaped_labels_round_trip() -> None:
    name = 'we"ird\\name\nwith a newline'
    text = render_prometheus(dict(STATUS, name=name, handler="h:H"), STATS)
    assert 'name="we\\"ird\\\\name\\nwith a newline"' in text
    families = parse(text)
    assert families["prefork_info"].samples[0].labels["name"] == name


@given(st.text())
def test_any_label_value_round_trips(name: str) -> None:
    families = parse(render_prometheus({"name": name, "workers": []}, {}))
    assert families["prefork_info"].samples[0].labels["name"] == name


@pytest.mark.parametrize(("number", "text"), [
    (0, "0"), (7, "7"), (2**64 - 1, "18446744073709551615"), (0.5, "0.5"), (1e-7, "1e-07"),
    (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN"),
])
def test_format_value(number: float, text: str) -> None:
    assert format_value(number) == text


def test_real_daemon_exposition(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--workers", "3")
    made = 5
    for i in range(made):
        assert exchange(d.address(), f"hello {i}\n".encode()) == f"hello {i}\n".encode()
    # a connection counts once its handler has returned, a moment after the client saw its echo
    wait_for(lambda: d.call("stats")["requests"] == made, 10, f"stats to count {made} connections")

    result = ctl("--control", d.control, "stats", "--format", "prometheus")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    families = parse(result.stdout)
    status = d.status()
    pids = sorted(str(w["pid"]) for w in status["workers"])
    assert len(pids) == 3

    assert families["prefork_connections"].type == "counter"
    assert value(families, "prefork_connections_total") == made
    assert value(families, "prefork_connections_open") == 0
    assert value(families, "prefork_workers") == 3
    assert value(families, "prefork_generation") == 1
    assert value(families, "prefork_errors_total") == 0
    assert value(families, "prefork_worker_crashes_total") == 0
    assert value(families, "prefork_reloads_total") == 0
    assert value(families, "prefork_master_pid") == d.pid
    assert value(families, "prefork_uptime_seconds") > 0
    assert families["prefork_received_bytes"].type == "counter"
    assert families["prefork_sent_bytes"].type == "counter"

    connections = families["prefork_worker_connections"]
    assert connections.type == "counter"
    assert sorted(s.labels["pid"] for s in connections.samples) == pids
    assert sum(s.value for s in connections.samples) == made
    assert {s.labels["generation"] for s in connections.samples} == {"1"}
    assert sorted(s.labels["slot"] for s in connections.samples) == ["0", "1", "2"]
    for name in ("prefork_worker_rss_bytes", "prefork_worker_uss_bytes", "prefork_worker_pss_bytes",
                 "prefork_worker_heartbeat_age_seconds", "prefork_worker_age_seconds", "prefork_worker_cpu_percent"):
        assert families[name].type == "gauge"
        assert sorted(s.labels["pid"] for s in families[name].samples) == pids, name
    assert all(s.value > 1_000_000 for s in families["prefork_worker_rss_bytes"].samples)
    uss = {s.labels["pid"]: s.value for s in families["prefork_worker_uss_bytes"].samples}
    pss = {s.labels["pid"]: s.value for s in families["prefork_worker_pss_bytes"].samples}
    rss = {s.labels["pid"]: s.value for s in families["prefork_worker_rss_bytes"].samples}
    assert all(0 < uss[p] <= pss[p] <= rss[p] for p in pids)  # its own pages, its share, all it maps


def test_prometheus_format_not_running(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    result = ctl("--control", path, "stats", "--format", "prometheus")
    assert result.returncode == 3
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and path in result.stderr


def test_json_and_format_json_agree(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    by_flag = json.loads(ctl("--control", d.control, "stats", "--json").stdout)
    by_format = json.loads(ctl("--control", d.control, "stats", "--format", "json").stdout)
    assert by_flag["pid"] == by_format["pid"] == d.pid
    assert set(by_flag) == set(by_format)


def test_metrics_endpoint_served_by_the_master(daemon_factory: Callable[..., Daemon]) -> None:
    import socket as socketlib
    import urllib.error
    import urllib.request

    probe = socketlib.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    d = daemon_factory("--metrics-bind", f"127.0.0.1:{port}", "--workers", "2")
    for _ in range(3):
        assert exchange(d.address(), b"m") == b"m"
    wait_for(lambda: d.call("stats")["requests"] == 3, 5, "three connections counted")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["prefork_connections"].samples[0].value == 3
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
    assert err.value.code == 404
    # a silent client does not stall the master
    silent = socketlib.create_connection(("127.0.0.1", port))
    t0 = time.monotonic()
    assert d.status()["state"] == "serving"
    assert time.monotonic() - t0 < 1
    silent.close()


def test_connections_closed_by_reason_and_oldest_silence() -> None:
    stats = {"closed": {"idle_timeout": 3, "reclaimed": 2, "per_source": 0, "handshake_dropped": 7},
             "oldest_silent_s": 12.5}
    families = {f.name: f for f in text_string_to_metric_families(render_prometheus({}, stats))}
    closed = {s.labels["reason"]: s.value for s in families["prefork_connections_closed"].samples
              if s.name == "prefork_connections_closed_total"}
    assert closed == {"idle_timeout": 3, "reclaimed": 2, "per_source": 0, "handshake_dropped": 7}
    [silent] = families["prefork_oldest_silent_connection_seconds"].samples
    assert silent.value == 12.5


def test_drain_idle_and_handler_timeout_counters_and_the_oldest_handler() -> None:
    stats = {"closed": {"drain_idle": 100, "handler_timeout": 1}, "oldest_handler_s": 61.5, "stuck_handlers": 2}
    families = {f.name: f for f in text_string_to_metric_families(render_prometheus({}, stats))}
    closed = {s.labels["reason"]: s.value for s in families["prefork_connections_closed"].samples
              if s.name == "prefork_connections_closed_total"}
    assert closed == {"drain_idle": 100, "handler_timeout": 1}
    [held] = families["prefork_oldest_handler_connection_seconds"].samples
    [stuck] = families["prefork_stuck_handlers"].samples
    assert (held.value, stuck.value) == (61.5, 2)
