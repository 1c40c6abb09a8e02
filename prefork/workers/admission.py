"""Admission: what happens to a connection between ``accept()`` and the end of its life, decided without I/O.

Every worker class asks the same questions of its connections: may this
peer open another one (``--max-connections-per-source``)? has this one been
silent too long (``--idle-timeout``)? which one gives way when every thread
(or ``--max-connections``) is taken and another is waiting
(``--reclaim-idle-after``)? which unfinished TLS handshake is dropped when
too many are pending? They are answered here once, from events the worker
observes (accepted, bytes received as the kernel counts them, whether the
handler is waiting on the client, a tick of the clock), as actions the
worker carries out (close this connection with a reason). The epoll-based
classes (:mod:`prefork.workers.servers`) and the asyncio class
(:mod:`prefork.workers.async_worker`) are the adapters: they sample, this
module decides.

A connection is tracked by a key of the adapter's choosing (its descriptor,
its transport). Closing one cleanly for a reason is the adapter's single
``close(key, reason)``; the same step serves the rules that end
connections later in their life: while the worker drains, one silent for
``--drain-idle`` with nothing left to send (:meth:`Admission.drain`), and
one whose handler has held it ``--handler-timeout`` without returning,
exchanging nothing and not waiting on the client (:meth:`Admission.stuck`).
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ACCEPT_BATCH = 16  # connections accepted per readiness event before the loop polls again
# accept() on a descriptor that is no longer our listening socket: closed, or its number reused
LISTENER_GONE_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL})
FD_RESERVE = 32  # descriptors kept free for what a worker opens besides connections (logs, upstream retries)
MAX_PENDING_HANDSHAKES = 256  # per worker: at this many, the oldest unfinished handshake gives way
LOG_EVERY = 10.0  # seconds between two summary lines of closes for one reason
# a connection that received a byte more recently than this is never reclaimed: a client between two sends
# of one request (or slow to send its first after connecting) is not taken for an idle one
MIN_SILENCE = 0.1


class Reason(enum.Enum):
    """Why the worker closed a connection itself; each is counted in the scoreboard as ``closed_<value>``."""

    IDLE_TIMEOUT = "idle_timeout"
    RECLAIMED = "reclaimed"
    PER_SOURCE = "per_source"
    HANDSHAKE_DROPPED = "handshake_dropped"
    DRAIN_IDLE = "drain_idle"
    HANDLER_TIMEOUT = "handler_timeout"
    RELAY_LOOP = "relay_loop"


class Stage(enum.Enum):
    WAITING = "waiting"  # accepted, no byte yet: no handler holds it
    HANDLER = "handler"  # a handler has it


@dataclass(frozen=True)
class Policy:
    """The admission rules in force (from the config; 0 turns a rule off)."""

    idle_timeout: float = 0.0
    # 0: never reclaim; then silent clients can hold every place until the idle timeout closes them
    reclaim_window: float = 10.0
    max_per_source: int = 0
    drain_idle: float = 0.0  # while draining: close a connection silent this long with nothing to send
    handler_timeout: float = 0.0  # a handler stuck this long on one connection (see stuck())


@dataclass
class Tracked:
    """What the core remembers of one connection: when it last received a byte, and its recent byte counts."""

    stage: Stage
    since: float  # accepted
    received: int = 0  # bytes received so far, as last sampled
    active: float = 0.0  # when ``received`` last grew (``since`` until then)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (when, received), oldest first

    def __post_init__(self) -> None:
        self.active = self.active or self.since


@dataclass(frozen=True)
class Sample:
    """One look at a connection: bytes received (None: unknown, e.g. a Unix socket) and whether its handler
    is blocked on the client (reading from it or writing to it) rather than working."""

    received: int | None
    on_client: bool = True
    silent_for: float | None = None  # seconds since the kernel last received data on it (TCP_INFO), when known
    quiet_for: float | None = None  # seconds since data last went either way (TCP_INFO), when known
    unsent: bool = False  # bytes are still queued to the client, or unacknowledged


def source_key(address: Any) -> str | None:
    """The key connections are counted under per source: the IP, an IPv6 one by its /64; None for Unix peers."""
    if not isinstance(address, tuple) or not address:
        return None
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def over_source_limit(open_from_source: int, policy: Policy) -> bool:
    """True when a new connection from a source that holds ``open_from_source`` already must be closed."""
    return bool(policy.max_per_source) and open_from_source >= policy.max_per_source


def observe(conn: Tracked, sample: Sample, now: float, window: float) -> None:
    """Fold a sample into what is known of ``conn``: its activity, and the byte counts of the last ``window``."""
    if sample.received is None:
        return
    if sample.received > conn.received:
        conn.received = sample.received
        conn.active = now if sample.silent_for is None else now - sample.silent_for
    conn.samples.append((now, conn.received))
    horizon = now - window
    # keep one sample at or before the window's start, so the bytes over the window are known
    while len(conn.samples) > 1 and conn.samples[1][0] <= horizon:
        conn.samples.pop(0)


def received_over_window(conn: Tracked, now: float, window: float) -> int:
    """Bytes ``conn`` received over the last ``window`` seconds (all of them if it is younger)."""
    if conn.since >= now - window or not conn.samples:
        return conn.received
    return conn.received - conn.samples[0][1]


def idle_for(conn: Tracked, now: float) -> float:
    return max(0.0, now - conn.active)


def idle_expired(conn: Tracked, sample: Sample, now: float, policy: Policy) -> bool:
    """True when ``conn`` has received nothing for ``--idle-timeout`` and no handler is working on it."""
    return bool(policy.idle_timeout) and sample.on_client and idle_for(conn, now) >= policy.idle_timeout


def drain_idle_expired(conn: Tracked, sample: Sample, now: float, policy: Policy) -> bool:
    """While draining: True when ``conn`` has received nothing for ``--drain-idle``, has nothing left to send,
    and no handler is working on it. The kernel's own silence counts when it is longer than the tracked one:
    a connection that waited in the accept queue has been silent since its handshake, not since ``accept()``."""
    silent = max(idle_for(conn, now), sample.silent_for or 0.0)
    return bool(policy.drain_idle) and sample.on_client and not sample.unsent and silent >= policy.drain_idle


def held_too_long(conn: Tracked, sample: Sample, now: float, policy: Policy) -> bool:
    """True when a handler has held ``conn`` for ``--handler-timeout`` and no byte went either way for as
    long (one that keeps exchanging bytes is busy, not stuck). Whether it waits on the client is asked after
    (that is the idle timeout's business)."""
    if not policy.handler_timeout or now - conn.since < policy.handler_timeout:
        return False
    quiet = idle_for(conn, now) if sample.quiet_for is None else min(idle_for(conn, now), sample.quiet_for)
    return quiet >= policy.handler_timeout


def reclaim_victim(conns: Mapping[Hashable, Tracked], on_client: Callable[[Hashable], bool], now: float,
                   policy: Policy) -> Hashable | None:
    """The connection to close to make room: of those whose handler waits on the client, the one that
    received the fewest bytes over the last ``--reclaim-idle-after`` (silent ones first, then the one silent
    longest). None when every handler is working (those are never reclaimed), when every waiting one
    received a byte within :data:`MIN_SILENCE`, or when reclaiming is off (``--reclaim-idle-after 0``).
    ``on_client`` (a look at the handler's thread) is asked in that order, until one says yes."""
    if not policy.reclaim_window:
        return None
    ranked = sorted((received_over_window(c, now, policy.reclaim_window), c.active, i, key)
                    for i, (key, c) in enumerate(conns.items())
                    if c.stage is Stage.HANDLER and idle_for(c, now) >= MIN_SILENCE)
    return next((key for *_, key in ranked if on_client(key)), None)


def oldest(items: Iterable[tuple[Hashable, float]]) -> Hashable | None:
    """The key with the earliest time (the handshake that has waited longest), None for none."""
    found = min(items, key=lambda item: item[1], default=None)
    return None if found is None else found[0]


def tick_interval(policy: Policy, draining: bool = False, most: float = 1.0) -> float:
    """How often an adapter samples its connections: a quarter of the shortest timeout in force (the idle
    timeout, the handler timeout, and while draining the drain's), at most ``most`` seconds."""
    limits = [t for t in (policy.idle_timeout, policy.handler_timeout, policy.drain_idle if draining else 0.0)
              if t]
    return min(most, min(limits) / 4) if limits else most


def silence_limit(policy: Policy, draining: bool) -> float:
    """Seconds of silence after which a connection is closed now (0: never): the idle timeout, or while
    draining the drain's if shorter."""
    limits = [t for t in (policy.idle_timeout, policy.drain_idle if draining else 0.0) if t]
    return min(limits, default=0.0)


class Admission:
    """One worker's tracked connections and the decisions over them; the adapter does the I/O.

    Connections waiting for their first bytes are kept in accept order (the
    oldest first, as the idle timeout and a shortage of descriptors take
    them); those a handler has are sampled on each tick. ``count(reason)`` is
    told of each close the adapter must carry out (it counts it in the
    scoreboard); lines saying so are logged at most once per
    :data:`LOG_EVERY` seconds per reason.
    """

    def __init__(self, policy: Policy, count: Callable[[Reason], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.waiting: dict[Hashable, float] = {}  # key -> accepted, oldest first
        self.handling: dict[Hashable, Tracked] = {}
        self.draining = False  # the worker drains: --drain-idle applies
        self.stuck_keys: set[Hashable] = set()  # past --handler-timeout already (told once)
        self._count = count
        self._clock = clock
        self._unlogged: dict[Reason, int] = {}
        self._logged_at: dict[Reason, float] = {}

    def __len__(self) -> int:
        return len(self.waiting) + len(self.handling)

    def wait(self, key: Hashable, now: float) -> None:
        """Accepted; no handler has it until its first bytes arrive."""
        self.waiting[key] = now

    def handed(self, key: Hashable, now: float) -> None:
        """A handler has it now (straight from accept, or from the waiting room)."""
        since = self.waiting.pop(key, now)
        # silent since accept until a sample shows a byte (one that came readable shows it at its first)
        self.handling[key] = Tracked(Stage.HANDLER, since)

    def forget(self, key: Hashable) -> None:
        self.waiting.pop(key, None)
        self.handling.pop(key, None)
        self.stuck_keys.discard(key)

    def drain(self) -> None:
        """The worker drains from now on: connections silent for ``--drain-idle`` are closed at the next tick.
        Safe from a signal handler (it only sets a flag)."""
        self.draining = True

    def watching(self) -> bool:
        """True while the handlers' connections must be sampled on a tick (a timeout in force)."""
        policy = self.policy
        return bool(policy.idle_timeout or policy.handler_timeout or (self.draining and policy.drain_idle))

    def interval(self, most: float = 1.0) -> float:
        return tick_interval(self.policy, self.draining, most)

    def next_deadline(self) -> float | None:
        """When the oldest waiting connection's silence limit comes due (None: no limit, or none waits)."""
        limit = silence_limit(self.policy, self.draining)
        if not limit or not self.waiting:
            return None
        return next(iter(self.waiting.values())) + limit

    def tick(self, now: float, received: Mapping[Any, Sample],
             on_client: Callable[[Hashable], bool]) -> list[Hashable]:
        """Fold in the byte counts of the handlers' connections; those to close for ``--idle-timeout``
        (counted already): waiting ones past it, and handled ones silent that long whose handler waits on
        the client (``on_client`` is asked only of those)."""
        policy = self.policy
        expired: list[tuple[Hashable, Reason]] = []
        limit = silence_limit(policy, self.draining)
        if limit:
            for key, since in self.waiting.items():
                if since > now - limit:
                    break
                idle = bool(policy.idle_timeout) and since <= now - policy.idle_timeout
                expired.append((key, Reason.IDLE_TIMEOUT if idle else Reason.DRAIN_IDLE))
        for key, sample in received.items():
            conn = self.handling.get(key)
            if conn is None:
                continue
            observe(conn, sample, now, policy.reclaim_window)
            if idle_expired(conn, sample, now, policy) and on_client(key):
                expired.append((key, Reason.IDLE_TIMEOUT))
            elif self.draining and drain_idle_expired(conn, sample, now, policy) and on_client(key):
                expired.append((key, Reason.DRAIN_IDLE))
        for key, reason in expired:
            self.closing(key, reason)
        return [key for key, _ in expired]

    def stuck(self, now: float, received: Mapping[Any, Sample],
              on_client: Callable[[Hashable], bool]) -> list[Hashable]:
        """The handlers' connections past ``--handler-timeout`` (each told once, and counted): held that long,
        no byte either way for as long, and the handler not waiting on the client (that one is idle, not
        stuck). Call after :meth:`tick` (it folds the samples in). The adapter logs each one's stack and
        closes it; the key stays tracked until its handler returns."""
        if not self.policy.handler_timeout:
            return []
        found = [key for key, sample in received.items()
                 if key not in self.stuck_keys and (conn := self.handling.get(key)) is not None
                 and held_too_long(conn, sample, now, self.policy) and not on_client(key)]
        for key in found:
            self.stuck_keys.add(key)
            self.closing(None, Reason.HANDLER_TIMEOUT)
        return found

    def oldest_held_since(self) -> float:
        """When the connection a handler has held longest was handed to it (0.0 when none is)."""
        return min((c.since for c in self.handling.values()), default=0.0)

    def make_room(self, now: float, received: Mapping[Any, Sample],
                  on_client: Callable[[Hashable], bool]) -> Hashable | None:
        """Every place is taken and a connection waits: the handled one to reclaim (counted already), or
        None when every handler is working."""
        self.observe_all(now, received)
        victim = reclaim_victim(self.handling, on_client, now, self.policy)
        if victim is not None:
            self.closing(victim, Reason.RECLAIMED)
        return victim

    def observe_all(self, now: float, received: Mapping[Any, Sample]) -> None:
        for key, sample in received.items():
            conn = self.handling.get(key)
            if conn is not None:
                observe(conn, sample, now, self.policy.reclaim_window)

    def any_reclaimable(self, now: float, on_client: Callable[[Hashable], bool]) -> bool:
        """True when :meth:`make_room` would find a connection to reclaim (nothing is closed or counted)."""
        return bool(self.policy.reclaim_window) and any(idle_for(c, now) >= MIN_SILENCE and on_client(k)
                                                        for k, c in self.handling.items())

    def oldest_waiting(self) -> Hashable | None:
        """The waiting connection accepted first: it gives way when descriptors run out (None: none waits, or
        reclaiming is off)."""
        return next(iter(self.waiting), None) if self.policy.reclaim_window else None

    def oldest_silent_since(self) -> float:
        """When the connection silent longest last received a byte (0.0 when none is tracked)."""
        first = next(iter(self.waiting.values()), None)
        handled = min((c.active for c in self.handling.values()), default=None)
        times = [t for t in (first, handled) if t is not None]
        return min(times, default=0.0)

    def closing(self, key: Hashable | None, reason: Reason) -> None:
        """A connection is closed for ``reason``: forget it, count it, and say so in a rate-limited line."""
        if key is not None:
            self.forget(key)
        self._count(reason)
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        self.flush_log(self._clock())

    def flush_log(self, now: float) -> None:
        """Say how many connections were closed per reason since the last line (once per LOG_EVERY)."""
        for reason, n in list(self._unlogged.items()):
            if n and now - self._logged_at.get(reason, -LOG_EVERY) >= LOG_EVERY:
                log.warning("closed %d connection(s): %s%s", n, _WHY[reason],
                            "" if reason not in _OPTION else f" ({_OPTION[reason]})")
                self._unlogged[reason] = 0
                self._logged_at[reason] = now


_WHY = {
    Reason.IDLE_TIMEOUT: "nothing received for the idle timeout",
    Reason.RECLAIMED: "reclaimed for a waiting connection while every place was taken",
    Reason.PER_SOURCE: "over the per-source connection limit",
    Reason.HANDSHAKE_DROPPED: "the oldest unfinished TLS handshakes, dropped to make room",
    Reason.DRAIN_IDLE: "silent with nothing left to send while the worker drains",
    Reason.HANDLER_TIMEOUT: "their handler held them without returning, exchanging nothing",
    Reason.RELAY_LOOP: "their PROXY header says they came back through a relay loop (or through too many relays)",
}
_OPTION = {
    Reason.IDLE_TIMEOUT: "--idle-timeout",
    Reason.RECLAIMED: "--reclaim-idle-after",
    Reason.PER_SOURCE: "--max-connections-per-source",
    Reason.DRAIN_IDLE: "--drain-idle",
    Reason.HANDLER_TIMEOUT: "--handler-timeout",
}
