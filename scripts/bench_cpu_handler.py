"""The handler scripts/bench_latency.py serves: an echo that burns about 200 µs of Python CPU per message.

It stands for an application whose every request costs real interpreter
work (parsing, a lookup, formatting). The work is a fixed number of turns of
a pure-Python loop, so each message costs the same CPU whatever else runs;
the count comes from ``BENCH_CPU_ITERS`` when set (scripts/bench_latency.py
calibrates it once, on the servers' CPU, and gives every server the same
figure), else it is calibrated at import.

  python scripts/bench_cpu_handler.py [MICROSECONDS]   # prints the loop count for that much CPU here
"""

from __future__ import annotations

import os
import socketserver
import sys
import time

TARGET_US = 200.0


def burn(iters: int) -> int:
    """Pure-Python work: ``iters`` turns of an integer loop (holds the GIL throughout)."""
    acc = 0
    for i in range(iters):
        acc = (acc + i * 7) & 0xFFFF
    return acc


def calibrate(target_us: float = TARGET_US) -> int:
    """Loop turns costing ``target_us`` of this thread's CPU: the median of about 0.3 s of timed runs."""
    probe = 5_000
    burn(probe * 20)  # warm up
    samples: list[float] = []
    start = time.thread_time_ns()
    while time.thread_time_ns() - start < 300_000_000 or len(samples) < 5:
        t0 = time.thread_time_ns()
        burn(probe)
        samples.append((time.thread_time_ns() - t0) / probe)  # ns per turn
    samples.sort()
    return max(1, round(target_us * 1000 / samples[len(samples) // 2]))


ITERS = int(os.environ.get("BENCH_CPU_ITERS") or calibrate())


class Handler(socketserver.BaseRequestHandler):
    """Echoes every chunk read, after ``ITERS`` turns of the loop (about 200 µs of CPU) per chunk."""

    def handle(self) -> None:
        sock = self.request
        while data := sock.recv(65536):
            burn(ITERS)
            sock.sendall(data)


if __name__ == "__main__":
    print(calibrate(float(sys.argv[1]) if len(sys.argv) > 1 else TARGET_US))
