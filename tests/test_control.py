"""``preforkctl`` and the control socket: commands, output, exit codes, socket discovery, and hostile clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import Daemon, child_env, exchange, gone, preforkctl, recv_exact, session_process, wait_for
from prefork.control import CLIENT_TIMEOUT, HEADER, MAX_REQUEST, call, encode

CTL_TIMEOUT = 20.0


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return preforkctl(*args, env=env, timeout=CTL_TIMEOUT)


def ctl_json(d: Daemon, *args: str) -> dict[str, Any]:
    result = ctl("--control", d.control, *args, "--json")
    assert result.returncode == 0, result.stderr
    reply: dict[str, Any] = json.loads(result.stdout)
    return reply


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)



# -- commands --------------------------------------------------------------------------------------------


def test_status_human(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    st = d.status()
    result = ctl("--control", d.control, "status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"master pid {d.pid}" in out
    assert "generation 1" in out
    assert f"127.0.0.1:{d.port}" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("SLOT"))
    assert lines[header].split()[:4] == ["SLOT", "PID", "GEN", "STATE"]
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert sorted(int(row[1]) for row in rows) == sorted(w["pid"] for w in st["workers"])
    assert all(row[2] == "1" and row[3] == "ready" for row in rows)


def test_status_json(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    st = ctl_json(d, "status")
    assert st["ok"] is True
    assert st["pid"] == d.pid
    assert st["name"] == "prefork"
    assert st["generation"] == 1
    assert isinstance(st["uptime_s"], float) and 0 < st["uptime_s"] < 60
    assert st["worker_class"] == "thread"
    assert st["listeners"] == [f"127.0.0.1:{d.port}"]
    assert st["state"] == "serving"
    assert st["target_workers"] == 2
    workers = st["workers"]
    assert isinstance(workers, list) and len(workers) == 2
    assert sorted(w["slot"] for w in workers) == [0, 1]
    for w in workers:
        assert is_int(w["pid"]) and w["pid"] != d.pid
        assert psutil.Process(w["pid"]).ppid() == d.pid
        assert w["generation"] == 1
        assert w["state"] == "ready"
        assert is_int(w["requests"]) and w["requests"] == 0
        assert is_int(w["active"]) and w["active"] == 0
        assert is_int(w["rss_bytes"]) and w["rss_bytes"] > 1_000_000
        assert is_int(w["uss_bytes"]) and is_int(w["pss_bytes"])
        assert 0 < w["uss_bytes"] <= w["pss_bytes"] <= w["rss_bytes"]
        assert isinstance(w["cpu_percent"], (int, float))
        assert 0.0 <= w["cpu_percent"] <= 100.0 * (os.cpu_count() or 1)
        assert isinstance(w["age_s"], (int, float)) and 0 < w["age_s"] <= st["uptime_s"] + 0.5


def test_requests_and_active_counted(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    for i in range(3):
        assert exchange(d.address(), f"hello {i}".encode()) == f"hello {i}".encode()

    def requests() -> int:
        return sum(w["requests"] for w in d.status()["workers"])

    wait_for(lambda: requests() >= 3, 5.0, "3 requests counted")
    assert requests() == 3
    with d.connect() as held:
        held.sendall(b"x")
        assert recv_exact(held, 1) == b"x"
        wait_for(lambda: sum(w["active"] for w in d.status()["workers"]) == 1, 5.0, "1 active connection")
    wait_for(lambda: sum(w["active"] for w in d.status()["workers"]) == 0, 5.0, "no active connection")
    wait_for(lambda: requests() == 4, 5.0, "4 requests counted")
    stats = ctl_json(d, "stats")
    assert stats["requests"] == 4
    assert stats["active"] == 0
    assert stats["workers"] == 2
    assert stats["workers_spawned"] == 2
    assert stats["worker_crashes"] == 0
    assert stats["reloads"] == 0
    human = ctl("--control", d.control, "stats")
    assert human.returncode == 0
    assert "requests: 4" in human.stdout
    assert f"master pid {d.pid}" in human.stdout


def test_reload(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--graceful-timeout", "2")
    old = {w["pid"] for w in d.status()["workers"]}
    result = ctl("--control", d.control, "reload")
    assert result.returncode == 0, result.stderr
    assert "generation 2" in result.stdout
    st = d.status()  # reload returns once the new generation serves
    assert st["generation"] == 2
    new = {w["pid"] for w in d.ready_workers(st)}
    assert len(new) == 2 and not new & old
    wait_for(lambda: all(gone(pid) for pid in old), 10.0, "the old generation to exit")
    assert exchange(d.address(), b"gen 2") == b"gen 2"
    again = ctl_json(d, "reload")
    assert again["ok"] is True and again["generation"] == 3 and again["workers"] == 2


def test_scale(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--graceful-timeout", "2")
    result = ctl("--control", d.control, "scale", "3")
    assert result.returncode == 0, result.stderr
    assert "from 2 to 3" in result.stdout
    st = d.wait_serving(3)
    assert st["generation"] == 1
    result = ctl("--control", d.control, "scale", "1")
    assert result.returncode == 0, result.stderr
    assert "from 3 to 1" in result.stdout
    wait_for(lambda: len(d.status()["workers"]) == 1, 10.0, "scaled down to one worker")
    st = d.wait_serving(1)
    assert st["target_workers"] == 1
    assert exchange(d.address(), b"one left") == b"one left"


def test_scale_relative(daemon_factory: Callable[..., Daemon]) -> None:
    """``scale +N`` and ``scale -N`` change the count the daemon has now; a change below one is refused."""
    d = daemon_factory("--graceful-timeout", "2")
    result = ctl("--control", d.control, "scale", "+2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "scaled from 2 to 4 worker(s)\n"
    d.wait_serving(4)
    result = ctl("--control", d.control, "scale", "-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "scaled from 4 to 3 worker(s)\n"
    wait_for(lambda: len(d.status()["workers"]) == 3, 10.0, "scaled down to three workers")
    result = ctl("--control", d.control, "scale", "-3")
    assert result.returncode == 1
    assert result.stderr == ("preforkctl: scale failed: scale: 3 worker(s) changed by -3 would be 0, "
                             "not from 1 to 1024\n")
    assert d.status()["target_workers"] == 3


def test_scale_up_then_down_at_once(daemon_factory: Callable[..., Daemon]) -> None:
    """Workers told to drain right after their fork: the master must not take their signals for its own."""
    d = daemon_factory("--graceful-timeout", "2", workers=1)
    for _ in range(3):
        assert d.call("scale", workers=20)["ok"] is True
        assert d.call("scale", workers=1)["ok"] is True
    st = d.status()
    assert st["state"] == "serving", d.log()
    assert "got SIGTERM" not in d.log()
    wait_for(lambda: len(d.status()["workers"]) == 1, 15.0, "back to one worker")
    assert d.status()["pid"] == d.pid
    assert exchange(d.address(), b"ping") == b"ping"


FORK_HOOK = """
import os
import signal

_fork = os.fork


def _fork_then_signal():
    pid = _fork()
    if pid > 0:
        os.kill(pid, signal.SIGUSR1)  # the child may not have run a single instruction yet
    return pid


os.fork = _fork_then_signal
"""


def test_signal_to_fresh_worker_is_not_the_masters(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    """A signal that reaches a worker right after its fork (the master draining it at once, an operator's
    pkill) belongs to the worker; the master must not read it from the wakeup fd the child inherited."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FORK_HOOK)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    d = daemon_factory(env=env)
    assert d.call("scale", workers=4)["ok"] is True
    d.wait_serving(4)
    assert "got SIGUSR1" not in d.log()
    assert d.call("stats")["worker_crashes"] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["scale", "0"],
        ["scale", "-0"],
        ["scale", "x"],
        ["scale"],
        ["explode"],
        [],
        ["--name", "a", "--control", "/tmp/x.sock", "status"],
        ["status", "--bogus"],
        ["status", "--format", "prometheus"],
        ["stats", "--json", "--format", "prometheus"],
        ["stats", "--format", "yaml"],
        ["top", "--interval", "0"],
        ["top", "--interval", "-1"],
        ["top", "--interval", "nan"],
        ["top", "--interval", "soon"],
        ["top", "--json"],
        ["top", "--format", "prometheus"],
    ],
    ids=["scale-0", "scale-zero-change", "scale-x", "scale-missing", "unknown-command", "no-command",
         "name-and-control", "unknown-option", "prometheus-status", "json-and-prometheus", "format-yaml",
         "top-interval-0", "top-interval-negative", "top-interval-nan", "top-interval-word", "top-json",
         "top-prometheus"],
)
def test_usage_errors(tmp_path: Path, args: list[str]) -> None:
    result = ctl("--control", str(tmp_path / "none.sock"), *args) if "--control" not in args else ctl(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("preforkctl: error: ")


def test_stop_returns_after_exit(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    workers = [w["pid"] for w in d.status()["workers"]]
    result = ctl("--control", d.control, "stop")
    assert d.proc.poll() is not None, "preforkctl stop returned while the master was still running"
    assert result.returncode == 0, result.stderr
    assert f"master pid {d.pid} has exited" in result.stdout
    assert d.proc.returncode == 0
    assert all(gone(pid) for pid in workers)
    assert not os.path.exists(d.control)


def test_stop_json(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    reply = ctl_json(d, "stop")
    assert d.proc.poll() is not None
    assert reply["ok"] is True and reply["pid"] == d.pid


@pytest.mark.parametrize("command", ["status", "stats", "reload", "stop", "scale 2", "reopen", "drain"])
def test_not_running(tmp_path: Path, command: str) -> None:
    path = str(tmp_path / "none.sock")
    result = ctl("--control", path, *command.split())
    assert result.returncode == 3
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert path in lines[0]


def test_not_running_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)  # a socket file nobody listens on, as a killed daemon leaves behind
    result = ctl("--control", path, "status")
    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1
    assert path in result.stderr


def test_not_running_json(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    result = ctl("--control", path, "status", "--json")
    assert result.returncode == 3
    assert path in result.stderr


def test_control_socket_mode(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    st = os.stat(d.control)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


# -- finding the socket without --control ----------------------------------------------------------------



def own_daemon(tmp_path: Path, env: dict[str, str], *args: str) -> contextlib.AbstractContextManager[
        subprocess.Popen[bytes]]:
    """A daemon started exactly as given (the harness would add --control); no process of it may outlive it."""
    return session_process([sys.executable, "-m", "prefork", *args], tmp_path / "own.log", cwd=tmp_path, env=env,
                           none_left=True)


def runtime_env(tmp_path: Path) -> dict[str, str]:
    env = child_env(XDG_RUNTIME_DIR=str(tmp_path))
    env.pop("RUNTIME_DIRECTORY", None)
    return env


def wait_answering(path: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        assert proc.poll() is None, f"prefork exited with {proc.returncode}"
        with contextlib.suppress(Exception):
            reply, sock = call(path, {"command": "status"}, timeout=2)
            sock.close()
            if reply.get("state") == "serving":
                return reply
        return None

    reply: dict[str, Any] = wait_for(check, 15.0, f"a daemon answering on {path}")
    return reply


def test_find_socket_by_name(tmp_path: Path) -> None:
    env = runtime_env(tmp_path)
    with own_daemon(tmp_path, env, "--bind", "127.0.0.1:0", "-w", "1", "--name", "x") as proc:
        path = str(tmp_path / "x.sock")
        wait_answering(path, proc)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        result = ctl("--name", "x", "status", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == proc.pid
        other = ctl("--name", "y", "status", env=env)
        assert other.returncode == 3
        assert str(tmp_path / "y.sock") in other.stderr and other.stderr.count("\n") == 1
        stopped = ctl("--name", "x", "stop", env=env)
        assert stopped.returncode == 0, stopped.stderr
        assert proc.wait(10) == 0
        assert not os.path.exists(path)


def test_find_socket_with_no_options(tmp_path: Path) -> None:
    env = runtime_env(tmp_path)
    with own_daemon(tmp_path, env, "--bind", "127.0.0.1:0", "-w", "1") as proc:
        wait_answering(str(tmp_path / "prefork.sock"), proc)
        result = ctl("status", env=env)
        assert result.returncode == 0, result.stderr
        assert f"master pid {proc.pid}" in result.stdout


def test_find_socket_in_the_other_runtime_directory(tmp_path: Path) -> None:
    """Started without XDG_RUNTIME_DIR (/tmp/prefork-UID), found by a preforkctl that has it, and the other way."""
    name = f"rt{os.getpid()}"
    bare = child_env()
    bare.pop("XDG_RUNTIME_DIR", None)
    bare.pop("RUNTIME_DIRECTORY", None)
    with own_daemon(tmp_path, bare, "--bind", "127.0.0.1:0", "-w", "1", "--name", name) as proc:
        wait_answering(f"/tmp/prefork-{os.getuid()}/{name}.sock", proc)
        result = ctl("--name", name, "status", "--json", env=runtime_env(tmp_path))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == proc.pid
    xdg = Path(f"/run/user/{os.getuid()}")  # where pam_systemd points XDG_RUNTIME_DIR
    xdg.mkdir(mode=0o700, parents=True, exist_ok=True)
    with own_daemon(tmp_path, runtime_env(xdg), "--bind", "127.0.0.1:0", "-w", "1", "--name", name) as proc:
        wait_answering(str(xdg / f"{name}.sock"), proc)
        result = ctl("--name", name, "status", "--json", env=bare)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == proc.pid
    assert not (xdg / f"{name}.sock").exists()
    # a runtime directory of its own: found among the listening sockets the kernel lists
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    with own_daemon(tmp_path, runtime_env(elsewhere), "--bind", "127.0.0.1:0", "-w", "1", "--name", name) as proc:
        wait_answering(str(elsewhere / f"{name}.sock"), proc)
        result = ctl("--name", name, "status", "--json", env=bare)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == proc.pid


def test_found_through_the_environment_the_daemon_was_given(tmp_path: Path) -> None:
    """A container names its daemon with PREFORK_NAME or PREFORK_CONTROL; preforkctl run beside it reads them too."""
    name = f"envname{os.getpid()}"
    env = runtime_env(tmp_path) | {"PREFORK_NAME": name}
    with own_daemon(tmp_path, env, "--bind", "127.0.0.1:0", "-w", "1") as proc:
        wait_answering(str(tmp_path / f"{name}.sock"), proc)
        result = ctl("status", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == proc.pid
        other = ctl("--name", "prefork-not-this-one", "status", env=env)  # the command line beats the variable
        assert other.returncode != 0 and "prefork-not-this-one" in other.stderr
    socket_path = tmp_path / "ctl" / "app.sock"
    socket_path.parent.mkdir()
    env = runtime_env(tmp_path) | {"PREFORK_CONTROL": str(socket_path)}
    with own_daemon(tmp_path, env, "--bind", "127.0.0.1:0", "-w", "1") as proc:
        wait_answering(str(socket_path), proc)
        result = ctl("status", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["pid"] == proc.pid
    bad = ctl("status", env=runtime_env(tmp_path) | {"PREFORK_NAME": "../x"})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.parametrize("xdg", [None, "/run/elsewhere"])
def test_no_daemon_found_names_every_place_tried(tmp_path: Path, xdg: str | None) -> None:
    env = child_env()
    env.pop("RUNTIME_DIRECTORY", None)
    env.pop("XDG_RUNTIME_DIR", None)
    if xdg:
        env["XDG_RUNTIME_DIR"] = xdg
    uid = os.getuid()
    result = ctl("--name", "nosuchdaemon", "status", env=env)
    assert result.returncode == 3
    assert result.stdout == ""
    places = [f"{xdg}/nosuchdaemon.sock", f"/tmp/prefork-{uid}/nosuchdaemon.sock"] if xdg else [
        f"/tmp/prefork-{uid}/nosuchdaemon.sock", f"/run/user/{uid}/nosuchdaemon.sock"]
    places += ["/run/prefork/nosuchdaemon.sock", "/run/prefork-nosuchdaemon/nosuchdaemon.sock"]
    assert result.stderr == (
        f"preforkctl: no prefork daemon named 'nosuchdaemon' is running here: no control socket at "
        f"{', '.join(places)}, and none listening elsewhere that is ours (started with --control? give its "
        "socket with --control PATH)\n")


# -- hostile clients -------------------------------------------------------------------------------------


def raw_exchange(path: str, data: bytes, timeout: float = 5.0) -> dict[str, Any] | None:
    """Send raw bytes, read one framed reply (None if the master closed without one)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        header = recv_exact(s, HEADER.size)
        if len(header) < HEADER.size:
            return None
        (length,) = HEADER.unpack(header)
        reply: dict[str, Any] = json.loads(recv_exact(s, length))
        return reply


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def snapshot(d: Daemon) -> tuple[int, list[int]]:
    st = d.status()
    return st["pid"], sorted(w["pid"] for w in st["workers"])


def assert_unharmed(d: Daemon, before: tuple[int, list[int]]) -> None:
    st = d.try_status()
    assert st is not None and d.proc.poll() is None, "the master stopped answering (see its log below)"
    assert st["state"] == "serving"
    assert (st["pid"], sorted(w["pid"] for w in st["workers"])) == before  # same master, workers not restarted
    assert exchange(d.address(), b"still serving") == b"still serving"
    stats = d.call("stats")
    assert stats["worker_crashes"] == 0
    assert stats["workers_spawned"] == len(before[1])


BAD_REQUESTS = [
    ("http-garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "over the"),
    ("oversized-header", b"\xff\xff\xff\xff", "over the"),
    ("just-over-limit", HEADER.pack(MAX_REQUEST + 1) + b"{}", "over the"),
    ("not-json", frame(b"{not json"), "not UTF-8 JSON"),
    ("empty-body", frame(b""), "not UTF-8 JSON"),
    ("invalid-utf8", frame(b'{"command": "\xff\xfe"}'), "not UTF-8 JSON"),
    ("json-array", frame(b'["status"]'), "JSON object"),
    ("json-string", frame(b'"status"'), "JSON object"),
    ("unknown-command", encode({"command": "explode"}), "unknown command 'explode'"),
    ("command-not-string", encode({"command": 5}), "unknown command 5"),
    ("command-long", encode({"command": "x" * 60_000}), "unknown command 'xxxxxxxx"),
    ("no-command", encode({"workers": 3}), "unknown command None"),
    ("scale-string", encode({"command": "scale", "workers": "3"}), "scale: workers must be"),
    ("scale-bool", encode({"command": "scale", "workers": True}), "scale: workers must be"),
    ("scale-zero", encode({"command": "scale", "workers": 0}), "scale: workers must be"),
    ("scale-huge", encode({"command": "scale", "workers": 10**6}), "scale: workers must be"),
    ("scale-missing", encode({"command": "scale"}), "scale: give workers (a count) or by (a change)"),
    ("scale-by-string", encode({"command": "scale", "by": "+1"}), "scale: by must be a whole number"),
    ("scale-by-too-far", encode({"command": "scale", "by": -2}), "scale: 2 worker(s) changed by -2 would be 0"),
]


def test_bad_requests_get_error_replies(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    before = snapshot(d)
    for name, data, fragment in BAD_REQUESTS:
        reply = raw_exchange(d.control, data)
        assert reply is not None, f"{name}: no reply"
        assert reply.get("ok") is False, f"{name}: {reply}"
        assert isinstance(reply.get("error"), str) and fragment in reply["error"], f"{name}: {reply}"
        assert "\n" not in reply["error"]
        assert "x" * 101 not in reply["error"] and len(reply["error"]) < 300, f"{name}: {reply['error'][:400]}"
    # one request per connection: what follows a complete request is ignored, the request is answered
    reply = raw_exchange(d.control, encode({"command": "status"}) + b"trailing garbage \xff")
    assert reply is not None and reply["ok"] is True and reply["pid"] == d.pid
    assert_unharmed(d, before)


def test_deeply_nested_request(daemon_factory: Callable[..., Daemon]) -> None:
    """64 KiB of '[' is a legal frame size, but deeper than json.loads can recurse."""
    d = daemon_factory()
    before = snapshot(d)
    depth = MAX_REQUEST // 2 - 1
    with contextlib.suppress(OSError):
        reply = raw_exchange(d.control, frame(b"[" * depth + b"]" * depth))
        assert reply is None or reply["ok"] is False
    assert_unharmed(d, before)


@pytest.mark.timeout(30)
def test_silent_clients(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    before = snapshot(d)
    lingering: list[tuple[str, socket.socket, float]] = []
    try:
        for i in range(5):
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.control)
            lingering.append((f"silent {i}", s, time.monotonic()))
        for name, data in (("one byte", b"\x00"), ("half a header", b"\x00\x00"),
                           ("header only", HEADER.pack(20)), ("partial body", frame(b'{"command": "status"}')[:-3])):
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.control)
            s.sendall(data)
            lingering.append((name, s, time.monotonic()))
        # the master keeps answering others at once while they linger
        for _ in range(5):
            started = time.monotonic()
            reply, sock = call(d.control, {"command": "status"}, timeout=5)
            sock.close()
            assert reply["ok"] is True
            assert time.monotonic() - started < 1.0
        # and closes each of them once CLIENT_TIMEOUT has passed
        for name, s, connected in lingering:
            s.settimeout(max(0.1, connected + CLIENT_TIMEOUT + 3.0 - time.monotonic()))
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            waited = time.monotonic() - connected
            assert data == b"", f"{name}: got {data!r}"
            assert CLIENT_TIMEOUT - 0.5 <= waited <= CLIENT_TIMEOUT + 2.0, f"{name}: closed after {waited:.2f}s"
    finally:
        for _, s, _ in lingering:
            s.close()
    assert_unharmed(d, before)


def test_client_that_never_reads(daemon_factory: Callable[..., Daemon]) -> None:
    """Clients that send a request and vanish, or send one and never read: the master shrugs."""
    d = daemon_factory()
    before = snapshot(d)
    for _ in range(20):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.control)
            s.sendall(encode({"command": "status"}))
    quiet = socket.socket(socket.AF_UNIX)
    try:
        quiet.connect(d.control)
        quiet.sendall(encode({"command": "status"}))
        assert_unharmed(d, before)
    finally:
        quiet.close()


def test_connection_flood(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    before = snapshot(d)
    master = psutil.Process(d.pid)
    baseline = len(master.net_connections(kind="unix"))
    for i in range(200):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.control)
            if i % 4 == 1:
                s.sendall(b"\x00\x00")
            elif i % 4 == 2:
                s.sendall(encode({"command": "stats"}))
            elif i % 4 == 3:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close at once
    started = time.monotonic()
    reply, sock = call(d.control, {"command": "status"}, timeout=5)
    sock.close()
    assert reply["ok"] is True
    assert time.monotonic() - started < 1.0
    assert_unharmed(d, before)
    # nothing lingers in the master: every one of them was closed or timed out
    wait_for(lambda: len(master.net_connections(kind="unix")) <= baseline, CLIENT_TIMEOUT + 3.0,
             "the master to drop the flood's connections")


def test_ctl_while_master_cannot_accept(daemon_factory: Callable[..., Daemon]) -> None:
    """A full control-socket backlog (a stalled or very busy master) is a failed command, not a traceback."""
    d = daemon_factory()
    before = snapshot(d)
    fillers: list[socket.socket] = []
    os.kill(d.pid, signal.SIGSTOP)
    try:
        for _ in range(4096):  # until the listen backlog is full
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(d.control)
            except BlockingIOError:
                s.close()
                break
            fillers.append(s)
        else:
            raise AssertionError("the control socket's backlog never filled")
        started = time.monotonic()
        result = ctl("--control", d.control, "--timeout", "1", "status")
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and d.control in lines[0], result.stderr
        assert time.monotonic() - started < 10
    finally:
        os.kill(d.pid, signal.SIGCONT)
        for s in fillers:
            s.close()
    assert_unharmed(d, before)
