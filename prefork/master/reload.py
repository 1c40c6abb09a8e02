"""Reloads: the generation being started, its canary's window, the held replies, and what the steps ask of
the master.

A reload starts a new generation from the re-read configuration and, once
every new worker is ready, drains the old one. Its reply is held until no
old worker accepts any more, so a client that got "reloaded" knows that
every new connection meets the new code. A reload asked for while one is in
flight runs after it (the one in flight may predate the newest code), and
everyone who asked meanwhile is answered by that follow-up, whatever becomes
of it. :class:`Reloads` keeps these promises and touches no process, so
tests drive it step by step. :class:`prefork.master.reloader.Reloader` runs
a reload through the generations (batches, commit or abort), and
:class:`prefork.master.trials.Trials` judges the new code on trial: a canary
before the reload goes on, a probation after it committed.

With a canary (``--reload-canary SECS``, ``preforkctl reload --canary SECS``)
one new worker serves beside the old generation for SECS first; the reload
goes on only if the canary did no worse than the old workers over the same
window (:func:`prefork.master.verdicts.judge_canary`); otherwise the canary
drains and the old generation serves on untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefork.config import Config, ConfigError, build_config
from prefork.kernelstats import ListenCounters, listen_counters
from prefork.listeners import Listener, reuse_or_bind
from prefork.master.pool import WorkerPool
from prefork.master.state import LbDrain, StopMode, Worker, WorkerState
from prefork.master.timers import Timers
from prefork.tls import TlsSetup


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


def all_ready(slots: dict[int, Worker], count: int) -> bool:
    return len(slots) == count and all(w.state is WorkerState.READY for w in slots.values())
