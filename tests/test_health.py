"""``GET /healthz`` and ``GET /readyz`` on the ``--metrics-bind`` port, in each state of a live daemon.

/healthz is 200 whenever the master's loop answers; /readyz is 200 while the
daemon serves and takes new connections, 503 while it starts, drains or
stops, with a one-line body saying which.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path

from test_agent import agent_line
from test_haproxy import free_port

from conftest import Daemon, child_env, read_line, wait_for

STARTING = "starting: the first generation is not serving yet"


def http(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status code, Content-Type, body) of one request to the metrics port."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == (len(body) if method != "HEAD" else int(headers["Content-Length"]))
    return int(lines[0].split()[1]), headers["Content-Type"], body.decode()


def probes(port: int) -> tuple[tuple[int, str], tuple[int, str]]:
    """((/healthz code, body), (/readyz code, body))."""
    health, ready = http(port, "/healthz"), http(port, "/readyz")
    return (health[0], health[2]), (ready[0], ready[2])


def test_probes_while_serving_draining_and_stopping(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    d = daemon_factory("--metrics-bind", f"127.0.0.1:{port}", "--proxy-protocol", "--graceful-timeout", "20",
                       "proxy_peer:PeerHandler")
    assert probes(port) == ((200, "alive\n"), (200, "ready\n"))
    assert http(port, "/readyz")[1] == "text/plain; charset=utf-8"
    assert http(port, "/readyz", "HEAD")[::2] == (200, "")
    assert http(port, "/metrics")[0] == 200  # the metrics are still there
    assert http(port, "/ready")[0] == 404

    assert d.ctl("drain").returncode == 0  # behind PROXY protocol: health checks fail, clients are served
    assert probes(port) == ((200, "alive\n"), (503, "draining (preforkctl drain)\n"))
    assert d.ctl("drain", "--off").returncode == 0
    assert probes(port) == ((200, "alive\n"), (200, "ready\n"))

    held = d.connect()  # keeps the master in its stopping state until it closes
    held.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 20000\r\n")
    assert read_line(held, limit=100) == b"192.0.2.1 40000\n"
    d.signal(15)
    wait_for(lambda: (d.try_status() or {}).get("state") == "stopping", 5, "the master to be stopping")
    assert probes(port) == ((200, "alive\n"), (503, "stopping\n"))  # alive: its loop still turns
    held.close()
    assert d.wait_exit(10) == 0


def test_drain_that_closes_the_listeners_is_not_ready(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    d = daemon_factory("--metrics-bind", f"127.0.0.1:{port}")
    assert probes(port)[1] == (200, "ready\n")
    assert d.ctl("drain", "--close").returncode == 0  # the listening sockets close, for good
    assert probes(port) == ((200, "alive\n"), (503, "draining (preforkctl drain)\n"))


def test_probes_and_agent_while_starting(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    """The worker's handler module waits on a FIFO at import: the daemon stays starting until the test opens it."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # the start's check imports it first (before anything is bound) and passes; the mold's import waits
    (tmp_path / "gated.py").write_text(
        "import os\n"
        "if os.path.exists(os.environ['CHECKED']):\n"
        "    with open(os.environ['GATE'], 'rb') as fifo:  # blocks until the test opens it for writing\n"
        "        fifo.read()\n"
        "else:\n"
        "    open(os.environ['CHECKED'], 'w').close()\n"
        "from prefork.handlers.echo import EchoHandler  # noqa: E402\n")
    port, agent_port = free_port(), free_port()
    d = daemon_factory("--metrics-bind", f"127.0.0.1:{port}", "--agent-bind", f"127.0.0.1:{agent_port}",
                       "gated:EchoHandler", workers=1, wait=False,
                       env=child_env(GATE=str(gate), CHECKED=str(tmp_path / "checked")))

    def worker_waits() -> int | None:
        try:  # a non-blocking open for writing succeeds once the worker has the FIFO open for reading
            return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return None

    writer = wait_for(worker_waits, 20, "the worker to import its handler")
    try:
        assert d.status()["state"] == "starting"
        assert probes(port) == ((200, "alive\n"), (503, f"{STARTING}\n"))
        assert agent_line(agent_port) == "maint\n"
    finally:
        os.close(writer)  # the worker's import goes on
    d.wait_serving()
    assert probes(port) == ((200, "alive\n"), (200, "ready\n"))
    assert agent_line(agent_port) == "ready up 100%\n"
