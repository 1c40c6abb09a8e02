"""No client can take the pool: idle, slow and hostile clients against every worker class, on default settings.

Each test holds an attack open, then a probe client on another source address (127.0.0.2) must get its echo
within a second. Attackers connect from 250 addresses (127.0.0.3 - 127.0.0.252).
"""

from __future__ import annotations

import contextlib
import re
import resource
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_cli import free_port
from tlsutil import Pki, client_context, echo, tls_connect

from conftest import Daemon, child_env, recv_exact, wait_for
from prefork.handlers.relay_loops import MAX_HOPS
from prefork.proxy_protocol import PP2_TYPE_PREFORK_VIA, build_v2

CLASSES = ["thread", "sync", "async"]
PROBE_SOURCE = "127.0.0.2"
DaemonFactory = Callable[..., Daemon]
SOURCES = [f"127.0.0.{i}" for i in range(3, 253)]  # 250 addresses


@pytest.fixture(autouse=True)
def enough_descriptors() -> Iterator[None]:
    """The attacks hold a few thousand sockets in this process: raise the soft limit (bounded by the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect_from(source: str, port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


@contextlib.contextmanager
def attackers(port: int, count: int, sources: list[str] = SOURCES) -> Iterator[list[socket.socket]]:
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        for i in range(count):
            assert time.monotonic() < deadline, f"only {i} of {count} attack connections in 30 s"
            held.append(connect_from(sources[i % len(sources)], port))
        yield held
    finally:
        for s in held:
            s.close()


def probe(d: Daemon, payload: bytes = b"probe\n", within: float = 1.0) -> float:
    """One echo from 127.0.0.2; returns how long it took, failing the test past ``within`` seconds."""
    started = time.monotonic()
    with connect_from(PROBE_SOURCE, d.port, timeout=within + 1) as s:
        s.sendall(payload)
        got = recv_exact(s, len(payload))
    took = time.monotonic() - started
    assert got == payload
    assert took <= within, f"the probe's echo took {took:.2f}s"
    return took


def silence(d: Daemon) -> tuple[int, float]:
    """(open connections, the oldest silent one's age) as ``stats`` shows them."""
    stats = d.call("stats")
    return int(stats["active"]), float(stats["oldest_silent_s"])


def attack_held(d: Daemon, count: int, silent_for: float = 0.7) -> None:
    """Wait until the daemon took all ``count`` attack connections (each held open, or closed for a counted
    reason such as reclaimed) and holds one silent for ``silent_for`` seconds: the attack has settled."""
    def settled() -> bool:
        stats = d.call("stats")
        taken = int(stats["active"]) + sum(stats["closed"].values())
        return taken >= count and float(stats["oldest_silent_s"]) >= silent_for

    wait_for(settled, 15, f"{count} attack connections taken, one silent for {silent_for}s")


def closed(d: Daemon, reason: str) -> int:
    return int(d.call("stats").get("closed", {}).get(reason, 0))


@pytest.mark.parametrize("worker_class", CLASSES)
def test_idle_connections(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    with attackers(d.port, 1000):
        attack_held(d, 1000)  # idle connections old enough to be anyone's first choice
        for _ in range(3):
            probe(d)


@pytest.mark.parametrize("worker_class", CLASSES)
def test_echo_then_silent(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    with attackers(d.port, 500) as held:
        for s in held:
            s.sendall(b"x\n")
        # every one has its echo (some only after others were reclaimed): all of them were served once
        deadline = time.monotonic() + 30
        for s in held:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                s.recv(2)
        for _ in range(3):
            probe(d)


@pytest.mark.parametrize("worker_class", CLASSES)
def test_slowloris(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    with attackers(d.port, 1000) as held:
        started = time.monotonic()
        for s in held:
            with contextlib.suppress(OSError):
                s.send(b"G")
        probe(d)
        wait_for(lambda: time.monotonic() - started >= 5, 6, "five seconds of the attack")
        for s in held:  # a byte every 5 s
            with contextlib.suppress(OSError):
                s.send(b"E")
        probe(d)
        probe(d)


@pytest.mark.parametrize("worker_class", CLASSES)
def test_zero_window(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class)
    held: list[socket.socket] = []
    try:
        chunk = b"z" * 65536
        for i in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
            s.bind((SOURCES[i % len(SOURCES)], 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", d.port))
            s.setblocking(False)
            held.append(s)
        for s in held:  # up to 1 MB each, as much as the server takes without reading its replies
            sent = 0
            while sent < 1 << 20:
                try:
                    sent += s.send(chunk)
                except (BlockingIOError, OSError):
                    break
        attack_held(d, 200)
        for _ in range(3):
            probe(d)
    finally:
        for s in held:
            s.close()


def test_slow_legitimate_client_is_never_closed(daemon_factory: DaemonFactory) -> None:
    daemons = {k: daemon_factory("-k", k, name=f"slow-{k}") for k in CLASSES}
    clients = {k: connect_from(PROBE_SOURCE, d.port) for k, d in daemons.items()}
    try:
        for i in range(10):  # a line every 2 s for 20 s
            started = time.monotonic()
            for k, s in clients.items():
                line = f"line {i} to {k}\n".encode()
                s.sendall(line)
                assert recv_exact(s, len(line)) == line
            wait_for(lambda started=started: time.monotonic() - started >= 2, 3, "two seconds")
    finally:
        for s in clients.values():
            s.close()
    for k, d in daemons.items():
        assert closed(d, "idle_timeout") == 0 and closed(d, "reclaimed") == 0, k


@pytest.mark.parametrize("args", [("-k", "thread"), ("-k", "sync"), ("-k", "async", "async_handlers:upper_stream"),
                                  ("-k", "async")], ids=["thread", "sync", "async", "async-echo-engine"])
def test_idle_timeout_ends_an_unchanged_handler(daemon_factory: DaemonFactory, args: tuple[str, ...]) -> None:
    d = daemon_factory(*args, "--idle-timeout", "1")
    with connect_from(PROBE_SOURCE, d.port) as talked, connect_from(PROBE_SOURCE, d.port) as silent:
        talked.sendall(b"hello\n")
        assert recv_exact(talked, 6).lower() == b"hello\n"  # (the async handler answers in upper case)
        # both closed by the worker: the one in its handler's recv() (it sees end of file), the one never handed
        assert talked.recv(10) == b""
        assert silent.recv(10) == b""
    wait_for(lambda: closed(d, "idle_timeout") >= 2, 5, "two idle timeouts counted")
    assert d.call("stats")["errors"] == 0
    if args[1] != "async" or len(args) == 2:
        probe(d)
    assert re.search(r"closed [12] connection\(s\): nothing received for the idle timeout", d.log()), d.log()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_per_source_limit(daemon_factory: DaemonFactory, worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--max-connections-per-source", "8")
    held: list[socket.socket] = []
    try:
        for _ in range(500):
            held.append(connect_from("127.0.0.9", d.port))
        wait_for(lambda: closed(d, "per_source") >= 492, 10, "492 connections over the limit closed")
        probe(d)
        # the 492 closed at accept, and any of the 8 reclaimed for the probe, see the end; the rest are open
        ended = 0
        for s in held:
            if select.select([s], [], [], 0.2 if ended < 492 else 0)[0]:
                with contextlib.suppress(OSError):
                    ended += s.recv(1) == b""
        assert ended == 492 + closed(d, "reclaimed")
        assert closed(d, "reclaimed") <= 1
    finally:
        for s in held:
            s.close()
    assert closed(d, "per_source") == 492


@pytest.mark.parametrize("worker_class", CLASSES)
def test_stalled_tls_handshakes(daemon_factory: DaemonFactory, tmp_path: Path, worker_class: str) -> None:
    pki = Pki(tmp_path / "pki")
    d = daemon_factory(*pki.server().args(), "-k", worker_class)
    context = client_context(pki)
    with attackers(d.port, 2000):  # TCP connects that never send a ClientHello
        for _ in range(3):
            started = time.monotonic()
            raw = connect_from(PROBE_SOURCE, d.port)
            with context.wrap_socket(raw, server_hostname="localhost") as s:
                assert echo(s, b"probe\n") == b"probe\n"
            took = time.monotonic() - started
            assert took <= 1.0, f"the TLS probe took {took:.2f}s"
        with tls_connect(d.address(), context) as s:
            assert echo(s) == b"hello\n"
        if worker_class != "async":  # at most 256 unfinished handshakes per worker: the oldest gave way
            wait_for(lambda: closed(d, "handshake_dropped") >= 2000 - 2 * 256, 10, "the oldest handshakes dropped")


def test_relay_to_itself_is_refused_at_start_and_on_reload(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    port = free_port()
    started = subprocess.run([sys.executable, "-m", "prefork", "--control", str(tmp_path / "x.sock"),
                              "--bind", f"127.0.0.1:{port}", "--relay", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=30, env=child_env(), cwd=str(tmp_path))
    assert started.returncode != 0
    assert started.stderr.count("\n") == 1, started.stderr
    assert f"relay: 127.0.0.1:{port} is this instance's own listener 127.0.0.1:{port}" in started.stderr
    config = tmp_path / "prefork.toml"
    config.write_text(f'bind = "127.0.0.1:{port}"\nworkers = 1\n')
    d = daemon_factory("--config", str(config), workers=None, bind_default=False)
    config.write_text(f'bind = "127.0.0.1:{port}"\nworkers = 1\nrelay = ["localhost:{port}"]\n')
    reload = d.ctl("reload")
    assert reload.returncode == 1 and "it would relay to itself" in reload.stderr, reload
    assert d.status()["generation"] == 1
    assert recv_after(d, b"still echo\n") == b"still echo\n"


def recv_after(d: Daemon, payload: bytes) -> bytes:
    with connect_from(PROBE_SOURCE, d.port) as s:
        s.sendall(payload)
        return recv_exact(s, len(payload))


def test_idle_connections_async_under_a_low_descriptor_limit(daemon_factory: DaemonFactory) -> None:
    """At 1,024 descriptors the built-in echo runs out: the connections silent longest give way."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the daemon inherits it
    try:
        d = daemon_factory("-k", "async")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with attackers(d.port, 2500):
        attack_held(d, 2500, silent_for=0.3)  # the quietest gave way when the workers ran out of descriptors
        for _ in range(3):
            probe(d)
        assert closed(d, "reclaimed") >= 1


@pytest.mark.parametrize("worker_class", ["thread", "async"])  # (sync serves one at a time: no two held)
def test_per_source_limit_counts_the_proxy_header_client(daemon_factory: DaemonFactory, tmp_path: Path,
                                                          worker_class: str) -> None:
    """Behind a balancer (PROXY header, then TLS) the client the header names is the one counted."""
    pki = Pki(tmp_path / "pki")
    d = daemon_factory(*pki.server().args(), "-k", worker_class, "--proxy-protocol",
                       "--max-connections-per-source", "2")
    context = client_context(pki)

    def through_balancer(client: str) -> ssl.SSLSocket:
        raw = connect_from(PROBE_SOURCE, d.port)
        raw.sendall(build_v2((client, 4242), ("127.0.0.1", d.port)))
        return context.wrap_socket(raw, server_hostname="localhost")

    held = [through_balancer("203.0.113.9") for _ in range(2)]
    try:
        for s in held:
            assert echo(s) == b"hello\n"
        with through_balancer("203.0.113.9") as third:  # the same client, a third time: closed
            third.settimeout(5)
            with contextlib.suppress(OSError):
                assert echo(third) == b""
        wait_for(lambda: closed(d, "per_source") == 1, 5, "one connection over the limit counted")
        with through_balancer("203.0.113.10") as other:  # another client behind the same balancer
            assert echo(other) == b"hello\n"
    finally:
        for s in held:
            s.close()



@pytest.mark.parametrize("args", [("-k", "sync"), ("-k", "thread"), ("-k", "async", "async_handlers:upper_stream"),
                                  ("-k", "async")], ids=["sync", "thread", "async", "async-echo-engine"])
@pytest.mark.parametrize("idle_timeout", ["0", "60"])
def test_stats_show_the_oldest_silent_connection(daemon_factory: DaemonFactory, args: tuple[str, ...],
                                                 idle_timeout: str) -> None:
    """Every class (and the built-in echo's engine) keeps the figure, with or without an idle timeout."""
    d = daemon_factory(*args, "--idle-timeout", idle_timeout, workers=1)
    assert silence(d) == (0, 0.0)
    with connect_from(PROBE_SOURCE, d.port) as s:
        s.sendall(b"first\n")
        assert recv_exact(s, 6).lower() == b"first\n"
        # silent from here: the figure shows it and grows
        first = wait_for(lambda: (got := silence(d))[0] == 1 and got[1] >= 1.5 and got, 5, "a silence of 1.5 s")
        wait_for(lambda: silence(d)[1] >= first[1] + 1.0, 5, "the silence to grow by a second")
        s.sendall(b"again\n")  # it speaks: no longer silent (the figure follows within a tick)
        assert recv_exact(s, 6).lower() == b"again\n"
        wait_for(lambda: silence(d)[1] < 1.0, 5, "the figure to follow the client that spoke")
    wait_for(lambda: silence(d) == (0, 0.0), 5, "no open connection, no silence")


@pytest.mark.parametrize(("worker_class", "tls"), [("thread", False), ("async", False), ("sync", False),
                                                  ("thread", True), ("async", True)],
                         ids=["thread", "async", "sync", "thread-tls", "async-tls"])
def test_a_relay_loop_through_another_instance_is_cut(daemon_factory: DaemonFactory, tmp_path: Path,
                                                      worker_class: str, tls: bool) -> None:
    """A relays to B and B to A, each reading the other's PROXY header: a client's connection is closed at once
    (the header that comes back names the instance it left), counted, and neither pool fills. With TLS both
    ways (TLS listeners, --relay-tls) the header is read before the handshake, as ever."""
    pki = Pki(tmp_path / "pki")
    tls_args = (*pki.server().args(), "--relay-tls", "--relay-ca-certs", str(pki.ca.cert)) if tls else ()
    ports = {"a": free_port(), "b": free_port()}
    daemons = {
        name: daemon_factory("-k", worker_class, "--bind", f"127.0.0.1:{ports[name]}", *tls_args,
                             "--relay", f"127.0.0.1:{ports[other]}", "--relay-send-proxy",
                             "--proxy-protocol", "--proxy-allow", "127.0.0.1/32", name=name)  # (clients: 127.0.0.2)
        for name, other in (("a", "b"), ("b", "a"))}
    context = client_context(pki)

    def client(port: int) -> socket.socket:
        raw = connect_from(PROBE_SOURCE, port, timeout=2)
        return context.wrap_socket(raw, server_hostname="localhost") if tls else raw

    for _ in range(20):
        for port in ports.values():
            started = time.monotonic()
            # (TLS: a reset, or an end without close_notify, is a close too)
            with client(port) as s, contextlib.suppress(ConnectionError, ssl.SSLError):
                s.sendall(b"anyone there?\n")
                assert recv_exact(s, 1) == b"", "a looping connection answered"
            took = time.monotonic() - started
            assert took <= 1.0, f"the looping connection was closed after {took:.2f}s"
    # every loop cut where it came back (with TLS, a relay whose TLS upstream fails that way soon takes it
    # for down and stops trying it: fewer loops to cut)
    assert sum(closed(d, "relay_loop") for d in daemons.values()) >= (1 if tls else 40)
    for d in daemons.values():  # every hop of every loop is gone: nothing holds a place
        wait_for(lambda d=d: d.call("stats")["active"] == 0, 5, "no connection left open")
    assert "came back through a relay loop" in daemons["a"].log() + daemons["b"].log()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_header_naming_too_many_relays_is_cut(daemon_factory: DaemonFactory, worker_class: str) -> None:
    """A loop that also runs through other proxies never comes back to one daemon's id: the hop limit cuts it."""
    d = daemon_factory("-k", worker_class, "--proxy-protocol")

    def through_relays(hops: int) -> bytes:
        via = b"".join(bytes([i]) * 8 for i in range(hops))
        with connect_from(PROBE_SOURCE, d.port) as s:
            s.sendall(build_v2(("203.0.113.9", 4242), ("127.0.0.1", d.port), tlvs=[(PP2_TYPE_PREFORK_VIA, via)]))
            s.sendall(b"hello\n")
            return recv_exact(s, 6)

    assert through_relays(MAX_HOPS - 1) == b"hello\n"
    assert through_relays(MAX_HOPS) == b""
    wait_for(lambda: closed(d, "relay_loop") == 1, 5, "the cut counted")


@pytest.mark.parametrize("args", [("-k", "thread", "--threads", "2"), ("-k", "sync"),
                                  ("-k", "async", "--max-connections", "2", "async_handlers:upper_stream")],
                         ids=["thread", "sync", "async"])
def test_reclaim_off_lets_silent_clients_hold_every_place_until_the_idle_timeout(
        daemon_factory: DaemonFactory, args: tuple[str, ...]) -> None:
    """--reclaim-idle-after 0: nothing is closed to make room; the idle timeout is what frees the places."""
    d = daemon_factory(*args, "--reclaim-idle-after", "0", "--idle-timeout", "3", workers=1)
    with connect_from(SOURCES[0], d.port) as first, connect_from(SOURCES[1], d.port) as second:
        attack_held(d, 2, silent_for=0.5)
        started = time.monotonic()
        with connect_from(PROBE_SOURCE, d.port) as s:
            s.sendall(b"probe\n")
            assert not select.select([s], [], [], 1.0)[0], "answered while silent clients held every place"
            s.settimeout(10)
            assert recv_exact(s, 6).lower() == b"probe\n"
        took = time.monotonic() - started
        assert first.recv(10) == b"" and second.recv(10) == b""  # the idle timeout closed them
    assert took >= 3.0 - 1.0, f"served after {took:.2f}s, before the silent ones' idle timeout"
    assert closed(d, "reclaimed") == 0 and closed(d, "idle_timeout") >= 2
