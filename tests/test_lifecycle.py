"""The daemon's lifecycle end to end: respawn, reload, stop, scale, heartbeat, recycling, log reopening, titles.

Every daemon runs on loopback through ``daemon_factory``; every wait is bounded
and waits for something observable (a status field, a pid, a log line, a reply).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import Daemon, Load, child_env, exchange, gone, recv_exact, wait_for

DaemonFactory = Callable[..., Daemon]

HANDLERS = "lifecycle_handlers"


# -- helpers ---------------------------------------------------------------------------------------------



def all_gone(pids: list[int]) -> bool:
    return all(gone(pid) for pid in pids)


def worker_pids(d: Daemon) -> list[int]:
    return [w["pid"] for w in d.status()["workers"]]


def group_pids(d: Daemon) -> list[int]:
    """The master and every process below it."""
    root = psutil.Process(d.pid)
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


def read_to_eof(addr: tuple[str, int], timeout: float = 5.0) -> bytes:
    """Connect and read whatever the server sends until it closes."""
    with socket.create_connection(addr, timeout=timeout) as s:
        buf = bytearray()
        while chunk := s.recv(4096):
            buf += chunk
        return bytes(buf)


def replacement(d: Daemon, slot: int, old_pid: int) -> dict[str, Any] | None:
    """The ready worker now in ``slot`` if it is not ``old_pid``."""
    st = d.try_status()
    if st is None:
        return None
    for w in d.ready_workers(st):
        if w["slot"] == slot and w["pid"] != old_pid:
            return w
    return None


def closed_by_server(conn: socket.socket) -> bool:
    """True if the server closed ``conn`` (EOF or reset) rather than sending something."""
    try:
        return conn.recv(16) == b""
    except ConnectionResetError:
        return True


def log_has(d: Daemon, text: str) -> bool:
    return text in d.log()


def module_env(directory: Path) -> dict[str, str]:
    """The harness's environment with ``directory`` first on PYTHONPATH (handler modules written by the test)."""
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(directory), env["PYTHONPATH"]])
    return env


HANDLER_SOURCE = '''\
from socketserver import BaseRequestHandler


class Handler(BaseRequestHandler):
    def handle(self):
        self.request.sendall({reply!r})
'''


def write_module(path: Path, text: str) -> None:
    """Rewrite a module; callers make each version a different size (the pyc check is mtime + size)."""
    before = path.stat().st_size if path.exists() else None
    path.write_text(text)
    assert path.stat().st_size != before, "a rewritten module must change size or a stale .pyc may be used"


def serving_generation(d: Daemon, generation: int) -> dict[str, Any] | None:
    """The status once ``generation`` is the current one and the daemon is serving (not reloading)."""
    st = d.try_status()
    return st if st is not None and st["generation"] == generation and st["state"] == "serving" else None


# -- 1. kill -9 of a worker under load ---------------------------------------------------------------------


def test_kill9_worker_under_load_is_replaced_without_refusals(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    victim = d.status()["workers"][0]
    with Load(d.address(), clients=8) as load:
        load.wait_ok(200)
        os.kill(victim["pid"], signal.SIGKILL)
        new = wait_for(lambda: replacement(d, victim["slot"], victim["pid"]), 10, "a replacement worker")
        load.wait_ok(200)
    assert new["pid"] != victim["pid"] and gone(victim["pid"])
    # The connections the killed worker had in hand die with it (closed or reset: nothing can save them);
    # nothing may be refused or time out, and no more are lost than the 8 clients can have in flight at once.
    assert len(load.failures) <= 8, load.failures
    for why in load.failures:
        assert why.startswith(("mismatch: b''", "ConnectionResetError", "BrokenPipeError")), load.failures
    # sent by hand, with no OOM kill on record meanwhile: not blamed on memory
    assert log_has(d, f"worker {victim['slot']} (pid {victim['pid']}) was killed by SIGKILL (not by the master, "
                      "nor the kernel's OOM killer)")
    # with the replacement in place, a fresh load sees no failure at all
    with Load(d.address(), clients=8) as after:
        after.wait_ok(300)
    assert after.failures == []
    assert len(d.ready_workers()) == 2


# -- 2. three reloads under load ---------------------------------------------------------------------------


@pytest.mark.parametrize("worker_class", ["thread", "sync", "async"])
def test_three_reloads_under_load_lose_nothing(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    first = d.status()
    generation = first["generation"]
    seen = {w["pid"]: w["generation"] for w in first["workers"]}
    with Load(d.address(), clients=8) as load:
        load.wait_ok(100)
        for how in ("SIGHUP", "control", "SIGHUP"):
            if how == "SIGHUP":
                d.signal(signal.SIGHUP)
                st = wait_for(partial(serving_generation, d, generation + 1), 20, "the new generation after SIGHUP")
            else:
                reply = d.call("reload", timeout=30)
                assert reply["ok"] is True, reply
                assert reply["generation"] == generation + 1
                st = d.status()
            assert st["generation"] == generation + 1
            generation = st["generation"]
            assert len(d.ready_workers(st)) == 2
            seen.update({w["pid"]: w["generation"] for w in st["workers"]})
            load.wait_ok(100)
        old = [pid for pid, gen in seen.items() if gen < generation]
        assert len(old) >= 6  # three generations of two workers each were replaced
        wait_for(lambda: all(w["generation"] == generation for w in d.status()["workers"]), 20,
                 "no worker of an old generation left")
        wait_for(lambda: all_gone(old), 10, "the old workers' processes gone")
        load.wait_ok(100)
    assert load.failures == []
    assert load.ok >= 500
    stats = d.call("stats")
    assert stats["reloads"] == 3 and stats["failed_reloads"] == 0


# -- 3. and 4. reload picks up edited code, and survives broken code ------------------------------------------


def test_reload_picks_up_edited_handler_code(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    module = tmp_path / "lifecycle_edited.py"
    write_module(module, HANDLER_SOURCE.format(reply=b"v1"))
    d = daemon_factory("lifecycle_edited:Handler", env=module_env(tmp_path))
    assert read_to_eof(d.address()) == b"v1"
    write_module(module, HANDLER_SOURCE.format(reply=b"v2") + "\n# edited: the second version\n")
    reply = d.call("reload", timeout=30)
    assert reply["ok"] is True and reply["generation"] == 2, reply
    assert [read_to_eof(d.address()) for _ in range(6)] == [b"v2"] * 6


def test_reload_with_broken_handler_keeps_the_old_generation(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    module = tmp_path / "lifecycle_broken.py"
    write_module(module, HANDLER_SOURCE.format(reply=b"v1"))
    d = daemon_factory("lifecycle_broken:Handler", env=module_env(tmp_path))
    old = d.status()
    write_module(module, "from socketserver import BaseRequestHandler\n\nclass Handler(BaseRequestHandler:\n")
    reply = d.call("reload", timeout=30)
    assert reply["ok"] is False, reply
    assert "lifecycle_broken" in reply["error"], reply
    assert "SyntaxError" in reply["error"], reply
    st = d.status()
    assert st["generation"] == old["generation"] == 1
    assert st["state"] == "serving"
    assert {w["pid"] for w in d.ready_workers(st)} == {w["pid"] for w in old["workers"]}
    assert [read_to_eof(d.address()) for _ in range(4)] == [b"v1"] * 4
    stats = d.call("stats")
    assert stats["failed_reloads"] == 1 and stats["reloads"] == 0
    # the failed generation's workers do not linger
    wait_for(lambda: all(w["generation"] == 1 for w in d.status()["workers"]), 10, "failed generation gone")
    assert d.proc.poll() is None


# -- 5. to 8. stopping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("worker_class", ["thread", "sync", "async"])
def test_sigterm_serves_the_open_connection_then_exits(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    pids = group_pids(d)
    assert len(pids) == 4  # the master, the generation's mold, two workers
    with d.connect() as conn:
        conn.sendall(b"before\n")
        assert recv_exact(conn, 7) == b"before\n"
        d.signal(signal.SIGTERM)
        wait_for(lambda: (s := d.try_status()) is not None and s["state"] == "stopping", 5, "state stopping")
        for i in range(3):  # still served while the daemon drains
            msg = f"after TERM {i}\n".encode()
            conn.sendall(msg)
            assert recv_exact(conn, len(msg)) == msg
        assert d.proc.poll() is None  # the open connection holds the drain
    started = time.monotonic()
    assert d.wait_exit(10) == 0
    assert time.monotonic() - started < 5
    wait_for(lambda: all_gone(pids), 5, "every process of the group gone")
    assert "exiting with status 0" in d.log()


def test_sigterm_graceful_timeout_ends_an_idle_connection(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--graceful-timeout", "1")
    workers = worker_pids(d)
    with d.connect(timeout=10) as conn:
        conn.sendall(b"hold\n")
        assert recv_exact(conn, 5) == b"hold\n"
        started = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait_exit(8) == 0
        elapsed = time.monotonic() - started
        assert 0.8 <= elapsed <= 5.0, f"graceful stop took {elapsed:.2f}s with --graceful-timeout 1"
        assert closed_by_server(conn)  # when its time was up
    assert all_gone(workers)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_fast_stop_does_not_wait_for_connections(daemon_factory: DaemonFactory, sig: signal.Signals) -> None:
    d = daemon_factory()
    workers = worker_pids(d)
    with d.connect() as conn:
        conn.sendall(b"hold\n")
        assert recv_exact(conn, 5) == b"hold\n"
        started = time.monotonic()
        d.signal(sig)
        assert d.wait_exit(10) == 0
        assert time.monotonic() - started < 3.0
    assert all_gone(workers)


@pytest.mark.parametrize("worker_class", ["thread", "async"])
def test_master_sigkill_leaves_no_worker_behind(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-w", "3", "-k", worker_class)
    with d.connect() as conn:
        conn.sendall(b"x")
        assert recv_exact(conn, 1) == b"x"
        st = wait_for(lambda: (s := d.status()) and sum(w["active"] for w in s["workers"]) == 1 and s, 5,
                      "the connection counted as active")
        busy = next(w["pid"] for w in st["workers"] if w["active"] == 1)
        idle = [w["pid"] for w in st["workers"] if w["pid"] != busy]
        assert len(idle) == 2
        d.signal(signal.SIGKILL)
        assert d.wait_exit(5) == -signal.SIGKILL
        wait_for(lambda: all_gone(idle), 10, "the idle workers gone after the master died")
        # the orphaned worker drains like a graceful stop: the open connection is still served...
        conn.sendall(b"orphaned\n")
        assert recv_exact(conn, 9) == b"orphaned\n"
    # ...and once the client is done, it goes too
    wait_for(lambda: gone(busy), 10, "the last worker gone once its connection closed")


# -- 9. scaling ----------------------------------------------------------------------------------------------


def test_ttin_ttou_and_scale_change_the_worker_count(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory()
    d.signal(signal.SIGTTIN)
    st = d.wait_serving(3, timeout=10)
    assert st["target_workers"] == 3
    assert sorted(w["slot"] for w in d.ready_workers(st)) == [0, 1, 2]
    third = next(w["pid"] for w in st["workers"] if w["slot"] == 2)

    d.signal(signal.SIGTTOU)
    wait_for(lambda: [w["slot"] for w in d.status()["workers"]] == [0, 1], 10, "slot 2 gone after TTOU")
    assert d.status()["target_workers"] == 2
    wait_for(lambda: gone(third), 5, "the scaled-down worker's process gone")

    reply = d.call("scale", workers=4)
    assert reply == {"ok": True, "workers": 4, "previous": 2}
    st = d.wait_serving(4, timeout=10)
    assert st["target_workers"] == 4

    done = d.ctl("scale", "1")
    assert done.returncode == 0, done.stderr
    assert "scaled from 4 to 1" in done.stdout
    wait_for(lambda: len(d.status()["workers"]) == 1, 10, "three workers gone after scale 1")
    removed = [w["pid"] for w in st["workers"] if w["slot"] > 0]
    wait_for(lambda: all_gone(removed), 5, "the scaled-down workers' processes gone")

    done = d.ctl("scale", "3")
    assert done.returncode == 0, done.stderr
    st = d.wait_serving(3, timeout=10)
    assert exchange(d.address(), b"still serving") == b"still serving"


# -- 10. respawn ---------------------------------------------------------------------------------------------


def test_worker_dying_on_every_connection_backs_off(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory(f"{HANDLERS}:ExitHandler", workers=1)

    def poke_and_look() -> dict[str, Any] | None:
        try:
            with socket.create_connection(d.address(), timeout=5) as s:
                s.sendall(b"die")
                s.recv(16)  # the worker exits: EOF or reset
        except OSError:
            pass
        for b in d.status()["backoff"]:
            if b["slot"] == 0 and b["failures"] >= 2 and b["restart_in_s"]:
                return dict(b)
        return None

    backoff = wait_for(poke_and_look, 15, "slot 0 in backoff with a restart delay")
    assert backoff["failures"] >= 2 and backoff["restart_in_s"] > 0
    assert "exited with status 7" in d.log()
    assert d.proc.poll() is None
    st = d.wait_serving(1, timeout=15)  # it comes back after the delay
    assert st["state"] == "serving"
    assert d.call("stats")["worker_crashes"] >= 2


# -- 11. heartbeat -------------------------------------------------------------------------------------------


def test_hung_sync_worker_is_killed_with_a_stack_dump(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("-k", "sync", "--timeout", "1", f"{HANDLERS}:SleepHandler", workers=1)
    victim = d.status()["workers"][0]["pid"]
    with d.connect(timeout=15) as conn:
        conn.sendall(b"hang")
        started = time.monotonic()
        new = wait_for(lambda: replacement(d, 0, victim), 10, "a replacement for the hung worker")
        assert time.monotonic() - started < 6
        assert closed_by_server(conn)
    assert gone(victim)
    assert new["pid"] != victim
    log = d.log()
    assert f"worker 0 (pid {victim}) timed out" in log
    assert any("File" in line and "lifecycle_handlers.py" in line for line in log.splitlines()), log
    assert d.call("stats")["worker_timeouts"] >= 1


def test_thread_worker_holding_the_gil_is_replaced(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--timeout", "1", f"{HANDLERS}:GilHoldHandler", workers=1)
    victim = d.status()["workers"][0]["pid"]
    with d.connect(timeout=15) as conn:
        conn.sendall(b"stick")
        new = wait_for(lambda: replacement(d, 0, victim), 10, "a replacement for the stuck worker")
    assert new["pid"] != victim and gone(victim)
    assert f"worker 0 (pid {victim}) timed out" in d.log()


def test_thread_worker_with_a_long_idle_connection_is_not_killed(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--timeout", "1", workers=1)
    pid = d.status()["workers"][0]["pid"]
    with d.connect(timeout=10) as conn:
        conn.sendall(b"hello\n")
        assert recv_exact(conn, 6) == b"hello\n"

        def aged() -> bool:  # the connection stays idle three times the timeout
            w = d.status()["workers"]
            assert [x["pid"] for x in w] == [pid], f"the worker was replaced: {w}"
            return bool(w[0]["age_s"] >= 3.5 and w[0]["active"] == 1)

        wait_for(aged, 10, "the worker to reach 3.5 s with the connection open", interval=0.2)
        conn.sendall(b"still here\n")
        assert recv_exact(conn, 11) == b"still here\n"
    assert d.call("stats")["worker_timeouts"] == 0
    assert "timed out" not in d.log()


# -- 12. max-requests ----------------------------------------------------------------------------------------


def served_by(d: Daemon, count: int) -> list[int]:
    """``count`` sequential connections to the PidHandler; the pid that served each."""
    pids = []
    for _ in range(count):
        reply = read_to_eof(d.address())
        assert reply.isdigit(), reply
        pids.append(int(reply))
    return pids


def runs(pids: list[int]) -> list[tuple[int, int]]:
    """[(pid, how many in a row)] in order."""
    out: list[tuple[int, int]] = []
    for pid in pids:
        if out and out[-1][0] == pid:
            out[-1] = (pid, out[-1][1] + 1)
        else:
            out.append((pid, 1))
    return out


@pytest.mark.parametrize("worker_class", ["thread", "sync"])
def test_max_requests_recycles_the_worker(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--max-requests", "5", f"{HANDLERS}:PidHandler", workers=1)
    first = d.status()["workers"][0]["pid"]
    seq = runs(served_by(d, 12))
    assert seq[0][0] == first
    assert len({pid for pid, _ in seq}) == len(seq) >= 2, seq  # each run is a new worker
    # both classes count a connection before closing it, so the worker retires before the next client
    assert [n for _, n in seq] == [5, 5, 2], seq
    recycled = [pid for pid, _ in seq[:-1]]
    wait_for(lambda: all_gone(recycled), 10, "the recycled workers gone")
    assert "max-requests (5) reached" in d.log()


def test_max_requests_jitter_still_recycles(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("-k", "sync", "--max-requests", "3", "--max-requests-jitter", "2",
                       f"{HANDLERS}:PidHandler", workers=1)
    seq = runs(served_by(d, 16))
    assert len(seq) >= 4, seq  # at most 5 per worker
    assert all(3 <= n <= 5 for _, n in seq[:-1]), seq
    st = d.wait_serving(1, timeout=10)
    assert st["state"] == "serving" and st["target_workers"] == 1
    # every connection counted, across the recycled workers and the live one
    wait_for(lambda: d.call("stats")["requests"] == 16, 5, "16 connections counted")


# -- 13. USR1 reopens log files ------------------------------------------------------------------------------


def test_usr1_reopens_the_log_file(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    d = daemon_factory("--log-file", "x.log", f"{HANDLERS}:LoggingEchoHandler", workers=1)
    current, rotated = tmp_path / "x.log", tmp_path / "x.log.1"
    assert "serving: 1 worker(s) ready" in current.read_text()
    current.rename(rotated)
    d.signal(signal.SIGUSR1)
    wait_for(current.exists, 5, "a new x.log after USR1")
    d.signal(signal.SIGTTIN)  # the master writes a line about it...
    d.wait_serving(2, timeout=10)
    wait_for(lambda: "scaling from 1 to 2" in current.read_text(), 5, "the master's line in the new file")

    def worker_line_in_new_file() -> bool:  # ...and so does a worker, once it reopened too
        assert exchange(d.address(), b"ping") == b"ping"
        return "lifecycle connection served by pid" in current.read_text()

    wait_for(worker_line_in_new_file, 5, "a worker's line in the new file", interval=0.1)
    old = rotated.read_text()
    assert "scaling from 1 to 2" not in old
    assert "got SIGUSR1" in old or "got SIGUSR1" in current.read_text()


# -- 14. process titles --------------------------------------------------------------------------------------


def title(pid: int) -> str:
    return " ".join(psutil.Process(pid).cmdline()).strip()


def test_process_titles(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("--name", "lifecyc")
    assert title(d.pid) == "prefork: master [lifecyc]"
    workers = d.status()["workers"]
    assert sorted(title(w["pid"]) for w in workers) == ["prefork: worker 0 [lifecyc]", "prefork: worker 1 [lifecyc]"]
    for w in workers:
        assert title(w["pid"]) == f"prefork: worker {w['slot']} [lifecyc]"


# -- 15. a handler that cannot load ----------------------------------------------------------------------------


def test_unloadable_handler_stops_the_master(daemon_factory: DaemonFactory) -> None:
    d = daemon_factory("nosuchmodule:Handler", wait=False)
    started = time.monotonic()
    code = d.wait_exit(10)
    assert code != 0
    assert time.monotonic() - started < 5
    log = d.log()
    assert "nosuchmodule" in log
    assert "Traceback" not in log
    assert any("nosuchmodule" in line and "Handler" in line for line in log.splitlines())
