"""Handlers for tests/test_long_lived.py: long-lived connections, forked children, the drain signal."""

from __future__ import annotations

import asyncio
import os
import time
from socketserver import BaseRequestHandler

from prefork import drain


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


class DrainAwareEcho(BaseRequestHandler):
    """Echoes lines; once its worker drains, ends at the next line boundary with "bye".

    It looks after each read, so a line that was waiting (a client queued at a stop) is answered first.
    """

    timeout = 0.2  # prefork applies it to the connection: recv() wakes to look at the drain

    def handle(self) -> None:
        pending = b""
        while True:
            try:
                data = self.request.recv(8192)
            except TimeoutError:
                data = None
            if data == b"":
                return
            if data:
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.request.sendall(line + b"\n")
            if self.server.draining and not pending:  # type: ignore[attr-defined]
                self.request.sendall(b"bye\n")
                return


async def drain_aware_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The asyncio form: reads race the drain; ends with "bye" once the worker drains."""
    stop = asyncio.ensure_future(drain.wait())
    while True:
        read = asyncio.ensure_future(reader.readline())
        await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not read.done():
            read.cancel()
            break
        line = read.result()
        if not line:
            stop.cancel()
            writer.close()
            return
        writer.write(line)
        await writer.drain()
    writer.write(b"bye\n")
    await writer.drain()
    writer.close()


class ExitThreeHandler(BaseRequestHandler):
    """Ends its worker with status 3, the status a worker uses for a handler it cannot load."""

    def handle(self) -> None:
        os._exit(3)


class SecondEcho(BaseRequestHandler):
    """Reads a line, takes a second over it, sends it back: one sync worker serves one a second."""

    def handle(self) -> None:
        data = self.request.recv(100)
        time.sleep(1)
        self.request.sendall(data)


class SleepyEcho(BaseRequestHandler):
    """Echoes what it receives; on ``sleep`` it sleeps for an hour inside handle() (a handler stuck for good)."""

    def handle(self) -> None:
        while data := self.request.recv(8192):
            if data.startswith(b"sleep"):
                time.sleep(3600)
            self.request.sendall(data)


async def sleepy_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The asyncio form: on ``sleep`` it awaits an hour's sleep."""
    while data := await reader.read(8192):
        if data.startswith(b"sleep"):
            await asyncio.sleep(3600)
        writer.write(data)
        await writer.drain()
