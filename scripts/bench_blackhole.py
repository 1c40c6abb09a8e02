#!/usr/bin/env python3
"""What a black-holed upstream costs the relay's clients: the table of issue 23, for prefork and HAProxy.

Two upstreams on 127.0.0.1: a black hole (a listening socket whose accept
queue is full, so a connect hangs until its timeout, as to a host that went
away) and an echo server. One relay in front of both (prefork ``--relay``
with one worker, or HAProxy with ``check``), 5 s to connect upstream. CLIENTS
clients one after the other, each sending one line and reading it back
(each bounded by 30 s). Prints one table row per relay: clients, failed,
median, slowest, and how many waited more than 1 s.

  scripts/bench_blackhole.py [--clients 20] [--classes sync,thread,async] [--haproxy]

Bounded: a few clients, each limited in time; the relay is stopped after.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from compare import free_port, stop  # noqa: E402

from prefork.control import ControlError, call  # noqa: E402

CONNECT_TIMEOUT = 5.0
CLIENT_TIMEOUT = 30.0
START_TIMEOUT = 15.0


def black_hole() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket with a full accept queue, and the connections that fill it."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(hole.getsockname())
        fillers.append(filler)
    return hole, fillers


def echo_server() -> socket.socket:
    """An echo upstream, a thread per connection."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(128)

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def client(port: int) -> float | None:
    """Seconds one client took to have its line relayed and echoed; None when it failed."""
    began = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
            s.sendall(b"one line\n")
            got = b""
            while len(got) < 9:
                chunk = s.recv(64)
                if not chunk:
                    return None
                got += chunk
    except OSError:
        return None
    return time.monotonic() - began


def row(name: str, times: list[float | None]) -> str:
    done = [t for t in times if t is not None]
    failed = len(times) - len(done)
    median = f"{statistics.median(done):.3f} s" if done else "-"
    slowest = f"{max(done):.2f} s" if done else "-"
    waited = sum(1 for t in done if t > 1.0)
    return f"| {name} | {len(times)} | {failed} | {median} | {slowest} | {waited} of {len(times)} |"


def wait_prefork(control: str, proc: subprocess.Popen[bytes]) -> bool:
    """Whether the daemon serves within START_TIMEOUT (asked on its control socket: a test connection
    through the relay would meet the black hole before the clients do)."""
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError, ControlError):
            reply, sock = call(control, {"command": "status"}, timeout=2)
            sock.close()
            if reply.get("state") == "serving":
                return True
        time.sleep(0.05)  # polling a process that is starting up, not a synchronisation of the measure
    return False


def run_prefork(worker_class: str, hole: int, echo: int, clients: int, tmp: str) -> list[float | None]:
    port = free_port()
    control = os.path.join(tmp, f"relay-{worker_class}.sock")
    argv = [sys.executable, "-m", "prefork", "--bind", f"127.0.0.1:{port}", "--control", control,
            "-k", worker_class, "--workers", "1", "--log-level", "error",
            "--relay-connect-timeout", str(CONNECT_TIMEOUT),
            "--relay", f"127.0.0.1:{hole}", "--relay", f"127.0.0.1:{echo}"]
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_prefork(control, proc):
            raise RuntimeError(f"prefork -k {worker_class} did not start")
        return [client(port) for _ in range(clients)]
    finally:
        stop(proc, 20.0)


def run_haproxy(hole: int, echo: int, clients: int, tmp: str) -> list[float | None]:
    port = free_port()
    stats = os.path.join(tmp, "haproxy.sock")
    config = os.path.join(tmp, "haproxy.cfg")
    Path(config).write_text(f"""global
    maxconn 1000
    stats socket {stats} level admin
defaults
    mode tcp
    timeout connect {CONNECT_TIMEOUT:g}s
    timeout client 30s
    timeout server 30s
    retries 1
    option redispatch
frontend f
    bind 127.0.0.1:{port}
    default_backend b
backend b
    balance roundrobin
    server hole 127.0.0.1:{hole} check
    server echo 127.0.0.1:{echo} check
""")
    proc = subprocess.Popen(["haproxy", "-f", config], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + START_TIMEOUT
        while not os.path.exists(stats) and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.05)  # waiting for HAProxy to start (its stats socket), not part of the measure
        if not os.path.exists(stats):
            raise RuntimeError("haproxy did not start")
        return [client(port) for _ in range(clients)]
    finally:
        stop(proc, 20.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--classes", default="sync", help="prefork worker classes, comma separated")
    parser.add_argument("--haproxy", action="store_true", help="the same against HAProxy with check")
    args = parser.parse_args(argv)
    print("| | clients | failed | median | slowest | clients that waited > 1 s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for worker_class in args.classes.split(","):
            hole, fillers = black_hole()
            echo = echo_server()
            try:
                times = run_prefork(worker_class, hole.getsockname()[1], echo.getsockname()[1], args.clients, tmp)
            finally:
                for s in (hole, *fillers, echo):
                    s.close()
            print(row(f"prefork relay, {worker_class} w1", times), flush=True)
        if args.haproxy:
            hole, fillers = black_hole()
            echo = echo_server()
            try:
                times = run_haproxy(hole.getsockname()[1], echo.getsockname()[1], args.clients, tmp)
            finally:
                for s in (hole, *fillers, echo):
                    s.close()
            print(row("HAProxy, check", times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
