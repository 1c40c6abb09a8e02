"""preforkctl drain: out of the load balancer's pool without breaking a connection."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable

import pytest
from test_haproxy import free_port

from conftest import Daemon, recv_exact, refused, wait_for
from prefork.proxy_protocol import build_v2


def health_check(d: Daemon) -> bool:
    """What HAProxy's tcp-check does: LOCAL header, PING, expect PING."""
    with d.connect() as s:
        s.sendall(build_v2(None, None, command="LOCAL") + b"PING\n")
        return recv_exact(s, 5) == b"PING\n"


@pytest.mark.parametrize("worker_class", ["thread", "async"])
def test_drain_behind_proxy_fails_health_checks_only(daemon_factory: Callable[..., Daemon], worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--proxy-protocol")
    assert health_check(d)
    client = d.connect()
    client.sendall(build_v2(("192.0.2.10", 1234), ("127.0.0.1", 80)) + b"before")
    assert recv_exact(client, 6) == b"before"

    r = d.ctl("drain", timeout=20)
    assert r.returncode == 0, r.stderr
    assert "health checks" in r.stdout
    assert not health_check(d)
    assert d.status()["drain"] == "health-checks"
    # open and new client connections are still served
    client.sendall(b"during")
    assert recv_exact(client, 6) == b"during"
    with d.connect() as s:
        s.sendall(build_v2(("192.0.2.11", 1), ("127.0.0.1", 80)) + b"new")
        assert recv_exact(s, 3) == b"new"
    # a worker started while draining drains too
    assert d.ctl("scale", "3", timeout=20).returncode == 0
    d.wait_serving(3)
    assert not any(health_check(d) for _ in range(6))

    assert d.ctl("drain", "--off", timeout=20).returncode == 0
    assert health_check(d)
    client.close()


def test_drain_without_any_health_check_is_refused(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    r = d.ctl("drain", timeout=20)
    assert r.returncode == 1 and "no health check" in r.stderr and "--close" in r.stderr, r.stderr
    assert d.status()["drain"] is None
    with d.connect() as s:  # still serving, listeners open
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"


@pytest.mark.parametrize("worker_class", ["sync", "thread", "async"])
def test_drain_close_without_health_checks_closes_listeners(daemon_factory: Callable[..., Daemon],
                                                            worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    held = d.connect()
    held.sendall(b"x")
    assert recv_exact(held, 1) == b"x"
    r = d.ctl("drain", "--close", timeout=20)
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "restart" in r.stderr, r.stderr

    wait_for(lambda: refused(d.address()), 10, "new connections to be refused")
    held.sendall(b"still here")
    assert recv_exact(held, 10) == b"still here"
    r = d.ctl("drain", "--off", timeout=20)
    assert r.returncode == 1 and "closed" in r.stderr
    assert d.ctl("reload", timeout=20).returncode == 1
    status = d.ctl("status", timeout=20).stdout
    assert "listening sockets closed" in status and "listening on" not in status, status
    assert len(d.status()["workers"]) == 2  # never 0 workers: nobody retired for a listener closed on purpose
    held.close()
    d.signal(15)
    assert d.wait_exit() == 0


def test_drain_close_behind_proxy_refuses_connections(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--proxy-protocol")
    assert d.ctl("drain", timeout=20).returncode == 0
    assert d.status()["drain"] == "health-checks"
    r = d.ctl("drain", "--close", timeout=20)  # for balancers whose checks only connect
    assert r.returncode == 0, r.stderr
    assert d.status()["drain"] == "listeners-closed"

    wait_for(lambda: refused(d.address()), 10, "new connections to be refused")


def agent_answer(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return s.makefile("rb").read().decode()


def readyz(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        return int(s.makefile("rb").readline().split()[1])


@pytest.mark.parametrize("check", ["agent", "metrics"])
def test_drain_off_and_reload_round_trip_with_a_health_port(daemon_factory: Callable[..., Daemon],
                                                            check: str) -> None:
    port = free_port()
    option = "--agent-bind" if check == "agent" else "--metrics-bind"
    d = daemon_factory(option, f"127.0.0.1:{port}")

    def check_passes() -> bool:
        return agent_answer(port).startswith("ready") if check == "agent" else readyz(port) == 200

    assert check_passes()
    held = d.connect()
    r = d.ctl("drain", timeout=20)
    assert r.returncode == 0, r.stderr
    assert "clients are still served" in r.stdout
    assert ("failing: agent-check" if check == "agent" else "failing: /readyz") in r.stdout, r.stdout
    assert not check_passes()
    assert d.status()["drain"] == "health-checks"
    assert "draining: health checks fail" in d.ctl("status", timeout=20).stdout
    for s in (held, d.connect()):  # open and new connections are served: the listeners stay open
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
    assert d.ctl("reload", timeout=60).returncode == 0  # a drained daemon reloads, and stays drained
    assert not check_passes()
    d.wait_serving(2)
    assert d.ctl("drain", "--off", timeout=20).returncode == 0
    assert check_passes()
    assert d.status()["drain"] is None
    assert d.ctl("reload", timeout=60).returncode == 0
    with d.connect() as s:
        s.sendall(b"after")
        assert recv_exact(s, 5) == b"after"
    held.close()


@pytest.mark.parametrize("fields", [{"off": {}, "close": "false"}, {"close": 1}, {"off": "yes"},
                                    {"off": True, "close": True}])
def test_a_drain_request_with_wrong_fields_is_refused(daemon_factory: Callable[..., Daemon],
                                                      fields: dict[str, object]) -> None:
    d = daemon_factory("--proxy-protocol")
    reply = d.call("drain", **fields)
    assert reply["ok"] is False and "drain" in reply["error"], reply
    assert d.status()["drain"] is None


def test_a_stop_request_with_a_wrong_field_is_refused(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    reply = d.call("stop", fast="no")
    assert reply["ok"] is False and "fast" in reply["error"], reply
    assert d.status()["state"] == "serving"


def test_a_worker_dying_after_drain_close_is_not_said_to_restart(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    assert d.ctl("drain", "--close", timeout=20).returncode == 0
    wait_for(lambda: refused(d.address()), 10, "new connections to be refused")
    victim = d.status()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: f"(pid {victim}) was killed by SIGKILL" in d.log(), 10, "the death to be logged")
    line = next(x for x in d.log().splitlines() if f"(pid {victim}) was killed" in x)
    assert "restarting" not in line, line  # nothing is started: there is nothing left to serve
    assert [w["pid"] for w in d.status()["workers"]] != [] and victim not in [w["pid"] for w in d.status()["workers"]]
