"""HAProxy's agent check (``--agent-bind``): the reply as pure functions, a live daemon's replies, a real HAProxy.

The HAProxy test runs the agent-check backend and the ``agent-bind`` setting
of docs/scale-out.md (read from its fenced blocks, as tests/test_haproxy.py
reads the rest), so the documented configuration is the one tested. HAProxy's
view comes from ``show servers state``: a server's operational state (2: UP),
its administrative state (a bit field: 0x08 is the drain an agent sets) and
its weight (``srv_uweight``: what the agent set, out of the configured 100).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_haproxy import BACKEND, HAProxy, _stop_haproxy, _sub, doc_block, free_port, haproxy_config

from conftest import Daemon, child_env, haproxy_serving, read_line, wait_for
from prefork.agent import MIN_WEIGHT, Load, agent_reply, readiness, weight_percent
from prefork.config import Config
from prefork.listeners import Listener
from prefork.master.endpoints import load_of, per_worker_capacity
from prefork.master.report import Snapshot, WorkerSample
from prefork.master.state import Totals

HAProxyFactory = Callable[[list[tuple[int, int]]], HAProxy]  # (service port, agent port) per server
UP, FORCED_DRAIN = 2, 0x08
READY = (UP, 0, 100)  # UP, no administrative state, full weight
REPLY = re.compile(r"(ready up ([1-9][0-9]?|100)%|drain|maint)\n")


def load(state: str = "serving", *, draining: bool = False, capacity: int | None = 100, active: int = 0,
         queued: int = 0, backlog: int = 2048) -> Load:
    return Load(state=state, draining=draining, capacity=capacity, active=active, queued=queued, backlog=backlog)


# -- the weight and the reply, as pure functions -------------------------------------------------------


@pytest.mark.parametrize(("capacity", "active", "queued", "expected"), [
    (128, 0, 0, 100),
    (4, 1, 0, 75),
    (4, 3, 0, 25),
    (4, 2, 1, 25),  # a queued connection takes a slot as surely as an open one
    (3, 1, 0, 66),  # rounded down: any load shows
    (128, 1, 0, 99),
    (4, 4, 0, MIN_WEIGHT),  # saturated: the lowest weight, never 0 (that would take it out)
    (4, 4, 50, MIN_WEIGHT),
    (4, 9, 0, MIN_WEIGHT),  # more open than the capacity (a reload's two generations): still the floor
    (0, 0, 0, MIN_WEIGHT),  # no ready worker: no headroom
    (None, 5000, 0, 100),  # no cap: open connections say nothing
    (None, 0, 1024, 50),  # ... but the accept queue does
    (None, 0, 2048, MIN_WEIGHT),
])
def test_weight_is_the_free_share_of_capacity(capacity: int | None, active: int, queued: int, expected: int) -> None:
    assert weight_percent(load(capacity=capacity, active=active, queued=queued)) == expected


@given(capacity=st.one_of(st.none(), st.integers(0, 100_000)), active=st.integers(0, 200_000),
       queued=st.integers(0, 70_000), more=st.integers(1, 1000), backlog=st.integers(1, 65535))
def test_weight_is_in_range_and_falls_as_load_grows(capacity: int | None, active: int, queued: int, more: int,
                                                    backlog: int) -> None:
    w = weight_percent(load(capacity=capacity, active=active, queued=queued, backlog=backlog))
    assert MIN_WEIGHT <= w <= 100
    assert weight_percent(load(capacity=capacity, active=active + more, queued=queued, backlog=backlog)) <= w
    assert weight_percent(load(capacity=capacity, active=active, queued=queued + more, backlog=backlog)) <= w


@pytest.mark.parametrize(("state", "draining", "expected"), [
    ("starting", False, "maint\n"),
    ("starting", True, "maint\n"),
    ("stopping", False, "maint\n"),
    ("stopping", True, "maint\n"),
    ("serving", True, "drain\n"),
    ("reloading", True, "drain\n"),
    ("serving", False, "ready up 75%\n"),
    ("reloading", False, "ready up 75%\n"),  # the old generation serves while the new one starts
])
def test_reply_in_each_state(state: str, draining: bool, expected: str) -> None:
    assert agent_reply(load(state, draining=draining, capacity=4, active=1)) == expected


@given(state=st.sampled_from(["starting", "serving", "reloading", "stopping"]), draining=st.booleans(),
       capacity=st.one_of(st.none(), st.integers(0, 10_000)), active=st.integers(0, 20_000),
       queued=st.integers(0, 70_000))
def test_reply_is_one_line_of_haproxy_words(state: str, draining: bool, capacity: int | None, active: int,
                                            queued: int) -> None:
    reply = agent_reply(load(state, draining=draining, capacity=capacity, active=active, queued=queued))
    assert REPLY.fullmatch(reply), reply
    assert reply.isascii()


def test_readiness_says_why() -> None:
    assert readiness("serving", False) == (True, "ready")
    assert readiness("reloading", False) == (True, "ready")
    assert readiness("serving", True) == (False, "draining (preforkctl drain)")
    assert readiness("starting", False) == (False, "starting: the first generation is not serving yet")
    assert readiness("stopping", True) == (False, "stopping")


# -- the load the master reports ------------------------------------------------------------------------


def sample(pid: int, state: str, active: int) -> WorkerSample:
    return WorkerSample(pid=pid, slot=pid % 10, generation=1, state=state, requests=0, active=active, errors=0,
                        proxy_errors=0, bytes_in=0, bytes_out=0, rss_bytes=0, cpu_percent=0.0, age_s=1.0,
                        heartbeat_age_s=0.1)


def snapshot(workers: list[WorkerSample], state: str = "serving", drain: str | None = None) -> Snapshot:
    return Snapshot(pid=1, name="t", generation=1, uptime_s=1.0, state=state, drain=drain, worker_class="thread",
                    event_loop=None, handler="h:H", target_workers=len(workers), listeners=[], control="c",
                    workers=workers, backoff=[], totals=Totals())


def test_capacity_per_worker_class() -> None:
    assert per_worker_capacity(Config(worker_class="thread", threads=8)) == 8
    assert per_worker_capacity(Config(worker_class="sync")) == 1
    assert per_worker_capacity(Config(worker_class="async", max_connections=500)) == 500
    assert per_worker_capacity(Config(worker_class="async")) is None


def test_load_counts_ready_workers_and_the_accept_queue() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        waiting = [socket.create_connection(server.getsockname(), timeout=5) for _ in range(3)]  # never accepted
        try:
            workers = [sample(10, "ready", 2), sample(11, "ready", 1), sample(12, "draining", 7),
                       sample(13, "booting", 0)]
            got = load_of(snapshot(workers, drain="health-checks"), Config(threads=4, backlog=16),
                          [Listener(server, "127.0.0.1:0")])
        finally:
            for s in waiting:
                s.close()
    # a draining worker (finishing its connections) and a booting one take no new connections
    assert got == Load(state="serving", draining=True, capacity=8, active=3, queued=3, backlog=16)
    assert agent_reply(got) == "drain\n"
    assert agent_reply(Load(**{**got.__dict__, "draining": False})) == f"ready up {100 * (8 - 3 - 3) // 8}%\n"


# -- a live daemon's replies ----------------------------------------------------------------------------


def agent_line(port: int) -> str:
    """What the agent port answers: one line, then it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode("ascii")


def proxied(d: Daemon) -> socket.socket:
    """A client connection to ``d`` that announces itself with a PROXY v1 header; its greeting line is read."""
    s = d.connect()
    s.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 20000\r\n")
    assert read_line(s, limit=100) == b"192.0.2.1 40000\n"  # the handler serves it
    return s


def active(d: Daemon) -> int:
    return sum(w["active"] for w in d.status()["workers"])


def test_live_replies_follow_load_drain_and_stop(daemon_factory: Callable[..., Daemon]) -> None:
    port = free_port()
    d = daemon_factory("--workers", "1", "--threads", "4", "--agent-bind", f"127.0.0.1:{port}",
                       "--proxy-protocol", "--graceful-timeout", "20", "proxy_peer:PeerHandler", workers=None)
    assert agent_line(port) == "ready up 100%\n"
    held = [proxied(d) for _ in range(2)]
    wait_for(lambda: active(d) == 2, 5, "two connections open")
    assert agent_line(port) == "ready up 50%\n"
    held.append(proxied(d))
    wait_for(lambda: active(d) == 3, 5, "three connections open")
    assert agent_line(port) == "ready up 25%\n"
    held.pop().close()
    wait_for(lambda: active(d) == 2, 5, "two connections open")
    assert agent_line(port) == "ready up 50%\n"

    assert d.ctl("drain").returncode == 0
    assert agent_line(port) == "drain\n"
    assert d.ctl("drain", "--off").returncode == 0
    assert agent_line(port) == "ready up 50%\n"

    d.signal(15)  # graceful stop: the held connections keep the master in its stopping state
    wait_for(lambda: (d.try_status() or {}).get("state") == "stopping", 5, "the master to be stopping")
    assert agent_line(port) == "maint\n"
    for s in held:
        s.close()
    assert d.wait_exit(10) == 0


def test_agent_bind_is_checked_like_metrics_bind(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "prefork", "--check-config", *args], capture_output=True,
                              text=True, env=child_env(), cwd=str(tmp_path), timeout=30)

    bad = [(["--agent-bind", "unix:/tmp/x.sock"], "agent-bind: 'unix:/tmp/x.sock' must be HOST:PORT"),
           (["--bind", "127.0.0.1:20500", "--agent-bind", "127.0.0.1:20500"],
            "agent-bind: 127.0.0.1:20500 is also a --bind address"),
           (["--metrics-bind", "127.0.0.1:20501", "--agent-bind", "127.0.0.1:20501"],
            "agent-bind: 127.0.0.1:20501 is also the --metrics-bind address"),
           (["--agent-bind", "127.0.0.1:99999"], "port 99999 is out of range")]
    for args, message in bad:
        r = run(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    toml = tmp_path / "agent.toml"
    toml.write_text('agent-bind = "127.0.0.1:20502"\n')
    assert run("--config", str(toml)).returncode == 0


# -- a real HAProxy -------------------------------------------------------------------------------------


def agent_backend() -> str:
    return doc_block("haproxy agent-check")


def agent_haproxy_config(frontend_port: int, servers: list[tuple[int, int]], stats_socket: Path) -> str:
    """The documented haproxy.cfg with the documented agent-check backend, on loopback ports.

    ``servers`` are (service port, agent port) pairs, one per server line.
    """
    base = haproxy_config(frontend_port, [p for p, _ in servers], stats_socket)
    backend = agent_backend()
    assert re.findall(r"^backend (\S+)$", backend, flags=re.M) == [BACKEND]
    pairs = iter(servers)

    def rebind(m: re.Match[str]) -> str:
        port, agent_port = next(pairs)
        return f"{m[1]}127.0.0.1:{port}{m[2]}{agent_port}{m[3]}"

    backend = _sub(r"^(\s*server \S+ )\S+:\d+( .*\bagent-check agent-port )\d+(.*)$", rebind, backend, len(servers))
    cfg, n = re.subn(r"^backend .*\Z", lambda m: backend, base, flags=re.M | re.S)
    assert n == 1, "the documented haproxy.cfg no longer ends with its backend"
    return cfg


def agent_toml() -> dict[str, object]:
    return tomllib.loads(doc_block("toml", "agent-bind"))


def test_documented_agent_config_is_valid(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(agent_haproxy_config(free_port(), [(free_port(), free_port()), (free_port(), free_port())],
                                        tmp_path / "s.sock"))
    r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "weight 100" in cfg.read_text()  # the agent's percentages are shares of it
    assert set(agent_toml()) == {"agent-bind"}


@pytest.fixture
def agent_haproxy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HAProxyFactory]:
    assert shutil.which("haproxy"), "haproxy is not installed (scripts/setup installs it)"
    started: list[HAProxy] = []

    def factory(servers: list[tuple[int, int]]) -> HAProxy:
        cfg_path, stats_socket, port = tmp_path / "haproxy.cfg", tmp_path / "haproxy.sock", free_port()
        cfg_path.write_text(agent_haproxy_config(port, servers, stats_socket))
        log_path = tmp_path / "haproxy.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=str(tmp_path))
        hap = HAProxy(proc=proc, port=port, stats_socket=stats_socket, log_path=log_path)
        started.append(hap)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"haproxy exited with {proc.returncode}:\n{hap.output()}")
            return haproxy_serving(stats_socket, port)

        wait_for(ready, 10, "HAProxy's frontend to accept")
        return hap

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for hap in started:
        _stop_haproxy(hap)
        if failed is not None and failed.failed:
            print("--- haproxy output (last 150 lines) ---\n" + "\n".join(hap.output().splitlines()[-150:]))
        assert hap.proc.poll() is not None, "haproxy was left running"


def views(hap: HAProxy) -> dict[str, tuple[int, int, int]]:
    """Server name -> (operational state, administrative state, weight), from ``show servers state``."""
    lines = hap.admin(f"show servers state {BACKEND}").splitlines()
    header = lines[1].lstrip("# ").split()
    rows = [dict(zip(header, line.split(), strict=False)) for line in lines[2:] if line.strip()]
    return {r["srv_name"]: (int(r["srv_op_state"]), int(r["srv_admin_state"]), int(r["srv_uweight"])) for r in rows}


@pytest.mark.timeout(60)
def test_haproxy_follows_the_agent(tmp_path: Path, daemon_factory: Callable[..., Daemon],
                                   agent_haproxy: HAProxyFactory) -> None:
    toml = tmp_path / "instance.toml"
    toml.write_text(doc_block("toml", "app1.toml") + doc_block("toml", "agent-bind"))
    agent_ports = [free_port(), free_port()]
    daemons = [daemon_factory("--config", str(toml), "--bind", "127.0.0.1:0", "--proxy-allow", "127.0.0.1/32",
                              "--agent-bind", f"127.0.0.1:{agent_port}", "--workers", "1", "--threads", "4",
                              "--graceful-timeout", "5", "proxy_peer:PeerHandler", name=f"app{i + 1}", workers=None)
               for i, agent_port in enumerate(agent_ports)]
    hap = agent_haproxy([(d.port, a) for d, a in zip(daemons, agent_ports, strict=True)])
    busy, (busy_name, idle_name) = daemons[0], re.findall(r"^\s*server (\S+) ", agent_backend(), flags=re.M)
    wait_for(lambda: views(hap) == {busy_name: READY, idle_name: READY}, 10, "both UP at weight 100")

    held = [proxied(busy) for _ in range(3)]  # 3 of its 4 threads
    # the health checks take a thread for a moment too: 25% or, briefly, less
    shifted = wait_for(lambda: (v := views(hap))[busy_name][2] <= 25 and v[idle_name] == READY and v, 10,
                       f"{busy_name}'s weight to fall to 25% or less")
    assert shifted[busy_name][:2] == (UP, 0)  # still UP and in the pool, at a lower weight
    for s in held:
        s.close()
    wait_for(lambda: views(hap) == {busy_name: READY, idle_name: READY}, 10, f"{busy_name}'s weight back at 100")

    assert busy.ctl("drain").returncode == 0
    wait_for(lambda: views(hap)[busy_name][1] & FORCED_DRAIN, 10, f"HAProxy to put {busy_name} in DRAIN")
    assert views(hap)[idle_name] == READY
    assert busy.ctl("drain", "--off").returncode == 0
    wait_for(lambda: views(hap)[busy_name] == READY, 10, f"HAProxy to take {busy_name} out of DRAIN")
