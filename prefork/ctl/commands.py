"""``preforkctl``'s command table: for each command, the request it sends and how its reply reads.

A request builder turns the parsed command line into the request (raising
:class:`UsageError` for values that make no sense); a text formatter turns a
successful reply into what people read. Both are pure functions. How a
command is carried out (one exchange, a wait for the master's exit, the live
``top`` table) is the entry's ``run``, from :mod:`prefork.ctl.client` or
:mod:`prefork.ctl.top`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prefork.control import preview
from prefork.ctl.client import Call, Reply, Request, exchange, exchange_until_exit, snapshot
from prefork.ctl.errors import UsageError
from prefork.ctl.render import format_share, human_age, human_bytes, optional_bytes, table
from prefork.ctl.top import show_top, top_request, top_text
from prefork.metrics import render_prometheus
from prefork.settings import MAX_CANARY, MAX_WORKERS

REPLY_TIMEOUT = 10.0  # seconds to wait for a reply when --timeout is not given
GENERATION_TIMEOUT = 600.0  # reload and upgrade reply once the new generation serves
TOP_TIMEOUT = 5.0  # each refresh of top

STATUS_HEADERS = ["SLOT", "PID", "GEN", "STATE", "REQUESTS", "ACTIVE", "SHARE", "RSS", "USS", "CPU%", "AGE",
                  "HEARTBEAT"]
# what the text of stats leaves out, or writes its own way; every other whole-number counter is a line of it
STATS_NOT_COUNTERS = frozenset({"ok", "pid", "name", "generation", "uptime_s"})
DRAIN_STATES: Mapping[str | None, str] = {
    None: "not draining: health checks are answered",
    "health-checks": "draining: health checks fail, clients are still served (drain --off undoes it)",
    "listeners-closed": "draining: listening sockets closed, open connections finish",
}

RequestBuilder = Callable[[argparse.Namespace], Request]
Formatter = Callable[[Reply], str]
Runner = Callable[[Call], Reply | None]  # None: the command has shown its output itself (live top)


@dataclass(frozen=True)
class Command:
    """One ``preforkctl`` command: its request builder, its text formatter, and how it is carried out."""

    request: RequestBuilder
    text: Formatter
    timeout: float = REPLY_TIMEOUT  # for each reply, when --timeout is not given
    run: Runner = exchange

    def carry_out(self, path: str, request: Request, timeout: float | None, fmt: str) -> Reply | None:
        """The reply to show in ``fmt`` (None: nothing left to show); ``timeout`` is --timeout, if given."""
        c = Call(path, request, self.timeout if timeout is None else timeout, timeout)
        return snapshot(c) if fmt == "prometheus" else self.run(c)


# -- request builders: the parsed command line -> the request ------------------------------------------------


def plain_request(args: argparse.Namespace) -> Request:
    return {"command": args.command}


def reload_request(args: argparse.Namespace) -> Request:
    canary = getattr(args, "canary", None)
    if canary is None:
        return {"command": "reload"}  # the daemon's --reload-canary applies
    if not 0 <= canary <= MAX_CANARY:
        raise UsageError(f"reload: --canary must be 0 (none) to {MAX_CANARY:g} seconds, got {canary:g}")
    return {"command": "reload", "canary": canary}


def scale_request(args: argparse.Namespace) -> Request:
    """``scale N`` sets the count; ``scale +N`` / ``scale -N`` change it (the master knows the count now)."""
    text = args.workers.strip()
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit()):
        raise UsageError(f"scale: N must be a count (3) or a change (+2, -1), got {preview(args.workers)}")
    if len(digits.lstrip("0")) > len(str(MAX_WORKERS)):
        raise UsageError(f"scale: N must be at most {MAX_WORKERS}, got {preview(args.workers)}")
    value = int(text)
    if text[:1] in "+-":
        if value == 0:
            raise UsageError(f"scale: a change must not be zero, got {text}")
        return {"command": "scale", "by": value}
    if not 1 <= value <= MAX_WORKERS:
        raise UsageError(f"scale: N must be from 1 to {MAX_WORKERS}, got {text}")
    return {"command": "scale", "workers": value}


def stop_request(args: argparse.Namespace) -> Request:
    request: Request = {"command": "stop"}
    if args.fast:
        request["fast"] = True
    return request


def drain_request(args: argparse.Namespace) -> Request:
    request: Request = {"command": "drain"}
    if args.off:
        request["off"] = True
    if args.close:
        request["close"] = True
    return request


# -- text formatters: a successful reply -> what people read -------------------------------------------------


def certificate_line(cert: Mapping[str, object]) -> str:
    """One certificate in use: whom it names, who issued it, when it expires and its file."""
    days = cert.get("expires_in_days")
    left = ""
    if isinstance(days, int | float):
        left = f", EXPIRED {-days:.1f} days ago" if days <= 0 else f", in {days:.1f} days"
    name = cert.get("server_name")
    return (f"  {'for ' + str(name) + ': ' if name else ''}{cert.get('subject')} (issued by {cert.get('issuer')}), "
            f"expires {cert.get('not_after')}{left}: {cert.get('certfile')}")


def tls_lines(s: Reply) -> list[str]:
    """What ``status`` says of TLS: each TLS listener with its certificates, and the relay's (none: no lines)."""
    out: list[str] = []
    for address, info in (s.get("tls") or {}).items():
        alpn = f", ALPN {','.join(info['alpn'])}" if info.get("alpn") else ""
        out.append(f"TLS on {address}: TLS {info.get('min_version')}+, client certificates "
                   f"{info.get('cert_reqs')}{alpn}")
        out += [certificate_line(cert) for cert in info.get("certificates", [])]
    relay = s.get("relay_tls")
    if relay:
        name = f"server name {relay['server_name']}" if relay.get("server_name") else "each upstream's host name"
        cas = relay.get("ca_certs") or "the system's CAs"
        client = f", presenting {relay['certfile']}" if relay.get("certfile") else ""
        out.append(f"relay to upstreams over TLS: verifying {name} against {cas}{client}")
        if isinstance(relay.get("certificate"), Mapping):
            out.append(certificate_line(relay["certificate"]))
    return out


def upstream_lines(s: Reply) -> list[str]:
    """One line per relay upstream: its state, settings, open connections, failures and last check."""
    out = []
    for u in s.get("upstreams") or []:
        state = str(u.get("state"))
        if state == "down" and u.get("since"):
            state += f" since {time.strftime('%H:%M:%S', time.localtime(u['since']))}"
        if u.get("retry_in_s") is not None:
            state += f", retried in {u['retry_in_s']:.1f}s"
        extras = [f"weight {u.get('weight')}"] + (["backup"] if u.get("backup") else []) \
            + ([f"maxconn {u['maxconn']}"] if u.get("maxconn") else [])
        failed = u.get("failed") or {}
        failures = ", ".join(f"{k} {v}" for k, v in failed.items() if v)
        check = ""
        if u.get("last_check"):
            check = (f"; last check {'ok' if u.get('check_ok') else 'failed'} in {u.get('check_latency_ms'):.1f} ms, "
                     f"{human_age(max(0.0, time.time() - u['last_check']))} ago")
        out.append(f"upstream {u.get('name')}: {state} ({', '.join(extras)}); {u.get('active')} open, "
                   f"{u.get('connections')} relayed, {u.get('failures')} failure(s) in a row"
                   f"{' (' + failures + ' in all)' if failures else ''}{check}")
    return out


def format_status(s: Reply) -> str:
    out = [
        f"{s['name']}: master pid {s['pid']}, {s['state']}, generation {s['generation']}, "
        f"up {human_age(s['uptime_s'])}",
        f"{s['target_workers']} {s['worker_class']} worker(s)"
        f"{' (' + s['event_loop'] + ')' if s.get('event_loop') else ''} of {s['handler']}",
        (f"listening sockets closed (drain --close), were {', '.join(s['listeners'])}"
         if s.get("drain") == "listeners-closed" else f"listening on {', '.join(s['listeners'])}"),
        *([DRAIN_STATES.get(s["drain"], str(s["drain"]))] if s.get("drain") else []),
        *tls_lines(s),
        *upstream_lines(s),
        "",
    ]
    rows = [
        [str(w["slot"]), str(w["pid"]), str(w["generation"]), w["state"], str(w["requests"]), str(w["active"]),
         format_share(w.get("share")), human_bytes(w["rss_bytes"]), optional_bytes(w.get("uss_bytes")),
         f"{w['cpu_percent']:.1f}",
         human_age(w["age_s"]), f"{w['heartbeat_age_s']:.1f}s"]
        for w in s["workers"]
    ]
    out += table(STATUS_HEADERS, rows)
    for g in s.get("draining", []):
        cut = f", cut in {g['cut_in_s']:.1f}s" if g.get("cut_in_s") is not None else ""
        out.append(f"generation {g['generation']} draining: {g['workers']} worker(s), "
                   f"{g['open_connections']} open connection(s){cut}")
    reload = s.get("reload")
    if isinstance(reload, Mapping):
        out.append(format_reload_progress(reload))
    out += held_lines(s["workers"])
    for b in s.get("backoff", []):
        when = f"restart in {b['restart_in_s']:.1f}s" if b["restart_in_s"] is not None else "waiting"
        out.append(f"slot {b['slot']}: {b['failures']} early exit(s) in a row, {when}")
    return "\n".join(out)


HELD_SHOWN_FROM = 1.0  # seconds a handler must have held a connection before text status names it


def held_lines(workers: list[Reply]) -> list[str]:
    """For each worker whose handler has held a connection a while: how long its oldest has been held, and
    the handlers stuck past --handler-timeout (the JSON has ``oldest_handler_s`` for every worker)."""
    out = []
    for w in workers:
        held = float(w.get("oldest_handler_s") or 0.0)
        stuck = int(w.get("stuck_handlers") or 0)
        if held >= HELD_SHOWN_FROM or stuck:
            out.append(f"slot {w['slot']} (pid {w['pid']}): oldest connection in a handler for {human_age(held)}"
                       + (f", {stuck} handler(s) stuck past --handler-timeout" if stuck else ""))
    return out


def stats_line(key: str, value: int) -> str:
    """One counter of stats: ``bytes in: 1.5 MiB (1572864)``, ``worker crashes: 1``."""
    if key.startswith("bytes_"):
        return f"{key.replace('_', ' ')}: {human_bytes(value)} ({value})"
    return f"{key.replace('_', ' ')}: {value}"


def format_stats(s: Reply) -> str:
    out = [f"{s['name']}: master pid {s['pid']}, generation {s['generation']}, up {human_age(s['uptime_s'])}"]
    out += [stats_line(k, v) for k, v in s.items()
            if k not in STATS_NOT_COUNTERS and isinstance(v, int) and not isinstance(v, bool)]
    if isinstance(s.get("active_max_mean"), int | float):
        out.append(f"busiest worker's open connections over the mean: {s['active_max_mean']:.2f}")
    tls = s.get("tls")
    if isinstance(tls, Mapping):
        versions = ", ".join(f"{v} {n}" for v, n in tls.get("versions", {}).items())
        failures = ", ".join(f"{r} {n}" for r, n in tls.get("failures", {}).items() if n)
        out.append(f"tls handshakes: {tls.get('handshakes')} ({versions})")
        out.append(f"tls handshake failures: {tls.get('failed')}{' (' + failures + ')' if failures else ''}")
    for u in s.get("upstreams") or []:
        failed = u.get("failed") or {}
        out.append(f"upstream {u.get('name')}: {u.get('state')}, {u.get('connections')} relayed, "
                   f"{u.get('active')} open, failed {sum(failed.values())} "
                   f"({', '.join(f'{k} {v}' for k, v in failed.items())}), failovers {u.get('failovers')}, "
                   f"over maxconn {u.get('over_maxconn')}, state changes {u.get('state_changes')}, "
                   f"checks {u.get('checks')} ({u.get('checks_failed')} failed)")
    return "\n".join(out)


def format_reload_progress(reload: Mapping[str, object]) -> str:
    """The status line of a reload in flight: its canary's figures so far, or how far it got."""
    canary = reload.get("canary")
    probation = reload.get("probation")
    if reload.get("phase") == "probation" and isinstance(probation, Mapping):
        return (f"generation {reload.get('generation')} on probation: {probation.get('remaining_s')}s left; "
                f"{probation.get('errors')} of {probation.get('connections')} connection(s) failed; generation "
                f"{reload.get('old_generation')}'s mold is kept for a rollback")
    if reload.get("phase") == "canary" and isinstance(canary, Mapping):
        return (f"reloading to generation {reload.get('generation')}: canary (pid {canary.get('pid')}) "
                f"{canary.get('remaining_s')}s left; {canary.get('errors')} of {canary.get('connections')} "
                f"connection(s) failed (old generation: {canary.get('old_errors')} of "
                f"{canary.get('old_connections')})")
    return (f"reloading to generation {reload.get('generation')}: {reload.get('started')} of "
            f"{reload.get('workers')} new worker(s) started")


def format_reload(reply: Reply) -> str:
    text = f"reloaded: generation {reply['generation']} serving with {reply['workers']} worker(s)"
    canary = reply.get("canary")
    if isinstance(canary, Mapping):
        text += (f"; canary passed: {canary.get('errors')} of {canary.get('connections')} connection(s) failed "
                 f"in {canary.get('seconds')}s (old generation: {canary.get('old_errors')} of "
                 f"{canary.get('old_connections')})")
    return text


def format_scale(reply: Reply) -> str:
    return f"scaled from {reply['previous']} to {reply['workers']} worker(s)"


def format_stop(reply: Reply) -> str:
    return f"stopped (master pid {reply['pid']} has exited)"


def format_reopen(reply: Reply) -> str:
    return "log files reopened"


def format_upgrade(reply: Reply) -> str:
    if reply.get("in_place"):
        return (f"upgraded in place: master pid {reply['pid']} runs the new program; "
                f"generation {reply['generation']} serves")
    return f"upgraded: new master pid {reply['pid']} serves; pid {reply['previous_pid']} is draining"


def format_drain(reply: Reply) -> str:
    text = DRAIN_STATES.get(reply.get("drain"), str(reply.get("drain")))
    checks = reply.get("health_checks")
    if reply.get("drain") == "health-checks" and isinstance(checks, list) and checks:
        text += f"; failing: {', '.join(map(str, checks))}"
    return text


COMMANDS: Mapping[str, Command] = {
    "status": Command(plain_request, format_status),
    "stats": Command(plain_request, format_stats),
    "top": Command(top_request, top_text, timeout=TOP_TIMEOUT, run=show_top),
    "reload": Command(reload_request, format_reload, timeout=GENERATION_TIMEOUT + MAX_CANARY),
    "scale": Command(scale_request, format_scale),
    "stop": Command(stop_request, format_stop, run=exchange_until_exit),
    "reopen": Command(plain_request, format_reopen),
    "upgrade": Command(plain_request, format_upgrade, timeout=GENERATION_TIMEOUT),
    "drain": Command(drain_request, format_drain),
}


def output(command: Command, reply: Reply, fmt: str) -> str:
    """A reply as the text to write in output format ``fmt``, final newline included."""
    if fmt == "json":
        return json.dumps(reply, indent=2) + "\n"
    if fmt == "prometheus":  # a snapshot: status and stats (see Command.carry_out)
        return render_prometheus(reply["status"], reply["stats"])
    return command.text(reply) + "\n"
