"""The recipe's ThreadingTCPServer with a StreamRequestHandler echo (one thread per client)."""

from __future__ import annotations

import sys
from socketserver import StreamRequestHandler, ThreadingTCPServer


class EchoHandler(StreamRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            self.request.sendall(data)


if __name__ == "__main__":
    ThreadingTCPServer.allow_reuse_address = True
    ThreadingTCPServer.daemon_threads = True
    ThreadingTCPServer.request_queue_size = 4096
    ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), EchoHandler).serve_forever()
