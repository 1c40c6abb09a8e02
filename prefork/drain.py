"""What a handler may ask about its worker's drain, so a protocol can end at a message boundary.

A worker drains when it stops (``preforkctl stop``, a reload, scaling down,
recycling at ``--max-requests``) or when its listeners close
(``preforkctl drain --close``): it takes no new connection, and the ones
open may finish. A socketserver handler asks its server
(``self.server.draining``, ``self.server.drain_deadline``); any handler,
an asyncio one included, may ask this module::

    from prefork import drain

    async def handle(reader, writer):
        stop = asyncio.ensure_future(drain.wait())
        ...  # race reads against ``stop``; between messages, ``if drain.draining(): break``

Outside a worker (a handler under test, say) nothing ever drains.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Drainable(Protocol):
    """What a worker tells about its drain (:class:`prefork.workers.base.WorkerLifecycle`)."""

    @property
    def draining(self) -> bool: ...

    @property
    def drain_deadline(self) -> float | None: ...

    def on_drain(self, callback: Callable[[], None]) -> None: ...


_worker: Drainable | None = None


def attach(worker: Drainable | None) -> None:
    """The worker this process serves as (the worker lifecycle calls this; handlers need not)."""
    global _worker
    _worker = worker


def draining() -> bool:
    """True once this worker drains: finish the current message, then close the connection."""
    return _worker is not None and _worker.draining


def drain_deadline() -> float | None:
    """When (``time.monotonic()``) connections still open are cut; None while not stopping."""
    return None if _worker is None else _worker.drain_deadline


def seconds_left() -> float | None:
    """Seconds until connections still open are cut (never below 0); None while not stopping."""
    deadline = drain_deadline()
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def wait() -> None:
    """Return once this worker drains (at once if it already does); in an asyncio handler."""
    if _worker is None:
        await asyncio.Future()  # never: nothing drains outside a worker
        return
    if _worker.draining:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    def from_anywhere() -> None:  # the worker may tell us from a signal handler or another thread
        loop.call_soon_threadsafe(wake)

    _worker.on_drain(from_anywhere)
    await done
