"""The relay's upstreams as every worker sees them: health, open connections and counters in shared memory.

Like the scoreboard (:mod:`prefork.scoreboard`, which makes one of these
after its records in its memory file, before the first fork), shared memory:

* one :class:`Slot` per upstream, by name: its health (up, down until a retry
  time, half-open while one connection or check tries it again), when it last
  changed, its last check, and the settings the master assigned it from the
  configuration (weight, backup, maxconn, listed or not);
* per worker and upstream, its open connections and its counters, written by
  that worker alone with plain stores (no lock, no system call: the choice of
  an upstream is on every connection's path); the master folds a gone
  worker's counters into per-upstream totals (:meth:`UpstreamBoard.retire`).

Health is written by whichever worker sees a connect or a check fail or
succeed. Two workers may race on it (both mark it down, both claim the
half-open try): the outcome is the same upstream state, at worst one more
try; a lock shared between processes would cost more than it saves, and
would outlive a worker killed while holding it.

:class:`Balancer` is one relay class's view in one process: it asks
:func:`prefork.handlers.relay_core.choose` which upstreams a connection
tries, and records what happened to each attempt. With
``check_interval`` set, :meth:`Balancer.start_checks` runs the active
checks in a thread of each worker; a check is claimed per upstream in the
board, so each upstream is checked once per interval whatever the number of
workers (see docs/relay.md, "The relay as a load balancer").
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Final

from prefork.config import UpstreamSpec
from prefork.handlers import relay_core
from prefork.handlers.relay_core import DOWN, HALF_OPEN, PROBE, SKIP, UP, USE, Health, RelaySettings, Upstream
from prefork.proxy_protocol import build_v2

__all__ = ["Balanced", "Balancer", "Slot", "UpstreamBoard"]

log = logging.getLogger(__name__)

SLOTS: Final = 64  # upstreams the board holds (config.MAX_UPSTREAMS), current and removed
NAME_SIZE: Final = 272

# The counters each worker keeps per upstream, in this order
COUNTERS: Final = ("connections", "failed_refused", "failed_timeout", "failed_tls", "failed_other",
                   "failovers", "over_maxconn", "checks", "checks_failed")
CONNECTIONS, FAILED_REFUSED, FAILED_TIMEOUT, FAILED_TLS, FAILED_OTHER, FAILOVERS, OVER_MAXCONN, CHECKS, \
    CHECKS_FAILED = range(len(COUNTERS))
_FAILED = {"refused": FAILED_REFUSED, "timeout": FAILED_TIMEOUT, "tls": FAILED_TLS, "other": FAILED_OTHER}
N_COUNTERS: Final = len(COUNTERS)


class Slot(ctypes.Structure):
    """One upstream, shared by every worker. Every field is 8 bytes and aligned: a read never sees half a store."""

    _fields_ = [
        ("listed", ctypes.c_int64),  # 1: in the serving configuration (the master sets it)
        ("weight", ctypes.c_int64),
        ("backup", ctypes.c_int64),
        ("maxconn", ctypes.c_int64),
        ("state", ctypes.c_int64),  # relay_core.UP, DOWN or HALF_OPEN
        ("failures", ctypes.c_int64),  # failed connects or checks in a row
        ("retry_at", ctypes.c_double),  # monotonic: DOWN until then; HALF_OPEN: the try's deadline
        ("changed_at", ctypes.c_double),  # wall clock of the last up/down change (0: none since it was listed)
        ("up_at", ctypes.c_double),  # monotonic: when it last came back up (slow start); 0: never went down
        ("state_changes", ctypes.c_uint64),
        ("check_due", ctypes.c_double),  # monotonic: the next active check (claimed by the worker doing it)
        ("last_check", ctypes.c_double),  # wall clock of the last check's end (0: none yet)
        ("check_latency", ctypes.c_double),  # seconds the last check took
        ("check_ok", ctypes.c_int64),
        ("name", ctypes.c_char * NAME_SIZE),  # "HOST:PORT", UTF-8; empty: a free slot
    ]


class UpstreamBoard:
    """:data:`SLOTS` upstreams and ``workers`` workers' counters for each, in one shared mapping.

    ``used`` says how many worker indexes (scoreboard records) may be live:
    sums run over those only.
    """

    def __init__(self, workers: int, used: Callable[[], int] | None = None, *,
                 buffer: mmap.mmap | None = None, offset: int = 0) -> None:
        """A board for ``workers`` worker indexes, in its own anonymous mapping or in ``buffer`` at ``offset``.

        The daemon's board lives in the scoreboard's memory file (``buffer``), so
        that it is the same board in a mold the master re-executes and across
        an upgrade in place, where an anonymous mapping would not be inherited.
        """
        self.workers = workers
        self.used = used or (lambda: workers)
        slots_size = ctypes.sizeof(Slot) * SLOTS
        active_size = 8 * SLOTS * workers
        counters_size = 8 * workers * SLOTS * N_COUNTERS
        retired_size = 8 * SLOTS * (N_COUNTERS + 1)
        if buffer is None:
            buffer, offset = mmap.mmap(-1, self.size(workers)), 0
        self._mem = buffer
        self.slots = (Slot * SLOTS).from_buffer(self._mem, offset)
        view = memoryview(self._mem)
        offset += slots_size
        # active[worker * SLOTS + slot]: a worker's cells are contiguous (one page is all it touches); the
        # sum over workers is one strided slice
        self.active = view[offset:offset + active_size].cast("q")
        offset += active_size
        # counters[(worker * SLOTS + slot) * N_COUNTERS + counter]: a worker's cells are contiguous
        self.counters = view[offset:offset + counters_size].cast("q")
        offset += counters_size
        # gone workers' counters per slot (the master's alone), then what gone workers left open (always 0)
        self.retired = view[offset:offset + retired_size].cast("q")

    @staticmethod
    def size(workers: int) -> int:
        """Bytes a board for ``workers`` worker indexes takes (8-byte aligned: it follows the scoreboard)."""
        return ctypes.sizeof(Slot) * SLOTS + 8 * SLOTS * workers * (1 + N_COUNTERS) + 8 * SLOTS * (N_COUNTERS + 1)

    # -- the master -----------------------------------------------------------------------------------

    def assign(self, specs: Sequence[UpstreamSpec]) -> None:
        """List ``specs`` (a generation's upstreams) in the board, by name; unlist the others.

        An upstream listed before keeps its slot, health and counters; a new
        one takes a free slot, or the slot of an unlisted one nobody holds a
        connection to any more. Raises ``IndexError`` when none is left.
        """
        wanted = {spec.name: spec for spec in specs}
        by_name: dict[str, int] = {}
        for index, slot in enumerate(self.slots):
            name = slot.name.decode("utf-8", "replace")
            if name:
                by_name[name] = index
                slot.listed = 1 if name in wanted else 0
        for name, spec in wanted.items():
            index = by_name.get(name, -1)
            if index < 0:
                index = self._free_slot()
                self._reset(index, name)
            slot = self.slots[index]
            slot.weight, slot.backup, slot.maxconn = spec.weight, int(spec.backup), spec.maxconn
            slot.listed = 1

    def place(self, specs: Sequence[UpstreamSpec]) -> list[int]:
        """``specs`` in the first slots, in order (a board of one process's own): their indexes."""
        if len(specs) > SLOTS:
            raise IndexError(f"at most {SLOTS} upstreams, not {len(specs)}")
        for index, spec in enumerate(specs):
            self._reset(index, spec.name)
            slot = self.slots[index]
            slot.weight, slot.backup, slot.maxconn, slot.listed = spec.weight, int(spec.backup), spec.maxconn, 1
        return list(range(len(specs)))

    def _free_slot(self) -> int:
        for index, slot in enumerate(self.slots):
            if not slot.name:
                return index
        for index, slot in enumerate(self.slots):
            if not slot.listed and self.open_connections(index) == 0:
                return index
        raise IndexError(f"no free slot for another upstream (at most {SLOTS}, removed ones included)")

    def _reset(self, index: int, name: str) -> None:
        ctypes.memset(ctypes.addressof(self.slots[index]), 0, ctypes.sizeof(Slot))
        self.slots[index].name = name.encode("utf-8")[:NAME_SIZE - 1]
        # only the cells that may hold something (a gone worker's were zeroed by retire), and only
        # when they do: a store would make the kernel back a page of the mapping nobody else uses
        for worker in range(self.used()):
            base = (worker * SLOTS + index) * N_COUNTERS
            if any(self.counters[base:base + N_COUNTERS]):
                self.counters[base:base + N_COUNTERS] = memoryview(bytes(8 * N_COUNTERS)).cast("q")
        into = index * (N_COUNTERS + 1)
        self.retired[into:into + N_COUNTERS + 1] = memoryview(bytes(8 * (N_COUNTERS + 1))).cast("q")

    def retire(self, worker: int) -> None:
        """A gone worker's counters into each upstream's totals, its cells zeroed (its connections are gone)."""
        mine = self.active[worker * SLOTS:(worker + 1) * SLOTS]
        if any(mine):  # a store only where needed (see _reset)
            mine[:] = memoryview(bytes(8 * SLOTS)).cast("q")
        for index in range(SLOTS):
            base = (worker * SLOTS + index) * N_COUNTERS
            cells = self.counters[base:base + N_COUNTERS]
            if any(cells):
                into = index * (N_COUNTERS + 1)
                for k in range(N_COUNTERS):
                    self.retired[into + k] += cells[k]
                    cells[k] = 0

    # -- anyone ---------------------------------------------------------------------------------------

    def find(self, name: str) -> int | None:
        """The slot listed under ``name``, if any."""
        raw = name.encode("utf-8")[:NAME_SIZE - 1]
        for index, slot in enumerate(self.slots):
            if slot.name == raw:
                return index
        return None

    def open_connections(self, index: int) -> int:
        """Connections to slot ``index`` open now, over every worker."""
        return sum(self.active[index:index + self.used() * SLOTS:SLOTS])

    def totals(self, index: int) -> dict[str, int]:
        """Slot ``index``'s counters over every worker, live and gone."""
        into = index * (N_COUNTERS + 1)
        sums = [self.retired[into + k] for k in range(N_COUNTERS)]
        for worker in range(self.used()):
            base = (worker * SLOTS + index) * N_COUNTERS
            for k in range(N_COUNTERS):
                sums[k] += self.counters[base + k]
        return dict(zip(COUNTERS, sums, strict=True))

    def health(self, index: int) -> Health:
        slot = self.slots[index]
        return Health(int(slot.state), int(slot.failures), float(slot.retry_at))

    def describe(self, now: float, wall: float) -> list[dict[str, Any]]:
        """Every listed upstream, as ``status`` and ``stats`` show it (see docs/relay.md)."""
        out = []
        for index, slot in enumerate(self.slots):
            if not slot.listed:
                continue
            counts = self.totals(index)
            state = int(slot.state)
            out.append({
                "name": slot.name.decode("utf-8", "replace"),
                "state": relay_core.STATE_NAMES[state] if 0 <= state < len(relay_core.STATE_NAMES) else "up",
                "since": round(slot.changed_at, 3) if slot.changed_at else None,
                "retry_in_s": round(max(0.0, slot.retry_at - now), 3) if state == DOWN else None,
                "weight": int(slot.weight), "backup": bool(slot.backup), "maxconn": int(slot.maxconn),
                "active": max(0, self.open_connections(index)),
                "failures": int(slot.failures),
                "connections": counts["connections"],
                "failed": {kind: counts[f"failed_{kind}"] for kind in relay_core.FAILURE_KINDS},
                "failovers": counts["failovers"],
                "over_maxconn": counts["over_maxconn"],
                "state_changes": int(slot.state_changes),
                "checks": counts["checks"], "checks_failed": counts["checks_failed"],
                "last_check": round(slot.last_check, 3) if slot.last_check else None,
                "check_ok": bool(slot.check_ok) if slot.last_check else None,
                "check_latency_ms": round(slot.check_latency * 1000, 3) if slot.last_check else None,
            })
        return out


class Balanced(RelaySettings):
    """The relay settings with their :class:`Balancer`: what both relay forms are built on.

    Each configured subclass gets its own balancer (health, open connections
    and weighted turns outlive a connection: the one piece of class-level
    state), on the daemon's shared board when ``upstream_board`` is set.
    """

    balancer: ClassVar[Balancer]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.balancer = Balancer(cls.upstreams, cls.upstream_specs, balance=cls.balance, slow_start=cls.slow_start,
                                check_interval=cls.check_interval, connect_timeout=cls.connect_timeout,
                                board=cls.upstream_board, worker=cls.worker_index,
                                resolve=cls.upstream_board is not None)
        cls.balancer.check_how = {"send_proxy": cls.send_proxy, "tls_context": cls.upstream_tls,
                                  "server_name": cls.upstream_server_name, "send": cls.check_send,
                                  "expect": cls.check_expect}

    @classmethod
    def start_checks(cls) -> None:
        """Start the active checks (``check_interval``) in this process: call once in a worker, after the fork."""
        cls.balancer.start_checks()


class Balancer:
    """One relay class's upstreams in one process: which a connection tries, and what came of each try.

    ``upstreams`` and ``specs`` (same order) are the configured list; the
    board is the daemon's (``worker`` is this worker's record index), or a
    private one for a relay served outside the daemon.
    """

    def __init__(self, upstreams: Sequence[Upstream], specs: Sequence[UpstreamSpec], *, balance: str,
                 slow_start: float, check_interval: float, connect_timeout: float,
                 board: UpstreamBoard | None = None, worker: int = 0, resolve: bool = False) -> None:
        self.upstreams = tuple(upstreams)
        # each upstream's addresses, resolved once (a worker of a generation: a reload resolves them again);
        # empty: resolved by each connection attempt (a relay outside the daemon, or a name that failed)
        self.addresses: dict[Upstream, list[Upstream]] = {u: resolve_upstream(u) for u in upstreams} if resolve \
            else {}
        self.specs = tuple(specs)
        self.balance = balance
        self.slow_start = slow_start
        self.check_interval = check_interval
        self.connect_timeout = connect_timeout
        self.names = [spec.name for spec in self.specs]
        found = [board.find(name) for name in self.names] if board is not None else []
        slots = [s for s in found if s is not None]
        if board is None or len(slots) < len(self.names) or not 0 <= worker < board.workers:
            board = UpstreamBoard(1)  # served outside the daemon (or its board lacks them): this process alone
            slots = board.place(self.specs)
            worker = 0
        self.board = board
        self.slots = slots
        self.worker = worker
        self.index = {address: i for i, address in enumerate(self.upstreams)}
        self._entries = [board.slots[slot] for slot in self.slots]  # views into the shared mapping, made once
        self._mine = [worker * SLOTS + slot for slot in self.slots]  # our open connections, in board.active
        self._cells = [(worker * SLOTS + slot) * N_COUNTERS for slot in self.slots]  # our counters
        self._weights = [float(spec.weight) for spec in self.specs]
        self._backups = [spec.backup for spec in self.specs]
        self._maxconns = [spec.maxconn for spec in self.specs]
        self._counts_active = balance == relay_core.LEASTCONN or any(self._maxconns)
        self._turns = relay_core.Turns()
        self._lock = threading.Lock()  # the turns and our cells, between a thread worker's threads; never across I/O
        self._checks: threading.Thread | None = None
        # how a check (or a half-open try made apart from a connection) is made: check()'s arguments
        self.check_how: dict[str, Any] = {}

    # -- the hot path ---------------------------------------------------------------------------------

    def candidates(self) -> list[Upstream]:
        """The upstreams a new connection tries, in order (the first is the pick); may be empty."""
        n = len(self.upstreams)
        if not n:
            return []
        now = time.monotonic()
        probing = self.check_interval <= 0  # with checks, a check is the half-open try, not a client
        admissions = []
        for entry in self._entries:  # relay_core.admission, written out: no call per upstream on this path
            if entry.state == UP:
                admissions.append(USE)
            elif probing and now >= entry.retry_at:
                admissions.append(PROBE)
            else:
                admissions.append(SKIP)
        if self._counts_active:
            active, used = self.board.active, self.board.used()
            span = used * SLOTS
            actives = [sum(active[slot:slot + span:SLOTS]) for slot in self.slots]
        else:
            actives = [0] * n
        weights = self._weights
        if self.slow_start > 0:
            weights = [relay_core.effective_weight(
                spec.weight, now - entry.up_at if entry.up_at else None, self.slow_start)
                for spec, entry in zip(self.specs, self._entries, strict=True)]
        with self._lock:
            choice = relay_core.choose(admissions, weights, self._backups, actives, self._maxconns, self._turns,
                                       self.balance)
        if choice.probe is not None:
            self._claim(choice.probe, now)
            if choice.background:
                threading.Thread(target=self._probe, args=(choice.probe,), name="relay-probe", daemon=True).start()
        counters = self.board.counters
        for i in choice.full:
            self._add(counters, self._cells[i] + OVER_MAXCONN, 1)
        upstreams = self.upstreams
        return [upstreams[i] for i in choice.order]

    def addresses_for(self, address: Upstream) -> list[Upstream]:
        """Where to connect for ``address``: its addresses as resolved for this generation, else itself."""
        return self.addresses.get(address) or [address]

    def _add(self, cells: memoryview, k: int, n: int) -> None:
        """``cells[k] += n`` for this worker: under the lock, as a thread worker's threads share its cells.

        Python promises no atomic read-add-store between threads (CPython 3.11 happens not to switch
        inside this one; a free-threaded build would), and a lost decrement is an open connection for good.
        """
        with self._lock:
            cells[k] += n

    def _claim(self, i: int, now: float) -> None:
        """This connection is the half-open try of upstream ``i``: nobody else tries it until it ends."""
        entry = self._entries[i]
        # if we die trying, someone may claim it once the try's deadline passed
        health = relay_core.claimed(Health(int(entry.state), int(entry.failures), float(entry.retry_at)), now,
                                    now + self.connect_timeout + 1.0)
        entry.retry_at = health.retry_at
        entry.state = health.state

    def _probe(self, i: int) -> None:
        """The half-open try of upstream ``i``, as a check, in a thread of its own (it may take the timeout)."""
        try:
            self.check(i, **self.check_how)
        except Exception:  # nothing known raises here; a bug must not go unseen
            log.exception("half-open try of upstream %s failed unexpectedly", self.names[i])

    def attempt(self, address: Upstream) -> int | None:
        """A connection starts trying ``address``: counted open from now. Its index, None when not one of ours."""
        i = self.index.get(address)
        if i is not None:
            self._add(self.board.active, self._mine[i], 1)
        return i

    def failed(self, i: int | None, exc: BaseException, stage: str = "", *, failover: bool = False) -> None:
        """The attempt on upstream ``i`` failed at ``stage``; ``failover``: the client goes on to another."""
        if i is None:
            return
        self._add(self.board.active, self._mine[i], -1)
        cell = self._cells[i]
        self._add(self.board.counters, cell + _FAILED[relay_core.failure_kind(exc, stage)], 1)
        if failover:
            self._add(self.board.counters, cell + FAILOVERS, 1)
        self._went_down(i, relay_core.attempt_failed(self.upstreams[i], exc, self.connect_timeout, stage=stage))

    def connected(self, i: int | None) -> None:
        """The attempt on upstream ``i`` worked: one more connection, and the upstream is up."""
        if i is None:
            return
        self._add(self.board.counters, self._cells[i] + CONNECTIONS, 1)
        entry = self._entries[i]
        if entry.state != UP or entry.failures:  # a store only when something changes: the line is shared
            self._came_up(i, "a connection")

    def finished(self, i: int | None) -> None:
        """A connection to upstream ``i`` (one :meth:`connected`) ended."""
        if i is not None:
            self._add(self.board.active, self._mine[i], -1)

    def give_up(self, i: int | None) -> None:
        """An attempt that neither failed nor connected (the client went away meanwhile): not open any more."""
        if i is None:
            return
        self._add(self.board.active, self._mine[i], -1)
        entry = self._entries[i]
        if entry.state == HALF_OPEN:  # our try is void: let the next connection try at once
            entry.state = DOWN
            entry.retry_at = 0.0

    # -- state changes (logged once each: by the worker that makes them) ------------------------------

    def _went_down(self, i: int, why: str) -> None:
        entry = self._entries[i]
        before = int(entry.state)
        health = relay_core.after_failure(Health(before, int(entry.failures), float(entry.retry_at)),
                                          time.monotonic())
        entry.failures = health.failures
        entry.retry_at = health.retry_at
        entry.state = health.state
        if relay_core.change(before, health.state):
            entry.changed_at = time.time()
            entry.state_changes += 1
            log.warning("upstream %s is down: %s; %s", self.names[i], why, self._retry_words(health))
        else:  # no change: the warning said it is down (a check every interval would flood the log)
            log.debug("upstream %s still down: %s; %s", self.names[i], why, self._retry_words(health))

    def _retry_words(self, health: Health) -> str:
        if self.check_interval > 0:
            return f"checked again every {self.check_interval:g}s"
        return f"tried again in {relay_core.backoff(health.failures):g}s"

    def _came_up(self, i: int, by: str) -> None:
        entry = self._entries[i]
        before = int(entry.state)
        failures = int(entry.failures)
        health = relay_core.after_success(Health(before, failures, float(entry.retry_at)))
        entry.failures = health.failures
        entry.retry_at = health.retry_at
        entry.state = health.state
        if relay_core.change(before, health.state):
            entry.changed_at = time.time()
            entry.up_at = time.monotonic()
            entry.state_changes += 1
            log.info("upstream %s is up again (%s worked after %d failure%s)", self.names[i], by, failures,
                     "" if failures == 1 else "s")

    # -- active checks --------------------------------------------------------------------------------

    def start_checks(self) -> None:
        """Check every upstream each ``check_interval`` in a thread of this process, from now on.

        Call in a worker (after the fork), once. Each check is claimed in the
        board first, so with many workers an upstream is still checked once per
        interval; the thread only waits otherwise. Checks are made as
        ``check_how`` says (:meth:`check`'s arguments).
        """
        if self.check_interval <= 0 or self._checks is not None or not self.upstreams:
            return
        self._checks = threading.Thread(target=self._run_checks, args=(self.check_how,), name="relay-checks",
                                        daemon=True)
        self._checks.start()

    def _run_checks(self, how: dict[str, Any]) -> None:
        idle = threading.Event()  # never set: its wait is the pause until the next check is due
        entries = self._entries
        while True:
            now = time.monotonic()
            for i, entry in enumerate(entries):
                if now < entry.check_due:
                    continue
                entry.check_due = now + self.check_interval  # claimed: the other workers skip it this turn
                try:
                    self.check(i, **how)
                except Exception:  # a bug must not end the checks for good
                    log.exception("relay check of upstream %s failed unexpectedly", self.names[i])
                now = time.monotonic()
            due = min(entry.check_due for entry in entries)
            idle.wait(max(0.01, due - time.monotonic()))

    def check(self, i: int, *, send_proxy: bool = False, tls_context: ssl.SSLContext | None = None,
              server_name: str | None = None, send: bytes | None = None, expect: bytes | None = None) -> bool:
        """Check upstream ``i`` now (blocking, within ``connect_timeout``) and record the result; True: it is up.

        A TCP connect; with ``send_proxy`` a PROXY v2 LOCAL header (the
        upstream may expect one first, and LOCAL says "a check, not a
        client"); with ``tls_context`` the TLS handshake, verifying the
        certificate; then ``send`` when given, and an answer containing
        ``expect`` when given. Then a clean close.
        """
        address = self.upstreams[i]
        entry = self._entries[i]
        started = time.monotonic()
        deadline = started + self.connect_timeout
        cell = self._cells[i]
        self._add(self.board.counters, cell + CHECKS, 1)
        stage = ""
        try:
            with connect_first(self.addresses_for(address), self.connect_timeout) as sock:
                if send_proxy:
                    stage = "PROXY header"
                    sock.sendall(build_v2(None, None))
                if tls_context is None:
                    stage = "exchange"
                    _exchange(sock, send, expect, deadline)
                else:
                    stage = "TLS handshake"
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    with tls_context.wrap_socket(sock, server_hostname=relay_core.server_name(
                            server_name, address[0])) as wrapped:
                        stage = "exchange"
                        _exchange(wrapped, send, expect, deadline)
                        with contextlib.suppress(OSError, ValueError):
                            wrapped.unwrap()  # close_notify: a clean end for the upstream's log
        except (OSError, ValueError) as exc:
            entry.last_check = time.time()
            entry.check_latency = time.monotonic() - started
            entry.check_ok = 0
            self._add(self.board.counters, cell + CHECKS_FAILED, 1)
            if isinstance(exc, ValueError):  # a server name Python refuses
                exc = OSError(f"cannot ask for that server name: {exc}")
            self._went_down(i, "check " + relay_core.attempt_failed(address, exc, self.connect_timeout, stage=stage))
            return False
        entry.check_latency = time.monotonic() - started
        entry.last_check = time.time()
        entry.check_ok = 1
        if entry.state != UP or entry.failures:
            self._came_up(i, "a check")
        return True


def resolve_upstream(address: Upstream) -> list[Upstream]:
    """``address``'s host resolved now: its IP addresses with the port, in the resolver's order; [] when it fails."""
    host, port = address
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.warning("cannot resolve upstream %s:%d now (%s): resolving it on each connection instead", host, port,
                    relay_core.reason(exc))
        return []
    addresses: list[Upstream] = []
    for _family, _type, _proto, _name, sockaddr in found:
        ip = (str(sockaddr[0]), int(sockaddr[1]))
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def connect_first(addresses: Sequence[Upstream], timeout: float) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that accepts (each within ``timeout``); the last error."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection(address, timeout=timeout)
        except OSError as exc:
            error = exc
    assert error is not None  # never called with no address
    raise error


def _exchange(sock: socket.socket, send: bytes | None, expect: bytes | None, deadline: float) -> None:
    """Send ``send``, then read until the answer contains ``expect`` (by ``deadline``); ``OSError`` otherwise."""
    if send:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(send)
    if not expect:
        return
    got = b""
    while expect not in got:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {expect!r} in the answer {got[:64]!r} in time")
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"expected {expect!r}, got {got[:64]!r} then the end of the connection")
        got = (got + chunk)[-(len(expect) + 4096):]
