"""The relay as a load balancer, end to end through the daemon, under each worker class.

Upstreams here are small servers in the test process that count what they
accept (their own count is the measure, not the relay's), plus a black hole:
a listening socket whose accept queue is full, so a connect to it hangs
until its timeout, as to a host that went away.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tlsutil import Pki

from conftest import Daemon, child_env, preforkctl, recv_exact, wait_for

CLASSES = ["sync", "thread", "async"]
CONNECT_TIMEOUT = 0.5  # --relay-connect-timeout for these tests: what a black hole costs a client


class Upstream:
    """A TCP server on 127.0.0.1 counting its connections: ``echo`` lines back, or ``hold`` them unanswered."""

    def __init__(self, mode: str = "echo", hold: float = 5.0, port: int = 0) -> None:
        self.mode = mode
        self.hold = hold
        self.accepted = 0
        self.open = 0
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.name = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: stop()
            with self.lock:
                self.accepted += 1
                self.open += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(10)
                while data := conn.recv(65536):
                    if self.mode == "hold":
                        self.closing.wait(self.hold)  # unanswered for a while, then closed
                        return
                    conn.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1

    def stop(self) -> None:
        """Close the listening socket: new connections are refused."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone leaves it listening)
        self.sock.close()
        self.thread.join(5)


class BlackHole:
    """A listening socket with its accept queue full: a connect to it hangs (SYNs dropped) until revived."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self.name = f"127.0.0.1:{self.port}"
        self.fillers: list[socket.socket] = []
        for _ in range(4):  # listen(0) queues one; the rest wait for SYN retries, holding nothing
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self.fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.3)
        with pytest.raises(TimeoutError), probe:  # really full: a connect hangs
            probe.connect(("127.0.0.1", self.port))
        self.upstream: Upstream | None = None

    def revive(self) -> Upstream:
        """Its queue drains and it serves again (an echo) on the same port."""
        for filler in self.fillers:
            filler.close()
        self.sock.close()
        self.upstream = Upstream(port=self.port)
        return self.upstream

    def close(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()
        if self.upstream is not None:
            self.upstream.stop()


@pytest.fixture
def servers() -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(mode: str = "echo", **kwargs: Any) -> Upstream:
        made.append(Upstream(mode, **kwargs))
        return made[-1]

    yield make
    for upstream in made:
        upstream.closing.set()
        upstream.stop()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


def relay(daemon_factory: Callable[..., Daemon], worker_class: str, *upstreams: str, workers: int = 1,
          extra: tuple[str, ...] = (), name: str = "relay") -> Daemon:
    args = ["-k", worker_class, "--workers", str(workers), "--relay-connect-timeout", str(CONNECT_TIMEOUT), *extra]
    for upstream in upstreams:
        args += ["--relay", upstream]
    return daemon_factory(*args, name=name)


def ping(d: Daemon, payload: bytes = b"ping\n", timeout: float = 5.0) -> float:
    """One short client: send a line, get it back through the relay, close. Seconds it took."""
    began = time.monotonic()
    with socket.create_connection(d.address(), timeout=timeout) as s:
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload
    return time.monotonic() - began


def upstream_status(d: Daemon, name: str) -> dict[str, Any]:
    found = [u for u in d.status()["upstreams"] if u["name"] == name]
    assert len(found) == 1, d.status()["upstreams"]
    return found[0]


# -- passive health ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_black_holed_upstream_costs_one_client_per_backoff(daemon_factory: Callable[..., Daemon],
                                                             servers: Callable[..., Upstream],
                                                             black_hole: BlackHole, worker_class: str) -> None:
    echo = servers()
    d = relay(daemon_factory, worker_class, black_hole.name, echo.name)
    times: list[tuple[float, float]] = []  # (start, duration) per client, one after the other
    began = time.monotonic()
    while time.monotonic() - began < 3.2 and len(times) < 400:
        start = time.monotonic()
        times.append((start - began, ping(d)))
        if times[-1][1] < CONNECT_TIMEOUT:
            threading.Event().wait(0.02)  # clients spread over the backoff periods, not a synchronisation
    slow = [(start, took) for start, took in times if took >= CONNECT_TIMEOUT * 0.9]
    fast = [took for start, took in times if took < CONNECT_TIMEOUT * 0.9]
    # the first client pays the timeout (and fails over); the half-open tries after each backoff period
    # (1 s, 2 s, ...) are made apart from the clients, who have the other upstream meanwhile
    assert len(slow) == 1, slow
    assert len(fast) >= 20
    assert max(fast) < 0.1 or statistics.quantiles(fast, n=20)[-1] < 0.1, sorted(fast)[-5:]
    hole = upstream_status(d, black_hole.name)
    assert hole["state"] in ("down", "half-open") and hole["failed"]["timeout"] == len(slow)
    assert hole["checks"] >= 1  # the half-open try after the first backoff
    assert hole["failovers"] == len(slow) and hole["state_changes"] == 1
    assert upstream_status(d, echo.name)["connections"] == len(times)
    assert d.log().count(f"upstream {black_hole.name} is down") == 1  # logged once, whichever worker saw it
    # it comes back: its queue drains, and it is used again once its backoff is over
    revived = black_hole.revive()
    deadline = time.monotonic() + 10
    while revived.accepted == 0 and time.monotonic() < deadline:
        ping(d)
        threading.Event().wait(0.05)
    assert revived.accepted >= 1
    wait_for(lambda: upstream_status(d, black_hole.name)["state"] == "up", 5, "the upstream up again")
    assert f"upstream {black_hole.name} is up again" in d.log()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_refusing_upstream_is_invisible_to_clients(daemon_factory: Callable[..., Daemon],
                                                     servers: Callable[..., Upstream], worker_class: str) -> None:
    gone = servers()
    gone.stop()  # its port now refuses
    echo = servers()
    d = relay(daemon_factory, worker_class, gone.name, echo.name, workers=2)
    for _ in range(30):
        assert ping(d) < 1.0  # every client relayed: none sees the refusal
    assert echo.accepted == 30
    stats = {u["name"]: u for u in d.call("stats")["upstreams"]}
    assert stats[gone.name]["failed"]["refused"] >= 1 and stats[gone.name]["connections"] == 0
    assert stats[gone.name]["failed"]["refused"] == stats[gone.name]["failovers"]
    assert d.call("stats")["errors"] == 0


# -- balancing ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_least_connections_counted_over_every_worker(daemon_factory: Callable[..., Daemon],
                                                     servers: Callable[..., Upstream], worker_class: str) -> None:
    busy, free = servers("hold", hold=5.0), servers()
    d = relay(daemon_factory, worker_class, busy.name, free.name, workers=4)
    held: list[socket.socket] = []
    try:
        for _ in range(20):
            s = socket.create_connection(d.address(), timeout=5)
            s.sendall(b"x\n")
            s.settimeout(0.3)
            try:
                assert recv_exact(s, 2) == b"x\n"
                s.close()
            except TimeoutError:
                held.append(s)  # went to the busy one, which holds it unanswered
            # the relay counts a connection open until both ends are closed: the next client comes after
            wait_for(lambda: upstream_status(d, free.name)["active"] == 0, 5, "the free upstream idle")
        # the first went to the busy upstream (a tie, and it is listed first); then it always had one more
        assert busy.accepted == 1, (busy.accepted, free.accepted)
        assert free.accepted == 19
        workers = [w for w in d.status()["workers"] if w["requests"] or w["active"]]
        assert len(workers) >= 2 or worker_class == "sync"  # several workers took part, sharing the counts
    finally:
        for s in held:
            s.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_weights_share_short_connections(daemon_factory: Callable[..., Daemon], servers: Callable[..., Upstream],
                                         worker_class: str) -> None:
    heavy, light = servers(), servers()
    d = relay(daemon_factory, worker_class, f"{heavy.name},weight=3", f"{light.name},weight=1", workers=4)
    for _ in range(400):
        ping(d)  # one after the other: the previous connection is often still closing as the next comes
    assert abs(heavy.accepted - 300) <= 30 and abs(light.accepted - 100) <= 30, (heavy.accepted, light.accepted)
    weights = {u["name"]: u["weight"] for u in d.status()["upstreams"]}
    assert weights == {heavy.name: 3, light.name: 1}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_backup_is_used_only_while_every_primary_is_down(daemon_factory: Callable[..., Daemon],
                                                           servers: Callable[..., Upstream],
                                                           worker_class: str) -> None:
    first, second, backup = servers(), servers(), servers()
    d = relay(daemon_factory, worker_class, first.name, second.name, f"{backup.name},backup", workers=2)
    for _ in range(20):
        ping(d)
    assert (first.accepted + second.accepted, backup.accepted) == (20, 0)
    first.stop()
    for _ in range(10):
        ping(d)
    assert backup.accepted == 0  # one primary is still up
    second.stop()
    for _ in range(10):
        assert ping(d) < 1.0  # refused primaries fail over at once
    assert backup.accepted == 10
    # a primary comes back: once its backoff is over, a client tries it and the backup is left again
    back = servers(port=second.port)
    deadline = time.monotonic() + 10
    while back.accepted == 0 and time.monotonic() < deadline:
        ping(d)
        threading.Event().wait(0.05)
    assert back.accepted == 1
    used = backup.accepted
    for _ in range(10):
        ping(d)
    assert backup.accepted == used and back.accepted == 11
    assert upstream_status(d, backup.name)["backup"] is True


@pytest.mark.parametrize("worker_class", ["thread", "async"])
def test_maxconn_sends_the_client_over_it_to_the_next(daemon_factory: Callable[..., Daemon],
                                                      servers: Callable[..., Upstream], worker_class: str) -> None:
    capped, other = servers("hold", hold=5.0), servers()
    d = relay(daemon_factory, worker_class, f"{capped.name},maxconn=2,weight=100", other.name, workers=2)
    held = []
    try:
        for _ in range(2):
            s = socket.create_connection(d.address(), timeout=5)
            s.sendall(b"x\n")
            held.append(s)
            count = len(held)
            wait_for(lambda: capped.accepted == count, 5, "the capped upstream to take it")  # noqa: B023
        wait_for(lambda: upstream_status(d, capped.name)["active"] == 2, 5, "two open to the capped one")
        for _ in range(5):
            ping(d)  # over the cap: the next upstream, at once
        assert (capped.accepted, other.accepted) == (2, 5)
        assert upstream_status(d, capped.name)["maxconn"] == 2
        assert {u["name"]: u for u in d.call("stats")["upstreams"]}[capped.name]["over_maxconn"] == 5
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("worker_class", ["thread", "async"])
def test_a_client_over_every_cap_is_closed_at_once(daemon_factory: Callable[..., Daemon],
                                                   servers: Callable[..., Upstream], worker_class: str) -> None:
    capped = servers("hold", hold=5.0)
    d = relay(daemon_factory, worker_class, f"{capped.name},maxconn=1", workers=2)
    with socket.create_connection(d.address(), timeout=5) as first:
        first.sendall(b"x\n")
        wait_for(lambda: upstream_status(d, capped.name)["active"] == 1, 5, "the one connection it takes")
        began = time.monotonic()
        # closed at once: EOF, or RST for the unread line
        with socket.create_connection(d.address(), timeout=5) as second, contextlib.suppress(ConnectionResetError):
            second.sendall(b"y\n")
            assert second.recv(1) == b""
        assert time.monotonic() - began < 1.0
        # the capped upstream's accept loop may not have run yet for the one connection it took
        wait_for(lambda: capped.accepted >= 1, 5, "the capped upstream to accept the first connection")
    assert capped.accepted == 1
    wait_for(lambda: "cannot connect upstream: every upstream is down or at its maxconn" in d.log(), 5,
             "the reason logged")


# -- visible -----------------------------------------------------------------------------------------------


def test_status_and_prometheus_show_each_upstream(daemon_factory: Callable[..., Daemon],
                                                  servers: Callable[..., Upstream]) -> None:
    gone = servers()
    gone.stop()
    echo = servers()
    d = relay(daemon_factory, "thread", gone.name, f"{echo.name},weight=2", workers=2)
    for _ in range(4):
        ping(d)
    wait_for(lambda: upstream_status(d, echo.name)["active"] == 0, 5, "the last relay closed")
    status = {u["name"]: u for u in d.status()["upstreams"]}
    assert list(status) == [gone.name, echo.name]
    down, up = status[gone.name], status[echo.name]
    assert (down["state"], up["state"]) == ("down", "up")
    assert down["since"] is not None and abs(down["since"] - time.time()) < 30 and 0 < down["retry_in_s"] <= 1
    assert (down["failures"], down["failed"]["refused"], down["state_changes"]) == (1, 1, 1)
    assert (up["weight"], up["backup"], up["maxconn"], up["active"], up["connections"]) == (2, False, 0, 0, 4)
    assert up["last_check"] is None and up["check_latency_ms"] is None  # no active checks
    text = d.ctl("status").stdout
    assert f"upstream {gone.name}: down since " in text and f"upstream {echo.name}: up (weight 2)" in text
    stats_text = d.ctl("stats").stdout
    assert (f"upstream {gone.name}: down, 0 relayed, 0 open, failed 1 (refused 1, timeout 0, tls 0, other 0), "
            "failovers 1, over maxconn 0, state changes 1, checks 0 (0 failed)") in stats_text
    prometheus = preforkctl("--control", d.control, "stats", "--format", "prometheus").stdout
    assert f'prefork_upstream_up{{upstream="{gone.name}"}} 0' in prometheus
    assert f'prefork_upstream_up{{upstream="{echo.name}"}} 1' in prometheus
    assert f'prefork_upstream_connections_total{{upstream="{echo.name}"}} 4' in prometheus
    assert f'prefork_upstream_failures_total{{upstream="{gone.name}",reason="refused"}} 1' in prometheus
    assert f'prefork_upstream_failovers_total{{upstream="{gone.name}"}} 1' in prometheus
    assert f'prefork_upstream_state_changes_total{{upstream="{gone.name}"}} 1' in prometheus
    assert f'prefork_upstream_weight{{upstream="{echo.name}"}} 2' in prometheus


# -- reload ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_reload_that_removes_an_upstream_lets_its_relays_finish(tmp_path: Path,
                                                                  daemon_factory: Callable[..., Daemon],
                                                                  servers: Callable[..., Upstream],
                                                                  worker_class: str) -> None:
    kept, removed = servers(), servers()
    config = tmp_path / "relay.toml"

    def write(*upstreams: str) -> None:
        config.write_text(f'bind = "127.0.0.1:0"\nworkers = 2\nworker-class = "{worker_class}"\n'
                          f'graceful-timeout = 30\nrelay = {list(upstreams)!r}\n'.replace("'", '"'))

    write(removed.name, kept.name)
    d = daemon_factory("--config", str(config), workers=None, bind_default=False)
    generation = d.status()["generation"]
    held = []
    deadline = time.monotonic() + 10
    while removed.accepted == 0 and time.monotonic() < deadline:  # a relayed connection to the one removed
        s = socket.create_connection(d.address(), timeout=5)
        s.sendall(b"before\n")
        assert recv_exact(s, 7) == b"before\n"
        held.append(s)
    assert removed.accepted == 1
    write(f"{kept.name},weight=2")
    d.signal(signal.SIGHUP)  # the reply to a "reload" command would wait for the old workers to finish
    wait_for(lambda: (st := d.status())["generation"] > generation and len(
        [w for w in d.ready_workers(st) if w["generation"] > generation]) == 2, 20, "the new generation serving")
    assert [(u["name"], u["weight"]) for u in d.status()["upstreams"]] == [(kept.name, 2)]
    for s in held:  # established relays go on, the removed upstream's included
        s.sendall(b"after\n")
        assert recv_exact(s, 6) == b"after\n"
        s.close()
    accepted = removed.accepted
    for _ in range(10):
        ping(d)
    assert removed.accepted == accepted  # new connections never go to it


# -- active checks -----------------------------------------------------------------------------------------


def checked_upstream(daemon_factory: Callable[..., Daemon], *args: str, name: str) -> Daemon:
    """A prefork echo upstream that expects a PROXY header first (as behind HAProxy with send-proxy)."""
    return daemon_factory("-k", "async", "--workers", "1", "--proxy-protocol", *args, name=name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_active_checks_send_a_proxy_local_header(daemon_factory: Callable[..., Daemon],
                                                 black_hole: BlackHole, worker_class: str) -> None:
    upstream = checked_upstream(daemon_factory, name="upstream")
    d = relay(daemon_factory, worker_class, f"127.0.0.1:{upstream.port}", black_hole.name, workers=2,
              extra=("--relay-send-proxy", "--relay-check-interval", "0.2"))
    wait_for(lambda: upstream_status(d, black_hole.name)["state"] == "down", 10, "the black hole checked down")
    good = wait_for(lambda: (u := upstream_status(d, f"127.0.0.1:{upstream.port}"))["checks"] >= 3 and u, 10,
                    "checks of the good one")
    assert good["state"] == "up" and good["check_ok"] is True and 0 < good["check_latency_ms"] < 1000
    assert good["checks_failed"] == 0 and good["last_check"] is not None
    assert upstream.call("stats")["proxy_errors"] == 0  # the LOCAL header was taken as one
    # clients are never sent to the black hole: with checks, the check is the half-open try
    for _ in range(10):
        assert ping(d) < 0.4
    hole = upstream_status(d, black_hole.name)
    assert hole["connections"] == 0 and hole["failed"]["timeout"] == 0 and hole["checks_failed"] >= 1
    # once per interval over all workers (claimed in shared memory), not once per worker each
    began, first = time.monotonic(), upstream_status(d, f"127.0.0.1:{upstream.port}")["checks"]
    wait_for(lambda: time.monotonic() - began >= 2.0, 5, "two seconds of checks")
    checks = upstream_status(d, f"127.0.0.1:{upstream.port}")["checks"] - first
    assert 3 <= checks <= (time.monotonic() - began) / 0.2 + 2, checks


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_active_checks_over_tls(daemon_factory: Callable[..., Daemon], tmp_path: Path, worker_class: str) -> None:
    pki = Pki(tmp_path / "pki")
    issued = pki.server()
    wrong = pki.other_ca.issue("other", "localhost", names=("localhost", "127.0.0.1"))
    tls = ("--certfile", str(issued.cert), "--keyfile", str(issued.key))
    good = checked_upstream(daemon_factory, *tls, name="good")
    bad = checked_upstream(daemon_factory, "--certfile", str(wrong.cert), "--keyfile", str(wrong.key), name="bad")
    d = relay(daemon_factory, worker_class, f"127.0.0.1:{good.port}", f"127.0.0.1:{bad.port}", workers=2,
              extra=("--relay-send-proxy", "--relay-tls", "--relay-ca-certs", str(pki.ca.cert),
                     "--relay-check-interval", "0.2"))
    wait_for(lambda: upstream_status(d, f"127.0.0.1:{bad.port}")["state"] == "down", 10,
             "the upstream with the wrong CA checked down")
    ok = wait_for(lambda: (u := upstream_status(d, f"127.0.0.1:{good.port}"))["checks"] >= 2 and u, 10,
                  "checks of the good one")
    assert ok["state"] == "up" and ok["check_ok"] is True
    assert "certificate verify failed" in d.log()
    assert good.call("stats")["proxy_errors"] == 0
    for _ in range(5):
        assert ping(d) < 1.0
    assert upstream_status(d, f"127.0.0.1:{bad.port}")["connections"] == 0


def test_options_are_checked(tmp_path: Path) -> None:
    for args, message in (
        (["--relay", "127.0.0.1:1,weight=0"], "weight must be 1-256"),
        (["--relay", "127.0.0.1:1,heavy"], "unknown option 'heavy'"),
        (["--relay", "127.0.0.1:1", "--relay", "127.0.0.1:1,weight=2"], "127.0.0.1:1 is given twice"),
        (["--relay", "127.0.0.1:1", "--relay-check-interval", "-1"], "relay-check-interval: -1"),
        (["--relay", "127.0.0.1:1", "--relay-slow-start", "-1"], "relay-slow-start: -1"),
        (["--relay", "127.0.0.1:1", "--relay-check-send", "x"], "relay-check-send: needs --relay-check-interval"),
        (["--relay", "127.0.0.1:1", "--relay-check-interval", "1", "--relay-check-expect", r"\q"],
         "unknown escape"),
    ):
        done = subprocess.run([sys.executable, "-m", "prefork", "--check-config", *args], capture_output=True,
                              text=True, timeout=30, cwd=tmp_path, env=child_env())
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str], int]]:
    """Start a real HAProxy from a frontend's ``bind`` options (to an echo upstream); its port."""
    procs: list[subprocess.Popen[bytes]] = []
    echoes: list[Upstream] = []

    def start(bind_options: str) -> int:
        echoes.append(Upstream())
        port = free_port()
        stats = tmp_path / f"haproxy{len(procs)}.sock"
        config = tmp_path / f"haproxy{len(procs)}.cfg"
        config.write_text(f"global\n    stats socket {stats} mode 600 level admin\n"
                          "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
                          "    timeout server 30s\n"
                          f"frontend f\n    bind 127.0.0.1:{port} {bind_options}\n    default_backend b\n"
                          f"backend b\n    server echo {echoes[-1].name}\n")
        procs.append(subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for(lambda: stats.exists() or procs[-1].poll() is not None, 10, "HAProxy to start")
        assert procs[-1].poll() is None, "HAProxy exited"
        return port

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for echo in echoes:
        echo.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_active_checks_against_haproxy_expecting_proxy_then_tls(daemon_factory: Callable[..., Daemon],
                                                                haproxy: Callable[[str], int], tmp_path: Path,
                                                                worker_class: str) -> None:
    """HAProxy's ``accept-proxy ssl``: the check's PROXY LOCAL header must be read as one for the TLS
    handshake after it to work; without the header the same check fails."""
    pki = Pki(tmp_path / "pki")
    issued = pki.server()
    pem = tmp_path / "haproxy.pem"
    pem.write_bytes(Path(issued.cert).read_bytes() + Path(issued.key).read_bytes())
    port = haproxy(f"accept-proxy ssl crt {pem}")
    name = f"127.0.0.1:{port}"
    tls = ("--relay-tls", "--relay-ca-certs", str(pki.ca.cert), "--relay-check-interval", "0.2")
    d = relay(daemon_factory, worker_class, name, workers=2, extra=("--relay-send-proxy", *tls))
    checked = wait_for(lambda: (u := upstream_status(d, name))["checks"] >= 3 and u, 10, "three checks")
    assert (checked["state"], checked["check_ok"], checked["checks_failed"]) == ("up", True, 0)
    assert ping(d) < 1.0  # and clients go through it: PROXY v2 header, TLS, HAProxy, the echo
    without = relay(daemon_factory, worker_class, name, workers=1, extra=tls, name="without")
    failed = wait_for(lambda: (u := upstream_status(without, name))["checks_failed"] >= 1 and u, 10,
                      "a check without the header to fail")
    assert failed["state"] == "down" and failed["check_ok"] is False


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", ["thread", "async"])
def test_active_checks_send_and_expect(daemon_factory: Callable[..., Daemon], servers: Callable[..., Upstream],
                                       worker_class: str) -> None:
    """An upstream that accepts but never answers passes a connect check; not one that expects an answer."""
    echo, mute = servers(), servers("hold", hold=30.0)
    d = relay(daemon_factory, worker_class, echo.name, mute.name, workers=2,
              extra=("--relay-check-interval", "0.2", "--relay-check-send", r"PING\r\n",
                     "--relay-check-expect", "PING"))
    wait_for(lambda: upstream_status(d, mute.name)["state"] == "down", 10, "the mute upstream checked down")
    ok = wait_for(lambda: (u := upstream_status(d, echo.name))["checks"] >= 2 and u, 10, "checks of the echo")
    assert (ok["state"], ok["check_ok"], ok["checks_failed"]) == ("up", True, 0)
    assert f"check {mute.name} (exchange: timed out after {CONNECT_TIMEOUT:g}s)" in d.log()
    for _ in range(5):
        assert ping(d) < 0.4  # never sent to the mute one
    assert upstream_status(d, mute.name)["connections"] == 0
