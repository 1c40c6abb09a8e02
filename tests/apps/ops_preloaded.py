"""A handler module with 96 MiB of data made at import: under --preload the workers share it with the master."""

from __future__ import annotations

import os
from socketserver import BaseRequestHandler

TABLE = os.urandom(1024) * (96 * 1024)  # one object: workers read it, never write it (its pages stay shared)


class Lookup(BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(f"{len(TABLE)} {os.getpid()}\n".encode())
