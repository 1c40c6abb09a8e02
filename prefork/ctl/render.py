"""How ``preforkctl`` lays out what people read: one table renderer and the human units in its cells.

``status`` and ``top`` both draw their workers with :func:`table`; each
decides its columns and which of them read better aligned right.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

COLUMN_GAP = "  "


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[str] = ()) -> list[str]:
    """A header line and one line per row, columns ``COLUMN_GAP`` apart, trailing spaces stripped.

    Every column is as wide as its widest cell; cells are aligned left, except in
    the columns whose header is in ``right``.
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return COLUMN_GAP.join(c.rjust(w) if h in right else c.ljust(w)
                               for c, w, h in zip(cells, widths, headers, strict=True)).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # not reached: GiB takes everything left


def human_age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_share(share: object) -> str:
    """A worker's share of its generation's open connections, in percent ("-" from a daemon without it)."""
    return f"{100 * share:.1f}%" if isinstance(share, int | float) and not isinstance(share, bool) else "-"


def optional_bytes(value: object) -> str:
    """Bytes for people, ``-`` when unknown (a worker's USS the kernel hides)."""
    return human_bytes(value) if isinstance(value, int) and not isinstance(value, bool) else "-"
