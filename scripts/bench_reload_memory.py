"""Peak workers and peak memory during a reload of 8 workers: --reload-batch 2 against the whole generation.

Each worker imports scripts/bench_memory_handler.py (about 100 MB of Python
objects), so a reload that starts a second generation beside the first
doubles the daemon's memory for a while; with --reload-batch 2 at most two
extra workers exist at once. The daemon's process tree is sampled (RSS, and
the number of worker processes) every 20 ms while `preforkctl reload` runs.

Usage: python scripts/bench_reload_memory.py
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

SCRIPTS = Path(__file__).resolve().parent


def tree(pid: int) -> tuple[int, int]:
    """(worker processes, total RSS in bytes) of the daemon's tree."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            rss += p.memory_info().rss
    return len(procs) - 1, rss


def run(batch: int, tmp: Path) -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    control = str(tmp / f"c{batch}.sock")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]))
    log = tmp / f"d{batch}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefork", "--bind", f"127.0.0.1:{port}", "--control", control,
                                 "-w", "8", "--reload-batch", str(batch), "--timeout", "120",
                                 "bench_memory_handler:Handler"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "serving:" not in log.read_text():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"prefork did not start:\n{log.read_text()}")
            time.sleep(0.1)  # a benchmark's start-up wait
        base_workers, base_rss = tree(proc.pid)
        peak = [base_workers, base_rss]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                workers, rss = tree(proc.pid)
                peak[0], peak[1] = max(peak[0], workers), max(peak[1], rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "prefork.ctl", "--control", control, "reload", "--json"],
                                capture_output=True, text=True, timeout=300, cwd=tmp)
        took = time.monotonic() - t0
        done.set()
        sampler.join(10)
        reply = json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr.strip()}
        label = f"--reload-batch {batch}" if batch else "whole generation (default)"
        return (f"{label}: before {base_workers} workers, {base_rss / 2**20:.0f} MiB RSS; during the reload peak "
                f"{peak[0]} workers (master's count: {reply.get('peak_workers')}), {peak[1] / 2**20:.0f} MiB RSS; "
                f"reload took {took:.1f} s")
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="prefork-reload-mem-") as tmp:
        for batch in (0, 2):
            print(run(batch, Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
