"""Logging set-up, log-file reopening (USR1) and process titles."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any

from setproctitle import setproctitle as _setproctitle

_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# journald stamps each line itself: a second timestamp would only be noise
_JOURNAL_FORMAT = "[%(process)d] %(levelname)s %(name)s: %(message)s"


class ReopenableFileHandler(logging.FileHandler):
    """A FileHandler that ``reopen()`` points at a fresh file after log rotation moved the old one."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def _stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd gave us ($JOURNAL_STREAM is DEV:INODE)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def setup(level: str, log_file: str | None = None) -> None:
    """Send all logging (ours and the handlers') to stderr or ``log_file``. Raises OSError."""
    handler: logging.Handler
    if log_file:
        handler = ReopenableFileHandler(log_file, encoding="utf-8")
        fmt = _FORMAT
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = _JOURNAL_FORMAT if _stderr_is_journal() else _FORMAT
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


ACCESS_LOGGER = "prefork.access"


def setup_access_log(target: str | None) -> None:
    """``--access-log PATH|-``: one line per connection, to its own file or standard output."""
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    if not target:
        logger.disabled = True
        return
    logger.disabled = False
    handler: logging.Handler
    if target == "-":
        handler = logging.StreamHandler(sys.stdout)
        fmt = "%(message)s" if _stderr_is_journal() else "%(asctime)s %(message)s"
    else:
        handler = ReopenableFileHandler(target, encoding="utf-8")
        fmt = "%(asctime)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def reopen() -> None:
    """USR1: reopen every log file (after logrotate moved it away), the access log too."""
    for logger in (logging.getLogger(), logging.getLogger(ACCESS_LOGGER)):
        for handler in logger.handlers:
            if isinstance(handler, ReopenableFileHandler):
                handler.reopen()


def fault_stream() -> IO[Any]:
    """Where faulthandler writes a hung worker's stacks: the log file if there is one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler) and handler.stream is not None:
            return handler.stream
    return sys.stderr


def set_title(role: str, name: str) -> None:
    """``prefork: master [NAME]`` / ``prefork: worker 3 [NAME]`` in ps and top."""
    _setproctitle(f"prefork: {role} [{name}]")
