"""The worker lifecycle (prefork/workers/base.py) driven step by step, without forking.

A minimal worker class with a real scoreboard record, a pipe as its channel
to the master and real listening sockets: retire, stop, the orphan check,
the drain and PROXY decisions, and the graceful-timeout warning, each
asserted on what the master would read. Then the ``sync`` and ``async``
classes themselves, served in this process until they retire.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import wait_for
from prefork import logs
from prefork.channel import Channel, Decoder, Event, Message
from prefork.config import Config
from prefork.proxy_protocol import ProxyHeader
from prefork.scoreboard import Record
from prefork.workers import async_worker
from prefork.workers.async_worker import AsyncWorker
from prefork.workers.base import FAST_EXIT_SIGNALS, FastExit, WorkerLifecycle, WorkerOptions, heartbeat_interval
from prefork.workers.connection import ProxyPolicy
from prefork.workers.servers import SyncServer, ThreadServer, WorkerServer

LOG = "prefork.workers.base"


class Master:
    """The master's end of a worker's channel: a pipe, read without blocking."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.decoder = Decoder()

    def messages(self) -> list[Message]:
        out: list[Message] = []
        while True:
            try:
                data = os.read(self.r, 65536)
            except BlockingIOError:
                return out
            out += self.decoder.feed(data)

    def events(self) -> list[tuple[Event, str]]:
        return [(m.event, m.detail) for m in self.messages()]

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class FakeWorker(WorkerLifecycle):
    """The smallest worker class: it records what the lifecycle asks of its I/O."""

    def __init__(self, listeners: list[socket.socket], record: Record, options: WorkerOptions) -> None:
        super().__init__(listeners, record, options)
        self.calls: list[str] = []
        self.open = 0
        self.served = False

    def serve(self) -> None:
        self.served = True

    def stop_accepting(self) -> None:
        self.calls.append("stop_accepting")

    def open_connections(self) -> int:
        return self.open

    def fast_exit(self) -> None:
        raise FastExit("fast exit")

    def on_stopping(self) -> None:
        self.calls.append("on_stopping")

    def forget_listeners(self) -> None:
        self.calls.append("forget_listeners")


def listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


@pytest.fixture
def master() -> Iterator[Master]:
    m = Master()
    yield m
    m.close()


MakeWorker = Callable[..., FakeWorker]


@pytest.fixture
def make_worker(master: Master) -> Iterator[MakeWorker]:
    made: list[FakeWorker] = []

    def factory(**settings: Any) -> FakeWorker:
        settings.setdefault("master_pid", os.getppid())  # our parent: not orphaned
        options = WorkerOptions(slot=2, channel=Channel(master.w), **settings)
        worker = FakeWorker([listener(), listener()], Record(), options)
        made.append(worker)
        return worker

    yield factory
    for worker in made:
        for sock in worker.listeners:
            sock.close()


# -- its own memory ----------------------------------------------------------------------------------------


def test_a_worker_tells_the_master_once_when_its_own_memory_passed_the_limit(make_worker: MakeWorker,
                                                                               master: Master) -> None:
    roomy = make_worker(memory_limit=2**40)
    roomy.count_accepted()
    assert master.events() == []
    tight = make_worker(memory_limit=1)  # one byte: any process is over it
    tight.count_accepted()
    tight.count_accepted()  # within MEMORY_LOOK of the first look: not looked at again
    tight.look_at_memory(time.monotonic() + 3600)  # and once told, never again
    events = master.events()
    assert [e for e, _ in events] == [Event.GREW] and int(events[0][1]) > 1_000_000
    off = make_worker()  # --max-worker-memory 0: never looks
    off.count_accepted()
    assert master.events() == []


# -- stop and retire -------------------------------------------------------------------------------------


def test_retire_sends_retiring_then_stopped_once(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker()
    worker.retire("max-requests (5) reached")
    worker.retire("again")
    worker.begin_stop()
    assert master.events() == [(Event.RETIRING, "max-requests (5) reached"), (Event.STOPPED, "")]
    assert worker.stopping
    assert worker.calls == ["stop_accepting", "on_stopping"]


def test_begin_stop_twice_is_one_stop(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker(graceful_timeout=7.0)
    worker.begin_stop()
    deadline = worker.stop_deadline
    worker.begin_stop()
    assert master.events() == [(Event.STOPPED, "")]
    assert worker.calls == ["stop_accepting", "on_stopping"]  # the deadline is started once
    assert worker.stop_deadline == deadline
    assert not worker.listeners_closed  # the master is there: the listeners stay open for it


def test_retire_after_a_stop_tells_the_master_nothing(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker()
    worker.begin_stop()
    worker.retire("max-requests (1) reached")
    assert master.events() == [(Event.STOPPED, "")]


def test_max_requests_counts_accepted_connections(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker(max_requests=3)
    worker.count_accepted()
    worker.count_accepted()
    assert master.events() == []
    worker.count_accepted()
    assert master.events() == [(Event.RETIRING, "max-requests (3) reached"), (Event.STOPPED, "")]
    worker.count_accepted()  # one already accepted in the same batch: no second retirement
    assert master.events() == []
    assert worker.accepted == 4


def test_no_max_requests_never_retires(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker(max_requests=0)
    for _ in range(1000):
        worker.count_accepted()
    assert master.events() == []
    assert not worker.stopping


# -- the orphan check --------------------------------------------------------------------------------------


def test_not_orphaned_while_the_master_is_our_parent(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker()
    assert not worker.orphaned()
    worker.check_master()
    assert not worker.stopping
    assert master.events() == []


def test_orphaned_worker_stops_and_frees_the_address(make_worker: MakeWorker, master: Master,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    worker = make_worker(master_pid=os.getpid())  # not our parent: the "master" is gone
    assert worker.orphaned()
    with caplog.at_level(logging.WARNING, logger=LOG):
        worker.check_master()
        worker.check_master()  # already stopping: said once
    assert [r.getMessage() for r in caplog.records if r.name == LOG] == [
        f"master (pid {os.getpid()}) is gone; stopping"]
    assert worker.stopping
    assert worker.listeners_closed
    assert all(sock.fileno() == -1 for sock in worker.listeners)
    assert master.events() == [(Event.STOPPED, "")]
    assert worker.calls == ["stop_accepting", "stop_accepting", "forget_listeners", "on_stopping"]


# -- the drain for a load balancer -------------------------------------------------------------------------


def test_close_listeners_closes_them_once(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker()
    worker.close_listeners()
    worker.close_listeners()
    assert worker.listeners_closed
    assert all(sock.fileno() == -1 for sock in worker.listeners)
    assert worker.calls == ["stop_accepting", "forget_listeners"]
    assert not worker.stopping  # open connections and the worker carry on
    assert master.events() == []


def header(command: str) -> ProxyHeader:
    source = ("192.0.2.1", 5000) if command == "PROXY" else None
    return ProxyHeader(version=2, command=command, family=socket.AF_INET if source else socket.AF_UNSPEC,
                       source=source, destination=None, length=16)


@pytest.mark.parametrize(("command", "lb_drain", "closed"), [
    ("LOCAL", 0, False),  # a health check is served like any connection...
    ("LOCAL", 1, True),  # ...unless the master drains this instance for its balancer
    ("PROXY", 0, False),
    ("PROXY", 1, False),  # clients' connections are never closed for the drain
])
def test_health_check_closed_only_while_draining_for_the_balancer(
        make_worker: MakeWorker, command: str, lb_drain: int, closed: bool) -> None:
    worker = make_worker()
    worker.record.lb_drain = lb_drain
    assert worker.closes_health_check(header(command)) is closed


def test_proxy_policy_applies_to_the_listed_peers_only(make_worker: MakeWorker) -> None:
    assert make_worker().proxy_for(("192.0.2.1", 80)) is None  # no --proxy-protocol
    policy = ProxyPolicy(networks=(), timeout=3.0)
    assert make_worker(proxy=policy).proxy_for("/run/app.sock") is policy  # no list: every peer
    listed = ProxyPolicy(networks=(ipaddress.ip_network("10.0.0.0/8"),), timeout=3.0)
    worker = make_worker(proxy=listed)
    assert worker.proxy_for(("10.1.2.3", 80)) is listed
    assert worker.proxy_for(("::ffff:10.1.2.3", 80, 0, 0)) is listed
    assert worker.proxy_for(("192.0.2.1", 80)) is None
    assert worker.proxy_for("") is None  # a Unix socket peer is not on a listed network


def test_bad_proxy_header_is_counted_and_logged_once(make_worker: MakeWorker,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    worker = make_worker()
    with caplog.at_level(logging.WARNING, logger=LOG):
        worker.proxy_header_failed(("2001:db8::1", 4000, 0, 0), "not a PROXY protocol header")
    assert worker.record.proxy_errors == 1
    assert [r.getMessage() for r in caplog.records if r.name == LOG] == [
        "connection from [2001:db8::1]:4000: not a PROXY protocol header; closing it"]


# -- signals, readiness, the end -----------------------------------------------------------------------------


def test_one_signal_table(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker()
    actions = worker.signal_actions()
    assert set(actions) == {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGQUIT,
                            signal.SIGWINCH,  # a sibling asks a stepped-back worker to look again (--balance)
                            signal.SIGHUP}  # the daemon stops: handlers wrap up while the queue is served
    assert {signal.SIGINT, signal.SIGQUIT} == FAST_EXIT_SIGNALS
    assert actions[signal.SIGUSR1] is logs.reopen
    for signum in FAST_EXIT_SIGNALS:
        with pytest.raises(FastExit):
            actions[signum]()
    actions[signal.SIGHUP]()
    assert worker.draining and not worker.stopping and not worker.listeners_closed
    actions[signal.SIGUSR2]()
    assert worker.listeners_closed and not worker.stopping
    actions[signal.SIGTERM]()
    assert worker.stopping
    assert master.events() == [(Event.STOPPED, "")]


def test_announce_ready_stamps_the_heartbeat_and_says_ready(make_worker: MakeWorker, master: Master) -> None:
    worker = make_worker()
    assert worker.record.heartbeat == 0.0
    worker.announce_ready()
    assert worker.record.heartbeat > 0.0
    assert master.events() == [(Event.READY, "")]


@pytest.mark.parametrize(("still_open", "warned"), [(0, False), (3, True)])
def test_graceful_timeout_warning(make_worker: MakeWorker, caplog: pytest.LogCaptureFixture,
                                  still_open: int, warned: bool) -> None:
    worker = make_worker()
    worker.open = still_open
    with caplog.at_level(logging.WARNING, logger=LOG):
        worker.run()
    assert worker.served
    expected = [f"worker 2 (pid {os.getpid()}): graceful timeout with 3 connection(s) still open; closing them"]
    assert [r.getMessage() for r in caplog.records if r.name == LOG] == (expected if warned else [])


@pytest.mark.parametrize(("timeout", "interval"), [(0.1, 0.05), (2.0, 0.5), (30.0, 5.0), (1000.0, 5.0)])
def test_heartbeat_interval(timeout: float, interval: float) -> None:
    assert heartbeat_interval(timeout) == interval


# -- the worker classes on the one lifecycle -----------------------------------------------------------------


def test_every_class_is_a_lifecycle() -> None:
    for cls in (SyncServer, ThreadServer, AsyncWorker):
        assert issubclass(cls, WorkerLifecycle)
    assert issubclass(WorkerServer, socketserver.TCPServer)


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """Serving installs the worker's signal delivery in this process: put pytest's back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in
             (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGQUIT)}
    try:
        yield
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def client(address: tuple[str, int], results: list[bytes]) -> threading.Thread:
    def talk() -> None:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"hello\n")
            results.append(s.makefile("rb").readline())

    thread = threading.Thread(target=talk, daemon=True)
    thread.start()
    return thread


def test_sync_server_serves_until_it_retires(master: Master, restore_signals: None) -> None:
    sock = listener()
    options = WorkerOptions(slot=0, master_pid=os.getppid(), channel=Channel(master.w), max_requests=1,
                            heartbeat_interval=0.05)
    server = SyncServer([sock], Echo, Record(), options)
    results: list[bytes] = []
    thread = client(sock.getsockname(), results)
    try:
        server.run()  # returns once the one connection it may take is served
    finally:
        server.server_close()
        sock.close()
    thread.join(10)
    assert results == [b"hello\n"]
    assert server.record.requests == 1
    assert master.events() == [(Event.READY, ""), (Event.RETIRING, "max-requests (1) reached"),
                               (Event.STOPPED, "")]


class TwoLines(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline() + self.rfile.readline())


def serve_sync(handler: type[socketserver.BaseRequestHandler], master: Master, requests: int,
               talk: Callable[[tuple[str, int], SyncServer], None]) -> tuple[SyncServer, list[int]]:
    """Serve ``requests`` connections in this thread while ``talk`` makes them; the fds Watch.begin saw."""
    sock = listener()
    options = WorkerOptions(slot=0, master_pid=os.getppid(), channel=Channel(master.w), max_requests=requests,
                            heartbeat_interval=0.05)
    server = SyncServer([sock], handler, Record(), options)
    begun: list[int] = []
    begin = server._watch.begin

    def spy(request: Any, *args: Any) -> None:
        begun.append(request.fileno())
        begin(request, *args)

    server._watch.begin = spy  # type: ignore[method-assign]
    thread = threading.Thread(target=talk, args=(sock.getsockname(), server), daemon=True)
    thread.start()
    try:
        server.run()
    finally:
        server.server_close()
        sock.close()
    thread.join(10)
    assert not thread.is_alive()
    return server, begun


def test_sync_server_watches_no_short_connection(master: Master, restore_signals: None) -> None:
    """A connection served within a watchdog tick costs the watch nothing (no registration, no thread hand-off)."""
    answers: list[bytes] = []

    def talk(address: tuple[str, int], server: SyncServer) -> None:
        for _ in range(20):
            with socket.create_connection(address, timeout=10) as s:
                s.sendall(b"hello\n")
                answers.append(s.makefile("rb").readline())

    server, begun = serve_sync(Echo, master, 20, talk)
    assert answers == [b"hello\n"] * 20
    assert len(begun) <= 10  # a watchdog tick (0.2 s) rarely falls inside a handler of a few milliseconds
    assert not server._watch.handled and not server._watch.admission.handling


def test_sync_server_watches_a_handler_that_overstays(master: Master, restore_signals: None) -> None:
    """A handler still running on a watchdog tick is registered with the watch (idle timeout, reclaim)."""
    answers: list[bytes] = []

    def talk(address: tuple[str, int], server: SyncServer) -> None:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(b"one\n")
            wait_for(lambda: server._watch.handled, 10, "the watchdog to register the handler")
            s.sendall(b"two\n")
            answers.append(s.makefile("rb").read())

    server, begun = serve_sync(TwoLines, master, 1, talk)
    assert answers == [b"one\ntwo\n"]
    assert len(begun) == 1
    assert not server._watch.handled and not server._watch.admission.handling  # forgotten at the handler's end


class AsyncEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.close()


seen_records: list[Any] = []  # what OwnBytes found in self.record as its connection was made


class OwnBytes(AsyncEcho):
    counts_bytes = True
    record: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        seen_records.append(self.record)  # set on the instance before connection_made runs
        super().connection_made(transport)


@pytest.mark.parametrize("handler", [AsyncEcho, OwnBytes])
def test_async_worker_serves_until_it_retires(master: Master, restore_signals: None,
                                              monkeypatch: pytest.MonkeyPatch, handler: type[AsyncEcho]) -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    def new_loop(kind: str | None = None) -> asyncio.AbstractEventLoop:
        loops.append(asyncio.new_event_loop())
        return loops[-1]

    monkeypatch.setattr(async_worker, "new_event_loop", new_loop)
    sock = listener()
    options = WorkerOptions(slot=1, master_pid=os.getppid(), channel=Channel(master.w), max_requests=1)
    record = Record()
    worker = AsyncWorker([sock], handler, Config(), record, options)
    results: list[bytes] = []
    thread = client(sock.getsockname(), results)
    try:
        worker.run()
    finally:
        for loop in loops:
            loop.close()
        asyncio.set_event_loop(None)
        sock.close()
    thread.join(10)
    assert results == [b"hello\n"]
    assert record.requests == 1
    assert master.events() == [(Event.READY, ""), (Event.RETIRING, "max-requests (1) reached"),
                               (Event.STOPPED, "")]
    if handler is OwnBytes:
        assert len(seen_records) == 1 and seen_records[0] is record
        assert OwnBytes.record is None  # an instance attribute: the class is not changed
        assert worker.counts_own_bytes and not worker.count_bytes
