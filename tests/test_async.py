"""The async worker class: both handler shapes, the daemon's contract, the connection cap."""

from __future__ import annotations

import contextlib
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from conftest import Daemon, Load, child_env, exchange, read_line, recv_exact, wait_for
from prefork.proxy_protocol import build_v2

LOOPS = ["uvloop", "asyncio"]  # uvloop is installed here (prefork[fast]); asyncio is what runs without it


def echoed_connections(d: Daemon, n: int) -> list[socket.socket]:
    """``n`` open connections, each known to be served (one byte echoed)."""
    held: list[socket.socket] = []
    try:
        for i in range(n):
            held.append(d.connect())
            held[-1].sendall(b"%d" % i)
            assert recv_exact(held[-1], 1) == b"%d" % i
    except BaseException:
        for s in held:  # a failure leaves none open to keep the daemon's stop draining
            s.close()
        raise
    return held


@pytest.mark.parametrize("loop", LOOPS)
def test_builtin_echo_runs_as_a_protocol(daemon_factory: Callable[..., Daemon], loop: str) -> None:
    d = daemon_factory("-k", "async", "--loop", loop)
    assert d.status()["handler"] == "prefork.handlers.aio:EchoProtocol"
    assert d.status()["event_loop"] == loop
    assert f"async worker(s) ({loop}) of prefork.handlers.aio:EchoProtocol" in d.ctl("status").stdout
    s = socket.create_connection(("localhost", d.port))
    assert s.send(b"Hello") == 5
    assert s.recv(8192) == b"Hello"
    s.close()
    assert exchange(d.address(), b"x" * 4 * 1024 * 1024, timeout=20) == b"x" * 4 * 1024 * 1024


@pytest.mark.parametrize("loop", LOOPS)
def test_protocol_handler(daemon_factory: Callable[..., Daemon], loop: str) -> None:
    d = daemon_factory("-k", "async", "--loop", loop, "async_handlers:UpperProtocol")
    assert exchange(d.address(), b"hello") == b"HELLO"
    wait_for(lambda: sum(w["requests"] for w in d.status()["workers"]) == 1, 5, "the connection counted")


@pytest.mark.parametrize("loop", LOOPS)
def test_stream_handler_and_client_address(daemon_factory: Callable[..., Daemon], loop: str) -> None:
    d = daemon_factory("-k", "async", "--loop", loop, "async_handlers:line_echo")
    with d.connect() as s:
        host, port, _ = read_line(s).split()
        assert (host.decode(), int(port)) == s.getsockname()
        for i in range(5):
            s.sendall(b"line %d\n" % i)
            assert read_line(s) == b"line %d\n" % i


def test_handler_exception_is_logged_and_closes_that_connection(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("-k", "async", "--workers", "1", "async_handlers:failing")
    pid = d.status()["workers"][0]["pid"]
    with d.connect() as s:
        s.sendall(b"boom\n")
        assert s.recv(10) == b""
    wait_for(lambda: "handler failed on purpose" in d.log(), 5, "the traceback in the log")
    assert "Traceback" in d.log()
    st = d.status()
    assert st["workers"][0]["pid"] == pid and st["workers"][0]["errors"] == 1


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["-k", "async", "async_handlers:NotAsync"], "runs under --worker-class sync or thread"),
        (["-k", "thread", "async_handlers:UpperProtocol"], "runs under --worker-class async"),
        (["-k", "sync", "async_handlers:line_echo"], "runs under --worker-class async"),
    ],
)
def test_handler_and_worker_class_must_match(args: list[str], culprit: str) -> None:
    r = subprocess.run([sys.executable, "-m", "prefork", "--check-config", *args], capture_output=True, text=True,
                       env=child_env(), timeout=20)
    assert r.returncode == 2
    assert culprit in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("loop", LOOPS)
def test_reload_and_stop_under_load_lose_nothing(daemon_factory: Callable[..., Daemon], loop: str) -> None:
    d = daemon_factory("-k", "async", "--loop", loop)
    with Load(d.address(), clients=6, mode="connect") as load:
        load.wait_ok(100)
        for generation in (2, 3):
            assert d.call("reload", timeout=30)["generation"] == generation
            load.wait_ok(100)
    assert load.failures == [], load.failures[:5]
    # a connection open while stopping is still served
    s = d.connect()
    s.sendall(b"a")
    assert recv_exact(s, 1) == b"a"
    d.signal(signal.SIGTERM)
    wait_for(lambda: d.status()["state"] == "stopping", 5, "stopping")
    s.sendall(b"still served")
    assert recv_exact(s, 12) == b"still served"
    s.close()
    assert d.wait_exit() == 0


def test_blocked_event_loop_is_replaced(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("-k", "async", "--workers", "1", "--timeout", "1", "async_handlers:Blocking")
    pid = d.status()["workers"][0]["pid"]
    s = d.connect()
    s.sendall(b"x")
    wait_for(lambda: d.status()["workers"][0]["pid"] != pid, 10, "the blocked worker replaced")
    assert "timed out" in d.log() and "async_handlers.py" in d.log()  # its stack was dumped
    s.close()


def test_max_requests_recycles(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("-k", "async", "--workers", "1", "--max-requests", "3", "async_handlers:pid_once")
    pids = []
    for _ in range(7):
        with d.connect() as s:
            pids.append(int(read_line(s)))
    runs = [pids.count(p) for p in dict.fromkeys(pids)]
    assert runs == [3, 3, 1], pids


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_cap_spreads_load(daemon_factory: Callable[..., Daemon], loop: str) -> None:
    d = daemon_factory("-k", "async", "--loop", loop, "--workers", "2", "--max-connections", "2")
    held = echoed_connections(d, 4)
    wait_for(lambda: sorted(w["active"] for w in d.status()["workers"]) == [2, 2], 5, "two connections each")
    extra = d.connect(timeout=0.5)
    extra.sendall(b"5")
    with pytest.raises(TimeoutError):
        extra.recv(1)  # accepted by the kernel, but no worker takes it while both are at the cap
    held.pop().close()
    extra.settimeout(5)
    assert extra.recv(1) == b"5"
    for s in [*held, extra]:
        s.close()


def test_proxy_protocol_under_async(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("-k", "async", "--proxy-protocol", "async_handlers:line_echo")
    with d.connect() as s:
        s.sendall(build_v2(("203.0.113.5", 4242), ("127.0.0.1", 80)) + b"after\n")
        host, port, _ = read_line(s).split()
        assert (host, port) == (b"203.0.113.5", b"4242")
        assert read_line(s) == b"after\n"
    with d.connect() as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(10) == b""
    assert "closing it" in d.log()


@pytest.mark.parametrize("loop", LOOPS)
def test_async_relay(daemon_factory: Callable[..., Daemon], loop: str) -> None:
    upstream = daemon_factory("-k", "async", "--loop", loop, name="upstream")
    relay = daemon_factory("-k", "async", "--loop", loop, "--relay", f"127.0.0.1:{upstream.port}", name="relay")
    assert relay.status()["handler"] == "prefork.handlers.aio:RelayProtocol"
    payload = bytes(range(256)) * 4096  # 1 MiB
    assert exchange(relay.address(), payload, timeout=20) == payload
    with relay.connect() as s:  # half-close: everything sent comes back, then EOF
        s.sendall(b"half")
        s.shutdown(socket.SHUT_WR)
        assert recv_exact(s, 4) == b"half"
        assert s.recv(1) == b""


# -- the built-in echo on the async worker's echo engine (prefork/workers/echo_engine.py) -------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_builtin_echo_half_close_and_reset(daemon_factory: Callable[..., Daemon], loop: str) -> None:
    d = daemon_factory("-k", "async", "--loop", loop, "--workers", "1")
    pid = d.status()["workers"][0]["pid"]
    with d.connect() as s:  # half-close: everything sent comes back, then end of file
        s.sendall(b"half" * 1000)
        s.shutdown(socket.SHUT_WR)
        assert recv_exact(s, 4000) == b"half" * 1000
        assert s.recv(1) == b""
    s = d.connect()  # a client that resets its connection
    s.sendall(b"x")
    assert recv_exact(s, 1) == b"x"
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    wait_for(lambda: d.status()["workers"][0]["requests"] == 2, 5, "both connections counted as done")
    worker = d.status()["workers"][0]
    assert (worker["pid"], worker["active"], worker["errors"]) == (pid, 0, 0)
    assert (worker["bytes_in"], worker["bytes_out"]) == (4001, 4001)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.timeout(90)
def test_builtin_echo_stops_reading_a_client_that_does_not_read(daemon_factory: Callable[..., Daemon],
                                                                loop: str) -> None:
    d = daemon_factory("-k", "async", "--loop", loop, "--workers", "1")
    pattern = bytes(range(256)) * 512  # 128 KiB; the stream's byte at offset k is pattern[k % len(pattern)]
    twice = pattern * 2
    slow = d.connect()
    slow.setblocking(False)
    sent, stalled = 0, False
    deadline = time.monotonic() + 30
    while sent < 512 * 2**20 and time.monotonic() < deadline:
        start = sent % len(pattern)
        try:
            sent += slow.send(twice[start:start + len(pattern)])
        except BlockingIOError:
            # no room for 2 s: the worker stopped reading this client (it cannot write the echo back)
            _, writable, _ = select.select([], [slow], [], 2.0)
            if not writable:
                stalled = True
                break
    assert stalled, f"the worker kept reading a client that does not read ({sent} bytes sent)"
    # the same (only) worker serves others meanwhile
    assert exchange(d.address(), b"not blocked") == b"not blocked"
    # and everything comes back, in order, once the client reads
    slow.settimeout(20)
    got = 0
    while got < sent:
        chunk = slow.recv(min(2**20, sent - got))
        assert chunk, f"end of file after {got} of {sent} bytes"
        start = got % len(pattern)
        assert chunk == (pattern * (2 + len(chunk) // len(pattern)))[start:start + len(chunk)], f"at byte {got}"
        got += len(chunk)
    slow.close()


def test_builtin_echo_max_requests_recycles(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("-k", "async", "--workers", "1", "--max-requests", "3")
    pid = d.status()["workers"][0]["pid"]
    for i in range(3):
        assert exchange(d.address(), b"%d" % i) == b"%d" % i
    wait_for(lambda: [w["pid"] for w in d.ready_workers()] not in ([], [pid]), 10, "the worker replaced")
    assert "max-requests (3) reached" in d.log()
    assert exchange(d.address(), b"next") == b"next"


@pytest.mark.parametrize("worker_class", ["async", "thread"])
def test_out_of_file_descriptors_pauses_accepting(daemon_factory: Callable[..., Daemon], worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--workers", "1")
    worker = psutil.Process(d.status()["workers"][0]["pid"])
    limit = worker.num_fds() + 2  # room for two connections
    _, hard = resource.prlimit(worker.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (limit, hard))
    with contextlib.ExitStack() as opened:  # closed on a failure too: a held one would keep the stop draining
        held = [opened.enter_context(s) for s in echoed_connections(d, 2)]
        waiting = [opened.enter_context(d.connect()) for _ in range(2)]  # queued: no descriptor for them
        for s in waiting:
            s.sendall(b"w")
        if worker_class == "async":
            # the built-in echo: the connections silent longest give way to the waiting ones (--reclaim-idle-after)
            for s in waiting:
                assert recv_exact(s, 1) == b"w"
                s.close()
            assert d.call("stats")["closed"]["reclaimed"] >= 1
            for s in held:
                s.close()
        else:
            # the held ones are in handlers, and none waits for its first bytes: the worker pauses
            wait_for(lambda: "pausing accepts" in d.log(), 10, "the worker to notice it is out of descriptors")
            for s in held:
                s.close()
            for s in waiting:  # served once descriptors are free again
                assert recv_exact(s, 1) == b"w"
                s.close()
    assert d.status()["workers"][0]["pid"] == worker.pid


@pytest.mark.parametrize("worker_class", ["async", "thread", "sync"])
def test_the_connection_on_the_last_descriptor_is_served(daemon_factory: Callable[..., Daemon],
                                                         worker_class: str) -> None:
    """At the limit ``accept()`` fails with EMFILE even when nobody is queued: that is no reason to make
    room, and the connection just accepted, whose first bytes are still on their way, is served."""
    d = daemon_factory("-k", worker_class, "--workers", "1")
    worker = psutil.Process(d.status()["workers"][0]["pid"])
    _, hard = resource.prlimit(worker.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(worker.pid, resource.RLIMIT_NOFILE, (worker.num_fds() + 2, hard))  # room for two
    with contextlib.ExitStack() as held:
        held.enter_context(echoed_connections(d, 1)[0])  # in a handler
        s = held.enter_context(d.connect())  # on the last descriptor, its first bytes not sent yet
        wait_for(lambda: d.status()["workers"][0]["active"] == 2, 10, "the second connection accepted")
        s.sendall(b"late")
        assert recv_exact(s, 4) == b"late"
    if worker_class != "sync":  # (sync serves one at a time: the silent held one gives way to it, by design)
        assert d.status()["workers"][0]["closed"]["reclaimed"] == 0
    assert "pausing accepts" not in d.log()  # nobody was turned away: nothing to pause for
    assert d.status()["workers"][0]["pid"] == worker.pid


def test_builtin_echo_on_tcp_and_unix_listeners(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    d = daemon_factory("-k", "async", "--bind", "127.0.0.1:0", "--bind", f"unix:{path}")
    assert exchange(d.address(), b"over tcp") == b"over tcp"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(b"over unix")
        assert recv_exact(s, 9) == b"over unix"
    wait_for(lambda: d.call("stats")["requests"] == 2, 5, "both connections counted")


def test_user_protocol_stops_accepting_below_the_file_limit(daemon_factory: Callable[..., Daemon]) -> None:
    """At the descriptor limit uvloop would accept and close waiting clients; the worker caps itself first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 128), hard))  # the daemon inherits it
    try:
        d = daemon_factory("-k", "async", "--workers", "1", "async_handlers:UpperProtocol")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    found = re.search(r"at most (\d+) connections", d.log())
    assert found, d.log()
    room = int(found.group(1))
    assert 10 <= room < 128
    held = []
    for _ in range(room):
        s = d.connect()
        s.sendall(b"a")
        assert recv_exact(s, 1) == b"A"
        held.append(s)
    wait_for(lambda: d.status()["workers"][0]["active"] == room, 5, "the worker full")
    # queued, not reset: at the cap the quietest held connection is reclaimed for it (--reclaim-idle-after)
    extra = d.connect(timeout=5)
    extra.sendall(b"w")
    assert extra.recv(1) == b"W"
    assert d.call("stats")["closed"]["reclaimed"] == 1
    try:
        ended = select.select(held, [], [], 2)[0]  # the one reclaimed sees the end of its connection
        assert len(ended) == 1 and ended[0].recv(1) == b""
    finally:
        for s in [*held, extra]:
            s.close()
