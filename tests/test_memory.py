"""A worker's own memory: parsing smaps_rollup, and which workers the master replaces for memory (pure)."""

from __future__ import annotations

import os

import pytest

from prefork import memory
from prefork.master.checks import memory_recycles
from prefork.memory import Memory

ROLLUP = """55c501449000-7ffe98d9b000 ---p 00000000 00:00 0                          [rollup]
Rss:                1672 kB
Pss:                 216 kB
Pss_Dirty:           116 kB
Shared_Clean:       1516 kB
Shared_Dirty:          0 kB
Private_Clean:        40 kB
Private_Dirty:       116 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
"""


@pytest.mark.parametrize(("text", "expected"), [
    (ROLLUP, Memory(rss=1672 * 1024, pss=216 * 1024, uss=156 * 1024)),
    (ROLLUP.replace("Private_Hugetlb:       0 kB", "Private_Hugetlb:    2048 kB"),
     Memory(rss=1672 * 1024, pss=216 * 1024, uss=(156 + 2048) * 1024)),
    (ROLLUP.replace("Private_Hugetlb:       0 kB\n", ""), Memory(rss=1672 * 1024, pss=216 * 1024, uss=156 * 1024)),
    (ROLLUP.replace("Pss:                 216 kB\n", ""), None),  # a field missing: not a rollup we know
    ("", None),
    ("Rss: lots\nPss: 1 kB\nPrivate_Clean: 1 kB\nPrivate_Dirty: 1 kB\n", None),
])
def test_parse_smaps_rollup(text: str, expected: Memory | None) -> None:
    assert memory.parse_smaps_rollup(text) == expected


def test_read_this_process_and_a_gone_one() -> None:
    mine = memory.read(os.getpid())
    assert mine is not None and 0 < mine.uss <= mine.pss <= mine.rss
    assert memory.read(2**22 + 12345) is None  # no such pid


MIB = 2**20


@pytest.mark.parametrize(("sizes", "not_serving", "target", "chosen"), [
    ({1: 10 * MIB, 2: 20 * MIB}, 0, 2, []),  # none over
    ({1: 70 * MIB, 2: 20 * MIB}, 0, 2, [1]),
    ({1: 70 * MIB, 2: 90 * MIB}, 0, 2, [2]),  # one at a time in a small pool: the largest first
    ({1: 70 * MIB, 2: 90 * MIB}, 1, 2, []),  # a successor still starting: wait for it
    ({p: (60 + p) * MIB for p in range(1, 9)}, 0, 8, [8, 7]),  # a quarter of 8
    ({p: (60 + p) * MIB for p in range(1, 9)}, 1, 8, [8]),
    ({p: (60 + p) * MIB for p in range(1, 9)}, 2, 8, []),
    ({p: 100 * MIB for p in range(1, 17)}, 0, 16, [16, 15, 14, 13]),
    ({1: 64 * MIB}, 0, 1, []),  # at the limit is not over it
    ({1: 64 * MIB + 1}, 0, 1, [1]),
])
def test_memory_recycles(sizes: dict[int, int], not_serving: int, target: int, chosen: list[int]) -> None:
    assert memory_recycles(sizes, 64 * MIB, not_serving, target) == chosen
