"""The built-in echo handler: every byte a client sends comes back."""

from __future__ import annotations

import socket
import socketserver


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo until the client closes its side, then close ours.

    The recipe's ``BaseRequestHandler`` echo, with ``sendall`` so a short
    ``send`` never loses bytes, and Nagle disabled so an echo that arrives in
    several pieces is not held back waiting for the client's delayed ACK.
    """

    def setup(self) -> None:
        if self.request.family != socket.AF_UNIX:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        recv = self.request.recv
        sendall = self.request.sendall
        while True:
            data = recv(65536)
            if not data:
                return
            sendall(data)
