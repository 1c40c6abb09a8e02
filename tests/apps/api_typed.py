"""Typed use of prefork's Python API: tests/test_api.py checks it under ``mypy --strict`` (it is never run)."""

from __future__ import annotations

import asyncio
from socketserver import StreamRequestHandler

from prefork import OptionError, PreforkServer, ServerError, ServerOptions, serve


class EchoHandler(StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class Upper(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


async def line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()


def main() -> None:
    options: ServerOptions = {"workers": 2, "worker_class": "thread", "threads": 8, "graceful_timeout": 5.0}
    try:
        server = PreforkServer(("", 20000), EchoHandler, **options)
    except OptionError as exc:
        print(exc)
        return
    with server:
        server.serve_forever()
    try:
        serve(Upper, bind="127.0.0.1:20001", worker_class="async", max_connections=100, relay=())
        serve(line_echo, bind=["127.0.0.1:20002", ("::1", 20002), "unix:/tmp/echo.sock"], worker_class="async")
        serve("myapp.handlers:EchoHandler", name="myapp", control="/tmp/myapp.sock", log_level="warning")
    except ServerError as exc:
        print(exc)
