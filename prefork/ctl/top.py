"""``preforkctl top``: a live table of the master and its workers.

Each refresh asks the daemon for ``status`` and ``stats``; request rates are
the difference of the ``requests`` counters between two refreshes divided by
the time between them, measured on the master's clock (``uptime_s``) so a slow
terminal does not skew them. Per-worker rates are keyed by pid: a worker seen
for the first time has no rate yet.

The screen is drawn with plain ANSI sequences (alternate screen, cursor home,
clear to end of line) and the keyboard read in cbreak mode, so no curses is
needed; the terminal is restored on every way out. Waiting between refreshes
is a ``select()`` on stdin with the time left as its timeout: a key press
answers at once, and nothing polls.

Errors (the daemon went away) are raised, after the terminal is restored, for
``preforkctl`` to turn into an exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from prefork.control import ControlError, DaemonNotRunning
from prefork.ctl.client import Call, Reply, Request, fetch_status_and_stats, snapshot
from prefork.ctl.errors import NotAnswering, UsageError
from prefork.ctl.render import format_share, human_age, human_bytes, optional_bytes, table

Fetch = Callable[[], tuple[dict[str, Any], dict[str, Any]]]

# the columns status has too are named and ordered as there (ACTIVE: the open connections, as in the JSON)
HEADERS = ["SLOT", "PID", "GEN", "STATE", "REQUESTS", "REQ/S", "ACTIVE", "SHARE", "RSS", "USS", "CPU%", "HEARTBEAT"]
RIGHT = frozenset({"PID", "GEN", "ACTIVE", "SHARE", "REQ/S", "REQUESTS", "RSS", "USS", "CPU%", "HEARTBEAT"})  # numbers
QUIT_KEYS = frozenset(b"qQ")

# ANSI control sequences (ECMA-48 plus the xterm alternate screen that every terminal emulator has)
ALT_SCREEN_ON = "\x1b[?1049h"
ALT_SCREEN_OFF = "\x1b[?1049l"
CURSOR_HIDE = "\x1b[?25l"
CURSOR_SHOW = "\x1b[?25h"
HOME = "\x1b[H"
CLEAR_LINE_END = "\x1b[K"
CLEAR_SCREEN_END = "\x1b[J"


@dataclass
class Sample:
    """The counters of one refresh that the next one needs for its rates."""

    master_pid: int
    clock: float  # the master's uptime_s when it answered stats
    requests: int
    worker_clock: float  # the master's uptime_s when it answered status
    worker_requests: dict[int, int] = field(default_factory=dict)


@dataclass
class Frame:
    """What one refresh shows: a header line and one row per worker."""

    header: str
    rows: list[list[str]]
    sample: Sample | None


def rate(now_count: int, now_clock: float, before_count: int | None, before_clock: float | None) -> float | None:
    """Events per second between two readings; None without a usable earlier one (first look, or a reset)."""
    if before_count is None or before_clock is None:
        return None
    elapsed = now_clock - before_clock
    if elapsed <= 0 or now_count < before_count:
        return None
    return (now_count - before_count) / elapsed


def format_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def build_frame(status: Mapping[str, Any], stats: Mapping[str, Any], previous: Sample | None) -> Frame:
    """The table for one refresh; ``previous`` is the last frame's sample (None on the first)."""
    sample = Sample(master_pid=int(stats["pid"]), clock=float(stats["uptime_s"]), requests=int(stats["requests"]),
                    worker_clock=float(status["uptime_s"]))
    if previous is not None and previous.master_pid != sample.master_pid:
        previous = None  # another master (a restart): its counters started again from zero
    total_rate = rate(sample.requests, sample.clock, previous.requests if previous else None,
                      previous.clock if previous else None)
    header = (
        f"{status['name']}: master pid {status['pid']}, {status['state']}, generation {status['generation']}, "
        f"up {human_age(float(status['uptime_s']))}, {len(status['workers'])}/{status['target_workers']} workers, "
        f"{stats['active']} open, {format_rate(total_rate)} req/s"
    )
    rows = []
    for w in status["workers"]:
        pid, requests = int(w["pid"]), int(w["requests"])
        sample.worker_requests[pid] = requests
        worker_rate = rate(requests, sample.worker_clock,
                           previous.worker_requests.get(pid) if previous else None,
                           previous.worker_clock if previous else None)
        rows.append([str(w["slot"]), str(pid), str(w["generation"]), str(w["state"]), str(requests),
                     format_rate(worker_rate), str(w["active"]), format_share(w.get("share")),
                     human_bytes(int(w["rss_bytes"])), optional_bytes(w.get("uss_bytes")),
                     f"{float(w['cpu_percent']):.1f}",
                     f"{float(w['heartbeat_age_s']):.1f}s"])
    return Frame(header=header, rows=rows, sample=sample)


def frame_lines(frame: Frame, height: int | None = None, width: int | None = None) -> list[str]:
    """The frame as text lines, cut to ``height`` lines of ``width`` columns when given."""
    lines = [frame.header, "", *table(HEADERS, frame.rows, right=RIGHT)]  # numbers read better aligned right
    if height is not None:
        height = max(height, 2)  # a tiny window still gets the header and the notice
    if height is not None and len(lines) > height:
        hidden = len(frame.rows) - max(0, height - 1 - 3)  # 3: the header, a blank line, the column names
        lines = [*lines[: height - 1], f"... {hidden} more worker(s) (enlarge the window)"]
    if width is not None:
        lines = [line[:width] for line in lines]
    return lines


@contextlib.contextmanager
def terminal(stdin_fd: int | None, out: TextIO) -> Iterator[None]:
    """Alternate screen, hidden cursor and cbreak input for the duration; everything restored after."""
    saved = termios.tcgetattr(stdin_fd) if stdin_fd is not None else None
    try:
        if stdin_fd is not None:
            # cbreak, not raw: keys arrive one by one without echo, and Ctrl-C still raises SIGINT
            tty.setcbreak(stdin_fd, termios.TCSANOW)
        out.write(ALT_SCREEN_ON + CURSOR_HIDE)
        out.flush()
        yield
    finally:
        if saved is not None and stdin_fd is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        out.write(CURSOR_SHOW + ALT_SCREEN_OFF)
        out.flush()


def draw(frame: Frame, out: TextIO, interval: float) -> None:
    size = shutil.get_terminal_size()
    lines = frame_lines(frame, height=size.lines - 1, width=size.columns)
    lines.append(f"q: quit, any other key: refresh now; every {interval:g}s"[: size.columns])
    # Overwrite in place rather than clearing first: no flicker between frames.
    out.write(HOME + "".join(line + CLEAR_LINE_END + "\r\n" for line in lines[:-1]) + lines[-1] + CLEAR_LINE_END
              + CLEAR_SCREEN_END)
    out.flush()


def wait_for_key(stdin_fd: int | None, timeout: float) -> bytes:
    """Wait up to ``timeout`` seconds for key presses; returns what was typed (empty on timeout)."""
    readable, _, _ = select.select([stdin_fd] if stdin_fd is not None else [], [], [], max(0.0, timeout))
    if not readable or stdin_fd is None:
        return b""
    data = os.read(stdin_fd, 1024)
    if not data:
        raise EOFError("the terminal closed")
    return data


def run_live(fetch: Fetch, interval: float, out: TextIO, stdin_fd: int | None) -> None:
    """Refresh every ``interval`` seconds until q, Ctrl-C or EOF on stdin; errors from ``fetch`` propagate."""
    previous: Sample | None = None
    with terminal(stdin_fd, out):
        try:
            while True:
                try:
                    status, stats = fetch()
                except DaemonNotRunning:
                    raise
                except ControlError:
                    # A master that is exiting may reset a connection it had accepted: one more try
                    # tells a daemon that went away (DaemonNotRunning) from one that is in trouble.
                    status, stats = fetch()
                frame = build_frame(status, stats, previous)
                previous = frame.sample
                draw(frame, out, interval)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    keys = wait_for_key(stdin_fd, left)
                    if QUIT_KEYS.intersection(keys):
                        return
                    if keys:
                        break  # any other key: refresh now
        except (KeyboardInterrupt, EOFError):
            return


def run(path: str, interval: float = 1.0, timeout: float = 5.0, out: TextIO | None = None) -> None:
    """The live table on the terminal ``out`` (default stdout). Raises ``ControlError``."""
    out = out if out is not None else sys.stdout

    def fetch() -> tuple[dict[str, Any], dict[str, Any]]:
        return fetch_status_and_stats(path, timeout)

    stdin_fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    run_live(fetch, interval, out, stdin_fd)


# -- the top command in preforkctl's command table -----------------------------------------------------------


def top_request(args: argparse.Namespace) -> Request:
    """What top needs: its refresh interval (top sends no request of its own: it asks status and stats)."""
    if not (math.isfinite(args.interval) and args.interval > 0):
        raise UsageError(f"top: --interval must be a positive number of seconds, got {args.interval:g}")
    return {"interval": args.interval}


def show_top(c: Call) -> Reply | None:
    """The live table on a terminal (None: nothing is left to print); else one snapshot for :func:`top_text`."""
    try:
        if not sys.stdout.isatty():
            return snapshot(c)
        run(c.path, interval=float(c.request["interval"]), timeout=c.timeout)
    except KeyboardInterrupt:  # Ctrl-C before the loop took over: quitting is what was asked for
        return None
    except DaemonNotRunning:
        raise NotAnswering(f"daemon not answering on {c.path}") from None
    return None


def top_text(reply: Reply) -> str:
    """One frame, plain text (no rates: they need two looks), for scripts and pipes; ``reply`` is a snapshot."""
    return "\n".join(frame_lines(build_frame(reply["status"], reply["stats"], None)))
