"""What each extra worker costs in memory of its own, with ``--no-preload`` and by default (a mold per generation).

Serves ``scripts/bench_memory_handler.py`` (its module builds about 100 MB of
Python objects at import) with ``prefork -w 1`` and ``-w N``, with
``--no-preload`` and with the default (``--preload``: the generation's mold
imports the handler and forks the workers). Once every worker has served a
connection (the handler's first connection runs a full collection in that
worker), it reads the unique memory (USS: pages no other process maps) of
the master, the molds and every worker with psutil, and prints one Markdown
row per setting: the USS each extra worker adds, and that as a share of
what the import costs one process (measured first, in a fresh interpreter).
With ``--reloads R`` both daemons are then reloaded R times and measured
again after each reload (once only the new generation is left), one row
each.

    .venv/bin/python scripts/bench_memory.py [--workers 4] [--rounds 3] [--reloads 0]

Every wait is bounded; a daemon that does not serve in time fails the run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from prefork.control import ControlError, call

RELOAD_TIMEOUT = 300.0  # a reload imports 100 MB again (in every worker with --no-preload)

HERE = Path(__file__).resolve().parent
HANDLER = "bench_memory_handler:Handler"
START_TIMEOUT = 120.0  # a daemon must serve within this (without --preload every worker imports 100 MB)
MIB = 2**20

IMPORT_PROBE = """
import psutil, sys
p = psutil.Process()
before = p.memory_full_info().uss
import bench_memory_handler
print(p.memory_full_info().uss - before)
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def import_cost() -> int:
    """Bytes of USS the handler module's import adds to a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, env=env(),
                         timeout=START_TIMEOUT, check=True).stdout
    return int(out.strip())


def wait_until(what: str, deadline: float, probe: Any) -> Any:
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_memory: timed out waiting for {what}")
        time.sleep(0.05)  # polling a daemon we do not control: bounded by the deadline


def status(control: str) -> dict[str, Any] | None:
    try:
        reply, sock = call(control, {"command": "status"}, timeout=5)
    except (ControlError, OSError):  # not up yet
        return None
    sock.close()
    return reply


def port_of(st: dict[str, Any]) -> int:
    return int(st["listeners"][0].rsplit(":", 1)[1])


def exchange(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"rows\n")
        s.recv(64)


def uss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_full_info().uss)
    except psutil.Error:  # a mold or worker that just ended
        return 0


RESPAWNS: list[float] = []  # seconds from a worker's SIGKILL to its replacement's READY, by setting (see main)


def measure(workers: int, preload: bool, tmp: str, reloads: int = 0) -> list[tuple[int, int, list[int]]]:
    """(the master's USS, the molds' USS, each worker's USS) once every worker has served: after the start,
    then after each of ``reloads`` reloads. The larger pool also times a respawn (into RESPAWNS)."""
    control = os.path.join(tmp, f"m{workers}{int(preload)}.sock")
    argv = [sys.executable, "-m", "prefork", "--bind", "127.0.0.1:0", "--workers", str(workers),
            "--control", control, "--log-level", "warning", *(["--preload"] if preload else ["--no-preload"]), HANDLER]
    proc = subprocess.Popen(argv, env=env(), start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT

        def serving() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise SystemExit(f"bench_memory: prefork exited with status {proc.returncode}: {' '.join(argv)}")
            st = status(control)
            ready = st and st["state"] == "serving" and [w for w in st["workers"] if w["state"] == "ready"]
            return st if ready and len(ready) == workers else None

        port = port_of(wait_until("the daemon to serve", deadline, serving))

        def all_served() -> dict[str, Any] | None:
            for _ in range(4 * workers):
                exchange(port)
            st = status(control)
            return st if st and all(w["requests"] >= 1 for w in st["workers"]) else None

        samples = []
        for reload in range(reloads + 1):
            if reload:
                try:
                    reply, sock = call(control, {"command": "reload"}, timeout=RELOAD_TIMEOUT)
                except (ControlError, OSError) as exc:
                    raise SystemExit(f"bench_memory: reload {reload} failed: {exc}") from None
                sock.close()
                if not reply.get("ok"):
                    raise SystemExit(f"bench_memory: reload {reload} failed: {reply.get('error')}")
                deadline = time.monotonic() + RELOAD_TIMEOUT
                generation = int(reply["generation"])

                def only_the_new_generation(generation: int = generation) -> dict[str, Any] | None:
                    st = serving()
                    return st if st and {w["generation"] for w in st["workers"]} == {generation} and all(
                        m["generation"] == generation for m in st.get("molds", [])) else None

                wait_until("the old generation to be gone", deadline, only_the_new_generation)
            st = wait_until("every worker to serve a connection", deadline, all_served)
            molds = sum(uss(m["pid"]) for m in st.get("molds", []))
            samples.append((uss(st["pid"]), molds, [uss(w["pid"]) for w in st["workers"]]))
        if workers > 1:
            victim = st["workers"][0]["pid"]
            began = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_until("the killed worker's replacement", began + START_TIMEOUT, lambda: (
                (st := serving()) is not None and victim not in {w["pid"] for w in st["workers"]}))
            RESPAWNS.append(time.monotonic() - began)
        return samples
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4, help="the larger pool (default 4); the smaller is 1")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting; the median is shown")
    parser.add_argument("--reloads", type=int, default=0, help="reload each daemon this many times, measuring "
                        "after each (default 0)")
    args = parser.parse_args()
    cost = statistics.median(import_cost() for _ in range(args.rounds))
    print(f"the handler module's import: {cost / MIB:.1f} MiB of USS in one process")
    print()
    print(f"| setting | master USS | molds USS | worker USS (median) | USS per extra worker (w1 -> w{args.workers}) "
          "| share of the import |")
    print("|---|---|---|---|---|---|")
    extra = args.workers - 1
    stages = args.reloads + 1
    with tempfile.TemporaryDirectory(prefix="prefork-bench-memory-") as tmp:
        os.chmod(tmp, 0o700)
        for preload in (False, True):
            per_worker: list[list[float]] = [[] for _ in range(stages)]
            masters: list[list[int]] = [[] for _ in range(stages)]
            molds: list[list[int]] = [[] for _ in range(stages)]
            worker_uss: list[list[int]] = [[] for _ in range(stages)]
            for _ in range(args.rounds):
                small = measure(1, preload, tmp, args.reloads)
                large = measure(args.workers, preload, tmp, args.reloads)
                for stage, ((m1, o1, w1), (mn, on, wn)) in enumerate(zip(small, large, strict=True)):
                    per_worker[stage].append((mn + on + sum(wn) - m1 - o1 - sum(w1)) / extra)
                    masters[stage].append(mn)
                    molds[stage].append(on)
                    worker_uss[stage].extend(wn)
            respawns, RESPAWNS[:] = list(RESPAWNS), []
            for stage in range(stages):
                each = statistics.median(per_worker[stage])
                setting = "--preload (default)" if preload else "--no-preload"
                when = f", after reload {stage}" if stage else ""
                print(f"| {setting}{when} | {statistics.median(masters[stage]) / MIB:.1f} MiB "
                      f"| {statistics.median(molds[stage]) / MIB:.1f} MiB "
                      f"| {statistics.median(worker_uss[stage]) / MIB:.1f} MiB | {each / MIB:.1f} MiB "
                      f"| {each / cost:.1%} |")
            print(f"| {setting}: a worker killed, its replacement ready in (median) | "
                  f"{statistics.median(respawns):.3f} s | | | | |")


if __name__ == "__main__":
    main()
