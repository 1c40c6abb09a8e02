"""TLS on the ``async`` worker class's listeners: the PROXY header, the handshake, the handover.

Why the worker runs the handshake itself rather than ``create_server(ssl=...)``:
there asyncio and uvloop report a failed handshake only in debug logs (the
handler's protocol never hears of the connection), so nothing could be
counted or bounded by this worker. And why not ``start_tls`` on the plain
transport: uvloop starts reading a new transport right after its
``connection_made``, whatever the protocol asked for, so the ClientHello (or
the bytes behind a PROXY header) would be read before ``start_tls`` could be
given them.

So the worker accepts on a TLS listener itself (:class:`TlsListener`, a
reader on the loop, closed to pause or stop as an ``asyncio.Server`` is),
and each connection's socket is the worker's, no transport made for it yet
(making one and dropping it, as the first version did, cost a tenth of the
TLS connection rate). :class:`TlsAccept` takes each one on:

* with ``--proxy-protocol`` (and the peer in ``--proxy-allow``) the header,
  which comes in clear before the handshake, is read without reading past it
  (peeked, then exactly its own bytes received, as
  :func:`prefork.proxy_protocol.read_header` does blocking), within
  ``--proxy-timeout``; a LOCAL header while the master drains for the load
  balancer closes the connection (its health check fails), as on plain
  listeners;
* the client's first TLS byte is awaited, peeked and left for OpenSSL: a
  connection that ends before it (a TCP health check, a port probe) began
  no handshake, so it is closed without a failed one counted
  (:func:`prefork.workers.connection.handshake_begun`, the rule of every
  worker class); the handshake's timeout runs from here;
* ``loop.connect_accepted_socket(..., ssl=context)`` runs the handshake,
  bounded by ``--tls-handshake-timeout``; a failure raises here, so it is
  counted by reason (:func:`prefork.tls.count_failure`) and logged in one
  line, and a completed handshake is counted with its version;
* the handler's protocol then gets the TLS transport (see :class:`Handover`).

A connection in its header or handshake counts among the worker's open
connections (the drain waits for it, ``--max-connections`` caps it, each is
bounded by its timeout) and among those accepted (``--max-requests``), but
in the scoreboard's ``active``/``requests`` only once a handler has it.

What a handler sees: a TLS transport (asyncio's or uvloop's), so
``get_extra_info("peercert")`` is the client's verified certificate (a dict
as ``SSLSocket.getpeercert()`` gives it; empty without ``--cert-reqs``),
``"ssl_object"`` the ``ssl.SSLObject`` (``version()``,
``selected_alpn_protocol()``, ``getpeercert(binary_form=True)``),
``"cipher"`` the negotiated cipher; from a stream handler the same through
``writer.get_extra_info``. ``"peername"`` is the PROXY header's source when
one was read. ``"socket"`` is the connection's TCP socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

from prefork import tls
from prefork.listeners import ACCEPT_PAUSE
from prefork.proxy_protocol import ProxyHeader, ProxyProtocolError, take_header
from prefork.tls import ServerTls
from prefork.workers.admission import ACCEPT_BATCH
from prefork.workers.connection import (
    ProxyPolicy,
    closed_before_handshake,
    format_peer,
    handshake_begun,
    tls_handshake_failed,
)


class TlsHost(Protocol):
    """What a TLS connection needs of its worker (:class:`prefork.workers.async_worker.AsyncWorker`)."""

    record: Any
    keeps_sockets: bool  # a TLS connection keeps a descriptor for the byte count at its end

    def begin_handshake(self) -> None: ...
    def end_handshake(self, handed_over: bool) -> None: ...
    def track(self, task: asyncio.Task[None]) -> None: ...
    def proxy_for(self, peer: Any) -> ProxyPolicy | None: ...
    def proxy_header_failed(self, peer: Any, why: object) -> None: ...
    def closes_health_check(self, header: ProxyHeader) -> bool: ...

log = logging.getLogger(__name__)


ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class ConnectionTransport:
    """A transport as the handler sees it when the worker knows more than the transport does.

    ``peername`` is the PROXY header's client. ``kept`` (TLS connections,
    when the worker or the handler counts bytes) is a descriptor of the
    connection held until the handler's connection has ended: a TLS
    transport tells its protocol ``connection_lost`` only after its socket
    is closed, too late to read the kernel's byte counts (``TCP_INFO``) from
    it; it is what ``get_extra_info("socket")`` gives. Everything else is the
    real transport's.
    """

    def __init__(self, transport: asyncio.Transport, peername: Any, kept: socket.socket | None = None) -> None:
        self._transport = transport
        self._peername = peername
        self._kept = kept
        # the hot methods as plain attributes: no __getattr__ on every write
        self.write = transport.write
        self.writelines = transport.writelines
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        if name == "socket" and self._kept is not None:
            return self._kept
        return self._transport.get_extra_info(name, default)

    def release(self) -> None:
        """The handler's connection has ended and its bytes are counted: let go of the kept descriptor."""
        if self._kept is not None:
            self._kept.close()
            self._kept = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def release(transport: Any) -> None:
    """Let go of what the worker held for a connection that has ended (see :class:`ConnectionTransport`)."""
    if isinstance(transport, ConnectionTransport):
        transport.release()


class TlsAccept:
    """A TLS listener's connections, as :class:`TlsListener` accepts them, each to its header and handshake."""

    def __init__(self, worker: TlsHost, server_tls: ServerTls, make_inner: ProtocolFactory) -> None:
        self.worker = worker
        self.server_tls = server_tls
        self.make_inner = make_inner

    def take(self, sock: socket.socket, peer: Any) -> None:
        """A connection :class:`TlsListener` accepted: to its PROXY header and handshake."""
        sock.setblocking(False)
        self.worker.begin_handshake()
        Handshake(self.worker, sock, peer, self.server_tls, self.make_inner).start()


class TlsListener:
    """Accepts a TLS listener's connections itself, with a reader on the event loop.

    Each connection goes straight to its handshake on its own socket, where
    a server made by ``loop.create_server`` would first build a plain
    transport for it only for :class:`TlsAccept` to abort it. Closed like an
    ``asyncio.Server`` (to pause, or to stop): the reader goes and the
    listener's duplicate is closed.
    """

    def __init__(self, sock: socket.socket, take: Callable[[socket.socket, Any], None],
                 failed: Callable[[socket.socket, OSError], bool]) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._take = take
        self._failed = failed  # True: out of resources, pause accepting a while
        self._closed = False
        self._paused: asyncio.TimerHandle | None = None
        self._ino = os.fstat(sock.fileno()).st_ino  # to tell our socket from a file that took its number
        self._loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(ACCEPT_BATCH):  # under load the queue rarely empties: a few per wake-up
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if self._failed(self._sock, exc) and not self._closed:
                    self._loop.remove_reader(self._sock.fileno())
                    self._paused = self._loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            self._take(conn, peer)
            if self._closed:  # the worker paused (at its cap, or for balance) or stopped
                return

    def _resume(self) -> None:
        self._paused = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._ready)

    def close(self) -> None:
        """Stop accepting and close our duplicate: unless a handler closed it already (the number may be
        another file's now, which is then left alone)."""
        if self._closed:
            return
        self._stop_reading()
        try:
            ours = os.fstat(self._sock.fileno()).st_ino == self._ino
        except OSError:
            ours = False
        if ours:
            self._sock.close()
        else:
            self._sock.detach()

    def abandon(self) -> None:
        """Its descriptor was closed under us (its number may be another file's now): stop, close nothing."""
        if not self._closed:
            self._stop_reading()
            self._sock.detach()

    def _stop_reading(self) -> None:
        self._closed = True
        if self._paused is not None:
            self._paused.cancel()
            return
        with contextlib.suppress(OSError, RuntimeError, ValueError):  # a number now another's, or closed
            self._loop.remove_reader(self._sock.fileno())


class Handshake:
    """One TLS connection from accept to its handler: PROXY header, handshake, handover, or failure."""

    def __init__(self, worker: TlsHost, sock: socket.socket, peer: Any, server_tls: ServerTls,
                 make_inner: ProtocolFactory) -> None:
        self.worker = worker
        self.sock = sock
        self.peer = peer  # the PROXY header's source once read
        self.proxied = False  # the peer is the header's
        self.server_tls = server_tls
        self.make_inner = make_inner
        self.pending = True  # counted in the worker's handshakes until handed over or failed
        self.owned = True  # the socket is ours to close (no transport has it yet)
        self.deadline = 0.0  # the loop's time the handshake must be done by (set once its first byte is awaited)

    def start(self) -> None:
        self.worker.track(asyncio.get_running_loop().create_task(self.run()))

    async def run(self) -> None:
        try:
            if await self._proxy_header() and await self._handshake_begun():
                self.owned = False  # the transport connect_accepted_socket makes owns (and closes) it
                await self._handshake()
        except asyncio.CancelledError:  # dropped to make room (the oldest unfinished), or the worker leaves
            if self.owned:
                self.sock.close()
            raise
        except Exception:  # a fault here costs this connection only, and says so
            self.worker.record.errors += 1
            log.exception("TLS connection from %s failed", format_peer(self.peer))
            if self.owned:
                self.sock.close()
        finally:
            self._end(handed_over=False)  # a no-op once handed over

    def _end(self, *, handed_over: bool) -> None:
        if self.pending:
            self.pending = False
            self.worker.end_handshake(handed_over=handed_over)

    async def _proxy_header(self) -> bool:
        """Read the PROXY header when this peer must send one; False when the connection was closed instead."""
        policy = self.worker.proxy_for(self.peer)
        if policy is None:
            return True
        try:
            async with asyncio.timeout(policy.timeout):
                header = await read_proxy_header(self.sock)
        except TimeoutError:
            why: object = f"no complete PROXY header within {policy.timeout:g}s"
        except ProxyProtocolError as exc:
            why = exc
        except OSError as exc:
            why = f"connection failed before the PROXY header completed: {exc.strerror or exc}"
        else:
            if self.worker.closes_health_check(header):
                self.sock.close()
                return False
            if header.command == "PROXY" and header.source is not None:
                self.peer, self.proxied = header.source, True
            return True
        self.worker.proxy_header_failed(self.peer, why)
        self.sock.close()
        return False

    async def _handshake_begun(self) -> bool:
        """Wait for the client's first TLS byte; False (the socket closed) when there is none to wait for.

        The handshake's time runs from here. A connection that ends before
        that byte is no failed handshake (:func:`handshake_begun`).
        """
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.server_tls.handshake_timeout
        try:
            async with asyncio.timeout_at(self.deadline):
                while (begun := handshake_begun(self.sock)) is None:
                    await _readable(loop, self.sock.fileno())
        except TimeoutError:
            self._failed(TimeoutError(f"no TLS handshake within {self.server_tls.handshake_timeout:g}s"))
            begun = False
        except OSError as exc:
            self._failed(exc)
            begun = False
        else:
            if not begun:
                closed_before_handshake(self.peer)
        if not begun:
            self.sock.close()
        return begun

    async def _handshake(self) -> None:
        server_tls = self.server_tls
        loop = asyncio.get_running_loop()
        deadline = self.deadline
        try:
            # The transport owns the socket from here, and closes it on failure. A connection the
            # handler has closed waits for the client's close_notify no longer than a handshake would.
            await loop.connect_accepted_socket(lambda: Handover(self), self.sock, ssl=server_tls.context,
                                               ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
                                               ssl_shutdown_timeout=server_tls.handshake_timeout)
        except Exception as exc:  # ssl.SSLError, a reset, the handshake timeout; never the handler's
            if self.pending:
                # the TLS layer's own timeout aborts the connection (its clock may round a little early)
                if isinstance(exc, ConnectionAbortedError) and loop.time() >= deadline - 0.05:
                    exc = TimeoutError(f"no TLS handshake within {server_tls.handshake_timeout:g}s")
                self._failed(exc)
            return
        if self.pending:  # the connection ended in the middle of the handshake without an error
            self._failed(ConnectionResetError("the connection closed in the middle of the handshake"))

    def _failed(self, exc: BaseException) -> None:
        tls_handshake_failed(self.worker.record, self.peer, exc)

    def hand_over(self, transport: asyncio.Transport) -> None:
        """The handshake is done: count it, and give the connection to the handler's protocol."""
        sslobj = transport.get_extra_info("ssl_object")
        tls.count_handshake(self.worker.record, sslobj.version() if sslobj is not None else None)
        self._end(handed_over=True)
        kept = None
        if self.worker.keeps_sockets:
            try:
                kept = socket.socket(self.sock.family, self.sock.type, self.sock.proto,
                                     fileno=os.dup(self.sock.fileno()))
            except OSError:  # out of descriptors: this connection's bytes go uncounted
                kept = None
        seen: Any = transport
        if kept is not None or self.proxied:
            seen = ConnectionTransport(transport, self.peer, kept)
        inner = self.make_inner()
        transport.set_protocol(inner)
        inner.connection_made(seen)


class Handover(asyncio.Protocol):
    """The protocol the TLS layer reports the finished handshake to; the handler's takes over at once.

    The TLS layer calls ``connection_made`` before it passes on any
    application data, so nothing needs holding here.
    """

    def __init__(self, handshake: Handshake) -> None:
        self.handshake = handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handshake.hand_over(transport)  # type: ignore[arg-type]


async def read_proxy_header(sock: socket.socket) -> ProxyHeader:
    """One PROXY header from the non-blocking ``sock``, and not a byte past it (the caller bounds the time).

    The TLS ClientHello behind it stays in the kernel
    (:func:`prefork.proxy_protocol.take_header`); a partial header is taken
    and the socket waited on for the rest. Raises :class:`ProxyProtocolError`
    for a malformed header or a connection closed first, ``OSError`` for a
    failed one.
    """
    loop = asyncio.get_running_loop()
    received = bytearray()
    while True:
        try:
            header = take_header(sock, received)
        except BlockingIOError:
            await _readable(loop, sock.fileno())
            continue
        if header is not None:
            return header


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until ``fd`` is readable (no transport owns it yet, so the loop lets us watch it)."""
    ready = loop.create_future()
    loop.add_reader(fd, _set_done, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
