"""The master's loop and lifecycle: start, reload, scale, stop, drain for a load balancer, upgrade.

Everything happens in :meth:`Master.run`'s single-threaded selector loop:
signals arrive as bytes on a wakeup socket (``signal.set_wakeup_fd``; the
Python-level handlers do nothing), workers report on a typed event channel
(:mod:`prefork.channel`), control clients are served in the same selector,
and the select timeout is the nearest deadline (:mod:`prefork.master.timers`:
a heartbeat going stale, a drain ending, a respawn backoff, a reload timing
out, a silent control client). Nothing sleeps, nothing polls on a fixed tick.
The master binds sockets only when a reload adds a listener (through
:mod:`prefork.listeners`).

Every callback the loop runs (control and metrics clients, signals, worker
events, timers) is validated at its own boundary; behind that, the loop is
the last resort: an exception that escapes a callback is logged with its
traceback, counted (``master_errors``), the client it came from is closed,
and the loop goes on. Nothing a client sends can end the master.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import resource
import selectors
import signal
import socket
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from prefork import __version__, fdstore, logs
from prefork.channel import Decoder
from prefork.config import Config, describe_handler
from prefork.control import MAX_CLIENTS, ControlConnection, ControlServer
from prefork.httpmetrics import MAX_CLIENTS as METRICS_MAX_CLIENTS
from prefork.kernelstats import listen_counters
from prefork.listeners import Listener
from prefork.master import commands, inplace, report
from prefork.master.checks import PeriodicChecks
from prefork.master.closing import Closer, Closing
from prefork.master.endpoints import Endpoints
from prefork.master.exits import describe_exit
from prefork.master.generations import Generations
from prefork.master.handover import Handover
from prefork.master.molds import Molds
from prefork.master.pool import WorkerPool
from prefork.master.reload import Waiter
from prefork.master.reloader import reload_progress
from prefork.master.state import ErrorBudget, LbDrain, StopMode, Totals, Worker
from prefork.master.timers import Timers
from prefork.master.watching import ChangeWatcher
from prefork.prctl import set_child_subreaper
from prefork.systemd import Notifier
from prefork.tls import TlsSetup
from prefork.upgrade import Upgrader, report_ready

log = logging.getLogger(__name__)

FD_RESERVE = 32  # descriptors kept free for what the master opens besides clients (see client_caps)
EXIT_OK = 0
EXIT_FATAL = 1
# Master.fatal's one cause is a handler that cannot be loaded: a configuration error, 2 as --check-config
# says, which the systemd unit's RestartPreventExitStatus=2 does not restart.
EXIT_CONFIG = 2


def _noop(signum: int, frame: FrameType | None) -> None:
    """Handlers only record: the wakeup fd brings the signal number to the loop."""


def client_caps(limit: int, in_use: int) -> tuple[int, int]:
    """(control clients, metrics and agent clients) the master holds at once under a descriptor ``limit``.

    Each client is one descriptor. ``FD_RESERVE`` stay free for what the
    master opens besides (a reload's new listeners, ``/proc`` reads for
    status, a log file reopened, the upgrade's pipe) and the rest is halved,
    so a flood on one port never takes the descriptors the other needs.
    ``limit`` < 0 is no limit.
    """
    if limit < 0:
        return MAX_CLIENTS, METRICS_MAX_CLIENTS
    share = max(1, (limit - in_use - FD_RESERVE) // 2)
    return min(MAX_CLIENTS, share), min(METRICS_MAX_CLIENTS, share)


def _descriptor_limit() -> tuple[int, int]:
    """(RLIMIT_NOFILE's soft limit, -1 for none; descriptors open now)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    return (-1 if soft == resource.RLIM_INFINITY else soft), in_use


class Guard:
    """The last resort behind every callback of the master's loop (see the module docstring)."""

    def __init__(self, totals: Totals, drop_client: Callable[[object], bool]) -> None:
        self.totals = totals
        self.drop_client = drop_client  # closes the control or metrics client on a socket; False if none
        self.budget = ErrorBudget()

    def turn(self, selector: selectors.BaseSelector, timers: Timers) -> None:
        """One turn of the loop: wait until the nearest deadline, run what is ready, then what is due."""
        deadline = timers.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, mask in selector.select(timeout):
            try:
                key.data(mask)
            except Exception:
                self.failed(key.data, key.fileobj)
        try:
            timers.run_due(time.monotonic())
        except Exception:  # the actions still due run on the next turn: their deadlines have passed
            self.failed(timers.run_due, None)

    def failed(self, callback: object, fileobj: object) -> None:
        """A callback raised: log it (within a budget), count it, close its client, and carry on."""
        self.totals.master_errors += 1
        dropped = fileobj is not None and self.drop_client(fileobj)
        log_it, left_out = self.budget.admit(time.monotonic())
        if left_out:
            log.error("%d more internal error(s) in the master were not logged", left_out)
        if log_it:
            name = getattr(callback, "__qualname__", type(callback).__name__)
            log.exception("internal error in %s%s; the master carries on", name,
                          " (its client is closed)" if dropped else "")


class Master:
    """Runs the daemon. ``run()`` returns the process exit status."""

    def __init__(self, config: Config, listeners: list[Listener], control: ControlServer, *,
                 cli_overrides: dict[str, Any] | None = None, adopted: bool = False,
                 notifier: Notifier | None = None, argv: list[str] | None = None,
                 upgrade_pipe: int | None = None, metrics_sock: socket.socket | None = None,
                 agent_sock: socket.socket | None = None, tls: TlsSetup | None = None,
                 resumed: Handover | None = None) -> None:
        self.control = control
        self.argv = list(argv or [])  # our command line, to start the new master on upgrade
        self.upgrade_pipe = upgrade_pipe  # we are a new master: tell the old one when we serve
        self.resumed = resumed  # we are the new image of a master that executed us in place (an upgrade)
        self.endpoints = Endpoints(self, metrics_sock, agent_sock)  # --metrics-bind, --agent-bind
        self.notifier = notifier or Notifier()
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.stopping: StopMode | None = None
        self.lb_drain: LbDrain | None = None
        self.exit_code = EXIT_OK
        self.timers = Timers()
        self.selector = selectors.DefaultSelector()
        self.upgrader = Upgrader(self.selector)
        self._wake_r, self._wake_w = socket.socketpair()
        self._events_r, self._events_w = resumed.events if resumed else os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._events_r, False)
        self._events = Decoder()
        self._signal_actions: dict[int, Callable[[], None]] = {
            signal.SIGCHLD: self.reap_children,
            signal.SIGTERM: lambda: self.begin_stop(StopMode.GRACEFUL),
            signal.SIGINT: lambda: self.begin_stop(StopMode.FAST),
            signal.SIGQUIT: lambda: self.begin_stop(StopMode.FAST),
            signal.SIGHUP: lambda: self.begin_reload([]),
            signal.SIGTTIN: lambda: self.scale(self.target + 1),
            signal.SIGTTOU: lambda: self.scale(max(1, self.target - 1)),
            signal.SIGUSR1: self.reopen_logs,
            signal.SIGUSR2: self.begin_upgrade,
        }
        self.pool = WorkerPool(master_pid=self.pid, channel_fd=self._events_w, timers=self.timers,
                               timeout=config.timeout, close_in_child=self._close_in_child,
                               blocked=self._signal_actions)
        if resumed is not None:
            self.pool.take_over(resumed)  # the board our workers write, and the counters so far
        self.molds = Molds(master_pid=self.pid, channel_fd=self._events_w, scoreboard=self.pool.scoreboard,
                           selector=self.selector, close_in_child=self._close_in_child,
                           blocked=self._signal_actions, on_loaded=lambda mold: self.gens.molding.on_loaded(mold))
        self.guard = Guard(self.pool.totals, lambda sock: self.control.drop(sock) or self.endpoints.drop(sock))
        self.gens = Generations(self, self.pool, self.timers, config, listeners, molds=self.molds,
                                cli_overrides=dict(cli_overrides or {}), adopted=adopted, tls=tls)
        self.checks = PeriodicChecks(self, self.gens, self.pool, self.timers, self.notifier)
        self.closer, self.watcher = Closer(self.timers), ChangeWatcher(self, self.selector, self.timers)
        self.stop_report: dict[str, Any] = {}  # what the stop did, for the clients that asked for it
        self.stop_began, self.stop_counters = 0.0, listen_counters()

    @property
    def event_pipe(self) -> tuple[int, int]:
        """The workers' event pipe: (our read end, the write end the workers hold)."""
        return self._events_r, self._events_w

    @property
    def handled_signals(self) -> set[int]:
        """The signals the loop acts on."""
        return set(self._signal_actions)

    @property
    def config(self) -> Config:
        return self.gens.config

    @property
    def listeners(self) -> list[Listener]:
        return self.gens.listeners

    @property
    def target(self) -> int:
        return self.gens.target

    @property
    def state(self) -> str:
        """starting, serving, reloading or stopping: the one place this is decided."""
        if self.stopping is not None:
            return "stopping"
        if self.gens.reloading:  # a probation included
            return "reloading"
        return "serving" if self.gens.serving else "starting"

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        set_child_subreaper()  # the workers a mold forks (twice) are re-parented to us: ours to reap
        self._install_signals()
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_signals)
        self.selector.register(self._events_r, selectors.EVENT_READ, self._on_worker_events)
        caps = client_caps(*_descriptor_limit())  # idle clients cannot take the master's descriptors
        self.control.attach(self.selector, lambda request, conn: commands.dispatch(self, request, conn), caps[0])
        self.timers.watch(self.control)
        self.endpoints.start(self.selector, self.timers, caps[1])
        self.checks.start()
        self.watcher.start()
        logs.set_title("master", self.config.name)
        log.info("prefork %s master (pid %d) [%s]: %d %s worker(s) of %s on %s; control socket %s%s",
                 __version__, self.pid, self.config.name, self.target, self.config.worker_class,
                 describe_handler(self.config), report.listening(self.listeners, self.gens.tls), self.control.path,
                 "".join(f"; {where}" for where in self.endpoints.describe()))
        try:
            if self.resumed is not None:
                inplace.resume(self, self.resumed)
            else:
                self.gens.start()
            while self.pool.workers or self.pool.groups or self.stopping is None:  # groups: see pool.py
                self.guard.turn(self.selector, self.timers)
        except BaseException:
            self.exit_code = EXIT_FATAL  # never "exiting with status 0" after a crash
            raise
        finally:
            self._shutdown()
        return self.exit_code

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        for signum in self._signal_actions:
            signal.signal(signum, _noop)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def _on_signals(self, mask: int) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in dict.fromkeys(data):  # once each, in arrival order
            action = self._signal_actions.get(signum)
            if action is not None:
                if signum != signal.SIGCHLD:
                    log.info("got %s", signal.Signals(signum).name)
                action()

    def _on_worker_events(self, mask: int) -> None:
        self._read_events({})

    def _read_events(self, reaped: dict[int, Worker]) -> None:
        """Everything the workers wrote so far, to the generations; ``reaped`` are workers just gone."""
        while True:
            try:
                data = os.read(self._events_r, 65536)
            except BlockingIOError:
                return
            for message in self._events.feed(data):
                worker = self.pool.workers.get(message.pid) or reaped.get(message.pid)
                if worker is not None:
                    self.gens.on_message(worker, message)
            if not data:
                return

    def reap_children(self) -> None:
        exited = self.pool.reap()
        # A worker writes its last words (retiring, a boot error) before it exits, so once it is reaped
        # they are all in the pipe: read them first, and judge each exit knowing what the worker said.
        self._read_events({w.pid: w for _, _, w in exited if w is not None})
        for pid, status, worker in exited:
            upgrade = self.upgrader.current
            if upgrade is not None and pid == upgrade.pid:
                self.timers.cancel("upgrade")
                inplace.checked(self, status)
            elif worker is not None:
                self.gens.reloads.stopped_accepting(pid)
                self.gens.on_exit(worker, status)
            elif (mold := self.molds.reaped(pid)) is not None:
                self.gens.molding.on_exit(mold, describe_exit(status)[0])

    def _close_in_child(self, keep: set[int]) -> None:
        """In a new worker, before it serves: close the master's descriptors but its listeners."""
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
        os.close(self._events_r)
        if self.upgrade_pipe is not None and self.upgrade_pipe >= 0:
            os.close(self.upgrade_pipe)  # the upgrade hand-over is between masters
        self.upgrader.close_in_child()
        self.molds.close_all_in_child()
        self.control.close_in_child()
        self.endpoints.close_in_child()
        self.watcher.close_in_child()
        reload = self.gens.reloads.in_flight
        for listener in list(self.listeners) + (reload.listeners if reload else []):
            if listener.fileno() not in keep and listener.fileno() >= 0:
                listener.sock.close()

    # -- what the generations ask of the daemon ------------------------------------------------------

    def on_serving(self) -> None:
        """The first generation serves."""
        self.notify_systemd("ready")
        if self.upgrade_pipe is not None:
            report_ready(self.upgrade_pipe)  # the master we replace hands over and drains
            self.upgrade_pipe = None

    def on_config(self, old: Config) -> None:
        """A reload took over with a new configuration."""
        self.pool.timeout = self.config.timeout
        if old.log_level != self.config.log_level:
            logs.set_level(self.config.log_level)
        self.checks.watch_memory()

    def on_listeners(self, *, added: list[Listener], removed: list[Listener]) -> None:
        """A reload bound new listeners and closed others: systemd's store follows (when there is one)."""
        fdstore.forget(self.notifier, removed)
        fdstore.keep(self.notifier, added)

    def fatal(self, why: str) -> None:
        log.critical("stopping: %s", why)
        self.exit_code = EXIT_CONFIG
        self.begin_stop(StopMode.FAST)

    def begin_reload(self, waiters: Sequence[Waiter], canary: float | None = None) -> None:
        self.gens.begin_reload(waiters, canary)

    def scale(self, count: int) -> None:
        if self.stopping is None:
            self.gens.scale(count)

    def status_line(self) -> str:
        return (f"{self.state}: {len(self.gens.slots)}/{self.target} {self.config.worker_class} workers, "
                f"generation {self.gens.generation}, {self.gens.active()} open connection(s)")

    # -- scale, stop, drain -------------------------------------------------------------------------

    def begin_stop(self, mode: StopMode) -> None:
        """Stop the daemon. Graceful: the connections queued on the listeners are served first (new ones
        are refused meanwhile), then every process closes the listeners and open connections finish."""
        if self.stopping is StopMode.FAST or self.stopping is mode:
            return
        self.stopping = mode
        self.stop_began, self.stop_counters = time.monotonic(), listen_counters()
        log.info("stopping (%s): %d worker(s) to stop", mode.value, len(self.pool.workers))
        self.notify_systemd("stopping")
        self.gens.prepare_stop()
        fdstore.forget(self.notifier, self.listeners)  # systemd's copies must not keep them open
        if (mode is StopMode.GRACEFUL and self.pool.workers
                and self.lb_drain is not LbDrain.LISTENERS_CLOSED):
            self.pool.signal_all(signal.SIGHUP)  # handlers may end long-lived connections while the queue is served
            self.closer.close_after_queue(self.listeners, time.monotonic() + self.config.graceful_timeout,
                                          self._stop_workers)
        else:
            self.closer.finish_now()
            self._stop_workers(None)

    def _stop_workers(self, closing: Closing | None) -> None:
        """The queue is served (or there is none to serve): every process closes its listeners, workers drain."""
        if closing is not None:
            self.stop_report.update(closing.report(time.monotonic()))
        self.pool.signal_all(signal.SIGUSR2)
        self.molds.close_listeners()
        self.gens.stop_workers(self.stopping or StopMode.GRACEFUL)
        for listener in self.listeners:
            listener.close()

    def _stop_summary(self) -> dict[str, Any]:
        """What the stop did: how long it took, what was queued and served, what the kernel turned away."""
        summary: dict[str, Any] = {"exit_status": self.exit_code, **self.stop_report}
        if self.stop_began:
            summary["stop_s"] = round(time.monotonic() - self.stop_began, 3)
        now = listen_counters()
        if self.stop_counters is not None and now is not None:
            summary.update(now.since(self.stop_counters))
        return summary

    def close_after_queue(self, listeners: list[Listener], then: Callable[[], None]) -> None:
        """Close ``listeners`` everywhere once their queues are served (a reload dropped them)."""
        self.closer.close_after_queue(listeners, time.monotonic() + self.config.graceful_timeout,
                                      lambda closing: then())

    def health_checks(self) -> list[str]:
        return (["PROXY LOCAL"] if self.config.proxy_protocol else []) + self.endpoints.health_checks()

    def drain_for_balancer(self, *, close: bool) -> LbDrain | None:
        """``preforkctl drain``: fail the health checks, keep serving; ``close``: close the listeners too."""
        if self.lb_drain is None or (close and self.lb_drain is LbDrain.HEALTH_CHECKS):
            if not close:
                self.lb_drain = LbDrain.HEALTH_CHECKS
                self.pool.set_lb_drain(True)
                log.info("draining for the load balancer: failing %s; serving", ", ".join(self.health_checks()))
            else:
                self.lb_drain = LbDrain.LISTENERS_CLOSED
                fdstore.forget(self.notifier, self.listeners)  # or systemd's copies would keep them open
                self.closer.close_after_queue(self.listeners, time.monotonic() + self.config.graceful_timeout,
                                              lambda closing: self._close_listeners())
                log.info("draining for the load balancer: new connections refused, listening sockets close "
                         "once the queued ones are served; open connections finish")
        return self.lb_drain

    def _close_listeners(self) -> None:
        self.pool.signal_all(signal.SIGUSR2)
        self.molds.close_listeners()
        for listener in self.listeners:
            listener.close()

    def undrain(self) -> str | None:
        """``preforkctl drain --off``; the reason it cannot be undone, if it cannot."""
        if self.lb_drain is LbDrain.LISTENERS_CLOSED:
            return "the listening sockets are closed; restart to serve again"
        self.lb_drain = None
        self.pool.set_lb_drain(False)
        log.info("drain off: answering health checks again")
        return None

    def reopen_logs(self) -> None:
        logs.reopen()
        self.pool.signal_all(signal.SIGUSR1)

    # -- upgrade (the prefork program now installed, executed in place) ----------------------------------

    def begin_upgrade(self, waiter: ControlConnection | None = None) -> None:
        """SIGUSR2 / preforkctl upgrade: have the new program check the configuration, then execute it in place."""
        inplace.begin(self, waiter)

    # -- the end ------------------------------------------------------------------------------------

    def notify_systemd(self, event: str) -> None:
        """Tell systemd (when it is listening) where the lifecycle stands."""
        if event == "ready":
            self.notifier.ready(self.status_line())
        elif event == "reloading":
            self.notifier.reloading()
        elif event == "stopping":
            self.notifier.stopping()

    def _shutdown(self) -> None:
        signal.set_wakeup_fd(-1)
        self.pool.end_groups_now()
        self.gens.abort_reload("the daemon stopped")
        self.molds.end_all()
        self.watcher.close()
        self.upgrader.fail("the daemon stopped", kill=True)
        for listener in self.listeners:
            listener.close()
        self.control.final_word({"ok": self.exit_code == EXIT_OK, "stopped": self._stop_summary()})
        self.control.close()  # stop waiters see the connection close when we exit
        self.endpoints.close()
        log.info("master (pid %d) exiting with status %d", self.pid, self.exit_code)

    # -- what status and stats report ---------------------------------------------------------------

    def snapshot(self, *, processes: bool = True) -> report.Snapshot:
        """The master's state as plain values; ``processes`` adds each worker's RSS and CPU (psutil)."""
        return _snapshot(self, processes)


def _snapshot(master: Master, processes: bool) -> report.Snapshot:
    now = time.monotonic()
    pool, gens = master.pool, master.gens
    workers = sorted(pool.workers.values(), key=lambda w: (w.generation, w.slot, w.pid))
    backoff = []
    for slot, b in sorted(gens.backoff.items()):
        due = master.timers.when(("respawn", slot))
        if b.failures > 1 or due is not None:
            backoff.append(report.BackoffSample(slot, b.failures, None if due is None else due - now))
    return report.Snapshot(
        pid=master.pid, name=master.config.name, generation=gens.generation, uptime_s=now - master.started,
        state=master.state, drain=master.lb_drain.value if master.lb_drain else None,
        worker_class=master.config.worker_class, event_loop=master.config.event_loop,
        handler=master.config.effective_handler, target_workers=master.target,
        listeners=[li.address for li in master.listeners], control=master.control.path,
        workers=[pool.sample(w, now, processes=processes) for w in workers], backoff=backoff,
        totals=dataclasses.replace(pool.totals, log_lines_dropped=logs.dropped_lines(), tls=dict(pool.totals.tls)),
        tls=report.tls_view(gens.tls, master.listeners, master.config),
        upstreams=tuple(pool.scoreboard.upstreams.describe(now, time.time())),
        reload=reload_progress(gens.reloader),
        molds=[{"generation": m.generation, "pid": m.pid, "state": m.state.value, "threads": m.threads}
               for _, m in sorted(master.molds.by_generation.items())],
        cut_in={w.pid: due - now for w in workers if (due := master.timers.when(("kill", w.pid))) is not None})
