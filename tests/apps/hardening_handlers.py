"""Handlers that misbehave on purpose, one way each, for tests/test_hardening_workers.py.

Each reads one line first, so the test decides when the misbehaviour happens,
and an ordinary line is echoed back, so a second client can prove the daemon
still serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import socketserver
import subprocess
import sys
import time

CHILD_LIFETIME = 60.0  # a forked child sleeps this long unless a signal ends it


def close_listening_descriptors() -> int:
    """Close every listening socket descriptor of this process behind its owners' backs; how many."""
    closed = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            probe = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket (or already gone: the directory listing itself)
        try:
            listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 0
        probe.detach()
        if listening:
            os.close(fd)
            closed += 1
    return closed


def fork_sleeper() -> int:
    """Fork a child that sleeps CHILD_LIFETIME seconds holding all the worker holds (its listeners too)."""
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(CHILD_LIFETIME)
        finally:
            os._exit(0)
    return pid


class CloseServerSocket(socketserver.StreamRequestHandler):
    """``close`` closes ``self.server.socket``, the worker's listening socket; other lines are echoed."""

    def handle(self) -> None:
        for line in self.rfile:
            if line.strip() == b"close":
                self.server.socket.close()
            self.wfile.write(line)
            self.wfile.flush()


class Exits(socketserver.StreamRequestHandler):
    """``exit`` calls sys.exit(), ``interrupt`` raises KeyboardInterrupt; other lines are echoed."""

    def handle(self) -> None:
        for line in self.rfile:
            if line.strip() == b"exit":
                sys.exit(3)
            if line.strip() == b"interrupt":
                raise KeyboardInterrupt
            self.wfile.write(line)
            self.wfile.flush()


class ForkChild(socketserver.StreamRequestHandler):
    """``fork`` forks a sleeping child and replies with its pid; other lines are echoed."""

    def handle(self) -> None:
        for line in self.rfile:
            if line.strip() == b"fork":
                line = f"{fork_sleeper()}\n".encode()
            self.wfile.write(line)
            self.wfile.flush()


async def exits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``exit`` and ``interrupt`` as :class:`Exits`, in an ``async def handle``."""
    while line := await reader.readline():
        if line.strip() == b"exit":
            sys.exit(3)
        if line.strip() == b"interrupt":
            raise KeyboardInterrupt
        writer.write(line)
        await writer.drain()


async def fork_child(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``fork`` as :class:`ForkChild`, in an ``async def handle``."""
    while line := await reader.readline():
        if line.strip() == b"fork":
            line = f"{fork_sleeper()}\n".encode()
        writer.write(line)
        await writer.drain()


class CloseListeners(asyncio.Protocol):
    """``close`` closes every listening descriptor of the worker (an asyncio handler cannot reach them
    otherwise); other lines are echoed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if line.strip() == b"close":
                with contextlib.suppress(OSError):
                    close_listening_descriptors()
            self.transport.write(line + b"\n")


ORPHAN_LIFETIME = 2.0  # seconds an abandoned process lives: long enough for a test to see whose child it became


class LeavesAnOrphan(socketserver.StreamRequestHandler):
    """``orphan`` starts a shell that leaves a ``sleep`` behind it (a background job) and exits; the sleep,
    orphaned, is re-parented to the nearest subreaper or to PID 1. Every line is echoed."""

    def handle(self) -> None:
        for line in self.rfile:
            if line.strip() == b"orphan":
                subprocess.run(["sh", "-c", f"sleep {ORPHAN_LIFETIME:g} >/dev/null 2>&1 &"], check=True, timeout=10)
            self.wfile.write(line)
