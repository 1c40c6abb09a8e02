"""The master never dies and never spins: whatever a control or metrics client sends, a callback that fails,
a flood of idle clients under a low descriptor limit.

See docs/hardening.md for the list of attacks and what the daemon does about each.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Daemon, child_env, read_line, start_daemon, wait_for
from prefork.control import HEADER, MAX_REQUEST, ClientGate, ControlConnection, ControlServer, encode
from prefork.master.commands import COMMANDS
from prefork.master.loop import Guard
from prefork.master.state import Totals
from prefork.master.timers import Timers

# -- talking to the control socket as a hostile client would --------------------------------------------------


def send_frame(path: str, body: bytes, timeout: float = 5.0) -> dict[str, Any] | None:
    """Send one raw frame; the reply, or None when the master closed the connection without one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(HEADER.pack(len(body)) + body)
        head = b""
        while len(head) < HEADER.size:
            chunk = s.recv(HEADER.size - len(head))
            if not chunk:
                return None
            head += chunk
        (length,) = HEADER.unpack(head)
        data = b""
        while len(data) < length:
            chunk = s.recv(length - len(data))
            assert chunk, "the reply was cut short"
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


class Raw(str):
    """JSON text put into a request as it is: what json.dumps would refuse to write (or could not)."""


def to_json(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)  # ensure_ascii: a lone surrogate goes out as its \\udXXX escape


# what a fuzzed request may hold: every JSON type, and the values that broke the master before
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
TEXT = st.text(max_size=12) | SURROGATES | st.lists(SURROGATES | st.characters(), max_size=6).map("".join)
HUGE_INTS = st.integers(4301, 20_000).map(lambda n: Raw("7" * n))  # more digits than int() converts
DEEP = st.integers(2, 15_000).map(lambda d: Raw("[" * d + "]" * d))  # within the 64 KiB frame
LONG_INTS = st.integers(20, 4300).map(lambda n: Raw("-" + "3" * n))  # long, but within what int() converts
LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | TEXT | HUGE_INTS | LONG_INTS | DEEP
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                      max_leaves=8)
# commands that act (stop, reload, upgrade, drain, a valid scale) are left out: they would do what they say
ACTING = {"stop", "reload", "upgrade", "drain", "scale"}
HARMLESS_COMMANDS = [c for c in COMMANDS if c not in ACTING]
COMMAND_NAMES = st.sampled_from(HARMLESS_COMMANDS) | VALUES.filter(lambda v: not (isinstance(v, str) and v in ACTING))
EXTRA = st.dictionaries(TEXT, VALUES, max_size=4)


def _not_a_worker_count(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024


def _not_a_change_from_one(value: Any) -> bool:
    """Not a change the one-worker daemon could make (it would act)."""
    return isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1024


def _request(extra: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return {**extra, **fields}


REQUESTS = st.one_of(
    st.builds(lambda extra, name: _request(extra, {"command": name}), EXTRA, COMMAND_NAMES),
    # every field of the commands that have one, of a type or value it does not take
    st.builds(lambda extra, n: _request(extra, {"command": "scale", "workers": n}), EXTRA,
              VALUES.filter(_not_a_worker_count)),
    st.builds(lambda extra, by: _request(extra, {"command": "scale", "by": by}), EXTRA,
              VALUES.filter(_not_a_change_from_one)),
    st.builds(lambda extra, off: _request(extra, {"command": "drain", "off": off}), EXTRA, VALUES.filter(bool)),
)
BODIES = st.one_of(
    REQUESTS.map(lambda r: to_json(r).encode()),
    VALUES.map(lambda v: to_json(v).encode()),  # a body that is not an object
    st.binary(max_size=256),  # not JSON, not UTF-8
    st.integers(4301, 20_000).map(lambda n: b'{"command": ' + b"9" * n + b"}"),
    st.integers(2, 30_000).map(lambda d: b'{"command": ' + b"[" * d + b"]" * d + b"}"),
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("fuzz"), name="fuzz", workers=1)
    try:
        yield d
    finally:
        d.stop()


@settings(max_examples=200, deadline=timedelta(seconds=3), suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_no_request_stops_the_master_from_answering(fuzzed: Daemon, body: bytes) -> None:
    reply = send_frame(fuzzed.control, body)
    assert reply is not None, "the master closed the connection without a reply"
    assert isinstance(reply.get("ok"), bool)
    if len(body) > MAX_REQUEST:
        assert reply["ok"] is False and "over the" in reply["error"]
    status = fuzzed.status()
    assert status["ok"] is True and status["pid"] == fuzzed.pid and status["state"] == "serving"


def test_after_the_fuzzing_nothing_escaped_a_boundary_check(fuzzed: Daemon) -> None:
    """Every bad request met its boundary check: none needed the loop's last resort."""
    assert send_frame(fuzzed.control, b'{"command": ' + b"1" * 5000 + b"}") == {
        "ok": False, "error": "bad request: request cannot be decoded: ValueError: Exceeds the limit (4300 digits) "
        "for integer string conversion: value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit"}
    stats = fuzzed.call("stats")
    assert stats["master_errors"] == 0
    assert fuzzed.proc.poll() is None
    assert "Traceback" not in fuzzed.log()


# -- the loop's last resort -----------------------------------------------------------------------------------


def _raise(message: str) -> None:
    raise RuntimeError(message)


def test_guard_logs_counts_drops_and_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    totals = Totals()
    dropped: list[object] = []

    def drop(sock: object) -> bool:
        dropped.append(sock)
        return True

    guard = Guard(totals, drop)
    selector = selectors.DefaultSelector()
    timers = Timers()
    a, b = socket.socketpair()
    with selector, a, b:
        def failing_client(mask: int) -> None:
            a.recv(16)
            _raise("a client callback failed")

        selector.register(a, selectors.EVENT_READ, failing_client)
        b.send(b"x")
        ran: list[str] = []
        timers.set("first", 0.0, lambda: _raise("a timer failed"))
        timers.set("second", 0.0, lambda: ran.append("second"))
        with caplog.at_level(logging.ERROR, "prefork.master.loop"):
            guard.turn(selector, timers)
        assert totals.master_errors == 2
        assert dropped == [a]  # the failing client's socket, for its server to close
        assert ran == []  # behind the failed timer: due still, so it runs on the next turn
        guard.turn(selector, timers)
        assert ran == ["second"] and totals.master_errors == 2
    records = [r for r in caplog.records if "internal error in" in r.getMessage()]
    assert len(records) == 2 and all(r.exc_info for r in records)
    assert "(its client is closed)" in records[0].getMessage()


def start_faulty(tmp_path: Path, *args: str) -> Daemon:
    """``python -m faulty_master``: a daemon whose USR1 action and codec fail (tests/apps/faulty_master.py)."""
    control = str(tmp_path / "faulty.sock")
    log_path = tmp_path / "faulty.log"
    argv = [sys.executable, "-m", "faulty_master", "--control", control, "--bind", "127.0.0.1:0", "-w", "1", *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env=child_env(), cwd=str(tmp_path))
    d = Daemon(proc=proc, control=control, log_path=log_path, args=argv)
    d.wait_serving()
    return d


def test_a_failing_callback_does_not_stop_the_daemon(tmp_path: Path) -> None:
    d = start_faulty(tmp_path)
    try:
        before = d.status()
        d.signal(signal.SIGUSR1)  # the signal action raises
        wait_for(lambda: d.call("stats")["master_errors"] == 1, 10, "the failed signal action counted")
        assert send_frame(d.control, b'{"command": "status", "inject-fault": 1}') is None  # that client is dropped
        assert d.call("stats")["master_errors"] == 2
        after = d.status()
        assert after["pid"] == before["pid"] and after["state"] == "serving"
        assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
        log = d.log()
        assert "internal error in Master._on_signals; the master carries on" in log
        assert "internal error in ControlConnection._on_event (its client is closed); the master carries on" in log
        assert log.count("RuntimeError: injected fault") == 2  # each with its traceback
        d.signal(signal.SIGTERM)
        assert d.wait_exit(20) == 0
    finally:
        d.stop()


# -- idle clients and descriptor exhaustion -------------------------------------------------------------------


class FakeClients(list[socket.socket]):
    def client_count(self) -> int:
        return len(self)

    def has_idle(self) -> bool:
        return False

    def evict_idle(self) -> None:
        raise AssertionError("nothing to evict")


def test_gate_pauses_out_of_descriptors_with_one_line_then_resumes(caplog: pytest.LogCaptureFixture) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    clients = FakeClients()
    gate = ClientGate(listener, selector, "test", clients, clients.append, max_clients=100)
    gate.start()
    waiting = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        with caplog.at_level(logging.WARNING):
            for _ in range(3):  # the loop would come back at once if the listener were still watched
                for key, mask in selector.select(0):
                    key.data(mask)
        assert clients == [] and not gate.watching
        assert gate.paused_until is not None and gate.next_deadline() == gate.paused_until
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "Too many open files; pausing accepts for 0.1s" in lines[0], lines
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert gate.paused_until is not None
    gate.expire(gate.paused_until)
    assert gate.watching
    for key, mask in selector.select(1.0):
        key.data(mask)
    assert len(clients) == 3
    for sock in [*clients, *waiting, listener]:
        sock.close()
    selector.close()


def test_control_cap_closes_the_oldest_silent_client_and_serves_a_real_one(tmp_path: Path) -> None:
    selector = selectors.DefaultSelector()
    server = ControlServer(str(tmp_path / "c.sock"))
    answered: list[str] = []

    def dispatch(request: dict[str, Any], conn: ControlConnection) -> None:
        answered.append(request["command"])
        conn.reply({"ok": True})

    server.attach(selector, dispatch, max_clients=2)

    def pump(turns: int = 5) -> None:
        for _ in range(turns):
            for key, mask in selector.select(0.05):
                key.data(mask)

    idle = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX)
        s.connect(server.path)
        idle.append(s)
        pump(2)
    assert len(server.connections) == 2
    for s in idle[:2]:  # the two oldest were closed to make room
        s.settimeout(2)
        assert s.recv(1) == b""
    assert server.gate is not None and server.gate.evictions == 2
    real = socket.socket(socket.AF_UNIX)
    real.connect(server.path)
    real.sendall(encode({"command": "status"}))
    pump()
    real.settimeout(2)
    assert real.recv(4096)[HEADER.size:] == b'{"ok":true}'
    assert answered == ["status"]
    for s in [*idle, real]:
        s.close()
    server.close()
    selector.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flood(connect: Callable[[], socket.socket], count: int) -> list[socket.socket]:
    """``count`` connections that connect and then say nothing (non-blocking: no wait for the backlog)."""
    socks = []
    for _ in range(count):
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
            socks.append(connect())
    return socks


def tcp_connect(port: int) -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    err = s.connect_ex(("127.0.0.1", port))
    assert err in (0, errno.EINPROGRESS), os.strerror(err)
    return s


def unix_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(path)
    except BlockingIOError:  # the backlog is full
        s.close()
        raise
    return s


def test_idle_floods_under_a_low_descriptor_limit_cost_the_master_nothing(tmp_path: Path) -> None:
    """1,100 idle TCP clients on --metrics-bind and 400 on the control socket, under ``prlimit --nofile=64``."""
    metrics_port = free_port()
    control = str(tmp_path / "low.sock")
    log_path = tmp_path / "low.log"
    argv = ["prlimit", "--nofile=64:64", sys.executable, "-m", "prefork", "--control", control,
            "--bind", "127.0.0.1:0", "-w", "1", "--metrics-bind", f"127.0.0.1:{metrics_port}"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env=child_env(), cwd=str(tmp_path))
    d = Daemon(proc=proc, control=control, log_path=log_path, args=argv)
    held: list[socket.socket] = []
    try:
        d.wait_serving()
        master = psutil.Process(d.pid)
        assert master.rlimit(psutil.RLIMIT_NOFILE) == (64, 64)
        cpu_before = sum(master.cpu_times()[:2])
        started = time.monotonic()
        held += flood(lambda: tcp_connect(metrics_port), 1100)
        control_flood = flood(lambda: unix_connect(control), 400)
        held += control_flood
        assert len(control_flood) == 400
        open_ones = set(control_flood)
        latencies: list[float] = []

        def every_idle_client_closed() -> bool:
            """Meanwhile the master answers status (each reply timed); idle clients go within CLIENT_TIMEOUT."""
            asked = time.monotonic()
            assert d.status()["state"] == "serving"
            latencies.append(time.monotonic() - asked)
            for sock in list(open_ones):
                try:
                    if sock.recv(1) == b"":
                        open_ones.discard(sock)
                except BlockingIOError:
                    pass
                except ConnectionError:
                    open_ones.discard(sock)
            return not open_ones

        wait_for(every_idle_client_closed, 30, "every idle control client closed by the master", interval=0.2)
        cpu = sum(master.cpu_times()[:2]) - cpu_before
        wall = time.monotonic() - started
        with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as s:  # a scraper still gets in
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert read_line(s).startswith(b"HTTP/1.1 200")
        print(f"\nmaster CPU {cpu:.2f}s in {wall:.1f}s under the floods; {len(latencies)} status replies, "
              f"slowest {max(latencies) * 1000:.0f} ms")
        assert cpu < 0.2 * wall, f"the master used {cpu:.2f}s of CPU in {wall:.1f}s"
        assert max(latencies) < 2.0
        log = d.log()
        assert log.count("cannot accept") < 20, log[-3000:]
        assert "Traceback" not in log
        assert d.call("stats")["master_errors"] == 0
    finally:
        for s in held:
            s.close()
        d.stop()


# -- exit statuses and exit reasons ---------------------------------------------------------------------------


def test_an_unloadable_handler_is_status_2_at_runtime_as_under_check_config(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "prefork", "--bind", "127.0.0.1:0", "--control", str(tmp_path / "c.sock"),
            "-w", "1", "nosuchmodule:Handler"]
    checked = subprocess.run([*base, "--check-config"], capture_output=True, text=True, env=child_env(),
                             timeout=30, cwd=tmp_path)
    run = subprocess.run(base, capture_output=True, text=True, env=child_env(), timeout=30, cwd=tmp_path,
                         start_new_session=True)
    assert checked.returncode == 2, checked.stderr
    assert run.returncode == 2, run.stderr
    assert "no module named 'nosuchmodule'" in checked.stderr and "no module named 'nosuchmodule'" in run.stderr


def test_a_hung_worker_and_a_graceful_timeout_kill_read_as_what_they_were(daemon_factory: Callable[..., Daemon]
                                                                           ) -> None:
    d = daemon_factory("-k", "sync", "--timeout", "1", "--graceful-timeout", "0.5",
                       "lifecycle_handlers:SleepHandler", workers=1)
    hung = d.status()["workers"][0]["pid"]
    with d.connect(timeout=15) as conn:
        conn.sendall(b"hang")
        wait_for(lambda: f"(pid {hung}) was killed by SIGABRT" in d.log(), 10, "the hung worker's end")
    line = next(x for x in d.log().splitlines() if f"(pid {hung}) was killed by" in x)
    assert "was killed by SIGABRT (sent by the master: no heartbeat for" in line, line
    assert "out of memory" not in line
    st = d.wait_serving(1)
    busy = st["workers"][0]["pid"]
    with d.connect(timeout=15) as conn:
        conn.sendall(b"hang")
        wait_for(lambda: d.status()["workers"][0]["active"] == 1, 5, "the connection counted")
        d.signal(signal.SIGTERM)  # the worker cannot finish within the graceful timeout: the master kills it
        assert d.wait_exit(15) == 0
    line = next(x for x in d.log().splitlines() if f"(pid {busy}) was killed by" in x)
    assert "was killed by SIGKILL (sent by the master: still busy 0.5s after it was told to stop" in line, line


def test_preforkctl_into_a_closed_pipe_is_quiet(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written: `preforkctl status | head -0`
    try:
        r = subprocess.run([sys.executable, "-m", "prefork.ctl", "--control", d.control, "status"],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, env=child_env(), timeout=30)
    finally:
        os.close(write_end)
    assert r.stderr == ""
    assert r.returncode == 128 + signal.SIGPIPE
