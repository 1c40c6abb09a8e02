"""Every deadline the master's loop waits for, each set in one place together with what it triggers.

The loop's select timeout is :meth:`Timers.next_deadline`; after each turn
:meth:`Timers.run_due` runs the actions whose time has come. A deadline is a
key (``("kill", pid)``, ``"reload"``) with a time and an action: setting the
key again moves it, cancelling it forgets it, so a deadline is never written
twice (once to compute the timeout, once to act). Servers with many client
deadlines of their own (the control socket, ``/metrics``) are watched as
sources: they say when their next one is and expire what is due.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable
from typing import Protocol


class TimerSource(Protocol):
    def next_deadline(self) -> float | None: ...

    def expire(self, now: float) -> None: ...


class Timers:
    def __init__(self) -> None:
        self._due: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._sources: list[TimerSource] = []

    def set(self, key: Hashable, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` at ``when`` (monotonic seconds), replacing any deadline under ``key``."""
        self._due[key] = (when, action)

    def every(self, key: Hashable, interval: float, action: Callable[[], None], *, first: float | None = None,
              jitter: float = 0.0) -> None:
        """Run ``action`` every ``interval`` seconds (jittered by up to ``jitter`` of it), first after ``first``."""
        def tick() -> None:
            self.every(key, interval, action, jitter=jitter)  # before: the action may cancel it
            action()

        delay = interval * random.uniform(1 - jitter, 1 + jitter) if first is None else first
        self.set(key, time.monotonic() + delay, tick)

    def cancel(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def when(self, key: Hashable) -> float | None:
        entry = self._due.get(key)
        return entry[0] if entry is not None else None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._due

    def watch(self, source: TimerSource) -> None:
        self._sources.append(source)

    def unwatch(self, source: TimerSource) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def next_deadline(self) -> float | None:
        deadlines = [when for when, _ in self._due.values()]
        deadlines += [d for d in (s.next_deadline() for s in self._sources) if d is not None]
        return min(deadlines) if deadlines else None

    def run_due(self, now: float) -> None:
        """Run every action due by ``now``, earliest first; an action may set or cancel any deadline."""
        for source in list(self._sources):
            source.expire(now)
        due = sorted((when, n, key) for n, (key, (when, _)) in enumerate(self._due.items()) if when <= now)
        for when, _, key in due:
            entry = self._due.get(key)
            if entry is None or entry[0] != when:
                continue  # cancelled or moved by an earlier action in this turn
            del self._due[key]
            entry[1]()
