"""Tests for prefork.systemd against real sockets, processes and systemd tools.

Notifications go to real ``AF_UNIX`` datagram receivers (a path and an
abstract name). Socket activation runs under the real
``systemd-socket-activate``, which binds the listeners and execs a small
Python script only when the first connection arrives; that connection must
be the one the script answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prefork import systemd
from prefork.systemd import Notifier, describe, listen_fds, notify, watchdog_interval

REPO_ROOT = Path(__file__).resolve().parents[1]
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
WAIT = 30.0  # seconds: the bound on every wait for a child process

needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed"
)


# --- helpers -----------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pf-sd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def datagram_receiver(address: str | bytes) -> socket.socket:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(10)
    return receiver


@pytest.fixture
def path_receiver(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify receiver bound to a filesystem path, exported as $NOTIFY_SOCKET."""
    path = short_dir / "notify"
    with datagram_receiver(str(path)) as receiver:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield receiver


@pytest.fixture
def abstract_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify receiver bound to an abstract name, exported as $NOTIFY_SOCKET=@name."""
    name = f"prefork-test-{uuid.uuid4().hex}"
    with datagram_receiver(b"\0" + name.encode()) as receiver:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield receiver


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports prefork from this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End a process started with start_new_session=True and everything it started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):  # the whole group is already gone
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=5)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=WAIT)
    finally:
        stop_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def free_port(*, also_ipv6: bool = False) -> int:
    """A port free on 127.0.0.1 (and on ::1 when asked), found by binding port 0."""
    for _ in range(20):
        with socket.socket(socket.AF_INET) as v4:
            v4.bind(("127.0.0.1", 0))
            port: int = v4.getsockname()[1]
            if not also_ipv6:
                return port
            with socket.socket(socket.AF_INET6) as v6:
                try:
                    v6.bind(("::1", port))
                except OSError:  # taken on ::1: try another one
                    continue
                return port
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")


class SocketActivation:
    """``systemd-socket-activate ARGS...`` in its own session, output captured."""

    def __init__(self, args: list[str]) -> None:
        assert SOCKET_ACTIVATE is not None
        # systemd-socket-activate gives its command a fresh environment (only
        # TERM, PATH, USER, HOME, LISTEN_* and -E), so PYTHONPATH goes by -E.
        pythonpath = child_env()["PYTHONPATH"]
        self.proc = subprocess.Popen(
            [SOCKET_ACTIVATE, "-E", f"PYTHONPATH={pythonpath}", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )
        self.stdout = b""
        self.stderr = bytearray()

    def wait_for_stderr(self, marker: bytes, timeout: float = WAIT) -> None:
        """Read stderr until ``marker`` appears; fail after ``timeout`` seconds."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while marker not in self.stderr:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {marker!r} on stderr within {timeout}s")
                if selector.select(remaining):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        raise AssertionError(f"stderr closed before {marker!r} appeared")
                    self.stderr += chunk

    def finish(self, timeout: float = WAIT) -> dict[str, Any]:
        """Wait for the exit; return the JSON report the child printed."""
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        assert self.proc.returncode == 0, f"exit status {self.proc.returncode}"
        report: dict[str, Any] = json.loads(self.stdout)
        return report

    def stop(self) -> None:
        if self.proc.returncode is None:
            stop_group(self.proc)
            with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
                out, err = self.proc.communicate(timeout=5)
                self.stdout += out
                self.stderr += err
        else:
            stop_group(self.proc)  # the exec'd child may have left its own children


@contextlib.contextmanager
def socket_activation(*args: str) -> Iterator[SocketActivation]:
    activation = SocketActivation(list(args))
    try:
        yield activation
    except BaseException:
        activation.stop()
        print(f"systemd-socket-activate {' '.join(args)}: exit status {activation.proc.returncode}")
        print("stdout:", activation.stdout.decode(errors="replace"), sep="\n")
        print("stderr:", activation.stderr.decode(errors="replace"), sep="\n")
        raise
    finally:
        activation.stop()


def request(address: tuple[str, int] | str, family: socket.AddressFamily, payload: bytes) -> bytes:
    """Connect, send ``payload``, read the whole answer (bounded)."""
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(WAIT)
        conn.connect(address)
        conn.sendall(payload)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
        return answer


# Runs as a child of this very child: reports which of the given fds it
# inherited, which LISTEN_* variables it sees, and what listen_fds() gives it.
GRANDCHILD = r"""
import json, os, sys
from prefork.systemd import listen_fds

def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True

open_fds = [int(fd) for fd in sys.argv[1:] if is_open(int(fd))]
env = sorted(name for name in os.environ if name.startswith("LISTEN_"))
adopted = [inherited.fd for inherited in listen_fds()]
print(json.dumps({"open": open_fds, "env": env, "adopted": adopted}))
"""

# Exec'd by systemd-socket-activate on the first connection.
ACTIVATED_CHILD = r"""
import json, os, selectors, subprocess, sys
from prefork.systemd import describe, listen_fds

GRANDCHILD = sys.argv[1]
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
passed = [3 + i for i in range(int(os.environ["LISTEN_FDS"]))]

def grandchild():
    # close_fds=False: only close-on-exec keeps the listeners from leaking.
    done = subprocess.run([sys.executable, GRANDCHILD, *map(str, passed)], close_fds=False,
                          stdout=subprocess.PIPE, timeout=30, check=True)
    return json.loads(done.stdout)

report = {
    "pid": os.getpid(),
    "env_before": {name: os.environ.get(name) for name in VARIABLES},
    "inheritable_before": [os.get_inheritable(fd) for fd in passed],
    "grandchild_before": grandchild(),
}
sockets = listen_fds()
report["env_after"] = {name: os.environ.get(name) for name in VARIABLES}
report["sockets"] = [
    {"fd": s.fd, "name": s.name, "family": s.sock.family.name, "type": s.sock.type.name,
     "describe": describe(s.sock), "inheritable": os.get_inheritable(s.fd)}
    for s in sockets
]
report["grandchild_after"] = grandchild()
print(json.dumps(report), flush=True)

# Serve exactly one connection: the one that triggered the activation.
with selectors.DefaultSelector() as selector:
    for s in sockets:
        selector.register(s.sock, selectors.EVENT_READ, s.name)
    events = selector.select(timeout=30)
    assert events, "no connection within 30s"
    key, _ = events[0]
    conn, _ = key.fileobj.accept()
    with conn:
        conn.settimeout(30)
        data = conn.recv(1024)
        conn.sendall(b"%s %d: %s" % (key.data.encode(), os.getpid(), data))
"""


def write_child(directory: Path) -> list[str]:
    """Write the activated child's scripts; return the command that runs it."""
    (directory / "child.py").write_text(ACTIVATED_CHILD)
    (directory / "grandchild.py").write_text(GRANDCHILD)
    return [sys.executable, str(directory / "child.py"), str(directory / "grandchild.py")]


# --- notify ------------------------------------------------------------------


def test_notify_without_notify_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_notify_to_a_path_sends_one_exact_datagram_per_call(path_receiver: socket.socket) -> None:
    assert notify("READY=1", "STATUS=serving on 127.0.0.1:8000") is True
    assert notify("WATCHDOG=1") is True
    assert path_receiver.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:8000"
    assert path_receiver.recv(4096) == b"WATCHDOG=1"


def test_notify_to_an_abstract_name(abstract_receiver: socket.socket) -> None:
    assert os.environ["NOTIFY_SOCKET"].startswith("@")
    assert notify("STOPPING=1", "STATUS=draining 3 connections") is True
    assert abstract_receiver.recv(4096) == b"STOPPING=1\nSTATUS=draining 3 connections"


def test_notify_encodes_utf8(path_receiver: socket.socket) -> None:
    assert notify("STATUS=prêt") is True
    assert path_receiver.recv(4096) == "STATUS=prêt".encode()


@pytest.mark.parametrize("states", [(), ("READY",), ("=1",), ("STATUS=two\nlines",)])
def test_notify_rejects_malformed_states_even_outside_systemd(
    states: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with pytest.raises(ValueError, match="notify"):
        notify(*states)


def test_notify_ignores_a_relative_path(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, path_receiver: socket.socket
) -> None:
    # A relative path would be resolved against the cwd: refuse it like libsystemd.
    monkeypatch.chdir(short_dir)
    monkeypatch.setenv("NOTIFY_SOCKET", "notify")
    assert notify("READY=1") is False
    assert Notifier().enabled is False
    path_receiver.settimeout(0)
    with pytest.raises(BlockingIOError):
        path_receiver.recv(4096)


@pytest.mark.parametrize("kind", ["closed path", "missing path", "closed abstract"])
def test_notify_survives_a_receiver_that_is_gone(
    kind: str, short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if kind == "closed path":
        path = short_dir / "gone"
        datagram_receiver(str(path)).close()  # the file stays, nobody listens
        assert path.exists()
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    elif kind == "missing path":
        monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "never-bound"))
    else:
        name = f"prefork-test-{uuid.uuid4().hex}"
        datagram_receiver(b"\0" + name.encode()).close()
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    notifier = Notifier()
    with caplog.at_level(logging.DEBUG, logger="prefork.systemd"):
        assert notify("READY=1") is False
        assert notifier.enabled is True
        assert notifier.watchdog() is False
    failures = [r for r in caplog.records if r.name == "prefork.systemd" and "cannot notify" in r.message]
    assert len(failures) == 2
    assert all(r.levelno == logging.DEBUG for r in failures)


def test_notify_gives_up_on_a_full_queue_after_a_bounded_wait(
    path_receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A manager that stops reading must not freeze the master: the receiver
    # queue holds net.unix.max_dgram_qlen datagrams, then sends must time out.
    monkeypatch.setattr(systemd, "SEND_TIMEOUT", 0.3)
    for sent in range(10_000):
        started = time.monotonic()
        if not notify(f"STATUS=message {sent}"):
            elapsed = time.monotonic() - started
            break
    else:
        pytest.fail("10000 datagrams never filled the receiver's queue")
    assert sent > 0
    assert 0.25 <= elapsed < 3.0
    # What was queued is intact and in order.
    assert path_receiver.recv(4096) == b"STATUS=message 0"
    assert path_receiver.recv(4096) == b"STATUS=message 1"


def test_the_sender_pid_is_the_notifying_process(path_receiver: socket.socket) -> None:
    # systemd attributes a message to a process through SCM_CREDENTIALS.
    path_receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    code = (
        "import os, sys\n"
        "from prefork.systemd import notify\n"
        "print(os.getpid())\n"
        "sys.exit(0 if notify('READY=1', 'STATUS=from a child') else 3)\n"
    )
    done = run_python(code, child_env())
    assert done.returncode == 0, done.stderr.decode()
    child_pid = int(done.stdout)
    credentials = struct.Struct("3i")
    data, ancillary, _, _ = path_receiver.recvmsg(4096, socket.CMSG_SPACE(credentials.size))
    assert data == b"READY=1\nSTATUS=from a child"
    [(level, kind, raw)] = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    pid, uid, gid = credentials.unpack(raw)
    assert pid == child_pid != os.getpid()
    assert (uid, gid) == (os.getuid(), os.getgid())


# --- Notifier ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("serving 4 workers"), b"READY=1\nSTATUS=serving 4 workers"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.status("worker 2 died\nrespawning"), b"STATUS=worker 2 died respawning"),
        (lambda n: n.mainpid(4711), b"MAINPID=4711"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.send("STATUS=failed", "ERRNO=98"), b"STATUS=failed\nERRNO=98"),
    ],
    ids=["ready", "ready-status", "stopping", "status", "mainpid", "watchdog", "send"],
)
def test_notifier_messages(
    action: Callable[[Notifier], bool], expected: bytes, abstract_receiver: socket.socket
) -> None:
    notifier = Notifier()
    assert notifier.enabled is True
    assert action(notifier) is True
    assert abstract_receiver.recv(4096) == expected


def test_notifier_reloading_carries_the_monotonic_clock(path_receiver: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier().reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = path_receiver.recv(4096).decode().split("\n")
    assert reloading == "RELOADING=1"
    name, _, value = monotonic.partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_notifier_reads_the_environment_once(
    path_receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = Notifier()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False
    assert notifier.ready() is True
    assert path_receiver.recv(4096) == b"READY=1"


def test_notifier_takes_an_explicit_address(abstract_receiver: socket.socket) -> None:
    notifier = Notifier(os.environ["NOTIFY_SOCKET"])
    assert notifier.status("up") is True
    assert abstract_receiver.recv(4096) == b"STATUS=up"
    assert Notifier("").enabled is False


def test_notifier_outside_systemd_is_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    notifier = Notifier()
    assert notifier.enabled is False
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None  # nobody would hear the pings
    assert watchdog_interval() == 1.0


# --- watchdog_interval -------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("3000000", None, 1.5),
        ("3000000", "self", 1.5),
        ("3000000", "other", None),
        ("", None, None),
        (None, "self", None),
        ("1", None, 0.0000005),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(
                name, {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            )
    assert watchdog_interval() == expected


def test_notifier_watchdog_interval_follows_the_environment(
    path_receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier().watchdog_interval() == 5.0


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"WATCHDOG_USEC": "3s"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "-5"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "main"}, "WATCHDOG_PID"),
    ],
)
def test_watchdog_interval_rejects_malformed_values(
    variables: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=named) as caught:
        watchdog_interval()
    assert "\n" not in str(caught.value)


# --- listen_fds in this process (nothing here may touch fds 3 and up) -------


def set_listen_variables(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    for name in LISTEN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value.replace("{self}", str(os.getpid())))


def listen_variables() -> dict[str, str]:
    return {name: os.environ[name] for name in LISTEN_VARIABLES if name in os.environ}


def test_listen_fds_outside_systemd_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    set_listen_variables(monkeypatch)
    assert listen_fds() == []


def test_listen_fds_for_another_pid_is_empty_and_unsets_the_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = str(os.getppid())
    set_listen_variables(monkeypatch, LISTEN_PID=other, LISTEN_FDS="2", LISTEN_FDNAMES="web:admin")
    assert listen_fds() == []
    assert listen_variables() == {}


def test_listen_fds_can_keep_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    other = str(os.getppid())
    set_listen_variables(monkeypatch, LISTEN_PID=other, LISTEN_FDS="1")
    assert listen_fds(unset_environment=False) == []
    assert listen_variables() == {"LISTEN_PID": other, "LISTEN_FDS": "1"}


def test_listen_fds_with_zero_fds_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    set_listen_variables(monkeypatch, LISTEN_PID="{self}", LISTEN_FDS="0")
    assert listen_fds() == []
    assert listen_variables() == {}


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"LISTEN_PID": "{self}", "LISTEN_FDS": "two"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "{self}", "LISTEN_FDS": "1.5"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "{self}", "LISTEN_FDS": "-1"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "systemd", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": "{self}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"}, "LISTEN_FDNAMES"),
        ({"LISTEN_PID": "{self}", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web:admin"}, "LISTEN_FDNAMES"),
    ],
)
def test_listen_fds_rejects_malformed_values_and_still_unsets(
    variables: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_listen_variables(monkeypatch, **variables)
    with pytest.raises(ValueError, match=named) as caught:
        listen_fds()
    assert "\n" not in str(caught.value)
    assert listen_variables() == {}


def test_listen_fds_rejects_an_fd_that_is_not_a_socket() -> None:
    code = (
        "import os\n"
        "from prefork.systemd import listen_fds\n"
        "read_end, _ = os.pipe()\n"
        "if read_end != 3:\n"
        "    os.dup2(read_end, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='web')\n"
        "try:\n"
        "    listen_fds()\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    done = run_python(code, child_env())
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == (
        "LISTEN_FDS=1 but fd 3 ('web') is not an open socket: Socket operation on non-socket"
    )


# --- listen_fds under systemd-socket-activate --------------------------------


@needs_socket_activate
@pytest.mark.parametrize(("fdname", "expected_name"), [("web", "web"), (None, "unknown")])
def test_socket_activation_serves_the_triggering_connection(
    fdname: str | None, expected_name: str, short_dir: Path
) -> None:
    port = free_port()
    names = [f"--fdname={fdname}"] if fdname else []
    with socket_activation("-l", f"127.0.0.1:{port}", *names, *write_child(short_dir)) as activation:
        activation.wait_for_stderr(b" as 3.\n")  # bound and listening: connect now
        answer = request(("127.0.0.1", port), socket.AF_INET, b"hello")
        report = activation.finish()

    # The child execs in place: LISTEN_PID is the pid we started.
    assert report["pid"] == activation.proc.pid
    assert answer == b"%s %d: hello" % (expected_name.encode(), activation.proc.pid)
    assert report["env_before"] == {
        "LISTEN_PID": str(activation.proc.pid),
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": fdname,  # systemd-socket-activate sets none without --fdname
    }
    assert report["env_after"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    assert report["sockets"] == [
        {
            "fd": 3,
            "name": expected_name,
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "describe": f"127.0.0.1:{port}",
            "inheritable": False,
        }
    ]
    # Passed inheritable; close-on-exec once adopted, so programs we run no
    # longer get the listener nor the variables (and would ignore them anyway).
    assert report["inheritable_before"] == [True]
    assert report["grandchild_before"] == {
        "open": [3],
        "env": sorted(name for name in LISTEN_VARIABLES if name != "LISTEN_FDNAMES" or fdname),
        "adopted": [],
    }
    assert report["grandchild_after"] == {"open": [], "env": [], "adopted": []}


@needs_socket_activate
def test_socket_activation_with_ipv4_ipv6_and_unix_listeners(short_dir: Path) -> None:
    port = free_port(also_ipv6=True)
    path = str(short_dir / "web.sock")
    with socket_activation(
        "-l",
        f"127.0.0.1:{port}",
        "-l",
        f"[::1]:{port}",
        "-l",
        path,
        "--fdname=public:public6:local",
        *write_child(short_dir),
    ) as activation:
        activation.wait_for_stderr(b" as 5.\n")
        # Trigger through the second listener: the child must serve that one.
        answer = request(("::1", port), socket.AF_INET6, b"over v6")
        report = activation.finish()

    assert answer == b"public6 %d: over v6" % activation.proc.pid
    assert report["env_before"]["LISTEN_FDS"] == "3"
    assert [(s["fd"], s["name"], s["family"], s["type"], s["describe"]) for s in report["sockets"]] == [
        (3, "public", "AF_INET", "SOCK_STREAM", f"127.0.0.1:{port}"),
        (4, "public6", "AF_INET6", "SOCK_STREAM", f"[::1]:{port}"),
        (5, "local", "AF_UNIX", "SOCK_STREAM", f"unix:{path}"),
    ]
    assert report["inheritable_before"] == [True, True, True]
    assert [s["inheritable"] for s in report["sockets"]] == [False, False, False]
    assert report["grandchild_before"]["open"] == [3, 4, 5]
    assert report["grandchild_after"] == {"open": [], "env": [], "adopted": []}


# --- describe ----------------------------------------------------------------


def test_describe_inet_sockets() -> None:
    with socket.socket(socket.AF_INET) as v4, socket.socket(socket.AF_INET6) as v6:
        v4.bind(("127.0.0.1", 0))
        v6.bind(("::1", 0))
        assert describe(v4) == f"127.0.0.1:{v4.getsockname()[1]}"
        assert describe(v6) == f"[::1]:{v6.getsockname()[1]}"


def test_describe_unix_sockets(short_dir: Path) -> None:
    name = f"prefork-test-{uuid.uuid4().hex}"
    with (
        socket.socket(socket.AF_UNIX) as by_path,
        socket.socket(socket.AF_UNIX) as abstract,
        socket.socket(socket.AF_UNIX) as unnamed,
    ):
        by_path.bind(str(short_dir / "s.sock"))
        abstract.bind(b"\0" + name.encode())
        assert describe(by_path) == f"unix:{short_dir / 's.sock'}"
        assert describe(abstract) == f"unix:@{name}"
        assert describe(unnamed) == "unix:(unnamed)"
    assert describe(by_path) == "closed socket"
