"""The handler scripts/bench_memory.py serves: its module builds about 100 MB of Python objects at import.

It stands for an application that loads a large table, a model or a
catalogue when it is imported. The first connection a worker serves runs a
full collection there, as a long-lived worker's collector eventually does:
without ``gc.freeze()`` that writes to every object the worker inherited.
"""

from __future__ import annotations

import gc
import socketserver

ROWS = 280_000  # about 100 MB: a tuple, an int, a str and a dict per row

TABLE = [(i, f"row number {i}", {"id": i, "even": i % 2 == 0}) for i in range(ROWS)]

_collected = False


class Handler(socketserver.StreamRequestHandler):
    """Echoes lines, and answers ``rows`` with the size of the table."""

    def handle(self) -> None:
        global _collected
        if not _collected:
            _collected = True
            gc.collect()
        for line in self.rfile:
            self.wfile.write(f"{len(TABLE)}\n".encode() if line == b"rows\n" else line)
