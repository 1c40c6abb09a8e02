"""Per-worker counters in shared memory, written by workers, read by the master.

Like Apache prefork's scoreboard: a shared mapping made before the first
fork, one fixed-size record per worker. It maps a memory file
(``memfd_create``), so a master that executes a new program in place (an
upgrade) hands the descriptor to its new image and maps the same records
its live workers write. A worker updates its own record
with plain stores (no system call, no lock shared with other processes), so
counting costs the hot path almost nothing; the master reads every record
when asked for status. Each field is 8 bytes and naturally aligned, so a
read never sees half of a store.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import zlib
from collections.abc import Iterable

from prefork.handlers.upstreams import UpstreamBoard

# why a worker closed a connection itself (prefork.workers.admission.Reason), each a ``closed_<reason>`` field
CLOSE_REASONS = ("idle_timeout", "reclaimed", "per_source", "handshake_dropped", "drain_idle", "handler_timeout",
                 "relay_loop")
SOURCE_BUCKETS = 1024  # per record; a source counts in two of them (a count-min sketch)


class Record(ctypes.Structure):
    """One worker's counters."""

    _fields_ = [
        ("pid", ctypes.c_int64),
        ("generation", ctypes.c_int64),
        ("heartbeat", ctypes.c_double),  # time.monotonic() when the serving loop last turned
        ("requests", ctypes.c_uint64),  # connections handled to the end
        ("active", ctypes.c_int64),  # connections open now
        ("errors", ctypes.c_uint64),  # handler exceptions
        ("bytes_in", ctypes.c_uint64),
        ("bytes_out", ctypes.c_uint64),
        ("lb_drain", ctypes.c_int64),  # set by the master: fail load-balancer health checks
        ("proxy_errors", ctypes.c_uint64),  # connections closed for a missing or bad PROXY header
        ("accepting", ctypes.c_int64),  # 1 while the worker takes new connections (siblings balance on it)
        # TLS handshakes completed, by version, and failed, by reason (prefork.tls.FAILURE_REASONS)
        ("tls_handshakes", ctypes.c_uint64),
        ("tls_v12", ctypes.c_uint64),
        ("tls_v13", ctypes.c_uint64),
        ("tls_failed_timeout", ctypes.c_uint64),
        ("tls_failed_not_tls", ctypes.c_uint64),
        ("tls_failed_version", ctypes.c_uint64),
        ("tls_failed_cipher", ctypes.c_uint64),
        ("tls_failed_certificate", ctypes.c_uint64),
        ("tls_failed_closed", ctypes.c_uint64),
        ("tls_failed_other", ctypes.c_uint64),
        # the class name of the handler's latest exception (a reload's canary names it when it fails)
        ("error_type", ctypes.c_char * 32),
        # connections the worker closed itself, by reason (prefork.workers.admission.Reason)
        ("closed_idle_timeout", ctypes.c_uint64),
        ("closed_reclaimed", ctypes.c_uint64),
        ("closed_per_source", ctypes.c_uint64),
        ("closed_handshake_dropped", ctypes.c_uint64),
        ("closed_drain_idle", ctypes.c_uint64),
        ("closed_handler_timeout", ctypes.c_uint64),
        ("closed_relay_loop", ctypes.c_uint64),
        ("oldest_silent_since", ctypes.c_double),  # time.monotonic() its silent-longest connection last spoke
        ("oldest_handler_since", ctypes.c_double),  # time.monotonic() a handler took the connection it holds longest
        ("stuck_handlers", ctypes.c_uint64),  # handlers that did not return after --handler-timeout closed theirs
        # open connections per source, two hashed buckets each (SourceCounts): siblings sum each other's
        ("sources", ctypes.c_uint32 * SOURCE_BUCKETS),
    ]


def count_error(record: Record, exc: BaseException | None) -> None:
    """A handler raised ``exc`` on a connection: count it, and keep the exception's class name."""
    record.errors += 1
    if exc is not None:
        record.error_type = type(exc).__name__.encode("ascii", "replace")[:31]


class Header(ctypes.Structure):
    """What the whole board shares, ahead of the records."""

    _fields_ = [
        ("used", ctypes.c_int64),  # records ever handed out: every live worker's index is below it
    ]


class Scoreboard:
    """``capacity`` records, then the relay's upstream board, in one shared memory file (the master allots records)."""

    def __init__(self, capacity: int, *, fd: int | None = None, taken: Iterable[int] = ()) -> None:
        """A new board, or (``fd``) the one a previous image of this master made, its ``taken`` records live."""
        self.capacity = capacity
        size = ctypes.sizeof(Header) + ctypes.sizeof(Record) * capacity
        total = size + UpstreamBoard.size(capacity)
        if fd is None:
            fd = os.memfd_create("prefork-scoreboard", os.MFD_CLOEXEC)
            os.ftruncate(fd, total)
        self.fd = fd  # kept open: handed across an exec in place
        self._mem = mmap.mmap(fd, total)  # MAP_SHARED
        self._header = Header.from_buffer(self._mem)
        self._records = (Record * capacity).from_buffer(self._mem, ctypes.sizeof(Header))
        busy = set(taken)
        # lowest first, so live records stay below a low ``used``
        self._free = [index for index in range(capacity - 1, -1, -1) if index not in busy]
        # the relay's upstreams, shared the same way (per upstream and per worker, by record index), in the
        # same memory file: a re-executed mold and the master after an upgrade in place see the same board
        self.upstreams = UpstreamBoard(capacity, used=lambda: int(self._header.used), buffer=self._mem,
                                       offset=size)

    def allocate(self, pid: int, generation: int, now: float) -> int:
        """Take a free record, zeroed, for a worker about to be forked (raises IndexError when full)."""
        index = self._free.pop()
        ctypes.memset(ctypes.addressof(self._records[index]), 0, ctypes.sizeof(Record))
        record = self._records[index]
        record.pid = pid
        record.generation = generation
        record.heartbeat = now
        self._header.used = max(self._header.used, index + 1)
        return index

    def release(self, index: int) -> None:
        """Free a gone worker's record (its counters already read): it is nobody's sibling any more."""
        record = self._records[index]
        record.pid = record.generation = record.active = record.accepting = 0
        self.upstreams.retire(index)
        self._free.append(index)

    @property
    def used(self) -> int:
        """How many records from the first may be live (a worker scans only these for its siblings)."""
        return int(self._header.used)

    def __getitem__(self, index: int) -> Record:
        record: Record = self._records[index]
        return record


def source_buckets(key: str) -> tuple[int, int]:
    """The two buckets of ``key`` (a source address): the same in every process, unlike ``hash()``."""
    data = key.encode()
    return zlib.crc32(data) % SOURCE_BUCKETS, zlib.crc32(data, 0x9E3779B9) % SOURCE_BUCKETS


class SourceCounts:
    """Open connections per source across every worker of the daemon, in the shared scoreboard.

    A worker adds to and takes from its own record's buckets only (plain
    stores, no lock); the count of a source is the smaller of its two
    buckets' sums over the live records (a count-min sketch: never less than
    the truth, more only when another source shares both buckets).
    """

    def __init__(self, scoreboard: Scoreboard, index: int) -> None:
        self.scoreboard = scoreboard
        self.own = scoreboard[index].sources
        self._records: list[Record] = []

    def _live(self) -> list[Record]:
        used = self.scoreboard.used
        while len(self._records) < used:
            self._records.append(self.scoreboard[len(self._records)])
        return [r for r in self._records[:used] if r.pid]

    def count(self, key: str) -> int:
        a, b = source_buckets(key)
        live = self._live()
        return int(min(sum(r.sources[a] for r in live), sum(r.sources[b] for r in live)))

    def add(self, key: str, delta: int) -> None:
        own = self.own
        for bucket in source_buckets(key):
            own[bucket] = max(0, own[bucket] + delta)

