"""Handlers that misbehave, under every worker class where it applies: a second client proves the daemon serves.

The handlers are in tests/apps/hardening_handlers.py; docs/hardening.md lists what each does and what
the daemon does about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from conftest import Daemon, read_line, wait_for
from prefork.scoreboard import Record
from prefork.workers.echo_engine import EchoEngine

DaemonFactory = Callable[..., Daemon]
H = "hardening_handlers"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def say(d: Daemon, line: bytes, timeout: float = 10.0) -> bytes:
    """A client: one line out, one line back."""
    with d.connect(timeout=timeout) as s:
        s.sendall(line)
        return read_line(s)


def worker_pids(d: Daemon) -> list[int]:
    return [w["pid"] for w in d.status()["workers"]]


def replaced(d: Daemon, old: int) -> dict[str, Any] | None:
    """The status once a ready worker other than ``old`` serves and ``old`` is gone."""
    st = d.status()
    ready = d.ready_workers(st)
    return st if ready and all(w["pid"] != old for w in ready) and not alive(old) else None


# -- a handler closes the listening socket ---------------------------------------------------------------------


@pytest.mark.parametrize(("worker_class", "handler"), [
    ("sync", f"{H}:CloseServerSocket"),
    ("thread", f"{H}:CloseServerSocket"),
    ("async", f"{H}:CloseListeners"),
])
def test_a_worker_whose_listener_is_closed_retires_and_is_replaced(daemon_factory: DaemonFactory,
                                                                   worker_class: str, handler: str) -> None:
    d = daemon_factory("-k", worker_class, "--timeout", "2", handler, workers=1)
    victim = worker_pids(d)[0]
    process = psutil.Process(victim)
    cpu = [sum(process.cpu_times()[:2])]

    def victim_replaced() -> dict[str, Any] | None:
        with contextlib.suppress(psutil.NoSuchProcess):
            cpu.append(sum(process.cpu_times()[:2]))  # its CPU while it lives on: no spinning
        return replaced(d, victim)

    with d.connect() as s:
        s.sendall(b"close\n")
        assert read_line(s) == b"close\n"
        s.sendall(b"still\n")  # the connection itself is served on
        assert read_line(s) == b"still\n"
        s.sendall(b"again\n")
        assert read_line(s) == b"again\n"
    started = time.monotonic()
    wait_for(victim_replaced, 15, "the worker to retire and a replacement to serve")
    assert say(d, b"second client\n") == b"second client\n"
    log = d.log()
    gone = [line for line in log.splitlines() if f"(pid {victim}): listening socket" in line]
    assert len(gone) == 1 and "is gone" in gone[0] and "retiring" in gone[0], log
    assert f"worker 0 (pid {victim}) retiring: its listening socket" in log
    assert "cannot accept" not in log
    assert "Traceback" not in log
    assert d.call("stats")["worker_crashes"] == 0  # it left cleanly, not with an EBADF traceback
    assert cpu[-1] - cpu[0] < 0.5, f"the retiring worker used {cpu[-1] - cpu[0]:.2f}s of CPU in " \
                                   f"{time.monotonic() - started:.1f}s"


def test_the_echo_engine_forgets_a_listener_closed_under_it() -> None:
    """The async built-in echo runs no user code, but a descriptor closed behind its back must not make it spin."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    keep = listener.dup()  # the master's and the siblings' copies: the socket itself lives on
    record = Record()
    gone: list[tuple[str, int | None]] = []
    loop = asyncio.new_event_loop()
    engine = EchoEngine([listener], record, on_open=lambda: None, on_close=lambda: None, can_accept=lambda: True,
                        on_listener_gone=lambda address, exc: gone.append((address, exc.errno)))
    try:
        engine.start(loop)
        engine.set_accepting(True)
        address = keep.getsockname()
        os.close(listener.fileno())  # behind the engine's back
        client = socket.create_connection(address)  # may well take the closed descriptor's number
        turns = 0
        ready = engine._on_ready

        def counted() -> None:
            nonlocal turns
            turns += 1
            ready()

        loop.remove_reader(engine.epoll.fileno())
        loop.add_reader(engine.epoll.fileno(), counted)

        async def until_gone() -> None:
            deadline = loop.time() + 5
            while not gone and loop.time() < deadline:
                await asyncio.sleep(0.01)

        loop.run_until_complete(until_gone())
        assert gone == [(f"127.0.0.1:{address[1]}", gone[0][1])] and gone[0][1] is not None
        assert engine.listeners == {}
        seen = turns
        loop.run_until_complete(asyncio.sleep(0.3))  # the client still waits in the backlog: nothing wakes us
        assert turns - seen <= 1
        assert client.fileno() >= 0 and select.select([client], [], [], 0)[0] == []  # its descriptor untouched
        client.close()
    finally:
        loop.close()
        keep.close()
        engine.epoll.close()


# -- sys.exit() and KeyboardInterrupt in a handler ----------------------------------------------------------


@pytest.mark.parametrize(("worker_class", "handler"), [
    ("sync", f"{H}:Exits"),
    ("thread", f"{H}:Exits"),
    ("async", f"{H}:exits"),
])
@pytest.mark.parametrize("line", [b"exit\n", b"interrupt\n"])
def test_sys_exit_in_a_handler_closes_that_connection_only(daemon_factory: DaemonFactory, worker_class: str,
                                                           handler: str, line: bytes) -> None:
    d = daemon_factory("-k", worker_class, handler, workers=1)
    before = worker_pids(d)
    with d.connect() as s:
        s.sendall(b"hello\n")
        assert read_line(s) == b"hello\n"
        s.sendall(line)
        assert read_line(s) == b""  # closed by the worker
    assert say(d, b"second client\n") == b"second client\n"
    assert worker_pids(d) == before  # the same worker: it did not die
    stats = d.call("stats")
    assert stats["errors"] == 1 and stats["worker_crashes"] == 0
    exc = "SystemExit" if line == b"exit\n" else "KeyboardInterrupt"
    assert "error handling connection from" in d.log() and exc in d.log()


# -- a handler forks a child -------------------------------------------------------------------------------------


FORKERS = [("sync", f"{H}:ForkChild"), ("thread", f"{H}:ForkChild"), ("async", f"{H}:fork_child")]


def fork_child(d: Daemon) -> int:
    child = int(say(d, b"fork\n"))
    assert alive(child)
    return child


def signal_masks(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v, 16) for k, _, v in (line.partition(":") for line in f) if k in ("SigIgn", "SigCgt", "SigBlk")}


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


@pytest.mark.parametrize(("worker_class", "handler"), FORKERS)
def test_nothing_a_handler_forked_outlives_a_graceful_stop(daemon_factory: DaemonFactory, worker_class: str,
                                                           handler: str) -> None:
    d = daemon_factory("-k", worker_class, handler, workers=1)
    worker = worker_pids(d)[0]
    child = fork_child(d)
    assert os.getpgid(worker) == worker != d.pid  # the worker leads its own process group...
    assert os.getpgid(child) == worker  # ...and what its handler starts is in it
    # the child resets its dispositions as it starts (an at-fork hook): wait for it, not for long
    bits = sum(1 << (sig - 1) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGINT))
    wait_for(lambda: not (m := signal_masks(child))["SigCgt"] & bits and not m["SigIgn"] & bits and not m["SigBlk"],
             2, f"the child's signals at default: {signal_masks(child)}")
    r = d.ctl("stop")
    assert r.returncode == 0, r.stderr
    stopped = time.monotonic()
    wait_for(lambda: not alive(child), 1.0, "the handler's child to be gone")
    wait_for(lambda: port_is_free(d.port), 1.0, "the port to be free")
    assert time.monotonic() - stopped < 1.0
    assert f"worker 0 (pid {worker}) left processes behind in its process group" in d.log()


@pytest.mark.parametrize(("worker_class", "handler"), FORKERS)
def test_what_a_killed_worker_started_is_ended_with_it(daemon_factory: DaemonFactory, worker_class: str,
                                                       handler: str) -> None:
    d = daemon_factory("-k", worker_class, handler, workers=1)
    worker = worker_pids(d)[0]
    child = fork_child(d)
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: not alive(child), 5, "the killed worker's child to be ended")
    wait_for(lambda: replaced(d, worker), 10, "a replacement")
    assert say(d, b"second client\n") == b"second client\n"


# A worker's reset of the processes its handlers fork, alone: the worker's SIGTERM (its killpg, the master gone)
# reaches the child before the child's own reset has run, the child's first at-fork hook being the kill.
_EARLY_SIGTERM = """
import os, signal, threading
from prefork.workers.entry import reset_signals_in_forks

signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the worker's own handler
os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))
reset_signals_in_forks()
statuses = []

def fork_and_reap():
    pid = os.fork()
    if pid == 0:
        os._exit(0)  # reached only if the SIGTERM was lost
    statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

fork_and_reap()  # a sync worker's handler: the main thread
thread = threading.Thread(target=fork_and_reap)  # a thread worker's: a pool thread
thread.start()
thread.join()
print(statuses, sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
"""


def test_a_sigterm_reaching_a_handlers_child_before_its_reset_ends_it() -> None:
    out = subprocess.run([sys.executable, "-c", _EARLY_SIGTERM], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == [f"[{-signal.SIGTERM},", f"{-signal.SIGTERM}]", "[]"], out


def test_a_worker_whose_master_died_ends_its_group(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("-k", "thread", f"{H}:ForkChild", workers=1)
    worker = worker_pids(d)[0]
    child = fork_child(d)
    d.signal(signal.SIGKILL)  # the master: nobody is left to end the worker's group but the worker
    wait_for(lambda: not alive(worker), 10, "the orphaned worker to stop")
    wait_for(lambda: not alive(child), 10, "what it started to be ended")
