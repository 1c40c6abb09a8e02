#!/usr/bin/env python3
"""How evenly prefork's workers hold persistent connections, per worker class, and print one table.

For each worker class, worker count and client count, start
``prefork -k CLASS -w N`` (``--balance on`` and ``off``), hold CLIENTS
persistent connections with the repository's C load generator
(``echoload -m hold``: every connection opened at once, then one ping each
per second), read ``status`` once they are all counted, and report the
busiest worker's open connections over the mean (1.00 is even; N workers
cannot exceed N). A cell is "-" when the connections were not all counted
within the time allowed.

  scripts/bench_balance.py [--classes sync,thread,async] [--workers 2,4] [--clients 50,200,2000] [--secs S]

``sync`` serves one connection at a time per worker, so it holds at most N
(one per worker) whatever the client count: its cell is measured on those.
``thread`` runs with ``--threads CLIENTS`` so that no pool fills (a full pool
stops accepting, which would even the load by itself and hide the kernel's
spread).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from compare import ECHOLOAD, build_tools, free_port, stop, wait_port  # noqa: E402

from prefork.control import ControlError, call  # noqa: E402

COUNT_TIMEOUT = 30.0  # seconds for every connection to be open and counted


def status(control: str) -> dict[str, object] | None:
    try:
        reply, sock = call(control, {"command": "status"}, timeout=5)
    except (OSError, ValueError, ControlError):  # not answering yet, or gone
        return None
    sock.close()
    return reply


def actives(reply: dict[str, object]) -> list[int]:
    workers = reply.get("workers")
    generation = reply.get("generation")
    if not isinstance(workers, list):
        return []
    return [int(w["active"]) for w in workers if isinstance(w, dict) and w.get("generation") == generation]


def measure(worker_class: str, workers: int, clients: int, balance: str, secs: float, tmp: str) -> float | None:
    """max/mean open connections per worker once the clients are counted; None if they never were."""
    port = free_port()
    control = os.path.join(tmp, f"bal-{worker_class}-{workers}-{clients}-{balance}.sock")
    argv = [sys.executable, "-m", "prefork", "--bind", f"127.0.0.1:{port}", "--control", control,
            "-k", worker_class, "-w", str(workers), "--balance", balance, "--log-level", "warning"]
    if worker_class == "thread":
        argv += ["--threads", str(clients)]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              cwd=str(ROOT))
    load: subprocess.Popen[bytes] | None = None
    try:
        if not wait_port(port):
            return None
        deadline = time.monotonic() + COUNT_TIMEOUT
        while (reply := status(control)) is None or len(actives(reply)) != workers:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)  # polling an outside process's status: there is nothing to wait on
        load = subprocess.Popen([ECHOLOAD, "-m", "hold", "-c", str(clients), "-d", str(secs), "127.0.0.1", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        expected = min(clients, workers) if worker_class == "sync" else clients
        deadline = time.monotonic() + COUNT_TIMEOUT
        while True:
            reply = status(control)
            counts = actives(reply) if reply else []
            if len(counts) == workers and sum(counts) >= expected:
                return max(counts) * workers / sum(counts)
            if time.monotonic() >= deadline or load.poll() is not None:
                return None
            time.sleep(0.05)
    finally:
        if load is not None:
            stop(load, 5)
        stop(server, 20.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--classes", default="sync,thread,async")
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--clients", default="50,200,2000")
    ap.add_argument("--secs", type=float, default=20.0, help="how long each load runs at most (default 20)")
    args = ap.parse_args(argv)
    build_tools()
    classes = args.classes.split(",")
    worker_counts = [int(n) for n in args.workers.split(",")]
    client_counts = [int(n) for n in args.clients.split(",")]
    print(f"max/mean open connections per worker, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    print(f"{'class':<8}{'workers':>8}{'clients':>9}{'balance on':>12}{'balance off':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for worker_class in classes:
            for workers in worker_counts:
                for clients in client_counts:
                    cells = []
                    for balance in ("on", "off"):
                        ratio = measure(worker_class, workers, clients, balance, args.secs, tmp)
                        cells.append("-" if ratio is None else f"{ratio:.2f}")
                    print(f"{worker_class:<8}{workers:>8}{clients:>9}{cells[0]:>12}{cells[1]:>13}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
