"""Upgrading the master program itself (USR2 / preforkctl upgrade) on the same sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import psutil

from conftest import Daemon, Load, child_env, exchange, wait_for


def gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_upgrade_under_load_refuses_nothing(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--workers", "2")
    before = d.status()
    old_pids = [before["pid"]] + [w["pid"] for w in before["workers"]]
    with Load(d.address(), clients=6, mode="connect") as load:
        load.wait_ok(100)
        r = d.ctl("upgrade", timeout=60)
        assert r.returncode == 0, r.stderr
        assert "upgraded: new master pid" in r.stdout
        load.wait_ok(100)
        wait_for(lambda: gone(old_pids), 20, "the old master and its workers gone")
        load.wait_ok(100)
    assert load.failures == [], load.failures[:5]
    after = d.status()  # the same control socket path answers: the new master
    assert after["pid"] not in old_pids and after["state"] == "serving"
    assert after["listeners"] == before["listeners"]
    assert not {w["pid"] for w in after["workers"]} & set(old_pids)
    # and the new master can be upgraded again, by signal this time
    os.kill(after["pid"], signal.SIGUSR2)
    wait_for(lambda: (st := d.try_status()) is not None and st["pid"] != after["pid"], 20, "a second upgrade")
    assert exchange(d.address(), b"still here") == b"still here"


def test_failed_upgrade_keeps_the_old_master(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text("workers = 1\n")
    d = daemon_factory("--config", str(config), workers=None)
    pid = d.status()["pid"]
    config.write_text("workers = [broken\n")  # the new master cannot start
    r = d.ctl("upgrade", timeout=60)
    assert r.returncode == 1
    assert "upgrade failed" in r.stderr and "exited with status 2" in r.stderr
    assert d.status()["pid"] == pid and d.status()["state"] == "serving"
    assert exchange(d.address(), b"ok") == b"ok"
    wait_for(lambda: "still serving" in d.log(), 5, "the failure logged")


def test_upgrade_tells_systemd_the_new_main_pid(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    d = daemon_factory(env=child_env(NOTIFY_SOCKET=str(tmp_path / "notify")))
    r = d.ctl("upgrade", timeout=60)
    assert r.returncode == 0, r.stderr
    new_pid = d.status()["pid"]
    messages = []
    while f"MAINPID={new_pid}" not in messages:
        messages.append(notify.recv(4096).decode())  # bounded by the socket timeout
    notify.close()


def test_upgrade_hands_over_the_metrics_and_agent_ports(daemon_factory: Callable[..., Daemon]) -> None:
    """The new master serves /metrics and the agent check on the same ports; it used to fail to bind them."""
    from test_cli import free_port

    metrics, agent = free_port(), free_port()
    d = daemon_factory("--metrics-bind", f"127.0.0.1:{metrics}", "--agent-bind", f"127.0.0.1:{agent}")
    old = d.pid
    up = d.ctl("upgrade", "--json", timeout=60)
    assert up.returncode == 0, up.stderr
    new = int(json.loads(up.stdout)["pid"])
    assert new != old

    def scrape() -> str:
        with socket.create_connection(("127.0.0.1", metrics), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    wait_for(lambda: f"prefork_master_pid {new}" in scrape(), 10, "the new master answering /metrics")
    with socket.create_connection(("127.0.0.1", agent), timeout=5) as s:
        assert s.recv(100).startswith(b"ready up ")
    assert d.ctl("stop").returncode == 0


def test_the_generation_count_goes_on_across_an_upgrade(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    assert d.ctl("reload", timeout=60).returncode == 0
    assert d.status()["generation"] == 2
    r = d.ctl("upgrade", timeout=60)
    assert r.returncode == 0, r.stderr
    st = d.status()
    assert st["generation"] == 3, st["generation"]
    assert {w["generation"] for w in st["workers"] if w["state"] == "ready"} == {3}
    r = d.ctl("reload", "--json", timeout=60)  # and the new master's own reloads go on from there
    assert r.returncode == 0 and json.loads(r.stdout)["generation"] == 4, r.stdout + r.stderr
