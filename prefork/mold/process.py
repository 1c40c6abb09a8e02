"""A mold's life: import the generation's handler once, then fork that generation's workers on request.

The master forks a mold when a generation starts (:mod:`prefork.master.molds`).
The mold imports the handler (:func:`prefork.preload.preload_handler`: the
collector is frozen afterwards, so the workers' collections leave the shared
pages alone), says ``ready`` and then does nothing but fork. Every worker of
the generation, respawns included, is a fork of this process, so it runs the
code the generation started with, whatever is on disk by then.

Each worker is forked twice (mold -> a middle process -> the worker) and the
middle process exits at once: the worker is re-parented to the master, a
child subreaper, which supervises and reaps it as a child of its own. The
worker waits, on a pipe, until the mold has reaped the middle process (from
then on the master is its parent) before it becomes a worker, so its death
signal and orphan check are about the master.

The mold dies with the master (``PR_SET_PDEATHSIG`` SIGKILL: it holds no
connection) and ends when the master closes its end of the mold's socket.
The signals the master handles stay blocked here for the mold's whole life:
a worker forked from it starts with them blocked, as one forked by the
master does, and installs its own handlers before it unblocks them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

from prefork import logs
from prefork.config import Config
from prefork.mold import wire
from prefork.mold.wire import Kind
from prefork.prctl import set_pdeathsig
from prefork.preload import preload_handler
from prefork.scoreboard import Scoreboard
from prefork.tls import TlsSetup
from prefork.workers.entry import WORKER_BOOT_ERROR, WorkerSpec, run_worker
from prefork.workers.loading import HandlerLoadError

log = logging.getLogger(__name__)

MOLD_OK = 0
MOLD_CRASHED = 1
MOLD_ENV = "PREFORK_MOLD"  # a program serving from Python, run again as a mold: what its master handed it (JSON)


@dataclass(frozen=True)
class MoldSpec:
    """What a mold is given by the master: everything its workers need but their slot and record."""

    generation: int
    master_pid: int
    config: Config
    listeners: tuple[socket.socket, ...]
    channel_fd: int  # the master's event pipe, for the workers
    tls: TlsSetup | None = None
    listener_specs: tuple[str, ...] = ()

    def worker(self, slot: int, record_index: int, max_requests: int, config: Config) -> WorkerSpec:
        return WorkerSpec(slot=slot, generation=self.generation, record_index=record_index,
                          master_pid=self.master_pid, config=config, listeners=self.listeners,
                          channel_fd=self.channel_fd, max_requests=max_requests, tls=self.tls,
                          listener_specs=self.listener_specs)


def run_mold(spec: MoldSpec, scoreboard: Scoreboard, sock: socket.socket) -> NoReturn:
    """Serve as the mold of ``spec.generation`` in a freshly forked child; never returns."""
    status = MOLD_CRASHED
    try:
        status = _mold(spec, scoreboard, sock)
    except BaseException:
        log.exception("mold of generation %d (pid %d) crashed", spec.generation, os.getpid())
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
        os._exit(status)


def _mold(spec: MoldSpec, scoreboard: Scoreboard, sock: socket.socket) -> int:
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != spec.master_pid:  # the master died before prctl took effect
        return MOLD_OK
    logs.set_title(f"mold {spec.generation}", spec.config.name)
    began = time.monotonic()
    sockets_before = _open_sockets()
    try:
        config = preload_handler(spec.config)
    except HandlerLoadError as exc:
        wire.send(sock, Kind.FAILED, error=str(exc))
        return WORKER_BOOT_ERROR
    threads = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    opened = len(_open_sockets() - sockets_before)
    if threads or opened:
        left = ([f"{len(threads)} thread(s) running ({', '.join(threads)})"] if threads else []) + (
            [f"{opened} socket(s) open"] if opened else [])
        log.warning("importing %s left %s: a forked worker has none of those threads and would share those "
                    "connections with its siblings; if the handler needs them, use --no-preload (each worker then "
                    "imports the handler itself)", config.effective_handler, " and ".join(left))
    log.info("mold of generation %d (pid %d) holds %s, imported in %.2fs", spec.generation, os.getpid(),
             config.effective_handler, time.monotonic() - began)
    wire.send(sock, Kind.READY, threads=len(threads))
    closed = False
    while True:
        message = wire.receive(sock)
        if message is None:
            return MOLD_OK  # the master closed its end: the generation is gone
        kind, fields = message
        if kind is Kind.CLOSE_LISTENERS and not closed:
            closed = True
            for listener in spec.listeners:
                listener.close()  # once every process has, new connections are refused
            continue
        if kind is not Kind.FORK:
            continue
        if closed:
            wire.send(sock, Kind.ERROR, error="the listening sockets are closed")
            continue
        try:
            worker = spec.worker(int(fields["slot"]), int(fields["record_index"]), int(fields["max_requests"]), config)
            pid = fork_worker(worker, scoreboard, sock)
        except OSError as exc:
            wire.send(sock, Kind.ERROR, error=exc.strerror or str(exc))
        else:
            wire.send(sock, Kind.FORKED, pid=pid)


def _open_sockets() -> set[int]:
    """This process's descriptors that are sockets (a connection opened at import is one)."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                if stat.S_ISSOCK(os.stat(f"/proc/self/fd/{name}").st_mode):
                    found.add(int(name))
    return found


def fork_worker(spec: WorkerSpec, scoreboard: Scoreboard, sock: socket.socket) -> int:
    """Fork the worker ``spec`` through a middle process that exits at once; its pid. Raises OSError."""
    go_r, go_w = os.pipe()  # the worker waits here until the middle process is reaped
    pid_r, pid_w = os.pipe()  # the middle process tells the worker's pid
    try:
        middle = os.fork()
    except OSError:
        for fd in (go_r, go_w, pid_r, pid_w):
            os.close(fd)
        raise
    if middle == 0:  # the middle process: fork the worker, say its pid, go
        try:
            os.close(go_w)
            os.close(pid_r)
            worker = os.fork()
            if worker == 0:
                os.close(pid_w)
                _become_worker(spec, scoreboard, sock, go_r)
            with contextlib.suppress(OSError):  # both sides, so the group exists before anyone signals it
                os.setpgid(worker, 0)
            os.write(pid_w, str(worker).encode())
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(pid_w)
    try:
        data = os.read(pid_r, 32)
        os.waitpid(middle, 0)  # once reaped, its child (the worker) is the master's
    finally:
        os.close(pid_r)
    try:
        if not data.isdigit():
            raise OSError(0, "the worker could not be forked")
        os.write(go_w, b"1")
    finally:
        os.close(go_w)
    return int(data)


def _become_worker(spec: WorkerSpec, scoreboard: Scoreboard, sock: socket.socket, go_r: int) -> NoReturn:
    with contextlib.suppress(OSError):  # EPERM: already a group leader, never here
        os.setpgid(0, 0)
    try:
        sock.close()
        go = os.read(go_r, 1)
        os.close(go_r)
    except BaseException:
        os._exit(MOLD_CRASHED)
    if go != b"1":  # the mold died before the master learnt about us: a worker nobody supervises must not serve
        os._exit(MOLD_OK)
    # The log files afresh: the mold's streams are the ones open when it started, and a reopen (USR1, after
    # logrotate) since then reached the master and the workers, not the mold.
    logs.reopen()
    run_worker(spec, scoreboard)
