"""``preforkctl``'s command line: the options and subcommands, and the output format they ask for."""

from __future__ import annotations

import argparse

from prefork import __version__
from prefork.ctl.errors import UsageError
from prefork.usage import Parser

FORMATS = ("text", "json", "prometheus")


class _Parser(Parser):
    usage_error = UsageError


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output (the same as --format json)")
    common.add_argument("--format", choices=FORMATS, default=argparse.SUPPRESS,
                        help="output: text (default), json, or prometheus (stats only)")
    p = _Parser(prog="preforkctl", description="Control a running prefork daemon.", parents=[common])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="PATH",
                       help="the daemon's control socket (default: $PREFORK_CONTROL, as the daemon reads it)")
    where.add_argument("--name", metavar="NAME",
                       help="the daemon's --name (default: $PREFORK_NAME, else prefork): finds its control socket")
    p.add_argument("--timeout", type=float, metavar="SECS", help="how long to wait for the daemon")
    p.add_argument("--version", action="version", version=f"preforkctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("status", parents=[common], help="the master and its workers")
    sub.add_parser("stats", parents=[common], help="counters: connections, errors, respawns, reloads")
    top = sub.add_parser("top", parents=[common], help="a live table of the workers; q or Ctrl-C to quit")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECS",
                     help="seconds between refreshes (default 1)")
    reload = sub.add_parser("reload", parents=[common], help="start a new generation; returns once it serves")
    reload.add_argument("--canary", type=float, metavar="SECS",
                        help="one new worker serves beside the old generation for SECS first; the reload goes on "
                             "only if it does no worse, else fails and the old generation serves on "
                             "(default: the daemon's --reload-canary)")
    scale = sub.add_parser("scale", parents=[common], help="set or change the number of workers")
    scale.add_argument("workers", metavar="N",
                       help="3: run 3 workers; +2: two more than now; -1: one fewer (at least 1 remains)")
    stop = sub.add_parser("stop", parents=[common], help="graceful stop; returns once the master has exited")
    stop.add_argument("--fast", action="store_true", help="do not wait for open connections")
    sub.add_parser("reopen", parents=[common], help="reopen log files")
    sub.add_parser("upgrade", parents=[common],
                   help="start the prefork now installed as a new master on the same sockets; "
                        "returns once it serves (the old one then drains)")
    drain = sub.add_parser("drain", parents=[common],
                           help="make load-balancer health checks fail while clients are still served")
    drain.add_argument("--off", action="store_true", help="answer health checks again")
    drain.add_argument("--close", action="store_true",
                       help="close the listening sockets for good (for connect-only checks); "
                            "only a restart serves again")
    return p


def output_format(args: argparse.Namespace) -> str:
    """The output format the options ask for; raises :class:`UsageError` for a combination that makes no sense."""
    fmt: str | None = getattr(args, "format", None)
    if getattr(args, "json", False):
        if fmt not in (None, "json"):
            raise UsageError(f"--json and --format {fmt} disagree: give one of them")
        fmt = "json"
    fmt = fmt or "text"
    if args.command == "top" and fmt != "text":
        raise UsageError("top draws a table for people: for machines use stats or status with --format")
    if fmt == "prometheus" and args.command != "stats":
        raise UsageError(f"--format prometheus is for stats, not {args.command}")
    return fmt
