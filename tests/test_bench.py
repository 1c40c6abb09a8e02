"""The benchmarks that ship in bench/: they run from a fresh copy of the repository, the load
generator's per-interval timeline is right, and the reload/upgrade/kill timeline runs."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROOT, Daemon

sys.path.insert(0, str(ROOT / "bench"))
import compare
import timeline


def fresh_copy(dest: Path) -> Path:
    """The working tree's files as a clone would have them (tracked, plus new files not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True, timeout=30).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the working tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_scripts_bench_runs_from_a_fresh_copy_with_nothing_beside_it(tmp_path: Path) -> None:
    copy = fresh_copy(tmp_path / "prefork")
    assert not (tmp_path / "shared").exists() and not (copy / "build").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("BENCH_DIR", "BENCH_TOOLS", "PROJECT")}
    # the copy's runner on the installed virtual environment (scripts/bench would set up a new one)
    done = subprocess.run([sys.executable, str(copy / "scripts" / "bench.py"), "--rounds", "1", "--secs", "1",
                           "--only", "ping"], cwd=copy, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    # scenario (9 columns), server (26), then ops/s srv_cpu_s ops/cpu_s x_ops_cpu rss_mb p99_us failures
    rows = {line[9:35].strip(): line[35:].split() for line in done.stdout.splitlines() if line.startswith("ping ")}
    assert "prefork thread w2" in rows and "prefork async w1" in rows, done.stdout
    for label, fields in rows.items():
        assert len(fields) == 7 and fields[-1] == "0", f"{label}: {fields}\n{done.stdout}"
        assert float(fields[0]) > 0, f"{label}: no ops/s\n{done.stdout}"
    # the tools were compiled from the copy's own sources, into the copy
    assert (copy / "build" / "bench" / "echoload").is_file() and (copy / "build" / "bench" / "cecho").is_file()


def echoload(*args: str, timeout: float = 30.0) -> list[str]:
    compare.build_tools()
    done = subprocess.run([compare.ECHOLOAD, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_echoload_prints_one_line_per_interval_that_adds_up(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("-k", "async", workers=1)
    lines = echoload("-m", "connect", "-c", "8", "-d", "1", "-i", "100", "127.0.0.1", str(d.port))
    assert lines[0].startswith("start_mono_ns=") and "interval_ms=100" in lines[0]
    intervals = [i for i in map(timeline.parse_interval, lines) if i is not None]
    summary = dict(kv.split("=", 1) for kv in lines[-1].split())
    assert [i.t_ms for i in intervals[:10]] == list(range(100, 1001, 100))
    assert len(intervals) <= 11  # at most one short line for what finished after the last full interval
    for i in intervals[:10]:
        assert i.ops > 0 and i.failures == 0, i
        assert i.p50_us is not None and i.p99_us is not None and i.max_us is not None
        assert i.p50_us <= i.p99_us <= i.max_us, i
    assert sum(i.ops for i in intervals) == int(summary["ops"])
    assert summary["errors"] == summary["refused"] == summary["resets"] == summary["short"] == "0"


def test_echoload_counts_failures_in_the_interval_they_happen() -> None:
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        lines = echoload("-m", "connect", "-c", "4", "-d", "0.3", "-i", "100", "127.0.0.1",
                         str(closed.getsockname()[1]))
    intervals = [i for i in map(timeline.parse_interval, lines) if i is not None]
    summary = dict(kv.split("=", 1) for kv in lines[-1].split())
    assert len(intervals) >= 3
    for i in intervals[:3]:
        assert i.ops == 0 and i.p50_us is None and i.p99_us is None, i  # printed as "-": nothing completed
        assert i.refused > 0 and i.failures == i.refused, i
    assert sum(i.refused for i in intervals) == int(summary["refused"]) > 0


def test_echoload_rejects_a_bad_interval() -> None:
    compare.build_tools()
    done = subprocess.run([compare.ECHOLOAD, "-i", "0.5", "127.0.0.1", "9"], capture_output=True, text=True,
                          timeout=10)
    assert done.returncode == 2 and "usage: echoload" in done.stderr and done.stdout == ""


def test_build_tools_rebuilds_when_the_source_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "bench"
    here.mkdir()
    for name in ("echoload.c", "cecho.c"):
        shutil.copy(ROOT / "bench" / name, here / name)
    tools = tmp_path / "tools"
    monkeypatch.setattr(compare, "HERE", str(here))
    monkeypatch.setattr(compare, "TOOLS", str(tools))
    monkeypatch.setattr(compare, "ECHOLOAD", str(tools / "echoload"))
    monkeypatch.setattr(compare, "CECHO", str(tools / "cecho"))
    compare.build_tools()
    first = (tools / "echoload").stat().st_ino, (tools / "cecho").stat().st_ino
    compare.build_tools()  # nothing changed: nothing is compiled
    assert ((tools / "echoload").stat().st_ino, (tools / "cecho").stat().st_ino) == first
    with open(here / "echoload.c", "a") as f:
        f.write("/* changed */\n")
    compare.build_tools()
    assert (tools / "echoload").stat().st_ino != first[0] and (tools / "cecho").stat().st_ino == first[1]
    with open(here / "cecho.c", "a") as f:
        f.write("this is not C\n")
    with pytest.raises(compare.BuildError, match=r"cannot compile .*cecho\.c"):
        compare.build_tools()


def test_schedule_runs_events_in_order_each_after_the_one_before() -> None:
    fired: list[tuple[str, float]] = []
    clock = [0.0]

    def fire(name: str) -> timeline.Event:
        fired.append((name, clock[0]))
        return timeline.Event(name, clock[0], clock[0] + 0.1, True, "")

    schedule = timeline.Schedule({"reload": 1.0, "upgrade": 2.0, "kill": 3.0}, fire)
    for t in (0.5, 0.9, 1.0, 1.5, 2.5, 2.6, 3.4):
        clock[0] = t
        schedule.tick(t)
        if schedule.running is not None:
            schedule.running.result(timeout=5)  # the event thread has run it; the next tick collects it
    events = schedule.finish(timeout=5)
    assert fired == [("reload", 1.0), ("upgrade", 2.5), ("kill", 3.4)]
    assert [e.name for e in events] == ["reload", "upgrade", "kill"]
    late = timeline.Schedule({"reload": 1.0, "kill": 9.0}, fire)
    late.tick(1.0)
    with pytest.raises(timeline.TimelineError, match="before kill"):
        late.finish(timeout=5)


def test_segments_count_each_failure_once() -> None:
    tl = timeline.Timeline(interval_ms=100)
    for t_ms, failures in ((100, 0), (200, 1), (300, 0), (400, 2), (500, 0), (600, 4)):
        tl.intervals.append(timeline.Interval(t_ms, 10, 5, 9, 9, failures, 0, 0, failures, 0))
    tl.events = [timeline.Event("reload", 0.25, 0.3, True, ""), timeline.Event("kill", 0.45, 0.5, True, "")]
    segs = timeline.segments(tl)
    assert [(s.name, s.failures, s.ops) for s in segs] == [("before", 1, 20), ("reload", 2, 20), ("kill", 4, 20)]
    assert (segs[0].start_s, segs[-1].end_s) == (0.0, 0.6)


def test_timeline_runs_reload_upgrade_and_kill_with_no_failed_connection(tmp_path: Path) -> None:
    # 18 s: events at 4.5, 9 and 13.5 s, room for an upgrade (the new program's check, then its exec in place,
    # then a reload) that takes 5 s and more on a loaded machine (measured: 3.6-5.2 s at a load average of 10)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "timeline.py"), "--secs", "18", "--no-plot",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "timeline-events.csv") as f:
        events = list(csv.DictReader(f))
    assert [e["event"] for e in events] == ["reload", "upgrade", "kill"], events
    assert all(e["ok"] == "1" for e in events), events
    starts = [float(e["start_s"]) for e in events]
    assert starts == sorted(starts) and starts[0] >= 1.0 and starts[1] >= 2.0 and starts[2] >= 3.0, events
    with open(tmp_path / "timeline.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 38 and sum(int(r["ops"]) for r in rows) > 0
    # reload and upgrade lose nothing: no failure from the load's start until the worker is killed
    before_kill = [r for r in rows if float(r["t_s"]) <= starts[2]]
    assert sum(int(r["failures"]) for r in before_kill) == 0, done.stdout


@pytest.mark.parametrize("how", ["canary", "probation"])
def test_timeline_bad_reload_is_turned_down_and_failures_stop(tmp_path: Path, how: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "timeline.py"), "--secs", "6", "--no-plot",
                           "--bad-reload", how, "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tmp_path / "timeline-events.csv") as f:
        events = list(csv.DictReader(f))
    assert [e["event"] for e in events] == ["bad-reload"] and events[0]["ok"] == "1", events
    assert f"{how}: rolled_back: reload failed: {how}: " in events[0]["detail"], events
    with open(tmp_path / "timeline.csv") as f:
        rows = list(csv.DictReader(f))
    ended = float(events[0]["end_s"])
    # something failed (the bad code served), and nothing once the old generation served alone again
    assert sum(int(r["failures"]) for r in rows) > 0, done.stdout
    assert sum(int(r["failures"]) for r in rows if float(r["t_s"]) > ended + 1.0) == 0, done.stdout


def test_timeline_picture_is_a_png(tmp_path: Path) -> None:
    import plot_timeline  # needs matplotlib: the bench extra, which scripts/setup installs

    tl = timeline.Timeline(interval_ms=100, setup={"mode": "connect", "prefork": "prefork -w 2"})
    for k in range(1, 31):
        tl.intervals.append(timeline.Interval(k * 100, 900 + k, 3000, 9000, 12000, int(k == 25), 0, 0, 0,
                                              int(k == 25)))
    tl.events = [timeline.Event("reload", 0.8, 0.9, True, ""), timeline.Event("upgrade", 1.5, 1.9, True, ""),
                 timeline.Event("kill", 2.45, 2.5, True, "")]
    plot_timeline.draw(tl, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
