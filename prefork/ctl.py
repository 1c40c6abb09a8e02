"""``preforkctl``: talk to a running prefork daemon over its control socket.

Exit status: 0 ok, 1 the command failed, 2 usage, 3 the daemon is not running.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, NoReturn

from prefork.config import ConfigError, find_control_path

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3

FORMATS = ("text", "json", "prometheus")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see preforkctl --help)")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output (the same as --format json)")
    common.add_argument("--format", choices=FORMATS, default=argparse.SUPPRESS,
                        help="output: text (default), json, or prometheus (stats only)")
    p = _Parser(prog="preforkctl", description="Control a running prefork daemon.", parents=[common])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="PATH", help="the daemon's control socket")
    where.add_argument("--name", metavar="NAME", default="prefork",
                       help="the daemon's --name (default prefork): finds its control socket")
    p.add_argument("--timeout", type=float, metavar="SECS", help="how long to wait for the daemon")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("status", parents=[common], help="the master and its workers")
    sub.add_parser("stats", parents=[common], help="counters: connections, errors, respawns, reloads")
    top = sub.add_parser("top", parents=[common], help="a live table of the workers; q or Ctrl-C to quit")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECS",
                     help="seconds between refreshes (default 1)")
    sub.add_parser("reload", parents=[common], help="start a new generation; returns once it serves")
    scale = sub.add_parser("scale", parents=[common], help="set the number of workers")
    scale.add_argument("workers", type=int, metavar="N")
    stop = sub.add_parser("stop", parents=[common], help="graceful stop; returns once the master has exited")
    stop.add_argument("--fast", action="store_true", help="do not wait for open connections")
    sub.add_parser("reopen", parents=[common], help="reopen log files")
    sub.add_parser("upgrade", parents=[common],
                   help="start the prefork now installed as a new master on the same sockets; "
                        "returns once it serves (the old one then drains)")
    drain = sub.add_parser("drain", parents=[common],
                           help="make load-balancer health checks fail while open connections finish")
    drain.add_argument("--off", action="store_true", help="answer health checks again (PROXY protocol only)")
    drain.add_argument("--close", action="store_true",
                       help="close the listening sockets even behind PROXY protocol (for connect-only checks)")
    return p


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # not reached: GiB takes everything left


def human_age(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def format_status(s: dict[str, Any]) -> str:
    out = [
        f"{s['name']}: master pid {s['pid']}, {s['state']}, generation {s['generation']}, "
        f"up {human_age(s['uptime_s'])}",
        f"{s['target_workers']} {s['worker_class']} worker(s)"
        f"{' (' + s['event_loop'] + ')' if s.get('event_loop') else ''} of {s['handler']}",
        f"listening on {', '.join(s['listeners'])}",
        "",
    ]
    rows = [
        [str(w["slot"]), str(w["pid"]), str(w["generation"]), w["state"], str(w["requests"]), str(w["active"]),
         human_bytes(w["rss_bytes"]), f"{w['cpu_percent']:.1f}", human_age(w["age_s"]),
         f"{w['heartbeat_age_s']:.1f}s"]
        for w in s["workers"]
    ]
    out.append(_table(["SLOT", "PID", "GEN", "STATE", "REQUESTS", "ACTIVE", "RSS", "CPU%", "AGE", "HEARTBEAT"],
                      rows))
    for b in s.get("backoff", []):
        when = f"restart in {b['restart_in_s']:.1f}s" if b["restart_in_s"] is not None else "waiting"
        out.append(f"slot {b['slot']}: {b['failures']} early exit(s) in a row, {when}")
    return "\n".join(out)


def format_stats(s: dict[str, Any]) -> str:
    keys = ["requests", "active", "errors", "workers", "workers_spawned", "worker_exits", "worker_crashes",
            "worker_timeouts", "reloads", "failed_reloads"]
    out = [f"{s['name']}: master pid {s['pid']}, generation {s['generation']}, up {human_age(s['uptime_s'])}"]
    out += [f"{k.replace('_', ' ')}: {s[k]}" for k in keys]
    return "\n".join(out)


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
    if args.command == "top" and not (math.isfinite(args.interval) and args.interval > 0):
        raise UsageError(f"top: --interval must be a positive number of seconds, got {args.interval:g}")
    return fmt


def ask(path: str, command: str, timeout: float) -> dict[str, Any]:
    """One command's successful reply; raises ControlError (DaemonNotRunning if nothing answers) otherwise."""
    from prefork.control import ControlError, call

    reply, sock = call(path, {"command": command}, timeout=timeout)
    sock.close()
    if not reply.get("ok"):
        raise ControlError(f"{command} failed: {reply.get('error', 'no reason given')}")
    return reply


def fetch_status_and_stats(path: str, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    return ask(path, "status", timeout), ask(path, "stats", timeout)


def _top(path: str, interval: float, timeout: float) -> int:
    from prefork import top
    from prefork.control import ControlError, DaemonNotRunning

    try:
        top.run(path, interval=interval, timeout=timeout)
    except KeyboardInterrupt:  # Ctrl-C before the loop took over: quitting is what was asked for
        return EXIT_OK
    except DaemonNotRunning:
        print(f"preforkctl: daemon not answering on {path}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"preforkctl: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _report(exc: Exception) -> int:
    """One line for a control-socket failure, and its exit status."""
    from prefork.control import DaemonNotRunning

    if isinstance(exc, DaemonNotRunning):
        print(f"preforkctl: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    print(f"preforkctl: error: {exc}", file=sys.stderr)
    return EXIT_FAILED


def _prometheus(path: str, timeout: float) -> int:
    from prefork.control import ControlError
    from prefork.metrics import render_prometheus

    try:
        status, stats = fetch_status_and_stats(path, timeout)
    except ControlError as exc:
        return _report(exc)
    sys.stdout.write(render_prometheus(status, stats))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from prefork.control import ControlError, call, wait_exited

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        fmt = output_format(args)
    except UsageError as exc:
        print(f"preforkctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = args.control or find_control_path(args.name)
    except ConfigError as exc:
        print(f"preforkctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "top":
        return _top(path, args.interval, args.timeout if args.timeout is not None else 5.0)
    if fmt == "prometheus":
        return _prometheus(path, args.timeout if args.timeout is not None else 10.0)
    as_json = fmt == "json"
    request: dict[str, Any] = {"command": args.command}
    if args.command == "scale":
        if args.workers < 1:
            print(f"preforkctl: error: scale: N must be at least 1, got {args.workers}", file=sys.stderr)
            return EXIT_USAGE
        request["workers"] = args.workers
    if args.command == "stop" and args.fast:
        request["fast"] = True
    if args.command == "drain" and args.off:
        request["off"] = True
    if args.command == "drain" and args.close:
        request["close"] = True
    timeout = args.timeout if args.timeout is not None else (
        600.0 if args.command in ("reload", "upgrade") else 10.0)
    try:
        reply, sock = call(path, request, timeout=timeout)
    except ControlError as exc:
        return _report(exc)
    try:
        if not reply.get("ok"):
            if as_json:
                print(json.dumps(reply, indent=2))
            print(f"preforkctl: {args.command} failed: {reply.get('error', 'no reason given')}", file=sys.stderr)
            return EXIT_FAILED
        if args.command == "stop":
            wait = args.timeout if args.timeout is not None else 3600.0
            if not wait_exited(sock, int(reply.get("pid", 0)), wait):
                print(f"preforkctl: the master (pid {reply.get('pid')}) did not exit within {wait:g}s",
                      file=sys.stderr)
                return EXIT_FAILED
    finally:
        sock.close()
    if as_json:
        print(json.dumps(reply, indent=2))
    elif args.command == "status":
        print(format_status(reply))
    elif args.command == "stats":
        print(format_stats(reply))
    elif args.command == "reload":
        print(f"reloaded: generation {reply['generation']} serving with {reply['workers']} worker(s)")
    elif args.command == "scale":
        print(f"scaled from {reply['previous']} to {reply['workers']} worker(s)")
    elif args.command == "stop":
        print(f"stopped (master pid {reply['pid']} has exited)")
    elif args.command == "reopen":
        print("log files reopened")
    elif args.command == "upgrade":
        print(f"upgraded: new master pid {reply['pid']} serves; pid {reply['previous_pid']} is draining")
    elif args.command == "drain":
        print({None: "not draining: health checks are answered",
               "health-checks": "draining: health checks (PROXY LOCAL) fail, clients are still served",
               "listeners-closed": "draining: listening sockets closed, open connections finish"}
              .get(reply.get("drain"), str(reply.get("drain"))))
    return EXIT_OK


def run() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    run()
