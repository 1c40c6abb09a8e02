"""Even load across a generation's workers: when a worker steps back from accepting (``--balance on``).

Every worker waits on the same listening socket with ``EPOLLEXCLUSIVE``, and
the kernel wakes the most recently idle waiter first: under load the first
workers collect most connections, and a persistent connection never moves
to another worker. So a worker, each time it takes a connection (never per
message), compares its open connections with its generation's siblings' in
the scoreboard; while it holds more than its even share plus :data:`SLACK`,
it stops accepting and the kernel wakes a sibling instead. It steps back only
while a sibling holding fewer will take the next connection (see :func:`decide`),
so a generation never stays without a worker accepting: a sibling that fills
up, stops or dies lets it resume at its next look. A stepped-back worker
looks again each time one of its own connections ends, every
:data:`RECHECK` seconds, and when a sibling wakes it with
:data:`WAKE_SIGNAL`.

Why not ``SO_REUSEPORT`` (a listening socket per worker): the kernel hashes
each new connection to one of them, so the spread is random rather than even
(for 50 connections over 4 workers the largest share is typically 1.3 times
the mean), a busy or stalled worker's queue is not taken by its idle
siblings, and the master would have to bind, hand over and drain a socket per
worker. Stepping back keeps one shared queue, costs a scan of a few records
per connection taken, and needs nothing from the kernel.

:func:`steps_back` is the decision, a pure function; :class:`Balance` reads
its inputs from the scoreboard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from prefork.scoreboard import Record, Scoreboard

SLACK = 1  # connections over the even share a worker may hold before it steps back (at least; a tenth of it)
RECHECK = 0.05  # seconds between looks while stepped back
WAKE_INTERVAL = 0.002  # the least time between two wakes of one sibling (it takes about that long to look)
WAKE_SIGNAL = signal.SIGWINCH  # "look again": sent by a sibling holding more than its share

NO_LIMIT = 1 << 62  # the limit of a worker without siblings: nowhere else for a connection to go

# Record.accepting: what a worker does about new connections
NOT_ACCEPTING = 0  # stopping, at its cap, its thread pool full, its listeners closed
ACCEPTING = 1
STEPPED_BACK = 2  # holding more than its share (and maybe also one of the above)


@dataclass(frozen=True)
class Decision:
    step_back: bool  # stop accepting for now
    wake: tuple[int, ...] = ()  # indexes of the siblings to wake: stepped back, and holding fewer
    limit: int = field(default=0, compare=False)  # the share plus the slack: below it, never step back


def decide(own: int, siblings: Sequence[tuple[int, int]], slack: int = SLACK) -> Decision:
    """What a worker holding ``own`` open connections does, given its siblings as (open connections, state).

    Over the even share (the total over the generation's workers, rounded
    up) plus ``slack``, it steps back when a sibling holding fewer will take
    the next connection instead: one accepting, or one that stepped back
    earlier but holds less than the share plus ``slack`` now, so it accepts
    again as soon as it looks (those are woken). With no such sibling it keeps
    accepting. The worker holding the fewest is never over the share plus
    ``slack``, so whenever it looks it accepts: the generation never stays
    without a worker accepting.

    Waking matters for bursts: a worker accepts a queued connection in tens
    of microseconds, faster than siblings that stepped back when the total
    was small can notice the total grew.
    """
    total = max(own, 0) + sum(max(active, 0) for active, _ in siblings)
    share = -(-total // (len(siblings) + 1))
    # the band over the share grows with it (a tenth): a burst of thousands of connections is handed
    # from worker to worker a few dozen times, not once per connection or two
    limit = share + max(slack, share // 10)
    if not siblings or own < limit:
        return Decision(False, limit=limit if siblings else NO_LIMIT)
    takers = [i for i, (active, state) in enumerate(siblings)
              if active < own and (state == ACCEPTING or (state == STEPPED_BACK and active < limit))]
    if not takers:
        return Decision(False, limit=limit)
    return Decision(True, tuple(i for i in takers if siblings[i][1] == STEPPED_BACK), limit)


def steps_back(own: int, siblings: Sequence[tuple[int, int]], slack: int = SLACK) -> bool:
    """True when a worker holding ``own`` open connections should stop accepting for now (see :func:`decide`)."""
    return decide(own, siblings, slack).step_back


class Balance:
    """One worker's view of its generation in the scoreboard: its siblings' counts and whether they accept."""

    def __init__(self, scoreboard: Scoreboard, index: int, generation: int, *, slack: int = SLACK) -> None:
        self.scoreboard = scoreboard
        self.index = index
        self.generation = generation
        self.slack = slack
        self._records: list[Record] = []  # the records below ``scoreboard.used``, built once each
        self._woken: dict[int, float] = {}  # pid -> when this worker last woke it
        # below this many open connections the last look said "keep accepting"; trusted until _limit_until
        self._limit = 0
        self._limit_until = 0.0

    def _sibling_records(self) -> list[Record]:
        records = self._records
        used = self.scoreboard.used
        while len(records) < used:
            records.append(self.scoreboard[len(records)])
        generation, index = self.generation, self.index
        return [record for i, record in enumerate(records) if record.generation == generation and i != index]

    def siblings(self) -> list[tuple[int, int]]:
        """(open connections, state) of every other live worker of this generation."""
        return [(int(record.active), int(record.accepting)) for record in self._sibling_records()]

    def sibling_has_room(self, busy_at: int | None = None) -> bool:
        """True when another worker of this generation accepts (with fewer than ``busy_at`` open, when given):
        a full worker then leaves new connections to it rather than reclaim one of its own."""
        return any(r.accepting == ACCEPTING and (busy_at is None or r.active < busy_at)
                   for r in self._sibling_records())

    def steps_back(self, own: int) -> bool:
        """:func:`decide` for this worker holding ``own`` open connections; wakes the siblings it names."""
        if own <= self.slack:
            return False  # under any share plus the slack: no need to look at the siblings
        now = time.monotonic()
        if own < self._limit and now < self._limit_until:
            return False  # under the share plus the slack a moment ago: the siblings moved little since
        records = self._sibling_records()
        decision = decide(own, [(int(r.active), int(r.accepting)) for r in records], self.slack)
        self._limit, self._limit_until = decision.limit, now + RECHECK
        if decision.wake:
            if len(self._woken) > 2 * len(records) + 16:
                self._woken.clear()  # pids of siblings long gone
            for i in decision.wake:
                pid = int(records[i].pid)
                if pid > 0 and now - self._woken.get(pid, 0.0) >= WAKE_INTERVAL:
                    self._woken[pid] = now
                    with contextlib.suppress(ProcessLookupError):  # gone: the master is reaping it
                        os.kill(pid, WAKE_SIGNAL)
        return decision.step_back
