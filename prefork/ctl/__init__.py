"""``preforkctl``: talk to a running prefork daemon over its control socket.

Exit status: 0 ok, 1 the command failed, 2 usage, 3 the daemon is not running, 141 the reader of its
output went away (as for ``cat`` ended by SIGPIPE).

The package, one job per module: :mod:`~prefork.ctl.parser` (the command
line), :mod:`~prefork.ctl.commands` (the command table: each command's request
and text), :mod:`~prefork.ctl.client` (carrying a command out over the control
socket), :mod:`~prefork.ctl.render` (the table and human units),
:mod:`~prefork.ctl.top` (the live table). Only :func:`main` turns errors into
exit statuses.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from typing import NoReturn

from prefork.config import ConfigError, control_candidates, find_control_path, listening_control_sockets
from prefork.control import ControlError, DaemonNotRunning
from prefork.ctl.commands import COMMANDS, output
from prefork.ctl.errors import CommandFailed, NotAnswering, UsageError
from prefork.ctl.parser import build_parser, output_format

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # the reader of our output went away


def complain(line: str, status: int) -> int:
    print(f"preforkctl: {line}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run ``preforkctl ARGV``; the exit status.

    A reader that goes away (``preforkctl status | head -1``) ends it quietly,
    with the status a shell reports for a tool SIGPIPE ended (141), as ``cat``.
    """
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is seen while it can be handled
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is left cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def not_found(name: str) -> str:
    """Why no daemon ``name`` was found: every place tried, and what to do when it lives elsewhere."""
    several = listening_control_sockets(name)
    if len(several) > 1:
        return (f"several daemons named {name!r} listen here: {', '.join(several[:10])}; "
                "give one with --control PATH")
    return (f"no prefork daemon named {name!r} is running here: no control socket at "
            f"{', '.join(control_candidates(name))}, and none listening elsewhere that is ours "
            "(started with --control? give its socket with --control PATH)")


def where(name: str | None, control: str | None, env: Mapping[str, str]) -> tuple[str, str | None]:
    """The daemon's name and control socket: from the command line, else as the daemon itself reads them.

    A daemon in a container is often named by ``PREFORK_NAME`` (or given ``PREFORK_CONTROL``); a
    ``preforkctl`` run beside it (``kubectl exec``, a preStop hook) sees the same environment and so
    finds it. A name given on the command line beats both variables.
    """
    if control:
        return name or "prefork", control
    if name is None:
        control = env.get("PREFORK_CONTROL") or None
        name = env.get("PREFORK_NAME") or "prefork"
        if control:
            return name, control
    return name, find_control_path(name)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        fmt = output_format(args)
        command = COMMANDS[args.command]
        request = command.request(args)
        name, path = where(args.name, args.control, os.environ)
    except (UsageError, ConfigError) as exc:
        return complain(f"error: {exc}", EXIT_USAGE)
    if path is None:
        return complain(not_found(name), EXIT_NOT_RUNNING)
    try:
        reply = command.carry_out(path, request, args.timeout, fmt)
    except (DaemonNotRunning, NotAnswering) as exc:
        return complain(str(exc), EXIT_NOT_RUNNING)
    except ControlError as exc:
        return complain(f"error: {exc}", EXIT_FAILED)
    except CommandFailed as exc:
        if exc.reply is not None and fmt == "json":
            sys.stdout.write(output(command, exc.reply, fmt))
        return complain(str(exc), EXIT_FAILED)
    if reply is not None:
        sys.stdout.write(output(command, reply, fmt))
        if reply.get("warning"):
            complain(f"warning: {reply['warning']}", EXIT_OK)
    return EXIT_OK


def run() -> NoReturn:
    sys.exit(main())
