"""``--reload-on-change``: what is watched, the watcher process, and the reports it sends the master.

For development: when a Python file of the application changes, the daemon
reloads as on SIGHUP (the new generation serves before the old one drains;
a handler that no longer imports fails the reload and the old generation
serves on). The watching is done by watchfiles (``pip install watchfiles``,
the reload extra), a Rust-backed watcher on inotify, in a process of its
own (``python -m prefork.reloadwatch``), so the master's loop stays
single-threaded: the master starts it (:mod:`prefork.master.watching`),
reads its reports on a pipe in its selector, and the kernel ends it with the
master (``PR_SET_PDEATHSIG``).

A burst of changes is one report, sent once no Python file changed for
``QUIET_S`` (at most ``MAX_BURST_S`` after the first change): a save, a
``git checkout`` or a formatter's run is one reload, of complete files. (On
its own, watchfiles returns a burst as soon as no *new* file changed for
``STEP_MS``, so the same file written again and again came out as several.)
A report that arrives while a reload runs queues one reload after it. Only
Python sources count (``.py``, ``.pyx``, ``.pyd``; watchfiles'
``PythonFilter``): nothing in ``__pycache__``, ``.git`` or ``.venv``, no
compiled ``.pyc``, no editor's swap, backup or lock file (``.x.py.swp``,
``x.py~``, ``.#x.py``).
"""

from __future__ import annotations

import enum
import importlib.util
import json
import math
import os
import signal
import site
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from prefork.prctl import set_pdeathsig

if TYPE_CHECKING:
    from prefork.config import Config

QUIET_S = 0.25  # a burst ends once no Python file changed for this long
MAX_BURST_S = 5.0  # and is reported at the latest this long after its first change
DEBOUNCE_MS = 1600  # watchfiles: the longest it gathers raw changes (ours included: our own log file)
STEP_MS = 50  # watchfiles: the raw changes are returned once no new one came for this long
EXIT_CANNOT_WATCH = 3  # a directory cannot be watched (gone, unreadable, inotify's limits): said on stderr


class WatchEvent(enum.Enum):
    """What the watcher tells the master."""

    WATCHING = "watching"  # paths: the directories it watches now (every change from here on is reported)
    CHANGED = "changed"  # paths: the Python files that changed, a burst at a time


@dataclass(frozen=True)
class WatchReport:
    event: WatchEvent
    paths: tuple[str, ...]


def encode(report: WatchReport) -> bytes:
    """One line of JSON; the master tells it from anything else the watcher writes (a traceback)."""
    return json.dumps({"watch": report.event.value, "paths": list(report.paths)}).encode() + b"\n"


def decode(line: bytes) -> WatchReport | None:
    """The report on ``line``, or None when it is not one (the watcher's own words)."""
    try:
        data = json.loads(line)
        return WatchReport(WatchEvent(data["watch"]), tuple(str(p) for p in data["paths"]))
    except (ValueError, TypeError, KeyError):  # JSONDecodeError and an unknown event are ValueErrors
        return None


# -- what is watched ----------------------------------------------------------------------------------


def watched_dirs(config: Config, cwd: str | None = None) -> list[str]:
    """The directories watched, each with everything under it.

    ``--reload-dir``'s, or else the working directory (where development
    starts ``prefork app:Handler``), and the handler's own: its top-level
    package, or the directory of a plain module. Installed code
    (site-packages, the standard library) is not watched: it is not what one
    edits. A directory inside another watched one is not named twice.
    """
    dirs = [os.path.abspath(d) for d in config.reload_dir] or [cwd or os.getcwd()]
    handler = handler_dir(config)
    if handler is not None:
        dirs.append(handler)
    return _outermost(dirs)


def handler_dir(config: Config) -> str | None:
    """The directory the handler's code lives in, found without importing it; None if installed or unknown."""
    path: str | None = None
    if config.handler_object is not None:  # a program serving through prefork.api: its module is imported
        module = sys.modules.get(getattr(config.handler_object, "__module__", "") or "")
        origin = getattr(module, "__file__", None)
        path = os.path.dirname(origin) if isinstance(origin, str) else None
    else:
        top = config.effective_handler.partition(":")[0].split(".")[0]
        try:
            spec = importlib.util.find_spec(top)  # a top-level name: finds, runs no code of the application
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            path = next(iter(spec.submodule_search_locations), None)  # a package: its directory
        elif spec is not None and spec.has_location and spec.origin:
            path = os.path.dirname(spec.origin)
    if path is None or _installed(path):
        return None
    return os.path.realpath(path)


def _installed(path: str) -> bool:
    # the standard library and site-packages as the interpreter knows them (sysconfig would read a file that
    # the daemon's --user may not be allowed to)
    roots = {os.path.realpath(p) for p in (os.path.dirname(os.__file__), *getattr(site, "getsitepackages", list)())}
    real = os.path.realpath(path)
    return any(real == root or real.startswith(root + os.sep) for root in roots)


def _outermost(dirs: Iterable[str]) -> list[str]:
    """``dirs`` without repeats and without those inside another of them, in order."""
    real = list(dict.fromkeys(os.path.realpath(d) for d in dirs))
    return [d for d in real if not any(d != o and d.startswith(o.rstrip(os.sep) + os.sep) for o in real)]


def command(master_pid: int, name: str, dirs: list[str]) -> tuple[list[str], dict[str, str]]:
    """The watcher's command line, and the environment it adds (prefork importable as the master has it)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", "prefork.reloadwatch", str(master_pid), name, *dirs], {"PYTHONPATH": path}


# -- the watcher process ------------------------------------------------------------------------------


def _send(out: BinaryIO, report: WatchReport) -> None:
    out.write(encode(report))
    out.flush()


class Notify(Protocol):
    """watchfiles' ``RustNotify``: the raw changes, "timeout" or "signal"."""

    def watch(self, debounce_ms: int, step_ms: int, timeout_ms: int, stop_event: None) -> set[tuple[int, str]] | str:
        ...


def next_burst(notify: Notify, keep: Callable[[int, str], bool],
               clock: Callable[[], float] = time.monotonic) -> set[str] | None:
    """The files changed in the next burst that ``keep`` keeps (see the module's docstring); None on a signal."""
    paths: set[str] = set()
    first = ends = 0.0  # once a file changed: when, and when the burst ends unless another one changes first
    while True:
        left = ends - clock()
        if paths and left <= 0:
            return paths
        changes = notify.watch(DEBOUNCE_MS, STEP_MS, math.ceil(left * 1000) if paths else 0, None)
        if changes == "timeout":
            continue
        if isinstance(changes, str):  # "signal": SIGINT from a terminal, as the master got it
            return None
        new = {path for change, path in changes if keep(change, path)}
        if new:
            now = clock()
            first = first or now
            ends = min(now + QUIET_S, first + MAX_BURST_S)
            paths |= new


def watch(master_pid: int, name: str, dirs: list[str], out: BinaryIO) -> int:
    """Report on ``out`` every burst of changed Python files under ``dirs`` until the master is gone."""
    from watchfiles import Change, PythonFilter
    from watchfiles._rust_notify import RustNotify  # watchfiles' documented backend: says when it watches

    from prefork import logs

    set_pdeathsig(signal.SIGTERM)
    if os.getppid() != master_pid:
        return 0  # the master died before the kernel was asked to tell us
    logs.set_title("reload watcher", name)
    keep = PythonFilter()
    for path in dirs:  # --user: the daemon's user must be able to read the code it runs
        if not os.access(path, os.R_OK | os.X_OK):
            why = f"permission denied for uid {os.geteuid()}" if os.path.isdir(path) else "no such directory"
            print(f"cannot watch {path}: {why}", file=sys.stderr, flush=True)
            return EXIT_CANNOT_WATCH
    try:  # a subdirectory it may not read is left out (a root-only .git, someone's private files)
        notify = RustNotify(dirs, False, False, 300, True, True)
    except OSError as exc:
        print(f"cannot watch {', '.join(dirs)}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return EXIT_CANNOT_WATCH
    with notify:
        _send(out, WatchReport(WatchEvent.WATCHING, tuple(dirs)))
        while (paths := next_burst(notify, lambda change, path: keep(Change(change), path))) is not None:
            _send(out, WatchReport(WatchEvent.CHANGED, tuple(sorted(paths))))
    return 0


def main(argv: list[str]) -> int:
    """``python -m prefork.reloadwatch MASTER_PID NAME DIR...``: started by the master, never by hand."""
    if len(argv) < 3 or not argv[0].isdigit():
        print("usage: python -m prefork.reloadwatch MASTER_PID NAME DIR... (the master starts it)", file=sys.stderr)
        return 2
    try:
        return watch(int(argv[0]), argv[1], argv[2:], sys.stdout.buffer)
    except BrokenPipeError:  # the master is gone (or ran a new program in place): nobody to tell
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
