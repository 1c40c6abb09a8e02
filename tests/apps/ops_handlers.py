"""Handlers for the operations tests."""

from __future__ import annotations

import os
from socketserver import BaseRequestHandler

_hoard: list[bytes] = []


class Hog(BaseRequestHandler):
    """Keeps 64 MiB per connection for the worker's life, then answers with its pid."""

    def handle(self) -> None:
        _hoard.append(os.urandom(1024) * (64 * 1024))
        self.request.sendall(f"{os.getpid()}\n".encode())


class WhoAmI(BaseRequestHandler):
    """Answers with the worker's uid and gid."""

    def handle(self) -> None:
        self.request.sendall(f"{os.getuid()} {os.getgid()}\n".encode())


class Leak(BaseRequestHandler):
    """Keeps 5 MiB (written, so resident) per connection for the worker's life, then answers with its pid."""

    def handle(self) -> None:
        _hoard.append(os.urandom(1024) * (5 * 1024))
        self.request.sendall(f"{os.getpid()}\n".encode())
