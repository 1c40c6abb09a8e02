"""Time to stop, and time until a reload's old generation is gone, with N idle long-lived connections.

Each idle client connects and stays silent, as the recipe's echo client does
between messages. For each N the script starts a daemon (default settings
unless options follow ``--``), opens N such connections, then either sends
SIGTERM and times the exit (``stop``), or runs ``preforkctl reload`` and
times until no worker of generation 1 is left (``reload``). Every wait is
bounded (``--limit``). ``--root`` runs another checkout's code (an extracted
``git archive``), so a figure "before" a change comes from the same script::

    .venv/bin/python bench/idle_drain.py --counts 0,100,1000
    PYTHONPATH=$PWD/tests/apps .venv/bin/python bench/idle_drain.py -- long_lived_handlers:DrainAwareEcho
    git archive 19be9a3 | tar -x -C /tmp/before && .venv/bin/python bench/idle_drain.py --root /tmp/before
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def env_for(root: Path) -> dict[str, str]:
    """Our environment, with ``root`` first on the import path (a handler's module may follow it)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}


def ctl(root: Path, control: str, *args: str) -> dict[str, object]:
    r = subprocess.run([sys.executable, "-m", "prefork.ctl", "--control", control, *args, "--json"],
                       env=env_for(root), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"preforkctl {' '.join(args)}: {r.stderr.strip()}")
    reply: dict[str, object] = json.loads(r.stdout)
    return reply


def wait(predicate: object, limit: float, what: str) -> float:
    """Seconds until ``predicate()`` holds, looking every 20 ms; raises after ``limit``."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - began
        time.sleep(0.02)
    raise TimeoutError(f"{what}: not within {limit:g}s")


def measure(root: Path, mode: str, count: int, options: list[str], limit: float) -> float:
    with tempfile.TemporaryDirectory(prefix="idle-drain-") as tmp:
        control = str(Path(tmp) / "c.sock")
        with open(Path(tmp) / "log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "prefork", "--bind", "127.0.0.1:0", "--control", control,
                                     *options], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env_for(root), cwd=tmp)
        clients: list[socket.socket] = []
        try:
            wait(lambda: os.path.exists(control) and ctl(root, control, "status").get("state") == "serving",
                 30, "the daemon to serve")
            listeners = ctl(root, control, "status")["listeners"]
            assert isinstance(listeners, list)
            host, port = str(listeners[0]).rsplit(":", 1)
            clients = [socket.create_connection((host, int(port)), timeout=10) for _ in range(count)]
            began = time.monotonic()
            if mode == "stop":
                proc.send_signal(signal.SIGTERM)
                proc.wait(limit)
            else:
                ctl(root, control, "reload")

                def old_gone() -> bool:
                    workers = ctl(root, control, "status")["workers"]
                    assert isinstance(workers, list)
                    return all(w["generation"] != 1 for w in workers)

                wait(old_gone, limit, "the old generation to be gone")
            return time.monotonic() - began
        finally:
            for s in clients:
                s.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                   help="the checkout whose prefork runs (default: this one)")
    p.add_argument("--counts", default="0,100,1000", help="idle connections, comma-separated")
    p.add_argument("--mode", choices=["stop", "reload", "both"], default="both")
    p.add_argument("--limit", type=float, default=120.0, help="seconds any one measurement may take")
    p.add_argument("options", nargs="*", help="daemon options (after --)")
    args = p.parse_args()
    modes = ["stop", "reload"] if args.mode == "both" else [args.mode]
    print("| mode | idle connections | seconds |\n|---|---|---|")
    for mode in modes:
        for count in (int(c) for c in args.counts.split(",")):
            took = measure(args.root, mode, count, args.options, args.limit)
            print(f"| {mode} | {count} | {took:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
