"""--drain-idle and --handler-timeout: a drain that does not wait on silent clients, and a handler stuck for good
noticed (issue 19), under every worker class."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

from conftest import Daemon, process_exists, recv_exact, wait_for

CLASSES = ["sync", "thread", "async"]
IDLE_CLIENTS = 100
PING_CLIENTS = 20


def _worker_pids(d: Daemon) -> set[int]:
    return {w["pid"] for w in d.status()["workers"]}


class Pinger(threading.Thread):
    """A client exchanging a line on one connection, over and over, until told to stop; counts failed exchanges."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(address, timeout=20)
        self.done = threading.Event()
        self.exchanges = 0
        self.failures: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + 60  # bounded whatever happens
        try:
            while not self.done.is_set() and time.monotonic() < deadline:
                self.sock.sendall(b"ping\n")
                got = recv_exact(self.sock, 5)
                if got != b"ping\n":
                    self.failures.append(repr(got))
                    return
                self.exchanges += 1
                time.sleep(0.02)  # a client's pace between two exchanges, far below --drain-idle
        except OSError as exc:
            self.failures.append(repr(exc))
        finally:
            self.sock.close()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_stop_with_idle_clients_and_drain_idle_is_quick_and_loses_no_exchange(
        daemon_factory: Callable[..., Daemon], worker_class: str) -> None:
    # the sync class serves one connection per worker: one worker per ping client, plus two
    workers = PING_CLIENTS + 2 if worker_class == "sync" else 2
    d = daemon_factory("-k", worker_class, "--graceful-timeout", "30", "--drain-idle", "1", workers=workers)
    pingers = [Pinger(d.address()) for _ in range(PING_CLIENTS)]
    for p in pingers:
        p.start()
    wait_for(lambda: all(p.exchanges >= 3 or p.failures for p in pingers), 30, "every ping client served")
    idle = []
    for _ in range(IDLE_CLIENTS):
        s = socket.create_connection(d.address(), timeout=20)
        if worker_class != "sync":  # served once, then silent in its handler (a sync worker would be held)
            s.sendall(b"hi")
            assert recv_exact(s, 2) == b"hi"
        idle.append(s)
    began = time.monotonic()
    d.signal(signal.SIGTERM)
    # the ping clients go on through the stop's first second, then leave as a client ends its session
    time.sleep(1.0)  # not a synchronisation: the length of the clients' session after the stop began
    for p in pingers:
        p.done.set()
    for p in pingers:
        p.join(30)
    assert d.wait_exit(30) == 0
    took = time.monotonic() - began
    failures = [f for p in pingers for f in p.failures]
    assert failures == [], failures
    assert took < 5, f"the stop took {took:.1f}s with {IDLE_CLIENTS} idle clients and --drain-idle 1"
    closed = 0
    for s in idle:
        with contextlib.suppress(OSError):
            closed += s.recv(10) == b""  # closed cleanly (end of file), not reset
        s.close()
    if worker_class != "sync":  # each was in a handler (a sync worker's may still be queued: the stop report's)
        assert closed == IDLE_CLIENTS, closed
    assert "--drain-idle" in d.log()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_reload_with_idle_clients_leaves_no_old_worker_after_drain_idle(daemon_factory: Callable[..., Daemon],
                                                                          worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--graceful-timeout", "30", "--drain-idle", "1", workers=2)
    old = _worker_pids(d)
    held = []
    for _ in range(2 if worker_class == "sync" else 20):
        s = socket.create_connection(d.address(), timeout=20)
        s.sendall(b"hi")
        assert recv_exact(s, 2) == b"hi"
        held.append(s)
    assert d.ctl("reload", timeout=60).returncode == 0
    reloaded = time.monotonic()
    wait_for(lambda: not any(process_exists(p) for p in old), 3.0, "every old worker gone within --drain-idle + 2 s")
    assert time.monotonic() - reloaded < 3.0
    assert not d.status()["draining"]
    assert d.call("stats")["closed"]["drain_idle"] >= len(held)
    for s in held:
        s.close()


def test_busy_connections_keep_the_graceful_timeout(daemon_factory: Callable[..., Daemon]) -> None:
    """A client still exchanging bytes is never taken for an idle one: it is served until it leaves."""
    d = daemon_factory("--graceful-timeout", "30", "--drain-idle", "1", workers=1)
    pinger = Pinger(d.address())
    pinger.start()
    wait_for(lambda: pinger.exchanges >= 3 or pinger.failures, 20, "the ping client served")
    d.signal(signal.SIGTERM)
    wait_for(lambda: "draining: 1 worker(s) with 1 open connection(s)" in d.log(), 20, "a progress line")
    assert "silent" in d.log().split("draining: 1 worker(s)")[-1].splitlines()[0]
    before = pinger.exchanges
    wait_for(lambda: pinger.exchanges > before + 20 or pinger.failures, 20, "more exchanges during the stop")
    pinger.done.set()
    pinger.join(30)
    assert pinger.failures == [] and pinger.exchanges > before
    assert d.wait_exit(30) == 0


@pytest.mark.parametrize("worker_class", ["thread", "async"])
def test_a_handler_asleep_in_handle_is_detected_and_its_connection_closed(daemon_factory: Callable[..., Daemon],
                                                                           worker_class: str) -> None:
    handler = "long_lived_handlers:sleepy_echo" if worker_class == "async" else "long_lived_handlers:SleepyEcho"
    d = daemon_factory("-k", worker_class, "--handler-timeout", "1", "--graceful-timeout", "30", handler, workers=1)
    [pid] = _worker_pids(d)
    other = socket.create_connection(d.address(), timeout=20)  # a sibling connection, served throughout
    other.sendall(b"x")
    assert recv_exact(other, 1) == b"x"
    stuck = socket.create_connection(d.address(), timeout=20)
    stuck.sendall(b"sleep")
    began = time.monotonic()
    assert stuck.recv(10) == b""  # closed cleanly: end of file
    assert time.monotonic() - began < 10
    wait_for(lambda: "--handler-timeout" in d.log(), 10, "the stuck handler's stack in the log")
    log = d.log()
    assert ("time.sleep(3600)" if worker_class == "thread" else "asyncio.sleep(3600)") in log, log
    assert log.count("Its stack:") == 1, log  # once
    wait_for(lambda: d.call("stats")["closed"]["handler_timeout"] == 1, 10, "the close counted")
    if worker_class == "thread":
        # its thread never returns: counted, and the worker recycled gracefully (the master replaces it)
        wait_for(lambda: pid not in _worker_pids(d) and len(_worker_pids(d)) == 1, 20, "the worker replaced")
        wait_for(lambda: not process_exists(pid), 20, "the stuck worker gone without waiting --graceful-timeout")
        assert "still running a full --handler-timeout" in d.log()
    # the sibling connection carries on (a thread worker's old one until it is gone; then a new one)
    fresh = socket.create_connection(d.address(), timeout=20)
    fresh.sendall(b"again")
    assert recv_exact(fresh, 5) == b"again"
    fresh.close()
    other.close()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_handler_that_keeps_exchanging_bytes_is_not_stuck(daemon_factory: Callable[..., Daemon],
                                                           worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--handler-timeout", "1", workers=1)
    pinger = Pinger(d.address())
    pinger.start()
    began = time.monotonic()
    try:
        wait_for(lambda: time.monotonic() - began > 3 or pinger.failures, 10, "three seconds of exchanges")
        [w] = d.status()["workers"]
        assert w["oldest_handler_s"] >= 1.0, w  # held that long: status shows it
    finally:
        pinger.done.set()
        pinger.join(30)
    assert pinger.failures == [] and pinger.exchanges > 10
    assert d.call("stats")["closed"]["handler_timeout"] == 0
    assert "--handler-timeout" not in d.log()


def test_a_sync_handler_asleep_in_handle_is_detected_and_its_worker_replaced(
        daemon_factory: Callable[..., Daemon]) -> None:
    """The sync class's one handler runs in the serving loop itself: the watchdog thread sees it stuck, closes
    its connection, and retires the worker; the master replaces it (the old one is cut at --graceful-timeout)."""
    d = daemon_factory("-k", "sync", "--handler-timeout", "1", "--graceful-timeout", "5", "--timeout", "60",
                       "long_lived_handlers:SleepyEcho", workers=1)
    [pid] = _worker_pids(d)
    stuck = socket.create_connection(d.address(), timeout=20)
    stuck.sendall(b"sleep")
    assert stuck.recv(10) == b""  # closed cleanly: end of file
    wait_for(lambda: "time.sleep(3600)" in d.log(), 10, "the stuck handler's stack in the log")
    wait_for(lambda: pid not in _worker_pids(d) and len(_worker_pids(d)) == 1, 30, "the worker replaced")
    fresh = socket.create_connection(d.address(), timeout=20)
    fresh.sendall(b"again")
    assert recv_exact(fresh, 5) == b"again"
    fresh.close()
    wait_for(lambda: not process_exists(pid), 30, "the stuck worker gone by --graceful-timeout")
    assert "still running a full --handler-timeout" in d.log()


@pytest.mark.parametrize("worker_class", ["sync", "thread"])
def test_an_idle_relayed_connection_is_not_a_stuck_handler(daemon_factory: Callable[..., Daemon],
                                                          worker_class: str) -> None:
    """The relay's handler thread waits while the relay loop copies the bytes: silent both ways, its connection
    is idle (--relay-idle-timeout's business), not stuck."""
    upstream = daemon_factory("-k", "async", workers=1, name="upstream")
    d = daemon_factory("-k", worker_class, "--relay", f"127.0.0.1:{upstream.port}", "--handler-timeout", "1",
                       workers=1)
    with d.connect(timeout=10) as s:
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
        wait_for(lambda: max(w["oldest_handler_s"] for w in d.status()["workers"]) >= 2.5, 20,
                 "the relayed connection held past --handler-timeout")
        s.sendall(b"still")
        assert recv_exact(s, 5) == b"still"
    assert d.call("stats")["closed"]["handler_timeout"] == 0
    assert "--handler-timeout" not in d.log()
