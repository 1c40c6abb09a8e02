"""TLS handshakes (and the PROXY header before them) of the ``sync`` and ``thread`` worker classes.

A connection on a TLS listener is not handed to the handler at once: its
PROXY header (when the policy asks for one: it comes in clear, before the
handshake, as HAProxy sends it) and its TLS handshake run non-blocking in
the worker's epoll loop, each bounded by its own timeout. So a client that
connects and says nothing costs a sync worker nothing but a descriptor and
an entry here until ``--tls-handshake-timeout``; other clients are served
meanwhile. Once the handshake is done the handler gets the connection as an
``ssl.SSLSocket`` (``self.request``), blocking again, as socketserver gives
a plain one.

The header is read without reading past it (peeked, then exactly its own
bytes received), so the ClientHello behind it stays in the kernel for
OpenSSL. Handshakes completed and failed (by reason) are counted in the
worker's scoreboard record; a connection that ends before its first TLS
byte (a TCP health check, a port probe) began none, so it is closed without
a failed one counted (:func:`prefork.workers.connection.handshake_begun`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefork import tls
from prefork.proxy_protocol import ProxyHeader, ProxyProtocolError, take_header
from prefork.tls import ServerTls
from prefork.workers.admission import MAX_PENDING_HANDSHAKES
from prefork.workers.connection import (
    ProxyPolicy,
    closed_before_handshake,
    handshake_begun,
    tls_handshake_failed,
)


@dataclass(eq=False)
class Pending:
    """One connection between ``accept()`` and the end of its handshake."""

    sock: socket.socket  # the raw socket, then the SSLSocket over it (same descriptor)
    peer: Any  # the client's address (the PROXY header's source once read)
    tls: ServerTls
    proxy: ProxyPolicy | None  # still to read a PROXY header under this policy
    deadline: float
    fd: int = -1
    header: bytearray = field(default_factory=bytearray)  # PROXY header bytes received so far
    wrapped: bool = False
    events: int = select.EPOLLIN


class Handshakes:
    """The connections of one worker in PROXY header or TLS handshake, on the worker's epoll.

    ``done(sslsock, peer)`` gets each connection whose handshake completed
    (the caller serves it); ``header_failed(peer, why)`` is told of a bad or
    missing PROXY header, ``closes_health_check(header)`` says whether a LOCAL
    header closes the connection at once, ``dropped()`` is told of each
    unfinished handshake dropped to make room. Everything runs in the
    worker's loop thread.

    There is no cap that closes the door: at
    :data:`~prefork.workers.admission.MAX_PENDING_HANDSHAKES` the oldest
    unfinished one is dropped for the new one, so a flood of stalled
    handshakes cannot keep a legitimate client (which finishes within a
    round trip or two) from completing.
    """

    def __init__(self, record: Any, done: Callable[[ssl.SSLSocket, Any], None],
                 header_failed: Callable[[Any, object], None],
                 closes_health_check: Callable[[ProxyHeader], bool],
                 dropped: Callable[[], None] = lambda: None) -> None:
        self.record = record
        self.done = done
        self.header_failed = header_failed
        self.closes_health_check = closes_health_check
        self.dropped = dropped
        self.epoll: select.epoll | None = None
        self.pending: dict[int, Pending] = {}
        self._deadlines: list[tuple[float, int, Pending]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self.pending)


    def watch_on(self, epoll: select.epoll) -> None:
        """Use ``epoll`` from now on (the worker made a new one): every pending connection moves to it."""
        self.epoll = epoll
        for item in self.pending.values():
            epoll.register(item.fd, item.events)

    def begin(self, sock: socket.socket, peer: Any, server_tls: ServerTls, proxy: ProxyPolicy | None) -> None:
        """Take a just-accepted connection on a TLS listener: header (if due) and handshake from here on."""
        assert self.epoll is not None
        while len(self.pending) >= MAX_PENDING_HANDSHAKES:  # the oldest unfinished one gives way
            oldest = next(iter(self.pending.values()))
            self._forget(oldest)
            _close(oldest.sock)
            self.dropped()
        sock.setblocking(False)
        timeout = proxy.timeout if proxy is not None else server_tls.handshake_timeout
        item = Pending(sock, peer, server_tls, proxy, 0.0, fd=sock.fileno())
        self.pending[item.fd] = item
        self._set_deadline(item, time.monotonic() + timeout)
        self.epoll.register(item.fd, item.events)
        self.step(item)  # the ClientHello is usually there already

    def on_event(self, fd: int) -> bool:
        """An event on ``fd``; False when it is not one of ours."""
        item = self.pending.get(fd)
        if item is None:
            return False
        self.step(item)
        return True

    def _set_deadline(self, item: Pending, deadline: float) -> None:
        item.deadline = deadline
        heapq.heappush(self._deadlines, (deadline, next(self._order), item))

    def next_deadline(self) -> float | None:
        while self._deadlines:
            deadline, _, item = self._deadlines[0]
            if self.pending.get(item.fd) is item and item.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)  # finished, or given a new deadline since
        return None

    def expire(self, now: float) -> None:
        """Close every connection whose header or handshake is past its deadline."""
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, _, item = heapq.heappop(self._deadlines)
            if item.proxy is not None:
                self._forget(item)
                self.header_failed(item.peer, f"no complete PROXY header within {item.proxy.timeout:g}s")
                _close(item.sock)
            else:
                self._fail(item, TimeoutError(f"no TLS handshake within {item.tls.handshake_timeout:g}s"))

    def close_all(self) -> None:
        """The worker is leaving: close what is still in handshake."""
        for item in list(self.pending.values()):
            self._forget(item)
            _close(item.sock)

    # -- one connection ---------------------------------------------------------------------------

    def step(self, item: Pending) -> None:
        """Move ``item`` on as far as it goes without blocking."""
        if item.proxy is not None and not self._read_header(item):
            return
        if not item.wrapped:
            try:
                begun = handshake_begun(item.sock)
            except OSError as exc:
                self._fail(item, exc)
                return
            if begun is None:
                self._want(item, select.EPOLLIN)
                return
            if not begun:
                self._forget(item)
                closed_before_handshake(item.peer)
                _close(item.sock)
                return
            try:
                item.sock = item.tls.context.wrap_socket(item.sock, server_side=True,
                                                         do_handshake_on_connect=False)
            except OSError as exc:  # the client is gone already (ENOTCONN)
                self._fail(item, exc)
                return
            item.wrapped = True
        sslsock = item.sock
        assert isinstance(sslsock, ssl.SSLSocket)
        try:
            sslsock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(item, select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self._want(item, select.EPOLLOUT)
            return
        except (OSError, ValueError) as exc:  # ssl.SSLError, a reset, EOF in the middle
            self._fail(item, exc)
            return
        self._forget(item)
        tls.count_handshake(self.record, sslsock.version())
        self.done(sslsock, item.peer)

    def _read_header(self, item: Pending) -> bool:
        """Read the PROXY header without reading past it; True once it is read (or was not due)."""
        assert item.proxy is not None
        try:
            while (header := take_header(item.sock, item.header)) is None:
                pass  # a header that arrived in pieces, taken so far: look again (the peek says when to stop)
        except BlockingIOError:
            return False  # the rest has not arrived: the loop calls again when the socket is readable
        except (ProxyProtocolError, OSError) as exc:
            self._forget(item)
            self.header_failed(item.peer, exc if isinstance(exc, ProxyProtocolError) else
                               f"connection failed before the PROXY header completed: {exc}")
            _close(item.sock)
            return False
        item.proxy = None
        self._set_deadline(item, time.monotonic() + item.tls.handshake_timeout)  # the handshake's own
        if self.closes_health_check(header):
            self._forget(item)
            _close(item.sock)
            return False
        if header.command == "PROXY" and header.source is not None:
            item.peer = header.source
        return True

    def _want(self, item: Pending, events: int) -> None:
        if events != item.events and self.epoll is not None:
            item.events = events
            self.epoll.modify(item.fd, events)

    def _forget(self, item: Pending) -> None:
        if self.pending.pop(item.fd, None) is not None and self.epoll is not None:
            with contextlib.suppress(OSError, ValueError):  # an epoll made since never had it, or is closed
                self.epoll.unregister(item.fd)

    def _fail(self, item: Pending, exc: BaseException) -> None:
        """The handshake failed: count it by reason, say so in one line, close the connection."""
        self._forget(item)
        tls_handshake_failed(self.record, item.peer, exc)
        _close(item.sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
