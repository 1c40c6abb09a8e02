"""Handlers for the async worker class, in both shapes."""

from __future__ import annotations

import asyncio
import os
import time
from socketserver import BaseRequestHandler


class UpperProtocol(asyncio.Protocol):
    """A Protocol handler: echoes upper-cased."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


async def line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stream handler: the peer address, then a line echo."""
    peer = writer.get_extra_info("peername")
    writer.write(f"{peer[0]} {peer[1]} {os.getpid()}\n".encode())
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()


async def upper_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stream handler: echoes upper-cased until end of file."""
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()


async def failing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    raise RuntimeError("handler failed on purpose")


class Blocking(asyncio.Protocol):
    """Blocks the whole event loop on the first byte."""

    def data_received(self, data: bytes) -> None:
        time.sleep(30)


async def pid_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(f"{os.getpid()}\n".encode())
    await writer.drain()


class NotAsync(BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"sync")
