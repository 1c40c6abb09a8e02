"""TLS on listeners, for the socketserver worker classes: handshakes in the worker's loop, what the
handler sees, mutual TLS, bad input, and certificates that fail at start or are rotated on reload."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from tlsutil import Issued, Pki, client_context, closed_without_answer, echo
from tlsutil import tls_connect as connect_tls

from conftest import Daemon, child_env, read_line, wait_for
from prefork.proxy_protocol import build_v2
from prefork.workers.connection import handshake_begun

CLASSES = ["sync", "thread"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def tls_connect(d: Daemon, context: ssl.SSLContext, *, port: int | None = None, name: str = "localhost",
                timeout: float = 5.0) -> ssl.SSLSocket:
    return connect_tls(("127.0.0.1", port or d.port), context, name=name, timeout=timeout)


def presented(d: Daemon, pki: Pki, *, port: int | None = None, name: str = "localhost") -> str:
    """The subject's CN of the certificate the daemon presents to a client asking for ``name``."""
    with tls_connect(d, client_context(pki), port=port, name=name) as s:
        cert = s.getpeercert() or {}
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")


@pytest.mark.parametrize("worker_class", CLASSES)
def test_echo_over_tls(daemon_factory: Callable[..., Daemon], pki: Pki, worker_class: str) -> None:
    d = daemon_factory(*pki.server().args(), "-k", worker_class)
    context = client_context(pki)
    for _ in range(5):  # several connections, several workers
        with tls_connect(d, context) as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            assert echo(s) == b"hello\n"
            big = os.urandom(256 * 1024).hex().encode() + b"\n"  # 512 KiB through TLS both ways
            s.sendall(big)
            got = b""
            while len(got) < len(big):
                chunk = s.recv(65536)
                assert chunk, "connection closed early"
                got += chunk
            assert got == big
    # plain TCP on the TLS port is not echoed
    with d.connect() as s:
        s.sendall(b"hello\n")
        assert closed_without_answer(s)


@pytest.mark.parametrize("worker_class", CLASSES)
def test_handler_sees_version_alpn_and_client_certificate(daemon_factory: Callable[..., Daemon], pki: Pki,
                                                          worker_class: str) -> None:
    d = daemon_factory(*pki.server().args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "optional",
                       "--alpn", "h2,echo/1", "-k", worker_class, "tls_handlers:WhoHandler")
    with tls_connect(d, client_context(pki, pki.client(common_name="alice"), alpn=["echo/1"])) as s:
        version, bits, alpn, cn, host = read_line(s).decode().split()
        assert (version, alpn, cn, host) == (s.version(), "echo/1", "alice", "127.0.0.1")
        assert int(bits) >= 128
        assert echo(s) == b"hello\n"
    with tls_connect(d, client_context(pki)) as s:  # optional: no certificate is fine
        assert read_line(s).decode().split()[2:4] == ["-", "-"]


@pytest.mark.parametrize("worker_class", CLASSES)
def test_mutual_tls_required(daemon_factory: Callable[..., Daemon], pki: Pki, worker_class: str) -> None:
    d = daemon_factory(*pki.server().args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "required",
                       "-k", worker_class, "--workers", "1", "tls_handlers:WhoHandler")
    pid = d.status()["workers"][0]["pid"]
    with tls_connect(d, client_context(pki, pki.client(common_name="bob"))) as s:
        assert read_line(s).decode().split()[3] == "bob"
    for client in (None, pki.client("mallory", "mallory", wrong_ca=True)):
        # TLS 1.3: the server's verdict on the client's certificate arrives after the client's handshake
        try:
            with tls_connect(d, client_context(pki, client)) as s:
                s.sendall(b"x\n")
                assert closed_without_answer(s)  # closed without a byte, if the alert did not come first
        except ssl.SSLError:
            pass  # an alert, or the connection's end in the middle of the handshake: rejected either way
    wait_for(lambda: d.log().count("failed (certificate)") >= 2, 5, "two certificate failures in the log")
    assert d.status()["workers"][0]["pid"] == pid  # nothing but those connections was harmed
    assert "Traceback" not in d.log()


def test_stalled_handshake_does_not_hold_a_sync_worker(daemon_factory: Callable[..., Daemon], pki: Pki) -> None:
    d = daemon_factory(*pki.server().args(), "-k", "sync", "--workers", "1", "--tls-handshake-timeout", "2")
    context = client_context(pki)
    with d.connect() as silent, d.connect() as half:
        half.sendall(b"\x16\x03\x01\x00")  # the start of a TLS record, then nothing
        started = time.monotonic()
        for _ in range(5):
            with tls_connect(d, context) as s:
                assert echo(s) == b"hello\n"
        assert time.monotonic() - started < 1.5, "served behind the stalled handshakes"
        assert not select.select([silent, half], [], [], 0)[0], "closed before their timeout"
        for stalled in (silent, half):
            stalled.settimeout(10)
            assert stalled.recv(10) == b""  # closed at the handshake timeout
        assert 1.5 < time.monotonic() - started < 8
    wait_for(lambda: d.log().count("failed (timeout)") == 2, 5, "two handshake timeouts in the log")


@pytest.mark.parametrize("worker_class", CLASSES)
def test_plain_text_on_a_tls_port_is_closed(daemon_factory: Callable[..., Daemon], pki: Pki,
                                            worker_class: str) -> None:
    d = daemon_factory(*pki.server().args(), "-k", worker_class, "--workers", "1")
    pid = d.status()["workers"][0]["pid"]
    with d.connect() as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert closed_without_answer(s)
    wait_for(lambda: "failed (not tls)" in d.log(), 5, "a log line about plain text on the TLS port")
    with tls_connect(d, client_context(pki)) as s:
        assert echo(s) == b"hello\n"
    assert d.status()["workers"][0]["pid"] == pid


@pytest.mark.parametrize("worker_class", CLASSES)
def test_proxy_header_comes_before_the_handshake(daemon_factory: Callable[..., Daemon], pki: Pki,
                                                 worker_class: str) -> None:
    d = daemon_factory(*pki.server().args(), "--proxy-protocol", "-k", worker_class, "tls_handlers:WhoHandler")
    context = client_context(pki)
    raw = socket.create_connection(d.address(), timeout=5)
    # the header and the ClientHello in one segment: the worker must not read past the header
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    raw.sendall(build_v2(("203.0.113.9", 4242), ("127.0.0.1", d.port)))
    with context.wrap_socket(raw, server_hostname="localhost") as s:
        assert read_line(s).decode().split()[4] == "203.0.113.9"
        assert echo(s) == b"hello\n"
    # a LOCAL header (a balancer's health check with check-ssl) is served too
    raw = socket.create_connection(d.address(), timeout=5)
    raw.sendall(build_v2(None, None, command="LOCAL"))
    with context.wrap_socket(raw, server_hostname="localhost") as s:
        assert read_line(s).decode().split()[4] == "127.0.0.1"


def test_plain_and_tls_listeners_side_by_side(daemon_factory: Callable[..., Daemon], pki: Pki,
                                              tmp_path: Path) -> None:
    other = pki.server("other", "other.example", names=("other.example",))
    server = pki.server()
    config = tmp_path / "listeners.toml"
    config.write_text(f"""
bind = ["127.0.0.1:0"]
[[listener]]
bind = "127.0.0.2:0"
certfile = "{server.cert}"
keyfile = "{server.key}"
[[listener]]
bind = "127.0.0.3:0"
certfile = "{other.cert}"
keyfile = "{other.key}"
tls-min-version = "1.3"
""")
    d = daemon_factory("-c", str(config), bind_default=False)
    ports = {address.rsplit(":", 1)[0]: int(address.rsplit(":", 1)[1]) for address in d.status()["listeners"]}
    with socket.create_connection(("127.0.0.1", ports["127.0.0.1"]), timeout=5) as s:
        assert echo(s) == b"hello\n"
    context = client_context(pki)
    for host, subject in (("127.0.0.2", "localhost"), ("127.0.0.3", "other.example")):
        raw = socket.create_connection((host, ports[host]), timeout=5)
        with context.wrap_socket(raw, server_hostname=subject) as s:
            assert echo(s) == b"hello\n"
    # the second TLS listener takes TLS 1.3 only
    old = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    raw = socket.create_connection(("127.0.0.3", ports["127.0.0.3"]), timeout=5)
    with pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname="other.example")
    raw.close()
    wait_for(lambda: "failed (version)" in d.log(), 5, "a log line about the TLS version")


def test_sni_chooses_the_certificate(daemon_factory: Callable[..., Daemon], pki: Pki) -> None:
    named = pki.server("named", "api.example", names=("api.example",))
    wildcard = pki.server("wild", "*.apps.example", names=("*.apps.example",))
    d = daemon_factory(*pki.server().args(), "--sni", f"api.example={named.cert},{named.key}",
                       "--sni", f"*.apps.example={wildcard.cert},{wildcard.key}")
    assert presented(d, pki) == "localhost"
    assert presented(d, pki, name="api.example") == "api.example"
    assert presented(d, pki, name="one.apps.example") == "*.apps.example"


# -- bad certificates and keys at start: exit 2, one line ------------------------------------------------


def run_prefork(*args: str, timeout: float = 30, user: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "prefork", "--bind", "127.0.0.1:0", "--control", "/nonexistent/x.sock", *args]
    if user:  # as nobody: root reads any file
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=child_env(), cwd="/")


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefork: error: "), proc.stderr
    return lines[0]


def test_key_that_is_not_the_certificates(pki: Pki) -> None:
    server, other = pki.server(), pki.server("other")
    line = one_line_error(run_prefork("--certfile", str(server.cert), "--keyfile", str(other.key)))
    assert str(server.cert) in line and str(other.key) in line and "do not match" in line


@pytest.mark.parametrize(("make", "words"), [
    (lambda pki: pki.server("old", days=1, not_before_days=-5).args(), "expired on"),
    (lambda pki: pki.server("early", not_before_days=3).args(), "not valid before"),
    (lambda pki: ["--certfile", str(pki.directory / "missing.pem")], "no such file"),
    (lambda pki: ["--certfile", str(pki.ca.cert)], "needs the certificate and its private key"),
    (lambda pki: pki.server("locked", password=b"secret").args(), "--keyfile-password-file"),
    (lambda pki: [*pki.server().args(), "--cert-reqs", "required"], "needs --ca-certs"),
    (lambda pki: [*pki.server().args(), "--ca-certs", str(pki.server().key), "--cert-reqs", "required"],
     "no CA certificate in it"),
    (lambda pki: [*pki.server().args(), "--ciphers", "NOT-A-CIPHER"], "no cipher matches"),
    (lambda pki: ["--keyfile", str(pki.server().key)], "needs --certfile"),
    (lambda pki: ["--tls-bind", "127.0.0.1:0"], "needs --certfile"),
    (lambda pki: [*pki.server().args(), "--sni", "bad name=x.pem"], "not a server name"),
])
def test_bad_tls_settings_at_start(pki: Pki, make: Callable[[Pki], list[str]], words: str) -> None:
    assert words in one_line_error(run_prefork(*make(pki)))


def test_passphrase_from_a_file(daemon_factory: Callable[..., Daemon], pki: Pki) -> None:
    locked = pki.server("locked", password=b"open sesame")
    wrong = pki.directory / "wrong.txt"
    wrong.write_text("open sesame?\n")
    line = one_line_error(run_prefork(*locked.args(), "--keyfile-password-file", str(wrong)))
    assert str(wrong) in line and "passphrase" in line
    right = pki.directory / "pass.txt"
    right.write_text("open sesame\n")
    d = daemon_factory(*locked.args(), "--keyfile-password-file", str(right))
    with tls_connect(d, client_context(pki)) as s:
        assert echo(s) == b"hello\n"


def test_unreadable_key(pki: Pki) -> None:
    server = pki.server()
    shared = Path(tempfile.mkdtemp(prefix="prefork-tls-"))  # a directory everyone may traverse
    try:
        shared.chmod(0o755)
        cert, key = shutil.copy(server.cert, shared), shutil.copy(server.key, shared)
        os.chmod(cert, 0o644)
        os.chmod(key, 0o600)  # root's only
        line = one_line_error(run_prefork("--certfile", cert, "--keyfile", key, user=True))
    finally:
        shutil.rmtree(shared)
    assert key in line and "permission denied" in line


# -- rotation ----------------------------------------------------------------------------------------


def _load(d: Daemon, pki: Pki, stop: threading.Event, results: dict[str, int]) -> None:
    """Handshake and echo in a loop until ``stop``: count ok and failed ones (bounded by the test)."""
    context = client_context(pki)
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with tls_connect(d, context) as s:
                assert echo(s) == b"hello\n"
            results["ok"] += 1
        except (OSError, AssertionError) as exc:
            results["failed"] += 1
            results.setdefault("first", str(exc))  # type: ignore[arg-type]


@pytest.fixture
def load_threads() -> Iterator[Callable[..., dict[str, int]]]:
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(d: Daemon, pki: Pki, n: int = 3) -> dict[str, int]:
        results = {"ok": 0, "failed": 0}
        for _ in range(n):
            thread = threading.Thread(target=_load, args=(d, pki, stop, results), daemon=True)
            thread.start()
            threads.append(thread)
        return results

    yield start
    stop.set()
    for thread in threads:
        thread.join(10)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_class", [*CLASSES, "async"])
def test_reload_rotates_the_certificate_without_a_failed_handshake(
        daemon_factory: Callable[..., Daemon], pki: Pki, load_threads: Callable[..., dict[str, int]],
        worker_class: str) -> None:
    live = Issued(pki.directory / "live.pem", pki.directory / "live.key", "")
    first = pki.server("first", "localhost")
    shutil.copy(first.cert, live.cert)
    shutil.copy(first.key, live.key)
    d = daemon_factory(*live.args(), "-k", worker_class)
    context = client_context(pki)
    # (a sync worker serving a connection answers SIGTERM only after it: the reload's reply would wait)
    established = tls_connect(d, context) if worker_class != "sync" else None
    with tls_connect(d, context) as s:
        serial = s.getpeercert()["serialNumber"]  # type: ignore[index]
    results = load_threads(d, pki)
    wait_for(lambda: results["ok"] >= 20, 20, "handshakes under load")
    # renew: a new certificate and key at the same paths, as certbot would
    second = pki.server("second", "localhost")
    shutil.copy(second.cert, live.cert)
    shutil.copy(second.key, live.key)
    reply = d.call("reload", timeout=30)
    assert reply["ok"], reply
    with tls_connect(d, context) as s:
        assert s.getpeercert()["serialNumber"] != serial  # type: ignore[index]
    before = results["ok"]
    wait_for(lambda: results["ok"] >= before + 20, 20, "handshakes after the reload")
    if established is not None:
        assert echo(established, b"still here\n") == b"still here\n"  # the old connection carries on
        established.close()
    assert results["failed"] == 0, results


@pytest.mark.parametrize("breakage", ["key", "expired"])
def test_a_broken_certificate_fails_the_reload_and_the_old_one_serves(daemon_factory: Callable[..., Daemon],
                                                                      pki: Pki, breakage: str) -> None:
    live = Issued(pki.directory / "live.pem", pki.directory / "live.key", "")
    server = pki.server()
    shutil.copy(server.cert, live.cert)
    shutil.copy(server.key, live.key)
    d = daemon_factory(*live.args())
    generation = d.status()["generation"]
    if breakage == "key":
        shutil.copy(pki.server("other").key, live.key)  # the certificate renewed without its key
        words = "do not match"
    else:
        expired = pki.server("expired", days=1, not_before_days=-2)  # an old certificate put back
        shutil.copy(expired.cert, live.cert)
        shutil.copy(expired.key, live.key)
        words = "expired on"
    reply = d.call("reload", timeout=30)
    assert not reply["ok"] and words in reply["error"] and str(live.cert) in reply["error"], reply
    ctl = d.ctl("reload")
    assert ctl.returncode != 0 and words in ctl.stdout + ctl.stderr
    assert len((ctl.stdout + ctl.stderr).strip().splitlines()) == 1
    st = d.status()
    assert st["generation"] == generation and st["state"] == "serving"
    with tls_connect(d, client_context(pki)) as s:
        assert echo(s) == b"hello\n"


def test_upgrade_reads_the_certificates_again(daemon_factory: Callable[..., Daemon], pki: Pki) -> None:
    """A new master program (USR2, ``preforkctl upgrade``) loads the certificates on disk, on the same sockets."""
    live = Issued(pki.directory / "live.pem", pki.directory / "live.key", "")
    first, second = pki.server("first"), pki.server("second")
    shutil.copy(first.cert, live.cert)
    shutil.copy(first.key, live.key)
    d = daemon_factory(*live.args())
    with tls_connect(d, client_context(pki)) as s:
        serial = s.getpeercert()["serialNumber"]  # type: ignore[index]
    shutil.copy(second.cert, live.cert)
    shutil.copy(second.key, live.key)
    upgraded = d.ctl("upgrade", timeout=60)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    with tls_connect(d, client_context(pki)) as s:
        assert s.getpeercert()["serialNumber"] != serial  # type: ignore[index]
        assert echo(s) == b"hello\n"


@pytest.mark.parametrize(("worker_class", "handler"), [
    ("sync", "hardening_handlers:CloseServerSocket"),
    ("thread", "hardening_handlers:CloseServerSocket"),
    ("async", "hardening_handlers:CloseListeners"),
    ("async-asyncio", "hardening_handlers:CloseListeners"),
])
def test_a_tls_listener_closed_under_its_worker(daemon_factory: Callable[..., Daemon], pki: Pki,
                                                worker_class: str, handler: str) -> None:
    """A TLS listener's descriptor closed by a handler: the worker logs it once, retires without spinning
    (the async class accepts on TLS listeners itself), and its replacement serves TLS."""
    loop = ["--loop", "asyncio"] if worker_class == "async-asyncio" else []
    d = daemon_factory(*pki.server().args(), "-k", worker_class.split("-")[0], *loop, "--timeout", "2", handler,
                       workers=1)
    victim = d.status()["workers"][0]["pid"]
    process = psutil.Process(victim)
    cpu = [sum(process.cpu_times()[:2])]
    context = client_context(pki)
    with tls_connect(d, context) as s:
        assert echo(s, b"close\n") == b"close\n"
        assert echo(s, b"still\n") == b"still\n"  # the connection itself is served on

    def replaced() -> bool:
        with contextlib.suppress(psutil.NoSuchProcess):
            cpu.append(sum(process.cpu_times()[:2]))  # its CPU while it lives on: no spinning
        st = d.status()
        return bool(d.ready_workers(st)) and all(w["pid"] != victim for w in st["workers"])

    wait_for(replaced, 15, "the worker to retire and a replacement to serve")
    with tls_connect(d, context) as s:
        assert echo(s) == b"hello\n"
    gone = [line for line in d.log().splitlines() if f"(pid {victim}): listening socket" in line]
    assert len(gone) == 1 and "is gone" in gone[0], d.log()
    assert "Traceback" not in d.log()
    assert cpu[-1] - cpu[0] < 0.5, f"the retiring worker used {cpu[-1] - cpu[0]:.2f}s of CPU"


def handshake_then_garbage(address: tuple[str, int], context: ssl.SSLContext) -> bytes:
    """A real handshake (through memory BIOs, so the socket stays ours), an echo, then a record of garbage
    the server cannot decrypt; what the server sends back until it closes."""
    sock = socket.create_connection(address, timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(b"hello\n")
        sock.sendall(outgoing.read())
        sock.sendall(b"\x17\x03\x03\x00\x20" + b"not a record of this session!!!!")  # application data, forged
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


@pytest.mark.parametrize("worker_class", ["sync", "thread", "async"])
def test_garbage_after_the_handshake_is_one_line(daemon_factory: Callable[..., Daemon], pki: Pki,
                                                 worker_class: str) -> None:
    d = daemon_factory(*pki.server().args(), "-k", worker_class, "-w", "1")
    answer = handshake_then_garbage(("127.0.0.1", d.port), client_context(pki))
    assert answer  # the echo came back, then the server closed
    if worker_class != "async":  # asyncio's own transport closes it at debug level
        wait_for(lambda: "TLS error after the handshake" in d.log(), 10, "one line about the broken record")
    with connect_tls(("127.0.0.1", d.port), client_context(pki)) as again:
        assert echo(again) == b"hello\n"  # still serving
    assert "Traceback" not in d.log(), d.log()
    assert d.call("stats")["worker_crashes"] == 0


# -- a connection that ends before its handshake begins ------------------------------------------------

EVERY_CLASS = {"sync": "tls_handlers:WhoHandler", "thread": "tls_handlers:WhoHandler",
               "async": "tls_async_handlers:WhoProtocol"}


def _reset(sock: socket.socket) -> None:
    """Close with a reset, as HAProxy ends a check or a forward it gave up on."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _client_hello(pki: Pki) -> bytes:
    bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = client_context(pki).wrap_bio(bio_in, bio_out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls_object.do_handshake()
    return bio_out.read()


def test_handshake_begun_is_the_first_byte_peeked_not_taken() -> None:
    """The one rule every worker class asks: True with a byte waiting, None with none yet, False once ended."""
    open_clients: list[socket.socket] = []  # kept open until the checks are done

    def ending_with(how: str) -> socket.socket:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), timeout=5)
            server, _ = listener.accept()
        server.setblocking(False)
        if how == "a byte":
            client.sendall(b"\x16")
            open_clients.append(client)
            select.select([server], [], [], 5)  # bounded wait for the byte (loopback: at once)
        elif how == "fin":
            client.close()
        elif how == "reset":
            _reset(client)
        else:
            open_clients.append(client)
        if how in ("fin", "reset"):  # bounded wait for the kernel to see the end (loopback: at once)
            select.select([server], [], [], 5)
        return server

    table = [("nothing yet", None), ("a byte", True), ("fin", False), ("reset", False)]
    for how, expected in table:
        server = ending_with(how)
        with server:
            assert handshake_begun(server) is expected, how
            if expected:
                assert server.recv(1) == b"\x16", "the peeked byte stays for OpenSSL"
    for client in open_clients:
        client.close()


@pytest.mark.parametrize("proxied", [False, True], ids=["plain", "proxy"])
@pytest.mark.parametrize("worker_class", list(EVERY_CLASS))
def test_a_connection_ended_before_its_first_tls_byte_is_not_a_failed_handshake(
        daemon_factory: Callable[..., Daemon], pki: Pki, worker_class: str, proxied: bool) -> None:
    """A TCP check, a port probe or a forward HAProxy dropped: no handshake began, so none failed; one that began
    and was cut (a check past HAProxy's timeout) is a failed handshake (closed), in every worker class alike."""
    d = daemon_factory(*pki.server().args(), *(["--proxy-protocol"] if proxied else []), "--workers", "1",
                       "-k", worker_class, EVERY_CLASS[worker_class])
    header = build_v2(None, None, command="LOCAL") if proxied else b""  # HAProxy's check sends one
    for end in (socket.socket.close, _reset, socket.socket.close, _reset):
        s = d.connect()
        s.sendall(header)
        end(s)
    began = d.connect()
    began.sendall(header + _client_hello(pki))
    assert began.recv(1), "the server's first flight"
    _reset(began)  # before the client's Finished
    wait_for(lambda: d.call("stats")["tls"]["failed"] >= 1, 10, "the cut handshake counted")
    raw = d.connect()  # the worker serves on, and after the connections above
    raw.sendall(header)
    with client_context(pki).wrap_socket(raw, server_hostname="localhost") as s:
        assert read_line(s).split()[0] in (b"TLSv1.2", b"TLSv1.3")
    tls_stats = d.call("stats")["tls"]
    assert tls_stats["failed"] == 1 and tls_stats["failures"]["closed"] == 1, tls_stats
    assert d.log().count("TLS handshake with") == 1, d.log()
