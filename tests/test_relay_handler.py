"""The relay handler in-process: ``RelayHandler`` served by a ``ThreadingTCPServer``, real upstreams on 127.0.0.1.

Covers issue 4 point 1 at the handler level: large transfers intact both
ways, many concurrent clients, half-close each way, upstream refused,
failover, round robin, a per-connection upstream choice, upstream and client
resets, idle timeout, the PROXY v2 header, bounded buffering against a slow
reader, no busy loop, the scoreboard counters and configuration errors.

Every relayed connection of a process is copied by one relay loop thread, so
some tests are about sharing it: one thread for all connections, interleaved
bulk and ping-pong traffic, a connection ending (or failing, or going idle)
while others go on, timers of finished connections, cancel, and a forked
child starting its own loop. The relay in a real daemon is tested in
``test_relay_e2e.py``; the decisions it shares with the asyncio form in
``test_relay_core.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import os
import queue
import select
import socket
import socketserver
import struct
import termios
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from prefork.handlers import relay as relay_module
from prefork.handlers import relay_core
from prefork.handlers.echo import EchoHandler
from prefork.handlers.relay import RelayHandler
from prefork.proxy_protocol import parse
from prefork.scoreboard import Record

RELAY_LOG = "prefork.handlers.relay"
MiB = 1 << 20


# -- servers in background threads -----------------------------------------------------------------------


class Server(socketserver.ThreadingTCPServer):
    """A threaded server on 127.0.0.1:0 that reports each finished connection and every handler error."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128  # 50 clients connect at once

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.finished: queue.SimpleQueue[Any] = queue.SimpleQueue()  # client address per finished connection
        self.errors: list[str] = []  # tracebacks that reached handle_error
        self.received: queue.SimpleQueue[Any] = queue.SimpleQueue()  # what test upstreams report
        self.gate = threading.Event()  # test upstreams that wait for the test wait on this
        self.sockets: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()  # connections test upstreams expose

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server_address[:2]
        return str(host), int(port)

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            super().finish_request(request, client_address)
        finally:
            self.finished.put(client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(traceback.format_exc())

    def wait_finished(self, count: int = 1, timeout: float = 3.0) -> list[Any]:
        """The next ``count`` finished connections; fails if they do not finish within ``timeout``."""
        deadline = time.monotonic() + timeout
        done = []
        for _ in range(count):
            try:
                done.append(self.finished.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"{count - len(done)} connection(s) still open after {timeout}s") from None
        return done


StartServer = Callable[..., Server]


@pytest.fixture
def start() -> Iterator[StartServer]:
    """``start(handler_class, record=False)``: serve in a background thread, stopped at the end of the test."""
    running: list[tuple[Server, threading.Thread]] = []

    def factory(handler: type[socketserver.BaseRequestHandler], *, record: bool = False) -> Server:
        server = Server(handler)
        if record:
            server.record = Record()  # type: ignore[attr-defined]
        # socketserver polls for shutdown(); 0.05 s keeps the teardown short
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        running.append((server, thread))
        return server

    yield factory
    errors = []
    for server, thread in running:
        server.gate.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
        errors += server.errors
    assert not errors, "a handler raised:\n" + "\n".join(errors)


def relay_class(*upstreams: tuple[str, int], base: type[RelayHandler] = RelayHandler,
                **settings: Any) -> type[RelayHandler]:
    """A configured relay, made the way the daemon makes one."""
    return type(base.__name__, (base,), {"__module__": base.__module__, "upstreams": upstreams, **settings})


def connect(server: Server, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(server.address, timeout=timeout)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), MiB))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_all(s: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := s.recv(MiB):
        buf += chunk
    return bytes(buf)


@pytest.fixture
def nowhere() -> Iterator[tuple[str, int]]:
    """An address nothing listens on: a bound, non-listening socket holds the port for the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield ("127.0.0.1", s.getsockname()[1])


@pytest.fixture
def blackhole() -> Iterator[tuple[str, int]]:
    """An address whose connects time out: a listener with a full accept queue drops new SYNs (Linux)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(address)
            fillers.append(filler)
        try:
            with pytest.raises(TimeoutError):  # the premise of the test, checked
                socket.create_connection(address, timeout=0.3).close()
            yield address
        finally:
            for filler in fillers:
                filler.close()


def relay_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == RELAY_LOG and r.levelno == level]


def relay_loop_thread() -> threading.Thread:
    """This process's relay loop thread (started now if no relay ran yet)."""
    return relay_module._relay_loop().thread


def thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds ``thread`` has used so far."""
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


# -- test upstreams ----------------------------------------------------------------------------------------


class ResetHandler(socketserver.BaseRequestHandler):
    """Reads a little, answers ``partial``, then resets the connection (SO_LINGER 0)."""

    def handle(self) -> None:
        self.request.recv(100)
        self.request.sendall(b"partial")
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.request.close()  # RST now; the server's own shutdown of the closed socket is a no-op


class CloseHandler(socketserver.BaseRequestHandler):
    """Accepts and closes at once."""

    def handle(self) -> None:
        pass


class CaptureHandler(socketserver.BaseRequestHandler):
    """Reads to EOF and reports every byte, then closes."""

    def handle(self) -> None:
        self.server.received.put(recv_all(self.request))  # type: ignore[attr-defined]


class BannerHandler(socketserver.BaseRequestHandler):
    """Sends a banner and shuts its side (half-close first), then reports everything it reads up to EOF."""

    def handle(self) -> None:
        self.request.sendall(b"banner\n")
        self.request.shutdown(socket.SHUT_WR)
        self.server.received.put(recv_all(self.request))  # type: ignore[attr-defined]


class SlowSinkHandler(socketserver.BaseRequestHandler):
    """Reads nothing until the test opens the gate, then reports (length, sha256) of everything up to EOF."""

    def handle(self) -> None:
        server: Server = self.server  # type: ignore[assignment]
        server.sockets.put(self.request)
        server.gate.wait(10)
        digest = hashlib.sha256()
        total = 0
        while chunk := self.request.recv(MiB):
            digest.update(chunk)
            total += len(chunk)
        server.received.put((total, digest.hexdigest()))


class HoldHandler(socketserver.BaseRequestHandler):
    """Reads to EOF, then keeps its side open until the test opens the gate."""

    def handle(self) -> None:
        recv_all(self.request)
        self.server.gate.wait(10)  # type: ignore[attr-defined]


# -- transfers ---------------------------------------------------------------------------------------------


def test_four_mib_each_way_intact_and_counted(start: StartServer) -> None:
    echo = start(EchoHandler)
    relay = start(relay_class(echo.address), record=True)
    payload = os.urandom(4 * MiB)
    with connect(relay) as s:
        sender_error: list[BaseException] = []

        def send() -> None:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                sender_error.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        echoed = recv_all(s)
        sender.join(10)
    assert not sender_error
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    relay.wait_finished()
    record = relay.record  # type: ignore[attr-defined]
    assert (record.bytes_in, record.bytes_out, record.errors) == (4 * MiB, 4 * MiB, 0)


def test_fifty_concurrent_clients(start: StartServer) -> None:
    echo = start(EchoHandler)
    relay = start(relay_class(echo.address))
    clients = [connect(relay) for _ in range(50)]
    try:
        # every connection is open (and relayed) at once before any is answered
        for i, s in enumerate(clients):
            s.sendall(f"client {i}\n".encode() * 100)
        for i, s in enumerate(clients):
            expected = f"client {i}\n".encode() * 100
            assert recv_exact(s, len(expected)) == expected
    finally:
        for s in clients:
            s.close()
    assert len(relay.wait_finished(50)) == 50


def test_client_half_close_still_gets_the_whole_echo(start: StartServer) -> None:
    echo = start(EchoHandler)
    relay = start(relay_class(echo.address))
    payload = os.urandom(300_000)
    with connect(relay) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_exact(s, len(payload)) == payload
        assert s.recv(1) == b""  # the echo server saw our EOF and closed: EOF passed on to us
    relay.wait_finished()


def test_upstream_half_close_passed_to_client(start: StartServer) -> None:
    banner = start(BannerHandler)
    relay = start(relay_class(banner.address))
    with connect(relay) as s:
        assert recv_exact(s, 7) == b"banner\n"
        assert s.recv(1) == b""  # the upstream's EOF, while our direction stays open
        s.sendall(b"after the upstream's EOF")
        s.shutdown(socket.SHUT_WR)
        assert banner.received.get(timeout=3) == b"after the upstream's EOF"
    relay.wait_finished()


# -- choosing an upstream ----------------------------------------------------------------------------------


def test_upstream_refused_closes_client_promptly(start: StartServer, nowhere: tuple[str, int],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RELAY_LOG)
    relay = start(relay_class(nowhere), record=True)
    with connect(relay, timeout=2.0) as s:
        began = time.monotonic()
        assert s.recv(1) == b""
        assert time.monotonic() - began < 1.0
    relay.wait_finished()
    [warning] = relay_lines(caplog, logging.WARNING)
    assert f"127.0.0.1:{nowhere[1]} (connection refused)" in warning
    assert relay.record.errors == 1  # type: ignore[attr-defined]


def test_failover_to_the_next_upstream(start: StartServer, nowhere: tuple[str, int],
                                       caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger=RELAY_LOG)
    monkeypatch.setattr(relay_core, "BACKOFF_FIRST", 60.0)  # down for the whole test once it refused
    echo = start(EchoHandler)
    relay = start(relay_class(nowhere, echo.address), record=True)
    for i in range(4):  # the first connection starts at the refusing one and fails over; then it is down
        with connect(relay) as s:
            s.sendall(b"ping %d" % i)
            assert recv_exact(s, 6) == b"ping %d" % i
        relay.wait_finished()
    infos = [line for line in relay_lines(caplog, logging.INFO) if "unavailable" in line]
    assert len(infos) == 1
    assert all(f"127.0.0.1:{nowhere[1]} (connection refused)" in line for line in infos)
    assert f"127.0.0.1:{echo.address[1]}" in infos[0]
    assert relay_lines(caplog, logging.WARNING) == []
    assert relay.record.errors == 0  # type: ignore[attr-defined]


def test_failover_when_an_upstream_times_out(start: StartServer, blackhole: tuple[str, int],
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RELAY_LOG)
    echo = start(EchoHandler)
    relay = start(relay_class(blackhole, echo.address, connect_timeout=0.3))
    with connect(relay, timeout=3.0) as s:
        began = time.monotonic()
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        assert time.monotonic() - began < 1.5
    relay.wait_finished()
    [info] = [line for line in relay_lines(caplog, logging.INFO) if "unavailable" in line]
    assert f"127.0.0.1:{blackhole[1]} (timed out after 0.3s)" in info


def test_round_robin_over_two_upstreams(start: StartServer) -> None:
    first, second = start(EchoHandler), start(EchoHandler)
    relay = start(relay_class(first.address, second.address))
    for i in range(6):
        with connect(relay) as s:
            s.sendall(b"%d" % i)
            assert recv_exact(s, 1) == b"%d" % i
        relay.wait_finished()
    assert len(first.wait_finished(3)) == 3
    assert len(second.wait_finished(3)) == 3
    assert first.finished.empty() and second.finished.empty()


def test_each_subclass_has_its_own_balancer(start: StartServer) -> None:
    first, second = start(EchoHandler), start(EchoHandler)
    a = relay_class(first.address, second.address)
    b = relay_class(first.address, second.address)
    relay_a = start(a)
    with connect(relay_a) as s:
        s.sendall(b"x")
        assert recv_exact(s, 1) == b"x"
    relay_a.wait_finished()
    # b's first connection starts at its own first upstream, whatever a did
    relay_b = start(b)
    with connect(relay_b) as s:
        s.sendall(b"y")
        assert recv_exact(s, 1) == b"y"
    relay_b.wait_finished()
    assert len(first.wait_finished(2)) == 2
    assert second.finished.empty()


def test_subclass_picks_the_upstream_per_connection(start: StartServer) -> None:
    plain, banner = start(EchoHandler), start(BannerHandler)

    class ByClientPort(RelayHandler):
        """Even client ports to the echo, odd ones to the banner."""

        upstreams = (plain.address, banner.address)

        def upstream_candidates(self) -> list[tuple[str, int]]:
            return [self.upstreams[self.client_address[1] % 2]]

    relay = start(ByClientPort)
    for _ in range(4):
        with connect(relay) as s:
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            got = recv_all(s)
            expected = b"hello" if s.getsockname()[1] % 2 == 0 else b"banner\n"
            assert got == expected
        relay.wait_finished()


# -- failures ----------------------------------------------------------------------------------------------


def test_upstream_reset_mid_stream(start: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RELAY_LOG)
    resetting = start(ResetHandler)
    relay = start(relay_class(resetting.address), record=True)
    with connect(relay, timeout=2.0) as s:
        s.sendall(b"hello")
        got = bytearray()
        try:
            while chunk := s.recv(100):
                got += chunk
        except ConnectionResetError:
            pass
        assert bytes(got) in (b"", b"partial")  # the bytes before the reset, if they were relayed in time
    [finished] = relay.wait_finished(timeout=2.0)
    [warning] = relay_lines(caplog, logging.WARNING)
    assert f"upstream 127.0.0.1:{resetting.address[1]} failed: connection reset by peer" in warning
    assert f"client 127.0.0.1:{finished[1]}" in warning
    assert relay.record.errors == 1  # type: ignore[attr-defined]


def test_upstream_that_closes_at_once(start: StartServer) -> None:
    closing = start(CloseHandler)
    relay = start(relay_class(closing.address))
    with connect(relay, timeout=2.0) as s:
        assert s.recv(1) == b""
    relay.wait_finished()


def test_client_reset_closes_upstream(start: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RELAY_LOG)
    capture = start(CaptureHandler)
    relay = start(relay_class(capture.address), record=True)
    s = connect(relay)
    s.sendall(b"before the reset")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    # the upstream sees its connection end (EOF after the relayed bytes), and the relay is done
    assert capture.received.get(timeout=3) in (b"", b"before the reset")
    relay.wait_finished()
    assert relay_lines(caplog, logging.WARNING) == []
    assert relay.record.errors == 0  # type: ignore[attr-defined]


def test_idle_timeout_closes_both(start: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RELAY_LOG)
    echo = start(EchoHandler)
    relay = start(relay_class(echo.address, idle_timeout=0.3))
    with connect(relay, timeout=3.0) as s:
        s.sendall(b"once")
        assert recv_exact(s, 4) == b"once"
        last_activity = time.monotonic()
        assert s.recv(1) == b""
        idle = time.monotonic() - last_activity
    assert 0.25 <= idle < 1.0
    relay.wait_finished()
    assert echo.wait_finished()  # the upstream connection was closed too
    assert any("idle for 0.3s" in line for line in relay_lines(caplog, logging.INFO))


def test_no_busy_loop_while_waiting(start: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RELAY_LOG)
    cpu: queue.SimpleQueue[float] = queue.SimpleQueue()
    loop_thread = relay_loop_thread()
    loop_began = thread_cpu(loop_thread)

    class Timed(RelayHandler):
        def handle(self) -> None:
            began = time.thread_time()
            try:
                super().handle()
            finally:
                cpu.put(time.thread_time() - began)

    hold = start(HoldHandler)
    relay = start(relay_class(hold.address, base=Timed, idle_timeout=0.6))
    with connect(relay, timeout=3.0) as s:
        # half-closed one way, nothing coming the other: the state where a loop could spin on the EOF
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""  # the idle timeout ends it
    assert cpu.get(timeout=3) < 0.15  # the handler's thread only waits
    assert thread_cpu(loop_thread) - loop_began < 0.15  # and the loop sleeps until the deadline
    assert relay_lines(caplog, logging.WARNING) == []
    assert any("idle for 0.6s" in line for line in relay_lines(caplog, logging.INFO))


# -- PROXY protocol and configuration ----------------------------------------------------------------------


def test_send_proxy_announces_the_client(start: StartServer) -> None:
    capture = start(CaptureHandler)
    relay = start(relay_class(capture.address, send_proxy=True))
    with connect(relay) as s:
        s.sendall(b"payload after the header")
        s.shutdown(socket.SHUT_WR)
        client = s.getsockname()
        assert s.recv(1) == b""
    data = capture.received.get(timeout=3)
    header = parse(data)
    assert header is not None
    assert (header.version, header.command, header.family) == (2, "PROXY", socket.AF_INET)
    assert header.source == client
    assert header.destination == relay.address
    assert data[header.length:] == b"payload after the header"


def test_proxy_header_for_mixed_families_and_unix_clients() -> None:
    handler = RelayHandler.__new__(RelayHandler)  # no connection: only proxy_header() is exercised

    class FakeSocket:
        def __init__(self, name: Any) -> None:
            self.name = name

        def getsockname(self) -> Any:
            return self.name

    handler.client_address = ("2001:db8::7", 4000, 0, 0)
    header = parse(handler.proxy_header(FakeSocket(("192.0.2.1", 80))))  # type: ignore[arg-type]
    assert header is not None
    assert (header.family, header.source) == (socket.AF_INET6, ("2001:db8::7", 4000))
    assert header.destination is not None
    destination = ipaddress.IPv6Address(header.destination[0])
    assert (destination.ipv4_mapped, header.destination[1]) == (ipaddress.IPv4Address("192.0.2.1"), 80)
    handler.client_address = ""  # a Unix socket listener
    header = parse(handler.proxy_header(FakeSocket("/run/relay.sock")))  # type: ignore[arg-type]
    assert header is not None
    assert (header.command, header.source) == ("LOCAL", None)


@pytest.mark.parametrize(("settings", "message"), [
    ({"upstreams": ("localhost", 80)}, "is not a (host, port) pair"),
    ({"upstreams": "localhost:80"}, "must be a tuple of (host, port) pairs"),
    ({"upstreams": (("localhost", 0),)}, "port in 1-65535"),
    ({"upstreams": (("localhost", "80"),)}, "port in 1-65535"),
    ({"buffer_size": 0}, "buffer_size must be a positive number of bytes"),
    ({"connect_timeout": 0}, "connect_timeout must be positive seconds"),
    ({"idle_timeout": -1.0}, "idle_timeout must be positive seconds or None"),
])
def test_configuration_errors_at_class_creation(settings: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError)) as caught:
        type("Bad", (RelayHandler,), settings)
    assert message in str(caught.value)
    assert str(caught.value).startswith("Bad.")


def test_upstreams_list_is_normalised_to_tuples() -> None:
    cls: type[RelayHandler] = type("Listed", (RelayHandler,), {"upstreams": [["127.0.0.1", 7000]]})
    assert cls.upstreams == (("127.0.0.1", 7000),)


# -- bounded buffering -------------------------------------------------------------------------------------


def kernel_queued(sock: socket.socket, request: int) -> int:
    """Bytes the kernel holds for ``sock``: ``termios.FIONREAD`` (to read) or ``TIOCOUTQ`` (not yet acked)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0])


def test_slow_reader_slows_the_writer(start: StartServer) -> None:
    sink = start(SlowSinkHandler)
    relay_sockets: queue.SimpleQueue[tuple[socket.socket, socket.socket]] = queue.SimpleQueue()

    class Observed(RelayHandler):
        def connect_upstream(self) -> socket.socket | None:
            upstream = super().connect_upstream()
            assert upstream is not None
            relay_sockets.put((self.request, upstream))
            return upstream

    relay = start(relay_class(sink.address, base=Observed))
    chunk = os.urandom(MiB)
    cap = 64 * MiB  # an unbounded relay would take all of this
    accepted = 0
    digest = hashlib.sha256()
    with connect(relay) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # our own kernel buffer stays small
        s.setblocking(False)
        while accepted < cap:
            try:
                n = s.send(memoryview(chunk)[accepted % MiB:])
            except BlockingIOError:
                # stalled: the sink reads nothing, so the relay must stop reading us
                _, writable, _ = select.select([], [s], [], 0.5)
                if not writable:
                    break
                continue
            digest.update(memoryview(chunk)[accepted % MiB:accepted % MiB + n])
            accepted += n
        # Everything we pushed is in a kernel buffer on the way, or in the relay's one buffer:
        # the relay's own memory holds at most buffer_size. (The total is dominated by the
        # kernel's autotuned send buffer of the relay's upstream socket, tcp_wmem's maximum.)
        relay_client, relay_upstream = relay_sockets.get(timeout=1)
        sink_socket = sink.sockets.get(timeout=1)
        in_kernel = (kernel_queued(s, termios.TIOCOUTQ) + kernel_queued(relay_client, termios.FIONREAD)
                     + kernel_queued(relay_upstream, termios.TIOCOUTQ) + kernel_queued(sink_socket, termios.FIONREAD))
        assert 0 <= accepted - in_kernel <= RelayHandler.buffer_size
        assert accepted < 16 * MiB, f"the relay accepted {accepted / MiB:.1f} MiB from a client nobody reads"
        # nothing was lost: once the sink reads, it gets exactly what we sent
        s.setblocking(True)
        s.settimeout(5)
        s.shutdown(socket.SHUT_WR)
        sink.gate.set()
        assert sink.received.get(timeout=5) == (accepted, digest.hexdigest())
        assert s.recv(1) == b""
    relay.wait_finished()


# -- one relay loop per process ----------------------------------------------------------------------------


def rebuilt(sock: socket.socket, cls: type[socket.socket]) -> socket.socket:
    """The same connection as a ``cls`` object (``sock`` gives up its fd)."""
    return cls(sock.family, sock.type, sock.proto, sock.detach())


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prefork-relay")]


def test_one_loop_thread_relays_every_connection(start: StartServer) -> None:
    readers: set[threading.Thread] = set()  # threads that read from an upstream
    handlers: set[threading.Thread] = set()

    class Traced(socket.socket):
        def recv_into(self, *args: Any, **kwargs: Any) -> int:
            readers.add(threading.current_thread())
            return super().recv_into(*args, **kwargs)

    class Observed(RelayHandler):
        def connect_upstream(self) -> socket.socket | None:
            handlers.add(threading.current_thread())
            upstream = super().connect_upstream()
            return None if upstream is None else rebuilt(upstream, Traced)

    echo = start(EchoHandler)
    relay = start(relay_class(echo.address, base=Observed))
    clients = [connect(relay) for _ in range(10)]
    try:
        for i, s in enumerate(clients):
            s.sendall(b"client %d" % i)
        for i, s in enumerate(clients):
            assert recv_exact(s, len(b"client %d" % i)) == b"client %d" % i
    finally:
        for s in clients:
            s.close()
    relay.wait_finished(10)
    assert len(handlers) == 10  # ThreadingTCPServer: a thread per connection ...
    assert readers == {relay_loop_thread()}  # ... and one thread copying for all of them
    assert not readers & handlers
    assert relay_threads() == [relay_loop_thread()]


def test_interleaved_traffic_on_many_connections_stays_intact(start: StartServer) -> None:
    """Bulk transfers and ping-pong clients at once, through the one loop: every byte to its own client."""
    echo = start(EchoHandler)
    relay = start(relay_class(echo.address), record=True)
    failures: queue.SimpleQueue[str] = queue.SimpleQueue()

    def bulk(index: int) -> None:
        payload = os.urandom(200_000 + 997 * index)  # several buffer loads, a different size each
        with connect(relay, timeout=10) as s:

            def send() -> None:
                view = memoryview(payload)
                for at in range(0, len(payload), 7001 + index):  # odd-sized writes
                    s.sendall(view[at:at + 7001 + index])
                s.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            echoed = recv_all(s)
            sender.join(10)
        if hashlib.sha256(echoed).digest() != hashlib.sha256(payload).digest():
            failures.put(f"bulk client {index}: {len(echoed)} bytes back of {len(payload)}, or not the same")

    def ping(index: int) -> None:
        with connect(relay, timeout=10) as s:
            for turn in range(50):
                message = b"client %d turn %d;" % (index, turn) * (1 + turn % 5)
                s.sendall(message)
                got = recv_exact(s, len(message))
                if got != message:
                    failures.put(f"ping client {index} turn {turn}: {got[:40]!r}")
                    return

    threads = [threading.Thread(target=bulk, args=(i,)) for i in range(20)]
    threads += [threading.Thread(target=ping, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == []
    relay.wait_finished(40, timeout=10)
    expected = sum(200_000 + 997 * i for i in range(20))
    expected += sum(len(b"client %d turn %d;" % (i, turn) * (1 + turn % 5)) for i in range(20) for turn in range(50))
    record = relay.record  # type: ignore[attr-defined]
    assert (record.bytes_in, record.bytes_out, record.errors) == (expected, expected, 0)


def test_a_finished_connection_leaves_the_others_running(start: StartServer) -> None:
    echo = start(EchoHandler)
    relay = start(relay_class(echo.address))
    clients = [connect(relay) for _ in range(5)]
    try:
        for i, s in enumerate(clients):
            s.sendall(b"first %d" % i)
            assert recv_exact(s, len(b"first %d" % i)) == b"first %d" % i
        # one ends normally: EOF each way
        done = clients.pop(2)
        name = done.getsockname()
        done.shutdown(socket.SHUT_WR)
        assert done.recv(1) == b""
        done.close()
        assert relay.wait_finished() == [name]
        # one resets
        reset = clients.pop(0)
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()
        relay.wait_finished()
        # the rest go on, and a new connection joins them
        clients.append(connect(relay))
        for i, s in enumerate(clients):
            s.sendall(b"again %d" % i)
        for i, s in enumerate(clients):
            assert recv_exact(s, len(b"again %d" % i)) == b"again %d" % i
        assert relay.finished.empty()
    finally:
        for s in clients:
            s.close()
    relay.wait_finished(4)


def test_the_loop_survives_an_exception_on_one_connection(start: StartServer) -> None:
    class Faulty(socket.socket):
        """Fails on reading ``boom`` from the upstream, as a bug in a user's socket class would."""

        def recv_into(self, *args: Any, **kwargs: Any) -> int:
            n = super().recv_into(*args, **kwargs)
            if b"boom" in bytes(args[0][:n]):
                raise RuntimeError("injected failure")
            return n

    class Fragile(RelayHandler):
        def connect_upstream(self) -> socket.socket | None:
            upstream = super().connect_upstream()
            return None if upstream is None else rebuilt(upstream, Faulty)

    echo = start(EchoHandler)
    relay = start(relay_class(echo.address, base=Fragile), record=True)
    loop_thread = relay_loop_thread()
    with connect(relay) as steady, connect(relay) as doomed:
        steady.sendall(b"before")
        assert recv_exact(steady, 6) == b"before"
        doomed.sendall(b"boom")
        assert doomed.recv(10) == b""  # its connection is closed, nothing relayed
        assert relay.wait_finished() == [doomed.getsockname()]
        steady.sendall(b"after")
        assert recv_exact(steady, 5) == b"after"
        with connect(relay) as newcomer:
            newcomer.sendall(b"new")
            assert recv_exact(newcomer, 3) == b"new"
    relay.wait_finished(2)
    # the handler reported the failure (socketserver's handle_error) and the loop went on
    [error] = relay.errors
    relay.errors.clear()
    assert "RuntimeError: injected failure" in error
    assert "the relay loop failed on the connection from 127.0.0.1:" in error
    assert relay_loop_thread() is loop_thread and loop_thread.is_alive()


def test_idle_timeout_is_per_connection(start: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=RELAY_LOG)
    ended: queue.SimpleQueue[tuple[Any, float]] = queue.SimpleQueue()

    class Timed(RelayHandler):
        def handle(self) -> None:
            try:
                super().handle()
            finally:
                ended.put((self.client_address, time.monotonic()))

    echo = start(EchoHandler)
    relay = start(relay_class(echo.address, base=Timed, idle_timeout=0.4))
    with connect(relay) as busy, connect(relay) as idle:
        idle.sendall(b"once")
        assert recv_exact(idle, 4) == b"once"
        idle_since = time.monotonic()
        # the busy one talks for three times the timeout, a message every 0.1 s (pacing, not a wait)
        while time.monotonic() - idle_since < 1.2:
            busy.sendall(b"ping")
            assert recv_exact(busy, 4) == b"ping"
            time.sleep(0.1)
        assert idle.recv(1) == b""
        [(address, at)] = [ended.get(timeout=1)]
        assert address == idle.getsockname()
        assert 0.35 <= at - idle_since < 1.0
        busy.sendall(b"still here")
        assert recv_exact(busy, 10) == b"still here"
        assert ended.empty()
    relay.wait_finished(2)
    assert len([line for line in relay_lines(caplog, logging.INFO) if "idle for 0.4s" in line]) == 1


def test_short_connections_do_not_pile_up_timers(start: StartServer) -> None:
    echo = start(EchoHandler)
    relay = start(relay_class(echo.address, idle_timeout=300.0))
    with connect(relay) as keeper:  # open throughout: its timer, the first due, stays on top of the heap
        keeper.sendall(b"k")
        assert recv_exact(keeper, 1) == b"k"
        for i in range(3 * relay_module._STALE_TIMERS):
            with connect(relay) as s:
                s.sendall(b"%d" % i)
                assert recv_exact(s, len(b"%d" % i)) == b"%d" % i
            relay.wait_finished()
        # the other timers are of finished connections, due in 300 s: a heap holding them all would have 193
        assert len(relay_module._relay_loop()._timers) <= relay_module._STALE_TIMERS + 2
    relay.wait_finished()


def test_cancel_lets_go_of_the_sockets() -> None:
    """What an interrupted handle() does (FastExit in a sync worker): the loop drops the pair at once."""
    client_far, client = socket.socketpair()
    upstream, upstream_far = socket.socketpair()
    with client_far, client, upstream, upstream_far:
        for sock in (client, upstream):
            sock.setblocking(False)
        loop = relay_module._relay_loop()
        connection = relay_module._Connection(client, upstream, loop.read_buffer(1024), None, None)
        assert loop.submit(connection)
        client_far.sendall(b"relayed")
        upstream_far.settimeout(3)
        assert upstream_far.recv(100) == b"relayed"
        loop.cancel(connection)
        assert connection.ended.wait(3)
        assert (connection.error, connection.crash, connection.idle) == (None, None, False)
        client_far.sendall(b"not relayed")
        assert select.select([upstream_far], [], [], 0.2)[0] == []
        assert client.recv(100) == b"not relayed"  # still queued on the socket the loop let go of


def test_a_forked_child_starts_its_own_loop() -> None:
    """The daemon forks workers: a loop object copied by fork has no thread and must not be used."""
    parent_loop = relay_module._relay_loop()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report in one line, never return into pytest
        status = 1
        try:
            loop = relay_module._relay_loop()
            client_far, client = socket.socketpair()
            upstream, upstream_far = socket.socketpair()
            for sock in (client, upstream):
                sock.setblocking(False)
            connection = relay_module._Connection(client, upstream, loop.read_buffer(1024), None, None)
            loop.submit(connection)
            client_far.sendall(b"from the child")
            upstream_far.settimeout(3)
            got = upstream_far.recv(100)
            os.write(report_w, b"%d %d %d %s\n" % (loop.pid, loop is parent_loop, loop.thread.is_alive(), got))
            status = 0
        finally:
            os._exit(status)
    os.close(report_w)
    try:
        assert select.select([report_r], [], [], 10)[0], "the child did not report"
        report = os.read(report_r, 200)
    finally:
        os.close(report_r)
        _, status = os.waitpid(pid, 0)
    assert report == b"%d 0 1 from the child\n" % pid
    assert os.waitstatus_to_exitcode(status) == 0
    assert parent_loop.thread.is_alive() and relay_module._relay_loop() is parent_loop
