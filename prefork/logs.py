"""Logging set-up, log-file reopening (USR1) and process titles.

Logging never takes the process down: a line that cannot be written (a full
disk, a removed file, a closed pipe) is dropped and counted
(:func:`dropped_lines`; the master's count is in ``stats``), and a reopen
that fails keeps writing to the old file and says so there. A log file in a
directory others can write to (``/tmp``) is opened with ``O_NOFOLLOW``, so a
symbolic link planted in its place is refused instead of followed.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import io
import logging
import os
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from setproctitle import setproctitle as _setproctitle

_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# journald stamps each line itself: a second timestamp would only be noise
_JOURNAL_FORMAT = "[%(process)d] %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)

RATE_LIMIT_INTERVAL = 10.0  # seconds: at most one line per interval from a call site clients can repeat at will

_dropped = 0
_dropped_lock = threading.Lock()
_warned: set[str] = set()  # files whose first failed write was reported on stderr


def dropped_lines() -> int:
    """Log lines this process could not write and dropped."""
    return _dropped


def _drop(where: str, exc: BaseException | None) -> None:
    """Count a line that could not be written; the first failure per file gets one line on stderr."""
    global _dropped
    with _dropped_lock:
        _dropped += 1
        first = where not in _warned
        _warned.add(where)
    if first and where != "<stderr>" and isinstance(exc, OSError):
        try:
            sys.stderr.write(f"prefork: cannot write to log file {where}: {exc.strerror or exc}; "
                             "dropping lines that cannot be written (counted in stats)\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


class RateLimitedLog:
    """One log call site that clients can repeat at will (a bad request, a failed handshake, a refused accept).

    At most one line per ``interval`` seconds is written; the lines held back
    meanwhile are counted, and the next line written says how many there were.
    4,000 bad requests in a second make one line, not 4,000. When the flood
    ends, :func:`flush_held` (the master's timers, a worker's heartbeat) writes
    the last line held back with the count, once its interval is over, so no
    flood goes unreported. A ``key`` (the listening address, say) limits each
    kind apart, for a few kinds at most. Thread-safe: the threads of a thread
    worker share one.
    """

    MAX_KEYS = 64  # keys are the process's own few addresses; past this many, start afresh

    def __init__(self, logger: logging.Logger, interval: float = RATE_LIMIT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._state: dict[object, _Held] = {}
        self._holding = False  # some key holds lines back (a cheap look for flush)
        self._lock = threading.Lock()
        _limiters.add(self)

    def held(self, key: object = None) -> int:
        """Lines held back since the last one written (for ``key``)."""
        state = self._state.get(key)
        return state.count if state is not None else 0

    def log(self, level: int, msg: str, *args: object, key: object = None) -> bool:
        """Write ``msg % args`` at ``level`` unless a line was written less than ``interval`` ago; True if written."""
        if not self.logger.isEnabledFor(level):
            return False
        with self._lock:
            now = self.clock()
            state = self._state.get(key)
            if state is not None and now < state.next_at:
                state.count += 1
                state.last = (level, msg, args)
                self._holding = True
                _holding.set()
                return False
            if state is None and len(self._state) >= self.MAX_KEYS:
                self._state.clear()
            held = state.count if state is not None else 0
            self._state[key] = _Held(now + self.interval)
        self._write(level, msg, args, held)
        return True

    def flush(self) -> None:
        """Write the last line each key held back, with the count, once its interval is over."""
        if not self._holding:
            return
        due = []
        with self._lock:
            now = self.clock()
            for key, state in self._state.items():
                if state.count and state.last is not None and now >= state.next_at:
                    due.append((state.last, state.count - 1))
                    self._state[key] = _Held(now + self.interval)
            self._holding = any(state.count for state in self._state.values())
        for (level, msg, args), others in due:
            self._write(level, msg, args, others)

    def _write(self, level: int, msg: str, args: tuple[object, ...], held: int) -> None:
        if held:
            msg += " (and %d more like it in the last %.0fs, not logged)"
            args = (*args, held, self.interval)
        self.logger.log(level, msg, *args)

    def warning(self, msg: str, *args: object, key: object = None) -> bool:
        return self.log(logging.WARNING, msg, *args, key=key)

    def info(self, msg: str, *args: object, key: object = None) -> bool:
        return self.log(logging.INFO, msg, *args, key=key)


@dataclass
class _Held:
    """One key of a RateLimitedLog: when it may write again, and what it held back meanwhile."""

    next_at: float
    count: int = 0
    last: tuple[int, str, tuple[object, ...]] | None = None  # the last line held back: level, msg, args


_limiters: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()  # every one this process made
_holding = threading.Event()  # one of them holds lines back: flush_held has work (a cheap look, per loop turn)


def flush_held() -> None:
    """Every RateLimitedLog of this process writes what it held back over a finished interval."""
    if not _holding.is_set():
        return
    _holding.clear()
    for limiter in list(_limiters):
        limiter.flush()
        if limiter._holding:  # its interval is not over yet: look again next time
            _holding.set()


def _others_may_write(directory: str) -> bool:
    try:
        return bool(os.stat(directory).st_mode & (stat.S_IWOTH | stat.S_ISVTX))
    except OSError:
        return False


def open_log_file(path: str, flags: int, mode: int = 0o666) -> int:
    """``open()``'s opener for log files: a regular file, ``O_NOFOLLOW`` in a directory others can write to.

    There, a symbolic link at the log's path was planted by someone else
    (root would append to whatever it points at); the open fails with a
    message that says so. Elsewhere a link is the administrator's and is
    followed. The open never blocks (``O_NONBLOCK``: a FIFO would wait for
    a reader, freezing the master at start or at ``USR1``), and anything
    but a regular file is refused: writes to a FIFO or a device can block
    the daemon too.
    """
    flags |= os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    if _others_may_write(os.path.dirname(os.path.abspath(path))):
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW, mode)
        except OSError:
            if os.path.islink(path):  # ELOOP, or EACCES for another user's link with O_CREAT
                raise OSError(errno.ELOOP, "is a symbolic link in a directory others can write to; "
                              "refusing to follow it", path) from None
            raise
    else:
        try:
            fd = os.open(path, flags, mode)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # a FIFO nobody reads: O_NONBLOCK says so rather than wait
                raise OSError(errno.ENXIO, NOT_REGULAR, path) from None
            raise
    try:
        if not never_blocks(os.fstat(fd)):
            raise OSError(errno.EINVAL, NOT_REGULAR, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


NOT_REGULAR = "not a regular file (a FIFO or a device could block the daemon)"
_MEMORY_DEVICES = 1  # the major number of /dev/null, /dev/zero, /dev/full: writes to them never wait


def never_blocks(st: os.stat_result) -> bool:
    """True for what a log may be: a regular file, or /dev/null and its kin (which never make a writer wait)."""
    return stat.S_ISREG(st.st_mode) or (stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == _MEMORY_DEVICES)


class DroppingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose failed writes are dropped and counted, never raised or dumped to stderr."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | ValueError):  # ValueError: the stream is closed
            _drop("<stderr>", exc)
            return
        super().handleError(record)  # a bad format string in someone's log call: say so


class ReopenableFileHandler(logging.FileHandler):
    """A FileHandler that ``reopen()`` points at a fresh file after log rotation moved the old one.

    A write that fails is dropped and counted; a reopen that fails keeps the old file.
    """

    def _open(self) -> io.TextIOWrapper:
        stream = open(self.baseFilename, self.mode, encoding=self.encoding,  # noqa: SIM115
                      errors=self.errors, opener=open_log_file)
        assert isinstance(stream, io.TextIOWrapper)
        return stream

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError | ValueError):  # a full disk, a file gone; ValueError: closed stream
            _drop(self.baseFilename, exc)
            return
        super().handleError(record)

    def reopen(self) -> str | None:
        """Open the file at its path again and swap to it; on failure keep the old one and return why.

        The new file is opened first: only a stream that exists replaces the
        one that works. Closing the old one may fail too (its last buffered
        lines hit a full disk): those lines are counted as dropped.
        """
        try:
            new = self._open()
        except OSError as exc:
            return exc.strerror or str(exc)
        self.acquire()
        try:
            old, self.stream = self.stream, new
        finally:
            self.release()
        if old is not None:
            try:
                old.close()
            except (OSError, ValueError) as exc:
                _drop(self.baseFilename, exc)
        return None


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
        handler = DroppingStreamHandler(sys.stderr)
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
        handler = DroppingStreamHandler(sys.stdout)
        fmt = "%(message)s" if _stderr_is_journal() else "%(asctime)s %(message)s"
    else:
        handler = ReopenableFileHandler(target, encoding="utf-8")
        fmt = "%(asctime)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def reopen() -> None:
    """USR1: reopen every log file (after logrotate moved it away), the access log too. Never raises.

    A file that cannot be opened again (its directory is gone or not ours, the
    disk is full) keeps its old stream, and a warning goes to the log.
    """
    failed: list[tuple[str, str]] = []
    for logger in (logging.getLogger(), logging.getLogger(ACCESS_LOGGER)):
        for handler in logger.handlers:
            if isinstance(handler, ReopenableFileHandler):
                why = handler.reopen()
                if why is not None:
                    failed.append((handler.baseFilename, why))
    if faulthandler.is_enabled():  # it writes to the log's descriptor, which the reopen just closed
        faulthandler.enable(file=fault_stream(), all_threads=True)
    for path, why in failed:
        log.warning("cannot reopen log file %s: %s; still writing to the file open before", path, why)


def fault_stream() -> IO[Any]:
    """Where faulthandler writes a hung worker's stacks: the log file if there is one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler) and handler.stream is not None:
            return handler.stream
    return sys.stderr


def set_title(role: str, name: str) -> None:
    """``prefork: master [NAME]`` / ``prefork: worker 3 [NAME]`` in ps and top."""
    _setproctitle(f"prefork: {role} [{name}]")


def flush() -> None:
    """Write out every handler's buffer (before this process executes another program in place)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
