"""The control socket's commands: a table from command name to handler.

Each handler checks its request's arguments, asks the master to act, and
replies; what the master can be asked is the :class:`Daemon` protocol, so
this module knows nothing of the loop. A command that waits (reload,
upgrade, stop) keeps the connection and is answered later by the master.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from prefork.config import quote
from prefork.control import ControlConnection, preview
from prefork.master import report
from prefork.master.report import Snapshot
from prefork.master.state import LbDrain, StopMode
from prefork.settings import MAX_CANARY, MAX_WORKERS


class Daemon(Protocol):
    """What the commands may ask of the master."""

    @property
    def pid(self) -> int: ...

    @property
    def state(self) -> str: ...

    @property
    def target(self) -> int: ...

    def snapshot(self, *, processes: bool = True) -> Snapshot: ...

    def begin_reload(self, waiters: list[ControlConnection], canary: float | None = None) -> None: ...

    def scale(self, count: int) -> None: ...

    def begin_stop(self, mode: StopMode) -> None: ...

    def reopen_logs(self) -> None: ...

    def begin_upgrade(self, waiter: ControlConnection | None = None) -> None: ...

    def drain_for_balancer(self, *, close: bool) -> LbDrain | None: ...

    def health_checks(self) -> list[str]: ...

    def undrain(self) -> str | None: ...


Handler = Callable[[Daemon, dict[str, Any], ControlConnection], None]


def _status(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    conn.reply({"ok": True, **report.status(daemon.snapshot())})


def _stats(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    conn.reply({"ok": True, **report.stats(daemon.snapshot(processes=False))})


def _reload(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    canary = request.get("canary")
    if canary is not None and (isinstance(canary, bool) or not isinstance(canary, (int, float))
                               or not 0 <= canary <= MAX_CANARY):
        conn.reply({"ok": False, "error": f"reload: canary must be 0 (none) to {MAX_CANARY:g} seconds, "
                                          f"got {preview(canary)}"})
        return
    # answered once the new generation serves, or when it failed (or its canary did worse than the old one)
    daemon.begin_reload([conn], None if canary is None else float(canary))


def scale_target(current: int, request: dict[str, Any]) -> int | str:
    """The worker count a scale request asks for, from ``current``; or why it is refused (one line).

    ``workers`` sets the count; ``by`` changes it (``+2``, ``-1``). Exactly one of them, a whole number.
    """
    if ("workers" in request) == ("by" in request):
        return (f"scale: give workers (a count) or by (a change), got workers={preview(request.get('workers'))}, "
                f"by={preview(request.get('by'))}")
    relative = "by" in request
    value = request["by" if relative else "workers"]
    if isinstance(value, bool) or not isinstance(value, int):
        return f"scale: {'by' if relative else 'workers'} must be a whole number, got {preview(value)}"
    count = current + value if relative else value
    if relative and not 1 <= count <= MAX_WORKERS:
        made = preview(count)
        return f"scale: {current} worker(s) changed by {preview(value)} would be {made}, not from 1 to {MAX_WORKERS}"
    if not 1 <= count <= MAX_WORKERS:
        return f"scale: workers must be a whole number from 1 to {MAX_WORKERS}, got {preview(value)}"
    return count


def _scale(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    if daemon.state == "stopping":
        conn.reply({"ok": False, "error": "the daemon is stopping"})
        return
    if daemon.state == "reloading":
        conn.reply({"ok": False, "error": "a reload is in progress; scale again once it is done"})
        return
    previous = daemon.target
    count = scale_target(previous, request)
    if isinstance(count, str):
        conn.reply({"ok": False, "error": count})
        return
    daemon.scale(count)
    conn.reply({"ok": True, "workers": count, "previous": previous})


def _stop(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    flags = _flags(request, "fast")
    if isinstance(flags, str):
        conn.reply({"ok": False, "error": flags})
        return
    mode = StopMode.FAST if flags["fast"] else StopMode.GRACEFUL
    conn.reply({"ok": True, "pid": daemon.pid, "stopping": mode.value}, keep_open=True)  # closed as we exit
    daemon.begin_stop(mode)


def _reopen(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    daemon.reopen_logs()
    conn.reply({"ok": True})


def _upgrade(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    daemon.begin_upgrade(conn)


def _flags(request: dict[str, Any], *names: str) -> dict[str, bool] | str:
    """The request's boolean fields (absent: False), or the error to answer when one is not a boolean."""
    flags = {}
    for name in names:
        value = request.get(name, False)
        if not isinstance(value, bool):
            return f"{request.get('command')}: {name} must be true or false, got {value!r}"
        flags[name] = value
    return flags


def _drain(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    """Take this instance out of a load balancer's pool without breaking a connection.

    Without ``close``, the daemon's health checks fail (PROXY ``LOCAL``
    checks are closed at once, the agent check answers ``drain``,
    ``/readyz`` 503) while every client is still served: reversible with
    ``off``. Refused when the daemon has no health check to fail, as it
    would change nothing. With ``close``, every process closes its
    listening sockets once their queues are served: new connections are
    refused, so even a connect-only check fails, and open connections
    finish; only a restart serves again, which the reply warns about when
    no health check would have done.
    """
    flags = _flags(request, "off", "close")
    if isinstance(flags, str):
        conn.reply({"ok": False, "error": flags})
        return
    if flags["off"] and flags["close"]:
        conn.reply({"ok": False, "error": "drain: off and close cannot go together"})
        return
    if flags["off"]:
        error = daemon.undrain()
        conn.reply({"ok": False, "error": error} if error else {"ok": True, "drain": None})
        return
    checks = daemon.health_checks()
    if not flags["close"] and not checks:
        conn.reply({"ok": False, "error": "drain: this daemon has no health check to fail (no --proxy-protocol, "
                    "--agent-bind or --metrics-bind); drain --close closes the listening sockets for good"})
        return
    drain = daemon.drain_for_balancer(close=flags["close"])
    reply: dict[str, Any] = {"ok": True, "drain": drain.value if drain else None, "health_checks": checks}
    if flags["close"] and not checks:
        reply["warning"] = ("the listening sockets are closed for good: only a restart serves again "
                            "(with --proxy-protocol, --agent-bind or --metrics-bind, drain without --close "
                            "can be undone)")
    conn.reply(reply)


COMMANDS: dict[str, Handler] = {
    "status": _status,
    "stats": _stats,
    "reload": _reload,
    "scale": _scale,
    "stop": _stop,
    "reopen": _reopen,
    "drain": _drain,
    "upgrade": _upgrade,
}


def dispatch(daemon: Daemon, request: dict[str, Any], conn: ControlConnection) -> None:
    """Run the request's command; an unknown one gets the list of those there are."""
    command = request.get("command")
    handler = COMMANDS.get(command) if isinstance(command, str) else None
    if handler is None:
        conn.reply({"ok": False, "error": f"unknown command {quote(command)} (known: {', '.join(COMMANDS)})"})
        return
    handler(daemon, request, conn)
