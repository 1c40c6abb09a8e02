"""The master's ports for monitors and load balancers: ``--metrics-bind`` (HTTP) and ``--agent-bind`` (HAProxy).

Both are served from the master's selector, each client with a deadline and
behind a cap (:class:`~prefork.control.ClientGate`). What they report comes
from the master's typed snapshot (:mod:`prefork.master.report`), turned here
into the :class:`~prefork.agent.Load` the load-balancer decisions read.
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Sequence
from typing import Protocol

from prefork.agent import AgentServer, Load, readiness
from prefork.config import Config
from prefork.httpmetrics import MetricsServer
from prefork.listeners import Listener, queued
from prefork.listeners import describe as describe_address
from prefork.master.report import Snapshot, stats, status
from prefork.master.state import WorkerState
from prefork.master.timers import Timers
from prefork.metrics import render_prometheus


class Source(Protocol):
    """What the endpoints read from the master."""

    @property
    def config(self) -> Config: ...

    @property
    def listeners(self) -> list[Listener]: ...

    def snapshot(self, *, processes: bool = True) -> Snapshot: ...


def per_worker_capacity(config: Config) -> int | None:
    """Connections one worker serves at once; None when there is no cap to measure headroom against."""
    if config.worker_class == "thread":
        return config.threads
    if config.worker_class == "sync":
        return 1
    return config.max_connections or None


def load_of(snap: Snapshot, config: Config, listeners: Sequence[Listener]) -> Load:
    """The daemon's load from a snapshot: only ready workers take new connections, so only they count."""
    ready = [w for w in snap.workers if w.state == WorkerState.READY.value]
    each = per_worker_capacity(config)
    waiting = [queued(li.sock) for li in listeners]
    return Load(state=snap.state, draining=snap.drain is not None,
                capacity=None if each is None else each * len(ready), active=sum(w.active for w in ready),
                queued=sum(q for q in waiting if q is not None), backlog=config.backlog)


class Endpoints:
    """The metrics and agent servers of one master, whichever of the two are configured."""

    def __init__(self, source: Source, metrics_sock: socket.socket | None, agent_sock: socket.socket | None) -> None:
        self.source = source
        self.metrics_sock = metrics_sock
        self.agent_sock = agent_sock
        self.metrics: MetricsServer | None = None
        self.agent: AgentServer | None = None

    def start(self, selector: selectors.BaseSelector, timers: Timers, max_clients: int) -> None:
        """Serve, holding at most ``max_clients`` clients between the two ports."""
        if self.metrics_sock is not None and self.agent_sock is not None:
            max_clients = max(1, max_clients // 2)
        if self.metrics_sock is not None:
            self.metrics = MetricsServer(self.metrics_sock, selector, self.render_metrics, max_clients, self.ready)
            timers.watch(self.metrics)
        if self.agent_sock is not None:
            self.agent = AgentServer(self.agent_sock, selector, self.load, max_clients)
            timers.watch(self.agent)

    def describe(self) -> list[str]:
        """Where the side ports listen, for the startup log."""
        out = []
        if self.metrics_sock is not None:
            address = describe_address(self.metrics_sock)
            out.append(f"metrics at http://{address}/metrics (and /healthz, /readyz)")
        if self.agent_sock is not None:
            out.append(f"HAProxy agent-check on {describe_address(self.agent_sock)}")
        return out

    def side_sockets(self) -> list[tuple[int, str]]:
        """(fd, role) of the listeners served here, for a new master to take over on upgrade."""
        return [(sock.fileno(), role) for sock, role in ((self.metrics_sock, "metrics"), (self.agent_sock, "agent"))
                if sock is not None and sock.fileno() >= 0]

    def render_metrics(self) -> str:
        snap = self.source.snapshot()  # one look serves both payloads
        return render_prometheus(status(snap), stats(snap))

    def load(self) -> Load:
        return load_of(self.source.snapshot(processes=False), self.source.config, self.source.listeners)

    def ready(self) -> tuple[bool, str]:
        snap = self.source.snapshot(processes=False)
        return readiness(snap.state, snap.drain is not None)

    def _servers(self) -> list[MetricsServer | AgentServer]:
        return [s for s in (self.metrics, self.agent) if s is not None]

    def health_checks(self) -> list[str]:
        """The checks a load balancer may use on these ports (``preforkctl drain`` fails them)."""
        return (["agent-check"] if self.agent_sock is not None else []) + (
            ["/readyz"] if self.metrics_sock is not None else [])

    def drop(self, sock: object) -> bool:
        """Close the client on ``sock`` (a callback of it failed); False when it is not one of ours."""
        return any(server.drop(sock) for server in self._servers())

    def close_in_child(self) -> None:
        """In a new worker: close our copies (never serve from a worker)."""
        for server in self._servers():
            server.close_in_child()
        for sock in (self.metrics_sock, self.agent_sock):
            if sock is not None:
                sock.close()

    def close(self) -> None:
        """Stop serving (idempotent): at exit, or at an upgrade's hand-over, when the new master serves them."""
        for server in self._servers():
            server.close()
        self.metrics = self.agent = None
        for sock in (self.metrics_sock, self.agent_sock):
            if sock is not None:
                sock.close()
