"""The kernel's counters of connections it could not queue, from ``/proc/net/netstat``.

``ListenOverflows`` counts handshakes completed while a listener's accept
queue was full, ``ListenDrops`` every connection request a listener dropped
(overflows included). They are per network namespace, not per socket: a
difference over a reload or a stop says whether anything on this machine was
turned away meanwhile, which is what an operator checking "lost nothing"
wants to see. Outside Linux, or without ``/proc``, there is nothing to read.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

NETSTAT = "/proc/net/netstat"


@dataclass(frozen=True)
class ListenCounters:
    overflows: int
    drops: int

    def since(self, before: ListenCounters) -> dict[str, int]:
        return {"listen_overflows": self.overflows - before.overflows, "listen_drops": self.drops - before.drops}


def parse_netstat(text: str) -> ListenCounters | None:
    """The TcpExt counters from the text of ``/proc/net/netstat`` (a header line, then a value line)."""
    lines = [line.split() for line in text.splitlines()]
    for names, values in itertools.pairwise(lines):
        if names[:1] == ["TcpExt:"] and values[:1] == ["TcpExt:"] and len(names) == len(values):
            table = dict(zip(names[1:], values[1:], strict=True))
            try:
                return ListenCounters(int(table.get("ListenOverflows", 0)), int(table.get("ListenDrops", 0)))
            except ValueError:
                return None
    return None


def listen_counters(path: str = NETSTAT) -> ListenCounters | None:
    """The counters now; None when they cannot be read. Never raises: a report is not worth a failure."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return None
    # bytes.decode("ascii") needs no codec lookup: after --user the master may not be able to import one
    return parse_netstat(data.decode("ascii", "replace"))


VMSTAT = "/proc/vmstat"


def oom_kills(path: str = VMSTAT) -> int | None:
    """Processes the kernel's out-of-memory killer has killed since boot (any cgroup's included); None
    when that cannot be read. Never raises."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return None
    for line in data.split(b"\n"):
        name, _, value = line.partition(b" ")
        if name == b"oom_kill":
            try:
                return int(value)
            except ValueError:
                return None
    return None
