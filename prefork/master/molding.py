"""What the molds mean for the generations: which mold forks a worker, what a mold's load and death mean,
and when a mold ends.

The processes and their socket are :mod:`prefork.master.molds`; the
generations (:mod:`prefork.master.generations`) ask here for the mold of a
generation and are told here when a mold has loaded (its waiting slots are
forked, or the reload fails, or the daemon stops) and when it is no longer
needed (its generation neither serves, nor starts, nor has a live worker).
"""

from __future__ import annotations

import functools
import logging
from typing import Protocol

from prefork.config import Config
from prefork.listeners import Listener
from prefork.master.exits import BACKOFF_FIRST, backoff_delay
from prefork.master.molds import Mold, Molds, MoldState
from prefork.master.pool import MoldFork, WorkerPool
from prefork.master.reload import Reload, Reloads
from prefork.master.state import Backoff, StopMode, Worker
from prefork.tls import TlsSetup

log = logging.getLogger(__name__)


class HostView(Protocol):
    @property
    def stopping(self) -> StopMode | None: ...

    def fatal(self, why: str) -> None: ...


class GenerationsView(Protocol):
    """What the mold decisions need of :class:`prefork.master.generations.Generations`."""

    @property
    def host(self) -> HostView: ...

    @property
    def pool(self) -> WorkerPool: ...

    @property
    def reloads(self) -> Reloads: ...

    @property
    def generation(self) -> int: ...

    @property
    def serving(self) -> bool: ...

    @property
    def target(self) -> int: ...

    @property
    def slots(self) -> dict[int, Worker]: ...

    @property
    def backoff(self) -> dict[int, Backoff]: ...

    def spawn_worker(self, slot: int, reload: Reload | None = None) -> Worker | None: ...

    def abort_reload(self, why: str) -> None: ...

    def respawn_later(self, slot: int, delay: float) -> None: ...


class Molding:
    """The generations' side of the molds."""

    def __init__(self, gens: GenerationsView, molds: Molds | None) -> None:
        self.gens = gens
        self.molds = molds  # None: workers are forked by the master itself (and import the handler themselves)
        self.kept: int | None = None  # a generation whose mold is kept with no worker (a reload's probation)

    def mold_for(self, generation: int, config: Config, listeners: list[Listener],
                 tls: TlsSetup | None) -> Mold | None:
        """The mold that forks ``generation``'s workers (started now if it has none); None: the master forks.

        A generation whose mold is gone (killed, crashed) gets a new one, which
        imports the code on disk now: said in the log when its mold dies.
        """
        if self.molds is None or not config.preload:
            return None
        mold = self.molds.by_generation.get(generation)
        if mold is None:
            mold = self.molds.start(generation, config, [li.sock for li in listeners], tls=tls,
                                    listener_specs=tuple(li.spec for li in listeners))
        return mold

    def fork(self, mold: Mold | None) -> MoldFork | None:
        """How the pool has ``mold`` fork a worker (None: the pool forks it itself)."""
        return functools.partial(self.molds.fork_worker, mold) if mold is not None and self.molds else None

    def on_loaded(self, mold: Mold) -> None:
        """A mold imported its handler (its waiting slots are forked now), or failed to."""
        gens = self.gens
        reload = gens.reloads.in_flight
        in_reload = reload is not None and mold.generation == reload.generation
        waiting, mold.waiting = sorted(mold.waiting), set()
        assert self.molds is not None  # a mold of ours
        if mold.state is MoldState.READY:
            for slot in waiting:
                if in_reload and reload is not None:
                    if gens.reloads.in_flight is reload and slot not in reload.slots:
                        gens.spawn_worker(slot, reload)
                elif (mold.generation == gens.generation and gens.host.stopping is None
                      and slot < gens.target and slot not in gens.slots):
                    gens.spawn_worker(slot)
            return
        self.molds.end(mold)
        if in_reload:
            gens.abort_reload(mold.error)
        elif mold.generation == gens.generation and gens.host.stopping is None:
            if not gens.serving:
                log.critical("%s", mold.error)
                gens.host.fatal("the handler cannot be loaded, so no worker can serve")
                return
            log.error("%s", mold.error)
            for slot in waiting:
                backoff = gens.backoff.setdefault(slot, Backoff())
                backoff.failures += 1
                gens.respawn_later(slot, max(backoff_delay(backoff.failures), BACKOFF_FIRST))

    def on_exit(self, mold: Mold, how: str) -> None:
        """A mold we did not end is gone: the next worker of its generation gets a new one."""
        assert self.molds is not None  # a mold of ours
        if mold.state is MoldState.LOADING:
            self.molds.loaded(mold, how)  # what it said before it went (ready or why it failed), else how it died
            return
        log.warning("mold of generation %d (pid %d) %s; a new worker of generation %d needs a new mold, "
                    "which imports the code on disk", mold.generation, mold.pid, how, mold.generation)
        self.molds.end(mold)

    def has_mold(self, generation: int) -> bool:
        return self.molds is not None and generation in self.molds.by_generation

    def end_idle(self) -> None:
        """End the molds of generations that neither serve, nor start, nor have a live worker left."""
        if self.molds is None:
            return
        reload = self.gens.reloads.in_flight
        live = {w.generation for w in self.gens.pool.workers.values()}
        for generation, mold in list(self.molds.by_generation.items()):
            if generation in (self.gens.generation, self.kept) or (reload is not None and
                                                                   generation == reload.generation):
                continue
            if generation not in live:
                log.info("mold of generation %d (pid %d) ends: its generation is gone", generation, mold.pid)
                self.molds.end(mold)

    def close_listeners(self, older_than: int) -> None:
        """The molds of generations before ``older_than`` close their copies of the listening sockets."""
        if self.molds is not None:
            self.molds.close_listeners(lambda generation: generation < older_than)
