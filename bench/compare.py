#!/usr/bin/env python3
"""Run echo servers side by side under the same load and print one table.

Each server is started in its own session (so its whole process group can be
stopped), pinned with taskset to --server-cpus; the load generator (echoload.c)
is pinned to --load-cpus.

  compare.py [--mode ping|connect|hold] [-c CONNS] [-s SIZE] [-d SECS] [--rounds N] SERVER...
  compare.py --mode tls-handshake|tls-resume|tls-ping [--tls-key rsa2048|p256] [--tls-max 1.2|1.3] ... TLS-SERVER...

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

TLS: the tls-* modes drive tlsload.c (OpenSSL; compiled with -lssl -lcrypto,
so it needs OpenSSL's headers: Debian's libssl-dev) against servers that
terminate TLS and relay the plain bytes to a cecho upstream on the load CPUs:
  tls-handshake  a new connection per echo, each a full handshake
  tls-resume     the same, each resuming its thread's last session (resumed= counts them)
  tls-ping       persistent TLS connections, round trips
TLS-SERVER is one of:
  stunnel              Debian's stunnel4 (a thread per connection; no count)
  haproxy-tls[:THREADS]   HAProxy, `bind ... ssl crt`
  prefork-tls[:N] prefork-tls-thread[:N]   the project, async or thread workers:
                       $PREFORK_TLS_CMD, default 'prefork --bind 127.0.0.1:{port} --workers {n}
                       --worker-class {worker_class} --relay 127.0.0.1:{upstream} --certfile {certfile}
                       --keyfile {keyfile}' (and a private --control, --log-level warning)
All of them serve one throwaway self-signed certificate, made once per run with
the openssl command into a temporary directory: RSA-2048 (--tls-key rsa2048,
the default, as certificates on the web mostly are) or EC P-256 (--tls-key p256,
whose signatures cost an order of magnitude less, so the server's own work
weighs more).

Columns: ops_per_s (round trips or connections per second), ops_per_cpu_s
(the same per CPU-second the server's whole process tree used: the figure that
holds when the load generator is the bottleneck), rss_mb (unique memory of the
server tree at the end), latency percentiles, and failure counts, which must
all be 0. starved counts client connections that never got one answer. The TLS
modes add srv_cpu_s and load_cpu_s (the load generator's CPU: near the run's
seconds, the load and not the server was the bottleneck), hs_failed (failed
handshakes: a failure like the others), handshakes, resumed (of those) and proto
(the first handshake's version). With --rounds N, --against SERVER (repeatable)
takes the summary's x_ ratios against other servers than the first."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import os
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers")
TOOLS = os.environ.get("BENCH_TOOLS", os.path.join(os.path.dirname(HERE), "build", "bench"))
ECHOLOAD = os.path.join(TOOLS, "echoload")
CECHO = os.path.join(TOOLS, "cecho")
TLSLOAD = os.path.join(TOOLS, "tlsload")
PROJECT = os.environ.get("PROJECT", os.path.dirname(HERE))
PY = sys.executable
CFLAGS = ["-O2", "-pthread"]
TLS_MODES = {"tls-handshake": "handshake", "tls-resume": "resume", "tls-ping": "ping"}  # --mode -> tlsload -m
TLS_SERVERS = ("stunnel", "haproxy-tls", "prefork-tls", "prefork-tls-thread")
TLS_KEYS = {"rsa2048": ["-newkey", "rsa:2048"], "p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]}


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


def build_tools(tls: bool = False) -> None:
    """Compile the C load generator and reference server unless built from these very sources.

    A stamp beside each program holds a hash of its source and the compiler command, so a changed
    source (or CC) rebuilds and nothing else does; modification times would not do, since a fresh
    clone or a checkout of an older commit gives every file a new one. ``tls`` adds the TLS load
    generator, which links OpenSSL (its headers come with Debian's libssl-dev).
    """
    cc = compiler()
    os.makedirs(TOOLS, exist_ok=True)
    tools: list[tuple[str, str, list[str]]] = [(ECHOLOAD, "echoload.c", []), (CECHO, "cecho.c", [])]
    if tls:
        tools.append((TLSLOAD, "tlsload.c", ["-lssl", "-lcrypto"]))
    for exe, name, libs in tools:
        src = os.path.join(HERE, name)
        cmd = [*cc, *CFLAGS, "-o", exe + ".new", src, *libs]
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
            hint = ("\n(tlsload.c needs OpenSSL's headers and libraries: apt-get install libssl-dev)"
                    if libs and "openssl/" in done.stderr else "")
            raise BuildError(f"cannot compile {src} with {shlex.join(cmd)}:\n{done.stderr.strip()}{hint}")
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


HAPROXY_TLS_CFG = HAPROXY_CFG.replace("bind 127.0.0.1:{port}", "bind 127.0.0.1:{port} ssl crt {pem}")

# Foreground, so the process started is the server and its session is what stop() kills; no pid file;
# log level warning, as the others log nothing per connection (stunnel logs each one at notice).
# Defaults otherwise: TCP_NODELAY both ways, OpenSSL's session tickets and a 1,000-session cache.
STUNNEL_CFG = """foreground = yes
pid =
syslog = no
debug = warning
[echo]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{upstream}
cert = {certfile}
key = {keyfile}
"""

PREFORK_TLS_CMD = ("{prefork} --bind 127.0.0.1:{port} --workers {n} --worker-class {worker_class} {threads}"
                   "--relay 127.0.0.1:{upstream} --certfile {certfile} --keyfile {keyfile} "
                   "--log-level warning --control {dir}/prefork-{port}.sock")


@dataclass(frozen=True)
class TlsFiles:
    """The throwaway certificate every TLS server serves, and the directory their configurations go to."""

    dir: str
    certfile: str
    keyfile: str
    pem: str  # certificate and key in one file, as HAProxy's `crt` wants them


@functools.cache
def tls_files(key: str = "rsa2048") -> TlsFiles:
    """A self-signed certificate for localhost/127.0.0.1 with a ``key`` key, made once per process.

    The directory is removed when the process exits.
    """
    if not shutil.which("openssl"):
        raise BuildError("no openssl command: it makes the TLS servers' certificate (apt-get install openssl; "
                         "scripts/setup does)")
    d = tempfile.mkdtemp(prefix="compare-tls-")
    atexit.register(shutil.rmtree, d, True)
    files = TlsFiles(d, os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"), os.path.join(d, "both.pem"))
    cmd = ["openssl", "req", "-x509", *TLS_KEYS[key], "-nodes", "-days", "2", "-subj", "/CN=localhost",
           "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", files.keyfile, "-out", files.certfile]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BuildError(f"cannot make a certificate with {shlex.join(cmd)}:\n{done.stderr.strip()}")
    with open(files.pem, "w") as out:
        for part in (files.certfile, files.keyfile):
            with open(part) as f:
                out.write(f.read())
    return files


def tls_server_cmd(kind: str, n: str, port: int, upstream: int | None, tls: TlsFiles) -> list[str]:
    """The command of one of the TLS_SERVERS, terminating TLS on ``port`` and relaying to ``upstream``."""
    if kind == "stunnel":
        if n != "1":
            raise SystemExit("stunnel takes no count: it runs a thread per connection")
        exe = shutil.which("stunnel4") or shutil.which("stunnel")
        if not exe:
            raise SystemExit("stunnel4 is not installed: apt-get install stunnel4 (scripts/setup does)")
        cfg = os.path.join(tls.dir, f"stunnel-{port}.conf")
        with open(cfg, "w") as f:
            f.write(STUNNEL_CFG.format(port=port, upstream=upstream, certfile=tls.certfile, keyfile=tls.keyfile))
        return [exe, cfg]
    if kind == "haproxy-tls":
        cfg = os.path.join(tls.dir, f"haproxy-{port}.cfg")
        with open(cfg, "w") as f:
            f.write(HAPROXY_TLS_CFG.format(n=n, port=port, upstream=upstream, pem=tls.pem))
        return ["haproxy", "-db", "-f", cfg]
    # the project under test; PREFORK_TLS_CMD overrides how it is started. The thread worker gets a
    # thread for each of the load's connections (50 by default), so none waits for a free one.
    worker_class = "thread" if kind == "prefork-tls-thread" else "async"
    beside = os.path.join(os.path.dirname(PY), "prefork")  # the virtual environment's, if run from one
    tmpl = os.environ.get("PREFORK_TLS_CMD", PREFORK_TLS_CMD)
    return tmpl.format(prefork=beside if os.access(beside, os.X_OK) else "prefork", port=port, n=n,
                       worker_class=worker_class, threads="--threads 64 " if worker_class == "thread" else "",
                       upstream=upstream, certfile=tls.certfile, keyfile=tls.keyfile, dir=tls.dir).split()


def server_cmd(name: str, port: int, upstream: int | None = None, tls: TlsFiles | None = None) -> list[str]:
    kind, _, n = name.partition(":")
    n = n or "1"
    if kind in TLS_SERVERS:
        return tls_server_cmd(kind, n, port, upstream, tls or tls_files())
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


def wait_tls_echo(port: int, timeout: float = 15) -> bool:
    """Whether a TLS client's few bytes come back within ``timeout``: the server (all its workers' start-up
    included) terminates TLS and relays, so the measurement does not start on a server still starting."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the throwaway certificate; the load generator does not verify it either
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.settimeout(max(0.1, end - time.monotonic()))
                tls.sendall(b"ready?")
                got = b""
                while len(got) < 6 and (chunk := tls.recv(6 - len(got))):
                    got += chunk
                if got == b"ready?":
                    return True
        except OSError:  # refused, reset, a handshake failure (ssl.SSLError), a timeout
            pass
        time.sleep(0.05)
    return False


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p: int = s.getsockname()[1]
    s.close()
    return p


RELAYS = ("haproxy", "socat", "prefork-relay", *TLS_SERVERS)


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it if it is not gone within ``timeout``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def load_cmd(args: argparse.Namespace, port: int) -> list[str]:
    """The load generator's command for ``args.mode``: echoload, or tlsload for the tls-* modes."""
    common = ["-c", str(args.c), "-s", str(args.s), "-d", str(args.d), "-t", str(args.t), "127.0.0.1", str(port)]
    if args.mode in TLS_MODES:
        cap = ["-v", args.tls_max] if getattr(args, "tls_max", None) else []
        return [TLSLOAD, "-m", TLS_MODES[args.mode], *cap, *common]
    return [ECHOLOAD, "-m", args.mode, *common]


def run_one(name: str, args: argparse.Namespace) -> dict[str, str]:
    if (name.partition(":")[0] in TLS_SERVERS) != (args.mode in TLS_MODES):
        raise SystemExit(f"{name} with --mode {args.mode}: TLS servers ({', '.join(TLS_SERVERS)}) go with the "
                         f"TLS modes ({', '.join(TLS_MODES)}), the others with ping, connect and hold")
    tls = tls_files(getattr(args, "tls_key", "rsa2048")) if args.mode in TLS_MODES else None
    port = free_port()
    upstream_proc: subprocess.Popen[bytes] | None = None
    upstream: int | None = None
    if name.partition(":")[0] in RELAYS:  # relays forward to a C echo upstream on the load CPUs
        upstream = free_port()
        upstream_proc = subprocess.Popen(pinned(args.load_cpus, [CECHO, str(upstream)]), start_new_session=True)
        wait_port(upstream)
    cmd = pinned(args.server_cpus, server_cmd(name, port, upstream, tls))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=PROJECT)
    try:
        if not wait_port(port):
            return {"error": "did not listen"}
        if tls is not None and not wait_tls_echo(port):
            return {"error": "no TLS echo"}
        time.sleep(0.3)
        cpu0 = tree_cpu(proc.pid)
        load0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(pinned(args.load_cpus, load_cmd(args, port)),
                              capture_output=True, text=True, timeout=args.d + 60)
        if done.stderr.strip():  # tlsload describes its first failure there
            print(f"# {name}: {done.stderr.strip()}", file=sys.stderr, flush=True)
        load1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = dict(kv.split("=", 1) for kv in done.stdout.split())
        cpu = tree_cpu(proc.pid) - cpu0
        # the load generator's own CPU: near secs, it (not the server) was the bottleneck
        res["load_cpu_s"] = f"{load1.ru_utime + load1.ru_stime - load0.ru_utime - load0.ru_stime:.2f}"
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
    ap.add_argument("--mode", default="ping", choices=["ping", "connect", "hold", *TLS_MODES])
    ap.add_argument("--tls-key", default="rsa2048", choices=sorted(TLS_KEYS),
                    help="the TLS servers' certificate key (default rsa2048)")
    ap.add_argument("--tls-max", choices=["1.2", "1.3"],
                    help="the newest TLS version the load generator offers (default: 1.3, what all servers speak)")
    ap.add_argument("-c", type=int, default=50)
    ap.add_argument("-s", type=int, default=64)
    ap.add_argument("-d", type=float, default=5)
    ap.add_argument("-t", type=int, default=1)
    ap.add_argument("--server-cpus", default="1")
    ap.add_argument("--load-cpus", default="0")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--against", action="append", metavar="SERVER",
                    help="with --rounds > 1, a server the x_ ratios are taken against (repeatable; default: "
                         "the first)")
    ap.add_argument("servers", nargs="+")
    args = ap.parse_args()
    bases = args.against or [args.servers[0]]
    if not set(bases) <= set(args.servers):
        ap.error(f"--against {', '.join(sorted(set(bases) - set(args.servers)))}: not among the servers")
    tls = args.mode in TLS_MODES
    try:
        build_tools(tls=tls)
        if tls:
            tls_files(args.tls_key)
    except BuildError as exc:
        raise SystemExit(f"compare.py: {exc}") from exc
    print(f"# mode={args.mode} conns={args.c} size={args.s} secs={args.d} "
          f"server_cpus={args.server_cpus} load_cpus={args.load_cpus}" + (f" tls_key={args.tls_key}" if tls else "")
          + (f" tls_max={args.tls_max}" if tls and args.tls_max else ""))
    cols = ["ops_per_s", "ops_per_cpu_s", "rss_mb", "p50_us", "p99_us", "errors", "refused", "resets", "short",
            "still_open", "starved"]
    if tls:  # handshakes that failed, and (what resume mode is about) how many of them resumed a session
        cols[5:5] = ["hs_failed"]
        cols[2:2] = ["srv_cpu_s", "load_cpu_s"]
        cols += ["handshakes", "resumed", "proto"]
    print("server".ljust(20) + "".join(c.rjust(14) for c in cols))
    results: dict[str, list[dict[str, str]]] = {}
    for _r in range(args.rounds):  # interleave servers across rounds: drift hits all alike
        for name in args.servers:
            res = run_one(name, args)
            results.setdefault(name, []).append(res)
            print(name.ljust(20) + "".join(str(res.get(c, res.get("error", "-"))).rjust(14) for c in cols),
                  flush=True)
    if args.rounds > 1:
        print(f"# medians over {args.rounds} interleaved rounds; x_ columns: median of the per-round "
              f"ratios against {' and '.join(bases)} (each ratio taken within one round, so drift cancels)")
        xcols = [f"x_{what}:{b}" if len(bases) > 1 else f"x_{what}" for b in bases for what in ("ops", "ops_cpu")]
        width = max(14, *(len(c) + 2 for c in xcols))
        print("server".ljust(20) + "".join(c.rjust(14) for c in ("ops_per_s", "ops_per_cpu_s"))
              + "".join(c.rjust(width) for c in xcols))
        for name in args.servers:
            row = [f"{median(results[name], 'ops_per_s'):.0f}", f"{median(results[name], 'ops_per_cpu_s'):.0f}"]
            xs = [ratio(results[name], results[b], key) for b in bases for key in ("ops_per_s", "ops_per_cpu_s")]
            print(name.ljust(20) + "".join(v.rjust(14) for v in row) + "".join(v.rjust(width) for v in xs))


def ratio(rows: list[dict[str, str]], base_rows: list[dict[str, str]], key: str) -> str:
    vals = sorted(float(r[key]) / float(b[key]) for r, b in zip(rows, base_rows, strict=True)
                  if r.get(key, "-") not in ("-", None) and b.get(key, "-") not in ("-", None) and float(b[key]))
    return f"{vals[len(vals) // 2]:.2f}" if vals else "-"


def median(rows: list[dict[str, str]], key: str) -> float:
    vals = sorted(float(r[key]) for r in rows if r.get(key, "-") not in ("-", None))
    return vals[len(vals) // 2] if vals else 0.0


if __name__ == "__main__":
    main()
