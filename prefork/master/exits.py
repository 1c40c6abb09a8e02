"""How a worker's exit reads, and what the master does about it: pure functions, tested without forking."""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from prefork.master.state import WorkerState
from prefork.workers.entry import WORKER_BOOT_ERROR

EARLY_DEATH = 10.0  # a worker that dies younger than this counts towards backoff
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0


def describe_exit(status: int, sent: Mapping[int, str] | None = None, *, boot_error: bool = False,
                  oom_kills: int | None = None) -> tuple[str, bool]:
    """('exited with status 3', clean?) from a waitpid status, by meaning.

    ``sent`` maps the signals the master sent this process to why it sent
    them: a worker the master killed (a stale heartbeat, the graceful timeout)
    reads as that. Any other SIGKILL is blamed on the kernel's out-of-memory
    killer only when that is plausible: ``oom_kills`` is how many processes
    it killed on this machine during the worker's life (``/proc/vmstat``),
    None when that cannot be known. Status 3 means the handler could not be
    loaded only when the worker said so (``boot_error``): a handler may
    ``os._exit(3)`` too.
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        why = (sent or {}).get(sig)
        if why:
            return f"was killed by {name} (sent by the master: {why})", False
        if sig == signal.SIGKILL:
            if oom_kills is None:
                return "was killed by SIGKILL (out of memory?)", False
            if oom_kills:
                return "was killed by SIGKILL (out of memory: the kernel's OOM killer ran meanwhile)", False
            return "was killed by SIGKILL (not by the master, nor the kernel's OOM killer)", False
        return f"was killed by {name}", False
    code = os.waitstatus_to_exitcode(status)
    if code == WORKER_BOOT_ERROR and boot_error:
        return "could not load its handler", False
    return f"exited with status {code}", code == 0


def backoff_delay(failures: int) -> float:
    """0 for the first death, then 0.1 s doubling per early death, capped at BACKOFF_MAX."""
    if failures <= 1:
        return 0.0
    return float(min(BACKOFF_FIRST * 2.0 ** min(failures - 2, 64), BACKOFF_MAX))


def failures_after(previous: int, lifetime: float) -> int:
    """The slot's early deaths in a row once a worker that lived ``lifetime`` seconds died."""
    return previous + 1 if lifetime < EARLY_DEATH else 1


class ExitAction(enum.Enum):
    """What the master does when a worker is gone."""

    EXPECTED = "expected"  # it was told to go and went cleanly: one info line
    RELOAD_FAILED = "reload failed"  # a worker of the generation being started died: abort the reload
    FATAL = "fatal"  # the handler cannot be loaded and nothing serves yet: stop the daemon
    GONE = "gone"  # not in a slot (draining, scaled away) or the daemon stops: log it, replace nothing
    RESPAWN = "respawn"  # it held a slot of the serving generation: replace it (after backoff)


@dataclass(frozen=True)
class ExitFacts:
    """What the master knows of a worker when it has exited."""

    clean: bool  # exit status 0
    state: WorkerState
    in_slot: bool  # it still held its slot in the serving generation
    in_reload: bool  # it held a slot of the generation being started
    boot_error: bool  # it said its handler cannot be loaded
    stopping: bool  # the daemon is stopping
    serving: bool  # the first generation has been up
    drained: bool = False  # drain --close closed the listeners: a worker gone is not replaced


def classify_exit(facts: ExitFacts) -> ExitAction:
    """The decision, in order of precedence.

    A worker still holding its slot (killed for a stale heartbeat, or one that
    died unasked) is replaced however it ended; one that was told to go and
    went cleanly is expected; a boot error before anything served means no
    worker ever can, so the daemon stops rather than fork-loop.
    """
    told_to_go = facts.state in (WorkerState.DRAINING, WorkerState.KILLING) and not facts.in_slot
    if (told_to_go or facts.stopping) and facts.clean:
        return ExitAction.EXPECTED
    if facts.in_reload:
        return ExitAction.RELOAD_FAILED
    if facts.boot_error and not facts.serving and not facts.stopping:
        return ExitAction.FATAL
    if facts.stopping or facts.drained or not facts.in_slot:
        return ExitAction.GONE
    return ExitAction.RESPAWN
