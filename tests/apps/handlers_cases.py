"""Handlers for tests/test_worker_classes.py: each reports what socketserver gave it, or misbehaves on request."""

from __future__ import annotations

import socket
import socketserver
import time
from socketserver import BaseRequestHandler, StreamRequestHandler


class WhoHandler(BaseRequestHandler):
    """Replies with repr((client_address, server.server_address, isinstance(server, TCPServer))), then closes."""

    def handle(self) -> None:
        info = (self.client_address, self.server.server_address, isinstance(self.server, socketserver.TCPServer))
        self.request.sendall(repr(info).encode() + b"\n")


class StreamTimeoutHandler(StreamRequestHandler):
    """Line echo whose idle connections time out after 0.5 s (socketserver's own ``timeout`` option)."""

    timeout = 0.5

    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class PlainTimeoutHandler(BaseRequestHandler):
    """A plain BaseRequestHandler with ``timeout``: says the socket's timeout, then echoes."""

    timeout = 0.5

    def handle(self) -> None:
        self.request.sendall(repr(self.request.gettimeout()).encode() + b"\n")
        while True:
            data = self.request.recv(8192)
            if not data:
                return
            self.request.sendall(data)


def _nodelay(sock: socket.socket) -> bytes:
    return b"%d\n" % sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


class NagleOffHandler(StreamRequestHandler):
    disable_nagle_algorithm = True

    def handle(self) -> None:
        self.wfile.write(_nodelay(self.connection))


class NagleDefaultHandler(StreamRequestHandler):
    """socketserver's default (``disable_nagle_algorithm = False``): prefork turns Nagle off anyway (README)."""

    def handle(self) -> None:
        self.wfile.write(_nodelay(self.connection))


class NagleBackOnHandler(StreamRequestHandler):
    """Wants Nagle back, the way the README says to."""

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)

    def handle(self) -> None:
        self.wfile.write(_nodelay(self.connection))


class PlainNagleOffHandler(BaseRequestHandler):
    disable_nagle_algorithm = True

    def handle(self) -> None:
        self.request.sendall(_nodelay(self.request))


class _BufferReport(StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(f"{type(self.rfile).__name__} {type(self.wfile).__name__}\n".encode())


class DefaultBuffersHandler(_BufferReport):
    """socketserver's defaults: rbufsize = -1 (buffered reads), wbufsize = 0 (unbuffered writes)."""


class CustomBuffersHandler(_BufferReport):
    rbufsize = 0
    wbufsize = 65536


class BoomHandler(StreamRequestHandler):
    """Line echo that raises on the line ``boom``."""

    def handle(self) -> None:
        for line in self.rfile:
            if line.strip() == b"boom":
                raise RuntimeError(f"boom requested by {self.client_address[1]}")
            self.wfile.write(line)


class WorkHandler(BaseRequestHandler):
    """Echoes what arrives, and between arrivals works (sleeps, never blocked on its client) until it closes.

    A handler working on a request is never reclaimed for a waiting connection: the pool's bound shows.
    """

    def handle(self) -> None:
        while True:
            try:
                data = self.request.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            if not data:
                return
            self.request.sendall(data)
