"""Upgrading prefork itself (USR2 / preforkctl upgrade): the new program executes in place, same pid, same sockets,
its molds and workers handed over and replaced as a reload does."""

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


def test_upgrade_under_load_refuses_nothing_and_keeps_the_master(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--workers", "2")
    before = d.status()
    old_pids = [m["pid"] for m in before["molds"]] + [w["pid"] for w in before["workers"]]
    with Load(d.address(), clients=6, mode="connect") as load:
        load.wait_ok(100)
        r = d.ctl("upgrade", timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"upgraded in place: master pid {d.pid} runs the new program; "
                                   "generation 2"), r.stdout
        load.wait_ok(100)
        wait_for(lambda: gone(old_pids), 20, "the old generation's mold and workers gone")
        load.wait_ok(100)
    assert load.failures == [], load.failures[:5]
    after = d.status()
    assert after["pid"] == before["pid"] == d.pid and after["state"] == "serving" and after["generation"] == 2
    assert after["listeners"] == before["listeners"]
    assert not {w["pid"] for w in after["workers"]} & set(old_pids)
    assert {psutil.Process(w["pid"]).ppid() for w in after["workers"]} == {d.pid}
    assert "executing" in d.log() and "runs in place" in d.log()
    # and it can be upgraded again, by signal this time
    os.kill(d.pid, signal.SIGUSR2)
    wait_for(lambda: (st := d.try_status()) is not None and st["generation"] == 3 and st["state"] == "serving"
             and len(d.ready_workers(st)) == 2, 20, "a second upgrade")
    assert d.status()["pid"] == d.pid
    assert exchange(d.address(), b"still here") == b"still here"


def test_counters_and_the_generation_never_go_backwards_across_upgrades(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--workers", "2")
    for _ in range(20):
        assert exchange(d.address(), b"count me") == b"count me"
    last = d.call("stats")
    for generation in (2, 3):
        r = d.ctl("upgrade", "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["generation"] == generation
        assert exchange(d.address(), b"count me") == b"count me"
        stats = wait_for(lambda last=last: (s := d.call("stats"))["requests"] > last["requests"] and s, 10,
                         "one more request")
        assert stats["generation"] == generation > last["generation"]
        assert stats["workers_spawned"] >= last["workers_spawned"] + 2 and stats["worker_exits"] >= last["worker_exits"]
        last = stats


def test_failed_upgrade_check_keeps_the_master_untouched(daemon_factory: Callable[..., Daemon],
                                                         tmp_path: Path) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text("workers = 1\n")
    d = daemon_factory("--config", str(config), workers=None)
    before = d.status()
    config.write_text("workers = [broken\n")  # the new program refuses it before anything is executed
    r = d.ctl("upgrade", timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "upgrade failed" in lines[0] and "invalid TOML" in lines[0], r.stderr
    after = d.status()
    assert (after["pid"], after["generation"], after["state"]) == (before["pid"], 1, "serving")
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    assert exchange(d.address(), b"ok") == b"ok"
    wait_for(lambda: "still serving" in d.log(), 5, "the failure logged")


def test_upgrade_keeps_systemd_s_main_pid(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    d = daemon_factory(env=child_env(NOTIFY_SOCKET=str(tmp_path / "notify")))
    messages = []
    while not any("READY=1" in m for m in messages):
        messages.append(notify.recv(4096).decode())  # bounded by the socket timeout
    r = d.ctl("upgrade", timeout=60)
    assert r.returncode == 0, r.stderr
    assert d.status()["pid"] == d.pid
    after: list[str] = []
    while not any("READY=1" in m for m in after):  # RELOADING=1, then READY=1 once the new generation serves
        after.append(notify.recv(4096).decode())
    notify.close()
    assert any("RELOADING=1" in m for m in after), after
    assert not any("MAINPID=" in m for m in messages + after)  # the main pid never changed


def test_upgrade_keeps_the_metrics_and_agent_ports(daemon_factory: Callable[..., Daemon]) -> None:
    from test_cli import free_port

    metrics, agent = free_port(), free_port()
    d = daemon_factory("--metrics-bind", f"127.0.0.1:{metrics}", "--agent-bind", f"127.0.0.1:{agent}")
    up = d.ctl("upgrade", "--json", timeout=60)
    assert up.returncode == 0, up.stderr
    assert int(json.loads(up.stdout)["pid"]) == d.pid

    def scrape() -> str:
        with socket.create_connection(("127.0.0.1", metrics), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    wait_for(lambda: "prefork_generation 2" in scrape() or 'generation="2"' in scrape(), 10,
             "the new image answering /metrics")
    assert f"prefork_master_pid {d.pid}" in scrape()
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
