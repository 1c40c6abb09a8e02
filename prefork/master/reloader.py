"""The steps of a reload: begin from the re-read configuration, start the new workers batch by batch,
then commit (the old generation drains) or abort (the new one does); a follow-up asked meanwhile runs next.

What a reload is and the replies it owes are :mod:`prefork.master.reload`;
the verdicts on the new code (a canary, a probation) are
:mod:`prefork.master.trials`, which calls back here to go on or roll back.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Any

from prefork.config import ConfigError
from prefork.kernelstats import listen_counters
from prefork.listeners import BindError
from prefork.master.pool import kill_pid
from prefork.master.probation import Probation
from prefork.master.reload import (
    GenerationsView,
    Reload,
    Reloads,
    Waiter,
    all_ready,
    fail,
    listeners_for,
    reload_report,
)
from prefork.master.state import LbDrain, Worker, WorkerState
from prefork.master.trials import Trials, canary_figures
from prefork.tls import load as load_tls

log = logging.getLogger(__name__)


class Reloader:
    """Runs a reload through the generations: the canary, the batches, then commit or abort."""

    def __init__(self, gens: GenerationsView) -> None:
        self.gens = gens
        self.reloads = Reloads()
        self.trials = Trials(gens, self.reloads, self)

    @property
    def probation(self) -> Probation | None:
        """The committed generation on probation, if any: a reload asked meanwhile waits for its end."""
        return self.trials.probation

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
                self.trials.open_window(reload)
            return
        if reload.window is not None and not reload.window.continued:
            self.after_canary(reload)  # a recycled canary's successor serves
            return
        if reload.started >= reload.config.workers:
            self.commit()
        else:
            self._retire_batch(reload, reload.batch or reload.config.workers)

    def on_exit(self, worker: Worker, how: str) -> None:
        """A worker is gone: what it means for the trials (:meth:`Trials.on_exit`); a new one told to go
        gets a successor, and once the old workers of a batch are gone the next batch starts."""
        self.trials.on_exit(worker, how)
        reload = self.reloads.in_flight
        if reload is None:
            return
        if worker.generation == reload.generation and worker.stop_reason and worker.slot not in reload.slots:
            # told to go before the reload committed (--max-requests): its slot gets a successor
            self.gens.spawn_worker(worker.slot, reload)
        if worker.pid in reload.retiring:
            reload.retiring.discard(worker.pid)
            if not reload.retiring:  # the old workers of the last batch are gone: the next one starts
                self.start_batch(reload)

    def worker_failed(self, worker: Worker, how: str, boot_error: str | None) -> None:
        """A worker of the generation being started ended: the reload fails (a canary says how it did)."""
        if not self.trials.canary_failed(worker, how):
            self.abort(boot_error or f"a new worker {how} while starting")

    def after_canary(self, reload: Reload) -> None:
        """The canary passed: the rest of the generation starts (or, batch by batch, takes the old one's place)."""
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
            self.trials.rolled_back(reload)
            return
        message = {"ok": True, "generation": generation, "workers": reload.config.workers,
                   "verdict": "committed", **reload.report, **reload_report(reload, gens.pool.peak)}
        if reload.probation and old_slots and not removed and not reload.new_listeners \
                and gens.keep_mold(next(iter(old_slots.values())).generation):
            self.trials.start_probation(reload, old_slots, (old_config, old_tls), message, accepting)
            return
        gens.pool.totals.reloads += 1
        log.info("reloaded: generation %d serving with %d worker(s); draining the old one",
                 generation, reload.config.workers)
        # the reply waits until no old worker accepts: from then on, every new connection meets new code
        self.reloads.commit(message, accepting=accepting)
        gens.end_idle_molds()
        self.follow_up()

    def abort(self, why: str, *, rolled_back: bool = False, details: dict[str, Any] | None = None) -> None:
        """The generation being started failed (or its canary did worse): drain what started of it; the
        serving one goes on."""
        gens = self.gens
        told = f"{why}; still serving generation {gens.generation}" if rolled_back else why
        reload = self.reloads.abort(told, {"verdict": "rolled_back" if rolled_back else "failed", **(details or {})})
        if gens.host.stopping is not None:
            self.trials.stop_probation(why)
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

    def follow_up(self) -> None:
        """The reload is done: the one queued behind it, if any, begins."""
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


def _draining(workers: Iterable[Worker]) -> set[int]:
    """The pids of the workers told to go that are still alive: a reload's first batch waits for them, as
    they count towards --reload-batch's bound (the last old ones of a reload just before this one)."""
    return {w.pid for w in workers if w.state in (WorkerState.DRAINING, WorkerState.KILLING)}
