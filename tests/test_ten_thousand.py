"""Two async workers hold 10,000 connections, each echoing once a second, and the master stays responsive."""

from __future__ import annotations

import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, Daemon

ECHOLOAD_SRC = ROOT / "bench" / "echoload.c"  # the project's C load generator
CONNECTIONS = 10_000


def build_echoload(tmp_path: Path) -> Path:
    assert shutil.which("gcc"), "gcc is not installed (scripts/setup installs it)"
    exe = tmp_path / "echoload"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(ECHOLOAD_SRC), "-lpthread"], check=True, timeout=120)
    return exe


@pytest.mark.timeout(120)
def test_two_async_workers_hold_ten_thousand_connections(daemon_factory: Callable[..., Daemon],
                                                          tmp_path: Path) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < CONNECTIONS + 1000:
        pytest.skip(f"the open-file limit is {soft}: holding {CONNECTIONS} connections needs more")
    echoload = build_echoload(tmp_path)
    d = daemon_factory("-k", "async", "--workers", "2", "--backlog", "8192")
    worker_pids = [w["pid"] for w in d.status()["workers"]]
    status_times: list[float] = []
    peak_open = 0
    peak_per_worker: dict[int, int] = {}
    stop = threading.Event()

    def watch() -> None:  # status calls during the hold, timed; bounded by the load's own duration
        nonlocal peak_open
        while not stop.wait(0.2):
            t0 = time.monotonic()
            st = d.status()
            status_times.append(time.monotonic() - t0)
            peak_open = max(peak_open, sum(w["active"] for w in st["workers"]))
            for w in st["workers"]:
                peak_per_worker[w["pid"]] = max(peak_per_worker.get(w["pid"], 0), w["active"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out = subprocess.run([str(echoload), "-m", "hold", "-c", str(CONNECTIONS), "-s", "32", "-d", "8", "-t", "2",
                              "127.0.0.1", str(d.port)], capture_output=True, text=True, timeout=90).stdout
        uss = sum(psutil.Process(pid).memory_full_info().uss for pid in worker_pids)
    finally:
        stop.set()
        watcher.join(10)
    result = dict(kv.split("=", 1) for kv in out.split())
    print(f"echoload: {out.strip()}\nworkers' unique memory: {uss / 2**20:.1f} MiB; peak open {peak_open}; "
          f"status max {max(status_times) * 1000:.1f} ms over {len(status_times)} calls; per worker {peak_per_worker}")
    assert result["still_open"] == str(CONNECTIONS)
    for key in ("errors", "refused", "resets", "short", "starved"):
        assert result[key] == "0", (key, out)
    assert int(result["ops"]) >= CONNECTIONS * 5  # each connection echoed about once a second
    assert peak_open == CONNECTIONS
    assert uss < 100 * 2**20, f"workers' unique memory {uss / 2**20:.1f} MiB"
    assert status_times and max(status_times) < 0.1, max(status_times)
    # both workers took a share (the kernel spreads connections between the accepting workers)
    assert all(peak_per_worker[pid] > 1000 for pid in worker_pids), peak_per_worker
