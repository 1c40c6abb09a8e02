"""The recipe's ForkingTCPServer (one process per client)."""

from __future__ import annotations

import sys
from socketserver import BaseRequestHandler, ForkingTCPServer


class EchoHandler(BaseRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            self.request.sendall(data)


if __name__ == "__main__":
    ForkingTCPServer.allow_reuse_address = True
    ForkingTCPServer.request_queue_size = 4096
    ForkingTCPServer.max_children = 100000
    ForkingTCPServer(("127.0.0.1", int(sys.argv[1])), EchoHandler).serve_forever()
