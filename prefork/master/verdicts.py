"""Whether a new generation does worse than the old one: pure decisions on counters, tested by table.

A reload's canary (one new worker beside the old generation) and its
probation (the whole new generation, with the old one's mold kept for a
rollback) are judged by the same rule, :func:`judge_canary`, on the same
figures, :class:`CanaryFigures`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# the canary rule (judge_canary): errors are judged once the canary served this many connections
CANARY_MIN_CONNECTIONS = 10
CANARY_MARGIN = 0.05  # the canary's error rate may pass the old generation's by this much
CANARY_SLACK = 2  # and by this many errors, so one unlucky error in a small sample is no verdict


@dataclass(frozen=True)
class CanaryFigures:
    """The new workers' window against the old generation's: what :func:`judge_canary` judges."""

    seconds: float
    connections: int  # connections the canary handled to the end
    errors: int  # of them, those its handler raised on
    error_type: str = ""  # the class name of its handler's latest exception
    exits: int = 0  # the canary's worker ended unasked (1) or not (0)
    exit_how: str = ""  # how it ended ("exited with status 1", "was killed by SIGKILL ...")
    hung: int = 0  # the master killed it for a stale heartbeat
    old_connections: int = 0
    old_errors: int = 0
    old_exits: int = 0  # the old generation's workers that ended unasked meanwhile
    old_hung: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def judge_canary(f: CanaryFigures, who: str = "canary", worker: str = "its worker") -> str | None:
    """None when the canary did no worse than the old generation; else why, with the figures.

    In order: a canary that hung or whose worker ended unasked fails (the
    old generation is not its excuse: a new worker must not die young).
    Errors are judged only once it served CANARY_MIN_CONNECTIONS
    connections; then it fails when its errors pass the old generation's
    rate plus CANARY_MARGIN of its connections, plus CANARY_SLACK errors.
    ``who`` and ``worker`` name what is judged in the reason (a probation
    judges a whole generation).
    """
    old = f"old generation: {f.old_errors} of {f.old_connections}"
    if f.hung:
        return (f"{who}: {worker} hung (no heartbeat within --timeout) after {f.connections} connection(s) "
                f"({old}, {f.old_hung} hung)")
    if f.exits:
        return (f"{who}: {worker} {f.exit_how or 'exited'} after {f.connections} connection(s) "
                f"({old}; {f.old_exits} old worker(s) ended meanwhile)")
    if f.connections < CANARY_MIN_CONNECTIONS:
        return None
    old_rate = f.old_errors / f.old_connections if f.old_connections else 0.0
    if f.errors > f.connections * (old_rate + CANARY_MARGIN) + CANARY_SLACK:
        raised = f"raised {f.error_type}" if f.error_type else "failed"
        return f"{who}: {f.errors} of {f.connections} connections {raised} ({old})"
    return None
