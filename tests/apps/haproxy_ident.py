"""Says which instance serves the connection and whom it sees, then echoes.

First line: ``SERVER_PORT CLIENT_HOST CLIENT_PORT\\n`` (the port this instance
listens on, and ``client_address`` as the handler sees it: behind HAProxy with
PROXY protocol, the original client). Then every byte comes back.
"""

from socketserver import BaseRequestHandler


class IdentHandler(BaseRequestHandler):
    def handle(self) -> None:
        server_port = self.request.getsockname()[1]
        host, port = self.client_address[0], self.client_address[1]
        self.request.sendall(f"{server_port} {host} {port}\n".encode())
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)
