"""The generations: the serving one's slots, the one a reload is starting, and what each exit means.

A generation is a set of workers started from one configuration, one per
slot. :class:`Generations` starts the first, replaces workers that die
(with backoff for early deaths), starts a new generation on reload and
drains the old one once the new one serves, and grows or shrinks the
serving one on scale. The processes themselves are the pool's
(:mod:`prefork.master.pool`); the daemon-wide state it needs (stopping,
drained for a load balancer, systemd) is the :class:`Host`'s, the master.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prefork.channel import Event, Message
from prefork.config import Config
from prefork.listeners import Listener
from prefork.master.exits import (
    BACKOFF_FIRST,
    EARLY_DEATH,
    ExitAction,
    ExitFacts,
    backoff_delay,
    classify_exit,
    describe_exit,
    failures_after,
)
from prefork.master.molding import Molding
from prefork.master.molds import Molds, MoldState
from prefork.master.pool import WorkerPool
from prefork.master.reload import Reload, Reloads, Waiter, all_ready, reread_config
from prefork.master.reloader import Reloader
from prefork.master.state import Backoff, LbDrain, StopMode, Worker, WorkerState
from prefork.master.timers import Timers
from prefork.tls import TlsSetup
from prefork.tls import load as load_tls

log = logging.getLogger(__name__)



class Host(Protocol):
    """The daemon-wide state and actions the generations need from the master."""

    @property
    def stopping(self) -> StopMode | None: ...

    @property
    def lb_drain(self) -> LbDrain | None: ...

    def notify_systemd(self, event: str) -> None: ...

    def on_serving(self) -> None: ...

    def on_config(self, old: Config) -> None: ...

    def on_listeners(self, *, added: list[Listener], removed: list[Listener]) -> None: ...

    def fatal(self, why: str) -> None: ...

    def close_after_queue(self, listeners: list[Listener], then: Callable[[], None]) -> None: ...


class Generations:
    """The serving generation by slot, the reload in flight, and the backoff of each slot."""

    def __init__(self, host: Host, pool: WorkerPool, timers: Timers, config: Config, listeners: list[Listener], *,
                 cli_overrides: dict[str, Any], adopted: bool, tls: TlsSetup | None = None,
                 molds: Molds | None = None) -> None:
        self.host = host
        self.molding: Molding = Molding(self, molds)
        self.pool = pool
        self.timers = timers
        self.config: Config = config
        self.listeners = listeners
        # the serving generation's TLS contexts (built before --user when the daemon started)
        self.tls = tls if tls is not None else load_tls(config, [li.spec for li in listeners])
        self.on_grown: Callable[[], None] = lambda: None  # set by the periodic checks
        self.cli_overrides = cli_overrides
        # the configuration a reload starts from (a program serving from Python keeps its own: its molds
        # run the program again, which builds theirs)
        self.reread: Callable[[Config], Config] = lambda current: reread_config(current, self.cli_overrides)
        self.adopted = adopted  # listeners came from systemd: a reload keeps them whatever bind says
        self.generation = 1
        self._generations = itertools.count(2)
        self.target = config.workers
        self.slots: dict[int, Worker] = {}  # slot -> worker of the serving generation
        self.backoff: dict[int, Backoff] = {}
        self.reloader = Reloader(self)
        self.serving = False  # the first generation is up

    def start(self) -> None:
        for slot in range(self.target):
            self.spawn_worker(slot)

    def resume(self, generation: int, next_generation: int, workers: list[Worker]) -> None:
        """Serve on with the workers a previous image of this master handed over (an upgrade in place)."""
        self.generation = generation
        self._generations = itertools.count(next_generation)
        self.slots = {w.slot: w for w in workers
                      if w.generation == generation and w.state in (WorkerState.BOOTING, WorkerState.READY)}
        self.serving = True

    def next_generation(self) -> int:
        """The number the next generation will take (an upgrade in place hands it over)."""
        number = next(self._generations)
        self._generations = itertools.count(number)
        return number

    # -- workers ------------------------------------------------------------------------------------

    def spawn_worker(self, slot: int, reload: Reload | None = None) -> Worker | None:
        """Fork a worker into ``slot`` of the serving generation (or of ``reload``'s).

        When the fork fails (out of processes or memory), the failure is logged and
        handled like an early death: a respawn with backoff, or an aborted reload.
        Nothing is forked once the listening sockets are closed (drained): there is
        nothing left to serve.
        """
        if self.host.lb_drain is LbDrain.LISTENERS_CLOSED:
            return None
        config = reload.config if reload else self.config
        listeners = reload.listeners if reload else self.listeners
        tls = reload.tls if reload else self.tls
        generation = reload.generation if reload else self.generation
        max_requests = config.max_requests + random.randint(0, config.max_requests_jitter) if config.max_requests else 0
        try:
            mold = self.molding.mold_for(generation, config, listeners, tls)
            if mold is not None and mold.state is MoldState.LOADING:
                mold.waiting.add(slot)  # forked once the mold has imported the handler (Molding.on_loaded)
                return None
            worker = self.pool.fork(slot, generation, config,
                                    [li.sock for li in listeners], max_requests=max_requests,
                                    lb_drain=self.host.lb_drain is not None, tls=tls,
                                    listener_specs=tuple(li.spec for li in listeners),
                                    mold=self.molding.fork(mold))
        except (OSError, IndexError) as exc:
            why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "no free scoreboard record"
            if reload is not None:
                self.abort_reload(f"cannot fork a worker: {why}")
                return None
            backoff = self.backoff.setdefault(slot, Backoff())
            backoff.failures += 1
            delay = max(backoff_delay(backoff.failures), BACKOFF_FIRST)  # a failed fork: never at once
            self.respawn_later(slot, delay)
            log.error("cannot fork worker %d: %s; retrying in %.1fs", slot, why, delay)
            return None
        (reload.slots if reload else self.slots)[slot] = worker
        return worker

    def respawn_later(self, slot: int, delay: float) -> None:
        def respawn() -> None:
            if self.host.stopping is None and slot < self.target and slot not in self.slots:
                self.spawn_worker(slot)

        self.timers.set(("respawn", slot), time.monotonic() + delay, respawn)

    def on_exit(self, worker: Worker, status: int) -> None:
        """A worker of ours is gone (the pool reaped it): log what it means, and act on it."""
        how = self._judge_exit(worker, status)
        self.reloader.on_exit(worker, how)
        self.molding.end_idle()

    def _judge_exit(self, worker: Worker, status: int) -> str:
        how, clean = describe_exit(status, worker.signals_sent, boot_error=worker.boot_error is not None,
                                   oom_kills=worker.oom_kills_since_start())
        reload = self.reloads.in_flight
        in_slot = self.slots.get(worker.slot) is worker
        in_reload = reload is not None and reload.slots.get(worker.slot) is worker
        if in_slot:
            del self.slots[worker.slot]
        if in_reload:
            assert reload is not None
            del reload.slots[worker.slot]
        action = classify_exit(ExitFacts(clean=clean, state=worker.state, in_slot=in_slot, in_reload=in_reload,
                                         boot_error=worker.boot_error is not None, serving=self.serving,
                                         stopping=self.host.stopping is not None,
                                         drained=self.host.lb_drain is LbDrain.LISTENERS_CLOSED))
        if not clean:
            self.pool.totals.crashes += 1
        if action is ExitAction.EXPECTED:
            log.info("worker %d (pid %d) %s (%s)", worker.slot, worker.pid, how, worker.stop_reason or "stopped")
        elif action is ExitAction.RELOAD_FAILED:
            log.error("worker %d (pid %d) of generation %d %s while starting",
                      worker.slot, worker.pid, worker.generation, how)
            self.reloader.worker_failed(worker, how, worker.boot_error)
        elif action is ExitAction.FATAL:
            log.critical("%s", worker.boot_error)
            self.host.fatal("the handler cannot be loaded, so no worker can serve")
        elif action is ExitAction.GONE:
            log.log(logging.INFO if clean else logging.WARNING, "worker %d (pid %d) %s", worker.slot, worker.pid, how)
        else:
            self._respawn(worker, how)
        return how

    def _respawn(self, worker: Worker, how: str) -> None:
        if worker.boot_error:
            log.error("%s", worker.boot_error)
        backoff = self.backoff.setdefault(worker.slot, Backoff())
        backoff.failures = failures_after(backoff.failures, time.monotonic() - worker.started)
        delay = backoff_delay(backoff.failures)
        level = logging.WARNING if worker.state is not WorkerState.KILLING else logging.ERROR
        log.log(level, "worker %d (pid %d) %s, restarting %s", worker.slot, worker.pid, how,
                f"in {delay:.1f}s" if delay else "now")
        self.pool.totals.respawns += 1
        if delay:
            self.respawn_later(worker.slot, delay)
        elif worker.slot < self.target:
            self.spawn_worker(worker.slot)

    def on_message(self, worker: Worker, message: Message) -> None:
        if message.event is Event.READY:
            if worker.state is WorkerState.BOOTING:
                worker.state = WorkerState.READY
            if self.slots.get(worker.slot) is worker:
                self.timers.cancel(("respawn", worker.slot))
                if worker.slot in self.backoff:
                    self._forget_backoff_once_settled(worker)
            self._check_generation_ready()
        elif message.event is Event.BOOT_ERROR:
            worker.boot_error = message.detail
        elif message.event is Event.STOPPED:
            self.reloads.stopped_accepting(worker.pid)
        elif message.event is Event.GREW:
            self.on_grown()  # --max-worker-memory's check, now rather than at its next turn
        elif message.event is Event.RETIRING:
            if self.slots.get(worker.slot) is worker and self.host.stopping is None:
                del self.slots[worker.slot]
                log.info("worker %d (pid %d) retiring: %s; starting its replacement",
                         worker.slot, worker.pid, message.detail)
                self.pool.drain(worker, message.detail, self.config.graceful_timeout)
                self.spawn_worker(worker.slot)
            else:
                self.pool.drain(worker, message.detail, self.config.graceful_timeout)

    def _forget_backoff_once_settled(self, worker: Worker) -> None:
        """A worker that serves past EARLY_DEATH ends its slot's run of early deaths, and status stops showing it.

        Not at READY itself: a handler that kills its worker on every
        connection must still back off.
        """
        def settled() -> None:
            if self.slots.get(worker.slot) is worker and worker.pid in self.pool.workers:
                self.backoff.pop(worker.slot, None)

        self.timers.set(("settled", worker.slot), worker.started + EARLY_DEATH, settled)

    def _check_generation_ready(self) -> None:
        if not self.serving and all_ready(self.slots, self.target):
            self.serving = True
            log.info("serving: %d worker(s) ready", self.target)
            self.host.on_serving()
        self.reloader.on_ready()

    # -- reload (run by the Reloader) -----------------------------------------------------------------

    @property
    def reloads(self) -> Reloads:
        return self.reloader.reloads

    @property
    def reloading(self) -> bool:
        """A reload is in flight, or on probation (a rollback may still come)."""
        return self.reloader.reloads.in_flight is not None or self.reloader.probation is not None

    def begin_reload(self, waiters: Sequence[Waiter], canary: float | None = None) -> None:
        self.reloader.begin(waiters, canary)

    def commit_reload(self) -> None:
        self.reloader.commit()

    def abort_reload(self, why: str) -> None:
        self.reloader.abort(why)

    def reread_config(self) -> Config:
        return self.reread(self.config)

    def new_generation(self) -> int:
        return next(self._generations)

    def keep_mold(self, generation: int | None) -> bool:
        """Keep ``generation``'s mold with no worker (None: keep none); False when it has none to keep."""
        kept = generation is None or self.molding.has_mold(generation)
        self.molding.kept = generation if kept else None
        return kept

    def end_idle_molds(self) -> None:
        self.molding.end_idle()

    def close_mold_listeners(self, generation: int) -> None:
        self.molding.close_listeners(generation)

    def fill_slots(self) -> None:
        """Every empty slot of the serving generation gets a worker (a rolling reload that failed)."""
        for slot in range(self.target):
            if slot not in self.slots:
                self.spawn_worker(slot)

    def take_over(self, reload: Reload) -> tuple[dict[int, Worker], list[Listener]]:
        """``reload``'s generation serves: (the old slots, the listeners it no longer has)."""
        old_slots, old_config = self.slots, self.config
        self.slots, self.generation, self.config = reload.slots, reload.generation, reload.config
        self.tls = reload.tls or self.tls
        self.target = reload.config.workers
        self.pool.timeout = self.config.timeout
        self.backoff.clear()
        for slot in range(max(old_config.workers, self.target) + 1):
            self.timers.cancel(("respawn", slot))
        self.host.on_config(old_config)
        keep = {id(li) for li in reload.listeners}
        removed = [li for li in self.listeners if id(li) not in keep]
        self.listeners = reload.listeners
        self.host.on_listeners(added=reload.new_listeners, removed=removed)
        return old_slots, removed

    def scale(self, count: int) -> None:
        if self.host.stopping is not None or count == self.target:
            return
        log.info("scaling from %d to %d worker(s)", self.target, count)
        old, self.target = self.target, count
        for slot in range(old, count):
            if slot not in self.slots:
                self.spawn_worker(slot)
        for slot in range(count, old):
            self.backoff.pop(slot, None)
            self.timers.cancel(("respawn", slot))
            worker = self.slots.pop(slot, None)
            if worker is not None:
                self.pool.drain(worker, "scaled down", self.config.graceful_timeout)


    def replace(self, worker: Worker, reason: str) -> None:
        """Start a successor in the worker's slot now, and drain it (a worker over its memory limit)."""
        if self.slots.get(worker.slot) is worker:
            del self.slots[worker.slot]
        self.pool.drain(worker, reason, self.config.graceful_timeout)
        self.spawn_worker(worker.slot)

    def prepare_stop(self) -> None:
        """The daemon stops: no reload goes on, no worker is respawned."""
        if self.reloads.in_flight is not None:
            self.abort_reload("the daemon is stopping")
        for slot in self.backoff:
            self.timers.cancel(("respawn", slot))

    def stop_workers(self, mode: StopMode) -> None:
        """Every worker drains (or quits at once when fast)."""
        self.prepare_stop()
        for worker in list(self.pool.workers.values()):
            if mode is StopMode.FAST:
                self.pool.quit(worker)
            else:
                self.pool.drain(worker, "stopping", self.config.graceful_timeout)
        self.slots.clear()

    def active(self) -> int:
        """Connections open in every live worker."""
        return sum(int(self.pool.record(w).active) for w in self.pool.workers.values())

