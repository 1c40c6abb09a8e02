"""``--metrics-bind HOST:PORT``: ``GET /metrics`` over HTTP, served inside the master's loop.

No thread and no HTTP framework: a non-blocking listener and clients in the
master's selector, each with a deadline, a request of at most 8 KiB, one
response, then close. Enough for Prometheus to scrape; nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable

from prefork.control import accept_batch

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
CLIENT_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


class MetricsServer:
    """Serves ``render()`` at /metrics on ``sock`` (already bound and listening)."""

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, render: Callable[[], str]) -> None:
        self.sock = sock
        self.selector = selector
        self.render = render
        self.clients: dict[socket.socket, tuple[float, bytearray, bytes]] = {}  # sock -> (deadline, in, out)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self, mask: int) -> None:
        for conn in accept_batch(self.sock, "metrics"):
            self.clients[conn] = (time.monotonic() + CLIENT_TIMEOUT, bytearray(), b"")
            self.selector.register(conn, selectors.EVENT_READ, lambda m, c=conn: self._on_client(c, m))

    def _on_client(self, conn: socket.socket, mask: int) -> None:
        _, inbuf, outbuf = self.clients[conn]
        if mask & selectors.EVENT_READ and not outbuf:
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            inbuf += data
            if b"\r\n\r\n" not in inbuf and b"\n\n" not in inbuf:
                if len(inbuf) > MAX_REQUEST:
                    self._respond(conn, _response("431 Request Header Fields Too Large", b"too large\n"))
                return
            self._respond(conn, self._answer(bytes(inbuf)))
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)

    def _answer(self, request: bytes) -> bytes:
        line = request.split(b"\n", 1)[0].decode("latin-1").strip().split()
        if len(line) < 2:
            return _response("400 Bad Request", b"bad request\n")
        method, path = line[0], line[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"GET /metrics\n")
        if path != "/metrics":
            return _response("404 Not Found", b"GET /metrics\n")
        try:
            body = self.render().encode()
        except Exception:  # a bug in rendering must not take the master down
            log.exception("metrics: rendering failed")
            return _response("500 Internal Server Error", b"rendering failed\n")
        response = _response("200 OK", body, CONTENT_TYPE)
        return response[: len(response) - len(body)] if method == "HEAD" else response

    def _respond(self, conn: socket.socket, response: bytes) -> None:
        inbuf = self.clients[conn][1]
        self.clients[conn] = (time.monotonic() + CLIENT_TIMEOUT, inbuf, response)
        self._flush(conn)

    def _flush(self, conn: socket.socket) -> None:
        deadline, inbuf, outbuf = self.clients[conn]
        try:
            sent = conn.send(outbuf)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        outbuf = outbuf[sent:]
        if not outbuf:
            self._close(conn)
            return
        self.clients[conn] = (deadline, inbuf, outbuf)
        self.selector.modify(conn, selectors.EVENT_WRITE, lambda m, c=conn: self._on_client(c, m))

    def _close(self, conn: socket.socket) -> None:
        self.clients.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def next_deadline(self) -> float | None:
        return min((d for d, _, _ in self.clients.values()), default=None)

    def expire(self, now: float) -> None:
        for conn, (deadline, _, _) in list(self.clients.items()):
            if now >= deadline:
                self._close(conn)

    def close(self) -> None:
        for conn in list(self.clients):
            self._close(conn)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.sock)
        self.sock.close()

    def close_in_child(self) -> None:
        for conn in list(self.clients):
            conn.close()
        self.sock.close()
