"""Executing the prefork program now installed in place (an upgrade): everything that crosses the exec.

The master keeps its pid: its molds and workers stay its children, systemd's
main pid and a terminal's job stay the same. Before the exec the master
writes a :class:`Handover` to a memory file and names it in
``$PREFORK_HANDOVER``; every descriptor it lists is left open across the
exec, as one frame of prefork's codec (:mod:`prefork.frames`). The new
image reads it back (:func:`received`) and adopts what it
lists: the listeners and the master's own sockets, the workers' event pipe,
the scoreboard (with the relay's upstream board), the molds and workers (as
the previous generation, which it then replaces as a reload does), the
counters and the generation number, the filter helper of a master that
gave up root (:class:`prefork.listeners.FilterHelper`), and the
``preforkctl upgrade`` clients still waiting for their answer.
systemd's notify socket, watchdog and file-descriptor store need nothing:
they are the environment's and systemd's, and the pid did not change.

This list is the one place that says what survives an upgrade.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from prefork import frames
from prefork.upgrade import SIDE_ROLES, Inherited

HANDOVER_ENV = "PREFORK_HANDOVER"
MAX_HANDOVER = 16 * 2**20  # bytes of state read back at most


class HandoverError(Exception):
    """The state handed over by the previous image is unusable; the message says why."""


@dataclass(frozen=True)
class HandedWorker:
    pid: int
    slot: int
    generation: int
    record_index: int
    started: float  # time.monotonic() (the system's monotonic clock: the same across the exec)
    state: str  # a WorkerState value
    stop_reason: str = ""


@dataclass(frozen=True)
class HandedMold:
    generation: int
    pid: int
    fd: int  # the master's end of its socket
    threads: int = 0


@dataclass(frozen=True)
class Handover:
    """What a master hands its next image across ``execve``."""

    listeners: list[tuple[int, str]]  # (fd, bind spec)
    side: list[tuple[int, str]]  # the master's own listeners: (fd, "metrics" | "agent")
    control_fd: int
    events: tuple[int, int]  # the workers' event pipe (read end, write end: the workers hold copies)
    scoreboard_fd: int
    scoreboard_capacity: int
    generation: int  # the serving generation
    next_generation: int  # the number the next generation takes
    workers: list[HandedWorker] = field(default_factory=list)
    molds: list[HandedMold] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    waiters: list[int] = field(default_factory=list)  # control clients waiting for the upgrade's answer
    began: float = 0.0  # time.monotonic() when the upgrade was asked for
    master_started: float = 0.0  # time.monotonic() when the master started (its uptime goes on)
    # the root child that attaches the stop's socket filter for a master that gave up root: (pid, fd) or None
    filter_helper: tuple[int, int] | None = None

    def descriptors(self) -> list[int]:
        """Every descriptor that must stay open across the exec."""
        helper = [self.filter_helper[1]] if self.filter_helper is not None else []
        return [*(fd for fd, _ in self.listeners), *(fd for fd, _ in self.side), self.control_fd, *self.events,
                self.scoreboard_fd, *(m.fd for m in self.molds), *self.waiters, *helper]


def encode(handover: Handover) -> bytes:
    return frames.encode(dataclasses.asdict(handover))


def decode(data: bytes) -> Handover:
    """The state in ``data``; raises HandoverError."""
    try:
        raw = frames.decode(data, MAX_HANDOVER)
        return Handover(
            listeners=[(int(fd), str(spec)) for fd, spec in raw["listeners"]],
            side=[(int(fd), str(role)) for fd, role in raw["side"]],
            control_fd=int(raw["control_fd"]),
            events=(int(raw["events"][0]), int(raw["events"][1])),
            scoreboard_fd=int(raw["scoreboard_fd"]),
            scoreboard_capacity=int(raw["scoreboard_capacity"]),
            generation=int(raw["generation"]),
            next_generation=int(raw["next_generation"]),
            workers=[HandedWorker(**w) for w in raw["workers"]],
            molds=[HandedMold(**m) for m in raw["molds"]],
            totals=dict(raw["totals"]),
            waiters=[int(fd) for fd in raw["waiters"]],
            began=float(raw["began"]),
            master_started=float(raw.get("master_started", 0.0)),
            filter_helper=(int(raw["filter_helper"][0]), int(raw["filter_helper"][1]))
            if raw.get("filter_helper") else None,
        )
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise HandoverError(f"{HANDOVER_ENV}: malformed state ({type(exc).__name__}: {exc})") from None


def prepare(handover: Handover) -> dict[str, str]:
    """Write ``handover`` to a memory file, mark every descriptor it lists inheritable; the exec's environment."""
    fd = os.memfd_create("prefork-handover", 0)  # inheritable: the new image reads it
    data = encode(handover)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    for kept in handover.descriptors():
        os.set_inheritable(kept, True)
    env = dict(os.environ)
    env[HANDOVER_ENV] = str(fd)
    return env


def abandon(env: dict[str, str], handover: Handover) -> None:
    """The exec failed: close the memory file, make the listed descriptors close-on-exec again."""
    with contextlib.suppress(ValueError, OSError):
        os.close(int(env[HANDOVER_ENV]))
    for kept in handover.descriptors():
        with contextlib.suppress(OSError):
            os.set_inheritable(kept, False)


def received() -> Handover | None:
    """The state the previous image handed us (None: started normally); its descriptors become ours."""
    value = os.environ.pop(HANDOVER_ENV, None)
    if value is None:
        return None
    if not value.isdigit():
        raise HandoverError(f"{HANDOVER_ENV}: {value!r} is not a descriptor")
    fd = int(value)
    try:
        chunks: list[bytes] = []
        size = 0
        while size < MAX_HANDOVER:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        os.close(fd)
    except OSError as exc:
        raise HandoverError(f"{HANDOVER_ENV}: cannot read descriptor {fd}: {exc.strerror}") from None
    handover = decode(b"".join(chunks))
    for kept in handover.descriptors():
        try:
            os.set_inheritable(kept, False)
        except OSError as exc:
            raise HandoverError(f"{HANDOVER_ENV}: descriptor {kept} is not open: {exc.strerror}") from None
    return handover


def inherited(handover: Handover) -> Inherited:
    """The sockets of ``handover`` as an upgrade's :class:`prefork.upgrade.Inherited` (no pipe: same process)."""
    side = {role: socket.socket(fileno=fd) for fd, role in handover.side if role in SIDE_ROLES}
    return Inherited(listeners=[(socket.socket(fileno=fd), spec) for fd, spec in handover.listeners], side=side,
                     control=socket.socket(fileno=handover.control_fd), pipe_fd=None)
