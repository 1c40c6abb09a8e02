"""The master: one loop, the worker table, generations. Binds nothing, parses no protocol.

Everything happens in :meth:`Master.run`'s single-threaded selector loop:
signals arrive as bytes on a wakeup socket (``signal.set_wakeup_fd``; the
Python-level handlers do nothing), workers report ``ready`` / ``boot_error``
/ ``retiring`` on an event pipe, control clients are served in the same
selector, and the select timeout is the nearest deadline (a heartbeat going
stale, a drain ending, a respawn backoff, a reload timing out, a silent
control client). Nothing sleeps, nothing polls on a fixed tick.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import selectors
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import psutil

from prefork import __version__, logs, report
from prefork.config import Config, ConfigError, build_config
from prefork.control import ControlConnection, ControlServer
from prefork.httpmetrics import MetricsServer
from prefork.listeners import BindError, Listener, bind
from prefork.metrics import render_prometheus
from prefork.records import (
    BACKOFF_FIRST,
    EARLY_DEATH,
    Backoff,
    Reload,
    Totals,
    Upgrade,
    Worker,
    WorkerState,
    backoff_delay,
    describe_exit,
)
from prefork.scoreboard import Scoreboard
from prefork.systemd import Notifier
from prefork.upgrade import report_ready, spawn
from prefork.worker import WorkerSpec, run_worker

log = logging.getLogger(__name__)

ABORT_GRACE = 2.0  # after SIGABRT (stacks to the log), SIGKILL this much later
UPGRADE_TIMEOUT = 60.0  # how long a new master may take to serve before the upgrade is abandoned
MEMORY_CHECK_INTERVAL = 5.0  # seconds between --max-worker-memory checks (jittered)
DRAIN_MARGIN = 1.0  # the worker enforces the graceful timeout itself; the master kills this much later
FAST_STOP_GRACE = 5.0
EXIT_OK = 0
EXIT_FATAL = 1


def _noop(signum: int, frame: FrameType | None) -> None:
    """Handlers only record: the wakeup fd brings the signal number to the loop."""


class Master:
    """Runs the pool. ``run()`` returns the process exit status."""

    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        control: ControlServer,
        *,
        cli_overrides: dict[str, Any] | None = None,
        adopted: bool = False,
        notifier: Notifier | None = None,
        argv: list[str] | None = None,
        upgrade_pipe: int | None = None,
        metrics_sock: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.control = control
        self.cli_overrides = dict(cli_overrides or {})
        self.adopted = adopted  # listeners came from systemd: a reload keeps them whatever bind says
        self.argv = list(argv or [])  # our command line, to start the new master on upgrade
        self.upgrade_pipe = upgrade_pipe  # we are a new master: tell the old one when we serve
        self.upgrade: Upgrade | None = None  # we are an old master starting our successor
        self.handed_over = False
        self.metrics_sock = metrics_sock
        self.metrics: MetricsServer | None = None
        self.notifier = notifier or Notifier()
        try:
            self.watchdog_every = self.notifier.watchdog_interval()
        except ValueError as exc:
            log.warning("ignoring the systemd watchdog: %s", exc)
            self.watchdog_every = None
        self.watchdog_due = time.monotonic()
        self.memory_check_due = time.monotonic() + MEMORY_CHECK_INTERVAL
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.generation = 1
        self._generations = itertools.count(2)
        self.target = config.workers
        self.workers: dict[int, Worker] = {}  # pid -> worker, every live child
        self.slots: dict[int, Worker] = {}  # slot -> worker of the current generation
        self.backoff: dict[int, Backoff] = {}
        self.reload: Reload | None = None
        self.reload_again: list[ControlConnection] | None = None  # a reload asked for during a reload
        # reload replies held until every old worker stopped accepting: (waiters, pids accepting, reply)
        self.reload_replies: list[tuple[list[ControlConnection], set[int], dict[str, Any]]] = []
        self.serving = False  # the first generation is up
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.stop_waiters: list[ControlConnection] = []
        self.exit_code = EXIT_OK
        self.totals = Totals()
        # room for a full pool, a reload's second one, and workers still draining (72 bytes each)
        self.scoreboard = Scoreboard(capacity=4096)
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._events_r, self._events_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._events_r, False)
        self._events_buf = b""
        self._signal_actions: dict[int, Callable[[], None]] = {
            signal.SIGCHLD: self.reap_children,
            signal.SIGTERM: lambda: self.begin_stop("graceful"),
            signal.SIGINT: lambda: self.begin_stop("fast"),
            signal.SIGQUIT: lambda: self.begin_stop("fast"),
            signal.SIGHUP: self.begin_reload,
            signal.SIGTTIN: lambda: self.scale(self.target + 1),
            signal.SIGTTOU: lambda: self.scale(max(1, self.target - 1)),
            signal.SIGUSR1: self.reopen_logs,
            signal.SIGUSR2: self.begin_upgrade,
        }
        self._commands: dict[str, Callable[[dict[str, Any], ControlConnection], None]] = {
            "status": lambda req, conn: conn.reply({"ok": True, **self.status()}),
            "stats": lambda req, conn: conn.reply({"ok": True, **self.stats()}),
            "reload": self._cmd_reload,
            "scale": self._cmd_scale,
            "stop": self._cmd_stop,
            "reopen": self._cmd_reopen,
            "drain": self._cmd_drain,
            "upgrade": lambda req, conn: self.begin_upgrade(conn),
        }
        self.lb_drain: str | None = None  # None, "health-checks" or "listeners-closed"

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_signals)
        self.selector.register(self._events_r, selectors.EVENT_READ, self._on_worker_events)
        self.control.attach(self.selector, self._dispatch)
        if self.metrics_sock is not None:
            self.metrics = MetricsServer(self.metrics_sock, self.selector,
                                         lambda: render_prometheus(self.status(), self.stats()))
        logs.set_title("master", self.config.name)
        log.info("prefork %s master (pid %d) [%s]: %d %s worker(s) of %s on %s; control socket %s",
                 __version__, self.pid, self.config.name, self.target, self.config.worker_class,
                 self.config.effective_handler, ", ".join(li.address for li in self.listeners), self.control.path)
        try:
            for slot in range(self.target):
                self.spawn_worker(slot)
            while self.workers or (self.stopping is None):
                now = time.monotonic()
                deadline = self.next_deadline(now)
                timeout = None if deadline is None else max(0.0, deadline - now)
                for key, mask in self.selector.select(timeout):
                    key.data(mask)
                self.run_timers(time.monotonic())
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

    def next_deadline(self, now: float) -> float | None:
        deadlines: list[float] = []
        timeout = self.config.timeout
        for worker in self.workers.values():
            if worker.kill_at is not None:
                deadlines.append(worker.kill_at)
            elif worker.state in (WorkerState.BOOTING, WorkerState.READY):
                deadlines.append(self.scoreboard[worker.record].heartbeat + timeout)
        deadlines.extend(b.respawn_at for b in self.backoff.values() if b.respawn_at is not None)
        if self.reload is not None:
            deadlines.append(self.reload.deadline)
        for server in (self.control, self.metrics):
            deadline = server.next_deadline() if server is not None else None
            if deadline is not None:
                deadlines.append(deadline)
        if self.watchdog_every is not None:
            deadlines.append(self.watchdog_due)
        if self.config.max_worker_memory:
            deadlines.append(self.memory_check_due)
        if self.upgrade is not None:
            deadlines.append(self.upgrade.deadline)
        return min(deadlines) if deadlines else None

    def run_timers(self, now: float) -> None:
        self.control.expire(now)
        if self.metrics is not None:
            self.metrics.expire(now)
        timeout = self.config.timeout
        for worker in list(self.workers.values()):
            if worker.kill_at is not None:
                if now >= worker.kill_at:
                    if worker.state is WorkerState.DRAINING:
                        log.warning("worker %d (pid %d) still busy after the graceful timeout; killing it",
                                    worker.slot, worker.pid)
                    self._kill(worker, signal.SIGKILL)
                    worker.state = WorkerState.KILLING
                    worker.kill_at = None
                continue
            if worker.state in (WorkerState.BOOTING, WorkerState.READY):
                age = now - self.scoreboard[worker.record].heartbeat
                if age > timeout:
                    self.totals.timeouts += 1
                    log.error("worker %d (pid %d) timed out: no heartbeat for %.1fs; "
                              "dumping its stacks (SIGABRT), then killing it", worker.slot, worker.pid, age)
                    self._kill(worker, signal.SIGABRT)
                    worker.state = WorkerState.KILLING
                    worker.kill_at = now + ABORT_GRACE
        for slot, backoff in list(self.backoff.items()):
            if backoff.respawn_at is not None and now >= backoff.respawn_at:
                backoff.respawn_at = None
                if self.stopping is None and slot < self.target and slot not in self.slots:
                    self.spawn_worker(slot)
        if self.reload is not None and now >= self.reload.deadline:
            self.abort_reload(f"the new workers were not ready within {self.config.timeout:g}s")
        if self.watchdog_every is not None and now >= self.watchdog_due:
            self.watchdog_due = now + self.watchdog_every
            self._ping_watchdog(now)
        if self.upgrade is not None and now >= self.upgrade.deadline:
            self._kill_pid(self.upgrade.pid, signal.SIGQUIT)  # it stops its own workers
            self.fail_upgrade(f"the new master was not serving within {UPGRADE_TIMEOUT:g}s")
        if self.config.max_worker_memory and now >= self.memory_check_due:
            # jittered, and one worker per check: replacements do not all start at once
            self.memory_check_due = now + MEMORY_CHECK_INTERVAL * random.uniform(0.5, 1.5)
            self._recycle_fattest(self.config.max_worker_memory * 1024 * 1024)

    def _recycle_fattest(self, limit: int) -> None:
        """Replace the current worker with the largest RSS over ``limit``, gracefully (it drains)."""
        over: list[tuple[int, Worker]] = []
        for worker in self.slots.values():
            if worker.state is not WorkerState.READY:
                continue
            try:
                if worker.proc is None:
                    worker.proc = psutil.Process(worker.pid)
                rss = worker.proc.memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                over.append((rss, worker))
        if not over or self.stopping is not None or self.reload is not None:
            return
        rss, worker = max(over, key=lambda item: item[0])
        self.totals.memory_recycles += 1
        log.warning("worker %d (pid %d) uses %.0f MiB, over --max-worker-memory %d MiB; replacing it",
                    worker.slot, worker.pid, rss / 2**20, self.config.max_worker_memory)
        del self.slots[worker.slot]
        self.drain(worker, "over the memory limit")
        self.spawn_worker(worker.slot)

    def _ping_watchdog(self, now: float) -> None:
        """WATCHDOG=1, but only while this loop turns and no worker's heartbeat is stale."""
        stale = [w for w in self.workers.values() if w.state in (WorkerState.BOOTING, WorkerState.READY)
                 and now - self.scoreboard[w.record].heartbeat > self.config.timeout]
        if stale:
            log.warning("not pinging the systemd watchdog: %d worker(s) with a stale heartbeat", len(stale))
            return
        self.notifier.watchdog()
        self.notifier.status(self.status_line())

    def status_line(self) -> str:
        active = sum(int(self.scoreboard[w.record].active) for w in self.workers.values())
        state = "stopping" if self.stopping else ("reloading" if self.reload else "serving")
        return (f"{state}: {len(self.slots)}/{self.target} {self.config.worker_class} workers, "
                f"generation {self.generation}, {active} open connection(s)")

    # -- workers ------------------------------------------------------------------------------------

    def spawn_worker(self, slot: int, reload: Reload | None = None) -> Worker | None:
        """Fork a worker into ``slot`` of the current generation (or of ``reload``'s).

        When the fork fails (out of processes or memory), the failure is logged and
        handled like an early death: a respawn with backoff, or an aborted reload.
        Nothing is forked once the listening sockets are closed (drained): there is
        nothing left to serve.
        """
        if self.lb_drain == "listeners-closed":
            return None
        try:
            return self._fork_worker(slot, reload)
        except (OSError, IndexError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no free scoreboard record"
            if reload is not None:
                self.abort_reload(f"cannot fork a worker: {why}")
                return None
            backoff = self.backoff.setdefault(slot, Backoff())
            backoff.failures += 1
            delay = max(backoff_delay(backoff.failures), BACKOFF_FIRST)
            backoff.respawn_at = time.monotonic() + delay
            log.error("cannot fork worker %d: %s; retrying in %.1fs", slot, why, delay)
            return None

    def _fork_worker(self, slot: int, reload: Reload | None) -> Worker:
        config = reload.config if reload else self.config
        generation = reload.generation if reload else self.generation
        listeners = reload.listeners if reload else self.listeners
        now = time.monotonic()
        index = self.scoreboard.allocate(0, generation, now)
        self.scoreboard[index].lb_drain = 1 if self.lb_drain else 0  # before the worker can look
        max_requests = 0
        if config.max_requests:
            max_requests = config.max_requests + random.randint(0, config.max_requests_jitter)
        spec = WorkerSpec(
            slot=slot, generation=generation, record=index, master_pid=self.pid, config=config,
            listeners=tuple(li.sock for li in listeners), notify_fd=self._events_w, max_requests=max_requests,
        )
        # Signals stay blocked across fork: one sent to a worker before it installed its own
        # handlers waits (pending) instead of reaching the master's no-op handlers and being lost.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._signal_actions)
        try:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                self._close_in_child(keep={li.fileno() for li in listeners})
                run_worker(spec, self.scoreboard)
        except OSError:
            self.scoreboard.release(index)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.scoreboard[index].pid = pid
        worker = Worker(pid=pid, slot=slot, generation=generation, record=index, started=now)
        self.workers[pid] = worker
        (reload.slots if reload else self.slots)[slot] = worker
        self.totals.spawned += 1
        log.info("worker %d (pid %d) started, generation %d", slot, pid, generation)
        return worker

    def _close_in_child(self, keep: set[int]) -> None:
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
        os.close(self._events_r)
        for fd in (self.upgrade_pipe, self.upgrade.pipe_fd if self.upgrade else None):
            if fd is not None and fd >= 0:
                os.close(fd)  # the upgrade hand-over is between masters
        self.control.close_in_child()
        if self.metrics is not None:
            self.metrics.close_in_child()
        every = list(self.listeners) + (self.reload.listeners if self.reload else [])
        for listener in every:
            if listener.fileno() not in keep and listener.fileno() >= 0:
                listener.sock.close()

    def _kill(self, worker: Worker, sig: signal.Signals) -> None:
        self._kill_pid(worker.pid, sig)

    @staticmethod
    def _kill_pid(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone: its SIGCHLD is on the way
            os.kill(pid, sig)

    def drain(self, worker: Worker, reason: str) -> None:
        """Tell a worker to stop accepting and finish its connections (SIGKILL after the graceful timeout)."""
        if worker.state in (WorkerState.DRAINING, WorkerState.KILLING):
            return
        worker.state = WorkerState.DRAINING
        worker.stop_reason = reason
        worker.kill_at = time.monotonic() + self.config.graceful_timeout + DRAIN_MARGIN
        self._kill(worker, signal.SIGTERM)

    def reap_children(self) -> None:
        # read what the workers said first: a boot error must be known before its exit is judged
        self._on_worker_events(selectors.EVENT_READ)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.upgrade is not None and pid == self.upgrade.pid:
                how, _ = describe_exit(status)
                self.fail_upgrade(f"the new master {how.replace('could not load its handler', 'exited with status 3')}"
                                  " before it served")
                continue
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._stopped_accepting(pid)
            self._on_worker_exit(worker, status)

    def _on_worker_exit(self, worker: Worker, status: int) -> None:
        now = time.monotonic()
        record = self.scoreboard[worker.record]
        totals = self.totals
        totals.requests += record.requests
        totals.errors += record.errors
        totals.proxy_errors += record.proxy_errors
        totals.bytes_in += record.bytes_in
        totals.bytes_out += record.bytes_out
        totals.exits += 1
        self.scoreboard.release(worker.record)
        how, clean = describe_exit(status)
        in_slot = self.slots.get(worker.slot) is worker
        # a worker still holding its slot (killed for a stale heartbeat) is replaced however it ended
        expected = ((worker.state in (WorkerState.DRAINING, WorkerState.KILLING) and not in_slot)
                    or self.stopping is not None)
        in_reload = self.reload is not None and self.reload.slots.get(worker.slot) is worker
        if in_slot:
            del self.slots[worker.slot]
        if in_reload:
            assert self.reload is not None
            del self.reload.slots[worker.slot]
        if expected and clean:
            log.info("worker %d (pid %d) %s (%s)", worker.slot, worker.pid, how, worker.stop_reason or "stopped")
            return
        if not clean:
            totals.crashes += 1
        if in_reload:
            log.error("worker %d (pid %d) of generation %d %s while starting",
                      worker.slot, worker.pid, worker.generation, how)
            self.abort_reload(worker.boot_error or f"a new worker {how} while starting")
            return
        if worker.boot_error and not self.serving and self.stopping is None:
            log.critical("%s", worker.boot_error)
            log.critical("stopping: the handler cannot be loaded, so no worker can serve")
            self.exit_code = EXIT_FATAL
            self.begin_stop("fast")
            return
        if self.stopping is not None or not in_slot:
            level = logging.INFO if clean else logging.WARNING
            log.log(level, "worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return
        if worker.boot_error:
            log.error("%s", worker.boot_error)
        backoff = self.backoff.setdefault(worker.slot, Backoff())
        backoff.failures = backoff.failures + 1 if now - worker.started < EARLY_DEATH else 1
        delay = backoff_delay(backoff.failures)
        level = logging.WARNING if worker.state is not WorkerState.KILLING else logging.ERROR
        log.log(level, "worker %d (pid %d) %s, restarting %s", worker.slot, worker.pid, how,
                f"in {delay:.1f}s" if delay else "now")
        totals.respawns += 1
        if delay:
            backoff.respawn_at = now + delay
        elif worker.slot < self.target:
            self.spawn_worker(worker.slot)

    def _on_worker_events(self, mask: int) -> None:
        try:
            data = os.read(self._events_r, 65536)
        except BlockingIOError:
            return
        lines = (self._events_buf + data).split(b"\n")
        self._events_buf = lines.pop()
        for line in lines:
            pid_text, _, rest = line.decode("utf-8", "replace").partition(" ")
            event, _, detail = rest.partition(" ")
            worker = self.workers.get(int(pid_text)) if pid_text.isdigit() else None
            if worker is not None:
                self._on_worker_event(worker, event, detail)

    def _on_worker_event(self, worker: Worker, event: str, detail: str) -> None:
        if event == "ready":
            if worker.state is WorkerState.BOOTING:
                worker.state = WorkerState.READY
            backoff = self.backoff.get(worker.slot)
            if backoff is not None and self.slots.get(worker.slot) is worker:
                backoff.respawn_at = None
            self._check_generation_ready()
        elif event == "boot_error":
            worker.boot_error = detail
        elif event == "stopped":
            self._stopped_accepting(worker.pid)
        elif event == "retiring":
            if self.slots.get(worker.slot) is worker and self.stopping is None:
                del self.slots[worker.slot]
                log.info("worker %d (pid %d) retiring: %s; starting its replacement",
                         worker.slot, worker.pid, detail)
                self.drain(worker, detail)
                self.spawn_worker(worker.slot)
            else:
                self.drain(worker, detail)

    def _check_generation_ready(self) -> None:
        if not self.serving and self._all_ready(self.slots, self.target):
            self.serving = True
            log.info("serving: %d worker(s) ready", self.target)
            self._emit("ready")
            if self.upgrade_pipe is not None:
                report_ready(self.upgrade_pipe)  # the master we replace hands over and drains
                self.upgrade_pipe = None
        reload = self.reload
        if reload is not None and self._all_ready(reload.slots, reload.config.workers):
            self.commit_reload()

    @staticmethod
    def _all_ready(slots: dict[int, Worker], count: int) -> bool:
        return len(slots) == count and all(w.state is WorkerState.READY for w in slots.values())

    # -- reload, scale, stop ------------------------------------------------------------------------

    def begin_reload(self, waiter: ControlConnection | None = None) -> None:
        """Start a new generation from the re-read config; drain the old one once it serves."""
        if self.stopping is not None:
            if waiter:
                waiter.reply({"ok": False, "error": "the daemon is stopping"})
            return
        if self.lb_drain == "listeners-closed":
            if waiter:
                waiter.reply({"ok": False, "error": "drained: the listening sockets are closed"})
            return
        if self.reload is not None:
            # after the current one: it may not have the newest code
            self.reload_again = (self.reload_again or []) + ([waiter] if waiter else [])
            log.info("reload requested during a reload: will reload again after generation %d is up",
                     self.reload.generation)
            return
        try:
            config = self._reread_config()
            listeners, new_listeners = self._listeners_for(config)
        except (ConfigError, BindError) as exc:
            self.totals.failed_reloads += 1
            log.error("reload failed: %s; still serving generation %d", exc, self.generation)
            if waiter:
                waiter.reply({"ok": False, "error": f"reload failed: {exc}"})
            return
        generation = next(self._generations)
        self.reload = Reload(generation=generation, config=config, listeners=listeners,
                             new_listeners=new_listeners, deadline=time.monotonic() + config.timeout,
                             waiters=[waiter] if waiter else [])
        log.info("reloading: starting generation %d (%d %s worker(s) of %s)",
                 generation, config.workers, config.worker_class, config.effective_handler)
        self._emit("reloading")
        for slot in range(config.workers):
            if self.reload is None:  # a failed fork aborted it
                break
            self.spawn_worker(slot, self.reload)

    def _reread_config(self) -> Config:
        if self.config.config_file is None:
            return self.config
        config = build_config(self.cli_overrides, self.config.config_file)
        for key in ("name", "control"):
            if getattr(config, key) != getattr(self.config, key):
                raise ConfigError(f"{key.replace('_', '-')} cannot change on reload (restart the daemon)")
        return config

    def _listeners_for(self, config: Config) -> tuple[list[Listener], list[Listener]]:
        """The listeners of ``config``: the ones we have, plus newly bound ones (raises BindError)."""
        if self.adopted:
            return self.listeners, []  # systemd owns the sockets: bind= does not apply
        have = {li.spec: li for li in self.listeners}
        listeners: list[Listener] = []
        new: list[Listener] = []
        try:
            for spec in config.bind_specs:
                if spec.text in have:
                    listeners.append(have[spec.text])
                else:
                    listener = bind(spec, config.backlog)
                    new.append(listener)
                    listeners.append(listener)
        except BindError:
            for listener in new:
                listener.close()
            raise
        return listeners, new

    def commit_reload(self) -> None:
        reload = self.reload
        assert reload is not None
        self.reload = None
        old_slots = self.slots
        self.slots = reload.slots
        self.generation = reload.generation
        old_config = self.config
        self.config = reload.config
        self.target = reload.config.workers
        self.backoff.clear()
        if old_config.log_level != self.config.log_level:
            logs.set_level(self.config.log_level)
        keep = {id(li) for li in reload.listeners}
        for listener in self.listeners:
            if id(listener) not in keep:
                log.info("no longer listening on %s", listener.address)
                listener.close()
        self.listeners = reload.listeners
        for worker in old_slots.values():
            self.drain(worker, f"replaced by generation {self.generation}")
        self.totals.reloads += 1
        log.info("reloaded: generation %d serving with %d worker(s); draining the old one",
                 self.generation, self.target)
        self._emit("ready")
        # the reply waits until no old worker accepts: from then on, every new connection meets new code
        still_accepting = {w.pid for w in old_slots.values() if w.pid in self.workers}
        self.reload_replies.append((reload.waiters, still_accepting,
                                    {"ok": True, "generation": self.generation, "workers": self.target}))
        self._answer_reloads()
        again, self.reload_again = self.reload_again, None
        if again is not None:
            self.begin_reload(again[0] if again else None)
            for waiter in again[1:]:
                if self.reload is not None:
                    self.reload.waiters.append(waiter)

    def _stopped_accepting(self, pid: int) -> None:
        for _, accepting, _ in self.reload_replies:
            accepting.discard(pid)
        self._answer_reloads()

    def _answer_reloads(self) -> None:
        done = [r for r in self.reload_replies if not r[1]]
        self.reload_replies = [r for r in self.reload_replies if r[1]]
        for waiters, _, message in done:
            for waiter in waiters:
                waiter.reply(message)

    def abort_reload(self, why: str) -> None:
        reload = self.reload
        if reload is None:
            return
        self.reload = None
        self.totals.failed_reloads += 1
        log.error("reload failed: %s; still serving generation %d", why, self.generation)
        for worker in reload.slots.values():
            self.drain(worker, "reload aborted")
        for listener in reload.new_listeners:
            listener.close()
        for waiter in reload.waiters + (self.reload_again or []):
            waiter.reply({"ok": False, "error": f"reload failed: {why}"})
        self.reload_again = None

    def scale(self, count: int) -> None:
        if self.stopping is not None or count == self.target:
            return
        log.info("scaling from %d to %d worker(s)", self.target, count)
        old, self.target = self.target, count
        for slot in range(old, count):
            if slot not in self.slots:
                self.spawn_worker(slot)
        for slot in range(count, old):
            self.backoff.pop(slot, None)
            worker = self.slots.pop(slot, None)
            if worker is not None:
                self.drain(worker, "scaled down")

    def begin_stop(self, how: str) -> None:
        if self.stopping == "fast" or self.stopping == how:
            return
        self.stopping = how
        log.info("stopping (%s): %d worker(s) to stop", how, len(self.workers))
        self._emit("stopping")
        if self.reload is not None:
            self.abort_reload("the daemon is stopping")
        for backoff in self.backoff.values():
            backoff.respawn_at = None
        now = time.monotonic()
        for worker in self.workers.values():
            if how == "fast":
                worker.state = WorkerState.KILLING
                worker.kill_at = now + FAST_STOP_GRACE
                self._kill(worker, signal.SIGQUIT)
            else:
                self.drain(worker, "stopping")
        self.slots.clear()

    # -- upgrade (a new master program on the same sockets) -------------------------------------------

    def begin_upgrade(self, waiter: ControlConnection | None = None) -> None:
        """SIGUSR2 / preforkctl upgrade: start the prefork now installed as a new master on our sockets."""
        why = ("the daemon is stopping" if self.stopping is not None else
               "an upgrade is in progress" if self.upgrade is not None else
               "a reload is in progress" if self.reload is not None else
               "drained: the listening sockets are closed" if self.lb_drain == "listeners-closed" else None)
        if why is None:
            try:
                pid, pipe_fd = spawn(self.argv, [(li.fileno(), li.spec) for li in self.listeners],
                                     self.control.sock.fileno())
            except OSError as exc:
                why = f"cannot start the new master: {exc.strerror or exc}"
        if why is not None:
            log.error("upgrade refused: %s", why)
            if waiter is not None:
                waiter.reply({"ok": False, "error": f"upgrade failed: {why}"})
            return
        os.set_blocking(pipe_fd, False)
        self.upgrade = Upgrade(pid=pid, pipe_fd=pipe_fd, deadline=time.monotonic() + UPGRADE_TIMEOUT,
                               waiters=[waiter] if waiter else [])
        self.selector.register(pipe_fd, selectors.EVENT_READ, self._on_upgrade_pipe)
        log.info("upgrade: new master (pid %d) starting on our sockets; still serving until it is ready", pid)

    def _on_upgrade_pipe(self, mask: int) -> None:
        upgrade = self.upgrade
        assert upgrade is not None
        try:
            data = os.read(upgrade.pipe_fd, 64)
        except BlockingIOError:
            return
        upgrade.buffer += data
        if b"ready\n" in upgrade.buffer:
            self.hand_over()
        elif not data:  # closed without a word: it is exiting; its SIGCHLD says how
            self._close_upgrade_pipe()

    def _close_upgrade_pipe(self) -> None:
        upgrade = self.upgrade
        if upgrade is not None and upgrade.pipe_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(upgrade.pipe_fd)
            os.close(upgrade.pipe_fd)
            upgrade.pipe_fd = -1

    def hand_over(self) -> None:
        """The new master serves: give it the service (systemd's main pid, the control socket), then drain."""
        upgrade = self.upgrade
        assert upgrade is not None
        self._close_upgrade_pipe()
        self.upgrade = None
        self.notifier.mainpid(upgrade.pid)
        self.handed_over = True
        self.control.hand_over()
        for listener in self.listeners:
            listener.hand_over()
        log.info("upgrade: the new master (pid %d) serves; draining our workers", upgrade.pid)
        for waiter in upgrade.waiters:
            waiter.reply({"ok": True, "pid": upgrade.pid, "previous_pid": self.pid})
        self.begin_stop("graceful")

    def fail_upgrade(self, why: str) -> None:
        upgrade = self.upgrade
        if upgrade is None:
            return
        self._close_upgrade_pipe()
        self.upgrade = None
        log.error("upgrade failed: %s; still serving (pid %d)", why, self.pid)
        for waiter in upgrade.waiters:
            waiter.reply({"ok": False, "error": f"upgrade failed: {why}"})

    def reopen_logs(self) -> None:
        logs.reopen()
        for worker in self.workers.values():
            self._kill(worker, signal.SIGUSR1)

    def _emit(self, event: str) -> None:
        """Tell systemd (when it is listening) where the lifecycle stands."""
        if self.handed_over:
            return  # the new master speaks for the service now
        if event == "ready":
            self.notifier.ready(self.status_line())
        elif event == "reloading":
            self.notifier.reloading()
        elif event == "stopping":
            self.notifier.stopping()

    def _shutdown(self) -> None:
        signal.set_wakeup_fd(-1)
        if self.reload is not None:
            self.abort_reload("the daemon stopped")
        if self.upgrade is not None:
            self._kill_pid(self.upgrade.pid, signal.SIGQUIT)
            self.fail_upgrade("the daemon stopped")
        for listener in self.listeners:
            listener.close()
        self.control.close()  # stop waiters see the connection close when we exit
        if self.metrics is not None:
            self.metrics.close()
        log.info("master (pid %d) exiting with status %d", self.pid, self.exit_code)

    # -- control commands ---------------------------------------------------------------------------

    def _dispatch(self, request: dict[str, Any], conn: ControlConnection) -> None:
        command = request.get("command")
        handler = self._commands.get(command) if isinstance(command, str) else None
        if handler is None:
            conn.reply({"ok": False, "error": f"unknown command {command!r} (known: {', '.join(self._commands)})"})
            return
        handler(request, conn)

    def _cmd_reload(self, request: dict[str, Any], conn: ControlConnection) -> None:
        self.begin_reload(conn)

    def _cmd_scale(self, request: dict[str, Any], conn: ControlConnection) -> None:
        count = request.get("workers")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1024:
            conn.reply({"ok": False, "error": f"scale: workers must be a whole number from 1 to 1024, got {count!r}"})
            return
        if self.stopping is not None:
            conn.reply({"ok": False, "error": "the daemon is stopping"})
            return
        if self.reload is not None:
            conn.reply({"ok": False, "error": "a reload is in progress; scale again once it is done"})
            return
        previous = self.target
        self.scale(count)
        conn.reply({"ok": True, "workers": count, "previous": previous})

    def _cmd_stop(self, request: dict[str, Any], conn: ControlConnection) -> None:
        how = "fast" if request.get("fast") else "graceful"
        conn.reply({"ok": True, "pid": self.pid, "stopping": how}, keep_open=True)
        self.begin_stop(how)

    def _cmd_drain(self, request: dict[str, Any], conn: ControlConnection) -> None:
        """Take this instance out of a load balancer's pool without breaking a connection.

        Behind PROXY protocol, health checks are the connections with a LOCAL
        header: they are closed at once, while real clients are still served
        (reversible with ``off``); that needs a check that exchanges bytes, as
        a bare connect completes in the kernel. Without PROXY protocol, or with
        ``close``, every process closes its listening sockets: new connections
        are refused, so even a connect-only check fails, and open connections
        finish. Either way, ``stop`` comes next.
        """
        if request.get("off"):
            if self.lb_drain == "listeners-closed":
                conn.reply({"ok": False, "error": "the listening sockets are closed; restart to serve again"})
                return
            self.lb_drain = None
            for worker in self.workers.values():
                self.scoreboard[worker.record].lb_drain = 0
            log.info("drain off: answering health checks again")
            conn.reply({"ok": True, "drain": None})
            return
        if self.lb_drain is None or (request.get("close") and self.lb_drain == "health-checks"):
            if self.config.proxy_protocol and not request.get("close"):
                self.lb_drain = "health-checks"
                for worker in self.workers.values():
                    self.scoreboard[worker.record].lb_drain = 1
                log.info("draining for the load balancer: failing its health checks (PROXY LOCAL)")
            else:
                self.lb_drain = "listeners-closed"
                for worker in self.workers.values():
                    self._kill(worker, signal.SIGUSR2)
                for listener in self.listeners:
                    listener.close()
                log.info("draining for the load balancer: listening sockets closed, open connections finish")
        conn.reply({"ok": True, "drain": self.lb_drain})

    def _cmd_reopen(self, request: dict[str, Any], conn: ControlConnection) -> None:
        self.reopen_logs()
        conn.reply({"ok": True})

    # -- status -------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return report.status(self)

    def stats(self) -> dict[str, Any]:
        return report.stats(self)
