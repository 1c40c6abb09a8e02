"""preforkctl drain: out of the load balancer's pool without breaking a connection."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from conftest import Daemon, recv_exact, wait_for
from prefork.proxy_protocol import build_v2


def refused(d: Daemon) -> bool:
    """A new connection is refused: no process of the instance listens any more."""
    try:
        socket.create_connection(d.address(), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


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


@pytest.mark.parametrize("worker_class", ["thread", "async"])
def test_drain_without_proxy_closes_listeners(daemon_factory: Callable[..., Daemon], worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    held = d.connect()
    held.sendall(b"x")
    assert recv_exact(held, 1) == b"x"
    r = d.ctl("drain", timeout=20)
    assert r.returncode == 0, r.stderr

    wait_for(lambda: refused(d), 10, "new connections to be refused")
    held.sendall(b"still here")
    assert recv_exact(held, 10) == b"still here"
    r = d.ctl("drain", "--off", timeout=20)
    assert r.returncode == 1 and "closed" in r.stderr
    assert d.ctl("reload", timeout=20).returncode == 1
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

    wait_for(lambda: refused(d), 10, "new connections to be refused")
