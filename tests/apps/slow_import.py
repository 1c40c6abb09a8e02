"""A handler module whose import takes ``SLOW_IMPORT_SECONDS`` (default 2): a generation is slow to start."""

from __future__ import annotations

import os
import time
from socketserver import BaseRequestHandler

time.sleep(float(os.environ.get("SLOW_IMPORT_SECONDS", "2")))


class Echo(BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)
