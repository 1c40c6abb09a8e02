"""Handlers for tests/test_lifecycle.py: misbehaving on purpose (hang, hold the GIL, die), or telling who served."""

from __future__ import annotations

import ctypes
import logging
import os
import time
from socketserver import BaseRequestHandler

log = logging.getLogger("lifecycle")


class SleepHandler(BaseRequestHandler):
    """Hangs in handle() (releasing the GIL): a sync worker's serving loop stops turning."""

    def handle(self) -> None:
        time.sleep(30)


class GilHoldHandler(BaseRequestHandler):
    """Sleeps in C code that keeps the GIL (PyDLL does not release it): no thread of the worker can run."""

    def handle(self) -> None:
        ctypes.PyDLL(None).sleep(30)


class ExitHandler(BaseRequestHandler):
    """Kills its worker on every connection."""

    def handle(self) -> None:
        os._exit(7)


class PidHandler(BaseRequestHandler):
    """Replies with the serving worker's pid, then closes."""

    def handle(self) -> None:
        self.request.sendall(str(os.getpid()).encode())


class LoggingEchoHandler(BaseRequestHandler):
    """Logs one line per connection (through the worker's logging), then echoes."""

    def handle(self) -> None:
        log.info("lifecycle connection served by pid %d", os.getpid())
        while True:
            data = self.request.recv(8192)
            if not data:
                return
            self.request.sendall(data)
