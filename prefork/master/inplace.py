"""An upgrade in place, both images: the check, the exec, and the new image taking the daemon over.

:func:`checked` runs once the new program's ``--check-config`` child is
reaped: a failure fails the upgrade in one line and leaves the master
untouched; a success :func:`execute` s the new program in place, handing it
what :mod:`prefork.master.handover` lists. In the new image,
:func:`resume` adopts the molds and workers as the previous generation and
replaces them as a reload does; the ``preforkctl upgrade`` clients handed
over are answered by :class:`InPlaceReply` once the new generation serves.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from typing import Any, Protocol

from prefork import __version__, logs
from prefork.config import Config
from prefork.control import ControlConnection, ControlServer
from prefork.frames import encode
from prefork.listeners import Listener, filter_helper
from prefork.master import handover
from prefork.master.endpoints import Endpoints
from prefork.master.exits import describe_exit
from prefork.master.generations import Generations
from prefork.master.handover import HandedMold, HandedWorker, Handover
from prefork.master.molds import Molds, MoldState
from prefork.master.pool import WorkerPool
from prefork.master.state import LbDrain, StopMode
from prefork.master.timers import Timers
from prefork.master.watching import ChangeWatcher
from prefork.upgrade import UPGRADE_TIMEOUT, Upgrade, Upgrader, execute_program

log = logging.getLogger(__name__)


class Master(Protocol):
    """What an upgrade in place needs of :class:`prefork.master.loop.Master`."""

    pid: int
    started: float
    argv: list[str]
    stopping: StopMode | None
    lb_drain: LbDrain | None
    timers: Timers
    upgrader: Upgrader
    gens: Generations
    pool: WorkerPool
    molds: Molds
    endpoints: Endpoints
    control: ControlServer
    watcher: ChangeWatcher

    @property
    def listeners(self) -> list[Listener]: ...

    @property
    def config(self) -> Config: ...

    @property
    def event_pipe(self) -> tuple[int, int]: ...

    @property
    def handled_signals(self) -> set[int]: ...


def begin(master: Master, waiter: ControlConnection | None) -> None:
    """Start the new program's check (answering ``waiter`` at the end), or refuse the upgrade now."""
    why = ("the daemon is stopping" if master.stopping is not None else
           "an upgrade is in progress" if master.upgrader.current is not None else
           "a reload is in progress" if master.gens.reloading else
           "drained: the listening sockets are closed" if master.lb_drain is LbDrain.LISTENERS_CLOSED else None)
    if why is None:
        try:
            upgrade = master.upgrader.begin_check(master.argv, waiter)
        except OSError as exc:
            why = f"cannot start the new program: {exc.strerror or exc}"
        else:
            master.timers.set("upgrade", upgrade.deadline, lambda: master.upgrader.fail(
                f"the new program's configuration check took over {UPGRADE_TIMEOUT:g}s", kill=True))
            return
    log.error("upgrade refused: %s", why)
    if waiter is not None:
        waiter.reply({"ok": False, "error": f"upgrade failed: {why}"})

REPLY_TIMEOUT = 5.0  # seconds a handed-over client may take to read its answer


class InPlaceReply:
    """Answers a ``preforkctl upgrade`` client handed across the exec, once the new image's generation serves."""

    def __init__(self, fd: int, began: float) -> None:
        self.sock = socket.socket(fileno=fd)
        self.began = began

    def reply(self, message: dict[str, Any]) -> None:
        if message.get("ok"):
            pid = os.getpid()
            answer: dict[str, Any] = {
                "ok": True, "pid": pid, "previous_pid": pid, "in_place": True, "generation": message["generation"],
                "serve_s": round(time.monotonic() - self.began, 3),
                **{k: v for k, v in message.items() if k.startswith("listen_")}}
        else:
            answer = {"ok": False, "error": "upgrade failed: " + str(message.get("error", "")).removeprefix(
                "reload failed: ")}
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(REPLY_TIMEOUT)
            self.sock.sendall(encode(answer))
        except OSError:
            pass  # the client left: nothing to tell
        finally:
            self.sock.close()


def checked(master: Master, status: int) -> None:
    """The new program checked the configuration: execute it in place, or fail the upgrade in one line."""
    upgrade, last = master.upgrader.checked()
    if os.waitstatus_to_exitcode(status) != 0:
        how, _ = describe_exit(status)
        why = last.removeprefix("prefork: error: ") or f"the new program's configuration check {how}"
    elif master.stopping is not None or master.gens.reloading:
        why = "the daemon is stopping" if master.stopping is not None else "a reload is in progress"
    else:
        why = execute(master, upgrade)  # returns only when the exec failed
    log.error("upgrade failed: %s; still serving (pid %d)", why, master.pid)
    for waiter in upgrade.waiters:
        waiter.reply({"ok": False, "error": f"upgrade failed: {why}"})


def handed_state(master: Master, upgrade: Upgrade) -> Handover:
    """Everything the next image takes over (see :mod:`prefork.master.handover`)."""
    pool, molds = master.pool, master.molds
    return Handover(
        listeners=[(li.fileno(), li.spec) for li in master.listeners], side=master.endpoints.side_sockets(),
        control_fd=master.control.sock.fileno(), events=master.event_pipe,
        scoreboard_fd=pool.scoreboard.fd, scoreboard_capacity=pool.scoreboard.capacity,
        generation=master.gens.generation, next_generation=master.gens.next_generation(),
        workers=[HandedWorker(pid=w.pid, slot=w.slot, generation=w.generation, record_index=w.record_index,
                              started=w.started, state=w.state.value, stop_reason=w.stop_reason)
                 for w in pool.workers.values()],
        molds=[HandedMold(generation=m.generation, pid=m.pid, fd=m.sock.fileno(), threads=m.threads)
               for m in molds.by_generation.values()],
        totals=dataclasses.asdict(pool.totals),
        waiters=[w.sock.fileno() for w in upgrade.waiters if isinstance(w, ControlConnection) and w.sock.fileno() >= 0],
        began=upgrade.began, master_started=master.started, filter_helper=filter_helper())


def execute(master: Master, upgrade: Upgrade) -> str:
    """Become the prefork program now installed, keeping our pid, children and sockets; on failure, why."""
    for mold in list(master.molds.by_generation.values()):
        if mold.state is not MoldState.READY:
            master.molds.end(mold, kill=True)  # a loading mold cannot be handed over mid-sentence
    master.watcher.close()  # --reload-on-change: the new image starts its own
    state = handed_state(master, upgrade)
    command = master.upgrader.command(master.argv)
    env = handover.prepare(state)
    log.info("upgrade: executing %s in place (pid %d stays); handing over %d worker(s), %d mold(s), "
             "generation %d", command[0], master.pid, len(state.workers), len(state.molds), state.generation)
    logs.flush()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, master.handled_signals)  # pending until the new image
    wakeup = signal.set_wakeup_fd(-1)
    try:
        execute_program(command, env)
    except OSError as exc:
        handover.abandon(env, state)
        signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        master.watcher.start()
        return f"cannot execute {command[0]}: {exc.strerror or exc}"
    raise AssertionError("execve returned")  # pragma: no cover


def resume(master: Master, state: Handover) -> None:
    """We are the new image: adopt what the previous one handed over, then replace it as a reload does."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, master.handled_signals)  # what came during the exec arrives now
    master.started = state.master_started or master.started
    workers = master.pool.adopt(state.workers, master.config.graceful_timeout)
    for mold in state.molds:
        master.molds.adopt(mold.generation, mold.pid, mold.fd, mold.threads)
    master.gens.resume(state.generation, state.next_generation, workers)
    log.info("upgrade: prefork %s runs in place (pid %d): %d worker(s) and %d mold(s) of generation %d adopted; "
             "replacing them as a reload does", __version__, master.pid, len(workers), len(state.molds),
             state.generation)
    master.gens.begin_reload([InPlaceReply(fd, state.began) for fd in state.waiters])
