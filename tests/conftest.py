"""Test harness: real prefork daemons on loopback, every wait bounded.

``daemon_factory(*args)`` starts ``python -m prefork`` in its own session with
a private control socket and ``--bind 127.0.0.1:0`` (unless the test binds
something else), waits until the first generation serves, and stops the
whole process group at the end (TERM, then KILL), printing the daemon's log
when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil
import pytest

from prefork.control import call

ROOT = Path(__file__).resolve().parents[1]
APPS = Path(__file__).resolve().parent / "apps"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Return predicate()'s first truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def preforkctl(*args: str, env: dict[str, str] | None = None,
               timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m prefork.ctl ARGS`` (bounded), capturing its output."""
    return subprocess.run([sys.executable, "-m", "prefork.ctl", *args], capture_output=True, text=True,
                          env=env or child_env(), timeout=timeout)


@dataclass
class Daemon:
    """A running prefork master started by the test."""

    proc: subprocess.Popen[bytes]
    control: str
    log_path: Path
    args: list[str]
    port: int = 0
    _stopped: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, command: str, timeout: float = 10.0, **kwargs: Any) -> dict[str, Any]:
        reply, sock = call(self.control, {"command": command, **kwargs}, timeout=timeout)
        sock.close()
        return reply

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``preforkctl --control THIS ARGS``."""
        return preforkctl("--control", self.control, *args, timeout=timeout)

    def try_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except Exception:
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready_workers(self, status: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        status = status or self.status()
        return [w for w in status["workers"] if w["state"] == "ready" and w["generation"] == status["generation"]]

    def wait_serving(self, workers: int | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """Wait until the master serves with ``workers`` ready workers of the current generation."""

        def check() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"prefork exited with {self.proc.returncode}:\n{self.log()}")
            st = self.try_status()
            if not st or st["state"] != "serving":
                return None
            want = st["target_workers"] if workers is None else workers
            return st if len(self.ready_workers(st)) == want and st["target_workers"] == want else None

        st: dict[str, Any] = wait_for(check, timeout, f"{workers or 'all'} ready workers")
        return st

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(self.address(), timeout=timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"prefork did not exit within {timeout}s:\n{self.log()}") from None

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                # workers may outlive a master that was killed: make sure the group is gone
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                continue
            break


def end_group(proc: subprocess.Popen[bytes], grace: float) -> list[int]:
    """SIGTERM the process group of ``proc``, SIGKILL it if ``proc`` has not exited within ``grace`` seconds;
    then SIGKILL what is left of the group. Returns the pids that were left (a clean stop leaves none)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            break
    left = group_members(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return left


@contextlib.contextmanager
def session_process(argv: list[str], log_path: Path, *, cwd: Path, env: dict[str, str], grace: float = 10.0,
                    none_left: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` started in its own session, its output in ``log_path`` (printed when the test fails); its
    group ended at the end (:func:`end_group`). ``none_left``: fail if any process of it outlived it."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    try:
        yield proc
    except BaseException:
        print(log_path.read_text(errors="replace"))
        raise
    finally:
        left = end_group(proc, grace)
    assert not (none_left and left), f"processes left behind: {left}"


def start_daemon(tmp_path: Path, *args: str, name: str = "t", wait: bool = True, workers: int | None = 2,
                 env: dict[str, str] | None = None, bind_default: bool = True) -> Daemon:
    control = str(tmp_path / f"{name}.sock")
    log_path = tmp_path / f"{name}.log"
    argv = [sys.executable, "-m", "prefork", "--control", control]
    if bind_default and not any(a in ("-b", "--bind") or a.startswith("--bind=") for a in args):
        argv += ["--bind", "127.0.0.1:0"]
    if workers is not None and not any(a in ("-w", "--workers") for a in args):
        argv += ["--workers", str(workers)]
    argv += list(args)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env or child_env(), cwd=str(tmp_path))
    daemon = Daemon(proc=proc, control=control, log_path=log_path, args=argv)
    if wait:
        st = daemon.wait_serving()
        for listener in st["listeners"]:
            if listener.startswith("127.0.0.1:"):
                daemon.port = int(listener.rsplit(":", 1)[1])
                break
    return daemon


@pytest.fixture
def daemon_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def factory(*args: str, **kwargs: Any) -> Daemon:
        name = kwargs.pop("name", f"d{len(daemons)}")
        # a second daemon with the same name would share the first's control socket and log
        assert name not in {Path(d.control).stem for d in daemons}, f"daemon name {name!r} used twice"
        d = start_daemon(tmp_path, *args, name=name, **kwargs)
        daemons.append(d)
        return d

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for d in daemons:
        pids = [p.pid for p in _group(d.pid)]
        d.stop()
        if failed is not None and failed.failed:
            print(f"--- log of {' '.join(d.args)} ---\n{d.log()}")
        # after the group's SIGKILL, exits are under way: wait (bounded) for them to finish
        try:
            wait_for(lambda pids=pids: not [p for p in pids if _is_ours(p)], 10, "the daemon's processes to exit")
        except AssertionError:
            leftover = [p for p in pids if _is_ours(p)]
            raise AssertionError(f"processes left behind: {leftover}") from None


def _group(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _is_ours(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]


def exchange(addr: tuple[str, int], payload: bytes, timeout: float = 5.0) -> bytes:
    """Connect, send, read the same number of bytes back, close."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(payload)
        return recv_exact(s, len(payload))


def read_line(s: socket.socket, limit: int = 65536) -> bytes:
    """Bytes up to and including the next newline (or what came before EOF, or ``limit`` bytes)."""
    buf = bytearray()
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def read_answers(clients: list[socket.socket]) -> list[bytes]:
    """One line from each client in turn (``repr`` of the error where its connection failed), closing each."""
    answers = []
    for s in clients:
        try:
            answers.append(read_line(s))
        except OSError as exc:
            answers.append(repr(exc).encode())
        finally:
            s.close()
    return answers


def refused(addr: tuple[str, int], timeout: float = 1.0) -> bool:
    """True once a new connection to ``addr`` is refused: nothing listens there any more.

    A connection that times out (dropped while a queue drains) or is reset (a dying listener still took
    the SYN) is not refused yet."""
    try:
        socket.create_connection(addr, timeout=timeout).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def process_exists(pid: int) -> bool:
    """True while a process ``pid`` exists (a zombie counts: it is not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def public_directory(prefix: str, mode: int) -> Iterator[Path]:
    """A directory outside pytest's tmp_path (root's alone, 0700) that another user (--user nobody) may reach
    as ``mode`` allows; removed at the end."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(mode)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for its reaper counts as gone); never raises when
    it ends between two looks."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    alive = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
    return alive


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


class ClientThreads:
    """``clients`` daemon threads, each running ``self._run(index)`` from ``with`` entry until ``stop()``."""

    def __init__(self, clients: int) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        assert not any(t.is_alive() for t in self._threads), "a load thread is stuck"


class Load(ClientThreads):
    """Client threads hammering an echo server until stopped (bounded in time and count).

    ``mode="connect"``: each exchange on a new connection; ``"persistent"``: one
    connection per client, reconnecting only if the server closed it
    gracefully (a worker recycled), which is not a failure.
    Every failure is recorded with its reason.
    """

    def __init__(self, addr: tuple[str, int], clients: int = 8, mode: str = "connect",
                 max_seconds: float = 60.0, max_exchanges: int = 200_000) -> None:
        self.addr = addr
        self.mode = mode
        self.max_seconds = max_seconds
        self.max_exchanges = max_exchanges
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        super().__init__(clients)

    def wait_ok(self, count: int, timeout: float = 20.0) -> None:
        """Wait until at least ``count`` more exchanges succeeded."""
        target = self.ok + count
        wait_for(lambda: self.ok >= target or self.failures, timeout, f"{count} successful exchanges")

    def _record(self, ok: bool, why: str = "") -> None:
        with self._lock:
            if ok:
                self.ok += 1
            else:
                self.failures.append(why)

    def _run(self, i: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        n = 0
        sock: socket.socket | None = None
        while not self._stop.is_set() and time.monotonic() < deadline and self.ok < self.max_exchanges:
            payload = f"client {i} exchange {n}\n".encode()
            n += 1
            try:
                if self.mode == "connect":
                    got = exchange(self.addr, payload)
                    self._record(got == payload, f"mismatch: {got!r} != {payload!r}")
                    continue
                if sock is None:
                    sock = socket.create_connection(self.addr, timeout=5)
                sock.sendall(payload)
                got = recv_exact(sock, len(payload))
                if got == b"":
                    sock.close()
                    sock = None  # closed gracefully before our request was read: retry on a new connection
                    continue
                self._record(got == payload, f"mismatch: {got!r} != {payload!r}")
            except OSError as exc:
                self._record(False, f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                    sock = None
        if sock is not None:
            sock.close()


def listening(port: int) -> bool:
    """True once a socket listens on 127.0.0.1:``port`` (from /proc/net/tcp: no connection is made)."""
    local = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(row.split()[1] == local and row.split()[3] == "0A" for row in rows)  # 0A: TCP_LISTEN


def haproxy_serving(stats_socket: Path, port: int) -> bool:
    """True once HAProxy answers on its stats socket and its frontend on ``port`` listens.

    Never a probe connection to the frontend: HAProxy would forward it to a
    backend and, the probe gone, abort it there (in the middle of a TLS
    handshake, say), a connection the test did not mean and may count.
    """
    try:
        answers = "Pid:" in haproxy_admin(stats_socket, "show info")
    except OSError:
        return False
    return answers and listening(port)


def haproxy_admin(stats_socket: Path, command: str) -> str:
    """One command on HAProxy's stats socket; HAProxy answers and closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(stats_socket))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()
