"""The admission core's adapter for the ``async`` class: its handlers' connections, watched on a timer.

A handler's connection is watched from its protocol's ``connection_made``
(its transport is the key) to its ``connection_lost``; nothing is done per
``data_received``. On a tick (a quarter of ``--idle-timeout``, at most 1 s;
often while the worker is at its cap) the kernel's byte counts
(``TCP_INFO``) of every watched connection go to
:class:`~prefork.workers.admission.Admission`, which names those to close:
silent past the idle timeout, or, at the cap with clients queued on the
listeners, the quietest one whose handler waits on its client. Closing one
aborts its transport (:meth:`AsyncWatch.close`): the protocol hears
``connection_lost`` as from any closed connection, and its end is neither
logged nor counted as an error.

While the worker drains, a connection silent for ``--drain-idle`` with
nothing left to send (in the kernel or the transport's buffer) is closed
the same way. A stream handler that has held its connection for
``--handler-timeout`` without exchanging a byte and without awaiting its
client gets its task's stack logged, its connection closed and its task
cancelled (a task holds no thread: the worker goes on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol

from prefork.listeners import queued
from prefork.scoreboard import SourceCounts
from prefork.workers.admission import Admission, Policy, Reason, Sample, source_key
from prefork.workers.watch import activity

log = logging.getLogger(__name__)

RELIEF_RETRY = 0.05  # seconds between two looks for a connection to reclaim while at the cap
TRACK_EVERY = 1.0  # seconds between two ticks at most (the scoreboard's oldest silent connection)


class Capped(Protocol):
    """What the watch needs of its worker (:class:`prefork.workers.async_worker.AsyncWorker`)."""

    record: Any
    listeners: tuple[socket.socket, ...]
    stopping: bool
    paused: bool

    def at_cap(self) -> bool: ...

    def open_connections(self) -> int: ...


class Elsewhere(Protocol):
    """Connections an async worker serves without a transport (:class:`prefork.workers.echo_engine.EchoEngine`)."""

    def close_drain_idle(self, policy: Policy, now: float) -> int: ...

    def close_idle(self, policy: Policy, now: float) -> int: ...

    def oldest_since(self) -> float: ...

    def oldest_silent_since(self, now: float) -> float: ...


class AsyncWatch:
    """One async worker's handlers' connections: idle timeout, reclaim at the cap, per-source counts."""

    def __init__(self, worker: Capped, policy: Policy, sources: SourceCounts | None) -> None:
        self.worker = worker
        self.policy = policy
        self.sources = sources if policy.max_per_source else None
        self.admission = Admission(policy, self._count)
        # transport -> whether its handler waits on the client now (reading, or writing to one that does not read)
        self.watched: dict[Any, Callable[[], bool]] = {}
        self.closed_by_us: set[Any] = set()  # transports closed for a reason: their handler's end is quiet
        self.source_of: dict[Any, str] = {}  # transport -> its source (--max-connections-per-source)
        self.ticker: asyncio.TimerHandle | None = None
        self.tasks: dict[Any, asyncio.Task[Any]] = {}  # transport -> its stream handler's task
        # connections held outside transports (the built-in echo's engine): its own, under the same rules
        self.elsewhere: Elsewhere | None = None

    def drain_began(self) -> None:
        """The worker drains: ``--drain-idle`` applies from the next tick, which comes soon."""
        self.admission.drain()
        if self.ticker is not None:
            self.ticker.cancel()
            self.ticker = None
        self.schedule()

    def serving(self, transport: Any, task: asyncio.Task[Any] | None) -> None:
        """``task`` runs the stream handler of ``transport`` (its stack is logged if it gets stuck)."""
        if task is not None and transport in self.watched:
            self.tasks[transport] = task

    def _count(self, reason: Reason) -> None:
        field = f"closed_{reason.value}"
        setattr(self.worker.record, field, getattr(self.worker.record, field) + 1)

    def open(self, transport: Any, on_client: Callable[[], bool]) -> None:
        """A handler has this connection: watched for silence from now on (nothing per byte).

        ``on_client()`` says whether its handler waits on the client now: a stream handler awaiting a read
        or a drain does; one awaiting anything else is working, and is never reclaimed.
        """
        self.watched[transport] = on_client
        self.admission.handed(transport, time.monotonic())
        if self.sources is None:
            return
        key = source_key(transport.get_extra_info("peername"))  # the PROXY header's client, when read
        if key is None:
            return
        if self.sources.count(key) >= self.policy.max_per_source:
            self.close(transport, Reason.PER_SOURCE)  # the handler hears connection_lost at once
            return
        self.sources.add(key, 1)
        self.source_of[transport] = key

    def ended(self, transport: Any) -> bool:
        """The connection has ended; True when the worker had closed it for a reason (its end is quiet)."""
        self.watched.pop(transport, None)
        self.tasks.pop(transport, None)
        self.admission.forget(transport)
        key = self.source_of.pop(transport, None)
        if key is not None and self.sources is not None:
            self.sources.add(key, -1)
        if transport in self.closed_by_us:
            self.closed_by_us.discard(transport)
            return True
        return False

    def close(self, transport: Any, reason: Reason) -> None:
        """Close a handler's connection for ``reason`` (counted, logged rate-limited). The one step every rule
        that ends a connection takes."""
        self.admission.closing(transport, reason)
        self._abort(transport)

    def _abort(self, transport: Any) -> None:
        self.watched.pop(transport, None)
        self.closed_by_us.add(transport)
        transport.abort()

    def _on_client(self, transport: Any) -> bool:
        on_client = self.watched.get(transport)
        return on_client is not None and on_client()

    def tick(self) -> None:
        """Close the connections silent past --idle-timeout; at the cap with clients queued on the listeners,
        reclaim the quietest one whose handler waits on its client."""
        self.ticker = None
        worker = self.worker
        now = time.monotonic()
        samples = {t: _with_buffer(t, activity(t.get_extra_info("socket"))) for t in self.watched}
        for transport in self.admission.tick(now, samples, self._on_client):
            self._abort(transport)
        for transport in self.admission.stuck(now, samples, self._on_client):
            self._stuck(transport, now)
        elsewhere = self.elsewhere
        if self.policy.idle_timeout and elsewhere is not None:
            for _ in range(elsewhere.close_idle(self.policy, now)):
                self.admission.closing(None, Reason.IDLE_TIMEOUT)
        if self.admission.draining and self.policy.drain_idle and elsewhere is not None:
            for _ in range(elsewhere.close_drain_idle(self.policy, now)):
                self.admission.closing(None, Reason.DRAIN_IDLE)
        if worker.paused and not worker.stopping and worker.at_cap() and _someone_waits(worker.listeners):
            victim = self.admission.make_room(now, samples, self._on_client)
            if victim is not None:
                self._abort(victim)
        silent = [t for t in (self.admission.oldest_silent_since(), elsewhere and elsewhere.oldest_silent_since(now))
                  if t]
        worker.record.oldest_silent_since = min(silent, default=0.0)
        held = [t for t in (self.admission.oldest_held_since(), elsewhere and elsewhere.oldest_since()) if t]
        worker.record.oldest_handler_since = min(held, default=0.0)
        self.admission.flush_log(now)
        self.schedule()

    def _stuck(self, transport: Any, now: float) -> None:
        """Past ``--handler-timeout``: the task's stack logged once, its connection closed, the task cancelled."""
        conn = self.admission.handling.get(transport)
        task = self.tasks.pop(transport, None)
        stack = _awaiting(task.get_coro()) if task is not None else ""
        log.error("a handler has held the connection from %s for %.0fs without returning or exchanging a byte "
                  "(--handler-timeout); closing it. Its stack:\n%s", transport.get_extra_info("peername"),
                  now - conn.since if conn is not None else 0.0,
                  stack or "(a protocol: no task of its own)")
        self._abort(transport)
        if task is not None and not task.done():
            task.cancel()
            self.worker.record.stuck_handlers += 1

    def schedule(self) -> None:
        """The next tick: at a quarter of the idle timeout (at most 5 s), or soon while at the cap."""
        worker = self.worker
        if self.ticker is not None:
            return
        # a stopping worker ticks while it holds connections (--drain-idle, --handler-timeout, and the figures)
        if worker.stopping and not (self.admission.draining or self.policy.handler_timeout
                                    or worker.open_connections() or worker.record.oldest_silent_since):
            return
        at_cap = worker.paused and worker.at_cap() and not worker.stopping and bool(self.policy.reclaim_window)
        # always a tick, at most TRACK_EVERY apart: the oldest silent connection's age in the scoreboard is
        # never staler than that, whatever the timeouts (one timer a second, nothing per connection)
        interval = RELIEF_RETRY if at_cap else self.admission.interval(TRACK_EVERY)
        self.ticker = asyncio.get_running_loop().call_later(interval, self.tick)

    def at_cap_now(self) -> None:
        """The worker just reached its cap: look for a connection to reclaim soon, not at the next tick."""
        if self.ticker is not None and self.ticker.when() - asyncio.get_running_loop().time() > RELIEF_RETRY:
            self.ticker.cancel()
            self.ticker = None
        self.schedule()


def _awaiting(coro: Any) -> str:
    """Where a suspended coroutine waits: its frame and those of what it awaits, outermost first (a task's own
    stack shows only its outermost coroutine)."""
    frames: list[tuple[FrameType, int]] = []
    while coro is not None and len(frames) < 100:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "".join(traceback.format_list(traceback.StackSummary.extract(frames))).rstrip()


def _with_buffer(transport: Any, sample: Sample) -> Sample:
    """``sample``, with bytes in the transport's own write buffer counted as left to send."""
    if sample.unsent or not transport.get_write_buffer_size():
        return sample
    return dataclasses.replace(sample, unsent=True)


def _someone_waits(listeners: Sequence[socket.socket]) -> bool:
    """True when a client is queued on a listener (the kernel's accept queue)."""
    return any((queued(sock) or 0) > 0 for sock in listeners if sock.fileno() >= 0)
