"""Zero-downtime upgrade of the master itself: start a new master program on the same sockets.

The old master forks and executes the prefork program again (whatever is
installed now: new code, new virtual environment), passing it every
listening socket and the control socket as inherited file descriptors,
named in ``$PREFORK_INHERIT``, and the write end of a pipe in
``$PREFORK_UPGRADE_PIPE``. The new master adopts them instead of binding,
starts its workers, and writes ``ready`` on the pipe once they serve. Only
then does the old master hand over (``MAINPID=`` to systemd, its copy of the
control socket closed) and drain its own workers. The sockets never close,
so no connection is refused; if the new master fails to start, the old one
never stopped serving.

Both sides live here: :func:`spawn` and :class:`Upgrader` for the old
master, :func:`inherited` and :func:`report_ready` for the new one.
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

from prefork.config import quote
from prefork.kernelstats import ListenCounters, listen_counters

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


def spawn(command: list[str], listeners: Sequence[tuple[int, str]], control_fd: int,
          side: Sequence[tuple[int, str]] = ()) -> tuple[int, int]:
    """Fork and exec ``command`` as the new master; returns (its pid, the read end of its ready pipe).

    ``side`` are the master's own listeners (``/metrics``, the agent check) by role: the new master
    serves them too, rather than failing to bind an address the old one still holds.
    """
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    entries = [f"{fd}={spec}" for fd, spec in [*listeners, *side]] + [f"{control_fd}=control"]
    env = dict(os.environ)
    env[INHERIT_ENV] = "\n".join(entries)
    env[PIPE_ENV] = str(write_fd)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    pid = os.fork()
    if pid == 0:  # the child: become the new master, or die trying
        try:
            signal.set_wakeup_fd(-1)
            for signum in range(1, signal.NSIG):
                if signum not in (signal.SIGKILL, signal.SIGSTOP):
                    with contextlib.suppress(OSError, ValueError):
                        signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            for fd, _ in listeners:
                os.set_inheritable(fd, True)
            os.set_inheritable(control_fd, True)
            for fd, _ in side:
                os.set_inheritable(fd, True)
            os.set_inheritable(write_fd, True)
            if "WATCHDOG_USEC" in env:
                # systemd names the one process that must ping the watchdog; exec keeps this pid, and
                # this process is the main one once the old master has sent MAINPID=
                env["WATCHDOG_PID"] = str(os.getpid())
            os.execvpe(command[0], command, env)
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


# -- the old master's side ----------------------------------------------------------------------------


class Waiter(Protocol):
    def reply(self, message: dict[str, Any]) -> None: ...


@dataclass
class Upgrade:
    """A new master program starting on our sockets; we keep serving until it says ready."""

    pid: int
    pipe_fd: int
    deadline: float
    waiters: list[Waiter] = field(default_factory=list)
    buffer: bytes = b""
    began: float = field(default_factory=time.monotonic)
    counters: ListenCounters | None = field(default_factory=listen_counters)

    def report(self) -> dict[str, Any]:
        """How long the new master took to serve, and what the kernel turned away on this machine meanwhile."""
        out: dict[str, Any] = {"serve_s": round(time.monotonic() - self.began, 3)}
        now = listen_counters()
        if self.counters is not None and now is not None:
            out.update(now.since(self.counters))
        return out


class Upgrader:
    """Starts the successor and watches its ready pipe in the master's selector.

    ``on_ready`` runs once the new master serves (the caller hands the service
    over, then drains); the waiters are answered on every path: ready, failed,
    timed out, or the daemon stopping.
    """

    def __init__(self, selector: selectors.BaseSelector, on_ready: Callable[[Upgrade], None]) -> None:
        self.selector = selector
        self.on_ready = on_ready
        self.current: Upgrade | None = None
        # our arguments -> the new master's command line; a program serving through prefork.api runs itself again
        self.command: Callable[[Sequence[str]], list[str]] = program

    def begin(self, argv: Sequence[str], listeners: Sequence[tuple[int, str]], control_fd: int,
              waiter: Waiter | None, side: Sequence[tuple[int, str]] = ()) -> Upgrade:
        """Fork and exec the new master (raises OSError); its ``deadline`` is the caller's to watch."""
        pid, pipe_fd = spawn(self.command(argv), listeners, control_fd, side)
        os.set_blocking(pipe_fd, False)
        self.current = Upgrade(pid=pid, pipe_fd=pipe_fd, deadline=time.monotonic() + UPGRADE_TIMEOUT,
                               waiters=[waiter] if waiter else [])
        self.selector.register(pipe_fd, selectors.EVENT_READ, self._on_pipe)
        log.info("upgrade: new master (pid %d) starting on our sockets; still serving until it is ready", pid)
        return self.current

    def _on_pipe(self, mask: int) -> None:
        upgrade = self.current
        assert upgrade is not None
        try:
            data = os.read(upgrade.pipe_fd, 64)
        except BlockingIOError:
            return
        upgrade.buffer += data
        if b"ready\n" in upgrade.buffer:
            self._close_pipe()
            self.current = None
            self.on_ready(upgrade)
            for waiter in upgrade.waiters:
                waiter.reply({"ok": True, "pid": upgrade.pid, "previous_pid": os.getpid(), **upgrade.report()})
        elif not data:  # closed without a word: it is exiting; its SIGCHLD says how
            self._close_pipe()

    def fail(self, why: str, *, kill: bool = False) -> None:
        """Give up on the upgrade in progress (telling the new master to quit when ``kill``)."""
        upgrade = self.current
        if upgrade is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(upgrade.pid, signal.SIGQUIT)  # it stops its own workers
        said = self._last_words(upgrade)
        if said:
            why = f"{why}: {said}"
        self._close_pipe()
        self.current = None
        log.error("upgrade failed: %s; still serving (pid %d)", why, os.getpid())
        for waiter in upgrade.waiters:
            waiter.reply({"ok": False, "error": f"upgrade failed: {why}"})

    def _last_words(self, upgrade: Upgrade) -> str:
        """Why the new master said it failed (:func:`report_failure`), or ''.

        It writes before it exits, so once it is reaped the words are in the pipe.
        """
        while upgrade.pipe_fd >= 0 and len(upgrade.buffer) <= MAX_WHY + 16:
            try:
                data = os.read(upgrade.pipe_fd, 4096)
            except OSError:  # nothing more now (it may still be running: a timeout), or the pipe is gone
                break
            if not data:
                break
            upgrade.buffer += data
        for line in upgrade.buffer.decode("utf-8", "replace").splitlines():
            if line.startswith("error: "):
                return line[len("error: "):]
        return ""

    def _close_pipe(self) -> None:
        upgrade = self.current
        if upgrade is not None and upgrade.pipe_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(upgrade.pipe_fd)
            os.close(upgrade.pipe_fd)
            upgrade.pipe_fd = -1

    def close_in_child(self) -> None:
        """In a forked worker: the hand-over pipe is between masters."""
        if self.current is not None and self.current.pipe_fd >= 0:
            os.close(self.current.pipe_fd)
