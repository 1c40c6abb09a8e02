"""How ``preforkctl`` carries a command out over the control socket: one request and its reply, and the waits.

Every function here raises (``ControlError``, ``DaemonNotRunning`` from
:mod:`prefork.control`, or :class:`~prefork.ctl.errors.CommandFailed`);
``main()`` decides what the user sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefork.control import ControlError, call, wait_exited
from prefork.ctl.errors import CommandFailed

Request = dict[str, Any]
Reply = dict[str, Any]

EXIT_TIMEOUT = 3600.0  # stop: seconds to wait for the master to exit when --timeout is not given


@dataclass(frozen=True)
class Call:
    """One command to carry out: where the daemon listens, what to ask it, and how long to wait."""

    path: str
    request: Request
    timeout: float  # for each reply: --timeout, else the command's own default
    given_timeout: float | None = None  # --timeout as given, for waits that have defaults of their own


def exchange(c: Call) -> Reply:
    """Send the request; its successful reply. Raises :class:`CommandFailed` when the daemon refuses."""
    reply, sock = call(c.path, c.request, timeout=c.timeout)
    sock.close()
    check(c.request, reply)
    return reply


def exchange_until_exit(c: Call) -> Reply:
    """``stop``: the successful reply, once the master has exited (within --timeout, else an hour)."""
    reply, sock = call(c.path, c.request, timeout=c.timeout)
    try:
        check(c.request, reply)
        wait = c.given_timeout if c.given_timeout is not None else EXIT_TIMEOUT
        said: list[Reply] = []
        if not wait_exited(sock, int(reply.get("pid", 0)), wait, said):
            raise CommandFailed(f"the master (pid {reply.get('pid')}) did not exit within {wait:g}s")
        reports = [m["stopped"] for m in said if isinstance(m.get("stopped"), dict)]
        if reports:
            reply = {**reply, "report": reports[-1]}  # what the stop did, as the master saw it
    finally:
        sock.close()
    return reply


def check(request: Request, reply: Reply) -> None:
    if not reply.get("ok"):
        error = str(reply.get("error", "no reason given"))
        prefix = f"{request['command']} failed: "
        raise CommandFailed(error if error.startswith(prefix) else prefix + error, reply)


def ask(path: str, command: str, timeout: float) -> Reply:
    """One command's successful reply; raises ControlError (DaemonNotRunning if nothing answers) otherwise."""
    reply, sock = call(path, {"command": command}, timeout=timeout)
    sock.close()
    if not reply.get("ok"):
        raise ControlError(f"{command} failed: {reply.get('error', 'no reason given')}")
    return reply


def fetch_status_and_stats(path: str, timeout: float) -> tuple[Reply, Reply]:
    return ask(path, "status", timeout), ask(path, "stats", timeout)


def snapshot(c: Call) -> Reply:
    """``status`` and ``stats`` asked one after the other, as one reply: ``{"status": ..., "stats": ...}``.

    For the outputs made of both (``top`` on a pipe, ``stats --format prometheus``).
    """
    status, stats = fetch_status_and_stats(c.path, c.timeout)
    return {"status": status, "stats": stats}
