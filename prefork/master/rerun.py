"""A master whose reload is an upgrade: the program is started again, so it runs the code on disk.

A master that holds the handler's code in memory (a program serving
through :mod:`prefork.api`, or ``--preload``) would fork new workers running
that old code again. So its reload (HUP, ``preforkctl reload``) starts the
program again as a new master on the same sockets (:mod:`prefork.upgrade`)
and answers in the words of a reload once only the new code accepts. If the
new program fails before it serves, the reload fails and this master keeps
serving. The generation number goes on in the new master.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psutil

from prefork.control import ControlConnection
from prefork.master.loop import Master
from prefork.master.reload import HeldReply, Waiter

log = logging.getLogger(__name__)

class RerunMaster(Master):
    """A master whose reload starts the program again on its sockets (see the module docstring)."""

    def begin_reload(self, waiters: Sequence[Waiter]) -> None:
        """HUP / ``preforkctl reload``: run the program again on our sockets; answer once it alone accepts."""
        why = self.cannot_rerun()
        if why is None:
            log.info("reload: starting the program again, so that it runs the code on disk now")
            self.begin_upgrade(None)
            upgrade = self.upgrader.current
            if upgrade is not None:
                if waiters:
                    upgrade.waiters.append(ReloadReply(self, list(waiters), self.gens.generation + 1))
                return
            why = "the program could not be started again (see the log)"
        else:
            log.error("reload refused: %s", why)
        for waiter in waiters:
            waiter.reply({"ok": False, "error": f"reload failed: {why}"})

    def begin_upgrade(self, waiter: ControlConnection | None = None) -> None:
        why = self.cannot_rerun()
        if why is not None:
            log.error("upgrade refused: %s", why)
            if waiter is not None:
                waiter.reply({"ok": False, "error": f"upgrade failed: {why}"})
            return
        super().begin_upgrade(waiter)  # the new master's generation count goes on (GENERATION_ENV)

    def cannot_rerun(self) -> str | None:
        """Why the program cannot be started again now, or None. May be extended."""
        if self.stopping is not None:
            return "the daemon is stopping"
        if self.upgrader.current is not None:
            return "the program is being started again already; try again once that is done"
        return None


class ReloadReply:
    """Answers a reload done by running the program again, in the words of a reload.

    As for any reload, the answer waits until none of the old workers
    accepts, so every connection made after it meets the new code.
    """

    def __init__(self, master: Master, waiters: list[Waiter], generation: int) -> None:
        self.master = master
        self.waiters = waiters
        self.generation = generation

    def reply(self, message: dict[str, Any]) -> None:
        if not message.get("ok"):
            error = str(message.get("error", "")).replace("upgrade failed", "reload failed", 1)
            for waiter in self.waiters:
                waiter.reply({"ok": False, "error": error})
            return
        pid = int(message["pid"])
        try:
            workers = len(psutil.Process(pid).children())  # it serves: its children are its ready workers
        except psutil.Error:
            workers = 0
        answer = {"ok": True, "generation": self.generation, "workers": workers, "pid": pid,
                  "previous_pid": message.get("previous_pid")}
        accepting = set(self.master.pool.workers)  # ours, told to drain just now
        if accepting:
            self.master.gens.reloads.held.append(HeldReply(self.waiters, accepting, answer))
        else:
            for waiter in self.waiters:
                waiter.reply(answer)
