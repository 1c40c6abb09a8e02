"""The child's entry point after ``fork``: reset the process, load the handler, serve, always ``os._exit``.

:func:`run_worker` is all the master calls in the child. It makes the
process a worker (signal dispositions every class shares, death with the
master, fault dumps, the process title), loads the handler (a failure is
``BOOT_ERROR`` on the channel and :data:`WORKER_BOOT_ERROR`, so the master
halts instead of fork-looping), builds the worker of the configured class
and runs its lifecycle. The exit status tells the master how it ended.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from prefork import logs, tls
from prefork.channel import Channel, Event
from prefork.config import Config
from prefork.prctl import set_pdeathsig
from prefork.scoreboard import Scoreboard, SourceCounts
from prefork.tls import ServerTls, TlsSetup
from prefork.workers.admission import Policy
from prefork.workers.async_worker import AsyncWorker
from prefork.workers.balance import Balance
from prefork.workers.base import FastExit, WorkerLifecycle, WorkerOptions, heartbeat_interval
from prefork.workers.connection import ProxyPolicy
from prefork.workers.loading import HandlerLoadError, handler_for
from prefork.workers.servers import SyncServer, ThreadServer

log = logging.getLogger(__name__)

# Exit statuses a worker uses to tell the master why it ended.
WORKER_OK = 0
WORKER_CRASHED = 1
WORKER_BOOT_ERROR = 3  # the handler could not be loaded: respawning would only fail again
# seconds past --timeout (or --graceful-timeout, the longer) before a worker whose heartbeat stopped is ended by
# the kernel (SIGALRM): after the master's own SIGABRT and SIGKILL would have, so it acts only without a master
DEADMAN_MARGIN = 5.0

@dataclass(frozen=True)
class WorkerSpec:
    """What the master tells a worker it is about to fork."""

    slot: int
    generation: int
    record_index: int  # the worker's record in the scoreboard
    master_pid: int
    config: Config
    listeners: tuple[socket.socket, ...]
    channel_fd: int  # write end of the master's event pipe (see prefork.channel)
    max_requests: int  # 0 = never recycle; jitter already applied
    tls: TlsSetup | None = None  # the generation's TLS contexts, built by the master (None: no TLS anywhere)
    listener_specs: tuple[str, ...] = ()  # each listener's name (Listener.spec), to find its TLS

    def listener_tls(self) -> tuple[ServerTls | None, ...]:
        """Each listener's TLS (None: plain TCP), in the order of ``listeners``."""
        if self.tls is None:
            return tuple(None for _ in self.listeners)
        return tuple(self.tls.for_listener(spec) for spec in self.listener_specs)


# Every signal whose disposition a worker changes; a process a handler forks gets them back at default.
_WORKER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGHUP, signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


def run_worker(spec: WorkerSpec, scoreboard: Scoreboard) -> NoReturn:
    """Serve as a worker in a freshly forked child; never returns."""
    status = WORKER_CRASHED
    try:
        status = _serve(spec, scoreboard)
    except FastExit:
        status = WORKER_OK
    except BaseException:
        log.exception("worker %d (pid %d) crashed", spec.slot, os.getpid())
    finally:
        if os.getppid() != spec.master_pid:
            _end_own_group()  # the master is gone: nobody else will end what our handlers started
        with contextlib.suppress(BaseException):
            logging.shutdown()
        os._exit(status)


def _serve(spec: WorkerSpec, scoreboard: Scoreboard) -> int:
    set_pdeathsig(signal.SIGTERM)
    if os.getppid() != spec.master_pid:  # the master died before prctl took effect
        return WORKER_OK
    # The master's signals that mean nothing to a worker; the worker's own are its class's (base.py).
    # Caught by a no-op rather than ignored: a program a handler runs gets them back at default on exec.
    for signum in (signal.SIGHUP, signal.SIGWINCH):
        signal.signal(signum, _noop)
    # Ignored: a worker leads its own process group, in the background of any terminal, and
    # terminal I/O there must neither stop it nor loop on a caught SIGTTOU.
    for signum in (signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the dead-man timer (WorkerLifecycle.push_deadman) ends us
    reset_signals_in_forks()
    # SIGABRT from the master (a stale heartbeat), or a crash in C code: every thread's stack to the log
    faulthandler.enable(file=logs.fault_stream(), all_threads=True)
    tls.quiet_bad_server_names()
    logs.set_title(f"worker {spec.slot}", spec.config.name)

    channel = Channel(spec.channel_fd)
    try:
        handler = handler_for(spec.config, relay_tls=spec.tls.relay if spec.tls is not None else None,
                              upstream_board=scoreboard.upstreams, worker_index=spec.record_index)
    except HandlerLoadError as exc:
        channel.send(Event.BOOT_ERROR, str(exc))
        return WORKER_BOOT_ERROR
    if spec.config.relay:
        handler.start_checks()  # the relay's active checks, if any: a thread of this worker (docs/relay.md)
    build_worker(spec, handler, scoreboard, channel).run()
    return WORKER_OK


def build_worker(spec: WorkerSpec, handler: Any, scoreboard: Scoreboard, channel: Channel) -> WorkerLifecycle:
    """The worker of the configured class, serving ``handler`` on the spec's listeners."""
    config = spec.config
    record = scoreboard[spec.record_index]
    peers = Balance(scoreboard, spec.record_index, spec.generation)
    balance = peers if config.balance == "on" else None
    options = WorkerOptions(
        slot=spec.slot,
        master_pid=spec.master_pid,
        channel=channel,
        max_requests=spec.max_requests,
        graceful_timeout=config.graceful_timeout,
        heartbeat_interval=heartbeat_interval(config.timeout),
        deadman=max(config.timeout, config.graceful_timeout) + DEADMAN_MARGIN,
        proxy=ProxyPolicy.from_config(config),
        balance=balance,
        peers=peers,
        tls=spec.listener_tls(),
        memory_limit=config.max_worker_memory * 2**20,
        admission=Policy(idle_timeout=config.idle_timeout, reclaim_window=config.reclaim_idle_after,
                         max_per_source=config.max_connections_per_source, drain_idle=config.drain_idle,
                         handler_timeout=config.handler_timeout),
        sources=SourceCounts(scoreboard, spec.record_index) if config.max_connections_per_source else None,
    )
    if config.worker_class == "async":
        return AsyncWorker(spec.listeners, handler, config, record, options)
    if config.worker_class == "sync":
        return SyncServer(spec.listeners, handler, record, options, count_bytes=config.count_bytes)
    return ThreadServer(spec.listeners, handler, record, options, threads=config.threads,
                        count_bytes=config.count_bytes)


def _noop(signum: int, frame: FrameType | None) -> None:
    """A signal that means nothing to a worker."""


def reset_signals_in_forks() -> None:
    """Every process a handler forks starts with the default signal dispositions and mask, none lost on the way."""
    os.register_at_fork(before=_hold_worker_signals, after_in_parent=_release_worker_signals,
                        after_in_child=_as_a_handler_child)


# Each forking thread's signal mask from before a handler's fork, put back in the worker after it
# (by thread: two handler threads may be in their before hooks at once).
_masks_before_fork: dict[int, set[int | signal.Signals]] = {}


def _hold_worker_signals() -> None:
    """Before a handler's fork: the worker's signals blocked in the forking thread, so the child is born so.

    Between the fork and :func:`_as_a_handler_child` the child still has the
    worker's handlers: a SIGTERM arriving then (the worker ending its group
    right away, its master gone) would be caught by the worker's handler and
    lost when the child resets it. Blocked, it waits for the default action.
    """
    with contextlib.suppress(ValueError, OSError):
        _masks_before_fork[threading.get_ident()] = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)


def _release_worker_signals() -> None:
    """After a handler's fork, in the worker: the forking thread's mask as it was."""
    mask = _masks_before_fork.pop(threading.get_ident(), None)
    if mask is not None:
        with contextlib.suppress(ValueError, OSError):
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _as_a_handler_child() -> None:
    """In a process a handler forks: the default signal dispositions and mask, not the worker's.

    Inherited, the worker's no-op handlers would make it ignore SIGTERM (it
    would outlive the daemon holding the port), and the worker's wakeup fd
    would carry the signals meant for the child to the worker's loop. The
    child is born with the worker's signals blocked (:func:`_hold_worker_signals`):
    one sent to it before this ran is pending, and takes its default action
    when the mask is cleared, last.
    """
    _masks_before_fork.clear()  # the worker's
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for signum in _WORKER_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, signal.SIG_DFL)
    with contextlib.suppress(ValueError, OSError):
        signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _end_own_group() -> None:
    """SIGTERM to what this worker's handlers left in its process group (the master would have)."""
    if os.getpgrp() != os.getpid():
        return  # not a group of our own: that would be the daemon's
    with contextlib.suppress(OSError, ValueError):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # we are leaving anyway
        os.killpg(os.getpid(), signal.SIGTERM)
