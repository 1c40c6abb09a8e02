"""What a user would pick instead: an asyncio Protocol echo server, optionally on
uvloop, optionally N forked processes sharing one listening socket."""

from __future__ import annotations

import asyncio
import os
import socket
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def serve(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, sock=sock, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    port, n, flavour = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    for _ in range(n - 1):
        if os.fork() == 0:
            break
    if flavour == "uvloop":
        import uvloop
        uvloop.run(serve(sock))
    else:
        asyncio.run(serve(sock))
