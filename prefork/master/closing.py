"""Closing listening sockets without resetting the connections queued on them.

Closing a listener resets every connection in its accept queue: the kernel
completed those handshakes and nobody accepted them. So the master closes a
listener (the daemon stops, ``preforkctl drain --close``, a reload drops a
``bind`` entry) in three steps spread over its loop:

1. :func:`prefork.listeners.refuse_new` attaches a socket filter that drops
   new connection requests (SYNs): from then on the queue only drains
   (where no filter can go on, :func:`prefork.listeners.shrink_backlog`'s
   ``listen(0)`` keeps most out, and the close is marked unguarded: its
   reset count cannot be promised);
2. the workers go on accepting until the queue is empty (the kernel reports
   its length, :func:`prefork.listeners.queued`), or until a deadline;
3. the caller closes its copies everywhere (the master's own, the workers'
   on SIGUSR2): a client whose request was dropped is refused when it sends
   it again, rather than accepted into a queue that is then reset.

A Unix listener has neither the filter nor a reported queue; it goes to step
3 at once. The kernel does not say when a queue empties, so step 2 looks
every ``QUEUE_CHECK`` seconds, and only while something is queued; the first
look comes one interval after the filter went on, so that handshakes already
under way have landed in the queue.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prefork.listeners import Listener, queued, refuse_new, shrink_backlog
from prefork.master.timers import Timers

log = logging.getLogger(__name__)

QUEUE_CHECK = 0.02  # seconds between looks at a draining queue
PROGRESS = 5.0  # seconds between the log lines while a queue waits to be served


@dataclass
class Closing:
    """One set of listeners being closed: what was queued when it began, and what was left at the end."""

    listeners: list[Listener]
    began: float
    queued_at_start: int
    left_at_close: int = 0
    done: bool = False
    unguarded: int = 0  # TCP listeners new connections could not be refused on (only listen(0) holds them back)
    said: float = 0.0  # when the last progress line was logged

    def __post_init__(self) -> None:
        self.said = self.began

    @property
    def served(self) -> int:
        """Connections accepted from the queue after new ones were refused."""
        return max(0, self.queued_at_start - self.left_at_close)

    def report(self, now: float) -> dict[str, Any]:
        """What a stop reports of it: queued, served, reset, and how long it took."""
        out: dict[str, Any] = {"queued_at_stop": self.queued_at_start, "served_from_queue": self.served,
                               "reset_in_queue": self.left_at_close, "queue_s": round(now - self.began, 3)}
        if self.unguarded:  # a count of 0 would promise what could not be kept
            out.update(reset_in_queue=None, reset_in_queue_unknown=(
                f"new connections could not be refused on {self.unguarded} listener(s) (see the log): "
                f"at least {self.left_at_close} queued connection(s) reset at close, maybe more"))
        return out


class Closer:
    """Runs the three steps for the master; ``then`` does step 3."""

    def __init__(self, timers: Timers) -> None:
        self.timers = timers
        self._keys = itertools.count()
        self.pending: dict[int, Closing] = {}

    def close_after_queue(self, listeners: Sequence[Listener], deadline: float,
                          then: Callable[[Closing], None]) -> Closing:
        """Refuse new connections on ``listeners``; call ``then`` once their queues are served (or at ``deadline``)."""
        tcp = [li for li in listeners if queued(li.sock) is not None]  # a Unix listener has no queue to serve
        # where the filter cannot go on, listen(0) keeps most new connections out while the queue drains;
        # one may still get in just before the close, and nobody can count it: the report says so
        unguarded = [li for li in tcp if not refuse_new(li.sock)]
        for li in unguarded:
            shrink_backlog(li.sock)
        closing = Closing(list(listeners), time.monotonic(), _waiting(tcp), unguarded=len(unguarded))
        key = next(self._keys)
        self.pending[key] = closing

        def check() -> None:
            left, now = _waiting(tcp), time.monotonic()
            if left and now < deadline:
                if now - closing.said >= PROGRESS:  # a queue nobody frees a worker for: say so while it waits
                    closing.said = now
                    log.info("%d queued connection(s) still to be accepted before the listening sockets close; "
                             "%.0fs left", left, deadline - now)
                self.timers.set(("queue", key), now + QUEUE_CHECK, check)
                return
            if left:
                log.warning("%d queued connection(s) not accepted before the graceful timeout; closing anyway", left)
            closing.left_at_close = left
            closing.done = True
            del self.pending[key]
            then(closing)

        # the first look waits a little: a handshake under way when the filter went on completes
        # into the queue just after, and must be served too
        self.timers.set(("queue", key), time.monotonic() + QUEUE_CHECK, check)
        return closing

    def finish_now(self) -> None:
        """A fast stop: every pending close happens now, served or not."""
        for key in list(self.pending):
            self.timers.cancel(("queue", key))
        for key, closing in list(self.pending.items()):
            del self.pending[key]
            closing.done = True


def _waiting(listeners: Sequence[Listener]) -> int:
    return sum(queued(li.sock) or 0 for li in listeners if li.fileno() >= 0)
