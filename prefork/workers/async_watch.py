"""The admission core's adapter for the ``async`` class: its handlers' connections, watched on a timer.

A handler's connection is watched from its protocol's ``connection_made``
(its transport is the key) to its ``connection_lost``; nothing is done per
``data_received``. On a tick (a quarter of ``--idle-timeout``, at most 5 s;
often while the worker is at its cap) the kernel's byte counts
(``TCP_INFO``) of every watched connection go to
:class:`~prefork.workers.admission.Admission`, which names those to close:
silent past the idle timeout, or, at the cap with clients queued on the
listeners, the quietest one whose handler waits on its client. Closing one
aborts its transport (:meth:`AsyncWatch.close`): the protocol hears
``connection_lost`` as from any closed connection, and its end is neither
logged nor counted as an error.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from prefork.listeners import queued
from prefork.scoreboard import SourceCounts
from prefork.workers.admission import Admission, Policy, Reason, source_key
from prefork.workers.watch import activity

RELIEF_RETRY = 0.05  # seconds between two looks for a connection to reclaim while at the cap


class Capped(Protocol):
    """What the watch needs of its worker (:class:`prefork.workers.async_worker.AsyncWorker`)."""

    record: Any
    listeners: tuple[socket.socket, ...]
    stopping: bool
    paused: bool

    def at_cap(self) -> bool: ...


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
        samples = {t: activity(t.get_extra_info("socket")) for t in self.watched}
        for transport in self.admission.tick(now, samples, self._on_client):
            self._abort(transport)
        if worker.paused and not worker.stopping and worker.at_cap() and _someone_waits(worker.listeners):
            victim = self.admission.make_room(now, samples, self._on_client)
            if victim is not None:
                self._abort(victim)
        worker.record.oldest_silent_since = self.admission.oldest_silent_since()
        self.admission.flush_log(now)
        self.schedule()

    def schedule(self) -> None:
        """The next tick: at a quarter of the idle timeout (at most 5 s), or soon while at the cap."""
        worker = self.worker
        if self.ticker is not None or worker.stopping:
            return
        at_cap = worker.paused and worker.at_cap()
        if not (at_cap or self.policy.idle_timeout):
            return
        interval = RELIEF_RETRY if at_cap else min(5.0, self.policy.idle_timeout / 4)
        self.ticker = asyncio.get_running_loop().call_later(interval, self.tick)

    def at_cap_now(self) -> None:
        """The worker just reached its cap: look for a connection to reclaim soon, not at the next tick."""
        if self.ticker is not None and self.ticker.when() - asyncio.get_running_loop().time() > RELIEF_RETRY:
            self.ticker.cancel()
            self.ticker = None
        self.schedule()


def _someone_waits(listeners: Sequence[socket.socket]) -> bool:
    """True when a client is queued on a listener (the kernel's accept queue)."""
    return any((queued(sock) or 0) > 0 for sock in listeners if sock.fileno() >= 0)
