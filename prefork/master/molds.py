"""The master's side of the molds: start one per generation, ask it for workers, end it with its generation.

A mold (:mod:`prefork.mold.process`) is forked by the master when a
generation starts and imports that generation's handler; the master keeps it
while the generation serves, starts or still has workers, and ends it after
(it closes its end of the mold's socket: the mold exits). Loading runs
beside the master's loop: the mold's ``ready`` or ``failed`` arrives on its
socket in the selector. A fork request is then answered within
:data:`FORK_TIMEOUT` (a fork of a warm process takes milliseconds); the master
waits for that answer as it would wait for a fork of its own, and a mold that
does not answer in time is killed and counts as a failed fork.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from prefork.config import Config
from prefork.master.pool import kill_pid
from prefork.mold import wire
from prefork.mold.process import MOLD_ENV, MoldSpec, run_mold
from prefork.mold.wire import Kind
from prefork.scoreboard import Scoreboard
from prefork.tls import TlsSetup
from prefork.upgrade import execute_program

log = logging.getLogger(__name__)

FORK_TIMEOUT = 10.0  # seconds a ready mold may take to answer a fork request


class MoldState(enum.Enum):
    LOADING = "loading"  # importing the handler
    READY = "ready"  # forks workers on request
    FAILED = "failed"  # the handler cannot be loaded, or the mold is gone


@dataclass
class Mold:
    """A generation's mold, as the master sees it."""

    pid: int
    generation: int
    sock: socket.socket  # the master's end
    started: float
    state: MoldState = MoldState.LOADING
    error: str = ""
    threads: int = 0  # threads its import left running
    waiting: set[int] = field(default_factory=set)  # slots to fork once it is ready
    rerun: bool = False  # the program run again (a program serving from Python), not a fork of the master

    def describe(self) -> str:
        return f"the mold of generation {self.generation}" + (" (the program run again)" if self.rerun else "")


class Molds:
    """Every live mold by generation.

    ``close_in_child`` and ``blocked`` are the pool's (see
    :class:`prefork.master.pool.WorkerPool`); ``on_loaded`` is called once per
    mold with its outcome (READY or FAILED).
    """

    def __init__(self, *, master_pid: int, channel_fd: int, scoreboard: Scoreboard, selector: selectors.BaseSelector,
                 close_in_child: Callable[[set[int]], None], blocked: Iterable[int],
                 on_loaded: Callable[[Mold], None]) -> None:
        self.master_pid = master_pid
        self.channel_fd = channel_fd
        self.scoreboard = scoreboard
        self.selector = selector
        self.close_in_child = close_in_child
        self.blocked = set(blocked)
        self.on_loaded = on_loaded
        self.by_generation: dict[int, Mold] = {}
        # a program serving from Python: every mold after the first is the program run again (this command),
        # which imports the code on disk and becomes the mold when it reaches serve_forever()
        self.rerun: Callable[[], list[str]] | None = None
        self.forked_first = False

    def start(self, generation: int, config: Config, listeners: Collection[socket.socket], *,
              tls: TlsSetup | None, listener_specs: tuple[str, ...]) -> Mold:
        """Fork the mold of ``generation``; it reports on its socket once loaded. Raises OSError."""
        if self.rerun is not None and self.forked_first:
            return self._start_by_rerun(self.rerun(), generation, config, listeners, listener_specs)
        self.forked_first = True
        spec = MoldSpec(generation=generation, master_pid=self.master_pid, config=config,
                        listeners=tuple(listeners), channel_fd=self.channel_fd, tls=tls,
                        listener_specs=listener_specs)

        def child(ours: socket.socket, theirs: socket.socket) -> None:
            ours.close()
            self.close_in_child({sock.fileno() for sock in listeners})
            run_mold(spec, self.scoreboard, theirs)

        return self._fork(generation, config.effective_handler, child)

    def _start_by_rerun(self, command: list[str], generation: int, config: Config,
                        listeners: Collection[socket.socket], listener_specs: tuple[str, ...]) -> Mold:
        """Start ``command`` (the program again) as the mold of ``generation``, told so in its environment."""

        def child(ours: socket.socket, theirs: socket.socket) -> None:
            handed = {"generation": generation, "master_pid": self.master_pid, "sock": theirs.fileno(),
                      "listeners": [[sock.fileno(), spec]
                                    for sock, spec in zip(listeners, listener_specs, strict=True)],
                      "channel_fd": self.channel_fd, "scoreboard_fd": self.scoreboard.fd,
                      "scoreboard_capacity": self.scoreboard.capacity}
            env = dict(os.environ)
            env[MOLD_ENV] = json.dumps(handed)
            signal.set_wakeup_fd(-1)
            for fd in [theirs.fileno(), *(sock.fileno() for sock in listeners), self.channel_fd, self.scoreboard.fd]:
                os.set_inheritable(fd, True)
            execute_program(command, env)

        mold = self._fork(generation, f"{config.effective_handler} (the program run again)", child)
        mold.rerun = True
        return mold

    def _fork(self, generation: int, what: str, child: Callable[[socket.socket, socket.socket], None]) -> Mold:
        """Fork the mold of ``generation``, importing ``what``: ``child(ours, theirs)`` is its life (a fork of
        this master, or the program run again); it never comes back, and the child exits 127 if it does.

        The master's signals stay blocked in the child (see :mod:`prefork.mold.process`). Raises OSError."""
        ours, theirs = wire.pair()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.blocked)
        try:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                try:
                    with contextlib.suppress(OSError):  # its own group: a terminal's Ctrl-C is for the master
                        os.setpgid(0, 0)
                    child(ours, theirs)
                finally:
                    os._exit(127)
        except OSError:
            ours.close()
            theirs.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return self._started(pid, generation, ours, theirs, what)

    def _started(self, pid: int, generation: int, ours: socket.socket, theirs: socket.socket, what: str) -> Mold:
        theirs.close()
        with contextlib.suppress(OSError):
            os.setpgid(pid, 0)
        mold = Mold(pid=pid, generation=generation, sock=ours, started=time.monotonic())
        self.by_generation[generation] = mold
        self.selector.register(ours, selectors.EVENT_READ, lambda mask: self.loaded(mold, how=None))
        log.info("mold of generation %d (pid %d) started: importing %s", generation, pid, what)
        return mold

    def adopt(self, generation: int, pid: int, fd: int, threads: int) -> Mold:
        """A ready mold a previous image of this master handed over (an upgrade in place)."""
        mold = Mold(pid=pid, generation=generation, sock=socket.socket(fileno=fd), started=time.monotonic(),
                    state=MoldState.READY, threads=threads)
        self.by_generation[generation] = mold
        return mold

    def loaded(self, mold: Mold, how: str | None = "exited") -> None:
        """The mold's first word is there, or it is gone (reaped: ``how``); READY or FAILED, then ``on_loaded``.

        ``how`` None: its socket turned readable, and a silent end waits for the exit status.
        """
        if mold.state is not MoldState.LOADING:
            return
        self._unregister(mold)
        try:
            mold.sock.setblocking(False)
            message = wire.receive(mold.sock)
        except OSError:  # BlockingIOError: it died before it said anything
            message = None
        if message is None and how is None:
            return  # it closed without a word: its exit, reaped next, says how it ended
        if message is not None and message[0] is Kind.READY:
            mold.state = MoldState.READY
            mold.threads = int(message[1].get("threads", 0))
        else:
            mold.state = MoldState.FAILED
            mold.error = str(message[1].get("error", "")) if message is not None else ""
            mold.error = mold.error or f"{mold.describe()} {how or 'exited'} before it was ready (see the log)"
        self.on_loaded(mold)

    def fork_worker(self, mold: Mold, slot: int, record_index: int, max_requests: int) -> int:
        """The pid of a new worker forked by ``mold``. Raises OSError (the mold cannot, or did not answer)."""
        if mold.state is not MoldState.READY:
            raise OSError(0, f"the mold of generation {mold.generation} is {mold.state.value}")
        try:
            mold.sock.settimeout(FORK_TIMEOUT)
            wire.send(mold.sock, Kind.FORK, slot=slot, record_index=record_index, max_requests=max_requests)
            answer = wire.receive(mold.sock)
        except TimeoutError:
            log.error("mold of generation %d (pid %d) did not answer a fork request within %gs; killing it",
                      mold.generation, mold.pid, FORK_TIMEOUT)
            self.end(mold, kill=True)
            raise OSError(0, f"the mold did not answer within {FORK_TIMEOUT:g}s") from None
        except OSError as exc:
            self.end(mold, kill=True)
            raise OSError(0, f"the mold is gone ({exc.strerror or exc})") from None
        if answer is None:
            self.end(mold, kill=True)
            raise OSError(0, "the mold is gone")
        kind, fields = answer
        if kind is not Kind.FORKED:
            raise OSError(0, str(fields.get("error", "the mold could not fork")))
        return int(fields["pid"])

    def close_listeners(self, generations: Callable[[int], bool] = lambda generation: True) -> None:
        """The molds of ``generations`` close their copies of the listening sockets (and fork no more)."""
        for mold in list(self.by_generation.values()):
            if generations(mold.generation):
                try:
                    wire.send(mold.sock, Kind.CLOSE_LISTENERS)
                except OSError:  # gone, or its queue full: it cannot keep the sockets open for long
                    self.end(mold, kill=True)

    def end(self, mold: Mold, *, kill: bool = False) -> None:
        """Close our end (the mold exits); SIGKILL too when ``kill``. Its exit is reaped as any child's."""
        self._unregister(mold)
        if mold.state is not MoldState.FAILED:
            mold.state = MoldState.FAILED
            mold.error = mold.error or "ended"
        mold.sock.close()
        if self.by_generation.get(mold.generation) is mold:
            del self.by_generation[mold.generation]
        if kill:
            kill_pid(mold.pid, signal.SIGKILL)

    def _unregister(self, mold: Mold) -> None:
        with contextlib.suppress(KeyError, ValueError):  # not registered, or closed already
            self.selector.unregister(mold.sock)

    def reaped(self, pid: int) -> Mold | None:
        """The mold that had ``pid``, if one did (still listed when it died on its own)."""
        for mold in self.by_generation.values():
            if mold.pid == pid:
                return mold
        return None

    def close_all_in_child(self) -> None:
        """In a new child of the master: our ends of every mold's socket are not its to hold."""
        for mold in self.by_generation.values():
            mold.sock.close()

    def end_all(self) -> None:
        """The master exits: every mold goes now, and is reaped (no zombie is left to a PID 1 that reaps none)."""
        for mold in list(self.by_generation.values()):
            self.end(mold, kill=True)
            with contextlib.suppress(ChildProcessError):  # reaped already
                os.waitpid(mold.pid, 0)  # SIGKILL: at once
