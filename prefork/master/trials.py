"""The new code on trial during a reload: a canary before the reload goes on, a probation after it committed.

A canary (``--reload-canary``) is one new worker serving beside the old
generation for a window; at its end, or when it dies or is recycled first,
its figures are judged against the old workers' over the same window
(:func:`prefork.master.verdicts.judge_canary`), and the reload goes on or is
rolled back. A probation (``--reload-probation``, :mod:`prefork.master.probation`)
keeps the old generation's mold while the committed generation is watched;
if it does worse, the old generation is started again from that mold.

:class:`Trials` gives these verdicts; what follows from them (the next
batch, an abort, the follow-up reload) is the :class:`Stepper`'s, the
:class:`prefork.master.reloader.Reloader`.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any, Protocol

from prefork.config import Config
from prefork.master.pool import WorkerPool
from prefork.master.probation import PROBATION_CHECK, Probation, counts
from prefork.master.reload import CanaryWindow, GenerationsView, Reload, Reloads, fail
from prefork.master.state import Worker
from prefork.master.verdicts import CanaryFigures, judge_canary
from prefork.tls import TlsSetup

log = logging.getLogger(__name__)


class Stepper(Protocol):
    """What a verdict asks of the steps of a reload."""

    def abort(self, why: str, *, rolled_back: bool = False, details: dict[str, Any] | None = None) -> None: ...

    def after_canary(self, reload: Reload) -> None: ...

    def start_batch(self, reload: Reload) -> None: ...

    def follow_up(self) -> None: ...


class Trials:
    """Judges the new code: the reload's canary while it is in flight, the committed generation's probation."""

    def __init__(self, gens: GenerationsView, reloads: Reloads, stepper: Stepper) -> None:
        self.gens = gens
        self.reloads = reloads
        self.stepper = stepper
        self.probation: Probation | None = None

    def on_exit(self, worker: Worker, how: str) -> None:
        """A worker is gone: a new one on probation counts against the new generation, an old one gone unasked
        against the old beside a canary, and a recycled canary is judged on what it served."""
        if self.probation is not None and (why := self.probation.on_exit(worker, how)) is not None:
            self._roll_back(why)
        reload = self.reloads.in_flight
        window = reload.window if reload is not None else None
        if reload is None or window is None or window.verdict is not None:
            return
        if worker.generation == window.old_generation:
            if not worker.stop_reason:  # it went unasked (not recycled, not scaled down)
                window.old_exits += 1
            if signal.SIGABRT in worker.signals_sent:
                window.old_hung += 1
        elif worker.pid == window.pid and worker.stop_reason and worker.slot not in reload.slots:
            # told to go before the reload committed (--max-requests): its successor serves what is left
            self._verdict(canary_figures(self.gens.pool, window, worker))

    # -- the canary ---------------------------------------------------------------------------------

    def open_window(self, reload: Reload) -> None:
        """The canary serves: its window beside the old generation opens, judged when it ends."""
        canary = reload.slots[0]
        now = time.monotonic()
        pool = self.gens.pool
        self.gens.timers.cancel("reload")  # it is up: its time now is the window's
        reload.window = CanaryWindow(pid=canary.pid, began=now, ends=now + reload.canary,
                                     base=counts(pool, canary),
                                     old_base={w.pid: counts(pool, w) for w in self.gens.slots.values()},
                                     old_generation=self.gens.generation)
        log.info("reloading: canary worker (pid %d) of generation %d serving beside generation %d for %gs",
                 canary.pid, reload.generation, self.gens.generation, reload.canary)
        self.gens.timers.set("canary", reload.window.ends, self._judge)

    def canary_failed(self, worker: Worker, how: str) -> bool:
        """A worker of the generation being started ended: if it was the canary, judge it (True)."""
        reload = self.reloads.in_flight
        window = reload.window if reload is not None else None
        if window is None or window.verdict is not None or worker.pid != window.pid:
            return False
        figures = dataclasses.replace(canary_figures(self.gens.pool, window, worker), exits=1, exit_how=how,
                                      hung=int(signal.SIGABRT in worker.signals_sent))
        self._verdict(figures)
        return True

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
            self.stepper.abort(why, rolled_back=True, details={"canary": figures.as_dict()})
            return
        log.info("reloading: canary passed (%d of %d connection(s) failed; old generation: %d of %d); "
                 "starting the rest of generation %d", figures.errors, figures.connections, figures.old_errors,
                 figures.old_connections, reload.generation)
        reload.report = {"canary": figures.as_dict()}
        if 0 in reload.slots:  # else the canary was recycled meanwhile: its successor is on its way
            self.stepper.after_canary(reload)

    # -- probation ------------------------------------------------------------------------------------

    def rolled_back(self, reload: Reload) -> None:
        """The generation a probation found wanting is replaced by the one before it: say so to who asked."""
        self.reloads.finish()
        for waiter in reload.waiters:
            waiter.reply({"ok": False, **reload.report})
        log.warning("rolled back: generation %d serving again with %d worker(s)", reload.generation,
                    reload.config.workers)
        self.gens.end_idle_molds()
        self.stepper.follow_up()

    def start_probation(self, reload: Reload, old_slots: dict[int, Worker], old: tuple[Config, TlsSetup | None],
                        message: dict[str, Any], accepting: set[int]) -> None:
        """The new generation serves on trial; its reply waits for the verdict."""
        self.reloads.finish()
        self.probation = Probation.start(self.gens.pool, reload.probation, reload.generation, reload.slots,
                                         old_slots, *old)
        self.probation.waiters, self.probation.message, self.probation.accepting = reload.waiters, message, accepting
        log.info("reloaded: generation %d serving with %d worker(s); draining the old one, whose mold is "
                 "kept for %gs of probation", reload.generation, reload.config.workers, reload.probation)
        self.gens.timers.set("probation", time.monotonic() + PROBATION_CHECK, self._check_probation)

    def stop_probation(self, why: str) -> None:
        """The daemon stops during a probation: who waits for its verdict is told ``why``, and it ends."""
        if self.probation is not None:
            fail(self.probation.waiters, f"{why} during the probation of generation {self.probation.generation}")
            self._end_probation()

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
        self.stepper.follow_up()

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
        self.stepper.start_batch(reload)
        self.gens.keep_mold(None)  # its generation is starting again: the mold stays as that of a reload


def canary_figures(pool: WorkerPool, window: CanaryWindow, canary: Worker | None = None) -> CanaryFigures:
    """The canary's figures and the old generation's since the window opened (so far, or at its end)."""
    now = time.monotonic()
    worker = canary or pool.workers.get(window.pid)
    connections = errors = 0
    error_type = ""
    if worker is not None:
        counted = counts(pool, worker)
        errors = counted[1] - window.base[1]
        # a connection's error is counted as it ends, its end just after: one may be in between
        connections = max(counted[0] - window.base[0], errors)
        error_type = pool.record(worker).error_type.decode("ascii", "replace")
    old_connections = old_errors = 0
    for old in pool.workers.values():  # the old generation's workers then, and those started since (respawns)
        if old.generation == window.old_generation and old.pid != window.pid:
            requests, errs = window.old_base.get(old.pid, (0, 0))
            counted = counts(pool, old)
            old_errors += counted[1] - errs
            old_connections += max(counted[0] - requests, counted[1] - errs)
    return CanaryFigures(seconds=min(now, window.ends) - window.began, connections=connections, errors=errors,
                         error_type=error_type, old_connections=old_connections, old_errors=old_errors,
                         old_exits=window.old_exits, old_hung=window.old_hung)


def _hung(pool: WorkerPool, worker: Worker | None) -> bool:
    """Hung now, though maybe not yet killed for it: a stalled canary serves nothing, so it fails nothing."""
    return worker is not None and (signal.SIGABRT in worker.signals_sent
                                   or time.monotonic() - pool.record(worker).heartbeat > pool.timeout)
