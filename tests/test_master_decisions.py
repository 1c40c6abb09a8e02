"""The master's decisions, stepped without starting a process (as uvicorn's supervisor tests step its loop).

How an exit reads and what follows from it, backoff, the timers, the reload
bookkeeping, the command table, the status and stats payloads, and the
generations driven through a pool that records forks instead of making them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import time
from typing import Any

import pytest

from prefork.channel import Event, Message
from prefork.config import build_config
from prefork.master import commands, report
from prefork.master.exits import (
    EARLY_DEATH,
    ExitAction,
    ExitFacts,
    backoff_delay,
    classify_exit,
    describe_exit,
    failures_after,
)
from prefork.master.generations import Generations
from prefork.master.molds import Mold, MoldState
from prefork.master.reload import Reload, Reloads
from prefork.master.state import LbDrain, StopMode, Totals, Worker, WorkerState
from prefork.master.timers import Timers
from prefork.scoreboard import Scoreboard
from prefork.workers.entry import WORKER_BOOT_ERROR

# -- exits ------------------------------------------------------------------------------------------


def facts(**changes: Any) -> ExitFacts:
    base = ExitFacts(clean=True, state=WorkerState.READY, in_slot=True, in_reload=False, boot_error=False,
                     stopping=False, serving=True)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(("changes", "action"), [
    # told to go (drained, out of its slot) and went cleanly
    ({"state": WorkerState.DRAINING, "in_slot": False}, ExitAction.EXPECTED),
    ({"state": WorkerState.KILLING, "in_slot": False}, ExitAction.EXPECTED),
    # the daemon stops: any clean exit is expected, an unclean one is only logged
    ({"stopping": True}, ExitAction.EXPECTED),
    ({"stopping": True, "clean": False}, ExitAction.GONE),
    ({"stopping": True, "clean": False, "boot_error": True, "serving": False}, ExitAction.GONE),
    # killed while draining (graceful timeout): logged, not replaced (its successor already runs)
    ({"state": WorkerState.DRAINING, "in_slot": False, "clean": False}, ExitAction.GONE),
    # a worker of the generation being started died
    ({"in_reload": True, "in_slot": False, "clean": False}, ExitAction.RELOAD_FAILED),
    ({"in_reload": True, "in_slot": False, "boot_error": True, "clean": False}, ExitAction.RELOAD_FAILED),
    ({"in_reload": True, "in_slot": False, "state": WorkerState.BOOTING}, ExitAction.RELOAD_FAILED),
    # the handler cannot load and nothing serves yet: stop rather than fork-loop
    ({"boot_error": True, "clean": False, "serving": False, "state": WorkerState.BOOTING}, ExitAction.FATAL),
    # ... but once the daemon served, a boot error (the code changed on disk) is a respawn with backoff
    ({"boot_error": True, "clean": False}, ExitAction.RESPAWN),
    # died unasked while holding its slot, cleanly or not
    ({"clean": False}, ExitAction.RESPAWN),
    ({}, ExitAction.RESPAWN),
    # killed for a stale heartbeat: still holds its slot, so it is replaced however it ended
    ({"state": WorkerState.KILLING, "clean": False}, ExitAction.RESPAWN),
    ({"state": WorkerState.KILLING}, ExitAction.RESPAWN),
    # scaled away while busy, then crashed
    ({"state": WorkerState.READY, "in_slot": False, "clean": False}, ExitAction.GONE),
    # drain --close closed the listeners: a worker that dies is logged, never "restarting" with nothing to serve
    ({"clean": False, "drained": True}, ExitAction.GONE),
])
def test_classify_exit(changes: dict[str, Any], action: ExitAction) -> None:
    assert classify_exit(facts(**changes)) is action


@pytest.mark.parametrize(("status", "text", "clean"), [
    (0, "exited with status 0", True),
    (7 << 8, "exited with status 7", False),
    (WORKER_BOOT_ERROR << 8, "exited with status 3", False),  # a handler's os._exit(3): it did not say
    (signal.SIGKILL, "was killed by SIGKILL (out of memory?)", False),  # no OOM count to judge by
    (signal.SIGABRT, "was killed by SIGABRT", False),
    (signal.SIGSEGV, "was killed by SIGSEGV", False),
])
def test_describe_exit(status: int, text: str, clean: bool) -> None:
    assert os.WIFSIGNALED(status) or os.WIFEXITED(status)
    assert describe_exit(status) == (text, clean)


def test_backoff_grows_with_early_deaths_and_resets_after_a_long_life() -> None:
    failures = 0
    delays = []
    for _ in range(10):
        failures = failures_after(failures, lifetime=0.5)
        delays.append(backoff_delay(failures))
    assert delays[:5] == [0.0, 0.1, 0.2, 0.4, 0.8]
    assert delays == sorted(delays) and delays[-1] == 10.0
    assert failures_after(9, lifetime=EARLY_DEATH + 1) == 1
    assert backoff_delay(failures_after(9, lifetime=EARLY_DEATH + 1)) == 0.0


# -- timers -----------------------------------------------------------------------------------------


def test_timers_run_due_actions_earliest_first_and_each_once() -> None:
    timers = Timers()
    ran: list[str] = []
    timers.set("b", 2.0, lambda: ran.append("b"))
    timers.set("a", 1.0, lambda: ran.append("a"))
    timers.set("c", 9.0, lambda: ran.append("c"))
    assert timers.next_deadline() == 1.0
    timers.run_due(5.0)
    assert ran == ["a", "b"]
    timers.run_due(5.0)
    assert ran == ["a", "b"]
    assert timers.next_deadline() == 9.0 and "c" in timers and "a" not in timers


def test_timers_an_action_may_cancel_or_move_another_due_in_the_same_turn() -> None:
    timers = Timers()
    ran: list[str] = []
    def first() -> None:
        ran.append("first")
        timers.cancel("second")
        timers.set("third", 50, lambda: ran.append("third"))

    timers.set("first", 1.0, first)
    timers.set("second", 2.0, lambda: ran.append("second"))
    timers.set("third", 3.0, lambda: ran.append("third"))
    timers.run_due(10.0)
    assert ran == ["first"]
    assert timers.when("third") == 50


def test_timers_setting_a_key_again_moves_it() -> None:
    timers = Timers()
    ran: list[int] = []
    timers.set("k", 1.0, lambda: ran.append(1))
    timers.set("k", 5.0, lambda: ran.append(5))
    timers.run_due(2.0)
    assert ran == [] and timers.when("k") == 5.0
    timers.run_due(5.0)
    assert ran == [5]


def test_timers_every_repeats_and_sources_are_asked() -> None:
    timers = Timers()
    ticks: list[float] = []
    timers.every("tick", 10.0, lambda: ticks.append(time.monotonic()), first=0.0)
    due = timers.when("tick")
    assert due is not None and due <= time.monotonic()
    timers.run_due(time.monotonic())
    assert len(ticks) == 1
    again = timers.when("tick")
    assert again is not None and again > time.monotonic() + 9

    class Source:
        def __init__(self) -> None:
            self.expired: list[float] = []

        def next_deadline(self) -> float | None:
            return 0.5

        def expire(self, now: float) -> None:
            self.expired.append(now)

    source = Source()
    timers.watch(source)
    assert timers.next_deadline() == 0.5
    timers.run_due(1.0)
    assert source.expired == [1.0]
    timers.unwatch(source)
    assert timers.next_deadline() == again


# -- reload bookkeeping -----------------------------------------------------------------------------


class FakeWaiter:
    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []

    def reply(self, message: dict[str, Any], **_: Any) -> None:
        self.replies.append(message)


def make_reload(generation: int, *waiters: FakeWaiter) -> Reload:
    return Reload(generation=generation, config=build_config({}), listeners=[], new_listeners=[],
                  waiters=list(waiters))


def test_reload_reply_is_held_until_every_old_worker_stopped_accepting() -> None:
    reloads = Reloads()
    first = FakeWaiter()
    reloads.start(make_reload(2, first))
    reloads.commit({"ok": True, "generation": 2}, accepting={101, 102})
    assert reloads.in_flight is None and first.replies == []
    reloads.stopped_accepting(101)
    assert first.replies == []
    reloads.stopped_accepting(101)  # twice (STOPPED, then its exit) is harmless
    reloads.stopped_accepting(102)
    assert first.replies == [{"ok": True, "generation": 2}]
    reloads.stopped_accepting(102)
    assert len(first.replies) == 1


def test_reload_with_nothing_accepting_answers_at_commit() -> None:
    reloads = Reloads()
    waiter = FakeWaiter()
    reloads.start(make_reload(2, waiter))
    reloads.commit({"ok": True}, accepting=set())
    assert waiter.replies == [{"ok": True}]


def test_abort_answers_the_reload_and_everyone_queued_behind_it() -> None:
    reloads = Reloads()
    running, queued1, queued2 = FakeWaiter(), FakeWaiter(), FakeWaiter()
    reloads.start(make_reload(2, running))
    reloads.queue([queued1])
    reloads.queue([queued2])
    aborted = reloads.abort("boom")
    assert aborted is not None and aborted.generation == 2
    for waiter in (running, queued1, queued2):
        assert waiter.replies == [{"ok": False, "error": "reload failed: boom"}]
    assert reloads.take_queued() is None and reloads.in_flight is None
    assert reloads.abort("again") is None


def test_a_signal_queues_a_follow_up_nobody_waits_for() -> None:
    reloads = Reloads()
    reloads.start(make_reload(2))
    assert reloads.take_queued() is None
    reloads.queue([])
    assert reloads.take_queued() == []
    assert reloads.take_queued() is None


# -- the generations, through a pool that only records ----------------------------------------------


class FakePool:
    """Records what a WorkerPool would do; forks nothing."""

    def __init__(self, timers: Timers) -> None:
        self.timers = timers
        self.scoreboard = Scoreboard(capacity=64)
        self.workers: dict[int, Worker] = {}
        self.totals = Totals()
        self.drained: list[tuple[int, str]] = []
        self.quitted: list[int] = []
        self.pids = itertools.count(1000)
        self.peak = 0
        self.timeout = 30.0

    def mark_peak(self) -> None:
        self.peak = len(self.workers)

    def fork(self, slot: int, generation: int, config: Any, listeners: Any, *, max_requests: int,
             lb_drain: bool, tls: Any = None, listener_specs: tuple[str, ...] = (), mold: Any = None) -> Worker:
        pid = next(self.pids)
        index = self.scoreboard.allocate(pid, generation, time.monotonic())
        worker = Worker(pid=pid, slot=slot, generation=generation, record_index=index, started=time.monotonic())
        self.workers[pid] = worker
        self.peak = max(self.peak, len(self.workers))
        self.totals.spawned += 1
        return worker

    def drain(self, worker: Worker, reason: str, graceful_timeout: float) -> None:
        worker.state = WorkerState.DRAINING
        worker.stop_reason = reason
        self.drained.append((worker.pid, reason))

    def quit(self, worker: Worker) -> None:
        self.quitted.append(worker.pid)

    def record(self, worker: Worker) -> Any:
        return self.scoreboard[worker.record_index]

    def exit(self, worker: Worker) -> None:
        del self.workers[worker.pid]


class FakeHost:
    def __init__(self) -> None:
        self.stopping: StopMode | None = None
        self.lb_drain: LbDrain | None = None
        self.events: list[str] = []

    def notify_systemd(self, event: str) -> None:
        self.events.append(event)

    def on_serving(self) -> None:
        self.events.append("serving")

    def on_config(self, old: Any) -> None:
        self.events.append("config")

    def on_listeners(self, *, added: list[Any], removed: list[Any]) -> None:
        self.events.append(f"listeners +{len(added)} -{len(removed)}")

    def fatal(self, why: str) -> None:
        self.events.append(f"fatal: {why}")
        self.stopping = StopMode.FAST


def stepper(workers: int = 2, **settings: Any) -> tuple[Generations, FakePool, FakeHost, Timers]:
    timers = Timers()
    pool = FakePool(timers)
    host = FakeHost()
    gens = Generations(host, pool, timers, build_config({"workers": workers, **settings}), [],  # type: ignore[arg-type]
                       cli_overrides={}, adopted=True)  # adopted: a reload binds nothing
    gens.start()
    return gens, pool, host, timers


def ready(gens: Generations, pool: FakePool) -> None:
    for worker in list(pool.workers.values()):
        if worker.state is WorkerState.BOOTING:
            gens.on_message(worker, Message(worker.pid, Event.READY))


def exit_of(gens: Generations, pool: FakePool, worker: Worker, status: int) -> None:
    pool.exit(worker)
    gens.on_exit(worker, status)


def die_early_twice(gens: Generations, pool: FakePool) -> None:
    """Slot 0's worker dies, then its replacement dies young: a respawn is now pending with backoff."""
    exit_of(gens, pool, gens.slots[0], 1 << 8)
    exit_of(gens, pool, gens.slots[0], 1 << 8)


def test_the_first_generation_serves_once_every_worker_is_ready() -> None:
    gens, pool, host, _ = stepper(workers=3)
    assert sorted(gens.slots) == [0, 1, 2] and not gens.serving
    first = gens.slots[0]
    gens.on_message(first, Message(first.pid, Event.READY))
    assert not gens.serving and host.events == []
    ready(gens, pool)
    assert gens.serving and host.events == ["serving"]


def test_a_worker_that_dies_is_replaced_at_once_then_with_growing_backoff() -> None:
    gens, pool, _, timers = stepper(workers=1)
    ready(gens, pool)
    first = gens.slots[0]
    exit_of(gens, pool, first, 7 << 8)
    second = gens.slots[0]
    assert second.pid != first.pid and pool.totals.crashes == 1
    exit_of(gens, pool, second, 7 << 8)  # an early death: the slot waits
    assert 0 not in gens.slots
    due = timers.when(("respawn", 0))
    assert due is not None and 0.05 < due - time.monotonic() <= 0.1
    timers.run_due(due)
    assert 0 in gens.slots and gens.slots[0].pid not in (first.pid, second.pid)
    assert gens.backoff[0].failures == 2


def test_a_ready_worker_cancels_its_slots_pending_respawn() -> None:
    gens, pool, _, timers = stepper(workers=1)
    ready(gens, pool)
    die_early_twice(gens, pool)
    timers.run_due(timers.when(("respawn", 0)) or 0.0)
    ready(gens, pool)
    assert ("respawn", 0) not in timers


def test_a_worker_that_grew_past_the_memory_limit_has_the_master_look_now() -> None:
    gens, pool, _, _ = stepper(workers=2)
    ready(gens, pool)
    looks: list[str] = []
    gens.on_grown = lambda: looks.append("look")
    worker = gens.slots[1]
    gens.on_message(worker, Message(worker.pid, Event.GREW, str(70 * 2**20)))
    assert looks == ["look"]  # the periodic check's decision, taken now; the message itself replaces nothing
    assert gens.slots[1] is worker


def test_a_boot_error_before_serving_is_fatal() -> None:
    gens, pool, host, _ = stepper(workers=2)
    worker = gens.slots[0]
    gens.on_message(worker, Message(worker.pid, Event.BOOT_ERROR, "cannot load handler 'x:Y'"))
    exit_of(gens, pool, worker, WORKER_BOOT_ERROR << 8)
    assert host.events == ["fatal: the handler cannot be loaded, so no worker can serve"]


def test_retiring_starts_the_replacement_at_once_and_its_exit_is_expected() -> None:
    gens, pool, _, timers = stepper(workers=1)
    ready(gens, pool)
    old = gens.slots[0]
    gens.on_message(old, Message(old.pid, Event.RETIRING, "max-requests (50) reached"))
    assert gens.slots[0] is not old and pool.drained == [(old.pid, "max-requests (50) reached")]
    new = gens.slots[0]
    exit_of(gens, pool, old, 0)
    assert gens.slots[0] is new and 0 not in gens.backoff and ("respawn", 0) not in timers


def test_reload_commits_when_every_new_worker_is_ready_and_answers_after_the_old_stop() -> None:
    gens, pool, host, _ = stepper(workers=2)
    ready(gens, pool)
    old = dict(gens.slots)
    waiter = FakeWaiter()
    gens.begin_reload([waiter])
    reload = gens.reloads.in_flight
    assert reload is not None and reload.generation == 2 and len(reload.slots) == 2
    ready(gens, pool)
    assert gens.generation == 2 and gens.reloads.in_flight is None
    assert sorted(pid for pid, _ in pool.drained) == sorted(w.pid for w in old.values())
    assert waiter.replies == []  # the old workers still accept until they say STOPPED
    for worker in old.values():
        gens.reloads.stopped_accepting(worker.pid)
    assert len(waiter.replies) == 1
    reply = waiter.replies[0]
    assert {k: reply[k] for k in ("ok", "generation", "workers", "peak_workers")} == {
        "ok": True, "generation": 2, "workers": 2, "peak_workers": 4}
    assert 0 <= reply["serve_s"] < 5 and reply["listen_overflows"] >= 0 and reply["listen_drops"] >= 0
    assert host.events[-3:] == ["config", "listeners +0 -0", "ready"]


def test_a_new_worker_dying_aborts_the_reload_and_the_old_generation_serves_on() -> None:
    gens, pool, _, _ = stepper(workers=2)
    ready(gens, pool)
    old = dict(gens.slots)
    waiter = FakeWaiter()
    gens.begin_reload([waiter])
    reload = gens.reloads.in_flight
    assert reload is not None
    dying = reload.slots[1]
    gens.on_message(dying, Message(dying.pid, Event.BOOT_ERROR, "cannot load handler: SyntaxError"))
    exit_of(gens, pool, dying, WORKER_BOOT_ERROR << 8)
    assert waiter.replies == [{"ok": False, "error": "reload failed: cannot load handler: SyntaxError",
                               "verdict": "failed"}]
    assert gens.slots == old and gens.generation == 1 and gens.reloads.in_flight is None
    assert pool.drained == [(reload.slots[0].pid, "reload aborted")]


def test_queued_reloads_are_all_answered_when_the_follow_up_cannot_start(tmp_path: Any) -> None:
    config_file = tmp_path / "prefork.toml"
    config_file.write_text("workers = 1\n")
    timers = Timers()
    pool = FakePool(timers)
    host = FakeHost()
    gens = Generations(host, pool, timers, build_config({}, str(config_file)), [],  # type: ignore[arg-type]
                       cli_overrides={}, adopted=True)  # adopted: a reload binds nothing
    gens.start()
    ready(gens, pool)
    first, second, third = FakeWaiter(), FakeWaiter(), FakeWaiter()
    gens.begin_reload([first])
    config_file.write_text("workers = [broken\n")
    gens.begin_reload([second])
    gens.begin_reload([third])
    ready(gens, pool)  # the first reload commits; the follow-up re-reads the broken file
    for worker in pool.workers.values():
        gens.reloads.stopped_accepting(worker.pid)
    assert first.replies and first.replies[0]["ok"] is True
    for waiter in (second, third):
        assert len(waiter.replies) == 1 and waiter.replies[0]["ok"] is False
        assert waiter.replies[0]["error"].startswith("reload failed: ")


def test_stop_drains_every_worker_and_respawns_nothing() -> None:
    gens, pool, host, timers = stepper(workers=2)
    ready(gens, pool)
    die_early_twice(gens, pool)
    host.stopping = StopMode.GRACEFUL
    gens.stop_workers(StopMode.GRACEFUL)
    assert ("respawn", 0) not in timers and gens.slots == {}
    assert {pid for pid, reason in pool.drained if reason == "stopping"} == set(pool.workers)


def test_scale_up_and_down() -> None:
    gens, pool, _, _ = stepper(workers=2)
    ready(gens, pool)
    gens.scale(4)
    assert sorted(gens.slots) == [0, 1, 2, 3]
    gone = [gens.slots[2], gens.slots[3]]
    gens.scale(2)
    assert sorted(gens.slots) == [0, 1]
    assert [pid for pid, reason in pool.drained if reason == "scaled down"] == [w.pid for w in gone]


# -- commands and reports ---------------------------------------------------------------------------


def snapshot(**changes: Any) -> report.Snapshot:
    worker = report.WorkerSample(pid=11, slot=0, generation=1, state="ready", requests=5, active=2, errors=1,
                                 proxy_errors=0, bytes_in=10, bytes_out=20, rss_bytes=1 << 20, cpu_percent=1.25,
                                 age_s=3.14159, heartbeat_age_s=-0.001)
    base = report.Snapshot(pid=10, name="t", generation=1, uptime_s=2.0, state="serving", drain=None,
                           worker_class="thread", event_loop=None, handler="h:H", target_workers=1,
                           listeners=["127.0.0.1:1"], control="/c", workers=[worker],
                           backoff=[report.BackoffSample(slot=3, failures=2, restart_in_s=-1.0)],
                           totals=Totals(requests=100, bytes_in=1, errors=4))
    return dataclasses.replace(base, **changes)


def test_status_and_stats_shape_the_snapshot() -> None:
    status = report.status(snapshot())
    assert status["state"] == "serving" and status["workers"][0]["age_s"] == 3.142
    assert status["workers"][0]["heartbeat_age_s"] == 0.0 and status["workers"][0]["cpu_percent"] == 1.2
    assert status["backoff"] == [{"slot": 3, "failures": 2, "restart_in_s": 0.0}]
    stats = report.stats(snapshot())
    assert (stats["requests"], stats["active"], stats["errors"], stats["bytes_in"]) == (105, 2, 5, 11)
    assert stats["per_worker"] == [{"pid": 11, "slot": 0, "generation": 1, "state": "ready", "requests": 5,
                                    "active": 2, "errors": 1}]


def test_drain_progress_says_how_long_the_oldest_connection_has_been_silent() -> None:
    def sample(pid: int, active: int, silent: float, held: float) -> report.WorkerSample:
        return dataclasses.replace(snapshot().workers[0], pid=pid, state="draining", active=active,
                                   oldest_silent_s=silent, oldest_handler_s=held, stuck_handlers=active - 1)
    snap = snapshot(workers=[sample(11, 2, 7.4, 9.0), sample(12, 1, 2.0, 3.0), sample(13, 0, 99.0, 0.0)],
                    cut_in={11: 21.2, 12: 25.0})
    assert report.drain_progress(snap) == ["generation 1 draining: 3 worker(s) with 3 open connection(s), "
                                           "the oldest silent for 7s, 21s left before they are cut"]
    status = report.status(snap)
    assert [w["oldest_handler_s"] for w in status["workers"]] == [9.0, 3.0, 0.0]
    stats = report.stats(snap)
    assert (stats["oldest_handler_s"], stats["stuck_handlers"]) == (9.0, 0)  # a draining worker is not live


class FakeDaemon:
    pid = 10
    target = 2

    def __init__(self, state: str = "serving") -> None:
        self.state = state
        self.calls: list[tuple[str, Any]] = []

    def snapshot(self, *, processes: bool = True) -> report.Snapshot:
        return snapshot()

    def begin_reload(self, waiters: list[Any]) -> None:
        self.calls.append(("reload", waiters))

    def scale(self, count: int) -> None:
        self.calls.append(("scale", count))

    def begin_stop(self, mode: StopMode) -> None:
        self.calls.append(("stop", mode))

    def reopen_logs(self) -> None:
        self.calls.append(("reopen", None))

    def begin_upgrade(self, waiter: Any = None) -> None:
        self.calls.append(("upgrade", waiter))

    def drain_for_balancer(self, *, close: bool) -> LbDrain | None:
        self.calls.append(("drain", close))
        return LbDrain.LISTENERS_CLOSED

    def undrain(self) -> str | None:
        return "the listening sockets are closed; restart to serve again"

    def health_checks(self) -> list[str]:
        return []


@pytest.mark.parametrize(("request_", "state", "reply", "call"), [
    ({"command": "nope"}, "serving", {"ok": False}, None),
    ({"command": 3}, "serving", {"ok": False}, None),
    ({"command": "scale", "workers": 3}, "serving", {"ok": True, "workers": 3, "previous": 2}, ("scale", 3)),
    ({"command": "scale", "workers": True}, "serving", {"ok": False}, None),
    ({"command": "scale", "workers": 0}, "serving", {"ok": False}, None),
    ({"command": "scale", "workers": 5000}, "serving", {"ok": False}, None),
    ({"command": "scale", "workers": "2"}, "serving", {"ok": False}, None),
    ({"command": "scale", "workers": 3}, "stopping", {"ok": False, "error": "the daemon is stopping"}, None),
    ({"command": "scale", "workers": 3}, "reloading", {"ok": False}, None),
    ({"command": "scale", "by": 1}, "serving", {"ok": True, "workers": 3, "previous": 2}, ("scale", 3)),
    ({"command": "scale", "by": -1}, "serving", {"ok": True, "workers": 1, "previous": 2}, ("scale", 1)),
    ({"command": "scale", "by": -2}, "serving", {"ok": False}, None),
    ({"command": "stop"}, "serving", {"ok": True, "pid": 10, "stopping": "graceful"}, ("stop", StopMode.GRACEFUL)),
    ({"command": "stop", "fast": True}, "serving", {"ok": True, "stopping": "fast"}, ("stop", StopMode.FAST)),
    ({"command": "reopen"}, "serving", {"ok": True}, ("reopen", None)),
    ({"command": "drain", "close": True}, "serving", {"ok": True, "drain": "listeners-closed"}, ("drain", True)),
    ({"command": "drain", "off": True}, "serving", {"ok": False}, None),
    ({"command": "drain"}, "serving", {"ok": False}, None),  # no health check to fail
    ({"command": "drain", "off": {}, "close": "false"}, "serving", {"ok": False}, None),
    ({"command": "stop", "fast": "yes"}, "serving", {"ok": False}, None),
    ({"command": "status"}, "serving", {"ok": True, "name": "t", "state": "serving"}, None),
    ({"command": "stats"}, "serving", {"ok": True, "requests": 105}, None),
])
def test_command_table(request_: dict[str, Any], state: str, reply: dict[str, Any],
                       call: tuple[str, Any] | None) -> None:
    daemon = FakeDaemon(state)
    conn = FakeWaiter()
    commands.dispatch(daemon, request_, conn)  # type: ignore[arg-type]
    assert len(conn.replies) == 1
    assert reply.items() <= conn.replies[0].items(), conn.replies[0]
    assert daemon.calls == ([call] if call else [])


@pytest.mark.parametrize(("current", "request_", "result"), [
    (3, {"workers": 1}, 1),
    (3, {"workers": 3}, 3),
    (3, {"by": 1}, 4),
    (3, {"by": -2}, 1),
    (1, {"by": 1023}, 1024),
    (3, {"by": -3}, "scale: 3 worker(s) changed by -3 would be 0, not from 1 to 1024"),
    (1024, {"by": 1}, "scale: 1024 worker(s) changed by 1 would be 1025, not from 1 to 1024"),
    (3, {"by": 10**5000}, "scale: 3 worker(s) changed by <int> would be <int>, not from 1 to 1024"),
    (3, {"workers": 0}, "scale: workers must be a whole number from 1 to 1024, got 0"),
    (3, {"workers": 1025}, "scale: workers must be a whole number from 1 to 1024, got 1025"),
    (3, {"workers": "+1"}, "scale: workers must be a whole number, got '+1'"),
    (3, {"by": "+1"}, "scale: by must be a whole number, got '+1'"),
    (3, {"by": True}, "scale: by must be a whole number, got True"),
    (3, {"by": 1.0}, "scale: by must be a whole number, got 1.0"),
    (3, {}, "scale: give workers (a count) or by (a change), got workers=None, by=None"),
    (3, {"workers": 2, "by": 1}, "scale: give workers (a count) or by (a change), got workers=2, by=1"),
    (3, {"workers": None, "by": 1}, "scale: give workers (a count) or by (a change), got workers=None, by=1"),
    (3, {"by": None}, "scale: by must be a whole number, got None"),
])
def test_scale_target(current: int, request_: dict[str, Any], result: int | str) -> None:
    assert commands.scale_target(current, request_) == result


def test_every_command_the_client_knows_is_in_the_table() -> None:
    assert set(commands.COMMANDS) == {"status", "stats", "reload", "scale", "stop", "reopen", "drain", "upgrade"}


def test_a_retirement_read_after_the_worker_was_reaped_is_not_a_crash() -> None:
    """The master reaps first, then reads what the reaped workers wrote, then judges their exits."""
    gens, pool, _, timers = stepper(workers=1)
    ready(gens, pool)
    old = gens.slots[0]
    pool.exit(old)  # reaped before its RETIRING line was read
    gens.on_message(old, Message(old.pid, Event.RETIRING, "max-requests (50) reached"))
    gens.on_exit(old, 0)
    assert gens.slots[0] is not old and len(pool.workers) == 1
    assert pool.totals.crashes == 0 and pool.totals.respawns == 0
    assert 0 not in gens.backoff and ("respawn", 0) not in timers


def test_backoff_is_forgotten_once_a_worker_outlives_an_early_death() -> None:
    gens, pool, _, timers = stepper(workers=1)
    ready(gens, pool)
    die_early_twice(gens, pool)
    timers.run_due(timers.when(("respawn", 0)) or 0.0)
    ready(gens, pool)
    assert gens.backoff[0].failures == 2  # READY alone does not end it: a worker dying per connection backs off
    settled = timers.when(("settled", 0))
    assert settled is not None and settled == pytest.approx(gens.slots[0].started + EARLY_DEATH)
    timers.run_due(settled)
    assert 0 not in gens.backoff


def test_rolling_reload_replaces_a_batch_at_a_time_and_never_holds_more_than_w_plus_n() -> None:
    gens, pool, _, _ = stepper(workers=5, reload_batch=2)
    ready(gens, pool)
    old = {w.pid for w in gens.slots.values()}
    waiter = FakeWaiter()
    peak = len(pool.workers)
    gens.begin_reload([waiter])
    reload = gens.reloads.in_flight
    assert reload is not None
    steps = 0
    while gens.reloads.in_flight is reload:
        steps += 1
        assert steps < 10
        peak = max(peak, len(pool.workers))
        assert sorted(reload.slots) == list(range(reload.started))
        ready(gens, pool)  # the batch serves: the old workers it replaces drain
        peak = max(peak, len(pool.workers))
        for pid in sorted(reload.retiring):  # ... and exit; then the next batch starts
            worker = pool.workers[pid]
            pool.exit(worker)
            gens.on_exit(worker, 0)
    assert steps == 3  # 2 + 2 + 1
    assert peak <= 5 + 2
    assert gens.generation == 2 and sorted(gens.slots) == [0, 1, 2, 3, 4]
    assert not {w.pid for w in gens.slots.values()} & old
    for pid in old:
        gens.reloads.stopped_accepting(pid)
    assert len(waiter.replies) == 1
    assert waiter.replies[0]["generation"] == 2 and waiter.replies[0]["peak_workers"] == peak == 7


@pytest.mark.parametrize("batch", [1, 2])
def test_a_reload_queued_behind_a_rolling_one_keeps_the_peak_bound(batch: int) -> None:
    """The second reload starts when the first commits, while the first's last old workers still drain:
    those count towards W + N, so its first batch waits for them."""
    gens, pool, _, _ = stepper(workers=4, reload_batch=batch)
    ready(gens, pool)
    first, second = FakeWaiter(), FakeWaiter()
    gens.begin_reload([first])
    gens.begin_reload([second])  # queued behind the first
    peak = len(pool.workers)
    for _ in range(20):
        ready(gens, pool)
        peak = max(peak, len(pool.workers))
        reload = gens.reloads.in_flight
        if reload is None:
            break
        # the old workers exit once told to drain, oldest first, one step at a time
        draining = [w for w in pool.workers.values() if w.state is WorkerState.DRAINING]
        for worker in draining[:batch]:
            pool.exit(worker)
            gens.on_exit(worker, 0)
        peak = max(peak, len(pool.workers))
    assert gens.generation == 3 and all(w.generation == 3 for w in gens.slots.values())
    assert peak <= 4 + batch, peak


def test_an_aborted_rolling_reload_refills_the_slots_it_emptied() -> None:
    gens, pool, _, _ = stepper(workers=4, reload_batch=2)
    ready(gens, pool)
    gens.begin_reload([FakeWaiter()])
    reload = gens.reloads.in_flight
    assert reload is not None
    ready(gens, pool)  # the first batch serves; two old workers drain
    for pid in sorted(reload.retiring):
        worker = pool.workers[pid]
        pool.exit(worker)
        gens.on_exit(worker, 0)
    assert reload.started == 4
    dying = reload.slots[3]
    exit_of(gens, pool, dying, 1 << 8)  # a worker of the second batch dies while starting
    assert gens.reloads.in_flight is None and gens.generation == 1
    assert sorted(gens.slots) == [0, 1, 2, 3]
    assert all(w.generation == 1 for w in gens.slots.values())


# -- hardening: exit reasons, the error budget, the client caps --------------------------------------------------


@pytest.mark.parametrize(("status", "sent", "text"), [
    (signal.SIGKILL, {}, "was killed by SIGKILL (out of memory?)"),  # not ours: the kernel's OOM killer, usually
    (signal.SIGKILL, {signal.SIGKILL: "still busy 30s after it was told to stop (--graceful-timeout)"},
     "was killed by SIGKILL (sent by the master: still busy 30s after it was told to stop (--graceful-timeout))"),
    (signal.SIGABRT, {signal.SIGABRT: "no heartbeat for 31.0s, over --timeout; its stacks are in the log"},
     "was killed by SIGABRT (sent by the master: no heartbeat for 31.0s, over --timeout; its stacks are in the log)"),
    # we sent SIGABRT, but something else sent the SIGKILL that ended it
    (signal.SIGKILL, {signal.SIGABRT: "no heartbeat"}, "was killed by SIGKILL (out of memory?)"),
    (7 << 8, {signal.SIGKILL: "x"}, "exited with status 7"),
])
def test_describe_exit_says_when_the_master_sent_the_signal(status: int, sent: dict[int, str], text: str) -> None:
    assert describe_exit(status, sent) == (text, False)


@pytest.mark.parametrize(("status", "boot_error", "oom_kills", "text"), [
    (WORKER_BOOT_ERROR << 8, True, 0, "could not load its handler"),
    (WORKER_BOOT_ERROR << 8, False, 0, "exited with status 3"),
    (signal.SIGKILL, False, 0, "was killed by SIGKILL (not by the master, nor the kernel's OOM killer)"),
    (signal.SIGKILL, False, 2, "was killed by SIGKILL (out of memory: the kernel's OOM killer ran meanwhile)"),
    (signal.SIGKILL, False, None, "was killed by SIGKILL (out of memory?)"),
])
def test_describe_exit_blames_only_what_is_plausible(status: int, boot_error: bool, oom_kills: int | None,
                                                     text: str) -> None:
    assert describe_exit(status, {}, boot_error=boot_error, oom_kills=oom_kills) == (text, False)


def test_the_error_budget_logs_a_burst_then_counts_what_it_left_out() -> None:
    from prefork.master.state import ErrorBudget

    budget = ErrorBudget(per_window=3, window=60.0)
    assert [budget.admit(100.0 + i) for i in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    assert budget.admit(159.9) == (False, 0)
    assert budget.admit(160.0) == (True, 3)  # a new window: the three left out are reported once
    assert budget.admit(161.0) == (True, 0)


@pytest.mark.parametrize(("limit", "in_use", "caps"), [
    (-1, 20, (64, 32)),  # no limit
    (1024, 20, (64, 32)),
    (65536, 40, (64, 32)),
    (64, 20, (6, 6)),  # prlimit --nofile=64: what is left after the reserve, halved
    (40, 30, (1, 1)),  # never none
])
def test_client_caps_fit_the_descriptor_limit(limit: int, in_use: int, caps: tuple[int, int]) -> None:
    from prefork.master.loop import client_caps

    assert client_caps(limit, in_use) == caps


# -- molds: a generation's workers wait for its mold; a mold ends with its generation ---------------------


class FakeMolds:
    """Molds without processes: the test says when one is loaded, and how."""

    def __init__(self) -> None:
        self.by_generation: dict[int, Mold] = {}
        self.pids = itertools.count(9000)
        self.ended: list[int] = []

    def start(self, generation: int, config: Any, listeners: Any, **_: Any) -> Mold:
        mold = Mold(pid=next(self.pids), generation=generation, sock=None, started=0.0)  # type: ignore[arg-type]
        self.by_generation[generation] = mold
        return mold

    def fork_worker(self, mold: Mold, slot: int, record_index: int, max_requests: int) -> int:
        raise AssertionError("FakePool forks")

    def end(self, mold: Mold, *, kill: bool = False) -> None:
        mold.state = MoldState.FAILED
        self.by_generation.pop(mold.generation, None)
        self.ended.append(mold.generation)

    def loaded(self, mold: Mold, how: str | None = "exited") -> None:
        raise AssertionError("not reached: the test says how a mold loaded")


def mold_stepper(workers: int = 2) -> tuple[Generations, FakePool, FakeHost, FakeMolds]:
    timers = Timers()
    pool = FakePool(timers)
    host = FakeHost()
    molds = FakeMolds()
    gens = Generations(host, pool, timers, build_config({"workers": workers}), [],  # type: ignore[arg-type]
                       cli_overrides={}, adopted=True, molds=molds)  # type: ignore[arg-type]
    gens.start()
    return gens, pool, host, molds


def load(gens: Generations, mold: Mold, error: str = "") -> None:
    mold.state, mold.error = (MoldState.FAILED, error) if error else (MoldState.READY, "")
    gens.molding.on_loaded(mold)


def test_a_generation_s_workers_are_forked_once_its_mold_has_loaded() -> None:
    gens, pool, host, molds = mold_stepper(workers=3)
    assert list(molds.by_generation) == [1] and pool.workers == {}
    assert molds.by_generation[1].waiting == {0, 1, 2}
    load(gens, molds.by_generation[1])
    assert sorted(w.slot for w in pool.workers.values()) == [0, 1, 2]
    ready(gens, pool)
    assert host.events == ["serving"]


def test_a_mold_that_cannot_load_at_start_stops_the_daemon() -> None:
    gens, pool, host, molds = mold_stepper()
    load(gens, molds.by_generation[1], "cannot load handler 'app:H': SyntaxError")
    assert host.events == ["fatal: the handler cannot be loaded, so no worker can serve"]
    assert pool.workers == {} and molds.ended == [1]


def test_a_reload_starts_a_mold_and_the_old_one_ends_with_its_last_worker() -> None:
    gens, pool, _host, molds = mold_stepper()
    load(gens, molds.by_generation[1])
    ready(gens, pool)
    old = list(pool.workers.values())
    waiter = FakeWaiter()
    gens.begin_reload([waiter])
    assert sorted(molds.by_generation) == [1, 2] and len(pool.workers) == 2  # nothing forked before it loads
    load(gens, molds.by_generation[2])
    ready(gens, pool)  # generation 2 serves: the old workers drain
    assert gens.generation == 2 and 1 in molds.by_generation  # still has workers
    exit_of(gens, pool, old[0], 0)
    assert 1 in molds.by_generation
    exit_of(gens, pool, old[1], 0)
    assert list(molds.by_generation) == [2] and molds.ended == [1]


def test_a_reload_whose_mold_cannot_load_fails_and_the_old_generation_keeps_its_mold() -> None:
    gens, pool, _host, molds = mold_stepper()
    load(gens, molds.by_generation[1])
    ready(gens, pool)
    before = dict(gens.slots)
    waiter = FakeWaiter()
    gens.begin_reload([waiter])
    load(gens, molds.by_generation[2], "cannot load handler 'app:H': SyntaxError")
    assert waiter.replies == [{"ok": False, "error": "reload failed: cannot load handler 'app:H': SyntaxError",
                               "verdict": "failed"}]
    assert gens.slots == before and gens.generation == 1 and list(molds.by_generation) == [1]
    # a worker of generation 1 that dies now is forked by generation 1's mold again
    exit_of(gens, pool, gens.slots[0], 1 << 8)
    assert gens.slots[0].generation == 1 and list(molds.by_generation) == [1]


def canary_ready(gens: Generations, pool: FakePool) -> tuple[FakeWaiter, Reload, dict[int, Worker]]:
    """Generation 1 serves, then a reload begins and its canary is ready: the reload's waiter, the reload,
    and generation 1's slots as they were."""
    ready(gens, pool)
    old = dict(gens.slots)
    waiter = FakeWaiter()
    gens.begin_reload([waiter])
    ready(gens, pool)
    reload = gens.reloads.in_flight
    assert reload is not None
    return waiter, reload, old


def canary_served(gens: Generations, pool: FakePool, connections: int, errors: int, old: int) -> None:
    """The canary handled ``connections`` (``errors`` raised KeyError), each old worker ``old``, since it began."""
    reload = gens.reloads.in_flight
    assert reload is not None and reload.window is not None
    canary = pool.record(reload.slots[0])
    canary.requests += connections
    canary.errors += errors
    canary.error_type = b"KeyError" if errors else b""
    for worker in gens.slots.values():
        pool.record(worker).requests += old


def test_a_canary_that_does_worse_is_rolled_back_and_the_old_generation_is_untouched() -> None:
    gens, pool, _, timers = stepper(workers=3, reload_canary=2)
    waiter, reload, old = canary_ready(gens, pool)
    assert sorted(reload.slots) == [0]  # the canary alone
    ends = timers.when("canary")
    assert reload.window is not None and ends == reload.window.ends and sorted(reload.slots) == [0]
    canary_served(gens, pool, connections=41, errors=37, old=70)
    timers.run_due(ends)
    assert waiter.replies[0]["error"] == ("reload failed: canary: 37 of 41 connections raised KeyError "
                                          "(old generation: 0 of 210); still serving generation 1")
    assert waiter.replies[0]["verdict"] == "rolled_back" and waiter.replies[0]["canary"]["errors"] == 37
    assert gens.slots == old and gens.generation == 1 and gens.reloads.in_flight is None
    assert all(w.state is WorkerState.READY for w in old.values())
    assert pool.drained == [(reload.slots[0].pid, "reload rolled back")]
    assert pool.totals.rolled_back_reloads == 1 and pool.totals.failed_reloads == 0


def test_a_canary_that_dies_is_rolled_back_at_once() -> None:
    gens, pool, _, timers = stepper(workers=2, reload_canary=2)
    waiter, reload, old = canary_ready(gens, pool)
    exit_of(gens, pool, reload.slots[0], 1 << 8)
    assert waiter.replies[0]["error"].startswith(
        "reload failed: canary: its worker exited with status 1 after 0 connection(s)"), waiter.replies
    assert gens.slots == old and timers.when("canary") is None and not gens.backoff


def test_a_canary_that_passes_counts_as_the_first_batch_of_a_rolling_reload() -> None:
    gens, pool, _, timers = stepper(workers=4, reload_batch=2, reload_canary=1)
    waiter, reload, _old = canary_ready(gens, pool)
    canary_served(gens, pool, connections=50, errors=1, old=50)
    old0 = gens.slots[0]
    timers.run_due(timers.when("canary") or 0.0)
    assert reload.window is not None and reload.window.verdict == "passed"
    assert old0.state is WorkerState.DRAINING and reload.retiring == {old0.pid}  # the canary took its place
    peak = len(pool.workers)
    for _ in range(10):
        if gens.reloads.in_flight is None:
            break
        for pid in sorted(reload.retiring):
            exit_of(gens, pool, pool.workers[pid], 0)
        ready(gens, pool)
        peak = max(peak, len(pool.workers))
    assert gens.generation == 2 and sorted(gens.slots) == [0, 1, 2, 3] and peak <= 4 + 2
    for worker in list(pool.workers.values()):
        gens.reloads.stopped_accepting(worker.pid)
    assert waiter.replies[0]["verdict"] == "committed" and waiter.replies[0]["canary"]["connections"] == 50
