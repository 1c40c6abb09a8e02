"""The mold per generation (``--preload``, on by default): it imports the handler once, its workers share it,
every worker of a generation (respawns too) runs that generation's code, and the master imports none of it."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from conftest import Daemon, Load, child_env, exchange, gone, read_line, wait_for

MODULE = '''\
import os
import socketserver
import time

with open(os.environ["PRELOAD_IMPORTS"], "a") as f:  # who imported this module
    f.write(f"{{os.getpid()}}\\n")
time.sleep(float(os.environ.get("PRELOAD_IMPORT_SECONDS", "0")))  # a handler whose import takes a while
VERSION = b"{version}"
{extra}

class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(VERSION + b"\\n" if line == b"version\\n" else line)
'''

# in the mold of the generation that imported it: each worker it forks takes a second to start (a connection
# pool warming up, say), and dies at start once a file exists
SLOW_THEN_FAILING_WORKERS = '''
_MOLD = os.getpid()
def _in_a_worker() -> None:
    if os.getppid() == _MOLD:
        return  # the mold's middle process, not a worker
    time.sleep(1)
    if os.path.exists(os.environ["PRELOAD_IMPORTS"] + ".fail"):
        os._exit(1)
os.register_at_fork(after_in_child=_in_a_worker)
'''

START_THREAD = '''
import threading
threading.Thread(target=time.sleep, args=(3600,), name="poller", daemon=True).start()
import socket as _socket
_CONNECTION = _socket.socketpair()  # a connection opened at import, say to a database
'''


def write_module(tmp_path: Path, version: str, broken: bool = False, extra: str = "") -> None:
    # each version has a different length, so Python never takes a stale .pyc for the edited source
    text = MODULE.format(version=version, extra=extra) + ('raise RuntimeError("broken on purpose")\n' if broken else "")
    (tmp_path / "preloaded.py").write_text(text)


def every_importer(tmp_path: Path) -> list[int]:
    path = tmp_path / "imports"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def importers(tmp_path: Path) -> list[int]:
    """Who imported the handler since the start's check (a child of the master, gone before it binds)."""
    check, *after = every_importer(tmp_path)
    assert gone(check)
    return after


def version(d: Daemon) -> bytes:
    with socket.create_connection(d.address(), timeout=5) as s:
        s.sendall(b"version\n")
        return read_line(s).strip()


def start(daemon_factory: Callable[..., Daemon], tmp_path: Path, *args: str, import_seconds: float = 0,
          **kwargs: object) -> Daemon:
    env = child_env(PRELOAD_IMPORTS=str(tmp_path / "imports"), PRELOAD_IMPORT_SECONDS=str(import_seconds))
    return daemon_factory(*args, "preloaded:Handler", env=env, **kwargs)


def molds(st: dict[str, Any]) -> dict[int, int]:
    """generation -> pid of its mold."""
    return {m["generation"]: m["pid"] for m in st["molds"]}


def test_the_mold_imports_the_handler_once_and_its_workers_serve_it(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path, workers=3)
    st = d.status()
    mold = molds(st)[1]
    assert mold != st["pid"] and psutil.Process(mold).ppid() == st["pid"]
    assert importers(tmp_path) == [mold]  # not the master, not the workers
    # the workers are the master's children (re-parented from the mold's double fork)
    assert {psutil.Process(w["pid"]).ppid() for w in st["workers"]} == {st["pid"]}
    assert version(d) == b"v1"
    assert exchange(d.address(), b"hello\n") == b"hello\n"
    victim = st["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (s := d.try_status()) is not None and victim not in {w["pid"] for w in s["workers"]}
             and len(d.ready_workers(s)) == 3, 20, "the killed worker replaced")
    assert version(d) == b"v1"
    assert importers(tmp_path) == [mold]


def test_an_old_generation_worker_respawns_with_its_generation_s_code_whatever_the_disk_says(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path, workers=2)
    st = d.status()
    write_module(tmp_path, "v2-on-disk", broken=True)  # a deploy under way: the file changed, no reload asked
    victim = st["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    st = wait_for(lambda: (s := d.try_status()) is not None and victim not in {w["pid"] for w in s["workers"]}
                  and len(d.ready_workers(s)) == 2 and s, 20, "the killed worker replaced")
    assert st["generation"] == 1
    assert {version(d) for _ in range(20)} == {b"v1"}
    assert importers(tmp_path) == [molds(st)[1]]


def test_reload_keeps_the_master_and_runs_the_edited_code_with_no_failed_exchange(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path)
    before = d.status()
    with Load(d.address(), clients=4) as load:
        load.wait_ok(100)
        write_module(tmp_path, "v2-edited")
        r = d.ctl("reload", timeout=60)
        assert r.returncode == 0, r.stderr
        assert "generation 2" in r.stdout
        assert version(d) == b"v2-edited"  # every connection made after the reply meets the new code
        load.wait_ok(100)
    assert load.failures == []
    after = d.status()
    assert after["pid"] == before["pid"] == d.pid and after["generation"] == 2
    old_mold, new_mold = molds(before)[1], molds(after)[2]
    assert importers(tmp_path) == [old_mold, new_mold]  # one import per generation, none in the master
    # the old generation's mold ends with its generation
    wait_for(lambda: gone(old_mold),
             10, "the old mold gone")
    wait_for(lambda: list(molds(d.status())) == [2], 10, "only generation 2's mold in status")


def test_a_handler_that_fails_to_import_at_start_is_one_line_and_exit_2(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1", broken=True)
    d = start(daemon_factory, tmp_path, wait=False)
    assert d.wait_exit() == 2
    lines = d.log().splitlines()
    errors = [line for line in lines if "broken on purpose" in line]
    assert errors == [f"prefork: error: cannot load handler 'preloaded:Handler': preloaded.py:"
                      f"{len(MODULE.splitlines()) + 1}: RuntimeError: broken on purpose"], lines
    assert lines == errors  # nothing else: the check failed before anything was bound or forked
    assert not Path(d.control).exists()
    tried = every_importer(tmp_path)
    assert len(tried) == 1 and tried != [d.pid]  # the start's check tried, the master did not


def test_reload_onto_broken_code_fails_and_the_old_code_keeps_serving(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path)
    before = d.status()
    with Load(d.address(), clients=2) as load:
        load.wait_ok(50)
        write_module(tmp_path, "v2", broken=True)
        r = d.ctl("reload", timeout=60)
        assert r.returncode == 1
        assert "reload failed" in r.stderr and "RuntimeError: broken on purpose" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        load.wait_ok(50)
    assert load.failures == []
    after = d.status()
    assert (after["pid"], after["generation"], after["state"]) == (before["pid"], 1, "serving")
    assert version(d) == b"v1"
    # once the code is fixed, a reload takes it
    write_module(tmp_path, "v3-fixed")
    r = d.ctl("reload", timeout=60)
    assert r.returncode == 0, r.stderr
    assert version(d) == b"v3-fixed"


def test_a_rolling_reload_that_fails_midway_leaves_the_old_generation_whole(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path, "--reload-batch", "1", workers=4, import_seconds=1)
    with Load(d.address(), clients=4) as load:
        load.wait_ok(100)
        write_module(tmp_path, "v2", extra=SLOW_THEN_FAILING_WORKERS)
        replies: list[Any] = []
        asker = threading.Thread(target=lambda: replies.append(d.ctl("reload", timeout=90)))
        asker.start()
        # the first new worker serves and the old one of its slot is gone: the roll is under way...
        wait_for(lambda: (s := d.try_status()) is not None
                 and any(w["generation"] == 2 and w["state"] == "ready" for w in s["workers"])
                 and sum(w["generation"] == 1 and w["state"] == "ready" for w in s["workers"]) == 3,
                 30, "the first batch of generation 2 serving")
        # ...when the new generation breaks, and the file on disk too
        (tmp_path / "imports.fail").touch()
        write_module(tmp_path, "v3-broken", broken=True)
        asker.join(90)
        assert replies and replies[0].returncode == 1, replies
        assert len(replies[0].stderr.strip().splitlines()) == 1 and "reload failed" in replies[0].stderr
        st = wait_for(lambda: (s := d.try_status()) is not None and s["state"] == "serving"
                      and len(s["workers"]) == 4 and all(w["generation"] == 1 and w["state"] == "ready"
                                                         for w in s["workers"]) and s,
                      20, "the pool back to 4 workers of generation 1")
        load.wait_ok(100)
    assert load.failures == []
    assert st["generation"] == 1 and sorted(w["slot"] for w in st["workers"]) == [0, 1, 2, 3]
    assert {version(d) for _ in range(20)} == {b"v1"}


def test_a_thread_left_by_the_import_is_warned_about_and_no_preload_imports_in_each_worker(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1", extra=START_THREAD)
    d = start(daemon_factory, tmp_path, workers=2)
    assert "left 1 thread(s) running (poller) and 2 socket(s) open" in d.log() and "--no-preload" in d.log()
    assert [m["threads"] for m in d.status()["molds"]] == [1]
    e = start(daemon_factory, tmp_path, "--no-preload", workers=2, name="e")
    st = e.status()
    assert st["molds"] == []
    workers = {w["pid"] for w in st["workers"]}
    assert workers <= set(importers(tmp_path))  # each worker imported the handler itself
    assert st["pid"] not in importers(tmp_path)


WEDGE = '''\
import socketserver
import threading

LOCK = threading.Lock()


class Wedged(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        LOCK.acquire()
        LOCK.acquire()  # every handler thread deadlocks here, for ever
'''


def test_master_sigkill_takes_the_molds_and_workers_with_it_a_wedged_thread_worker_included(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    (tmp_path / "wedge.py").write_text(WEDGE)
    d = start(daemon_factory, tmp_path, workers=2)
    write_module(tmp_path, "v2")
    assert d.ctl("reload", timeout=60).returncode == 0
    wedged = daemon_factory("-k", "thread", "--threads", "2", "--graceful-timeout", "2", "wedge:Wedged",
                            workers=1, name="wedged")
    clients = [wedged.connect() for _ in range(2)]
    for c in clients:
        c.sendall(b"x\n")
    wait_for(lambda: sum(w["active"] for w in wedged.status()["workers"]) == 2, 10, "both threads wedged")
    processes = []
    for daemon in (d, wedged):
        st = daemon.status()
        processes += [psutil.Process(pid) for pid in [*molds(st).values(), *(w["pid"] for w in st["workers"])]]
    assert len(processes) == 5  # generation 2's mold and workers (1's are gone), the wedged daemon's two
    for daemon in (d, wedged):
        daemon.signal(signal.SIGKILL)
        assert daemon.wait_exit(5) == -signal.SIGKILL
    # nothing holds the ports: refused at once, not queued for a worker that will never accept
    for daemon in (d, wedged):
        wait_for(lambda daemon=daemon: _refused(daemon.address()), 2, "the port refused")
    _, alive = psutil.wait_procs(processes, timeout=10)  # the wedged one within its graceful timeout
    assert alive == []
    for c in clients:
        c.close()


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_killed_mold_is_replaced_when_its_generation_next_needs_a_worker(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path, workers=2)
    st = d.status()
    old_mold = molds(st)[1]
    os.kill(old_mold, signal.SIGKILL)
    wait_for(lambda: molds(d.status()) == {}, 10, "the killed mold gone from status")
    assert "mold of generation 1 (pid" in d.log() and "imports the code on disk" in d.log()
    assert {version(d) for _ in range(10)} == {b"v1"}  # its workers serve on
    write_module(tmp_path, "v2-on-disk")
    victim = st["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    st = wait_for(lambda: (s := d.try_status()) is not None and victim not in {w["pid"] for w in s["workers"]}
                  and len(d.ready_workers(s)) == 2 and s, 20, "the killed worker replaced through a new mold")
    new_mold = molds(st)[1]
    assert new_mold != old_mold and importers(tmp_path) == [old_mold, new_mold]
    assert st["generation"] == 1
