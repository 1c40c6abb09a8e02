"""Upgrading prefork itself: the check the new program makes first, and what an older prefork hands over.

An upgrade runs the prefork program now installed with ``--check-config``
in a child (:func:`spawn_check`, watched by :class:`Upgrader` in the
master's selector); if the configuration, the certificates and the handler
pass, the master executes the new program in place
(:mod:`prefork.master.handover`), else the upgrade fails in one line and the
master is untouched.

An older prefork upgrades by starting a new master program beside itself,
passing every listening socket and the control socket as inherited file
descriptors named in ``$PREFORK_INHERIT``, and the write end of a pipe in
``$PREFORK_UPGRADE_PIPE``. This version still takes over from such a master
(:func:`inherited`, then :func:`report_ready` once its workers serve, or
:func:`report_failure`), so a daemon started by an older version can be
upgraded to this one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefork.config import LAUNCH_DIR, quote

log = logging.getLogger(__name__)

INHERIT_ENV = "PREFORK_INHERIT"
PIPE_ENV = "PREFORK_UPGRADE_PIPE"
SIDE_ROLES = ("metrics", "agent")  # the master's own listeners a new master takes over
UPGRADE_TIMEOUT = 60.0  # how long a new master may take to serve before the upgrade is abandoned
MAX_WHY = 1000  # the longest reason a new master gives for failing


class UpgradeError(Exception):
    """An inherited descriptor is unusable; the message says which."""


@dataclass(frozen=True)
class Inherited:
    """What a new master received from the one it replaces."""

    listeners: list[tuple[socket.socket, str]]  # (socket, the bind spec it came from)
    side: dict[str, socket.socket]  # the master's own listeners by role: "metrics", "agent"
    control: socket.socket | None
    pipe_fd: int | None


def program(argv: Sequence[str]) -> list[str]:
    """The command line that runs the prefork now installed, with the same arguments."""
    launcher = sys.argv[0]
    if os.path.basename(launcher) != "__main__.py" and os.access(launcher, os.X_OK):
        return [launcher, *argv]  # the console script: a new venv at the same path is picked up
    return [sys.executable, "-m", "prefork", *argv]


def execute_program(command: list[str], env: dict[str, str]) -> None:
    """Execute ``command`` from the directory prefork started in: its arguments may name files relative to
    it, and --chdir moved us. Raises OSError, back in our working directory."""
    back = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # gone: the arguments are all the command has
            os.chdir(LAUNCH_DIR)
        os.execvpe(command[0], command, env)
    finally:
        os.fchdir(back)
        os.close(back)


def check_command(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The command (and extra environment) that runs the prefork now installed to check our configuration."""
    return [*program(argv), "--check-config"], {}


def spawn_check(command: list[str], extra_env: dict[str, str] | None = None) -> tuple[int, int]:
    """Fork and exec ``command`` (the new program checking, the reload watcher); (its pid, the read end of its
    output: standard output and error)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    env = {name: value for name, value in os.environ.items()
           if name not in (INHERIT_ENV, PIPE_ENV, "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
    env.update(extra_env or {})
    pid = os.fork()
    if pid == 0:  # the child: check, say how it went on the pipe, exit
        try:
            signal.set_wakeup_fd(-1)
            for signum in range(1, signal.NSIG):
                if signum not in (signal.SIGKILL, signal.SIGSTOP):
                    with contextlib.suppress(OSError, ValueError):
                        signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            os.dup2(write_fd, 1)
            os.dup2(write_fd, 2)
            execute_program(command, env)
        finally:
            os._exit(127)
    os.close(write_fd)
    return pid, read_fd


def inherited() -> Inherited | None:
    """The descriptors an old master passed us, or None when we were started normally."""
    value = os.environ.pop(INHERIT_ENV, None)
    pipe_text = os.environ.pop(PIPE_ENV, None)
    if value is None:
        return None
    listeners: list[tuple[socket.socket, str]] = []
    side: dict[str, socket.socket] = {}
    control = None
    for entry in value.split("\n"):
        fd_text, sep, spec = entry.partition("=")
        if not sep or not fd_text.isdigit():
            raise UpgradeError(f"{INHERIT_ENV}: malformed entry {quote(entry)}")
        fd = int(fd_text)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise UpgradeError(f"{INHERIT_ENV}: fd {fd} ({spec}) is not a socket: {exc.strerror}") from None
        os.set_inheritable(fd, False)
        if spec == "control":
            control = sock
        elif spec in SIDE_ROLES:
            side[spec] = sock
        else:
            listeners.append((sock, spec))
    pipe_fd = int(pipe_text) if pipe_text and pipe_text.isdigit() else None
    if pipe_fd is not None:
        os.set_inheritable(pipe_fd, False)
    return Inherited(listeners=listeners, side=side, control=control, pipe_fd=pipe_fd)


def report_ready(pipe_fd: int) -> None:
    """Tell the old master we serve; it hands over and drains."""
    try:
        os.write(pipe_fd, b"ready\n")
    except OSError:
        pass  # the old master is gone already: nothing to tell
    finally:
        os.close(pipe_fd)


def report_failure(pipe_fd: int, why: str) -> None:
    """Tell the old master why we cannot serve (one line); its upgrade fails with these words."""
    line = " ".join(why.split())[:MAX_WHY]
    try:
        os.write(pipe_fd, f"error: {line}\n".encode())
    except OSError:
        pass  # the old master is gone already: nothing to tell
    finally:
        os.close(pipe_fd)


# -- the running master's side: the new program's check ------------------------------------------------


class Waiter(Protocol):
    def reply(self, message: dict[str, Any]) -> None: ...


@dataclass
class Upgrade:
    """The new program checking our configuration; we keep serving, and execute it in place if it passes."""

    pid: int
    pipe_fd: int
    deadline: float
    waiters: list[Waiter] = field(default_factory=list)
    buffer: bytes = b""
    began: float = field(default_factory=time.monotonic)


class Upgrader:
    """Runs the new program's check and watches its output in the master's selector.

    The waiters are answered on every path by the caller (once the new image
    serves, or here when the upgrade fails, times out or the daemon stops).
    """

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.current: Upgrade | None = None
        # our arguments -> the new master's command line; a program serving through prefork.api runs itself again
        self.command: Callable[[Sequence[str]], list[str]] = program
        # our arguments -> how the new program checks the configuration before it runs in place
        self.check_command: Callable[[Sequence[str]], tuple[list[str], dict[str, str]]] = check_command

    def begin_check(self, argv: Sequence[str], waiter: Waiter | None) -> Upgrade:
        """Run the new program with ``--check-config`` (raises OSError); its exit is the caller's to judge."""
        pid, pipe_fd = spawn_check(*self.check_command(argv))
        os.set_blocking(pipe_fd, False)
        self.current = Upgrade(pid=pid, pipe_fd=pipe_fd, deadline=time.monotonic() + UPGRADE_TIMEOUT,
                               waiters=[waiter] if waiter else [])
        self.selector.register(pipe_fd, selectors.EVENT_READ, self._on_pipe)
        log.info("upgrade: the new program (pid %d) checks the configuration before it runs in place", pid)
        return self.current

    def checked(self) -> tuple[Upgrade, str]:
        """The check is over (its child reaped): (the upgrade, given up here, and the check's last line)."""
        upgrade = self.current
        assert upgrade is not None
        self._last_words(upgrade)
        self._close_pipe()
        self.current = None
        lines = [line for line in upgrade.buffer.decode("utf-8", "replace").splitlines() if line.strip()]
        return upgrade, lines[-1] if lines else ""

    def _on_pipe(self, mask: int) -> None:
        upgrade = self.current
        assert upgrade is not None
        try:
            data = os.read(upgrade.pipe_fd, 4096)
        except BlockingIOError:
            return
        upgrade.buffer += data
        if not data or len(upgrade.buffer) > 4 * MAX_WHY:
            self._close_pipe()  # its exit says the rest

    def fail(self, why: str, *, kill: bool = False) -> None:
        """Give up on the upgrade in progress (ending the check when ``kill``)."""
        upgrade = self.current
        if upgrade is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(upgrade.pid, signal.SIGKILL)  # a check holds nothing
        self._close_pipe()
        self.current = None
        log.error("upgrade failed: %s; still serving (pid %d)", why, os.getpid())
        for waiter in upgrade.waiters:
            waiter.reply({"ok": False, "error": f"upgrade failed: {why}"})

    def _last_words(self, upgrade: Upgrade) -> None:
        """The rest of the check's output: it writes before it exits, so once it is reaped it is all in the pipe."""
        while upgrade.pipe_fd >= 0 and len(upgrade.buffer) <= 4 * MAX_WHY:
            try:
                data = os.read(upgrade.pipe_fd, 4096)
            except OSError:  # nothing more now (it may still be running: a timeout), or the pipe is gone
                break
            if not data:
                break
            upgrade.buffer += data

    def _close_pipe(self) -> None:
        upgrade = self.current
        if upgrade is not None and upgrade.pipe_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(upgrade.pipe_fd)
            os.close(upgrade.pipe_fd)
            upgrade.pipe_fd = -1

    def close_in_child(self) -> None:
        """In a forked mold or worker: the check's output is the master's."""
        if self.current is not None and self.current.pipe_fd >= 0:
            os.close(self.current.pipe_fd)
