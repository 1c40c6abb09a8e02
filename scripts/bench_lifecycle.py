"""Connections lost per lifecycle event: stop with a full queue, reload, recycling (see BENCHMARKS.md).

Runs the prefork found first on PYTHONPATH (so the same script measures an
older checkout too), on loopback, every run bounded in time:

* stop: one sync worker whose handler takes 50 ms, 100 clients queued, then
  SIGTERM: how many were answered or reset, and the time from TERM to exit;
* reload: 10 reloads under connect load (6 clients): failed exchanges;
* recycle: --max-requests 50 --max-requests-jitter 10 under connect load for
  10 s: failed exchanges and exits read as early deaths ("restarting in").

Usage: python scripts/bench_lifecycle.py
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HANDLERS = Path(__file__).resolve().parents[1] / "tests" / "apps"


def start(tmp: Path, *args: str) -> tuple[subprocess.Popen[bytes], int, str, Path]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    control = str(tmp / f"c{port}.sock")
    log = tmp / f"d{port}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HANDLERS), os.environ.get("PYTHONPATH", "")]))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefork", "--bind", f"127.0.0.1:{port}", "--control", control,
                                 *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=tmp)  # not the checkout: python -m would import the prefork there
    deadline = time.monotonic() + 20
    while "serving:" not in log.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"prefork did not start:\n{log.read_text()}")
        time.sleep(0.05)  # a benchmark's start-up wait, not a test's synchronisation
    return proc, port, control, log


def ctl(control: str, *args: str) -> int:
    return subprocess.run([sys.executable, "-m", "prefork.ctl", "--control", control, *args],
                          capture_output=True, timeout=120, cwd=os.path.dirname(control)).returncode


class ConnectLoad:
    def __init__(self, port: int, clients: int = 6) -> None:
        self.port, self.ok, self.failed = port, 0, 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"x\n")
                    self.ok += s.recv(16) == b"x\n"
            except OSError:
                self.failed += 1

    def __enter__(self) -> ConnectLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def stop_with_queue(tmp: Path) -> str:
    proc, port, _, _ = start(tmp, "-k", "sync", "-w", "1", "--graceful-timeout", "60", "zero_loss_handlers:SlowEcho")
    clients = []
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(f"{i}\n".encode())
        clients.append(s)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    answered = reset = 0
    for s in clients:
        try:
            s.settimeout(90)
            answered += s.recv(16).endswith(b"\n")
        except OSError:
            reset += 1
        s.close()
    proc.wait(120)
    return f"stop, 100 queued on 1 sync worker (50 ms each): {answered} answered, {reset} reset, " \
           f"TERM to exit {time.monotonic() - t0:.1f} s"


def reloads(tmp: Path) -> str:
    proc, port, control, _ = start(tmp, "-w", "2")
    with ConnectLoad(port) as load:
        codes = [ctl(control, "reload") for _ in range(10)]
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return f"10 reloads under connect load: {load.ok} exchanges, {load.failed} failed, reload exit codes {set(codes)}"


def recycling(tmp: Path) -> str:
    proc, port, _, log = start(tmp, "-w", "2", "--max-requests", "50", "--max-requests-jitter", "10")
    with ConnectLoad(port) as load:
        time.sleep(10)  # the measured period
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    text = log.read_text()
    return (f"recycling 10 s under connect load (--max-requests 50): {load.ok} exchanges, {load.failed} failed, "
            f"{text.count('retiring')} retirements, {text.count('restarting in')} read as early deaths")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="prefork-lifecycle-") as tmp:
        for run in (stop_with_queue, reloads, recycling):
            print(run(Path(tmp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
