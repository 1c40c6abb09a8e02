"""RateLimitedLog: at most one line per interval from a call site clients can repeat, with a count.

The policy is stepped with a fake clock; a real daemon shows that 2,000 bad
control requests make a line or two, not 2,000.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from test_control import raw_exchange

from conftest import Daemon, wait_for
from prefork import logs
from prefork.logs import RateLimitedLog

LOG = "prefork.test.ratelimit"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# (seconds after the start at which a line is asked for, what is written: None for held back)
@pytest.mark.parametrize(("times", "written"), [
    ([0.0], ["bad 0"]),
    ([0.0, 1.0, 2.0], ["bad 0", None, None]),
    ([0.0, 1.0, 2.0, 10.0], ["bad 0", None, None, "bad 3 (and 2 more like it in the last 10s, not logged)"]),
    ([0.0, 9.99, 10.0, 10.5, 25.0], ["bad 0", None, "bad 2 (and 1 more like it in the last 10s, not logged)", None,
                                     "bad 4 (and 1 more like it in the last 10s, not logged)"]),
    ([0.0, 10.0, 20.0], ["bad 0", "bad 1", "bad 2"]),  # one per interval: never a count of zero
])
def test_one_line_per_interval_then_the_count(caplog: pytest.LogCaptureFixture, times: list[float],
                                              written: list[str | None]) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger(LOG), interval=10.0, clock=clock)
    start = clock.now
    seen: list[str | None] = []
    with caplog.at_level(logging.INFO, logger=LOG):
        for i, t in enumerate(times):
            clock.now = start + t
            before = len(caplog.records)
            assert limited.warning("bad %d", i) is (written[i] is not None)
            seen.append(caplog.records[-1].getMessage() if len(caplog.records) > before else None)
    assert seen == written
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_what_a_finished_flood_held_back_is_written_once_its_interval_is_over(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger(LOG), interval=10.0, clock=clock)
    start = clock.now
    with caplog.at_level(logging.INFO, logger=LOG):
        for i in range(5):
            clock.now = start + i
            limited.warning("bad %d", i)
        limited.flush()  # 4 s in: the interval is not over
        assert [r.getMessage() for r in caplog.records] == ["bad 0"]
        clock.now = start + 10.0
        limited.flush()
        limited.flush()  # written once
        clock.now = start + 30.0
        limited.flush()  # nothing held since
        assert limited.warning("bad %d", 5) is True  # a new flood starts with a line of its own
    assert [r.getMessage() for r in caplog.records] == [
        "bad 0", "bad 4 (and 3 more like it in the last 10s, not logged)", "bad 5"]


def test_flush_held_reaches_every_limiter(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    one, two = (RateLimitedLog(logging.getLogger(LOG), interval=10.0, clock=clock) for _ in range(2))
    with caplog.at_level(logging.INFO, logger=LOG):
        for limited in (one, two):
            limited.warning("first")
            limited.warning("second")
        clock.now += 10.0
        logs.flush_held()
    assert [r.getMessage() for r in caplog.records if r.name == LOG] == ["first", "first", "second", "second"]


def test_keys_are_limited_apart_and_a_silenced_level_counts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger(LOG), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert limited.info("below the level") is False  # not written, and not held against the next line
        assert limited.warning("on %s", "a", key="a") is True
        assert limited.warning("on %s", "b", key="b") is True
        assert limited.warning("on %s", "a", key="a") is False
        assert limited.held("a") == 1 and limited.held("b") == 0
    assert [r.getMessage() for r in caplog.records] == ["on a", "on b"]


def test_bounded_keys(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger(LOG), interval=10.0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger=LOG):
        for key in range(RateLimitedLog.MAX_KEYS * 3):
            assert limited.warning("k", key=key) is True
    assert len(limited._state) <= RateLimitedLog.MAX_KEYS


@pytest.mark.timeout(120)
def test_a_flood_of_bad_control_requests_is_a_line_or_two(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    sent, deadline = 0, time.monotonic() + 60.0
    while sent < 2000 and time.monotonic() < deadline:
        reply = raw_exchange(d.control, b"\x00\x00\x00\x05{bad}")
        assert reply is not None and reply["ok"] is False
        sent += 1
    assert sent >= 200, f"only {sent} requests in 60s"
    assert d.call("status")["ok"] is True  # still answering, and the log line of the flood is written
    lines = [line for line in d.log().splitlines() if "control socket: bad request" in line]
    # one line at the start, and one per 10 s the flood lasted at most (each with the count held back)
    assert 1 <= len(lines) <= 7, lines
    assert "WARNING" in lines[0]
    # what was held back is written with its count once the interval is over, even with no request after it
    wait_for(lambda: any("bad request" in line and " more like it in the last 10s, not logged)" in line
                         for line in d.log().splitlines()), 30, "the count of the bad requests held back")
