"""Replies with the client address the handler sees, then echoes."""

from socketserver import BaseRequestHandler


class PeerHandler(BaseRequestHandler):
    def handle(self) -> None:
        host, port = self.client_address[0], self.client_address[1]
        self.request.sendall(f"{host} {port}\n".encode())
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)
