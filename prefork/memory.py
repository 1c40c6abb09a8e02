"""A worker's own memory, from the kernel's ``/proc/PID/smaps_rollup``: USS, PSS and RSS.

``--max-worker-memory`` compares the USS (unique set size: the pages only
this process maps, ``Private_Clean + Private_Dirty``), because that is the
memory a worker holds for itself and what replacing it gives back. RSS counts
the pages a worker still shares with the master and its siblings (the
interpreter, ``--preload``'s modules), so a worker far under the limit by its
own memory can be over it by RSS, and be recycled again and again to no gain.
PSS (each shared page divided among its sharers) moves when a sibling starts
or exits, not only when this worker grows: it is shown beside USS, as the
fair share of the machine's memory, but recycling does not act on it. A leak
in the worker's own heap grows its USS one for one.

``smaps_rollup`` (Linux 4.14+) is one short read per process. It is readable
by the process's own user unless the process is not dumpable: workers of a
master that switched users itself (``--user``) are not, and then only RSS is
known (from psutil, as before).
"""

from __future__ import annotations

from dataclasses import dataclass

ROLLUP = "/proc/{pid}/smaps_rollup"


@dataclass(frozen=True)
class Memory:
    """Bytes: resident, proportional share, and unique to the process."""

    rss: int
    pss: int
    uss: int


def parse_smaps_rollup(text: str) -> Memory | None:
    """The totals of ``/proc/PID/smaps_rollup``'s text (``Name:  123 kB`` lines); None if they are not there."""
    kib: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
            kib[name.strip()] = int(fields[0])
    if not {"Rss", "Pss", "Private_Clean", "Private_Dirty"} <= kib.keys():
        return None
    uss = kib["Private_Clean"] + kib["Private_Dirty"] + kib.get("Private_Hugetlb", 0)
    return Memory(rss=kib["Rss"] * 1024, pss=kib["Pss"] * 1024, uss=uss * 1024)


def read(pid: int) -> Memory | None:
    """Process ``pid``'s memory; None when it is gone, or the kernel does not let us read it."""
    try:
        with open(ROLLUP.format(pid=pid), encoding="ascii", errors="replace") as f:
            return parse_smaps_rollup(f.read())
    except OSError:  # gone, no smaps_rollup (old kernel), or not dumpable (EACCES)
        return None
