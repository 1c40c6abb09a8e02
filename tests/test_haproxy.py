"""A real HAProxy in front of two prefork instances, as docs/scale-out.md deploys them.

The HAProxy configuration and the instances' TOML file are read from the
fenced blocks of docs/scale-out.md, so the documented deployment is the one
tested. Only addresses, the log target and the stats socket path are
changed (see ``haproxy_config``). HAProxy's view of its servers comes from its
stats socket (``show servers state``: operational state 0 = DOWN, 2 = UP).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    ClientThreads,
    Daemon,
    child_env,
    haproxy_admin,
    haproxy_serving,
    read_line,
    recv_exact,
    wait_for,
)

DOC = ROOT / "docs" / "scale-out.md"
UP, DOWN = 2, 0
CLIENTS = 6


# -- the documented configuration -----------------------------------------------------------------


def doc_block(lang: str, first_line_contains: str = "") -> str:
    """The fenced block of docs/scale-out.md with this info string (and first line), exactly one."""
    blocks = re.findall(rf"^```{re.escape(lang)}\n(.*?)^```$", DOC.read_text(), flags=re.S | re.M)
    found = [b for b in blocks if first_line_contains in b.split("\n", 1)[0]]
    assert len(found) == 1, f"docs/scale-out.md: expected one ```{lang} block ({first_line_contains!r}), got {found}"
    return str(found[0])


def _sub(pattern: str, repl: str | Callable[[re.Match[str]], str], text: str, count: int) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    assert n == count, f"docs/scale-out.md's HAProxy config changed: {pattern!r} matched {n} times, not {count}"
    return new


def haproxy_config(frontend_port: int, server_ports: list[int], stats_socket: Path) -> str:
    """The documented haproxy.cfg, rebound to loopback ports, logging to stdout, with a private stats socket."""
    cfg = doc_block("haproxy")
    cfg = _sub(r"^(\s*)log /dev/log (\S+)$", r"\1log stdout format raw \2", cfg, 1)
    cfg = _sub(r"^(\s*)stats socket \S+ .*$", rf"\1stats socket {stats_socket} mode 600 level admin", cfg, 1)
    cfg = _sub(r"^(\s*)bind \S+$", rf"\g<1>bind 127.0.0.1:{frontend_port}", cfg, 1)
    ports = iter(server_ports)
    cfg = _sub(r"^(\s*server \S+ )\S+:\d+( .*)$", lambda m: f"{m[1]}127.0.0.1:{next(ports)}{m[2]}",
               cfg, len(server_ports))
    # Debian's chroot/user/group/daemon lines (the doc says they can stay) need root: never in the test
    return re.sub(r"^\s*(chroot|user|group|daemon)\b.*\n", "", cfg, flags=re.M)


def server_names() -> list[str]:
    return re.findall(r"^\s*server (\S+) ", doc_block("haproxy"), flags=re.M)


BACKEND = re.findall(r"^backend (\S+)$", doc_block("haproxy"), flags=re.M)[0]


# -- HAProxy ----------------------------------------------------------------------------------------


@dataclass
class HAProxy:
    proc: subprocess.Popen[bytes]
    port: int
    stats_socket: Path
    log_path: Path

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def admin(self, command: str) -> str:
        """One command on the stats socket; HAProxy answers and closes."""
        return haproxy_admin(self.stats_socket, command)

    def servers_state(self) -> dict[str, int]:
        """Server name -> operational state (0 DOWN, 1 starting, 2 UP, 3 stopping)."""
        lines = self.admin(f"show servers state {BACKEND}").splitlines()
        header = lines[1].lstrip("# ").split()
        rows = [dict(zip(header, line.split(), strict=False)) for line in lines[2:] if line.strip()]
        return {r["srv_name"]: int(r["srv_op_state"]) for r in rows}

    def stats(self) -> dict[str, dict[str, str]]:
        """Server name -> its ``show stat`` CSV row (stot: sessions so far, scur: open now, status)."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line.strip()]
        return {r["svname"]: r for r in rows if r["pxname"] == BACKEND}

    def wait_state(self, server: str, state: int, timeout: float = 10.0) -> None:
        wait_for(lambda: self.servers_state().get(server) == state, timeout,
                 f"HAProxy to mark {server} {'UP' if state == UP else 'DOWN' if state == DOWN else state}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def _refuses(addr: tuple[str, int]) -> bool:
    """True once nothing listens there (a reset means a dying listener still took the SYN)."""
    try:
        socket.create_connection(addr, timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_haproxy(tmp_path: Path, server_ports: list[int]) -> HAProxy:
    """Write the documented config for these servers and run ``haproxy -db -f CFG`` in its own session."""
    cfg_path = tmp_path / "haproxy.cfg"
    stats_socket = tmp_path / "haproxy.sock"
    port = free_port()
    cfg_path.write_text(haproxy_config(port, server_ports, stats_socket))
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg_path)], capture_output=True, text=True, timeout=20)
    assert check.returncode == 0, f"haproxy -c: {check.stdout}{check.stderr}\n{cfg_path.read_text()}"
    log_path = tmp_path / "haproxy.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(tmp_path))
    hap = HAProxy(proc=proc, port=port, stats_socket=stats_socket, log_path=log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {proc.returncode}:\n{hap.output()}")
        return haproxy_serving(stats_socket, port)

    wait_for(ready, 10, "HAProxy's frontend to accept")
    return hap


def _stop_haproxy(hap: HAProxy) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(hap.proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            hap.proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def haproxy_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[list[int]], HAProxy]]:
    assert shutil.which("haproxy"), "haproxy is not installed (Debian package haproxy; .ci/run installs it)"
    started: list[HAProxy] = []

    def factory(server_ports: list[int]) -> HAProxy:
        hap = start_haproxy(tmp_path, server_ports)
        started.append(hap)
        return hap

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for hap in started:
        _stop_haproxy(hap)
        if failed is not None and failed.failed:
            tail = "\n".join(hap.output().splitlines()[-150:])
            print(f"--- haproxy output (last 150 lines) ---\n{tail}")
        assert hap.proc.poll() is not None, "haproxy was left running"


# -- prefork instances --------------------------------------------------------------------------------


def start_instances(tmp_path: Path, daemon_factory: Callable[..., Daemon], handler: str,
                    count: int = 2) -> list[Daemon]:
    """Instances run with the documented TOML file; the command line rebinds them to free loopback ports."""
    toml = tmp_path / "instance.toml"
    toml.write_text(doc_block("toml", "app1.toml"))
    return [daemon_factory("--config", str(toml), "--bind", "127.0.0.1:0", "--proxy-allow", "127.0.0.1/32",
                           "--workers", "2", "--graceful-timeout", "5", handler, name=f"app{i + 1}")
            for i in range(count)]


def pool(tmp_path: Path, daemon_factory: Callable[..., Daemon],
         haproxy_factory: Callable[[list[int]], HAProxy], handler: str) -> tuple[list[Daemon], HAProxy]:
    """Two instances behind HAProxy, both UP (a check has passed on each)."""
    daemons = start_instances(tmp_path, daemon_factory, handler)
    assert all(d.status()["drain"] is None for d in daemons)
    hap = haproxy_factory([d.port for d in daemons])
    names = server_names()
    assert len(names) == len(daemons)
    wait_for(lambda: all(hap.stats()[n]["check_status"] == "L7OK" for n in names)
             and all(s == UP for s in hap.servers_state().values()), 10, "both servers UP with a passed check")
    return daemons, hap


def requests(d: Daemon) -> int:
    return sum(w["requests"] for w in d.status()["workers"])


def active(d: Daemon) -> int:
    return sum(w["active"] for w in d.status()["workers"])


# -- load through HAProxy --------------------------------------------------------------------------------


def ident_exchange(addr: tuple[str, int], payload: bytes) -> int:
    """One exchange with tests/apps/haproxy_ident.py through HAProxy; returns the serving instance's port.

    Checks that the handler saw this very client (127.0.0.1 and our source port).
    """
    with socket.create_connection(addr, timeout=5) as s:
        me = s.getsockname()
        line = read_line(s, limit=100)  # the handler's first line
        if not line.endswith(b"\n"):
            raise ConnectionError(f"closed after {line!r}")
        server_port, host, port = line.decode().split()
        if (host, int(port)) != (me[0], me[1]):
            raise ValueError(f"the handler saw {host}:{port}, the client is {me[0]}:{me[1]}")
        s.sendall(payload)
        got = recv_exact(s, len(payload))
        if got != payload:
            raise ValueError(f"echo mismatch: {got!r} != {payload!r}")
        return int(server_port)


@dataclass
class Exchange:
    start: float
    end: float
    server_port: int | None  # None: failed
    error: str = ""


@dataclass
class IdentLoad(ClientThreads):
    """Client threads, each doing exchanges on new connections until stopped (bounded in time and count)."""

    addr: tuple[str, int]
    clients: int = CLIENTS
    max_seconds: float = 40.0
    max_exchanges: int = 100_000
    log: list[Exchange] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        super().__init__(self.clients)

    def ok(self, since: float = 0.0) -> list[Exchange]:
        with self._lock:
            return [e for e in self.log if e.server_port is not None and e.start >= since]

    def failures(self) -> list[Exchange]:
        with self._lock:
            return [e for e in self.log if e.server_port is None]

    def wait_ok(self, count: int, since: float = 0.0, timeout: float = 15.0) -> None:
        """Wait for ``count`` successful exchanges that started at or after ``since``."""
        wait_for(lambda: len(self.ok(since)) >= count, timeout, f"{count} successful exchanges")

    def _run(self, i: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        n = 0
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.log) < self.max_exchanges:
            payload = f"client {i} exchange {n}\n".encode()
            n += 1
            start = time.monotonic()
            try:
                port = ident_exchange(self.addr, payload)
                exchange = Exchange(start, time.monotonic(), port)
            except (OSError, ValueError) as exc:
                exchange = Exchange(start, time.monotonic(), None, f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.log.append(exchange)


def served_by(exchanges: list[Exchange]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for e in exchanges:
        assert e.server_port is not None
        counts[e.server_port] = counts.get(e.server_port, 0) + 1
    return counts


# -- tests ---------------------------------------------------------------------------------------------------


def test_documented_config_is_valid_for_haproxy_and_prefork(tmp_path: Path) -> None:
    """Both blocks of docs/scale-out.md pass their own checkers as written (bar the host's addresses)."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(free_port(), [free_port(), free_port()], tmp_path / "s.sock"))
    r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "send-proxy-v2" in cfg.read_text() and "tcp-check connect send-proxy" in cfg.read_text()
    toml = tmp_path / "app1.toml"
    toml.write_text(doc_block("toml", "app1.toml"))
    r = subprocess.run([sys.executable, "-m", "prefork", "--config", str(toml), "--bind", "127.0.0.1:0",
                        "--check-config", "proxy_peer:PeerHandler"],
                       capture_output=True, text=True, env=child_env(), cwd=str(tmp_path), timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_clients_see_their_real_address_and_are_spread(
        tmp_path: Path, daemon_factory: Callable[..., Daemon],
        haproxy_factory: Callable[[list[int]], HAProxy]) -> None:
    daemons, hap = pool(tmp_path, daemon_factory, haproxy_factory, "proxy_peer:PeerHandler")
    names = server_names()
    before_requests = [requests(d) for d in daemons]
    before_stot = {n: int(hap.stats()[n]["stot"]) for n in names}
    n = 40
    for i in range(n):
        with socket.create_connection(hap.address(), timeout=5) as s:
            host, port = s.getsockname()[:2]
            expected = f"{host} {port}\n".encode()
            assert host == "127.0.0.1"
            assert recv_exact(s, len(expected)) == expected  # the handler's client_address is this client
            s.sendall(f"hello {i}\n".encode())
            assert recv_exact(s, len(f"hello {i}\n")) == f"hello {i}\n".encode()
    stot = {name: int(hap.stats()[name]["stot"]) - before_stot[name] for name in names}
    assert stot == {name: n // 2 for name in names}  # round robin: half each
    # each instance served its half. Its counter counts a connection once it is over, and it also
    # counts the health checks it answered (about 3 a second): with 20 connections each, a wait of
    # 2 s cannot make up for an instance that got none
    wait_for(lambda: all(requests(d) - b >= n // 2 for d, b in zip(daemons, before_requests, strict=True)),
             2, f"each instance to count {n // 2} more connections")
    assert [w["proxy_errors"] for d in daemons for w in d.status()["workers"]] == [0] * 4


@pytest.mark.timeout(40)
def test_killing_an_instance_under_load_fails_nothing_once_it_is_down(
        tmp_path: Path, daemon_factory: Callable[..., Daemon],
        haproxy_factory: Callable[[list[int]], HAProxy]) -> None:
    daemons, hap = pool(tmp_path, daemon_factory, haproxy_factory, "haproxy_ident:IdentHandler")
    victim, survivor = daemons
    victim_name = server_names()[0]
    with IdentLoad(hap.address()) as load:
        load.wait_ok(200)
        assert set(served_by(load.ok())) == {victim.port, survivor.port}
        killed_at = time.monotonic()
        os.killpg(victim.pid, signal.SIGKILL)  # the master and its workers, at once
        # the kernel tears the processes down; once the last one is gone, its port refuses
        wait_for(lambda: _refuses(victim.address()), 5, "the killed instance's port to refuse", interval=0.001)
        gone_at = time.monotonic()
        victim.wait_exit(5)
        hap.wait_state(victim_name, DOWN)
        down_at = time.monotonic()
        load.wait_ok(300, since=down_at)
    failed = load.failures()
    window = [e for e in failed if e.end >= killed_at and e.start < down_at]
    print(f"\nkill -> port refusing {gone_at - killed_at:.3f}s -> DOWN {down_at - killed_at:.2f}s; "
          f"{len([e for e in load.ok(killed_at) if e.start < down_at])} exchanges succeeded and "
          f"{len(window)} failed between the kill and DOWN "
          f"({len([e for e in window if e.start >= killed_at])} of them started after the kill): "
          f"{[e.error for e in window]}")
    assert [e.error for e in failed if e.end < killed_at] == []
    # once the killed instance's port refuses, even before HAProxy marks it DOWN, every
    # connection HAProxy tries there is refused and redispatched: not one failure
    assert [e.error for e in failed if e.start >= gone_at] == []
    assert set(served_by(load.ok(down_at))) == {survivor.port}  # after DOWN, all go to the survivor
    # what fails is what the dying instance had already accepted: exchanges in flight at the
    # kill, and connections that reached its port while the kernel tore its processes down
    assert all(e.start < gone_at for e in window), [(e.start - gone_at, e.error) for e in window]


@pytest.mark.timeout(40)
def test_drain_takes_an_instance_out_with_no_failure(
        tmp_path: Path, daemon_factory: Callable[..., Daemon],
        haproxy_factory: Callable[[list[int]], HAProxy]) -> None:
    daemons, hap = pool(tmp_path, daemon_factory, haproxy_factory, "haproxy_ident:IdentHandler")
    by_port = {d.port: (d, name) for d, name in zip(daemons, server_names(), strict=True)}
    # a connection held open through HAProxy: the instance it lands on is the one we drain
    with socket.create_connection(hap.address(), timeout=5) as held, IdentLoad(hap.address()) as load:
        victim, victim_name = by_port[int(read_line(held, limit=100).split()[0])]
        survivor = next(d for d in daemons if d is not victim)

        def held_echo(text: bytes) -> None:
            held.sendall(text)
            assert recv_exact(held, len(text)) == text

        load.wait_ok(200)
        assert set(served_by(load.ok())) == {victim.port, survivor.port}
        held_echo(b"before the drain\n")

        r = victim.ctl("drain")
        assert r.returncode == 0, r.stderr
        assert "health checks" in r.stdout
        drained_at = time.monotonic()
        held_echo(b"while draining\n")
        hap.wait_state(victim_name, DOWN)  # its health checks fail
        down_at = time.monotonic()
        wait_for(lambda: f"Server {BACKEND}/{victim_name} is DOWN" in hap.output(), 5, "HAProxy's DOWN log line")
        assert victim.status()["drain"] == "health-checks"
        load.wait_ok(200, since=down_at)
        assert set(served_by(load.ok(down_at))) == {survivor.port}  # the other instance takes every new one
        held_echo(b"after DOWN\n")  # open connections are still served
        held.close()  # the last one ends
        wait_for(lambda: active(victim) == 0, 10, "the drained instance's connections to finish")
        assert int(hap.stats()[victim_name]["scur"]) == 0

        r = victim.ctl("stop")
        assert r.returncode == 0, r.stderr
        assert victim.wait_exit(5) == 0
        stopped_at = time.monotonic()
        load.wait_ok(200, since=stopped_at)
    print(f"\ndrain -> DOWN took {down_at - drained_at:.2f}s; {len(load.log)} exchanges, "
          f"{len(load.failures())} failed")
    assert [e.error for e in load.failures()] == []  # not one, before, during or after
    assert set(served_by(load.ok(down_at))) == {survivor.port}
    assert hap.servers_state()[victim_name] == DOWN


@pytest.mark.timeout(40)
def test_drain_off_brings_the_instance_back(
        tmp_path: Path, daemon_factory: Callable[..., Daemon],
        haproxy_factory: Callable[[list[int]], HAProxy]) -> None:
    daemons, hap = pool(tmp_path, daemon_factory, haproxy_factory, "haproxy_ident:IdentHandler")
    (victim, survivor), victim_name = daemons, server_names()[0]
    with IdentLoad(hap.address()) as load:
        load.wait_ok(100)
        assert victim.ctl("drain").returncode == 0
        hap.wait_state(victim_name, DOWN)
        down_at = time.monotonic()
        load.wait_ok(100, since=down_at)
        assert set(served_by(load.ok(down_at))) == {survivor.port}

        r = victim.ctl("drain", "--off")
        assert r.returncode == 0, r.stderr
        assert "health checks are answered" in r.stdout
        hap.wait_state(victim_name, UP)
        up_at = time.monotonic()
        assert victim.status()["drain"] is None
        load.wait_ok(200, since=up_at)
    after = served_by(load.ok(up_at))
    assert set(after) == {victim.port, survivor.port}
    assert min(after.values()) >= len(load.ok(up_at)) // 4, after  # round robin again: about half each
    assert [e.error for e in load.failures()] == []

