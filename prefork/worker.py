"""The worker's life: reset signals, load the handler, serve, always end in ``os._exit``.

A worker serves the listening sockets the master bound, with a socketserver
server whose ``serve_forever()`` is a selector loop (not socketserver's 0.5 s
poll): the listeners are non-blocking and registered with ``EPOLLEXCLUSIVE``,
so a new connection wakes one idle worker rather than all of them, and a
worker that loses the accept race gets ``EAGAIN`` instead of blocking in
``accept()``. Each turn of the loop stamps the worker's heartbeat in the
scoreboard; the master kills a worker whose heartbeat goes stale.

Two server classes run any ``socketserver.BaseRequestHandler`` subclass:

* :class:`SyncServer` (``--worker-class sync``): ``TCPServer`` semantics, one
  connection at a time, handled in the serving loop itself.
* :class:`ThreadServer` (``--worker-class thread``): a bounded pool of
  threads; when every thread is busy the worker stops accepting, so the
  kernel hands new connections to its siblings.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import importlib
import ipaddress
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from prefork import logs
from prefork.config import Config
from prefork.listeners import ACCEPT_PAUSE, accept_failed, watch
from prefork.proxy_protocol import ProxyProtocolError, read_header
from prefork.scoreboard import Record, Scoreboard

log = logging.getLogger(__name__)

# Exit statuses a worker uses to tell the master why it ended.
WORKER_OK = 0
WORKER_CRASHED = 1
WORKER_BOOT_ERROR = 3  # the handler could not be loaded: respawning would only fail again

_PR_SET_PDEATHSIG = 1
_ACCEPT_BATCH = 16  # connections accepted per readiness event before the loop polls again

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - every Linux libc loads; other systems fall back to the ppid check
    _libc = None


class FastExit(BaseException):
    """Raised by SIGINT/SIGQUIT in a worker: leave now, skipping the drain.

    A BaseException so socketserver's ``except Exception`` around a request
    does not swallow it.
    """


@dataclass(frozen=True)
class ProxyPolicy:
    """Which peers must start with a PROXY protocol header, and how long it may take."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # empty: every peer
    timeout: float

    @classmethod
    def from_config(cls, config: Config) -> ProxyPolicy | None:
        if not config.proxy_protocol:
            return None
        networks = tuple(ipaddress.ip_network(c, strict=False) for c in config.proxy_allow)
        return cls(networks=networks, timeout=config.proxy_timeout)

    def applies(self, client_address: Any) -> bool:
        if not self.networks:
            return True
        if not isinstance(client_address, tuple):
            return False  # a Unix socket peer: not one of the listed networks
        ip = ipaddress.ip_address(client_address[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


class HandlerLoadError(Exception):
    """The handler named in the config cannot be imported or is not usable."""


@dataclass(frozen=True)
class WorkerSpec:
    """What the master tells a worker it is about to fork."""

    slot: int
    generation: int
    record: int  # scoreboard index
    master_pid: int
    config: Config
    listeners: tuple[socket.socket, ...]
    notify_fd: int  # write end of the master's event pipe
    max_requests: int  # 0 = never recycle; jitter already applied


def load_handler(spec: str, worker_class: str = "thread") -> Any:
    """Import ``module:name`` and check it is a handler ``worker_class`` can run.

    ``sync`` and ``thread`` run ``socketserver.BaseRequestHandler`` subclasses;
    ``async`` runs ``asyncio.Protocol`` subclasses and ``async def handle(reader, writer)``.
    """
    from prefork.aio import is_async_handler

    obj = _import_object(spec)
    is_socketserver = isinstance(obj, type) and issubclass(obj, socketserver.BaseRequestHandler)
    if worker_class == "async":
        if is_socketserver:
            raise HandlerLoadError(f"cannot load handler {spec!r}: a socketserver handler runs under "
                                   "--worker-class sync or thread, not async")
        if not is_async_handler(obj):
            raise HandlerLoadError(f"cannot load handler {spec!r}: {obj!r} is not an asyncio.Protocol subclass "
                                   "or an async def handle(reader, writer) function")
        return obj
    if is_async_handler(obj):
        raise HandlerLoadError(f"cannot load handler {spec!r}: an asyncio handler runs under --worker-class async")
    if not is_socketserver:
        raise HandlerLoadError(
            f"cannot load handler {spec!r}: {obj!r} is not a socketserver.BaseRequestHandler subclass"
        )
    return obj


def _import_object(spec: str) -> Any:
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise HandlerLoadError(f"cannot load handler {spec!r}: no module named {exc.name!r}") from exc
        raise HandlerLoadError(f"cannot load handler {spec!r}: {type(exc).__name__}: {exc}") from exc
    except BaseException as exc:  # the module's own code failed; say how, in one line
        where = ""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" ({tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})"
        raise HandlerLoadError(f"cannot load handler {spec!r}: {type(exc).__name__}: {exc}{where}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerLoadError(
                f"cannot load handler {spec!r}: {module_name} has no attribute {attr_path!r}"
            ) from None
    return obj


def handler_for(config: Config) -> Any:
    """Load the configured handler for the configured worker class, with the relay settings applied.

    The built-in echo has an asyncio form, used under ``async``; ``--relay``
    serves the built-in relay (or the user's relay subclass) in the form the
    worker class runs.
    """
    handler = load_handler(config.effective_handler, config.worker_class)
    if not config.relay:
        return handler
    from prefork.handlers.aio import RelayProtocol
    from prefork.handlers.relay import RelayHandler

    base: type[Any] = RelayProtocol if config.worker_class == "async" else RelayHandler
    if not (isinstance(handler, type) and issubclass(handler, base)):
        raise HandlerLoadError(f"--relay needs the built-in relay or a {base.__name__} subclass "
                               f"as the handler, not {config.handler!r}")
    settings = {
        "upstreams": config.relay_upstreams,
        "connect_timeout": config.relay_connect_timeout,
        "idle_timeout": config.relay_idle_timeout or None,
        "send_proxy": config.relay_send_proxy,
    }
    return type(handler.__name__, (handler,), {"__module__": handler.__module__, **settings})


class PreforkServer(socketserver.TCPServer):
    """A ``TCPServer`` serving sockets the master already bound.

    Keeps socketserver's hooks and their contracts (``verify_request``,
    ``process_request``, ``finish_request``, ``shutdown_request``,
    ``handle_error``), so a handler sees ``self.server`` and
    ``self.client_address`` as it would under ``TCPServer``. Subclasses
    override :meth:`process_request` and :meth:`busy`.
    """

    def __init__(
        self,
        listeners: Sequence[socket.socket],
        handler_class: type[socketserver.BaseRequestHandler],
        *,
        record: Record,
        max_requests: int = 0,
        heartbeat_interval: float = 1.0,
        graceful_timeout: float = 30.0,
        master_pid: int | None = None,
        on_retire: Callable[[str], None] | None = None,
        on_stop: Callable[[], None] | None = None,
        proxy: ProxyPolicy | None = None,
        count_bytes: bool = False,
    ) -> None:
        # TCPServer.__init__ would make a fresh socket; ours are bound already.
        socketserver.BaseServer.__init__(self, listeners[0].getsockname(), handler_class)
        self.socket = listeners[0]
        self.address_family = self.socket.family
        self.sockets = tuple(listeners)
        self.record = record
        self.max_requests = max_requests
        self.heartbeat_interval = heartbeat_interval
        self.graceful_timeout = graceful_timeout
        self.master_pid = master_pid
        self.on_retire = on_retire
        self.on_stop = on_stop
        self.proxy = proxy
        self.listeners_closed = False
        self.access_log = not logging.getLogger(logs.ACCESS_LOGGER).disabled
        # bytes per connection from the kernel, when someone looks at them (the relay counts its own)
        self.count_bytes = count_bytes and not getattr(handler_class, "counts_bytes", False)
        self.account = self.access_log or self.count_bytes
        self.accepted = 0
        self.stopping = False
        self.stop_deadline = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll = select.epoll()
        self._by_fd = {s.fileno(): s for s in self.sockets}
        self._accepting = False
        self._accept_paused_until = 0.0
        self._signals: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.begin_stop,
            signal.SIGUSR1: logs.reopen,
            signal.SIGUSR2: self.close_listeners,
        }
        # socketserver ignores these on a plain BaseRequestHandler; a user who sets them means them
        is_stream = issubclass(handler_class, socketserver.StreamRequestHandler)
        timeout = getattr(handler_class, "timeout", None)
        self._extra_timeout: float | None = None if is_stream else timeout
        self._extra_nodelay = not is_stream and bool(getattr(handler_class, "disable_nagle_algorithm", False))

    # -- wiring -------------------------------------------------------------------------------------

    @property
    def wakeup_fd(self) -> int:
        """The fd to pass to ``signal.set_wakeup_fd``: signal numbers arrive as bytes."""
        return self._wake_w.fileno()

    def wake(self) -> None:
        """Make the serving loop turn (a 0 byte: no signal has number 0). Safe from any thread."""
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def fileno(self) -> int:
        return self.socket.fileno()

    def server_close(self) -> None:
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop -----------------------------------------------------------------------------------

    def set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        for fd in self._by_fd:
            if on:
                watch(self._epoll, fd)
            else:
                self._epoll.unregister(fd)
        self._accepting = on
        self.record.serving = 1 if on else 0

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until asked to stop and drained. ``poll_interval`` is ignored: nothing here polls."""
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self.set_accepting(True)
        record = self.record
        wake_fd = self._wake_r.fileno()
        while True:
            now = time.monotonic()
            record.heartbeat = now
            if self.stopping:
                if not self.busy() or now >= self.stop_deadline:
                    break
                timeout = min(self.heartbeat_interval, self.stop_deadline - now)
            else:
                if (not self._accepting and now >= self._accept_paused_until and not self.full()
                        and not self.listeners_closed):
                    self.set_accepting(True)
                timeout = self.heartbeat_interval
                if self._accept_paused_until > now:
                    timeout = min(timeout, self._accept_paused_until - now)
            events = self._epoll.poll(timeout)
            if not events:
                self._check_master()
            # signals before connections: after a SIGTERM this worker must not take another one
            if any(fd == wake_fd for fd, _ in events):
                self._drain_wakeups()
            self.service_actions()
            for fd, _ in events:
                if fd != wake_fd and self._accepting:
                    # under load the backlog rarely empties: take a few in a row before polling again
                    sock = self._by_fd[fd]
                    for _ in range(_ACCEPT_BATCH):
                        if not self._accept(sock):
                            break
                        record.heartbeat = time.monotonic()
                        self.service_actions()
                        if not self._accepting:
                            break

    def _check_master(self) -> None:
        # PR_SET_PDEATHSIG covers most cases; this covers the rest (e.g. a master thread exiting)
        if self.master_pid is not None and os.getppid() != self.master_pid and not self.stopping:
            log.warning("master (pid %d) is gone; stopping", self.master_pid)
            self.begin_stop()

    def _drain_wakeups(self) -> None:
        while True:
            try:
                data = self._wake_r.recv(512)
            except BlockingIOError:
                return
            for signum in data:
                action = self._signals.get(signum)
                if action is not None:
                    action()

    def _accept(self, sock: socket.socket) -> bool:
        """Accept and process one connection; False when there was none to take."""
        try:
            request, client_address = sock.accept()
        except BlockingIOError:
            return False  # a sibling took it
        except OSError as exc:
            if accept_failed(sock, exc):
                self.set_accepting(False)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
            return False
        if self._extra_timeout is not None:
            request.settimeout(self._extra_timeout)
        if self._extra_nodelay and request.family != socket.AF_UNIX:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # socketserver's _handle_request_noblock, with our accept in front of it
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)
        # max-requests counts accepted connections, so a worker never takes one more than its limit
        self.accepted += 1
        if self.max_requests and self.accepted >= self.max_requests:
            self.retire()
        return True

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Read the PROXY header first when the policy asks for one, then run the handler.

        The handler sees the original client as ``client_address``. A health
        check (a ``LOCAL`` header) is served like any connection, unless the
        master set this instance to drain for its load balancer: then it is
        closed at once, so the balancer takes the instance out of its pool.
        """
        proxy = self.proxy
        if proxy is not None and proxy.applies(client_address):
            try:
                header, _ = read_header(request, timeout=proxy.timeout)
            except (ProxyProtocolError, TimeoutError) as exc:
                self.record.proxy_errors += 1
                log.warning("connection from %s: %s; closing it", _peer(client_address), exc)
                return
            if header.command == "LOCAL":  # a load balancer's health check
                if self.record.lb_drain:
                    return
                try:
                    super().finish_request(request, client_address)
                except ConnectionError as exc:  # balancers end their checks with a reset (HAProxy does)
                    log.debug("health check from %s: %s", _peer(client_address), exc)
                return
            if header.command == "PROXY" and header.source is not None:
                client_address = header.source
        if not self.account:
            super().finish_request(request, client_address)
            return
        started = time.monotonic()
        outcome = "error"
        try:
            super().finish_request(request, client_address)
            outcome = "ok"
        finally:
            counts = account(self.record if self.count_bytes else None, request)
            if self.access_log:
                log_access(client_address, started, counts, outcome)

    # -- hooks for subclasses -----------------------------------------------------------------------

    def busy(self) -> bool:
        """True while connections are open (a draining worker waits for this to turn False)."""
        return False

    def full(self) -> bool:
        """True while the worker cannot take another connection."""
        return False

    def close_listeners(self) -> None:
        """SIGUSR2 (``preforkctl drain`` without PROXY protocol): close our copies of the listening
        sockets, so once every process has, new connections are refused and a load balancer's
        connect check sees the instance down; open connections carry on."""
        self.set_accepting(False)
        self.listeners_closed = True
        for sock in self.sockets:
            sock.close()

    def begin_stop(self) -> None:
        """Stop accepting; the loop ends once open connections are done or the graceful timeout passes."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.graceful_timeout
        self.set_accepting(False)
        if self.master_pid is not None and os.getppid() != self.master_pid:
            # orphaned (the master was killed): free the address so a new master can bind it now
            self.close_listeners()
        if self.on_stop is not None:
            self.on_stop()  # the master holds a reload's reply until no old worker accepts

    def retire(self) -> None:
        """Recycle this worker: tell the master (it starts a replacement at once), then drain."""
        if self.stopping:
            return
        if self.on_retire is not None:
            self.on_retire(f"max-requests ({self.max_requests}) reached")
        self.begin_stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log the handler's exception (socketserver would print it to stderr); this connection only."""
        self.record.errors += 1
        exc = sys.exc_info()[1]
        if isinstance(exc, TimeoutError):
            log.warning("connection from %s timed out", _peer(client_address))
        elif isinstance(exc, ConnectionError):
            log.info("connection from %s: %s", _peer(client_address), exc)
        else:
            log.exception("error handling connection from %s", _peer(client_address))


_TCP_INFO_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received (Linux >= 4.1/4.6)
_TCP_INFO_BYTES_OFFSET = 120
_FIN_RECEIVED_STATES = frozenset({6, 8, 9, 11})  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING (tcp_states.h)
_access = logging.getLogger(logs.ACCESS_LOGGER)


def tcp_bytes(sock: Any) -> tuple[int, int] | None:
    """(bytes received, bytes sent and acknowledged) of a TCP connection, from the kernel's TCP_INFO."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 192)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_BYTES_OFFSET + _TCP_INFO_BYTES.size:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_OFFSET)
    if info[0] in _FIN_RECEIVED_STATES:
        received -= 1  # the peer's FIN takes a sequence number, not a byte
    return received, acked


def account(record: Record | None, sock: Any) -> tuple[int, int] | None:
    """A finished connection's (bytes in, bytes out), added to ``record`` when given."""
    counts = tcp_bytes(sock) if getattr(sock, "family", None) != socket.AF_UNIX else None
    if counts is not None and record is not None:
        record.bytes_in += counts[0]
        record.bytes_out += counts[1]
    return counts


_TCP_INFO_LAST_DATA_RECV = struct.Struct("=I")  # tcpi_last_data_recv, milliseconds
_TCP_INFO_LAST_DATA_RECV_OFFSET = 52


def tcp_last_data_recv_ms(sock: Any) -> int | None:
    """Milliseconds since the connection last received data, from TCP_INFO (None if unknown)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 64)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCP_INFO_LAST_DATA_RECV_OFFSET + 4:
        return None
    ms: int = _TCP_INFO_LAST_DATA_RECV.unpack_from(info, _TCP_INFO_LAST_DATA_RECV_OFFSET)[0]
    return ms


def log_access(client_address: Any, started: float, counts: tuple[int, int] | None, outcome: str) -> None:
    """One access-log line: peer, duration, bytes in and out (from the kernel, so any handler is covered)."""
    received, sent = counts if counts is not None else ("-", "-")
    _access.info("%s %.6fs in=%s out=%s %s", _peer(client_address), time.monotonic() - started,
                 received, sent, outcome)


def _peer(client_address: Any) -> str:
    if isinstance(client_address, tuple) and len(client_address) >= 2:
        host, port = client_address[0], client_address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(client_address) or "unix socket"


class SyncServer(PreforkServer):
    """One connection at a time, handled in the serving loop (socketserver ``TCPServer``)."""

    def process_request(self, request: Any, client_address: Any) -> None:
        record = self.record
        record.active += 1
        try:
            self.finish_request(request, client_address)
        finally:
            record.active -= 1
            record.requests += 1
        self.shutdown_request(request)


class ThreadServer(PreforkServer):
    """A bounded pool of ``threads`` threads; at capacity the worker stops accepting.

    Threads start on demand and stay for the worker's life, so a connection
    flood never creates more than ``threads`` of them and a steady load
    creates none.
    """

    def __init__(self, *args: Any, threads: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads = threads
        self._queue: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._open = 0  # connections handed to the pool and not yet finished
        # idle threads not yet promised a queued connection, less connections queued for no thread
        # (negative while every thread is busy or closing a socket: the next free one takes the work)
        self._spare = 0
        self._pool: list[threading.Thread] = []

    def busy(self) -> bool:
        return self._open > 0

    def full(self) -> bool:
        return self._open >= self.threads

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open += 1
            self.record.active += 1
            start_thread = self._spare <= 0 and len(self._pool) < self.threads
            if not start_thread:
                self._spare -= 1
        if start_thread:  # born promised to this connection
            thread = threading.Thread(target=self._run, name=f"prefork-conn-{len(self._pool)}", daemon=True)
            self._pool.append(thread)
            thread.start()
        self._queue.put((request, client_address))
        if self._open >= self.threads:
            self.set_accepting(False)  # siblings take new connections until a thread frees

    def _run(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except BaseException:  # SystemExit too: it would end this pool thread and leak its place
                self.handle_error(request, client_address)
            with self._lock:
                self._open -= 1
                self.record.active -= 1
                self.record.requests += 1
                turn_loop = self._open == self.threads - 1 or self.stopping
            if turn_loop:
                self.wake()  # the loop resumes accepting, or notices the drain is over
            self.shutdown_request(request)
            with self._lock:
                self._spare += 1


def _set_pdeathsig(signum: int) -> None:
    if _libc is not None and _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        log.debug("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))


def _raise_fast_exit(signum: int, frame: FrameType | None) -> None:
    raise FastExit(signal.Signals(signum).name)


def _noop(signum: int, frame: FrameType | None) -> None:
    """Python-level handler that does nothing: the wakeup fd carries the signal to the loop."""


def _notify(fd: int, event: str, detail: str = "") -> None:
    """One line to the master's event pipe (atomic: well under PIPE_BUF)."""
    line = f"{os.getpid()} {event} {detail}".replace("\n", " ")[:3000] + "\n"
    with contextlib.suppress(OSError):  # the master is gone: nothing to tell
        os.write(fd, line.encode("utf-8", "replace"))


def run_worker(spec: WorkerSpec, scoreboard: Scoreboard) -> NoReturn:
    """Serve as a worker in a freshly forked child; never returns."""
    status = WORKER_CRASHED
    try:
        status = _serve(spec, scoreboard)
    except FastExit:
        status = WORKER_OK
    except BaseException:
        log.exception("worker %d (pid %d) crashed", spec.slot, os.getpid())
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
        os._exit(status)


def _serve(spec: WorkerSpec, scoreboard: Scoreboard) -> int:
    _set_pdeathsig(signal.SIGTERM)
    if os.getppid() != spec.master_pid:  # the master died before prctl took effect
        return WORKER_OK
    for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, _raise_fast_exit)
    signal.signal(signal.SIGQUIT, _raise_fast_exit)
    signal.signal(signal.SIGTERM, _noop)
    signal.signal(signal.SIGUSR1, _noop)
    signal.signal(signal.SIGUSR2, _noop)
    # SIGABRT from the master (a stale heartbeat), or a crash in C code: every thread's stack to the log
    faulthandler.enable(file=logs.fault_stream(), all_threads=True)
    logs.set_title(f"worker {spec.slot}", spec.config.name)

    config = spec.config
    try:
        handler_class = handler_for(config)
    except HandlerLoadError as exc:
        _notify(spec.notify_fd, "boot_error", str(exc))
        return WORKER_BOOT_ERROR

    record = scoreboard[spec.record]

    def retire(reason: str) -> None:
        _notify(spec.notify_fd, "retiring", reason)

    common: dict[str, Any] = {
        "record": record,
        "max_requests": spec.max_requests,
        "heartbeat_interval": heartbeat_interval(config.timeout),
        "graceful_timeout": config.graceful_timeout,
        "master_pid": spec.master_pid,
        "on_retire": retire,
        "on_stop": lambda: _notify(spec.notify_fd, "stopped"),
        "proxy": ProxyPolicy.from_config(config),
        "count_bytes": config.count_bytes,
    }
    if config.worker_class == "async":
        from prefork import aio

        aio.serve(spec.listeners, handler_class, config, record, max_requests=spec.max_requests,
                  heartbeat_interval=heartbeat_interval(config.timeout), master_pid=spec.master_pid,
                  on_retire=retire, on_stop=common["on_stop"], on_ready=lambda: _notify(spec.notify_fd, "ready"),
                  proxy=common["proxy"])
        return WORKER_OK
    server: PreforkServer
    if config.worker_class == "sync":
        server = SyncServer(spec.listeners, handler_class, **common)
    else:
        server = ThreadServer(spec.listeners, handler_class, threads=config.threads, **common)
    signal.set_wakeup_fd(server.wakeup_fd, warn_on_full_buffer=False)
    # the master forked us with its signals blocked: what arrived meanwhile is delivered now
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    _notify(spec.notify_fd, "ready")
    server.serve_forever()
    if server.busy():
        log.warning("worker %d (pid %d): graceful timeout with %d connection(s) still open; closing them",
                    spec.slot, os.getpid(), record.active)
    return WORKER_OK


def heartbeat_interval(timeout: float) -> float:
    """How often an idle worker stamps its heartbeat: often enough that ``timeout`` means a hang."""
    return max(0.05, min(timeout / 4, 5.0))
