"""``--metrics-bind HOST:PORT``: ``GET /metrics``, ``/healthz`` and ``/readyz`` over HTTP, inside the master's loop.

No thread and no HTTP framework: a non-blocking listener and clients in the
master's selector, each with a deadline, a request of at most 8 KiB, one
response, then close. Enough for Prometheus to scrape and for HTTP-only
health checkers (Kubernetes probes, HAProxy's ``option httpchk``, cloud
balancers): ``/healthz`` is 200 whenever it is answered, since it is answered
by the master's loop itself; ``/readyz`` is 200 while the daemon takes new
connections and 503 otherwise, with a one-line body saying why (see
:func:`prefork.agent.readiness`). Nothing else. The port
is unauthenticated, so the listener sits behind a
:class:`~prefork.control.ClientGate`: a bounded number of clients, the oldest
silent one closed to make room, and a pause when the master is out of
descriptors.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable

from prefork.control import ClientGate

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
CLIENT_TIMEOUT = 5.0
MAX_CLIENTS = 32  # scrapers held at once; the master lowers it to fit its descriptor limit
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
PATHS = b"GET /metrics, /healthz or /readyz\n"


def _response(status: str, body: bytes, content_type: str = TEXT) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


class MetricsServer:
    """Serves ``render()`` at /metrics, and ``ready()`` at /readyz, on ``sock`` (already bound and listening).

    ``ready`` returns (ready?, why); without it /readyz answers as /healthz.
    """

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, render: Callable[[], str],
                 max_clients: int = MAX_CLIENTS, ready: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.sock = sock
        self.selector = selector
        self.render = render
        self.ready = ready
        # sock -> (deadline, in, out), oldest first
        self.clients: dict[socket.socket, tuple[float, bytearray, bytes]] = {}
        sock.setblocking(False)
        self.gate = ClientGate(sock, selector, "metrics", self, self._on_accepted, max_clients)
        self.gate.start()

    def _on_accepted(self, conn: socket.socket) -> None:
        self.clients[conn] = (time.monotonic() + CLIENT_TIMEOUT, bytearray(), b"")
        self.selector.register(conn, selectors.EVENT_READ, lambda m, c=conn: self._on_client(c, m))

    def client_count(self) -> int:
        return len(self.clients)

    def has_idle(self) -> bool:
        return any(not outbuf for _, _, outbuf in self.clients.values())

    def evict_idle(self) -> None:
        """Close the oldest client not answered yet (a scraper sends its request at once)."""
        for conn, (_, _, outbuf) in self.clients.items():
            if not outbuf:
                self._close(conn)
                return

    def drop(self, sock: object) -> bool:
        """Close the client on ``sock`` (a callback of it failed); False when it is not one of ours."""
        if isinstance(sock, socket.socket) and sock in self.clients:
            self._close(sock)
            return True
        return False

    def _on_client(self, conn: socket.socket, mask: int) -> None:
        if conn not in self.clients:
            return  # closed earlier in this turn of the loop (to make room for a newcomer)
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
            return _response("405 Method Not Allowed", PATHS)
        try:
            if path == "/metrics":
                status, body, content_type = "200 OK", self.render().encode(), CONTENT_TYPE
            elif path == "/healthz":
                status, body, content_type = "200 OK", b"alive\n", TEXT  # we are answering: the loop turns
            elif path == "/readyz":
                ready, why = self.ready() if self.ready is not None else (True, "ready")
                status = "200 OK" if ready else "503 Service Unavailable"
                body, content_type = f"{why}\n".encode(), TEXT
            else:
                return _response("404 Not Found", PATHS)
        except Exception:  # a bug in rendering must not take the master down
            log.exception("metrics: answering %s failed", path)
            return _response("500 Internal Server Error", b"rendering failed\n")
        response = _response(status, body, content_type)
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
        if self.clients.pop(conn, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()
        self.gate.client_left()

    def next_deadline(self) -> float | None:
        deadlines = [d for d, _, _ in self.clients.values()]
        if self.gate.paused_until is not None:
            deadlines.append(self.gate.paused_until)
        return min(deadlines, default=None)

    def expire(self, now: float) -> None:
        for conn, (deadline, _, _) in list(self.clients.items()):
            if now >= deadline:
                self._close(conn)
        self.gate.expire(now)

    def close(self) -> None:
        for conn in list(self.clients):
            self._close(conn)
        self.gate.close()
        self.sock.close()

    def close_in_child(self) -> None:
        for conn in list(self.clients):
            conn.close()
        self.sock.close()
