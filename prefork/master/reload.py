"""Reloads: the generation being started, its canary, the held replies, and the steps that run it.

A reload starts a new generation from the re-read configuration and, once
every new worker is ready, drains the old one. Its reply is held until no
old worker accepts any more, so a client that got "reloaded" knows that
every new connection meets the new code. A reload asked for while one is in
flight runs after it (the one in flight may predate the newest code), and
everyone who asked meanwhile is answered by that follow-up, whatever becomes
of it. :class:`Reloads` keeps these promises and :func:`judge_canary`
decides a canary's fate: neither touches a process, so tests drive them step
by step. :class:`Reloader` runs a reload through the generations: canary,
batches, commit or abort.

With a canary (``--reload-canary SECS``, ``preforkctl reload --canary SECS``)
one new worker serves beside the old generation for SECS first; the reload
goes on only if the canary did no worse than the old workers over the same
window (:func:`judge_canary`); otherwise the canary drains and the old
generation serves on untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefork.config import Config, ConfigError, build_config
from prefork.kernelstats import ListenCounters, listen_counters
from prefork.listeners import BindError, Listener, reuse_or_bind
from prefork.master.pool import WorkerPool, kill_pid
from prefork.master.probation import PROBATION_CHECK, Probation
from prefork.master.state import LbDrain, StopMode, Worker, WorkerState
from prefork.master.timers import Timers
from prefork.master.verdicts import CanaryFigures, judge_canary
from prefork.tls import TlsSetup
from prefork.tls import load as load_tls

log = logging.getLogger(__name__)

@dataclass
class CanaryWindow:
    """The canary's time beside the old generation: the counters when it began, to take differences."""

    pid: int  # the canary's worker
    began: float
    ends: float
    base: tuple[int, int]  # the canary's (connections, errors) when it began
    old_base: dict[int, tuple[int, int]]  # each old worker's pid -> (connections, errors) when it began
    old_generation: int = 0
    old_exits: int = 0
    old_hung: int = 0
    verdict: str | None = None  # once judged: "passed" or why it failed
    continued: bool = False  # the rest of the generation was started after it passed


class Waiter(Protocol):
    """Someone waiting for an answer: a control client."""

    def reply(self, message: dict[str, Any]) -> None: ...


@dataclass
class Reload:
    """A generation being started; the current one keeps serving until this one is READY."""

    generation: int
    config: Config
    listeners: list[Listener]
    new_listeners: list[Listener]  # bound for this reload: closed if it fails
    began: float = 0.0  # time.monotonic() when it started
    counters: ListenCounters | None = None  # the kernel's listen-queue counters then
    slots: dict[int, Worker] = field(default_factory=dict)
    waiters: list[Waiter] = field(default_factory=list)
    batch: int = 0  # new workers started at a time (--reload-batch); 0: all at once
    started: int = 0  # new slots started so far: 0..started-1
    retiring: set[int] = field(default_factory=set)  # old workers of the last batch, until they exit
    tls: TlsSetup | None = None  # the new generation's TLS contexts, read afresh
    canary: float = 0.0  # seconds its first worker serves beside the old generation before the rest start
    window: CanaryWindow | None = None  # once the canary serves
    report: dict[str, Any] = field(default_factory=dict)  # what the reply adds: the canary's figures
    probation: float = 0.0  # seconds the new generation is on trial once it serves (--reload-probation)
    rollback: bool = False  # this "reload" brings back the generation a probation found wanting

    @property
    def canary_pending(self) -> bool:
        """A canary is asked for and not yet judged."""
        return self.canary > 0 and (self.window is None or self.window.verdict is None)

    def next_batch(self) -> range:
        """The new slots to start next (empty once every one is started); a canary starts alone."""
        size = 1 if self.canary_pending else self.batch or self.config.workers
        return range(self.started, min(self.started + size, self.config.workers))


@dataclass
class HeldReply:
    """A committed reload's answer, sent once none of ``accepting`` (old workers' pids) accepts any more."""

    waiters: list[Waiter]
    accepting: set[int]
    message: dict[str, Any]


class Reloads:
    """The reload in flight, the follow-up queued behind it, and the replies held after a commit."""

    def __init__(self) -> None:
        self.in_flight: Reload | None = None
        self.queued: list[Waiter] | None = None  # None: no follow-up; [] a follow-up nobody waits for (SIGHUP)
        self.queued_canary: float | None = None  # the canary the follow-up was asked with (None: the setting's)
        self.held: list[HeldReply] = []

    def queue(self, waiters: list[Waiter]) -> None:
        """Reload again once the one in flight is done; ``waiters`` are answered by that follow-up."""
        self.queued = (self.queued or []) + waiters

    def take_queued(self) -> list[Waiter] | None:
        """The follow-up's waiters (None: there is no follow-up), now the caller's to answer."""
        queued, self.queued = self.queued, None
        return queued

    def start(self, reload: Reload) -> None:
        assert self.in_flight is None, "one reload at a time"
        self.in_flight = reload

    def commit(self, message: dict[str, Any], accepting: set[int]) -> Reload:
        """The reload in flight took over: hold its reply until the old workers in ``accepting`` stop."""
        reload = self.in_flight
        assert reload is not None
        self.in_flight = None
        self.held.append(HeldReply(reload.waiters, set(accepting), message))
        self._answer_held()
        return reload

    def finish(self) -> Reload:
        """The reload in flight took over, its reply held elsewhere (a probation, a rollback)."""
        reload = self.in_flight
        assert reload is not None
        self.in_flight = None
        return reload

    def hold(self, waiters: list[Waiter], accepting: set[int], message: dict[str, Any]) -> None:
        """Answer ``waiters`` with ``message`` once none of ``accepting`` accepts any more."""
        self.held.append(HeldReply(waiters, set(accepting), message))
        self._answer_held()

    def abort(self, why: str, details: dict[str, Any] | None = None) -> Reload | None:
        """The reload in flight failed: it and every queued follow-up get ``why``; returns what was in flight."""
        reload, self.in_flight = self.in_flight, None
        waiters = (reload.waiters if reload is not None else []) + (self.take_queued() or [])
        fail(waiters, why, details)
        return reload

    def stopped_accepting(self, pid: int) -> None:
        for held in self.held:
            held.accepting.discard(pid)
        self._answer_held()

    def _answer_held(self) -> None:
        done = [h for h in self.held if not h.accepting]
        self.held = [h for h in self.held if h.accepting]
        for held in done:
            for waiter in held.waiters:
                waiter.reply(held.message)


def fail(waiters: list[Waiter], why: str, details: dict[str, Any] | None = None) -> None:
    """Tell everyone in ``waiters`` that the reload failed, and why (``details``: the verdict and figures)."""
    for waiter in waiters:
        waiter.reply({"ok": False, "error": f"reload failed: {why}", **(details or {})})


def reread_config(current: Config, cli_overrides: dict[str, Any]) -> Config:
    """The configuration a reload starts from: the config file read again under the same command line.

    Raises ConfigError when it is broken, or changes what only a restart can.
    """
    if current.config_file is None:
        return current
    config = build_config(cli_overrides, current.config_file)
    for key in ("name", "control", "reload_on_change", "reload_dir"):
        if getattr(config, key) != getattr(current, key):
            raise ConfigError(f"{key.replace('_', '-')} cannot change on reload (restart the daemon)")
    return config


def listeners_for(config: Config, have: list[Listener], *, adopted: bool) -> tuple[list[Listener], list[Listener]]:
    """(every listener of ``config``, those of them newly bound): the ones we ``have`` are kept.

    Raises BindError, having closed what it bound. With ``adopted`` sockets
    (systemd owns them) ``bind`` does not apply: the ones we have stay.
    """
    if adopted:
        return have, []
    return reuse_or_bind(config.bind_specs, {li.spec: li for li in have}, config.backlog)


def reload_report(reload: Reload, peak_workers: int) -> dict[str, Any]:
    """What a reload's reply tells about it: how long until the new generation served, the most
    workers alive at once meanwhile, and what the kernel turned away on this machine meanwhile."""
    report: dict[str, Any] = {"serve_s": round(time.monotonic() - reload.began, 3), "peak_workers": peak_workers}
    now = listen_counters()
    if reload.counters is not None and now is not None:
        report.update(now.since(reload.counters))
    return report


class ReloadHost(Protocol):
    """What a reload needs of the daemon (the master)."""

    @property
    def stopping(self) -> StopMode | None: ...

    @property
    def lb_drain(self) -> LbDrain | None: ...

    def notify_systemd(self, event: str) -> None: ...

    def on_config(self, old: Config) -> None: ...

    def on_listeners(self, *, added: list[Listener], removed: list[Listener]) -> None: ...

    def close_after_queue(self, listeners: list[Listener], then: Callable[[], None]) -> None: ...


class GenerationsView(Protocol):
    """What a reload needs of :class:`prefork.master.generations.Generations`."""

    @property
    def host(self) -> ReloadHost: ...

    @property
    def pool(self) -> WorkerPool: ...

    @property
    def timers(self) -> Timers: ...

    @property
    def generation(self) -> int: ...

    @property
    def config(self) -> Config: ...

    @property
    def listeners(self) -> list[Listener]: ...

    @property
    def slots(self) -> dict[int, Worker]: ...

    @property
    def adopted(self) -> bool: ...

    def reread_config(self) -> Config: ...

    def new_generation(self) -> int: ...

    def spawn_worker(self, slot: int, reload: Reload | None = None) -> Worker | None: ...

    @property
    def tls(self) -> TlsSetup | None: ...

    def take_over(self, reload: Reload) -> tuple[dict[int, Worker], list[Listener]]: ...

    def keep_mold(self, generation: int | None) -> bool: ...

    def fill_slots(self) -> None: ...

    def end_idle_molds(self) -> None: ...

    def close_mold_listeners(self, generation: int) -> None: ...


class Reloader:
    """Runs a reload through the generations: the canary, the batches, then commit or abort."""

    def __init__(self, gens: GenerationsView) -> None:
        self.gens = gens
        self.reloads = Reloads()
        self.probation: Probation | None = None

    def begin(self, waiters: Sequence[Waiter], canary: float | None = None) -> None:
        """Start a new generation from the re-read config; drain the old one once it serves.

        Everyone in ``waiters`` is answered on every path: when the generation
        serves, or when the reload is refused, fails or is aborted. ``canary``
        (None: the configuration's --reload-canary) is how long one new worker
        serves beside the old generation before the rest start.
        """
        gens, host, pool = self.gens, self.gens.host, self.gens.pool
        asked: list[Waiter] = list(waiters)
        if self._refused_or_queued(asked, canary):
            return
        try:
            config = gens.reread_config()
            # certificates and keys are read again on every reload (renewed ones are picked up); a broken
            # one fails the reload before anything is bound, and the serving generation keeps its own
            tls = load_tls(config, [li.spec for li in gens.listeners])
            listeners, new_listeners = listeners_for(config, gens.listeners, adopted=gens.adopted)
        except (ConfigError, BindError) as exc:
            pool.totals.failed_reloads += 1
            log.error("reload failed: %s; still serving generation %d", exc, gens.generation)
            fail(asked, str(exc), {"verdict": "failed"})
            return
        seconds = config.reload_canary if canary is None else canary
        reload = Reload(generation=max(gens.new_generation(), gens.generation + 1), config=config,
                        listeners=listeners, new_listeners=new_listeners, waiters=asked, tls=tls,
                        batch=config.reload_batch if config.reload_batch < config.workers else 0,
                        began=time.monotonic(), counters=listen_counters(),
                        canary=seconds if gens.slots else 0.0,  # a canary needs an old generation to compare
                        probation=config.reload_probation if gens.slots else 0.0)
        pool.mark_peak()
        self.reloads.start(reload)
        log.info("reloading: starting generation %d (%d %s worker(s) of %s%s%s)",
                 reload.generation, config.workers, config.worker_class, config.effective_handler,
                 f", {reload.batch} at a time" if reload.batch else "",
                 f", a canary first for {reload.canary:g}s" if reload.canary else "")
        host.notify_systemd("reloading")
        reload.retiring = _draining(pool.workers.values()) if reload.batch else set()
        if reload.retiring:
            log.info("reloading: waiting for %d draining worker(s) to exit first", len(reload.retiring))
            return
        self.start_batch(reload)

    def _refused_or_queued(self, asked: list[Waiter], canary: float | None) -> bool:
        """A reload cannot start now: refused (the daemon stops, or is drained), or queued behind the current."""
        host = self.gens.host
        why = ("the daemon is stopping" if host.stopping is not None else
               "drained: the listening sockets are closed" if host.lb_drain is LbDrain.LISTENERS_CLOSED else None)
        if why is not None:
            for waiter in asked:
                waiter.reply({"ok": False, "error": why})
            return True
        if self.reloads.in_flight is None and self.probation is None:
            return False
        # after the current one: it may not have the newest code
        self.reloads.queue(asked)
        if canary is not None:
            self.reloads.queued_canary = canary
        log.info("reload requested during a reload: will reload again after generation %d is up%s",
                 self.gens.generation if self.probation else self.reloads.in_flight.generation if
                 self.reloads.in_flight else 0, " and its probation is over" if self.probation else "")
        return True

    def start_batch(self, reload: Reload) -> None:
        """Start the next batch of new workers; the reload fails if they are not all ready in time."""
        self.gens.timers.set("reload", time.monotonic() + reload.config.timeout,
                             lambda: self.abort(f"the new workers were not ready within {reload.config.timeout:g}s"))
        for slot in reload.next_batch():
            reload.started = slot + 1
            if self.reloads.in_flight is not reload:
                return  # a failed fork aborted it
            self.gens.spawn_worker(slot, reload)

    def on_ready(self) -> None:
        """A worker became ready: the canary's window opens, or the next step of the reload is taken."""
        reload = self.reloads.in_flight
        if reload is None or reload.retiring or not all_ready(reload.slots, reload.started):
            return
        if reload.canary_pending:
            if reload.window is None:
                self._open_window(reload)
            return
        if reload.window is not None and not reload.window.continued:
            self._after_canary(reload)  # a recycled canary's successor serves
            return
        if reload.started >= reload.config.workers:
            self.commit()
        else:
            self._retire_batch(reload, reload.batch or reload.config.workers)

    def on_exit(self, worker: Worker, how: str) -> None:
        """A worker is gone: the next batch may start; an old worker gone unasked counts against the old,
        a new one on probation against the new."""
        if self.probation is not None and (why := self.probation.on_exit(worker, how)) is not None:
            self._roll_back(why)
        reload = self.reloads.in_flight
        if reload is None:
            return
        window = reload.window
        if window is not None and window.verdict is None and worker.generation == window.old_generation:
            if not worker.stop_reason:  # it went unasked (not recycled, not scaled down)
                window.old_exits += 1
            if signal.SIGABRT in worker.signals_sent:
                window.old_hung += 1
        if worker.generation == reload.generation and worker.stop_reason and worker.slot not in reload.slots:
            # told to go before the reload committed (--max-requests): its slot gets a successor
            if window is not None and window.verdict is None and worker.pid == window.pid:
                self._verdict(canary_figures(self.gens.pool, window, worker))  # judged on what it served
            if self.reloads.in_flight is reload:
                self.gens.spawn_worker(worker.slot, reload)
        if worker.pid in reload.retiring:
            reload.retiring.discard(worker.pid)
            if not reload.retiring:  # the old workers of the last batch are gone: the next one starts
                self.start_batch(reload)

    def worker_failed(self, worker: Worker, how: str, boot_error: str | None) -> None:
        """A worker of the generation being started ended: the reload fails (a canary says how it did)."""
        reload = self.reloads.in_flight
        window = reload.window if reload is not None else None
        if window is not None and window.verdict is None and worker.pid == window.pid:
            figures = dataclasses.replace(canary_figures(self.gens.pool, window, worker), exits=1, exit_how=how,
                                          hung=int(signal.SIGABRT in worker.signals_sent))
            self._verdict(figures)
            return
        self.abort(boot_error or f"a new worker {how} while starting")

    # -- the canary ---------------------------------------------------------------------------------

    def _open_window(self, reload: Reload) -> None:
        canary = reload.slots[0]
        now = time.monotonic()
        pool = self.gens.pool
        self.gens.timers.cancel("reload")  # it is up: its time now is the window's
        reload.window = CanaryWindow(pid=canary.pid, began=now, ends=now + reload.canary,
                                     base=_counts(pool, canary),
                                     old_base={w.pid: _counts(pool, w) for w in self.gens.slots.values()},
                                     old_generation=self.gens.generation)
        log.info("reloading: canary worker (pid %d) of generation %d serving beside generation %d for %gs",
                 canary.pid, reload.generation, self.gens.generation, reload.canary)
        self.gens.timers.set("canary", reload.window.ends, self._judge)

    def _judge(self) -> None:
        reload = self.reloads.in_flight
        if reload is None or reload.window is None or reload.window.verdict is not None:
            return
        pool = self.gens.pool
        figures = canary_figures(pool, reload.window)
        self._verdict(dataclasses.replace(figures, hung=int(_hung(pool, pool.workers.get(reload.window.pid)))))

    def _verdict(self, figures: CanaryFigures) -> None:
        reload = self.reloads.in_flight
        assert reload is not None and reload.window is not None
        self.gens.timers.cancel("canary")
        why = judge_canary(figures)
        reload.window.verdict = why or "passed"
        if why is not None:
            self.abort(why, rolled_back=True, details={"canary": figures.as_dict()})
            return
        log.info("reloading: canary passed (%d of %d connection(s) failed; old generation: %d of %d); "
                 "starting the rest of generation %d", figures.errors, figures.connections, figures.old_errors,
                 figures.old_connections, reload.generation)
        reload.report = {"canary": figures.as_dict()}
        if 0 in reload.slots:  # else the canary was recycled meanwhile: its successor is on its way
            self._after_canary(reload)

    def _after_canary(self, reload: Reload) -> None:
        assert reload.window is not None
        reload.window.continued = True
        if reload.started >= reload.config.workers:
            self.commit()
        elif reload.batch:
            self._retire_batch(reload, 1)  # the canary took the first old worker's place
        else:
            self.start_batch(reload)

    # -- the end of a reload ------------------------------------------------------------------------

    def _retire_batch(self, reload: Reload, count: int) -> None:
        """``count`` new workers serve: as many old ones drain, and the next batch starts once they are gone
        (so the pool never holds more than --reload-batch extra workers)."""
        gens = self.gens
        old = sorted(gens.slots.values(), key=lambda w: w.slot)[:count]
        for worker in old:
            del gens.slots[worker.slot]
            gens.pool.drain(worker, f"replaced by generation {reload.generation}", gens.config.graceful_timeout)
        reload.retiring = {w.pid for w in old if w.pid in gens.pool.workers}
        log.info("reloading: %d of %d new worker(s) serving; %d old one(s) draining",
                 reload.started, reload.config.workers, len(old))
        if not reload.retiring:
            self.start_batch(reload)

    def commit(self) -> None:
        """Every new worker is ready: the new generation serves, the old one drains."""
        gens = self.gens
        gens.timers.cancel("reload")
        reload = self.reloads.in_flight
        assert reload is not None
        old_config, old_tls = gens.config, gens.tls
        old_slots, removed = gens.take_over(reload)
        generation = gens.generation  # a later reload may commit before this runs

        def replace_old() -> None:
            for listener in removed:
                log.info("no longer listening on %s", listener.address)
                listener.close()
            for worker in list(gens.pool.workers.values()):
                if worker.generation < generation and removed:
                    kill_pid(worker.pid, signal.SIGUSR2)  # every copy of a dropped listener closes now
            if removed:
                gens.close_mold_listeners(generation)
            for worker in old_slots.values():
                gens.pool.drain(worker, f"replaced by generation {generation}", gens.config.graceful_timeout)

        if removed:
            # the old generation goes on serving a dropped listener until its queue is served
            gens.host.close_after_queue(removed, replace_old)
        else:
            replace_old()
        gens.host.notify_systemd("ready")
        accepting = {w.pid for w in old_slots.values() if w.pid in gens.pool.workers}
        if reload.rollback:
            self._rolled_back(reload)
            return
        message = {"ok": True, "generation": generation, "workers": reload.config.workers,
                   "verdict": "committed", **reload.report, **reload_report(reload, gens.pool.peak)}
        if reload.probation and old_slots and not removed and not reload.new_listeners \
                and gens.keep_mold(next(iter(old_slots.values())).generation):
            self._start_probation(reload, old_slots, (old_config, old_tls), message, accepting)
            return
        gens.pool.totals.reloads += 1
        log.info("reloaded: generation %d serving with %d worker(s); draining the old one",
                 generation, reload.config.workers)
        # the reply waits until no old worker accepts: from then on, every new connection meets new code
        self.reloads.commit(message, accepting=accepting)
        gens.end_idle_molds()
        self._follow_up()

    # -- probation ------------------------------------------------------------------------------------

    def _rolled_back(self, reload: Reload) -> None:
        """The generation a probation found wanting is replaced by the one before it: say so to who asked."""
        self.reloads.finish()
        for waiter in reload.waiters:
            waiter.reply({"ok": False, **reload.report})
        log.warning("rolled back: generation %d serving again with %d worker(s)", reload.generation,
                    reload.config.workers)
        self.gens.end_idle_molds()
        self._follow_up()

    def _start_probation(self, reload: Reload, old_slots: dict[int, Worker], old: tuple[Config, TlsSetup | None],
                         message: dict[str, Any], accepting: set[int]) -> None:
        """The new generation serves on trial; its reply waits for the verdict."""
        self.reloads.finish()
        self.probation = Probation.start(self.gens.pool, reload.probation, reload.generation, reload.slots,
                                         old_slots, *old)
        self.probation.waiters, self.probation.message, self.probation.accepting = reload.waiters, message, accepting
        log.info("reloaded: generation %d serving with %d worker(s); draining the old one, whose mold is "
                 "kept for %gs of probation", reload.generation, reload.config.workers, reload.probation)
        self.gens.timers.set("probation", time.monotonic() + PROBATION_CHECK, self._check_probation)

    def _check_probation(self) -> None:
        probation = self.probation
        if probation is None:
            return
        why = probation.judge_now(self.gens.pool)
        if why is not None:
            self._roll_back(why)
            return
        now = time.monotonic()
        if now < probation.ends:
            self.gens.timers.set("probation", min(now + PROBATION_CHECK, probation.ends), self._check_probation)
            return
        self._end_probation()
        figures = probation.figures(self.gens.pool)
        self.gens.pool.totals.reloads += 1
        log.info("probation of generation %d passed (%d of %d connection(s) failed); generation %d's mold ends",
                 probation.generation, figures.errors, figures.connections, probation.old_generation)
        self.reloads.hold(probation.waiters, probation.accepting & set(self.gens.pool.workers),
                          {**probation.message, "probation": figures.as_dict()})
        self._follow_up()

    def _end_probation(self) -> None:
        self.probation = None
        self.gens.timers.cancel("probation")
        self.gens.keep_mold(None)
        self.gens.end_idle_molds()

    def _roll_back(self, why: str) -> None:
        """The generation on probation did worse: the old one's mold forks its workers again, the new drain."""
        probation = self.probation
        assert probation is not None
        figures = probation.figures(self.gens.pool)
        self.probation = None
        self.gens.timers.cancel("probation")
        self.gens.pool.totals.rolled_back_reloads += 1
        log.error("reload rolled back: %s; generation %d serves again", why, probation.old_generation)
        gens = self.gens
        # answered once the old generation serves again (or, should that fail, with why)
        reload = Reload(generation=probation.old_generation, config=probation.old_config,
                        listeners=list(gens.listeners), new_listeners=[], tls=probation.old_tls,
                        began=time.monotonic(), rollback=True, waiters=probation.waiters,
                        report={"error": f"reload failed: {why}; rolled back to generation {probation.old_generation}",
                                "verdict": "rolled_back", "probation": figures.as_dict()})
        self.reloads.start(reload)
        self.start_batch(reload)
        self.gens.keep_mold(None)  # its generation is starting again: the mold stays as that of a reload

    def abort(self, why: str, *, rolled_back: bool = False, details: dict[str, Any] | None = None) -> None:
        """The generation being started failed (or its canary did worse): drain what started of it; the
        serving one goes on."""
        gens = self.gens
        told = f"{why}; still serving generation {gens.generation}" if rolled_back else why
        reload = self.reloads.abort(told, {"verdict": "rolled_back" if rolled_back else "failed", **(details or {})})
        if self.probation is not None and gens.host.stopping is not None:
            fail(self.probation.waiters, f"{why} during the probation of generation {self.probation.generation}")
            self._end_probation()
        if reload is None:
            return
        gens.timers.cancel("reload")
        gens.timers.cancel("canary")
        if rolled_back:
            gens.pool.totals.rolled_back_reloads += 1
        else:
            gens.pool.totals.failed_reloads += 1
        log.error("reload failed: %s; still serving generation %d", why, gens.generation)
        if gens.host.stopping is None:  # a rolling reload drained old workers: their slots get new ones
            gens.fill_slots()
        for worker in reload.slots.values():
            gens.pool.drain(worker, "reload rolled back" if rolled_back else "reload aborted",
                            gens.config.graceful_timeout)
        for listener in reload.new_listeners:
            listener.close()
        gens.end_idle_molds()

    def _follow_up(self) -> None:
        queued = self.reloads.take_queued()
        canary, self.reloads.queued_canary = self.reloads.queued_canary, None
        if queued is not None:
            self.begin(queued, canary)


def reload_progress(reloader: Reloader) -> dict[str, Any] | None:
    """The reload in flight as status shows it: its phase, and a canary's or a probation's figures so far."""
    reload, pool = reloader.reloads.in_flight, reloader.gens.pool
    if reload is None:
        return reloader.probation.progress(pool) if reloader.probation is not None else None
    window = reload.window
    progress: dict[str, Any] = {"generation": reload.generation, "started": reload.started,
                                "workers": reload.config.workers,
                                "phase": "canary" if reload.canary_pending else "starting"}
    if window is not None:
        progress["canary"] = {"pid": window.pid, "window_s": reload.canary,
                              "remaining_s": round(max(0.0, window.ends - time.monotonic()), 3),
                              **canary_figures(pool, window).as_dict()}
    return progress


def canary_figures(pool: WorkerPool, window: CanaryWindow, canary: Worker | None = None) -> CanaryFigures:
    """The canary's figures and the old generation's since the window opened (so far, or at its end)."""
    now = time.monotonic()
    worker = canary or pool.workers.get(window.pid)
    connections = errors = 0
    error_type = ""
    if worker is not None:
        counted = _counts(pool, worker)
        errors = counted[1] - window.base[1]
        # a connection's error is counted as it ends, its end just after: one may be in between
        connections = max(counted[0] - window.base[0], errors)
        error_type = pool.record(worker).error_type.decode("ascii", "replace")
    old_connections = old_errors = 0
    for old in pool.workers.values():  # the old generation's workers then, and those started since (respawns)
        if old.generation == window.old_generation and old.pid != window.pid:
            requests, errs = window.old_base.get(old.pid, (0, 0))
            counted = _counts(pool, old)
            old_errors += counted[1] - errs
            old_connections += max(counted[0] - requests, counted[1] - errs)
    return CanaryFigures(seconds=min(now, window.ends) - window.began, connections=connections, errors=errors,
                         error_type=error_type, old_connections=old_connections, old_errors=old_errors,
                         old_exits=window.old_exits, old_hung=window.old_hung)


def _hung(pool: WorkerPool, worker: Worker | None) -> bool:
    """Hung now, though maybe not yet killed for it: a stalled canary serves nothing, so it fails nothing."""
    return worker is not None and (signal.SIGABRT in worker.signals_sent
                                   or time.monotonic() - pool.record(worker).heartbeat > pool.timeout)


def _counts(pool: WorkerPool, worker: Worker) -> tuple[int, int]:
    record = pool.record(worker)
    return int(record.requests), int(record.errors)


def _draining(workers: Iterable[Worker]) -> set[int]:
    """The pids of the workers told to go that are still alive: a reload's first batch waits for them, as
    they count towards --reload-batch's bound (the last old ones of a reload just before this one)."""
    return {w.pid for w in workers if w.state in (WorkerState.DRAINING, WorkerState.KILLING)}


def all_ready(slots: dict[int, Worker], count: int) -> bool:
    return len(slots) == count and all(w.state is WorkerState.READY for w in slots.values())
