"""Run prefork and reference servers side by side and print one table (see scripts/bench).

Drives the repository's ``bench/compare.py``: its C load generator
(``bench/echoload.c``), its reference servers (the recipe's
``ThreadingTCPServer``, a hand-written fork-and-``serve_forever`` prefork,
bare asyncio and uvloop servers, a C epoll server, HAProxy, socat) and its
measurement of the server's whole process tree. Each scenario runs its
servers interleaved, round after round, so drift on a shared machine hits
all of them alike; ratios are the median of per-round ratios against the
scenario's first server. The figure that matters is ops per server
CPU-second: it holds even when the load generator is the bottleneck.

``--timeline`` runs ``bench/timeline.py`` instead (its options follow): latency
and throughput per 100 ms through a reload, an upgrade and a worker kill,
written as a CSV and a PNG.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmark's tools ship in the repository, beside this folder
# by name: bench/ is type-checked on its own, and `mypy scripts/*.py` alone then needs no search path
compare = importlib.import_module("compare")
BIN = Path(sys.executable).parent
COMMON = "--log-level warning --control /tmp/prefork-bench-{port}.sock"


@dataclass(frozen=True)
class Entry:
    label: str
    server: str  # a compare.py server name
    prefork_cmd: str | None = None  # PREFORK_CMD / PREFORK_RELAY_CMD for the project's entries


def prefork(label: str, args: str, n: int, relay: bool = False) -> Entry:
    cmd = f"{BIN}/prefork --bind 127.0.0.1:{{port}} --workers {{n}} {args} {COMMON}"
    if relay:
        cmd += " --relay 127.0.0.1:{upstream}"
    return Entry(label, f"{'prefork-relay' if relay else 'prefork'}:{n}", cmd)


USER_ECHO = "bench_handlers:Echo"  # scripts/bench_handlers.py: a user's Protocol, not the built-in echo

SCENARIOS: dict[str, tuple[str, int, list[Entry]]] = {
    # name: (mode, connections, servers; the first is the baseline)
    "ping": ("ping", 50, [
        Entry("threading (recipe)", "threading"),
        prefork("prefork thread w2", "-k thread", 2),
        Entry("uvloop", "uvloop:1"),
        prefork("prefork async w1", "-k async", 1),
        prefork("prefork async w1 user", f"-k async {USER_ECHO}", 1),
        Entry("asyncio", "asyncio:1"),
        Entry("C epoll", "cecho:1"),
    ]),
    "connect": ("connect", 50, [
        Entry("naive prefork w2", "naive:2"),
        prefork("prefork sync w2", "-k sync", 2),
        prefork("prefork async w1", "-k async", 1),
        prefork("prefork async w1 user", f"-k async {USER_ECHO}", 1),
        Entry("uvloop", "uvloop:1"),
        Entry("C epoll", "cecho:1"),
    ]),
    "relay": ("ping", 50, [
        Entry("haproxy", "haproxy:1"),
        prefork("prefork relay async w1", "-k async", 1, relay=True),
        prefork("prefork relay thread w1", "-k thread --threads 64", 1, relay=True),
        Entry("socat", "socat"),
    ]),
}

# (scenario, server, against, at least): the targets the project set itself, checked after the table
TARGETS: list[tuple[str, str, str, float]] = [
    ("ping", "prefork thread w2", "threading (recipe)", 1.1),
    ("ping", "prefork async w1", "uvloop", 1.0),
    ("ping", "prefork async w1 user", "uvloop", 1.0),
    ("ping", "prefork async w1", "C epoll", 0.8),
    ("connect", "prefork sync w2", "naive prefork w2", 0.97),
    ("connect", "prefork async w1", "C epoll", 0.9),
    ("connect", "prefork async w1 user", "uvloop", 1.0),
    ("relay", "prefork relay async w1", "haproxy", 1.0),
    ("relay", "prefork relay async w1", "socat", 2.0),
]


def failures(res: dict[str, str]) -> int:
    if "error" in res:
        return -1
    return sum(int(res.get(k, 0)) for k in ("errors", "refused", "resets", "short", "starved"))


def median_ratio(rows: list[dict[str, str]], base: list[dict[str, str]]) -> float | None:
    """The median of per-round ratios of ops per server CPU-second (each round's pair ran back to back)."""
    ratios = [float(r["ops_per_cpu_s"]) / float(b["ops_per_cpu_s"]) for r, b in zip(rows, base, strict=True)
              if "error" not in r and "error" not in b and r.get("ops_per_cpu_s", "-") != "-"
              and b.get("ops_per_cpu_s", "-") != "-" and float(b["ops_per_cpu_s"])]
    return statistics.median(ratios) if ratios else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--timeline" in argv:
        code: int = importlib.import_module("timeline").main([a for a in argv if a != "--timeline"],
                                                             prog="scripts/bench --timeline")
        return code
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0],
                                 epilog="scripts/bench --timeline --help: the reload/upgrade timeline's options")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--secs", type=float, default=4.0, help="seconds of load per server and round (default 4)")
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="one scenario (repeatable)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.secs <= 0:
        ap.error("--rounds must be at least 1 and --secs above 0")
    # the project's servers: the checkout's prefork (ahead of whatever the virtual environment was installed
    # from), importing scripts/bench_handlers.py
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH")) if p)
    try:
        compare.build_tools()
    except compare.BuildError as exc:
        print(f"scripts/bench: {exc}", file=sys.stderr)
        return 1
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC on {platform.node()}: {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, server on CPU 1, load generator on CPU 0, "
          f"{args.rounds} interleaved rounds of {args.secs:g}s, 64-byte messages")
    header = (f"{'scenario':<9}{'server':<26}{'ops/s':>10}{'srv_cpu_s':>11}{'ops/cpu_s':>11}"
              f"{'x_ops_cpu':>11}{'rss_mb':>8}{'p99_us':>9}{'failures':>10}")
    print(header)
    measured: dict[str, dict[str, list[dict[str, str]]]] = {}
    for name in args.only or list(SCENARIOS):
        mode, conns, entries = SCENARIOS[name]
        ns = argparse.Namespace(mode=mode, c=conns, s=64, d=args.secs, t=1, server_cpus="1", load_cpus="0")
        results: dict[str, list[dict[str, str]]] = {e.label: [] for e in entries}
        for _ in range(args.rounds):
            for entry in entries:
                if entry.prefork_cmd:
                    key = "PREFORK_RELAY_CMD" if entry.server.startswith("prefork-relay") else "PREFORK_CMD"
                    os.environ[key] = entry.prefork_cmd
                results[entry.label].append(compare.run_one(entry.server, ns))
        measured[name] = results
        base = results[entries[0].label]
        for entry in entries:
            rows = results[entry.label]
            ok = [r for r in rows if "error" not in r]

            def med(key: str, rows: list[dict[str, str]] = ok) -> float:
                vals = [float(r[key]) for r in rows if r.get(key, "-") != "-"]
                return statistics.median(vals) if vals else 0.0

            ratio = median_ratio(rows, base)
            fails = [failures(r) for r in rows]
            print(f"{name:<9}{entry.label:<26}{med('ops_per_s'):>10.0f}{med('srv_cpu_s'):>11.2f}"
                  f"{med('ops_per_cpu_s'):>11.0f}{(ratio or 0):>11.2f}"
                  f"{med('rss_mb'):>8.0f}{med('p99_us'):>9.0f}"
                  f"{('-' if -1 in fails else str(max(fails))):>10}", flush=True)
    print("\ntargets (ops per server CPU-second; median of per-round ratios)")
    for scenario, server, against, least in TARGETS:
        if scenario not in measured:
            continue
        ratio = median_ratio(measured[scenario][server], measured[scenario][against])
        verdict = "no data" if ratio is None else ("met" if ratio >= least else "NOT met")
        shown = "-" if ratio is None else f"{ratio:.2f}"
        print(f"  {scenario:<9}{server:<26}vs {against:<20}{shown:>6}  (>= {least:g}) {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
