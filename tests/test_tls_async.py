"""TLS on listeners for the ``async`` worker class, under uvloop and asyncio's own loop: handshakes run
and counted by the worker, what a Protocol and a stream handler see, mutual TLS, bad and silent clients,
the PROXY header before the handshake, plain listeners beside TLS ones, SNI, bytes and the drain."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from tlsutil import Pki, client_context, closed_without_answer, echo, tls_connect

from conftest import Daemon, gone, read_line, recv_exact, wait_for
from prefork.proxy_protocol import build_v2

LOOPS = ["uvloop", "asyncio"]
HANDLERS = ["tls_async_handlers:who", "tls_async_handlers:WhoProtocol"]  # a stream handler, a Protocol


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def who(line: bytes) -> dict[str, str]:
    """The handlers' first line (tests/apps/tls_async_handlers.py) by field."""
    return dict(zip(("version", "bits", "alpn", "cn", "host"), line.decode().split(), strict=True))


def tls_stats(d: Daemon) -> dict[str, Any] | None:
    """The ``stats`` reply's TLS counters, None while the daemon does not report them."""
    section: dict[str, Any] | None = d.call("stats").get("tls")
    return section


def wait_failures(d: Daemon, reason: str, count: int) -> None:
    """``count`` handshakes failed for ``reason``: in the log (one line each) and in the counters if reported."""
    words = f"failed ({reason.replace('_', ' ')})"
    wait_for(lambda: d.log().count(words) >= count, 5, f"{count} log line(s) saying {words!r}")
    if tls_stats(d) is not None:
        wait_for(lambda: (tls_stats(d) or {})["failures"][reason] >= count, 5, f"{count} {reason} failure(s) counted")


class CoalescedClient:
    """A TLS client whose first ``send()`` carries ``prefix`` (a PROXY header) and the ClientHello together.

    The handshake runs on memory BIOs, so both are in the server's socket at
    once: a worker that read past the header would eat the ClientHello.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, prefix: bytes, name: str = "localhost") -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=name)
        with contextlib.suppress(ssl.SSLWantReadError):  # it wants the ServerHello, having written its own
            self.tls.do_handshake()
        sock.sendall(prefix + self.outgoing.read())  # one send: the header, then the ClientHello
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.incoming.write(data)

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read_line(self) -> bytes:
        line = b""
        while not line.endswith(b"\n"):
            try:
                line += self.tls.read(1)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        return line


# -- serving -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_echo_over_tls(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str) -> None:
    d = daemon_factory(*pki.server().args(), "-k", "async", "--loop", loop)
    assert d.status()["handler"] == "prefork.handlers.aio:EchoProtocol"
    context = client_context(pki)
    for _ in range(4):  # several connections, both workers
        with tls_connect(d.address(), context) as s:
            assert s.version() == "TLSv1.3"
            assert echo(s) == b"hello\n"
            big = b"x" * (1 << 20)  # 1 MiB through TLS both ways
            s.sendall(big)
            assert recv_exact(s, len(big)) == big
    # a client that asks for TLS 1.2 only gets it
    with tls_connect(d.address(), client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)) as s:
        assert s.version() == "TLSv1.2"
        assert echo(s) == b"hello\n"
    # plain text on the TLS port: closed, counted as not TLS, no one else harmed
    pids = {w["pid"] for w in d.status()["workers"]}
    with d.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_without_answer(s)
    wait_failures(d, "not_tls", 1)
    stats = tls_stats(d)
    if stats is not None:
        assert stats["handshakes"] == 5 and stats["versions"]["TLSv1.2"] == 1, stats
    wait_for(lambda: sum(w["requests"] for w in d.status()["workers"]) == 5, 5, "five connections served")
    st = d.status()
    assert {w["pid"] for w in st["workers"]} == pids
    assert sum(w["active"] for w in st["workers"]) == 0  # the failed handshake is in no handler's count
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("handler", HANDLERS)
def test_handler_sees_the_client_certificate_and_alpn(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str,
                                                      handler: str) -> None:
    d = daemon_factory(*pki.server().args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "optional",
                       "--alpn", "h2,http/1.1", "-k", "async", "--loop", loop, handler)
    context = client_context(pki, pki.client(common_name="alice"), alpn=["http/1.1"])
    with tls_connect(d.address(), context) as s:
        seen = who(read_line(s))
        assert seen == {"version": s.version(), "bits": seen["bits"], "alpn": "http/1.1", "cn": "alice",
                        "host": "127.0.0.1"}
        assert s.selected_alpn_protocol() == "http/1.1"
        assert int(seen["bits"]) >= 128
        assert echo(s) == b"hello\n"
    with tls_connect(d.address(), client_context(pki)) as s:  # optional: no certificate, no ALPN is fine
        seen = who(read_line(s))
        assert (seen["alpn"], seen["cn"]) == ("-", "-")


@pytest.mark.parametrize("loop", LOOPS)
def test_mutual_tls_required(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str) -> None:
    d = daemon_factory(*pki.server().args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "required",
                       "-k", "async", "--loop", loop, "--workers", "1", "tls_async_handlers:WhoProtocol")
    pid = d.status()["workers"][0]["pid"]
    with tls_connect(d.address(), client_context(pki, pki.client(common_name="bob"))) as s:
        assert who(read_line(s))["cn"] == "bob"
    for client in (None, pki.client("mallory", "mallory", wrong_ca=True)):
        # TLS 1.3: the server's verdict on the client's certificate arrives after the client's handshake
        try:
            with tls_connect(d.address(), client_context(pki, client)) as s:
                s.sendall(b"x\n")
                assert closed_without_answer(s)  # closed without a byte, if the alert did not come first
        except ssl.SSLError:
            pass  # an alert, or the connection's end in the middle of the handshake: rejected either way
    wait_failures(d, "certificate", 2)
    st = d.status()
    assert st["workers"][0]["pid"] == pid  # nothing but those connections was harmed
    assert (st["workers"][0]["requests"], st["workers"][0]["active"]) == (1, 0)
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("loop", LOOPS)
def test_stalled_handshake_is_closed_at_its_timeout(daemon_factory: Callable[..., Daemon], pki: Pki,
                                                    loop: str) -> None:
    d = daemon_factory(*pki.server().args(), "-k", "async", "--loop", loop, "--workers", "1",
                       "--tls-handshake-timeout", "1")
    context = client_context(pki)
    with d.connect() as silent, d.connect() as half:
        half.sendall(b"\x16\x03\x01\x00")  # the start of a TLS record, then nothing
        started = time.monotonic()
        for _ in range(5):  # served meanwhile, by the same worker
            with tls_connect(d.address(), context) as s:
                assert echo(s) == b"hello\n"
        assert time.monotonic() - started < 0.9, "served behind the stalled handshakes"
        for stalled in (silent, half):
            stalled.settimeout(10)
            assert closed_without_answer(stalled)  # closed at the handshake timeout
        assert 0.9 < time.monotonic() - started < 6
    wait_failures(d, "timeout", 2)


# -- the PROXY header before the handshake -------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("handler", HANDLERS)
def test_proxy_header_and_client_hello_in_one_send(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str,
                                                   handler: str) -> None:
    d = daemon_factory(*pki.server().args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "optional",
                       "--proxy-protocol", "-k", "async", "--loop", loop, handler)
    context = client_context(pki, pki.client(common_name="carol"))
    with socket.create_connection(d.address(), timeout=5) as raw:
        client = CoalescedClient(raw, context, build_v2(("203.0.113.9", 4242), ("127.0.0.1", d.port)))
        seen = who(client.read_line())
        assert (seen["host"], seen["cn"]) == ("203.0.113.9", "carol")  # the header's source; the certificate
        client.sendall(b"hello\n")
        assert client.read_line() == b"hello\n"
    # a LOCAL header (a balancer's health check with check-ssl) is served, as the real peer
    with socket.create_connection(d.address(), timeout=5) as raw:
        client = CoalescedClient(raw, context, build_v2(None, None, command="LOCAL"))
        assert who(client.read_line())["host"] == "127.0.0.1"
    # no header at all: the ClientHello is not one
    with socket.create_connection(d.address(), timeout=5) as raw, pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(raw, server_hostname="localhost")
    wait_for(lambda: "not a PROXY protocol header" in d.log(), 5, "the missing header in the log")


@pytest.mark.parametrize("loop", LOOPS)
def test_proxy_header_in_pieces_waits_without_spinning(daemon_factory: Callable[..., Daemon], pki: Pki,
                                                       loop: str) -> None:
    d = daemon_factory(*pki.server().args(), "--proxy-protocol", "-k", "async", "--loop", loop, "--workers", "1",
                       "tls_async_handlers:who")
    worker = psutil.Process(d.status()["workers"][0]["pid"])
    header = build_v2(("198.51.100.7", 5555), ("127.0.0.1", d.port))
    with socket.create_connection(d.address(), timeout=5) as raw:
        raw.sendall(header[:10])
        cpu = sum(worker.cpu_times()[:2])
        assert not closed_without_answer_within(raw, 0.3)  # waiting for the rest, not closing
        assert sum(worker.cpu_times()[:2]) - cpu < 0.1, "the worker spun on a partial header"
        client = CoalescedClient(raw, client_context(pki), header[10:])
        assert who(client.read_line())["host"] == "198.51.100.7"
    # a header that never completes is given up at --proxy-timeout (5 s by default: not waited for here)


def closed_without_answer_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes ``sock`` (or sends something) within ``seconds``; False when it waits."""
    sock.settimeout(seconds)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return False
    finally:
        sock.settimeout(5)
    return True


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[[str], tuple[str, int]]]:
    """``start(backend_server_line)``: HAProxy in TCP mode on a loopback port, one server; its address."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(server: str) -> tuple[str, int]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(f"""global
    log stdout format raw local0
defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    {server}
""")
        log_file = open(tmp_path / "haproxy.log", "wb")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log_file, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        log_file.close()

        def accepts() -> bool:
            assert procs[-1].poll() is None, (tmp_path / "haproxy.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(accepts, 10, "HAProxy's frontend to accept")
        return ("127.0.0.1", port)

    yield start
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy")
@pytest.mark.parametrize("loop", LOOPS)
def test_behind_haproxy_send_proxy_v2_over_ssl(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str,
                                                haproxy: Callable[[str], tuple[str, int]]) -> None:
    """HAProxy connects with the PROXY v2 header, then TLS (verifying us, presenting its own certificate)."""
    d = daemon_factory(*pki.server().args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "required",
                       "--proxy-protocol", "-k", "async", "--loop", loop, "tls_async_handlers:who")
    balancer = pki.client("balancer", "the balancer")
    bundle = pki.directory / "balancer-bundle.pem"
    bundle.write_bytes(balancer.cert.read_bytes() + balancer.key.read_bytes())
    front = haproxy(f"server app 127.0.0.1:{d.port} send-proxy-v2 ssl verify required ca-file {pki.ca.cert} "
                    f"sni str(localhost) crt {bundle}")
    for _ in range(3):
        with socket.create_connection(front, timeout=5, source_address=("127.0.0.5", 0)) as s:
            seen = who(read_line(s))
            assert (seen["host"], seen["cn"]) == ("127.0.0.5", "the_balancer")  # the client's; HAProxy's
            assert echo(s) == b"hello\n"
    assert "Traceback" not in d.log()


# -- listeners, certificates -------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_plain_bind_beside_tls_bind(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str) -> None:
    d = daemon_factory("--bind", "127.0.0.1:0", "--tls-bind", "127.0.0.2:0", *pki.server().args(),
                       "-k", "async", "--loop", loop)
    ports = {address.rsplit(":", 1)[0]: int(address.rsplit(":", 1)[1]) for address in d.status()["listeners"]}
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", ports["127.0.0.1"]), timeout=5) as s:
            assert echo(s) == b"hello\n"  # plain
        with tls_connect(("127.0.0.2", ports["127.0.0.2"]), client_context(pki)) as s:
            assert echo(s) == b"hello\n"
    with tls_connect(("127.0.0.2", ports["127.0.0.2"]), client_context(pki)) as s, \
            socket.create_connection(("127.0.0.1", ports["127.0.0.1"]), timeout=5) as plain:
        assert echo(plain, b"plain\n") == b"plain\n"
        assert echo(s, b"secret\n") == b"secret\n"
    wait_for(lambda: sum(w["requests"] for w in d.status()["workers"]) == 8, 5, "eight connections served")


@pytest.mark.parametrize("loop", LOOPS)
def test_sni_picks_the_named_certificate(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str) -> None:
    other = pki.server("other", "other.example", names=("other.example",))
    d = daemon_factory(*pki.server().args(), "--sni", f"other.example={other.cert},{other.key}",
                       "-k", "async", "--loop", loop)
    context = client_context(pki)
    for name, subject in (("localhost", "localhost"), ("other.example", "other.example")):
        with tls_connect(d.address(), context, name=name) as s:
            cert: dict[str, Any] = dict(s.getpeercert() or {})
            assert next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName") == subject
            assert echo(s) == b"hello\n"


# -- counting, the cap, the drain ---------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("handler", HANDLERS)
def test_bytes_and_access_log_of_tls_connections(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str,
                                                 handler: str) -> None:
    d = daemon_factory(*pki.server().args(), "--access-log", "-", "-k", "async", "--loop", loop, "--workers", "1",
                       handler)
    payload = (b"y" * 99 + b"\n") * 1000
    with tls_connect(d.address(), client_context(pki)) as s:
        read_line(s)
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload
    worker = wait_for(lambda: next((w for w in d.status()["workers"] if w["requests"] == 1), None), 5,
                      "the connection counted")
    # the kernel's counts: the payload, its TLS records (up to one per line), the handshake
    assert len(payload) < worker["bytes_in"] < 2 * len(payload), worker
    assert len(payload) < worker["bytes_out"] < 2 * len(payload), worker
    line = wait_for(lambda: next((x for x in d.log().splitlines() if " in=" in x and "127.0.0.1:" in x), None), 5,
                    "an access-log line")
    fields = dict(f.split("=", 1) for f in line.split() if f.startswith(("in=", "out=")))
    assert (int(fields["in"]), int(fields["out"])) == (worker["bytes_in"], worker["bytes_out"]), line
    # the descriptor kept for counting is let go with the connection
    pid = worker["pid"]
    wait_for(lambda: len(psutil.Process(pid).net_connections()) == 1, 5, "only the listening socket left")


@pytest.mark.parametrize("loop", LOOPS)
def test_connection_cap_counts_tls_connections(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str) -> None:
    d = daemon_factory(*pki.server().args(), "-k", "async", "--loop", loop, "--workers", "1",
                       "--max-connections", "2", "tls_async_handlers:WhoProtocol")
    context = client_context(pki)
    held = []
    for _ in range(2):
        s = tls_connect(d.address(), context)
        read_line(s)
        held.append(s)
    wait_for(lambda: d.status()["workers"][0]["active"] == 2, 5, "two connections held")
    with pytest.raises(TimeoutError):  # accepted by the kernel, not taken by the worker at its cap
        tls_connect(d.address(), context, timeout=0.5)
    held.pop().close()
    with tls_connect(d.address(), context) as s:
        assert who(read_line(s))["version"] == s.version()
    held.pop().close()


@pytest.mark.parametrize("loop", LOOPS)
def test_relay_counts_a_tls_clients_bytes(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str) -> None:
    upstream = daemon_factory("-k", "async", "--loop", loop, name="upstream")
    d = daemon_factory(*pki.server().args(), "-k", "async", "--loop", loop, "--workers", "1",
                       "--relay", f"127.0.0.1:{upstream.port}")
    payload = os.urandom(50_000)
    with tls_connect(d.address(), client_context(pki)) as s:
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload
    worker = wait_for(lambda: next((w for w in d.status()["workers"] if w["requests"] == 1), None), 5,
                      "the connection counted")
    assert len(payload) < worker["bytes_in"] < 2 * len(payload), worker  # the TLS client's side, from the kernel
    assert len(payload) < worker["bytes_out"] < 2 * len(payload), worker
    assert worker["errors"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", LOOPS)
def test_reload_drains_an_open_tls_connection(daemon_factory: Callable[..., Daemon], pki: Pki, loop: str) -> None:
    d = daemon_factory(*pki.server().args(), "-k", "async", "--loop", loop, "--workers", "1",
                       "tls_async_handlers:who")
    old = d.status()["workers"][0]["pid"]
    context = client_context(pki)
    established = tls_connect(d.address(), context)
    read_line(established)
    reply = d.call("reload", timeout=30)
    assert reply["ok"], reply
    st = d.wait_serving(1)
    assert d.ready_workers(st)[0]["pid"] != old
    with tls_connect(d.address(), context) as s:  # the new generation serves
        read_line(s)
        assert echo(s, b"new\n") == b"new\n"
    assert psutil.pid_exists(old)  # the old worker waits for its connection
    assert echo(established, b"still here\n") == b"still here\n"
    established.close()
    wait_for(lambda: gone(old), 10,
             "the old worker to leave once its connection closed")


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_tls_listener_pauses_when_out_of_descriptors(loop_kind: str) -> None:
    """The async class accepts on TLS listeners itself: an accept() out of descriptors pauses it
    (readiness is level-triggered: no spinning), then it takes the waiting connection."""
    import errno

    from prefork.listeners import ACCEPT_PAUSE
    from prefork.workers.async_tls import TlsListener
    from prefork.workers.async_worker import new_event_loop

    class Flaky(socket.socket):
        failures = 1
        calls = 0

        def accept(self) -> tuple[socket.socket, Any]:
            Flaky.calls += 1
            if Flaky.failures:
                Flaky.failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return super().accept()

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    flaky = Flaky(fileno=os.dup(listener.fileno()))
    taken: list[tuple[socket.socket, Any]] = []
    failed: list[OSError] = []
    loop = new_event_loop(loop_kind)

    async def scenario() -> float:
        started = asyncio.get_running_loop().time()
        arrived = asyncio.get_running_loop().create_future()

        def take(sock: socket.socket, peer: Any) -> None:
            taken.append((sock, peer))
            arrived.set_result(None)

        server = TlsListener(flaky, take, lambda sock, exc: failed.append(exc) is None)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        await asyncio.wait_for(arrived, 5)
        server.close()
        client.close()
        return asyncio.get_running_loop().time() - started

    try:
        took = loop.run_until_complete(scenario())
    finally:
        loop.close()
        listener.close()
    assert [e.errno for e in failed] == [errno.EMFILE]
    assert len(taken) == 1 and took >= ACCEPT_PAUSE * 0.9  # taken after the pause, not before
    assert Flaky.calls <= 3  # the failed accept, the one that took it, perhaps one finding the queue empty
    taken[0][0].close()
    assert flaky.fileno() == -1  # closing the server closed its descriptor
