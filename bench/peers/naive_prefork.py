"""The design card's literal shape, hand-written: bind one TCPServer, fork N
workers that each call serve_forever() (synchronous: one client per worker)."""

from __future__ import annotations

import os
import sys
from socketserver import BaseRequestHandler, TCPServer


class EchoHandler(BaseRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            self.request.sendall(data)


if __name__ == "__main__":
    TCPServer.allow_reuse_address = True
    TCPServer.request_queue_size = 4096
    serv = TCPServer(("127.0.0.1", int(sys.argv[1])), EchoHandler)
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    for _ in range(n):
        if os.fork() == 0:
            serv.serve_forever()
            os._exit(0)
    os.wait()
