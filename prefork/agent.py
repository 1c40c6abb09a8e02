"""What the daemon tells load balancers about itself: HAProxy's agent check and HTTP readiness.

The decisions are pure functions of a :class:`Load`, a small typed snapshot
the master takes when a check arrives; :class:`AgentServer` only does the I/O.

HAProxy's ``agent-check`` connects to ``--agent-bind``, reads one line of
ASCII words and closes. The words HAProxy acts on, and what prefork sends:

* ``ready up N%`` while serving: ``ready`` clears a ``drain`` or ``maint``
  this agent set earlier (HAProxy keeps those until told otherwise), ``up``
  leaves the server's health to the regular checks, and ``N%`` sets its
  weight to N percent of the weight configured in haproxy.cfg (so configure
  ``weight 100``: with HAProxy's default weight of 1, every share below 100%
  rounds to 0, which takes the server out). N is :func:`weight_percent`.
* ``drain`` while ``preforkctl drain`` is on: no new connections (but
  persistent ones), open ones finish.
* ``maint`` while starting (before the first generation serves) and while
  stopping: no connections at all. HAProxy keeps asking the agent, so the
  next ``ready`` puts the server back.

An agent that cannot be reached changes nothing in HAProxy: the regular
health check decides then.
"""

from __future__ import annotations

import contextlib
import logging
import math
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from prefork.control import ClientGate

log = logging.getLogger(__name__)

CLIENT_TIMEOUT = 5.0  # a checker that neither reads nor closes is closed after this
MAX_CLIENTS = 32  # checkers held at once (each is answered at once); the master lowers it to fit its descriptors
MIN_WEIGHT = 1  # percent: a saturated instance stays in the pool (0% would take it out, as a drain does)


@dataclass(frozen=True)
class Load:
    """The daemon as a load balancer sees it, at one instant."""

    state: str  # starting, serving, reloading or stopping (the master's state)
    draining: bool  # preforkctl drain is on
    capacity: int | None  # connections the ready workers serve at once; None: no cap to measure against
    active: int  # connections the ready workers have open
    queued: int  # connections waiting in the listeners' accept queues
    backlog: int  # the listen backlog (the accept queue's bound)


def weight_percent(load: Load) -> int:
    """The share of the daemon's capacity that is free now, in percent, from ``MIN_WEIGHT`` to 100.

    With a capacity (``thread``: ready workers x ``--threads``; ``sync``:
    one per ready worker; ``async``: ready workers x ``--max-connections``)
    it is ``(capacity - active - queued) / capacity``: every open connection
    takes a slot, and so does every connection waiting to be accepted, since
    it will take one as soon as it can. Without one (``async`` with no
    ``--max-connections``) open connections say nothing about headroom, but
    a growing accept queue does: ``1 - queued / backlog``. Rounded down,
    so any load shows; never below ``MIN_WEIGHT``.
    """
    if load.capacity is None:
        free = 1.0 - load.queued / max(1, load.backlog)
    elif load.capacity <= 0:
        free = 0.0  # no worker ready to take a connection
    else:
        free = (load.capacity - load.active - load.queued) / load.capacity
    return max(MIN_WEIGHT, min(100, math.floor(100 * free)))


def agent_reply(load: Load) -> str:
    """The line HAProxy's agent check gets (see the module docstring)."""
    if load.state in ("starting", "stopping"):
        return "maint\n"
    if load.draining:
        return "drain\n"
    return f"ready up {weight_percent(load)}%\n"


def readiness(state: str, draining: bool) -> tuple[bool, str]:
    """(ready for new connections?, why, in a few words) for ``GET /readyz``."""
    if state == "stopping":
        return False, "stopping"
    if state == "starting":
        return False, "starting: the first generation is not serving yet"
    if draining:
        return False, "draining (preforkctl drain)"
    return True, "ready"


class AgentServer:
    """Serves :func:`agent_reply` on ``sock`` (bound and listening) from the master's selector.

    Each checker gets its line as soon as it is accepted, then its write side
    is shut; the connection is closed when the checker closes it, or after
    ``CLIENT_TIMEOUT``. A newcomer past the cap closes the oldest one.
    """

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, load: Callable[[], Load],
                 max_clients: int = MAX_CLIENTS) -> None:
        self.sock = sock
        self.selector = selector
        self.load = load
        self.clients: dict[socket.socket, float] = {}  # -> deadline, oldest first
        sock.setblocking(False)
        self.gate = ClientGate(sock, selector, "agent", self, self._on_accepted, max_clients)
        self.gate.start()

    def client_count(self) -> int:
        return len(self.clients)

    def has_idle(self) -> bool:
        return bool(self.clients)  # every client is answered: any may make room

    def evict_idle(self) -> None:
        self._close(next(iter(self.clients)))

    def drop(self, sock: object) -> bool:
        """Close the client on ``sock`` (a callback of it failed); False when it is not one of ours."""
        if isinstance(sock, socket.socket) and sock in self.clients:
            self._close(sock)
            return True
        return False

    def _on_accepted(self, conn: socket.socket) -> None:
        self.clients[conn] = time.monotonic() + CLIENT_TIMEOUT
        self.selector.register(conn, selectors.EVENT_READ, lambda m, c=conn: self._on_readable(c))
        try:
            reply = agent_reply(self.load())
        except Exception:  # a bug here must not take the master down; the checker sees a close
            log.exception("agent: building the reply failed")
            self._close(conn)
            return
        try:
            # a few bytes into a fresh socket's empty send buffer: never partial
            conn.send(reply.encode("ascii"))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)

    def _on_readable(self, conn: socket.socket) -> None:
        """Whatever the checker sends (HAProxy's ``agent-send``) is read and ignored until it closes."""
        if conn not in self.clients:
            return  # closed earlier in this turn of the loop
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        if self.clients.pop(conn, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()
        self.gate.client_left()

    def next_deadline(self) -> float | None:
        deadlines = list(self.clients.values())[:1]  # oldest first: the first deadline is the nearest
        if self.gate.paused_until is not None:
            deadlines.append(self.gate.paused_until)
        return min(deadlines, default=None)

    def expire(self, now: float) -> None:
        for conn, deadline in list(self.clients.items()):
            if now < deadline:
                break  # oldest first, all with the same timeout
            self._close(conn)
        self.gate.expire(now)

    def close(self) -> None:
        for conn in list(self.clients):
            self._close(conn)
        self.gate.close()
        self.sock.close()

    def close_in_child(self) -> None:
        for conn in list(self.clients):
            conn.close()
        self.sock.close()
