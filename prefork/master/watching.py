"""``--reload-on-change`` in the master: the watcher process started, its reports read, its end dealt with.

The watcher (:mod:`prefork.reloadwatch`) is a child of the master like the
upgrade's check: started with its output on a pipe the master's selector
reads. A report of changed files starts a reload exactly as SIGHUP does (one
queued behind a reload in flight). If the watcher ends while the daemon
serves, it is started again after ``RESTART_DELAY``; after
``MAX_FAILURES`` starts in a row that never got to watch (a directory gone,
inotify's limits reached) it is given up, in one ERROR line saying why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import sys
import time
from collections.abc import Sequence
from typing import Protocol

from prefork.config import Config, cut
from prefork.master.reload import Waiter
from prefork.master.state import StopMode
from prefork.master.timers import Timers
from prefork.reloadwatch import WatchEvent, WatchReport, command, decode, watched_dirs
from prefork.upgrade import spawn_check

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
MAX_FAILURES = 5  # starts in a row that ended before watching: then the watching is given up
SHOWN_PATHS = 3  # changed files named in the log line; the rest are counted


class WatcherHost(Protocol):
    """What the watcher needs of the master."""

    @property
    def pid(self) -> int: ...

    @property
    def stopping(self) -> StopMode | None: ...

    @property
    def config(self) -> Config: ...

    def begin_reload(self, waiters: Sequence[Waiter], canary: float | None = None) -> None: ...


def describe_changes(paths: Sequence[str], cwd: str) -> str:
    """``app/handler.py changed`` / ``a.py, b.py, c.py and 2 more changed``: relative to ``cwd`` when inside it."""
    names = [os.path.relpath(p, cwd) if p.startswith(cwd.rstrip(os.sep) + os.sep) else p for p in paths]
    shown = ", ".join(cut(name) for name in names[:SHOWN_PATHS])
    more = len(names) - SHOWN_PATHS
    return f"{shown}{f' and {more} more' if more > 0 else ''} changed"


class ChangeWatcher:
    """The watcher process of ``--reload-on-change`` (nothing without it), as the master sees it."""

    def __init__(self, host: WatcherHost, selector: selectors.BaseSelector, timers: Timers) -> None:
        self.host = host
        self.selector = selector
        self.timers = timers
        self.pid = 0  # the watcher's, while it runs
        self.fd = -1  # the read end of its output
        self.buffer = b""
        self.last_words = ""  # the last line it wrote that is not a report: why it ended, if it says
        self.failures = 0  # starts in a row that ended before watching

    def start(self) -> None:
        """Start the watcher (if ``--reload-on-change``); a failure is logged and retried, never raised."""
        config = self.host.config
        if not config.reload_on_change or self.host.stopping is not None or self.pid:
            return
        # each generation compiles the sources it imports: a cached .pyc stamped with the same second and
        # size as an edited file would otherwise serve the code from before the edit
        sys.dont_write_bytecode = True
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # for the molds of a program run again (prefork.api)
        if not os.access(sys.executable, os.X_OK) or not os.access(os.__file__, os.R_OK):
            log.error("reload on change: uid %d cannot run %s, so changes are not watched (the daemon's --user "
                      "must be able to run its Python)", os.getuid(), sys.executable)
            return
        try:
            self.pid, self.fd = spawn_check(*command(self.host.pid, config.name, watched_dirs(config)))
        except OSError as exc:
            self._ended(f"cannot start it: {exc.strerror or exc}")
            return
        os.set_blocking(self.fd, False)
        self.selector.register(self.fd, selectors.EVENT_READ, self._on_output)

    def _on_output(self, mask: int) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            report = decode(line)
            if report is not None:
                self._on_report(report)
            elif line.strip():
                self.last_words = cut(line.decode("utf-8", "replace").strip())
        if not data:
            self._ended(self.last_words or "without a word (killed?)")

    def _on_report(self, report: WatchReport) -> None:
        if report.event is WatchEvent.WATCHING:
            self.failures = 0
            log.info("reload on change: watching %s for changed Python files (watcher pid %d)",
                     ", ".join(report.paths), self.pid)
        elif self.host.stopping is None:
            log.info("reloading on change: %s", describe_changes(report.paths, os.getcwd()))
            self.host.begin_reload([])

    def _ended(self, why: str) -> None:
        pid = self.pid
        self._forget()
        if self.host.stopping is not None:
            return
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            log.error("reload on change: the file watcher failed %d times in a row, last: %s; changes are no "
                      "longer watched (fix that, then restart the daemon)", self.failures, why)
            return
        log.warning("reload on change: the file watcher (pid %d) ended: %s; starting it again in %gs",
                    pid, why, RESTART_DELAY)
        self.timers.set("watcher", time.monotonic() + RESTART_DELAY, self.start)

    def _forget(self) -> None:
        if self.fd >= 0:
            self.selector.unregister(self.fd)
            os.close(self.fd)
        self.pid, self.fd, self.buffer = 0, -1, b""

    def close_in_child(self) -> None:
        """In a process the master forks: the watcher's pipe is not its own."""
        if self.fd >= 0:
            os.close(self.fd)

    def close(self) -> None:
        """The master exits: end the watcher now (it would end with the master anyway, or on its next report)."""
        self.timers.cancel("watcher")
        pid = self.pid
        self._forget()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)  # its SIGTERM is not handled: it ends at once
