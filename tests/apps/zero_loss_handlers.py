"""Handlers for tests/test_zero_loss.py: each connection takes a little while, so clients queue."""

from __future__ import annotations

import asyncio
import time
from socketserver import StreamRequestHandler

DELAY = 0.05


class SlowEcho(StreamRequestHandler):
    """Reads one line, thinks for DELAY seconds, sends it back."""

    def handle(self) -> None:
        line = self.rfile.readline()
        time.sleep(DELAY)
        self.wfile.write(line)


async def slow_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    await asyncio.sleep(DELAY)
    writer.write(line)
    await writer.drain()
