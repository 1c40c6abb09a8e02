#!/usr/bin/env python3
"""Run echo servers side by side under the same load and print one table.

Each server is started in its own session (so its whole process group can be
stopped), pinned with taskset to --server-cpus; the load generator (echoload.c)
is pinned to --load-cpus.

  compare.py [--mode ping|connect|hold] [-c CONNS] [-s SIZE] [-d SECS] [--rounds N] SERVER...

The C tools are compiled from this folder's sources with the machine's C
compiler ($CC, else cc or gcc) into build/bench/ of the checkout ($BENCH_TOOLS
overrides), and again whenever a source or the compiler command changes.

SERVER is one of:
  cecho[:THREADS]      C epoll echo server: the practical limit on this machine
  uvloop[:PROCS] asyncio[:PROCS]   what a user would pick instead
  threading forking    the recipe's ThreadingTCPServer / ForkingTCPServer
  naive[:N]            hand-written prefork: N forked sync serve_forever() workers
  haproxy[:THREADS] socat          relays, forwarding to a cecho upstream
  prefork[:N]          the project: command from $PREFORK_CMD, default
                       'prefork --bind 127.0.0.1:{port} --workers {n}'
  prefork-relay[:N]    the project as a relay: $PREFORK_RELAY_CMD, default
                       'prefork --bind 127.0.0.1:{port} --workers {n} --relay 127.0.0.1:{upstream}'
The project's commands run in $PROJECT (default: the checkout this folder is
in), so run this with the project's virtual environment active.

Columns: ops_per_s (round trips or connections per second), ops_per_cpu_s
(the same per CPU-second the server's whole process tree used: the figure that
holds when the load generator is the bottleneck), rss_mb (unique memory of the
server tree at the end), latency percentiles, and failure counts, which must
all be 0. starved counts client connections that never got one answer."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers")
TOOLS = os.environ.get("BENCH_TOOLS", os.path.join(os.path.dirname(HERE), "build", "bench"))
ECHOLOAD = os.path.join(TOOLS, "echoload")
CECHO = os.path.join(TOOLS, "cecho")
PROJECT = os.environ.get("PROJECT", os.path.dirname(HERE))
PY = sys.executable
CFLAGS = ["-O2", "-pthread"]


class BuildError(Exception):
    """A C tool could not be compiled; the message says which and why."""


def compiler() -> list[str]:
    """The machine's C compiler: $CC (may carry flags), else cc, else gcc."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc"):
        if shutil.which(name):
            return [name]
    raise BuildError("no C compiler found (set CC, or install gcc: scripts/setup does)")


def build_tools() -> None:
    """Compile the C load generator and reference server unless built from these very sources.

    A stamp beside each program holds a hash of its source and the compiler command, so a changed
    source (or CC) rebuilds and nothing else does; modification times would not do, since a fresh
    clone or a checkout of an older commit gives every file a new one.
    """
    cc = compiler()
    os.makedirs(TOOLS, exist_ok=True)
    for exe, name in ((ECHOLOAD, "echoload.c"), (CECHO, "cecho.c")):
        src = os.path.join(HERE, name)
        cmd = [*cc, *CFLAGS, "-o", exe + ".new", src]
        with open(src, "rb") as f:
            digest = hashlib.sha256(f.read() + "\0".join(cmd).encode()).hexdigest()
        stamp = exe + ".sha256"
        try:
            with open(stamp) as f:
                if f.read().strip() == digest and os.access(exe, os.X_OK):
                    continue
        except FileNotFoundError:
            pass
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildError(f"cannot compile {src}: {exc}") from exc
        if done.returncode != 0:
            raise BuildError(f"cannot compile {src} with {shlex.join(cmd)}:\n{done.stderr.strip()}")
        os.replace(exe + ".new", exe)  # atomic: a run started meanwhile sees the old or the new program
        with open(stamp + ".new", "w") as f:
            f.write(digest + "\n")
        os.replace(stamp + ".new", stamp)


def pinned(cpus: str, argv: list[str]) -> list[str]:
    """``argv`` run on ``cpus`` (taskset's list syntax), or unpinned where taskset or those CPUs are missing."""
    wanted = {int(c) for part in cpus.split(",") for c in _cpu_range(part)}
    if not shutil.which("taskset") or not wanted <= os.sched_getaffinity(0):
        return argv
    return ["taskset", "-c", cpus, *argv]


def _cpu_range(part: str) -> range:
    lo, _, hi = part.partition("-")
    return range(int(lo), int(hi or lo) + 1)


HAPROXY_CFG = """global
    nbthread {n}
    maxconn 9000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server up 127.0.0.1:{upstream}
"""


def server_cmd(name: str, port: int, upstream: int | None = None) -> list[str]:
    kind, _, n = name.partition(":")
    n = n or "1"
    if kind == "haproxy":
        cfg = f"/tmp/compare-haproxy-{port}.cfg"
        with open(cfg, "w") as f:
            f.write(HAPROXY_CFG.format(n=n, port=port, upstream=upstream))
        return ["haproxy", "-db", "-f", cfg]
    if kind == "socat":
        return ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                f"TCP:127.0.0.1:{upstream}"]
    if kind == "prefork-relay":
        tmpl = os.environ.get("PREFORK_RELAY_CMD",
                              "prefork --bind 127.0.0.1:{port} --workers {n} --relay 127.0.0.1:{upstream}")
        return tmpl.format(port=port, n=n, upstream=upstream).split()
    if kind == "cecho":
        return [CECHO, str(port), n]
    if kind in ("asyncio", "uvloop"):
        return [PY, f"{PEERS}/asyncio_echo.py", str(port), n, kind]
    if kind == "threading":
        return [PY, f"{PEERS}/recipe_threading.py", str(port)]
    if kind == "forking":
        return [PY, f"{PEERS}/recipe_forking.py", str(port)]
    if kind == "naive":
        return [PY, f"{PEERS}/naive_prefork.py", str(port), n]
    if kind == "prefork":
        # the project under test; PREFORK_CMD overrides how it is started
        tmpl = os.environ.get("PREFORK_CMD", "prefork --bind 127.0.0.1:{port} --workers {n}")
        return tmpl.format(port=port, n=n).split()
    raise SystemExit(f"unknown server {name}")


def _tree(pid: int) -> tuple[psutil.Process | None, list[psutil.Process]]:
    try:
        root = psutil.Process(pid)
        return root, [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None, []


def tree_cpu(pid: int) -> float:
    """user+system seconds of the server's process tree, reaped children included."""
    root, procs = _tree(pid)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
            if p is root:
                total += t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss(pid: int) -> int:
    """unique set size of the tree (memory it would free if it exited)."""
    _, procs = _tree(pid)
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_full_info().uss
    return total


def wait_port(port: int, timeout: float = 15) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p: int = s.getsockname()[1]
    s.close()
    return p


RELAYS = ("haproxy", "socat", "prefork-relay")


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_one(name: str, args: argparse.Namespace) -> dict[str, str]:
    port = free_port()
    upstream_proc: subprocess.Popen[bytes] | None = None
    upstream: int | None = None
    if name.partition(":")[0] in RELAYS:  # relays forward to a C echo upstream on the load CPUs
        upstream = free_port()
        upstream_proc = subprocess.Popen(pinned(args.load_cpus, [CECHO, str(upstream)]), start_new_session=True)
        wait_port(upstream)
    cmd = pinned(args.server_cpus, server_cmd(name, port, upstream))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=PROJECT)
    try:
        if not wait_port(port):
            return {"error": "did not listen"}
        time.sleep(0.3)
        cpu0 = tree_cpu(proc.pid)
        out = subprocess.run(pinned(args.load_cpus, [ECHOLOAD, "-m", args.mode,
                                                     "-c", str(args.c), "-s", str(args.s), "-d", str(args.d),
                                                     "-t", str(args.t), "127.0.0.1", str(port)]),
                             capture_output=True, text=True, timeout=args.d + 60).stdout
        res = dict(kv.split("=", 1) for kv in out.split())
        cpu = tree_cpu(proc.pid) - cpu0
        res["srv_cpu_s"] = f"{cpu:.2f}"
        res["ops_per_cpu_s"] = f"{int(res.get('ops', 0)) / cpu:.0f}" if cpu > 0 else "-"
        res["rss_mb"] = f"{tree_rss(proc.pid) / 2**20:.0f}"
        return res
    finally:
        stop(proc)
        if upstream_proc:
            stop(upstream_proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="ping")
    ap.add_argument("-c", type=int, default=50)
    ap.add_argument("-s", type=int, default=64)
    ap.add_argument("-d", type=float, default=5)
    ap.add_argument("-t", type=int, default=1)
    ap.add_argument("--server-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("servers", nargs="+")
    args = ap.parse_args()
    build_tools()
    print(f"# mode={args.mode} conns={args.c} size={args.s} secs={args.d} "
          f"server_cpus={args.server_cpus} load_cpus={args.load_cpus}")
    cols = ["ops_per_s", "ops_per_cpu_s", "rss_mb", "p50_us", "p99_us", "errors", "refused", "resets", "short",
            "still_open", "starved"]
    print("server".ljust(14) + "".join(c.rjust(14) for c in cols))
    results: dict[str, list[dict[str, str]]] = {}
    for _r in range(args.rounds):  # interleave servers across rounds: drift hits all alike
        for name in args.servers:
            res = run_one(name, args)
            results.setdefault(name, []).append(res)
            print(name.ljust(14) + "".join(str(res.get(c, res.get("error", "-"))).rjust(14) for c in cols),
                  flush=True)
    if args.rounds > 1:
        base = args.servers[0]
        print(f"# medians over {args.rounds} interleaved rounds; x_ columns: median of the per-round "
              f"ratios against {base} (each ratio taken within one round, so drift cancels)")
        print("server".ljust(14) + "".join(c.rjust(14) for c in
                                            ("ops_per_s", "ops_per_cpu_s", "x_ops", "x_ops_cpu")))
        for name in args.servers:
            row = [f"{median(results[name], 'ops_per_s'):.0f}", f"{median(results[name], 'ops_per_cpu_s'):.0f}",
                   ratio(results[name], results[base], "ops_per_s"),
                   ratio(results[name], results[base], "ops_per_cpu_s")]
            print(name.ljust(14) + "".join(v.rjust(14) for v in row))


def ratio(rows: list[dict[str, str]], base_rows: list[dict[str, str]], key: str) -> str:
    vals = sorted(float(r[key]) / float(b[key]) for r, b in zip(rows, base_rows, strict=True)
                  if r.get(key, "-") not in ("-", None) and b.get(key, "-") not in ("-", None) and float(b[key]))
    return f"{vals[len(vals) // 2]:.2f}" if vals else "-"


def median(rows: list[dict[str, str]], key: str) -> float:
    vals = sorted(float(r[key]) for r in rows if r.get(key, "-") not in ("-", None))
    return vals[len(vals) // 2] if vals else 0.0


if __name__ == "__main__":
    main()
