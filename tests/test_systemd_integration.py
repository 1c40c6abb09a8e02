"""The daemon under systemd's protocols: sd_notify lifecycle and socket activation, with the real tools."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tlsutil import Pki, client_context

from conftest import APPS, ROOT, Daemon, child_env, exchange, wait_for
from prefork.control import call


class NotifyReceiver:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def wait(self, predicate: Callable[[str], bool], what: str, start: int = 0, timeout: float = 20.0) -> int:
        """Index of the first message from ``start`` on that matches."""

        def find() -> int | None:
            for i, m in enumerate(self.poll()[start:], start):
                if predicate(m):
                    return i + 1  # +1 so index 0 is truthy
            return None

        return int(wait_for(find, timeout, what)) - 1


def test_notify_lifecycle(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    receiver = NotifyReceiver(tmp_path / "notify")
    env = child_env(NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="300000")
    d = daemon_factory("--workers", "2", env=env)
    ready = receiver.wait(lambda m: "READY=1" in m, "READY=1")
    # READY means every first-generation worker accepts: a connection succeeds at once
    assert exchange(d.address(), b"ping") == b"ping"
    assert "STATUS=" in receiver.messages[ready]
    watchdogs = receiver.wait(lambda m: m == "WATCHDOG=1", "WATCHDOG=1", start=ready)
    assert watchdogs > ready

    d.signal(signal.SIGHUP)
    reloading = receiver.wait(lambda m: m.startswith("RELOADING=1"), "RELOADING=1", start=ready + 1)
    assert "MONOTONIC_USEC=" in receiver.messages[reloading]
    usec = int(receiver.messages[reloading].split("MONOTONIC_USEC=")[1].split()[0])
    assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 30
    receiver.wait(lambda m: "READY=1" in m, "READY=1 after the reload", start=reloading + 1)
    assert d.status()["generation"] == 2

    d.signal(signal.SIGTERM)
    receiver.wait(lambda m: m == "STOPPING=1", "STOPPING=1")
    assert d.wait_exit() == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def socket_activated(tmp_path: Path, port: int, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``systemd-socket-activate -l 127.0.0.1:PORT`` exec'ing ``prefork ARGS`` on the first connection;
    yields once it listens, and kills its group at the end."""
    log_path = tmp_path / "act.log"
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=echo",
           "-E", f"PYTHONPATH={APPS}{os.pathsep}{ROOT}",
           sys.executable, "-m", "prefork", "--workers", "2", *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=child_env())
    try:
        wait_for(lambda: "Listening on" in log_path.read_text(), 10, "systemd-socket-activate to listen")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
def test_socket_activation_first_connection_served(tmp_path: Path) -> None:
    port = _free_port()
    control = str(tmp_path / "act.sock")
    # --bind is ignored: the inherited socket wins
    with socket_activated(tmp_path, port, "--control", control, "--bind", "127.0.0.1:1") as proc:
        # this first connection starts the daemon, and must be served
        assert exchange(("127.0.0.1", port), b"first!", timeout=20) == b"first!"
        reply, sock = call(control, {"command": "status"})
        sock.close()
        assert reply["listeners"] == [f"127.0.0.1:{port}"]
        assert reply["pid"] == proc.pid  # systemd-socket-activate execs the daemon in place
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed")
def test_socket_activation_with_tls(tmp_path: Path) -> None:
    """A socket systemd passed speaks TLS with --certfile, and its first connection (the one that
    started the daemon) gets its handshake served."""
    pki = Pki(tmp_path / "pki")
    port = _free_port()
    control = str(tmp_path / "tls.sock")
    with socket_activated(tmp_path, port, "--control", control, *pki.server().args()) as proc:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        with client_context(pki).wrap_socket(raw, server_hostname="localhost") as s:
            assert s.version() is not None
            s.sendall(b"first!\n")
            assert s.recv(100) == b"first!\n"
        reply, sock = call(control, {"command": "status"})
        sock.close()
        assert reply["listeners"] == [f"127.0.0.1:{port}"] and f"127.0.0.1:{port}" in reply["tls"]
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
