"""The process model seen from outside: the process started is the master for life, molds and workers are its
children, and nothing of the daemon outlives it or is left to another parent."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import ROOT, Daemon, Load, child_env, exchange, refused, wait_for


def family(st: dict[str, Any]) -> list[int]:
    """The molds' and workers' pids in a status reply."""
    return [*(m["pid"] for m in st["molds"]), *(w["pid"] for w in st["workers"])]


def test_the_started_process_stays_the_master_across_reloads_and_upgrades_and_sigint_ends_everything(
        daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(workers=2)
    seen: set[int] = set()
    with Load(d.address(), clients=4) as load:
        load.wait_ok(50)
        for generation in range(2, 12):  # 5 reloads and 5 upgrades, in turn
            r = d.ctl("reload" if generation % 2 else "upgrade", "--json", timeout=60)
            assert r.returncode == 0, r.stderr
            st = d.status()
            assert st["pid"] == d.pid and st["generation"] == generation
            for pid in family(st):  # every mold and worker is the started process's child
                seen.add(pid)
                with contextlib.suppress(psutil.NoSuchProcess):  # an old worker that finished draining since
                    assert psutil.Process(pid).ppid() == d.pid
            load.wait_ok(50)
    assert load.failures == []
    processes = [psutil.Process(pid) for pid in seen if psutil.pid_exists(pid)]
    d.signal(signal.SIGINT)
    assert d.wait_exit(10) == 0
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == []


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) from util-linux")
def test_as_pid_1_of_a_new_pid_namespace_reloads_and_upgrades_keep_serving(tmp_path: Path) -> None:
    control = tmp_path / "ns.sock"
    log = tmp_path / "ns.log"
    argv = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "prefork", "--control", str(control),
            "--bind", "127.0.0.1:0", "--workers", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=child_env())
    d = Daemon(proc=proc, control=str(control), log_path=log, args=argv)
    try:
        st = d.wait_serving()
        assert st["pid"] == 1  # the master is the namespace's init: it reaps whatever is orphaned in it
        d.port = int(st["listeners"][0].rsplit(":", 1)[1])
        with Load(d.address(), clients=2) as load:
            load.wait_ok(30)
            for generation, command in ((2, "reload"), (3, "upgrade"), (4, "reload")):
                r = d.ctl(command, timeout=60)
                assert r.returncode == 0, r.stderr
                assert d.status()["generation"] == generation
                load.wait_ok(30)
        assert load.failures == []
        assert exchange(d.address(), b"still here\n") == b"still here\n"
        assert d.status()["pid"] == 1
    finally:
        d.stop()


GIL_WEDGE = '''\
import ctypes
import socketserver


class HoldsTheInterpreter(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        ctypes.PyDLL(None).sleep(3600)  # C code that keeps the GIL: no Python code of this process runs again
'''


def test_a_worker_whose_python_cannot_run_dies_after_its_master_anyway(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    (tmp_path / "gil_wedge.py").write_text(GIL_WEDGE)
    d = daemon_factory("-k", "thread", "--timeout", "3", "--graceful-timeout", "1", "gil_wedge:HoldsTheInterpreter",
                       workers=1)
    worker = psutil.Process(d.status()["workers"][0]["pid"])
    with d.connect() as conn:
        conn.sendall(b"wedge\n")
        wait_for(lambda: d.status()["workers"][0]["active"] == 1, 5, "the connection taken")
        d.signal(signal.SIGKILL)  # before the master could see the heartbeat stop
        assert d.wait_exit(5) == -signal.SIGKILL
        # its SIGTERM (PR_SET_PDEATHSIG) is never handled: the kernel's dead-man timer ends it instead,
        # --timeout (the longer of it and --graceful-timeout) plus a margin after its last heartbeat
        _, alive = psutil.wait_procs([worker], timeout=20)
        assert alive == []
    wait_for(lambda: refused(d.address()), 5, "the port freed")


def test_each_extra_worker_costs_under_a_tenth_of_the_handler_s_import_across_reloads(tmp_path: Path) -> None:
    """scripts/bench_memory.py's measure, default settings: a 100 MB handler, -w 1 against -w 3, 3 reloads."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_memory
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    tmp_path.chmod(0o700)
    cost = bench_memory.import_cost()
    small = bench_memory.measure(1, True, str(tmp_path), reloads=3)
    large = bench_memory.measure(3, True, str(tmp_path), reloads=3)
    for (m1, o1, w1), (mn, on, wn) in zip(small, large, strict=True):  # after the start, then each reload
        per_extra = (mn + on + sum(wn) - m1 - o1 - sum(w1)) / 2
        assert per_extra < 0.10 * cost, (per_extra / cost, small, large)
