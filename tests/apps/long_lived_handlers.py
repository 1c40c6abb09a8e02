"""Handlers for tests/test_long_lived.py: long-lived connections, forked children, the drain signal."""

from __future__ import annotations

import asyncio
import os
import time
from socketserver import BaseRequestHandler


def _stray_child() -> int:
    """Fork a child that leaves the worker's session and outlives it; returns its pid to the parent."""
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(60)
        os._exit(0)
    return pid


class ForkingHandler(BaseRequestHandler):
    """Replies with the pid of a stray child it forked."""

    def handle(self) -> None:
        self.request.sendall(f"{_stray_child()}\n".encode())


async def forking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(f"{_stray_child()}\n".encode())
    await writer.drain()
    writer.close()


class ShutdownHandler(BaseRequestHandler):
    """Calls self.server.shutdown() as a socketserver user would to end the server, then says so."""

    def handle(self) -> None:
        self.server.shutdown()
        self.request.sendall(b"shut down\n")
