"""``reload --canary SECS`` / ``--reload-canary``: one new worker serves beside the old generation first, and
the reload goes on only if it did no worse; otherwise it is rolled back and the old generation serves on."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, Load, child_env, read_line, wait_for
from prefork.master.verdicts import CanaryFigures, judge_canary

MODULE = '''
import asyncio
import os
import socketserver
import time

VERSION = b"{version}"
MODE = "{mode}"
SERVED = [0]
LOADED = time.monotonic()  # in the mold: "late" code starts failing a second after its generation serves


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        SERVED[0] += 1
        if MODE == "raise" or (MODE == "late" and time.monotonic() - LOADED > 1.0):
            raise KeyError("missing")
        if MODE == "die":
            os._exit(1)
        if MODE == "hang":
            time.sleep(3600)  # a sync worker's loop stalls: its heartbeat goes stale
        if MODE == "one_in_50" and SERVED[0] % 50 == 0:
            raise ValueError("one in fifty")
        for line in self.rfile:
            self.wfile.write(VERSION + b"\\n" if line == b"version\\n" else line)


class Proto(asyncio.Protocol):  # the same as an asyncio.Protocol, for --worker-class async
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if MODE == "raise":
            raise KeyError("missing")
        self.transport.write(data)


async def handle(reader, writer) -> None:  # the same, for --worker-class async
    SERVED[0] += 1
    if MODE == "raise" or (MODE == "late" and time.monotonic() - LOADED > 1.0):
        raise KeyError("missing")
    if MODE == "die":
        os._exit(1)
    if MODE == "one_in_50" and SERVED[0] % 50 == 0:
        raise ValueError("one in fifty")
    while line := await reader.readline():
        writer.write(VERSION + b"\\n" if line == b"version\\n" else line)
        await writer.drain()
'''


def write_handler(tmp_path: Path, version: str, mode: str = "good") -> None:
    # each version has a different length, so Python never takes a stale .pyc for the edited source
    (tmp_path / "canaried.py").write_text(MODULE.format(version=version, mode=mode) + "#" * len(version + mode))


def version(d: Daemon) -> bytes:
    with socket.create_connection(d.address(), timeout=5) as s:
        s.sendall(b"version\n")
        return read_line(s).strip()


def start(daemon_factory: Callable[..., Daemon], tmp_path: Path, *args: str, **kwargs: Any) -> Daemon:
    write_handler(tmp_path, "v1", kwargs.pop("mode", "good"))
    handler = "canaried:handle" if "async" in args else "canaried:Handler"
    return daemon_factory(*args, handler, env=child_env(), **kwargs)


def reload(d: Daemon, *args: str) -> tuple[int, dict[str, Any], str]:
    done = d.ctl("reload", "--json", *args, timeout=90)
    return done.returncode, json.loads(done.stdout), done.stderr


def rolled_back_under_load(d: Daemon, tmp_path: Path, new_version: str, mode: str,
                           *reload_args: str) -> tuple[dict[str, Any], str, list[str], int]:
    """Reload ``d`` to failing code under a connect load and wait until generation 1 serves alone again.

    Returns the reload's reply and stderr, the load's failures, and how many there were once the new
    generation was gone (every later one is the old code's)."""
    with Load(d.address(), clients=4, mode="connect") as load:
        load.wait_ok(50)
        write_handler(tmp_path, new_version, mode)
        status, reply, stderr = reload(d, *reload_args)
        assert status == 1, stderr
        assert reply["verdict"] == "rolled_back", reply
        assert d.status()["generation"] == 1, reply  # answered once rolled back: the old generation serves again
        wait_for(lambda: all(w["generation"] == 1 for w in d.status()["workers"]), 20, "generation 2 gone")
        failed = len(load.failures)
        load.wait_ok(50)
    return reply, stderr, load.failures, failed


def fig(connections: int, errors: int, old_connections: int, old_errors: int, **more: Any) -> CanaryFigures:
    return CanaryFigures(seconds=2.0, connections=connections, errors=errors, old_connections=old_connections,
                         old_errors=old_errors, error_type="KeyError", **more)


@pytest.mark.parametrize(("figures", "fails_with"), [
    (fig(41, 0, 212, 0), None),  # good code
    (fig(41, 37, 212, 0), "canary: 37 of 41 connections raised KeyError (old generation: 0 of 212)"),
    (fig(9, 9, 212, 0), None),  # too few connections to judge errors (CANARY_MIN_CONNECTIONS)
    (fig(10, 3, 212, 0), "canary: 3 of 10 connections raised KeyError"),  # 3 > 10 * 0.05 + 2
    (fig(10, 2, 212, 0), None),  # within the slack: one unlucky error in a small sample is no verdict
    (fig(50, 1, 200, 4), None),  # 1 in 50, as the old generation
    (fig(40, 3, 200, 4), None),  # 1 in 50 by chance a little worse: 3 <= 40 * (0.02 + 0.05) + 2
    (fig(100, 26, 400, 80), None),  # as bad as the old generation (20%), within the margin: no worse
    (fig(100, 40, 400, 80), "canary: 40 of 100 connections raised KeyError (old generation: 80 of 400)"),
    (fig(100, 10, 0, 0), "canary: 10 of 100"),  # the old generation idle: its rate is taken as 0
    (fig(0, 0, 0, 0), None),  # no traffic at all: nothing against it
    (fig(1, 0, 50, 0, exits=1, exit_how="exited with status 1"),
     "canary: its worker exited with status 1 after 1 connection(s)"),
    (fig(0, 0, 50, 0, exits=1, old_exits=3), "canary: its worker exited after 0 connection(s)"),  # old's no excuse
    (fig(5, 0, 50, 0, hung=1, exits=1), "canary: its worker hung (no heartbeat within --timeout)"),
])
def test_the_canary_rule(figures: CanaryFigures, fails_with: str | None) -> None:
    why = judge_canary(figures)
    if fails_with is None:
        assert why is None
    else:
        assert why is not None and why.startswith(fails_with), why


@pytest.mark.parametrize("worker_class", ["sync", "thread", "async"])
def test_good_code_commits_under_load_and_serves(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                                 worker_class: str) -> None:
    d = start(daemon_factory, tmp_path, "-k", worker_class, workers=2)
    # a sync worker serves one connection at a time: a client that keeps its connection would hold one
    pinging = 0 if worker_class == "sync" else 2
    with Load(d.address(), clients=3, mode="connect") as connects, \
            Load(d.address(), clients=pinging, mode="persistent") as pings:
        connects.wait_ok(50)
        write_handler(tmp_path, "v2")
        status, reply, stderr = reload(d, "--canary", "1.5")
        connects.wait_ok(50)
        if pinging:
            pings.wait_ok(50)
    assert status == 0, stderr
    assert reply["verdict"] == "committed" and reply["generation"] == 2, reply
    assert reply["canary"]["connections"] > 0 and reply["canary"]["errors"] == 0, reply
    assert connects.failures == [] and pings.failures == [], (connects.failures[:3], pings.failures[:3])
    d.wait_serving(2)
    assert version(d) == b"v2"


@pytest.mark.parametrize("worker_class", ["sync", "thread", "async"])
def test_a_raising_handler_is_rolled_back_with_the_reason(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                                          worker_class: str) -> None:
    d = start(daemon_factory, tmp_path, "-k", worker_class, workers=2)
    # the canary drains: what it accepted before the verdict still meets its code
    reply, stderr, failures, failed = rolled_back_under_load(d, tmp_path, "v2-broken", "raise", "--canary", "1.5")
    canary = reply["canary"]
    assert "canary: " in stderr and "connections raised KeyError (old generation: 0 of " in stderr, stderr
    assert "still serving generation 1" in stderr
    # every connection the canary took raised, but the figures are read at one instant: a connection
    # accepted and not yet failed is counted in one and not the other, at most one per load client (4)
    assert canary["connections"] - 4 <= canary["errors"] <= canary["connections"], canary
    assert canary["connections"] >= 10 and canary["old_errors"] == 0, canary
    # what failed is what the canary took: its share of the window, and what it held open at the verdict
    assert 0 < failed <= canary["connections"] * 1.05 + 10, (failed, canary)
    assert failed < (canary["connections"] + canary["old_connections"]) / 2, (failed, canary)
    assert len(failures) == failed, failures[failed:failed + 3]  # none after
    st = d.wait_serving(2)
    assert st["generation"] == 1 and version(d) == b"v1"
    assert d.call("stats")["rolled_back_reloads"] == 1
    assert "rolled back reloads: 1" in d.ctl("stats").stdout


def test_an_asyncio_protocol_that_raises_is_named(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_handler(tmp_path, "v1")
    d = daemon_factory("-k", "async", "canaried:Proto", env=child_env(), workers=2)
    with Load(d.address(), clients=3, mode="connect") as load:
        load.wait_ok(50)
        write_handler(tmp_path, "v2-broken", "raise")
        status, reply, stderr = reload(d, "--canary", "1")
    assert status == 1 and reply["verdict"] == "rolled_back", (reply, stderr)
    assert "connections raised KeyError (old generation: 0 of " in stderr, stderr


def test_a_handler_that_kills_its_worker_is_rolled_back_and_no_slot_stays_empty(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, workers=2)
    with Load(d.address(), clients=3, mode="connect") as load:
        load.wait_ok(50)
        write_handler(tmp_path, "v2-dies", "die")
        status, reply, stderr = reload(d, "--canary", "2")
        failed = len(load.failures)
        load.wait_ok(50)
    assert status == 1, stderr
    assert reply["verdict"] == "rolled_back" and reply["canary"]["exits"] == 1, reply
    assert "canary: its worker exited with status 1 after 0 connection(s)" in stderr, stderr
    assert failed <= 3, load.failures  # the connections the dying canary held
    st = d.wait_serving(2)
    assert st["generation"] == 1 and st["backoff"] == [] and version(d) == b"v1"
    assert sorted(w["slot"] for w in d.ready_workers(st)) == [0, 1]


def test_a_canary_that_hangs_is_rolled_back(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, "-k", "sync", "--timeout", "2", workers=2)
    with Load(d.address(), clients=3, mode="connect") as load:
        load.wait_ok(50)
        write_handler(tmp_path, "v2-hangs", "hang")
        status, reply, stderr = reload(d, "--canary", "3")
        wait_for(lambda: all(w["generation"] == 1 for w in d.status()["workers"]), 20, "the canary gone")
        load.wait_ok(50)
    assert status == 1 and reply["verdict"] == "rolled_back", (reply, stderr)
    assert reply["canary"]["hung"] == 1, reply
    assert "canary: its worker hung (no heartbeat within --timeout)" in stderr, stderr
    assert version(d) == b"v1"


def test_one_error_in_fifty_like_the_old_code_commits(daemon_factory: Callable[..., Daemon],
                                                      tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, workers=2, mode="one_in_50")
    with Load(d.address(), clients=4, mode="connect") as load:
        wait_for(lambda: load.ok >= 200, 30, "200 exchanges")
        write_handler(tmp_path, "v2-same", "one_in_50")
        status, reply, stderr = reload(d, "--canary", "2")
    assert status == 0, stderr
    assert reply["verdict"] == "committed", reply


def test_a_canary_with_a_rolling_reload(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, "--reload-batch", "2", "--reload-canary", "1", workers=4)
    with Load(d.address(), clients=4, mode="connect") as load:
        load.wait_ok(50)
        write_handler(tmp_path, "v2")
        status, reply, stderr = reload(d)  # the daemon's --reload-canary applies
        load.wait_ok(50)
    assert status == 0, stderr
    assert reply["verdict"] == "committed" and "canary" in reply, reply
    assert reply["peak_workers"] <= 4 + 2, reply  # the canary counts towards the batch's bound
    assert load.failures == [], load.failures[:3]
    d.wait_serving(4)
    assert version(d) == b"v2"
    assert "reloading: 1 of 4 new worker(s) serving; 1 old one(s) draining" in d.log()


@pytest.mark.parametrize("worker_class", ["sync", "thread", "async"])
def test_probation_rolls_back_code_that_starts_failing_after_it_serves(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, worker_class: str) -> None:
    d = start(daemon_factory, tmp_path, "-k", worker_class, "--reload-probation", "5", workers=2)
    reply, stderr, failures, failed = rolled_back_under_load(d, tmp_path, "v2-late", "late")
    figures = reply["probation"]
    assert "probation: " in stderr and "connections raised KeyError" in stderr, stderr
    assert "rolled back to generation 1" in stderr
    assert 0 < figures["seconds"] < 5.0, figures  # within the window, once the code failed
    assert not [f for f in failures if "Refused" in f], failures[:3]  # no refused connection
    assert len(failures) == failed, failures[failed:failed + 3]  # the old code serves cleanly
    d.wait_serving(2)
    assert version(d) == b"v1"  # the old generation's code, from its mold: the file on disk is v2-late
    stats = d.call("stats")
    assert stats["rolled_back_reloads"] == 1 and stats["reloads"] == 0, stats
    metrics = d.ctl("stats", "--format", "prometheus").stdout
    assert 'prefork_reload_outcomes_total{outcome="rolled_back"} 1' in metrics, metrics


def test_probation_passes_and_the_old_mold_ends(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, "--reload-probation", "1.5", workers=2)
    with Load(d.address(), clients=2, mode="connect") as load:
        load.wait_ok(20)
        write_handler(tmp_path, "v2")
        status, reply, stderr = reload(d)
        load.wait_ok(20)
    assert status == 0, stderr
    assert reply["verdict"] == "committed" and reply["probation"]["seconds"] >= 1.5, reply
    assert load.failures == [], load.failures[:3]
    st = wait_for(lambda: (s := d.status())["molds"] and [m["generation"] for m in s["molds"]] == [2] and s,
                  20, "generation 1's mold to end")
    assert st["reload"] is None and version(d) == b"v2"


def test_probation_keeps_the_old_mold_while_it_lasts(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, "--reload-probation", "30", workers=2)
    write_handler(tmp_path, "v2")
    d.signal(signal.SIGHUP)
    st = wait_for(lambda: (s := d.status())["reload"] is not None and s["reload"]["phase"] == "probation"
                  and all(w["generation"] == 2 for w in s["workers"]) and s, 30, "generation 2 on probation")
    assert [m["generation"] for m in st["molds"]] == [1, 2], st["molds"]  # the cost: one process, the old mold
    assert st["reload"]["old_generation"] == 1 and st["reload"]["probation"]["window_s"] == 30.0
    assert "on probation" in d.ctl("status").stdout
    # the reload is not settled: the state says so, and what a rollback would undo waits
    assert st["state"] == "reloading"
    upgrade = d.call("upgrade", timeout=30)
    assert not upgrade["ok"] and "a reload is in progress" in upgrade["error"], upgrade


def test_a_canary_recycled_by_max_requests_is_judged_and_succeeded(daemon_factory: Callable[..., Daemon],
                                                                   tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, "-k", "sync", "--max-requests", "200", workers=2)
    with Load(d.address(), clients=3, mode="connect") as load:
        load.wait_ok(50)
        write_handler(tmp_path, "v2")
        status, reply, stderr = reload(d, "--canary", "2")
        load.wait_ok(50)
    assert status == 0, stderr
    assert reply["verdict"] == "committed", reply
    assert load.failures == [], load.failures[:3]
    d.wait_serving(2)
    assert version(d) == b"v2"


def test_a_stop_during_probation_answers_the_reload_and_exits(daemon_factory: Callable[..., Daemon],
                                                              tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, "--reload-probation", "60", workers=2)
    write_handler(tmp_path, "v2")
    replies: list[tuple[int, dict[str, Any], str]] = []
    asker = threading.Thread(target=lambda: replies.append(reload(d)))
    asker.start()
    wait_for(lambda: (s := d.status())["reload"] is not None and s["reload"]["phase"] == "probation", 30,
             "generation 2 on probation")
    d.signal(signal.SIGTERM)
    assert d.wait_exit(30) == 0, d.log()
    asker.join(30)
    assert replies, "the reload was never answered"
    status, reply, stderr = replies[0]
    assert status == 1 and "during the probation of generation 2" in stderr, (reply, stderr)


def test_status_shows_the_canary_in_progress(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, workers=2)
    write_handler(tmp_path, "v2")
    d.signal(signal.SIGHUP)  # no canary by default: check the control request's own
    d.wait_serving(2)
    wait_for(lambda: d.status()["generation"] == 2, 30, "generation 2")
    # a canary asked through the control socket
    conn_reply: list[Any] = []
    asker = threading.Thread(target=lambda: conn_reply.append(d.call("reload", timeout=60, canary=3.0)))
    asker.start()
    st = wait_for(lambda: (s := d.status())["reload"] is not None and s["reload"]["phase"] == "canary"
                  and "canary" in s["reload"] and s, 30, "the canary serving")
    assert st["state"] == "reloading" and st["reload"]["canary"]["window_s"] == 3.0
    text = d.ctl("status").stdout
    assert "reloading to generation 3: canary (pid" in text, text
    asker.join(60)
    assert conn_reply and conn_reply[0]["ok"] and conn_reply[0]["verdict"] == "committed", conn_reply
    assert d.status()["reload"] is None


def test_probation_needs_a_mold() -> None:
    bad = subprocess.run([sys.executable, "-m", "prefork", "--check-config", "--no-preload", "--reload-probation",
                          "5"], capture_output=True, text=True, env=child_env(), timeout=20)
    assert bad.returncode == 2
    assert bad.stderr.startswith("prefork: error: reload-probation: a rollback runs the old generation's code")


def test_the_canary_is_checked(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start(daemon_factory, tmp_path, workers=1)
    for bad in (-1, "2", True, 1e9):
        reply = d.call("reload", canary=bad)
        assert not reply["ok"] and reply["error"].startswith("reload: canary must be 0 (none) to 3600 seconds")
    bad_ctl = d.ctl("reload", "--canary", "-1")
    assert bad_ctl.returncode == 2 and "--canary must be 0 (none) to 3600 seconds" in bad_ctl.stderr


PROGRAM = '''
import socketserver
import sys

from prefork import PreforkServer


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


if __name__ == "__main__":
    PreforkServer(("127.0.0.1", 0), Handler, workers=2, control=sys.argv[1], reload_canary=1.5).serve_forever()
'''


def test_the_python_api_takes_the_canary_and_rolls_back_its_own_program(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(PROGRAM)
    control, log_path = str(tmp_path / "p.sock"), tmp_path / "p.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, str(script), control], stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=child_env(), cwd=str(tmp_path))
    d = Daemon(proc=proc, control=control, log_path=log_path, args=[str(script)])
    try:
        st = d.wait_serving(2)
        d.port = int(st["listeners"][0].rsplit(":", 1)[1])
        with Load(d.address(), clients=3, mode="connect") as load:
            load.wait_ok(50)
            # the edited program raises in handle(): its canary fails, and the program's first run serves on
            broken = PROGRAM.replace("for line in self.rfile:", "raise KeyError('x')\n        for line in []:")
            script.write_text(broken)
            status, reply, stderr = reload(d)
            wait_for(lambda: all(w["generation"] == 1 for w in d.status()["workers"]), 20, "the canary gone")
            failed = len(load.failures)
            load.wait_ok(50)
        assert status == 1 and reply["verdict"] == "rolled_back", (reply, stderr)
        assert "connections raised KeyError" in stderr
        assert len(load.failures) == failed
    finally:
        d.stop()
