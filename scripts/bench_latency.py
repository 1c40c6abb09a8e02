#!/usr/bin/env python3
"""What --balance buys in latency when every message costs CPU: p50/p99 and throughput, and print one table.

The handler (``scripts/bench_cpu_handler.py:Handler``) burns about 200 µs of
Python CPU per message, then echoes it. For each worker count N, three cells,
each driven by the repository's C load generator (``echoload -m ping``, 64-byte
messages, closed loop):

  balance on   one ``prefork -k thread -w N`` (``--balance on``, the default), one echoload, CLIENTS clients
  split        N independent ``prefork -k thread -w 1`` daemons on N ports, each with its own echoload and an
               equal share of the clients (CLIENTS/N, the remainder spread one each), all run at once;
               p50/p99 are the worst of the N, throughput and failures their sum
  balance off  as "balance on" with ``--balance off``: the kernel alone places the connections

Every server runs ``--threads CLIENTS`` (no pool fills, which would even the
load by itself). The servers are pinned to --server-cpus (default CPU 1), the
load to --load-cpus (default CPU 0), as bench/compare.py does, so the workers
of one cell share one core: each process, holding one GIL, gets an equal
slice of it, the way each worker would get a core of its own on a machine
with a core per worker. The loop count for 200 µs is calibrated once, on the
server CPU, and given to every server (``BENCH_CPU_ITERS``).

Columns: ops/s (round trips per second, all clients), p50/p99 in µs
(median over rounds), cpu_us/msg (the server trees' CPU per round trip, a
check of the handler's cost), max/mean (the busiest worker's open
connections over the mean, read from ``status`` mid-run; split cells are
even by construction), fail (errors, refused, resets, short reads and
starved clients, summed over rounds: must be 0).

  .venv/bin/python scripts/bench_latency.py [--workers 2,4] [--clients 50] [--secs 4] [--rounds 3] [--cpu-us 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from compare import ECHOLOAD, build_tools, free_port, pinned, stop, tree_cpu, wait_port  # noqa: E402

from prefork.control import ControlError, call  # noqa: E402

HANDLER = "bench_cpu_handler:Handler"
READY_TIMEOUT = 30.0  # seconds for a daemon's workers to be up
FAILURES = ("errors", "refused", "resets", "short", "starved")
CELLS = ("balance on", "split", "balance off")


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    control: str


@dataclass
class Result:
    ops_per_s: float
    p50_us: float
    p99_us: float
    cpu_us_per_msg: float
    max_mean: float | None
    failures: int


@dataclass
class Cell:
    results: list[Result] = field(default_factory=list)


def status_actives(control: str, generation_only: bool = True) -> list[int] | None:
    """Open connections per worker of the serving generation, or None while the daemon does not answer."""
    try:
        reply, sock = call(control, {"command": "status"}, timeout=5)
    except (OSError, ValueError, ControlError):
        return None
    sock.close()
    workers = reply.get("workers")
    generation = reply.get("generation")
    if not isinstance(workers, list):
        return None
    return [int(w["active"]) for w in workers
            if isinstance(w, dict) and (not generation_only or w.get("generation") == generation)]


def start(workers: int, balance: str, clients: int, env: dict[str, str], cpus: str, tmp: str) -> Daemon:
    port = free_port()
    control = os.path.join(tmp, f"lat-{port}.sock")
    argv = [sys.executable, "-m", "prefork", "--bind", f"127.0.0.1:{port}", "--control", control,
            "-k", "thread", "-w", str(workers), "--threads", str(clients), "--balance", balance,
            "--log-level", "warning", HANDLER]
    proc = subprocess.Popen(pinned(cpus, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=str(ROOT), env=env)
    return Daemon(proc, port, control)


def wait_ready(daemon: Daemon, workers: int) -> bool:
    """The port answers and every worker is up (so the first connections are not all one worker's)."""
    if not wait_port(daemon.port, READY_TIMEOUT):
        return False
    deadline = time.monotonic() + READY_TIMEOUT
    while (counts := status_actives(daemon.control)) is None or len(counts) != workers:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # polling an outside process's status: there is nothing to wait on
    return True


def parse(out: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def run_cell(cell: str, n: int, args: argparse.Namespace, env: dict[str, str], tmp: str) -> Result | None:
    """One measurement; None when a daemon did not come up or a load generator printed nothing."""
    if cell == "split":
        shares = [args.clients // n + (1 if i < args.clients % n else 0) for i in range(n)]
        specs = [(1, "on", share) for share in shares]
    else:
        specs = [(n, "on" if cell == "balance on" else "off", args.clients)]
    daemons = [start(w, bal, args.clients, env, args.server_cpus, tmp) for w, bal, _ in specs]
    loads: list[subprocess.Popen[str]] = []
    try:
        if not all(wait_ready(d, w) for d, (w, _, _) in zip(daemons, specs, strict=True)):
            return None
        time.sleep(0.3)
        cpu0 = sum(tree_cpu(d.proc.pid) for d in daemons)
        loads = [subprocess.Popen(pinned(args.load_cpus, [ECHOLOAD, "-m", "ping", "-c", str(c), "-s", "64",
                                                          "-d", str(args.secs), "127.0.0.1", str(d.port)]),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for d, (_, _, c) in zip(daemons, specs, strict=True)]
        time.sleep(min(1.0, args.secs / 2))
        counts = status_actives(daemons[0].control) if cell != "split" else None
        outs = [parse(p.communicate(timeout=args.secs + 30)[0]) for p in loads]
        cpu = sum(tree_cpu(d.proc.pid) for d in daemons) - cpu0
        if not all("ops" in o for o in outs):
            return None
        ops = sum(int(o["ops"]) for o in outs)
        return Result(
            ops_per_s=sum(float(o["ops_per_s"]) for o in outs),
            p50_us=max(float(o["p50_us"]) for o in outs),
            p99_us=max(float(o["p99_us"]) for o in outs),
            cpu_us_per_msg=cpu * 1e6 / ops if ops else 0.0,
            max_mean=(max(counts) * len(counts) / sum(counts)) if counts and sum(counts) else None,
            failures=sum(int(o.get(k, "0")) for o in outs for k in FAILURES),
        )
    finally:
        for p in loads:
            if p.poll() is None:
                p.kill()
                p.wait()
        for d in daemons:
            stop(d.proc)


def calibrate(cpus: str, target_us: float) -> int:
    out = subprocess.run(pinned(cpus, [sys.executable, str(ROOT / "scripts" / "bench_cpu_handler.py"),
                                       str(target_us)]),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return int(out.strip())


def row(n: int, cell: str, results: list[Result]) -> str:
    if not results:
        return f"{n:>3}  {cell:<12}{'-':>9}"
    med = statistics.median
    ratios = [r.max_mean for r in results if r.max_mean is not None]
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "even"
    return (f"{n:>3}  {cell:<12}{med(r.ops_per_s for r in results):>9.0f}"
            f"{med(r.p50_us for r in results):>9.0f}{med(r.p99_us for r in results):>9.0f}"
            f"{med(r.cpu_us_per_msg for r in results):>12.0f}{spread:>12}"
            f"{sum(r.failures for r in results):>6}{len(results):>8}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--secs", type=float, default=4.0, help="seconds of load per cell (default 4)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-us", type=float, default=200.0, help="CPU per message, microseconds (default 200)")
    ap.add_argument("--server-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    args = ap.parse_args(argv)
    build_tools()
    iters = calibrate(args.server_cpus, args.cpu_us)
    env = dict(os.environ, BENCH_CPU_ITERS=str(iters),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "scripts"), os.environ.get("PYTHONPATH")])))
    worker_counts = [int(n) for n in args.workers.split(",")]
    pin = pinned(args.server_cpus, ["x"]) != ["x"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.clients} clients, {args.secs:g} s per cell, "
          f"{args.rounds} interleaved rounds; {args.cpu_us:g} us of CPU per message = {iters} loop turns; "
          + (f"servers on CPU {args.server_cpus}, load on CPU {args.load_cpus}" if pin else "unpinned"))
    cells: dict[tuple[int, str], Cell] = {(n, c): Cell() for n in worker_counts for c in CELLS}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):  # interleaved: drift on this shared machine hits every cell alike
            for n in worker_counts:
                for c in CELLS:
                    res = run_cell(c, n, args, env, tmp)
                    if res is not None:
                        cells[(n, c)].results.append(res)
                    print(f"# round {rnd + 1} N={n} {c}: "
                          + ("did not run" if res is None else
                             f"{res.ops_per_s:.0f} ops/s p50 {res.p50_us:.0f} p99 {res.p99_us:.0f} us "
                             f"max/mean {'-' if res.max_mean is None else f'{res.max_mean:.2f}'} "
                             f"fail {res.failures}"), flush=True)
    print(f"# medians over rounds; split: N daemons -w 1, p50/p99 the worst of the N, ops/s their sum; "
          f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'N':>3}  {'cell':<12}{'ops/s':>9}{'p50_us':>9}{'p99_us':>9}{'cpu_us/msg':>12}{'max/mean':>12}"
          f"{'fail':>6}{'rounds':>8}")
    for (n, c), cell in cells.items():
        print(row(n, c, cell.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
