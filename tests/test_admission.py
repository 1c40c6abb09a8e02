"""The admission core's decisions, by table: no sockets, no processes (prefork.workers.admission)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from prefork.scoreboard import SOURCE_BUCKETS, Scoreboard, SourceCounts, source_buckets
from prefork.workers.admission import (
    MIN_SILENCE,
    Admission,
    Policy,
    Reason,
    Sample,
    Stage,
    Tracked,
    drain_idle_expired,
    held_too_long,
    idle_expired,
    observe,
    over_source_limit,
    received_over_window,
    reclaim_victim,
    silence_limit,
    source_key,
    tick_interval,
)


@pytest.mark.parametrize(("address", "key"), [
    (("127.0.0.2", 5000), "127.0.0.2"),
    (("10.1.2.3", 1), "10.1.2.3"),
    (("::ffff:10.1.2.3", 1, 0, 0), "10.1.2.3"),  # IPv4-mapped: the IPv4 address
    (("2001:db8:1:2:3:4:5:6", 1, 0, 0), "2001:db8:1:2::/64"),  # IPv6 by its /64
    (("2001:db8:1:2:ffff::1", 1, 0, 0), "2001:db8:1:2::/64"),  # the same /64
    (("2001:db8:1:3::1", 1, 0, 0), "2001:db8:1:3::/64"),
    (("fe80::1%eth0", 1, 0, 2), "fe80::/64"),  # a scope is no part of the source
    ("/run/app.sock", None),  # a Unix peer: not counted per source
    ("", None),
    (None, None),
    (("not an ip", 1), None),
])
def test_source_key(address: Any, key: str | None) -> None:
    assert source_key(address) == key


@pytest.mark.parametrize(("open_now", "limit", "over"), [
    (0, 0, False), (10_000, 0, False),  # 0: no limit
    (0, 8, False), (7, 8, False), (8, 8, True), (9, 8, True), (1, 1, True),
])
def test_over_source_limit(open_now: int, limit: int, over: bool) -> None:
    assert over_source_limit(open_now, Policy(max_per_source=limit)) is over


def conn(since: float = 0.0, received: int = 0, active: float = 0.0) -> Tracked:
    return Tracked(Stage.HANDLER, since, received=received, active=active)


def test_observe_tracks_activity_and_the_window() -> None:
    c = conn()
    for t, n in [(1, 0), (2, 5), (3, 5), (14, 5), (15, 9)]:
        observe(c, Sample(n), float(t), 10.0)
    assert c.received == 9 and c.active == 15.0
    assert received_over_window(c, 15.0, 10.0) == 4  # from 5 at t=3 (the last sample at or before t=5)
    observe(c, Sample(None), 16.0, 10.0)  # unknown (a Unix socket): nothing learnt
    assert c.received == 9 and c.active == 15.0


@pytest.mark.parametrize(("idle_timeout", "last_active", "now", "on_client", "expired"), [
    (0, 0.0, 1e6, True, False),  # 0: never
    (60, 0.0, 59.9, True, False),
    (60, 0.0, 60.0, True, True),
    (60, 0.0, 600.0, False, False),  # its handler is working: not idle
    (60, 50.0, 100.0, True, False),  # spoke at 50
    (2, 0.0, 2.5, True, True),
])
def test_idle_expired(idle_timeout: float, last_active: float, now: float, on_client: bool, expired: bool) -> None:
    c = conn(active=last_active)
    assert idle_expired(c, Sample(0, on_client), now, Policy(idle_timeout=idle_timeout)) is expired


@pytest.mark.parametrize(("conns", "on_client", "victim"), [
    # key: (since, received, active, bytes at the window's start); now = 100, window 10
    ({}, {}, None),
    ({"a": (0, 0, 0, 0)}, {"a": True}, "a"),
    ({"a": (0, 0, 0, 0)}, {"a": False}, None),  # working: never reclaimed
    ({"silent": (0, 10, 50, 10), "talker": (0, 900, 99, 100)}, {"silent": True, "talker": True}, "silent"),
    # a trickle (2 bytes in the window) goes before a talker, after a silent one
    ({"trickle": (0, 12, 98, 10), "talker": (0, 900, 99, 100), "silent": (0, 5, 20, 5)},
     {"trickle": True, "talker": True, "silent": True}, "silent"),
    ({"trickle": (0, 12, 98, 10), "talker": (0, 900, 99, 100)}, {"trickle": True, "talker": True}, "trickle"),
    # equally quiet: the one silent longest
    ({"x": (0, 3, 40, 3), "y": (0, 3, 30, 3)}, {"x": True, "y": True}, "y"),
    # spoke within MIN_SILENCE: not taken for an idle one
    ({"fresh": (99.9, 0, 99.9, 0)}, {"fresh": True}, None),
    ({"quiet": (0, 0, 0, 0), "working": (0, 0, 0, 0)}, {"quiet": True, "working": False}, "quiet"),
])
def test_reclaim_victim(conns: dict[str, tuple[float, int, float, int]], on_client: dict[str, bool],
                        victim: str | None) -> None:
    now, window = 100.0, 10.0
    tracked = {}
    for key, (since, received, active, at_start) in conns.items():
        c = conn(since, received, active)
        c.samples = [(now - window, at_start)]
        tracked[key] = c
    asked: list[str] = []

    def waits(key: Any) -> bool:
        asked.append(key)
        return on_client[key]

    assert reclaim_victim(tracked, waits, now, Policy(reclaim_window=window)) == victim
    if victim is not None:
        assert asked[-1] == victim  # the threads of quieter ones only, then the victim's: no more


def test_tick_interval() -> None:
    assert tick_interval(Policy(idle_timeout=60)) == 1.0
    assert tick_interval(Policy(idle_timeout=2)) == 0.5
    assert tick_interval(Policy(idle_timeout=0)) == 1.0
    # the drain's limit counts only while draining; the handler timeout always; the async class's cap is 5 s
    assert tick_interval(Policy(idle_timeout=60, drain_idle=1)) == 1.0
    assert tick_interval(Policy(idle_timeout=60, drain_idle=1), draining=True) == 0.25
    assert tick_interval(Policy(idle_timeout=0, drain_idle=0), draining=True) == 1.0
    assert tick_interval(Policy(idle_timeout=0, handler_timeout=2)) == 0.5
    assert tick_interval(Policy(idle_timeout=0, handler_timeout=60), most=5.0) == 5.0


@pytest.mark.parametrize(("idle", "drain", "draining", "limit"), [
    (60, 5, False, 60), (60, 5, True, 5), (2, 5, True, 2), (0, 5, False, 0), (0, 5, True, 5),
    (60, 0, True, 60), (0, 0, True, 0),
])
def test_silence_limit(idle: float, drain: float, draining: bool, limit: float) -> None:
    assert silence_limit(Policy(idle_timeout=idle, drain_idle=drain), draining) == limit


@pytest.mark.parametrize(("drain_idle", "last_active", "now", "on_client", "unsent", "expired"), [
    (1.0, 0.0, 0.9, True, False, False),  # not silent long enough
    (1.0, 0.0, 1.0, True, False, True),
    (1.0, 0.0, 50.0, True, True, False),  # something left to send: a busy connection
    (1.0, 0.0, 50.0, False, False, False),  # the handler works: busy
    (0.0, 0.0, 50.0, True, False, False),  # 0: never
])
def test_drain_idle_expired(drain_idle: float, last_active: float, now: float, on_client: bool, unsent: bool,
                            expired: bool) -> None:
    c = conn(since=last_active, active=last_active)
    assert drain_idle_expired(c, Sample(0, on_client=on_client, unsent=unsent), now,
                              Policy(drain_idle=drain_idle)) is expired


def test_drain_idle_counts_the_kernels_silence_of_a_connection_queued_before_accept() -> None:
    c = conn(since=10.0, active=10.0)  # accepted at 10, after waiting in the queue since its handshake at 2
    assert drain_idle_expired(c, Sample(0, silent_for=8.5), 10.5, Policy(drain_idle=5))
    assert not drain_idle_expired(c, Sample(0, silent_for=0.5), 10.5, Policy(drain_idle=5))
    assert not drain_idle_expired(c, Sample(0), 10.5, Policy(drain_idle=5))  # unknown: since accept()


@pytest.mark.parametrize(("timeout", "since", "active", "quiet_for", "now", "stuck"), [
    (10.0, 0.0, 0.0, None, 9.0, False),  # held less than the timeout
    (10.0, 0.0, 0.0, None, 10.0, True),  # held that long, nothing received since it began
    (10.0, 0.0, 0.0, 2.0, 30.0, False),  # it sent a byte 2 s ago: exchanging, busy
    (10.0, 0.0, 25.0, 5.0, 30.0, False),  # received 5 s ago
    (10.0, 0.0, 15.0, 15.0, 30.0, True),  # nothing either way for 15 s
    (0.0, 0.0, 0.0, None, 1e6, False),  # off
])
def test_held_too_long(timeout: float, since: float, active: float, quiet_for: float | None, now: float,
                       stuck: bool) -> None:
    c = conn(since=since, active=active)
    assert held_too_long(c, Sample(0, quiet_for=quiet_for), now, Policy(handler_timeout=timeout)) is stuck


def test_draining_closes_silent_ones_and_keeps_busy_ones() -> None:
    counts = Counts()
    a = Admission(Policy(idle_timeout=60, drain_idle=2), counts, clock=lambda: 0.0)
    a.wait("queued", 0.0)
    for key in ("silent", "sending", "working", "talker"):
        a.handed(key, 0.0)
    assert not Admission(Policy(idle_timeout=0, drain_idle=2), counts).watching()  # no tick before a drain
    received = {"silent": Sample(3), "sending": Sample(3, unsent=True), "working": Sample(3), "talker": Sample(5)}
    assert a.tick(5.0, received, lambda k: k != "working") == []  # not draining: 60 s applies
    assert a.next_deadline() == 60.0
    a.drain()
    assert a.next_deadline() == 2.0
    received["talker"] = Sample(9)  # it spoke at 10
    assert a.tick(10.0, received, lambda k: k != "working") == ["queued", "silent"]
    assert counts.by_reason == {Reason.DRAIN_IDLE: 2}
    assert sorted(map(str, a.handling)) == ["sending", "talker", "working"]
    a.wait("late", 10.0)
    assert a.tick(15.0, {"talker": Sample(9)}, lambda k: True) == ["late", "talker"]
    assert counts.by_reason == {Reason.DRAIN_IDLE: 4}
    # an idle timeout shorter than the drain's still counts as the idle timeout
    b = Admission(Policy(idle_timeout=3, drain_idle=5), counts, clock=lambda: 0.0)
    b.drain()
    b.wait("x", 0.0)
    b.handed("y", 0.0)
    assert b.tick(4.0, {"y": Sample(0)}, lambda k: True) == ["x", "y"]
    assert counts.by_reason == {Reason.DRAIN_IDLE: 4, Reason.IDLE_TIMEOUT: 2}


def test_stuck_handlers_are_told_once() -> None:
    counts = Counts()
    a = Admission(Policy(idle_timeout=0, handler_timeout=10), counts, clock=lambda: 0.0)
    a.handed("asleep", 0.0)
    a.handed("reading", 0.0)  # waits on its silent client: idle, not stuck
    a.handed("chatty", 0.0)
    assert a.watching()
    assert a.oldest_held_since() == 0.0
    def received(t: float) -> dict[str, Sample]:
        return {"asleep": Sample(4, silent_for=t, quiet_for=t), "reading": Sample(4, silent_for=t, quiet_for=t),
                "chatty": Sample(int(t) * 10, quiet_for=0.0)}
    waits = {"asleep": False, "reading": True, "chatty": False}
    assert a.stuck(9.0, received(9.0), waits.__getitem__) == []
    a.tick(12.0, received(12.0), waits.__getitem__)
    assert a.stuck(12.0, received(12.0), waits.__getitem__) == ["asleep"]
    assert a.stuck(30.0, received(30.0), waits.__getitem__) == []  # once
    assert counts.by_reason == {Reason.HANDLER_TIMEOUT: 1}
    assert "asleep" in a.handling  # tracked until its handler returns
    a.forget("asleep")
    a.handed("asleep", 31.0)  # the same key for a new connection: told again when it gets stuck
    assert a.stuck(45.0, {"asleep": Sample(0, quiet_for=14.0)}, waits.__getitem__) == ["asleep"]


class Counts:
    def __init__(self) -> None:
        self.by_reason: dict[Reason, int] = {}

    def __call__(self, reason: Reason) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


def test_waiting_connections_expire_oldest_first() -> None:
    counts = Counts()
    a = Admission(Policy(idle_timeout=10), counts, clock=lambda: 0.0)
    for i, t in enumerate([0.0, 1.0, 2.0, 30.0]):
        a.wait(i, t)
    assert a.next_deadline() == 10.0
    assert a.tick(11.5, {}, lambda k: True) == [0, 1]
    assert counts.by_reason == {Reason.IDLE_TIMEOUT: 2}
    assert a.next_deadline() == 12.0
    a.handed(2, 12.0)  # its first bytes arrived: a handler has it
    assert a.next_deadline() == 40.0
    assert a.oldest_waiting() == 3


def samples(**received: int) -> dict[str, Sample]:
    return {key: Sample(n) for key, n in received.items()}


def test_silence_from_the_kernel() -> None:
    c = conn(since=0.0)
    observe(c, Sample(10, silent_for=4.0), 10.0, 10.0)  # the bytes came at 6, seen at 10
    assert c.active == 6.0
    observe(c, Sample(10, silent_for=9.0), 15.0, 10.0)  # nothing new: unchanged
    assert c.active == 6.0


def test_handled_connections_idle_and_reclaimed() -> None:
    counts = Counts()
    a = Admission(Policy(idle_timeout=60, reclaim_window=10), counts, clock=lambda: 0.0)
    a.handed("quiet", 0.0)
    a.handed("busy", 0.0)
    a.handed("talker", 0.0)
    for t in range(1, 20):
        assert a.tick(float(t), samples(quiet=3, busy=0, talker=t * 100), lambda k: k != "busy") == []
    assert a.any_reclaimable(20.0, lambda k: k != "busy")
    assert a.make_room(20.0, samples(quiet=3, busy=0, talker=1900), lambda k: k != "busy") == "quiet"
    assert counts.by_reason == {Reason.RECLAIMED: 1}
    # only the working one and the talker are left; the talker goes next, the working one never
    assert a.make_room(20.0, samples(busy=0, talker=1900), lambda k: k != "busy") == "talker"
    assert a.make_room(20.0, samples(busy=0), lambda k: k != "busy") is None
    assert not a.any_reclaimable(20.0, lambda k: k != "busy")
    # the idle timeout never takes a working handler's connection either
    assert a.tick(100.0, samples(busy=0), lambda k: False) == []
    assert a.tick(100.0, samples(busy=0), lambda k: True) == ["busy"]


def test_reclaim_off_never_takes_a_connection() -> None:
    """--reclaim-idle-after 0: under pressure nothing is closed to make room (the idle timeout still is)."""
    counts = Counts()
    a = Admission(Policy(idle_timeout=60, reclaim_window=0), counts, clock=lambda: 0.0)
    a.wait("waiting", 0.0)
    a.handed("quiet", 0.0)
    assert a.tick(30.0, samples(quiet=0), lambda k: True) == []
    assert not a.any_reclaimable(30.0, lambda k: True)
    assert a.make_room(30.0, samples(quiet=0), lambda k: True) is None
    assert a.oldest_waiting() is None  # out of descriptors: no waiting one gives way either
    assert counts.by_reason == {}
    assert sorted(map(str, a.tick(60.0, samples(quiet=0), lambda k: True))) == ["quiet", "waiting"]
    assert counts.by_reason == {Reason.IDLE_TIMEOUT: 2}


def test_closes_are_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    counts = Counts()
    a = Admission(Policy(), counts, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="prefork.workers.admission"):
        for _ in range(500):
            a.closing(None, Reason.PER_SOURCE)
        now[0] = 11.0
        a.flush_log(now[0])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["closed 1 connection(s): over the per-source connection limit (--max-connections-per-source)",
                     "closed 499 connection(s): over the per-source connection limit (--max-connections-per-source)"]
    assert counts.by_reason == {Reason.PER_SOURCE: 500}


def test_min_silence_is_short_of_a_probe_deadline() -> None:
    assert MIN_SILENCE < 1.0  # a probe waits at most a second for its place


def test_source_counts_are_shared_across_records() -> None:
    board = Scoreboard(4)
    i, j = board.allocate(100, 1, 0.0), board.allocate(101, 1, 0.0)
    mine, sibling = SourceCounts(board, i), SourceCounts(board, j)
    for _ in range(3):
        mine.add("127.0.0.5", 1)
    sibling.add("127.0.0.5", 1)
    assert mine.count("127.0.0.5") == sibling.count("127.0.0.5") == 4
    assert mine.count("127.0.0.6") <= 4  # another source: at most what shares both its buckets
    mine.add("127.0.0.5", -3)
    assert sibling.count("127.0.0.5") == 1
    board.release(j)  # a gone worker's connections count no more
    assert mine.count("127.0.0.5") == 0
    a, b = source_buckets("10.0.0.1")
    assert 0 <= a < SOURCE_BUCKETS and 0 <= b < SOURCE_BUCKETS and source_buckets("10.0.0.1") == (a, b)
