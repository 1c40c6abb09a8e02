"""The relay and TLS, both ways: it terminates TLS (a TLS listener), originates it (--relay-tls), or both.

Real daemons relay under every worker class (``sync``, ``thread``, ``async``)
to upstreams that are threads of this test (plain or TLS, each written to
show one thing: an echo, a banner then EOF, a reply after EOF, a PROXY header
captured), or a prefork daemon with ``--certfile``. The PROXY v2 SSL TLV is
checked as a pure function, read back through :func:`prefork.proxy_protocol.parse`
with a decoder of its own written here from the spec, and against the TLV
HAProxy's ``send-proxy-v2-ssl-cn`` sends for the same client. A real HAProxy
also checks and uses the TLS relay as a server (``ssl verify required``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import re
import selectors
import shutil
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import termios
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tlsutil import Issued, Pki, client_context
from tlsutil import tls_connect as connect_tls

from conftest import Daemon, haproxy_admin, haproxy_serving, recv_exact, wait_for
from prefork.handlers import relay as relay_module
from prefork.handlers import relay_core
from prefork.handlers.relay import RelayHandler
from prefork.handlers.relay_core import ClientTls
from prefork.proxy_protocol import PP2_TYPE_ALPN, PP2_TYPE_PREFORK_VIA, PP2_TYPE_SSL, ProxyHeader, parse, read_header

CLASSES = ["sync", "thread", "async"]
HALF_CLOSES = {"sync", "thread"}  # the socketserver form passes a half-close to a TLS side; asyncio's TLS cannot
MiB = 1 << 20


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


# -- the SSL TLV, decoded from the spec (proxy-protocol.txt 2.2.5), independently of relay_core ------------


@dataclass(frozen=True)
class SslTlv:
    client: int
    verify: int
    subs: dict[int, bytes]


def decode_ssl_tlv(value: bytes) -> SslTlv:
    """``struct pp2_tlv_ssl { uint8_t client; uint32_t verify; struct pp2_tlv sub_tlv[0]; }``."""
    assert len(value) >= 5, value
    subs: dict[int, bytes] = {}
    offset = 5
    while offset < len(value):
        kind, length = value[offset], int.from_bytes(value[offset + 1:offset + 3], "big")
        assert offset + 3 + length <= len(value), f"sub-TLV 0x{kind:02x} runs past the TLV"
        assert kind not in subs, f"sub-TLV 0x{kind:02x} twice"
        subs[kind] = value[offset + 3:offset + 3 + length]
        offset += 3 + length
    return SslTlv(value[0], int.from_bytes(value[1:5], "big"), subs)


def ssl_tlv_of(header: ProxyHeader) -> SslTlv:
    found = [value for kind, value in header.tlvs if kind == PP2_TYPE_SSL]
    assert len(found) == 1, header.tlvs
    return decode_ssl_tlv(found[0])


# -- pure: relay_core ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tls", "client", "verify", "subs"), [
    (ClientTls("TLSv1.3", "TLS_AES_256_GCM_SHA384"), 0x01, 1,
     {0x21: b"TLSv1.3", 0x23: b"TLS_AES_256_GCM_SHA384"}),
    (ClientTls("TLSv1.3", "TLS_AES_128_GCM_SHA256", common_name="client one", certificate=True), 0x07, 0,
     {0x21: b"TLSv1.3", 0x22: b"client one", 0x23: b"TLS_AES_128_GCM_SHA256"}),
    # a resumed session: the certificate came with the session, not on this connection
    (ClientTls("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", common_name="c", certificate=True, resumed=True), 0x05,
     0, {0x21: b"TLSv1.2", 0x22: b"c", 0x23: b"ECDHE-ECDSA-AES128-GCM-SHA256"}),
    # a certificate without a CN: flags and verify say so, no CN sub-TLV
    (ClientTls("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", certificate=True), 0x07, 0,
     {0x21: b"TLSv1.3", 0x23: b"TLS_CHACHA20_POLY1305_SHA256"}),
    (ClientTls(None, None), 0x01, 1, {}),
    (ClientTls("TLSv1.3", "X", common_name="zoë ✓"), 0x01, 1,
     {0x21: b"TLSv1.3", 0x22: "zoë ✓".encode(), 0x23: b"X"}),
])
def test_ssl_tlv_as_the_spec_writes_it(tls: ClientTls, client: int, verify: int, subs: dict[int, bytes]) -> None:
    decoded = decode_ssl_tlv(relay_core.ssl_tlv(tls))
    assert decoded == SslTlv(client, verify, subs)


def test_ssl_tlv_bytes_exactly() -> None:
    tls = ClientTls("TLSv1.3", "TLS_AES_128_GCM_SHA256", common_name="cn", certificate=True)
    assert relay_core.ssl_tlv(tls) == (b"\x07" + b"\x00\x00\x00\x00"
                                       + b"\x21\x00\x07TLSv1.3" + b"\x22\x00\x02cn"
                                       + b"\x23\x00\x16TLS_AES_128_GCM_SHA256")


def test_proxy_header_with_tls_round_trips_through_the_parser() -> None:
    tls = ClientTls("TLSv1.3", "TLS_AES_256_GCM_SHA384", common_name="client one", certificate=True, alpn="h2")
    header = parse(relay_core.proxy_header(("192.0.2.7", 40000), ("198.51.100.1", 443), tls))
    assert header is not None
    assert (header.command, header.source, header.destination) == ("PROXY", ("192.0.2.7", 40000),
                                                                     ("198.51.100.1", 443))
    assert [kind for kind, _ in header.tlvs] == [PP2_TYPE_ALPN, PP2_TYPE_SSL, PP2_TYPE_PREFORK_VIA]
    assert header.tlvs[0] == (PP2_TYPE_ALPN, b"h2")
    assert ssl_tlv_of(header) == SslTlv(0x07, 0, {0x21: b"TLSv1.3", 0x22: b"client one",
                                                  0x23: b"TLS_AES_256_GCM_SHA384"})
    # mixed families are written IPv4-mapped, TLVs and all
    header = parse(relay_core.proxy_header(("192.0.2.7", 1), ("2001:db8::1", 443), tls))
    assert header is not None and header.source == ("::ffff:c000:207", 1) and len(header.tlvs) == 3
    # no TLS: only the relays the connection came through (relay_loops); not IP: a LOCAL header, which carries none
    header = parse(relay_core.proxy_header(("192.0.2.7", 1), ("192.0.2.8", 2)))
    assert header is not None and [kind for kind, _ in header.tlvs] == [PP2_TYPE_PREFORK_VIA]
    header = parse(relay_core.proxy_header("/run/relay.sock", "/run/relay.sock", tls))
    assert header is not None and header.command == "LOCAL" and header.tlvs == ()


def test_a_very_long_common_name_is_cut_not_refused() -> None:
    header = parse(relay_core.proxy_header(("192.0.2.7", 1), ("192.0.2.8", 2),
                                           ClientTls("TLSv1.3", "X", common_name="n" * 70000, certificate=True)))
    assert header is not None
    assert ssl_tlv_of(header).subs[0x22] == b"n" * 1024


def test_client_tls_read_from_a_real_handshake(pki: Pki) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server = pki.server()
    server_context.load_cert_chain(server.cert, server.key)
    server_context.load_verify_locations(pki.ca.cert)
    server_context.verify_mode = ssl.CERT_OPTIONAL
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    for client, cn in ((pki.client(), "client one"), (None, None)):
        a, b = socket.socketpair()
        with a, b:
            a.settimeout(10)
            b.settimeout(10)
            done: queue.SimpleQueue[Any] = queue.SimpleQueue()
            thread = threading.Thread(target=lambda sock=a, out=done: out.put(
                server_context.wrap_socket(sock, server_side=True)))
            thread.start()
            with client_context(pki, client, alpn=["h2"]).wrap_socket(b, server_hostname="localhost") as c:
                thread.join(10)
                with done.get(timeout=10) as s:
                    tls = ClientTls.of(s)
                    assert tls == ClientTls(s.version(), c.cipher()[0], common_name=cn,  # type: ignore[index]
                                            certificate=client is not None, resumed=False, alpn="h2")


def test_server_name_is_the_configured_one_or_the_host() -> None:
    assert relay_core.server_name(None, "db.example") == "db.example"
    assert relay_core.server_name("api.example", "10.0.0.1") == "api.example"
    assert relay_core.server_name(None, "10.0.0.1") == "10.0.0.1"


def handshake_error(pki: Pki, issued: Issued, name: str) -> ssl.SSLError:
    """What a verifying client raises against a server presenting ``issued``, asking for ``name``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(issued.cert, issued.key)
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(10)
        b.settimeout(10)
        thread = threading.Thread(target=_quiet_accept, args=(server_context, a))
        thread.start()
        try:
            client_context(pki).wrap_socket(b, server_hostname=name)
        except ssl.SSLError as exc:
            return exc
        finally:
            thread.join(10)
    raise AssertionError("the handshake succeeded")


def _quiet_accept(context: ssl.SSLContext, sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        context.wrap_socket(sock, server_side=True)


def test_tls_failures_in_words(pki: Pki) -> None:
    wrong_ca = pki.other_ca.issue("other", "localhost", names=("localhost", "127.0.0.1"))
    assert relay_core.reason(handshake_error(pki, wrong_ca, "localhost")) == \
        "certificate verify failed: unable to get local issuer certificate"
    assert relay_core.reason(handshake_error(pki, pki.server(), "wrong.example")) == \
        "certificate verify failed: Hostname mismatch, certificate is not valid for 'wrong.example'"
    assert relay_core.reason(handshake_error(pki, pki.server(), "10.9.9.9")) == \
        "certificate verify failed: IP address mismatch, certificate is not valid for '10.9.9.9'"
    assert relay_core.reason(ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)")) == \
        "EOF occurred in violation of protocol"
    assert relay_core.reason(ssl.SSLError(1, "[SSL: APPLICATION_DATA_AFTER_CLOSE_NOTIFY] application data after "
                                             "close notify (_ssl.c:2706)")) == "application data after close notify"
    assert relay_core.attempt_failed(("127.0.0.1", 7000), handshake_error(pki, wrong_ca, "localhost"), 5.0,
                                     stage="TLS handshake") == \
        "127.0.0.1:7000 (TLS handshake: certificate verify failed: unable to get local issuer certificate)"
    assert relay_core.attempt_failed(("127.0.0.1", 7000), TimeoutError(), 2.0, stage="TLS handshake") == \
        "127.0.0.1:7000 (TLS handshake: timed out after 2s)"


# -- test upstreams: threads of this test ------------------------------------------------------------------


Serve = Callable[[socket.socket, "Upstream"], None]


class Upstream:
    """A TCP server on 127.0.0.1 in threads: optionally reads a PROXY header, optionally speaks TLS, then ``serve``.

    ``headers`` gets each PROXY header read, ``reports`` what ``serve``
    functions put there, ``errors`` anything that went wrong in a thread.
    """

    def __init__(self, serve: Serve, context: ssl.SSLContext | None = None, proxy: bool = False) -> None:
        self.serve = serve
        self.context = context
        self.proxy = proxy
        self.headers: queue.SimpleQueue[ProxyHeader] = queue.SimpleQueue()
        self.reports: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.errors: list[str] = []
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._connection, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _connection(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(20)
            if self.proxy:
                header, _ = read_header(sock, timeout=10)
                self.headers.put(header)
            if self.context is not None:
                try:
                    sock = self.context.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    return  # a client that does not trust us: what some tests are about
            self.serve(sock, self)
        except Exception as exc:
            if not self._closed:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            sock.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for thread in self._threads:
            thread.join(10)


@pytest.fixture
def upstreams() -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(serve: Serve, context: ssl.SSLContext | None = None, proxy: bool = False) -> Upstream:
        made.append(Upstream(serve, context, proxy))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()
    errors = [e for u in made for e in u.errors]
    assert not errors, errors


def server_context(issued: Issued) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    return context


def send_eof(sock: socket.socket) -> None:
    """Half-close: a TLS socket sends close_notify (not waiting for the peer's), then the TCP FIN.

    A blocking ``unwrap()`` would wait for the peer's close_notify and fail on
    its data meanwhile: the non-blocking one sends ours and returns.
    """
    if isinstance(sock, ssl.SSLSocket):
        timeout = sock.gettimeout()
        sock.setblocking(False)
        with contextlib.suppress(ssl.SSLWantReadError):
            sock.unwrap()
        sock.settimeout(timeout)
    socket.socket.shutdown(sock, socket.SHUT_WR)  # not SSLSocket.shutdown: it drops the TLS layer


def recv(sock: socket.socket, size: int) -> bytes:
    """``sock.recv``, with the peer's close_notify after our own read as EOF.

    Python reads a close_notify as b"" only when we sent none; after ours it
    raises ``SSLZeroReturnError``.
    """
    try:
        return sock.recv(size)
    except ssl.SSLZeroReturnError:
        return b""


def read_to_eof(sock: socket.socket) -> bytes:
    got = bytearray()
    while chunk := recv(sock, 65536):
        got += chunk
    return bytes(got)


def echo(sock: socket.socket, upstream: Upstream) -> None:
    """Every byte back; at EOF, EOF back."""
    while chunk := recv(sock, 65536):
        sock.sendall(chunk)
    send_eof(sock)


def echo_until_gone(sock: socket.socket, upstream: Upstream) -> None:
    """``echo``, for a test whose client vanishes: the relay may reset this side too, which is no error."""
    with contextlib.suppress(OSError):
        echo(sock, upstream)


def banner_then_eof(sock: socket.socket, upstream: Upstream) -> None:
    """Speaks first and ends its side at once; then reports what the client sent until its EOF."""
    sock.sendall(b"banner\n")
    send_eof(sock)
    upstream.reports.put(read_to_eof(sock))


def reply_after_eof(sock: socket.socket, upstream: Upstream) -> None:
    """Reads to EOF, reports it, then answers with how much it got and ends."""
    got = read_to_eof(sock)
    upstream.reports.put(got)
    with contextlib.suppress(OSError):  # the async relay has closed the connection by then
        sock.sendall(b"got %d bytes" % len(got))
        send_eof(sock)


# -- clients and relays -------------------------------------------------------------------------------------


def tls_connect(port: int, context: ssl.SSLContext, name: str = "localhost", timeout: float = 10.0) -> ssl.SSLSocket:
    return connect_tls(("127.0.0.1", port), context, name=name, timeout=timeout)


def pump(sock: socket.socket, payload: bytes, timeout: float = 60.0, *, to_eof: bool = False) -> bytes:
    """Send ``payload`` while reading what comes back, in one thread: all of it is sent, and reading goes
    on until as many bytes came back (``to_eof``: until EOF); returns what came back.

    One thread because one TLS connection must not be read and written from
    two threads at once. Every wait is bounded by ``timeout``.
    """
    deadline = time.monotonic() + timeout
    saved = sock.gettimeout()
    sock.setblocking(False)
    view = memoryview(payload)
    sent = 0
    got = bytearray()
    eof = False
    retry = b""  # a TLS write that has to wait is retried with the same bytes
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while sent < len(payload) or not (eof or (not to_eof and len(got) >= len(payload))):
                moved = False
                if sent < len(payload):
                    chunk = retry or view[sent:sent + 65536]
                    try:
                        sent += sock.send(chunk)
                        retry = b""
                        moved = True
                    except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                        retry = bytes(chunk)
                if not eof:
                    try:
                        data = recv(sock, 1 << 18)
                        got += data
                        eof = not data
                        moved = True
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        pass
                if not moved:
                    remaining = deadline - time.monotonic()
                    assert remaining > 0, f"pump: {sent} bytes sent, {len(got)} back after {timeout}s"
                    events = (0 if eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if sent < len(payload)
                                                                     else 0)
                    selector.modify(sock, events)
                    selector.select(min(remaining, 1.0))
    finally:
        sock.settimeout(saved)
    return bytes(got)


def queued(sock: socket.socket) -> int:
    """Bytes in the kernel's receive queue of ``sock`` (FIONREAD), TLS records and all."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]


def payload(size: int, seed: bytes = b"seed") -> bytes:
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB, not all alike
    return (block * (size // len(block) + 1))[:size]


def relay(daemon_factory: Callable[..., Daemon], worker_class: str, *upstream_ports: int, extra: tuple[str, ...] = (),
          name: str = "relay", workers: int = 2) -> Daemon:
    args = ["-k", worker_class, "--workers", str(workers), "--relay-connect-timeout", "5", *extra]
    for port in upstream_ports:
        args += ["--relay", f"127.0.0.1:{port}"]
    return daemon_factory(*args, name=name)


def originate(pki: Pki) -> tuple[str, ...]:
    return ("--relay-tls", "--relay-ca-certs", str(pki.ca.cert))


def client_for(pki: Pki, terminated: bool, port: int, client: Issued | None = None) -> socket.socket:
    if terminated:
        return tls_connect(port, client_context(pki, client))
    return socket.create_connection(("127.0.0.1", port), timeout=10)


# -- the socketserver form in-process: what only a narrow buffer or a full socket shows ------------------


class TlsServer(socketserver.ThreadingTCPServer):
    """A socketserver that does the TLS handshake in ``get_request``, as a prefork worker hands its handler one."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler], context: ssl.SSLContext) -> None:
        self.context = context
        self.errors: list[str] = []
        super().__init__(("127.0.0.1", 0), handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        sock.settimeout(10)
        return self.context.wrap_socket(sock, server_side=True), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(traceback.format_exc())


@pytest.fixture
def tls_relay(pki: Pki) -> Iterator[Callable[..., TlsServer]]:
    servers: list[TlsServer] = []

    def start(handler: type[RelayHandler]) -> TlsServer:
        server = TlsServer(handler, server_context(pki.server()))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    errors = [e for server in servers for e in server.errors]
    assert not errors, errors


def relay_handler(*ports: int, **settings: Any) -> type[RelayHandler]:
    return type("Relay", (RelayHandler,), {"upstreams": tuple(("127.0.0.1", p) for p in ports), **settings})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("originated", [False, True], ids=["plain-upstream", "tls-upstream"])
def test_a_buffer_smaller_than_a_tls_record(tls_relay: Callable[..., TlsServer], upstreams: Callable[..., Upstream],
                                            pki: Pki, originated: bool) -> None:
    """A 16 KiB record read into a 1000-byte buffer: the rest waits decrypted in the TLS object, where epoll
    does not see it. The relay reads it in the same turn, or this hangs."""
    context = ssl.create_default_context(cafile=str(pki.ca.cert)) if originated else None
    upstream = upstreams(echo, server_context(pki.server()) if originated else None)
    relay = tls_relay(relay_handler(upstream.port, buffer_size=1000, upstream_tls=context))
    data = payload(MiB, b"small buffer")
    with tls_connect(relay.server_address[1], client_context(pki)) as s:
        got = pump(s, data, timeout=30)
    assert got == data


@pytest.mark.timeout(60)
def test_a_tls_client_that_reads_slowly_gets_every_byte(tls_relay: Callable[..., TlsServer],
                                                        upstreams: Callable[..., Upstream], pki: Pki) -> None:
    """The relay's writes to the client wait (SSLWantWriteError) and are retried with the same bytes."""
    data = payload(8 * MiB, b"slow reader")

    def flood(sock: socket.socket, upstream: Upstream) -> None:
        sock.sendall(data)
        send_eof(sock)
        upstream.reports.put(read_to_eof(sock))

    upstream = upstreams(flood)
    relay = tls_relay(relay_handler(upstream.port))
    with tls_connect(relay.server_address[1], client_context(pki)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        # our receive queue fills (and the relay's send queue behind it): its writes to us must wait
        wait_for(lambda: queued(s) >= 16 * 1024, 10, "the relay to fill our receive queue")
        got = bytearray()
        while chunk := recv(s, 4096):
            got += chunk
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        s.sendall(b"and back")
        send_eof(s)
        assert upstream.reports.get(timeout=10) == b"and back"


@contextlib.contextmanager
def tls_pair(pki: Pki) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A TLS connection over a socket pair: (server side, non-blocking, as the relay has it; client side)."""
    server, client = socket.socketpair()
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        server.settimeout(10)
        client.settimeout(10)
        accepted: queue.SimpleQueue[ssl.SSLSocket] = queue.SimpleQueue()
        context = server_context(pki.server())
        thread = threading.Thread(target=lambda: accepted.put(context.wrap_socket(server, server_side=True)))
        thread.start()
        with client_context(pki).wrap_socket(client, server_hostname="localhost") as tls_client:
            thread.join(10)
            with accepted.get(timeout=10) as tls_server:
                tls_server.setblocking(False)
                yield tls_server, tls_client


def test_a_write_that_waited_is_retried_with_its_bytes_then_eof(pki: Pki) -> None:
    with tls_pair(pki) as (tls_server, tls_client), socket.socket() as source:
        filled = 0
        with contextlib.suppress(ssl.SSLWantWriteError):
            while True:  # fill every buffer between us: the client reads nothing yet
                filled += tls_server.send(b"x" * 1024)
        pipe = relay_module._TlsPipe(source, tls_server, "upstream", "client", memoryview(bytearray(1024)))
        pipe.pending = memoryview(b"x" * 1024)  # the write that could not go, as the relay keeps it
        pipe.ended = True  # and the source's EOF behind it
        assert pipe.push() is False and pipe.pending is not None and not pipe.eof
        got = bytearray()
        while len(got) < filled:  # the client reads; then the relay's retry goes through
            got += tls_client.recv(65536)
        wait_for(pipe.push, 10, "the retried write to go")
        assert pipe.pending is None and pipe.eof and pipe.done  # its EOF passed on right after
        got += read_to_eof(tls_client)  # ... as a close_notify: a clean TLS EOF
        assert got == b"x" * (filled + 1024)


def test_close_notify_waits_for_room_then_the_fin_follows(pki: Pki) -> None:
    with tls_pair(pki) as (tls_server, tls_client), socket.socket() as source:
        filler = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # the kernel buffer full (of bytes this test reads back raw)
                filler += socket.socket.send(tls_server, b"\0" * 4096)
        pipe = relay_module._TlsPipe(source, tls_server, "upstream", "client", memoryview(bytearray(1024)))
        pipe.ended = True
        pipe._pass_eof()
        assert pipe.closing and pipe.pending is not None and not pipe.done  # the record waits for room
        record = bytes(pipe.pending)
        assert record[:3] == b"\x17\x03\x03" and len(record) == 24  # TLS 1.3: an encrypted alert record
        received = bytearray()
        while not pipe.done:
            received += socket.socket.recv(tls_client, 65536)  # room, a little at a time
            pipe.push()
        while chunk := socket.socket.recv(tls_client, 65536):  # ... until the FIN
            received += chunk
        # (after the session tickets the server sent at the handshake, which the client had not read)
        assert received.endswith(b"\0" * filler + record)


# -- terminate, originate, both: bytes intact both ways ----------------------------------------------------

MODES = {  # (the client speaks TLS to the relay, the relay speaks TLS to the upstream)
    "terminate": (True, False),
    "originate": (False, True),
    "both": (True, True),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("worker_class", CLASSES)
def test_four_mebibytes_each_way_intact(daemon_factory: Callable[..., Daemon], upstreams: Callable[..., Upstream],
                                        pki: Pki, worker_class: str, mode: str) -> None:
    terminated, originated = MODES[mode]
    upstream = upstreams(echo, server_context(pki.server()) if originated else None)
    extra = (*(pki.server().args() if terminated else ()), *(originate(pki) if originated else ()))
    d = relay(daemon_factory, worker_class, upstream.port, extra=extra)
    data = payload(4 * MiB)
    with client_for(pki, terminated, d.port) as s:
        assert pump(s, b"ping\n") == b"ping\n"  # a round trip first: small writes flushed, not held back
        got = pump(s, data)
        assert len(got) == len(data)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        if terminated:
            assert isinstance(s, ssl.SSLSocket) and s.version() in ("TLSv1.2", "TLSv1.3")
    if worker_class != "async":  # the socketserver relay counts the plaintext it moves, as it does without TLS
        wait_for(lambda: d.call("stats")["bytes_in"] == d.call("stats")["bytes_out"] == len(data) + 5, 10,
                 "the relayed plaintext bytes counted")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_originate_to_a_prefork_tls_daemon(daemon_factory: Callable[..., Daemon], pki: Pki,
                                           worker_class: str) -> None:
    upstream = daemon_factory(*pki.server().args(), "-k", "thread", "--workers", "1", name="upstream")
    d = relay(daemon_factory, worker_class, upstream.port, extra=originate(pki))
    for i in range(3):
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            line = b"hello %d over TLS upstream\n" % i
            s.sendall(line)
            assert recv_exact(s, len(line)) == line
    assert upstream.call("stats")["tls"]["handshakes"] >= 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", ["thread", "async"])  # a sync worker serves one connection at a time
def test_many_tls_clients_at_once(daemon_factory: Callable[..., Daemon], upstreams: Callable[..., Upstream],
                                  pki: Pki, worker_class: str) -> None:
    upstream = upstreams(echo, server_context(pki.server()))
    d = relay(daemon_factory, worker_class, upstream.port, extra=(*pki.server().args(), *originate(pki)))
    clients = [tls_connect(d.port, client_context(pki)) for _ in range(30)]
    try:
        for round_ in range(3):
            for i, s in enumerate(clients):
                s.sendall(b"%02d:%d;" % (i, round_))
            for i, s in enumerate(clients):
                expected = b"%02d:%d;" % (i, round_)
                assert recv_exact(s, len(expected)) == expected
    finally:
        for s in clients:
            s.close()


# -- EOF and half-close -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_upstream_eof_reaches_a_tls_client(daemon_factory: Callable[..., Daemon], upstreams: Callable[..., Upstream],
                                           pki: Pki, worker_class: str) -> None:
    upstream = upstreams(banner_then_eof)
    d = relay(daemon_factory, worker_class, upstream.port, extra=tuple(pki.server().args()))
    with tls_connect(d.port, client_context(pki)) as s:
        assert read_to_eof(s) == b"banner\n"  # a close_notify: a clean TLS EOF, not "unexpected EOF"
        if worker_class in HALF_CLOSES:
            s.sendall(b"after the upstream's EOF")  # half-closed: our direction is still open
            send_eof(s)
            assert upstream.reports.get(timeout=10) == b"after the upstream's EOF"
        else:
            # asyncio's TLS transport cannot half-close: the relay closed it once the banner was out, and
            # the upstream's connection ended with it
            assert upstream.reports.get(timeout=10) == b""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", sorted(HALF_CLOSES))
def test_a_tls_client_streaming_while_the_upstream_ends_loses_nothing(daemon_factory: Callable[..., Daemon],
                                                                      upstreams: Callable[..., Upstream], pki: Pki,
                                                                      worker_class: str) -> None:
    """The relay's close_notify goes out while the client's records keep coming: every one is still read.

    (Python's ``unwrap()`` alone would read on after sending it, and OpenSSL fails a connection whose
    peer's application data it finds there.)
    """
    def tally(sock: socket.socket, upstream: Upstream) -> None:
        sock.sendall(b"banner\n")
        send_eof(sock)
        upstream.reports.put(hashlib.sha256(read_to_eof(sock)).hexdigest())

    upstream = upstreams(tally)
    d = relay(daemon_factory, worker_class, upstream.port, extra=tuple(pki.server().args()))
    data = payload(MiB, b"streaming")
    for _ in range(5):
        with tls_connect(d.port, client_context(pki)) as s:
            s.sendall(data[:65536])  # already streaming when the relay passes the upstream's EOF on
            assert pump(s, data[65536:], timeout=30, to_eof=True) == b"banner\n"  # the rest goes meanwhile
            send_eof(s)
            assert upstream.reports.get(timeout=10) == hashlib.sha256(data).hexdigest()
    assert "failed" not in d.log()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_tls_client_eof_reaches_the_upstream(daemon_factory: Callable[..., Daemon],
                                             upstreams: Callable[..., Upstream], pki: Pki, worker_class: str) -> None:
    upstream = upstreams(reply_after_eof)
    d = relay(daemon_factory, worker_class, upstream.port, extra=tuple(pki.server().args()))
    with tls_connect(d.port, client_context(pki)) as s:
        s.sendall(b"the request")
        send_eof(s)  # close_notify and FIN; we go on reading
        assert upstream.reports.get(timeout=10) == b"the request"
        answer = read_to_eof(s)
    # the socketserver relay keeps the other direction open; asyncio closes a TLS transport at its EOF
    assert answer == (b"got 11 bytes" if worker_class in HALF_CLOSES else b"")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_tls_upstream_eof_reaches_a_plain_client(daemon_factory: Callable[..., Daemon],
                                                 upstreams: Callable[..., Upstream], pki: Pki,
                                                 worker_class: str) -> None:
    upstream = upstreams(banner_then_eof, server_context(pki.server()))
    d = relay(daemon_factory, worker_class, upstream.port, extra=originate(pki))
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        assert read_to_eof(s) == b"banner\n"
        if worker_class in HALF_CLOSES:
            s.sendall(b"after the upstream's EOF")
            s.shutdown(socket.SHUT_WR)
            assert upstream.reports.get(timeout=10) == b"after the upstream's EOF"  # read after its close_notify
            assert s.recv(10) == b""
        else:
            assert upstream.reports.get(timeout=10) == b""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_plain_client_eof_reaches_a_tls_upstream(daemon_factory: Callable[..., Daemon],
                                                 upstreams: Callable[..., Upstream], pki: Pki,
                                                 worker_class: str) -> None:
    upstream = upstreams(reply_after_eof, server_context(pki.server()))
    d = relay(daemon_factory, worker_class, upstream.port, extra=originate(pki))
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"the request")
        s.shutdown(socket.SHUT_WR)
        assert upstream.reports.get(timeout=10) == b"the request"  # the upstream got a close_notify
        assert read_to_eof(s) == (b"got 11 bytes" if worker_class in HALF_CLOSES else b"")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_tls_client_that_sends_and_ends_at_once(daemon_factory: Callable[..., Daemon],
                                                upstreams: Callable[..., Upstream], pki: Pki,
                                                worker_class: str) -> None:
    """Bytes and close_notify in one go, possibly before the relay has its upstream: the bytes still go up."""
    upstream = upstreams(reply_after_eof)
    d = relay(daemon_factory, worker_class, upstream.port, extra=tuple(pki.server().args()))
    for _ in range(3):
        with tls_connect(d.port, client_context(pki)) as s:
            s.sendall(b"fire and forget")
            send_eof(s)
            assert upstream.reports.get(timeout=10) == b"fire and forget"


# -- failed TLS upstreams ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_upstream_with_the_wrong_ca_fails_over_to_a_good_one(daemon_factory: Callable[..., Daemon],
                                                             upstreams: Callable[..., Upstream], pki: Pki,
                                                             worker_class: str) -> None:
    wrong = pki.other_ca.issue("other", "localhost", names=("localhost", "127.0.0.1"))
    bad = upstreams(echo, server_context(wrong))
    good = upstreams(echo, server_context(pki.server()))
    d = relay(daemon_factory, worker_class, bad.port, good.port, extra=originate(pki), workers=1)
    for i in range(4):  # the first connection tries the bad one first; it is down after that (passive health)
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(b"ping %d\n" % i)
            assert recv_exact(s, 7) == b"ping %d\n" % i
    wait_for(lambda: f"connected to 127.0.0.1:{good.port} instead" in d.log(), 10, "the failover logged")
    line = next(line for line in d.log().splitlines() if "instead" in line)
    assert (f"upstream 127.0.0.1:{bad.port} (TLS handshake: certificate verify failed: "
            f"unable to get local issuer certificate) unavailable") in line
    assert bad.accepted >= 1 and good.accepted == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_upstream_with_the_wrong_name_is_refused(daemon_factory: Callable[..., Daemon],
                                                 upstreams: Callable[..., Upstream], pki: Pki,
                                                 worker_class: str) -> None:
    upstream = upstreams(echo, server_context(pki.server()))
    d = relay(daemon_factory, worker_class, upstream.port,
              extra=(*originate(pki), "--relay-sni", "wrong.example"))
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"ping\n")
        assert read_to_eof(s) == b""  # closed: nothing went to an upstream we could not verify
    wait_for(lambda: "cannot connect upstream" in d.log(), 10, "the refusal logged")
    assert (f"cannot connect upstream: 127.0.0.1:{upstream.port} (TLS handshake: certificate verify failed: "
            "Hostname mismatch, certificate is not valid for 'wrong.example'); closing the client connection") \
        in d.log()
    wait_for(lambda: d.call("stats")["errors"] >= 1, 10, "the error counted")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_sni_names_the_upstream_to_verify(daemon_factory: Callable[..., Daemon], upstreams: Callable[..., Upstream],
                                          pki: Pki, worker_class: str) -> None:
    """--relay-sni: asked for and verified; an upstream addressed by IP with a certificate for a name only."""
    named = pki.server("named", "api.internal", names=("api.internal",))
    names: list[str | None] = []
    context = server_context(named)
    context.sni_callback = lambda sslobj, name, ctx: names.append(name)
    upstream = upstreams(echo, context)
    d = relay(daemon_factory, worker_class, upstream.port, extra=(*originate(pki), "--relay-sni", "api.internal"))
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(b"ping\n")
        assert recv_exact(s, 5) == b"ping\n"
    assert names == ["api.internal"]


# -- the PROXY header with the client's TLS ------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("originated", [False, True], ids=["plain-upstream", "tls-upstream"])
@pytest.mark.parametrize("worker_class", CLASSES)
def test_send_proxy_announces_the_tls_client(daemon_factory: Callable[..., Daemon],
                                             upstreams: Callable[..., Upstream], pki: Pki, worker_class: str,
                                             originated: bool) -> None:
    upstream = upstreams(echo, server_context(pki.server()) if originated else None, proxy=True)
    d = relay(daemon_factory, worker_class, upstream.port,
              extra=(*pki.server().args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "optional",
                     "--relay-send-proxy", *(originate(pki) if originated else ())))
    for client, cn in ((pki.client(), b"client one"), (None, None)):
        with tls_connect(d.port, client_context(pki, client)) as s:
            s.sendall(b"ping\n")
            assert recv_exact(s, 5) == b"ping\n"  # the header went first, in clear, then the handshake
            header = upstream.headers.get(timeout=10)
            assert header.command == "PROXY"
            assert header.source == s.getsockname()[:2] and header.destination == s.getpeername()[:2]
            tlv = ssl_tlv_of(header)
            version, cipher = s.version(), s.cipher()
            assert version is not None and cipher is not None
            expected = {0x21: version.encode(), 0x23: cipher[0].encode()}
            if cn is not None:
                expected[0x22] = cn
            assert tlv == SslTlv(0x07 if cn else 0x01, 0 if cn else 1, expected)


# -- a real HAProxy ----------------------------------------------------------------------------------------


@dataclass
class HAProxy:
    proc: subprocess.Popen[bytes]
    port: int
    stats_socket: Path
    log_path: Path

    def admin(self, command: str) -> str:
        return haproxy_admin(self.stats_socket, command)

    def server_state(self, backend: str, server: str) -> int | None:
        """Operational state: 0 DOWN, 2 UP (``show servers state``)."""
        lines = self.admin(f"show servers state {backend}").splitlines()
        if len(lines) < 2:
            return None
        header = lines[1].lstrip("# ").split()
        for line in lines[2:]:
            row = dict(zip(header, line.split(), strict=False))
            if row.get("srv_name") == server:
                return int(row["srv_op_state"])
        return None

    def check_status(self, backend: str, server: str) -> str:
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname") == server:
                return row.get("check_status", "")
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def haproxy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[str], HAProxy]]:
    """``haproxy(config_body)``: HAProxy with a stats socket and ``config_body`` ({port} is its frontend's)."""
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy is not installed (Debian package haproxy; .ci/run installs it)")
    started: list[HAProxy] = []

    def start(body: str) -> HAProxy:
        port = free_port()
        stats = tmp_path / f"haproxy{len(started)}.sock"
        cfg = tmp_path / f"haproxy{len(started)}.cfg"
        cfg.write_text(f"""global
    log stdout format raw local0 info
    stats socket {stats} mode 600 level admin
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout check 5s
{body.format(port=port)}
""")
        check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
        assert check.returncode == 0, f"haproxy -c: {check.stdout}{check.stderr}\n{cfg.read_text()}"
        log_path = tmp_path / f"haproxy{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=str(tmp_path))
        hap = HAProxy(proc, port, stats, log_path)
        started.append(hap)

        def accepting() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"haproxy exited with {proc.returncode}:\n{log_path.read_text()}")
            return haproxy_serving(stats, port)

        wait_for(accepting, 10, "HAProxy to accept")
        return hap

    yield start
    failed = getattr(request.node, "rep_call", None)
    for hap in started:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(hap.proc.pid, sig)
            try:
                hap.proc.wait(5)
                break
            except subprocess.TimeoutExpired:
                continue
        if failed is not None and failed.failed:
            print(f"--- haproxy output ---\n{hap.log_path.read_text(errors='replace')[-20000:]}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", CLASSES)
def test_haproxy_checks_and_uses_the_tls_relay(daemon_factory: Callable[..., Daemon],
                                               upstreams: Callable[..., Upstream], pki: Pki,
                                               haproxy: Callable[[str], HAProxy], worker_class: str) -> None:
    upstream = upstreams(echo)
    d = relay(daemon_factory, worker_class, upstream.port, extra=tuple(pki.server().args()),
              workers=4 if worker_class == "sync" else 2)
    hap = haproxy(f"""frontend fe
    bind 127.0.0.1:{{port}}
    default_backend prefork
backend prefork
    server s1 127.0.0.1:{d.port} ssl verify required ca-file {pki.ca.cert} sni str(localhost) check inter 200ms
""")
    wait_for(lambda: hap.server_state("prefork", "s1") == 2 and hap.check_status("prefork", "s1") == "L6OK", 10,
             "HAProxy to see s1 UP after a TLS check")
    data = payload(MiB, b"through haproxy")
    for i in range(3):
        with socket.create_connection(("127.0.0.1", hap.port), timeout=10) as s:
            line = b"hello %d through HAProxy and TLS\n" % i
            assert pump(s, line) == line
            if i == 0:
                assert pump(s, data) == data
    assert hap.server_state("prefork", "s1") == 2
    # HAProxy's health checks are TLS handshakes on the relay's workers, which count them
    assert d.call("stats")["tls"]["handshakes"] >= 4


@pytest.mark.timeout(60)
def test_our_ssl_tlv_matches_haproxys(daemon_factory: Callable[..., Daemon], upstreams: Callable[..., Upstream],
                                      pki: Pki, haproxy: Callable[[str], HAProxy]) -> None:
    """The same client through HAProxy (send-proxy-v2-ssl-cn, ssl-cipher) and through the relay: one SSL TLV."""
    upstream = upstreams(echo, proxy=True)
    server = pki.server()
    combined = pki.directory / "haproxy.pem"
    combined.write_bytes(server.cert.read_bytes() + server.key.read_bytes())
    hap = haproxy(f"""frontend fe
    bind 127.0.0.1:{{port}} ssl crt {combined} ca-file {pki.ca.cert} verify optional
    default_backend be
backend be
    server s1 127.0.0.1:{upstream.port} send-proxy-v2-ssl-cn proxy-v2-options ssl-cipher
""")
    d = relay(daemon_factory, "thread", upstream.port,
              extra=(*server.args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "optional", "--relay-send-proxy"))
    client = pki.client()
    tlvs = []
    for port in (hap.port, d.port):
        with tls_connect(port, client_context(pki, client, maximum=ssl.TLSVersion.TLSv1_3)) as s:
            s.sendall(b"ping\n")
            assert recv_exact(s, 5) == b"ping\n"
            cipher = s.cipher()
        tlvs.append(ssl_tlv_of(upstream.headers.get(timeout=10)))
    theirs, ours = tlvs
    assert cipher is not None
    assert theirs == ours == SslTlv(0x07, 0, {0x21: b"TLSv1.3", 0x22: b"client one", 0x23: cipher[0].encode()})


def test_no_relay_log_line_is_a_traceback(daemon_factory: Callable[..., Daemon], upstreams: Callable[..., Upstream],
                                          pki: Pki) -> None:
    """A TLS client that goes away mid-handshake or mid-stream leaves a line, not a traceback."""
    upstream = upstreams(echo_until_gone)
    d = relay(daemon_factory, "thread", upstream.port, extra=tuple(pki.server().args()))
    with tls_connect(d.port, client_context(pki)) as s:
        s.sendall(b"x" * 100000)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset at close
    with tls_connect(d.port, client_context(pki)) as s:
        assert pump(s, b"still serving\n") == b"still serving\n"
    assert "Traceback" not in d.log()
    assert not re.search(r"relay loop .* failed", d.log())


WHO = {"sync": "tls_handlers:WhoHandler", "thread": "tls_handlers:WhoHandler",
       "async": "tls_async_handlers:WhoProtocol"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", list(WHO))
def test_haproxy_sends_proxy_headers_over_tls_and_checks_with_them(daemon_factory: Callable[..., Daemon],
                                                                    pki: Pki, haproxy: Callable[[str], HAProxy],
                                                                    worker_class: str) -> None:
    """docs/scale-out.md's TLS backend: PROXY v2 in clear, then TLS verified by HAProxy, for clients and checks.

    HAProxy bounds a check's connect and TLS handshake by ``min(timeout connect, inter)`` and cuts it with a
    reset when that runs out: a check cut that way is a handshake that failed, and counted so. The interval
    is a generous budget on a loaded machine, not ``200ms``, so no check is cut here.
    """
    d = daemon_factory(*pki.server().args(), "--proxy-protocol", "-k", worker_class, WHO[worker_class])
    verify = f"ssl verify required ca-file {pki.ca.cert} sni str(localhost) check-sni localhost"
    hap = haproxy(f"""frontend fe
    bind 127.0.0.1:{{port}}
    default_backend prefork
backend prefork
    option tcp-check
    tcp-check connect send-proxy ssl
    server s1 127.0.0.1:{d.port} check inter 3s send-proxy-v2 {verify}
""")
    wait_for(lambda: hap.server_state("prefork", "s1") == 2 and hap.check_status("prefork", "s1") == "L6OK", 20,
             "HAProxy to see s1 UP after a TLS check")
    with socket.create_connection(("127.0.0.1", hap.port), timeout=10, source_address=("127.0.0.7", 0)) as s:
        fields = s.makefile("rb").readline().decode().split()
        assert fields[0] in ("TLSv1.2", "TLSv1.3") and fields[-1] == "127.0.0.7", fields  # the client, not HAProxy
    wait_for(lambda: d.call("stats")["tls"]["handshakes"] >= 2, 10, "the check and the client counted as handshakes")
    assert d.call("stats")["tls"]["failed"] == 0, d.call("stats")["tls"]
    assert hap.server_state("prefork", "s1") == 2
