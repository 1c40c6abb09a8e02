"""Worker classes and handlers end to end: any socketserver handler, unchanged, under ``sync`` and ``thread``.

Covers issue 2 points 2, 4 and 10: the recipe's two handlers, ``self.server`` /
``self.client_address``, the handler class options (``timeout``, ``rbufsize``,
``wbufsize``, ``disable_nagle_algorithm``), exceptions in ``handle()``, the
thread pool's bound, ``sync``'s one connection at a time, the bind forms
(IPv4, IPv6, Unix, several at once, refusals) and the non-blocking listener.
"""

from __future__ import annotations

import ast
import hashlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from conftest import Daemon, Load, exchange, read_line, recv_exact, wait_for

DaemonFactory = Callable[..., Daemon]

WORKER_CLASSES = ["sync", "thread"]
CASES = "handlers_cases"


# -- helpers ---------------------------------------------------------------------------------------------


def ask(d: Daemon, payload: bytes = b"") -> bytes:
    """Connect, send ``payload`` (if any), return the first line the server sends."""
    with d.connect() as s:
        if payload:
            s.sendall(payload)
        return read_line(s)


def echo_once(s: socket.socket, payload: bytes) -> None:
    s.sendall(payload)
    assert recv_exact(s, len(payload)) == payload


def active_by_worker(d: Daemon) -> list[int]:
    return [w["active"] for w in d.status()["workers"]]


def assert_not_served(s: socket.socket, wait: float = 0.5) -> None:
    """Nothing comes back on ``s`` within ``wait`` seconds (the connection sits in the backlog)."""
    s.settimeout(wait)
    with pytest.raises(TimeoutError):
        s.recv(1)
    s.settimeout(5.0)


def read_until_eof(s: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := s.recv(65536):
        buf += chunk
    return bytes(buf)


def log_lines(d: Daemon, text: str) -> list[str]:
    return [line for line in d.log().splitlines() if text in line]


def has_ipv6_loopback() -> tuple[bool, str]:
    """True if this machine can bind ::1 (the only reason the IPv6 test may skip)."""
    if not socket.has_ipv6:
        return False, "Python was built without IPv6 support (socket.has_ipv6 is False)"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return False, f"cannot bind [::1]:0 on this machine: {exc}"
    return True, ""


# -- 1. the recipe's handlers, unchanged, under both worker classes ---------------------------------------


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_recipe_echo_handler(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "recipe_handlers:EchoHandler")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(("localhost", d.port))
    assert s.send(b"Hello") == 5
    assert s.recv(8192) == b"Hello"
    echo_once(s, b"and again on the same connection")
    client = s.getsockname()
    s.close()
    wait_for(lambda: f"Got connection from {client!r}" in d.log(), 5, "the handler's print() in the log")


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_recipe_stream_echo_handler(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "recipe_handlers:StreamEchoHandler")
    with d.connect() as s:
        for i in range(5):
            line = f"line {i} of a line echo\n".encode()
            s.sendall(line)
            assert read_line(s) == line
        # several lines in one segment come back as the same lines
        s.sendall(b"one\ntwo\nthree\n")
        assert [read_line(s) for _ in range(3)] == [b"one\n", b"two\n", b"three\n"]
        client = s.getsockname()
    wait_for(lambda: f"Got connection from {client!r}" in d.log(), 5, "the handler's print() in the log")


# -- 2. self.server and self.client_address ------------------------------------------------------------


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_server_and_client_address(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, f"{CASES}:WhoHandler")
    for _ in range(3):
        with d.connect() as s:
            reply = read_line(s)
            client = s.getsockname()
        client_address, server_address, is_tcp_server = ast.literal_eval(reply.decode())
        assert client_address == client
        assert server_address == ("127.0.0.1", d.port)
        assert is_tcp_server is True


# -- 3. handler class options ------------------------------------------------------------------------


def assert_idle_timeout(d: Daemon, s: socket.socket) -> None:
    """The server closes ``s`` about 0.5 s after it went idle and logs one warning line for it."""
    port = s.getsockname()[1]
    start = time.monotonic()
    assert s.recv(1) == b""  # EOF, not our 5 s client timeout
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed <= 3.0, f"idle connection closed after {elapsed:.2f}s, expected ~0.5s"
    expected = f"connection from 127.0.0.1:{port} timed out"
    wait_for(lambda: log_lines(d, expected), 5, "the timed-out warning")
    assert len(log_lines(d, expected)) == 1
    assert "WARNING" in log_lines(d, expected)[0]
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_stream_handler_timeout_closes_idle_connection(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, f"{CASES}:StreamTimeoutHandler")
    with d.connect() as s:
        s.sendall(b"ping\n")
        assert read_line(s) == b"ping\n"
        assert_idle_timeout(d, s)
    assert exchange(d.address(), b"still serving\n") == b"still serving\n"


def test_plain_handler_timeout_is_applied(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("-k", "thread", f"{CASES}:PlainTimeoutHandler")
    with d.connect() as s:
        assert read_line(s) == b"0.5\n"
        echo_once(s, b"ping")
        assert_idle_timeout(d, s)


@pytest.mark.parametrize(("handler", "nodelay"), [
    ("NagleOffHandler", True),
    ("NagleDefaultHandler", True),  # documented: Nagle is off on every TCP connection
    ("NagleBackOnHandler", False),  # ... and a handler can turn it back on
    ("PlainNagleOffHandler", True),
])
def test_disable_nagle_algorithm(daemon_factory: DaemonFactory, handler: str, nodelay: bool) -> None:
    d = daemon_factory("-k", "sync", "--workers", "1", f"{CASES}:{handler}")
    value = int(ask(d))
    assert (value != 0) is nodelay, f"{handler}: TCP_NODELAY = {value}"


@pytest.mark.parametrize(("handler", "types"), [
    ("DefaultBuffersHandler", b"BufferedReader _SocketWriter\n"),  # rbufsize -1, wbufsize 0
    ("CustomBuffersHandler", b"SocketIO BufferedWriter\n"),  # rbufsize 0, wbufsize 65536
])
def test_rbufsize_wbufsize(daemon_factory: DaemonFactory, handler: str, types: bytes) -> None:
    d = daemon_factory("-k", "thread", "--workers", "1", f"{CASES}:{handler}")
    assert ask(d) == types


# -- 4. an exception in handle() ----------------------------------------------------------------------


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_exception_in_handle_closes_that_connection_only(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--workers", "1", f"{CASES}:BoomHandler")
    [before] = d.status()["workers"]
    other = d.connect() if worker_class == "thread" else None  # sync serves one at a time: no bystander
    try:
        if other is not None:
            echo_once(other, b"bystander\n")
        with d.connect() as s:
            port = s.getsockname()[1]
            echo_once(s, b"hi\n")
            s.sendall(b"boom\n")
            assert s.recv(1) == b"", "the failing connection was not closed"
        wait_for(lambda: log_lines(d, f"error handling connection from 127.0.0.1:{port}"), 5, "the error log line")
        log = d.log()
        assert "Traceback (most recent call last)" in log
        assert f"RuntimeError: boom requested by {port}" in log
        [after] = d.status()["workers"]
        assert after["pid"] == before["pid"]
        assert after["state"] == "ready"
        assert after["errors"] == before["errors"] + 1
        if other is not None:
            echo_once(other, b"bystander still served\n")
        assert exchange(d.address(), b"new connection\n") == b"new connection\n"
    finally:
        if other is not None:
            other.close()
    assert d.status()["workers"][0]["pid"] == before["pid"]


# -- 5. many long-lived clients on the thread worker ----------------------------------------------------


def test_fifty_long_lived_clients_on_two_thread_workers(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("-k", "thread", "--workers", "2")
    clients: list[socket.socket] = []
    try:
        for i in range(50):
            s = d.connect()
            clients.append(s)
            echo_once(s, f"hello from {i}\n".encode())
        active = wait_for(lambda: (a := active_by_worker(d)) and sum(a) == 50 and a, 5, "50 active connections")
        assert len(active) == 2 and all(0 < a <= 32 for a in active), active  # 32 threads each: both serve
        for rnd in range(5):
            for i, s in enumerate(clients):
                s.sendall(f"round {rnd} client {i}\n".encode())
            for i, s in enumerate(clients):
                want = f"round {rnd} client {i}\n".encode()
                assert recv_exact(s, len(want)) == want
    finally:
        for s in clients:
            s.close()
    wait_for(lambda: sum(active_by_worker(d)) == 0, 5, "every connection closed")


# -- 6. the thread pool's bound ------------------------------------------------------------------------


def test_full_thread_worker_stops_accepting(daemon_factory: DaemonFactory) -> None:
    # handlers that work (not wait on their client) are never reclaimed: the pool's bound holds
    d = daemon_factory("-k", "thread", "--threads", "2", "--workers", "2", f"{CASES}:WorkHandler")
    held: list[socket.socket] = []
    try:
        for i in range(4):
            s = d.connect()
            held.append(s)
            echo_once(s, f"held {i}".encode())
        wait_for(lambda: active_by_worker(d) == [2, 2], 5, "both workers at 2 active")
        with d.connect() as fifth:  # the kernel accepts it into the backlog
            fifth.sendall(b"fifth")
            assert_not_served(fifth)
            assert active_by_worker(d) == [2, 2]
            held.pop(0).close()
            assert recv_exact(fifth, 5) == b"fifth"
    finally:
        for s in held:
            s.close()


def test_thread_burst_never_exceeds_threads(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("-k", "thread", "--threads", "2", "--workers", "2")
    procs = [psutil.Process(w["pid"]) for w in d.status()["workers"]]
    samples: list[int] = []

    def sample() -> bool:
        samples.extend(p.num_threads() for p in procs)
        return False

    with Load(d.address(), clients=16, mode="connect", max_seconds=20, max_exchanges=200) as load:
        wait_for(lambda: sample() or load.ok >= 200 or load.failures, 20, "200 short connections")
    sample()
    assert load.failures == []
    assert load.ok >= 200
    assert len(samples) >= 6
    assert max(samples) <= 3, samples  # the main thread and at most --threads pool threads
    assert max(samples) == 3, samples  # the pool did fill up, so the bound was tested


# -- 7. sync: one connection at a time per worker -------------------------------------------------------


def test_sync_one_connection_at_a_time(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("-k", "sync", "--workers", "2", f"{CASES}:WorkHandler")
    held: list[socket.socket] = []
    try:
        for i in range(2):
            s = d.connect()
            held.append(s)
            echo_once(s, f"held {i}".encode())
        wait_for(lambda: active_by_worker(d) == [1, 1], 5, "each worker busy with one connection")
        with d.connect() as third:
            third.sendall(b"third")
            assert_not_served(third)
            held.pop().close()
            assert recv_exact(third, 5) == b"third"
    finally:
        for s in held:
            s.close()


# -- 8. binds -------------------------------------------------------------------------------------------


def test_ipv6_bind(daemon_factory: DaemonFactory) -> None:
    ok, why = has_ipv6_loopback()
    if not ok:
        print(f"skipping the IPv6 test: {why}")
        pytest.skip(why)
    d = daemon_factory("--bind", "[::1]:0")
    [listener] = d.status()["listeners"]
    assert listener.startswith("[::1]:")
    port = int(listener.rsplit(":", 1)[1])
    assert exchange(("::1", port), b"over IPv6") == b"over IPv6"


def unix_exchange(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        return recv_exact(s, len(payload))


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_unix_bind_serves_and_is_removed_on_stop(daemon_factory: DaemonFactory, tmp_path: Path,
                                                 worker_class: str) -> None:
    path = tmp_path / "e.sock"
    d = daemon_factory("-k", worker_class, "--bind", f"unix:{path}")
    assert d.status()["listeners"] == [f"unix:{path}"]
    for i in range(3):
        assert unix_exchange(path, f"unix {i}".encode()) == f"unix {i}".encode()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    assert not path.exists()


def test_unix_bind_refuses_regular_file(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("precious\n")
    d = daemon_factory("--bind", f"unix:{path}", wait=False)
    assert d.wait_exit(10) != 0
    lines = [line for line in d.log().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "not a socket" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in lines[0]
    assert path.is_file() and path.read_text() == "precious\n"


def test_two_binds_both_serve(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "b.sock"
    d = daemon_factory("--bind", "127.0.0.1:0", "--bind", f"unix:{path}")
    listeners = d.status()["listeners"]
    assert len(listeners) == 2 and f"unix:{path}" in listeners
    assert d.port != 0
    for i in range(3):
        assert exchange(d.address(), f"tcp {i}".encode()) == f"tcp {i}".encode()
        assert unix_exchange(path, f"unix {i}".encode()) == f"unix {i}".encode()


def test_port_in_use(daemon_factory: DaemonFactory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = daemon_factory("--bind", f"127.0.0.1:{port}", wait=False)
        assert d.wait_exit(10) == 1
        lines = [line for line in d.log().splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert "address already in use" in lines[0] and f"127.0.0.1:{port}" in lines[0]


# -- 9. the listening socket is non-blocking in workers ------------------------------------------------


def listener_flags(pid: int, port: int) -> int:
    """The open-file flags of ``pid``'s listening socket on ``port`` (from /proc/PID/fdinfo)."""
    [conn] = [c for c in psutil.Process(pid).net_connections("tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    for line in Path(f"/proc/{pid}/fdinfo/{conn.fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags in /proc/{pid}/fdinfo/{conn.fd}")


def test_sync_workers_listener_nonblocking_under_burst(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("-k", "sync", "--workers", "4")
    for w in d.status()["workers"]:
        assert listener_flags(w["pid"], d.port) & os.O_NONBLOCK, f"worker {w['pid']}: blocking listener"
    with Load(d.address(), clients=100, mode="connect", max_seconds=10, max_exchanges=2000) as load:
        wait_for(lambda: load.ok >= 2000 or load.failures, 15, "2000 exchanges from 100 concurrent clients")
    assert load.failures == []
    assert load.ok >= 2000
    # a connection is counted once the server saw the client close, a moment after the client's last read
    wait_for(lambda: sum(w["requests"] for w in d.status()["workers"]) >= load.ok, 5, "every exchange counted")
    assert all(w["state"] == "ready" for w in d.status()["workers"])


# -- 10. a large payload through the default echo handler ---------------------------------------------


@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_large_payload_echo(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    payload = os.urandom(4 * 1024 * 1024)
    errors: list[BaseException] = []
    with d.connect(timeout=10) as s:

        def send() -> None:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = read_until_eof(s)
        sender.join(10)
    assert errors == []
    assert len(got) == len(payload)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
