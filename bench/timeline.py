"""Latency and throughput of prefork, per interval, through a reload, an upgrade and a worker kill.

Starts prefork pinned to the server CPU and the load generator (``echoload -i``:
one line per interval) pinned to the load CPU, then, on the load's own clock,
runs ``preforkctl reload``, ``preforkctl upgrade`` and ``kill -9`` of one
worker, one after the other. Every interval line and the time each event
started and finished (the command returned, or the replacement worker is
ready) are kept; ``write_csv`` saves them and ``plot_timeline.draw`` draws them.

  timeline.py [--secs S] [--mode connect|ping] [--prefork-args ARGS] [--out DIR] [--no-plot]
              [--bad-reload none|canary|probation]

The events fall at a quarter, a half and three quarters of the run, so the
run starts and ends in a steady state to compare against.

``--bad-reload`` runs another scenario: prefork serves an echo handler from
a module of its own, and at a third of the run the module is edited to raise
in ``handle()`` and reloaded: plainly (``none``: every connection fails from
then on), with ``reload --canary 1`` (``canary``: the canary's share fails
for a second, then it is rolled back), or under ``--reload-probation 5``
(``probation``: the new generation serves until the probation's next look,
then the old one is back). Its one event is ``bad-reload``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compare

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout's prefork, as the daemon under test runs it

from prefork.control import ControlError, call  # noqa: E402

BIN = Path(sys.executable).parent
EVENTS = ("reload", "upgrade", "kill")
BAD_RELOADS = ("none", "canary", "probation")
HANDLER_MODULE = "timeline_handler"
HANDLER = '''
import socketserver


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        {bad}
        while data := self.request.recv(65536):
            self.request.sendall(data)
'''


class TimelineError(Exception):
    """The scenario could not run as planned; the message says where it stopped."""


@dataclass(frozen=True)
class Interval:
    """One line of ``echoload -i``: what completed (and failed) in the interval ending at ``t_ms``."""

    t_ms: int
    ops: int
    p50_us: int | None  # None: nothing completed in the interval
    p99_us: int | None
    max_us: int | None
    failures: int
    errors: int
    refused: int
    resets: int
    short: int


@dataclass(frozen=True)
class Event:
    """An operator's action during the run, in seconds since the load started."""

    name: str  # one of EVENTS
    start_s: float
    end_s: float  # reload/upgrade: the command returned (the new side serves); kill: the replacement is ready
    ok: bool
    detail: str


@dataclass
class Timeline:
    start_mono_ns: int = 0
    interval_ms: float = 0.0
    intervals: list[Interval] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    summary: dict[str, str] = field(default_factory=dict)  # echoload's last line
    setup: dict[str, str] = field(default_factory=dict)  # how it ran, for the picture and the CSV


def _fields(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def _opt_int(value: str) -> int | None:
    return None if value == "-" else int(value)


def parse_interval(line: str) -> Interval | None:
    """An ``echoload -i`` interval line as an Interval; None for any other line."""
    f = _fields(line)
    if "t_ms" not in f:
        return None
    return Interval(t_ms=int(f["t_ms"]), ops=int(f["ops"]), p50_us=_opt_int(f["p50_us"]),
                    p99_us=_opt_int(f["p99_us"]), max_us=_opt_int(f["max_us"]), failures=int(f["failures"]),
                    errors=int(f["errors"]), refused=int(f["refused"]), resets=int(f["resets"]),
                    short=int(f["short"]))


def read_load(lines: Iterable[str], timeline: Timeline, on_interval: Callable[[float], None]) -> None:
    """Fill ``timeline`` from echoload's output, calling ``on_interval(seconds)`` after each interval line."""
    for line in lines:
        f = _fields(line)
        if "start_mono_ns" in f:
            timeline.start_mono_ns = int(f["start_mono_ns"])
            timeline.interval_ms = float(f["interval_ms"])
        elif (interval := parse_interval(line)) is not None:
            timeline.intervals.append(interval)
            on_interval(interval.t_ms / 1000)
        elif "mode" in f:
            timeline.summary = f


class Prefork:
    """The daemon under test: started in its own session, found and stopped through its control socket."""

    def __init__(self, args: list[str], server_cpus: str, workdir: Path, path: str | None = None) -> None:
        self.control = str(workdir / "prefork.sock")
        self.log_path = workdir / "prefork.log"
        argv = [str(BIN / "prefork"), "--bind", "127.0.0.1:0", "--control", self.control,
                "--log-file", str(self.log_path), *args]
        env = dict(os.environ)
        # the checkout's prefork, even when the virtual environment was installed from another one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), path, env.get("PYTHONPATH")) if p)
        self.env = env
        self.stderr_path = workdir / "prefork.stderr"  # a file, not a pipe: an upgraded master inherits it too
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(compare.pinned(server_cpus, argv), env=env, start_new_session=True,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "preforkctl"), "--control", self.control, "--json", *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def status(self) -> dict[str, Any] | None:
        """The master's status, or None while it does not answer (starting, or between two masters)."""
        # in-process rather than through preforkctl: polling must not cost a Python start-up each time
        try:
            reply, sock = call(self.control, {"command": "status"}, timeout=5.0)
        except (ControlError, OSError):
            return None
        sock.close()
        return reply if reply.get("ok") else None

    def ready(self, status: dict[str, Any]) -> list[dict[str, Any]]:
        return [w for w in status["workers"] if w["state"] == "ready" and w["generation"] == status["generation"]]

    def wait_serving(self, timeout: float, exclude: frozenset[int] = frozenset()) -> dict[str, Any]:
        """The status once every worker of the serving generation is ready (none of them in ``exclude``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and self.proc.returncode != 0:
                err = self.stderr_path.read_text(errors="replace").strip()
                raise TimelineError(f"prefork exited with status {self.proc.returncode}: {err}")
            st = self.status()
            if st and st["state"] == "serving":
                ready = self.ready(st)
                if len(ready) == st["target_workers"] and not {w["pid"] for w in ready} & exclude:
                    return st
            time.sleep(0.02)  # polling the control socket: the condition is the status itself
        raise TimelineError(f"prefork did not serve within {timeout:g}s (log: {self.log_path})")

    def stop(self) -> None:
        """Stop the daemon's whole session (an upgraded master is in it too): TERM, then KILL."""
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # the upgraded master outlives the one we started: wait until the group is empty
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)


def _seconds(start_mono_ns: int, t_ns: int) -> float:
    return (t_ns - start_mono_ns) / 1e9


def _command_event(daemon: Prefork, name: str, start_mono_ns: int) -> Event:
    t0 = time.monotonic_ns()
    done = daemon.ctl(name)
    t1 = time.monotonic_ns()
    ok = done.returncode == 0
    if not ok:
        detail = (done.stderr or done.stdout).strip().replace("\n", " ")
    else:
        reply = json.loads(done.stdout)
        if name == "reload":
            detail = f"generation {reply.get('generation')} serving with {reply.get('workers')} worker(s)"
        elif reply.get("in_place"):
            detail = f"in place: master pid {reply.get('pid')}, generation {reply.get('generation')} serving"
        else:
            detail = f"master pid {reply.get('previous_pid')} replaced by {reply.get('pid')}"
    return Event(name, _seconds(start_mono_ns, t0), _seconds(start_mono_ns, t1), ok, detail)


def write_handler(directory: Path, bad: bool) -> None:
    """The echo handler the --bad-reload scenario serves; ``bad``: it raises KeyError in handle()."""
    text = HANDLER.format(bad='raise KeyError("edited")' if bad else "pass")
    (directory / f"{HANDLER_MODULE}.py").write_text(text)


def _bad_reload_event(daemon: Prefork, directory: Path, how: str, start_mono_ns: int) -> Event:
    """The handler is edited to raise, and reloaded: the reload's verdict is the event's detail."""
    write_handler(directory, bad=True)
    t0 = time.monotonic_ns()
    done = daemon.ctl("reload", *(["--canary", "1"] if how == "canary" else []))
    t1 = time.monotonic_ns()
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        reply = {}
    detail = f"{how}: {reply.get('verdict', '?')}: {(reply.get('error') or '').replace(chr(10), ' ')}".rstrip(": ")
    # a bad reload is expected to be turned down with a canary or a probation, and to go through without
    return Event("bad-reload", _seconds(start_mono_ns, t0), _seconds(start_mono_ns, t1),
                 reply.get("verdict") == ("committed" if how == "none" else "rolled_back"), detail)


def _kill_event(daemon: Prefork, start_mono_ns: int) -> Event:
    st = daemon.status()
    if not st or not daemon.ready(st):
        raise TimelineError("no ready worker to kill")
    victim = daemon.ready(st)[0]
    t0 = time.monotonic_ns()
    os.kill(victim["pid"], signal.SIGKILL)
    after = daemon.wait_serving(timeout=20.0, exclude=frozenset({victim["pid"]}))
    t1 = time.monotonic_ns()
    new = [w["pid"] for w in daemon.ready(after) if w["slot"] == victim["slot"]]
    detail = f"worker {victim['slot']} (pid {victim['pid']}) killed; pid {new[0] if new else '?'} ready"
    return Event("kill", _seconds(start_mono_ns, t0), _seconds(start_mono_ns, t1), True, detail)


class Schedule:
    """The events in order: each starts once the load's clock reaches its time and the one before has finished.

    ``tick(seconds)`` is called with each interval the load reports; ``fire(name)`` runs one event (in a
    thread, so the load's output is read on time) and returns what happened.
    """

    def __init__(self, at: dict[str, float], fire: Callable[[str], Event]) -> None:
        self.at = at
        self.fire = fire
        self.pending = sorted(at, key=at.__getitem__)
        self.events: list[Event] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="event")
        self.running: Future[Event] | None = None

    def tick(self, t: float) -> None:
        if self.running is not None and self.running.done():
            self.events.append(self.running.result())  # an event that raised stops the run here
            self.running = None
        if self.pending and self.running is None and t >= self.at[self.pending[0]]:
            self.running = self.pool.submit(self.fire, self.pending.pop(0))

    def finish(self, timeout: float) -> list[Event]:
        """Every event that ran, once the one in flight has finished; raises if some never started."""
        if self.running is not None:
            self.events.append(self.running.result(timeout=timeout))
            self.running = None
        self.pool.shutdown()
        if self.pending:
            raise TimelineError(f"the load ended before {', '.join(self.pending)} could run (try a longer --secs)")
        return self.events


def run(secs: float, mode: str, prefork_args: list[str], conns: int = 50, interval_ms: int = 100,
        server_cpus: str = "1", load_cpus: str = "0", bad_reload: str | None = None) -> Timeline:
    """Run the scenario once and return what the load saw and when each event happened."""
    if secs < 2:
        raise TimelineError(f"--secs {secs:g}: too short for three events (at least 2)")
    compare.build_tools()
    timeline = Timeline(setup={
        "mode": mode, "conns": str(conns), "size": "64", "interval_ms": str(interval_ms), "secs": f"{secs:g}",
        "prefork": shlex.join(["prefork", *prefork_args]), "server_cpus": server_cpus, "load_cpus": load_cpus,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": str(os.cpu_count()),
        # how busy the machine already was: on a shared one, other work shows in the curves too
        "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        **({"bad_reload": bad_reload} if bad_reload else {}),
    })
    with contextlib.ExitStack() as stack:  # unwinds in reverse: events, load, daemon, its directory
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="prefork-timeline-"))  # 0700, as prefork wants
        if bad_reload:
            write_handler(Path(tmp), bad=False)
            prefork_args = [*prefork_args, *(["--reload-probation", "5"] if bad_reload == "probation" else []),
                            f"{HANDLER_MODULE}:Handler"]
            timeline.setup["prefork"] = shlex.join(["prefork", *prefork_args])
        daemon = Prefork(prefork_args, server_cpus, Path(tmp), path=tmp if bad_reload else None)
        stack.callback(daemon.stop)
        st = daemon.wait_serving(timeout=30.0)
        port = int(st["listeners"][0].rsplit(":", 1)[1])
        load = subprocess.Popen(
            compare.pinned(load_cpus, [compare.ECHOLOAD, "-m", mode, "-c", str(conns), "-s", "64",
                                       "-d", f"{secs:g}", "-i", str(interval_ms), "127.0.0.1", str(port)]),
            stdout=subprocess.PIPE, text=True, bufsize=1)
        stack.callback(_end, load)
        watchdog = threading.Timer(secs + 60, load.kill)  # echoload ends by itself; this bounds a hang
        watchdog.start()
        stack.callback(watchdog.cancel)

        def fire(name: str) -> Event:
            if name == "kill":
                return _kill_event(daemon, timeline.start_mono_ns)
            if name == "bad-reload" and bad_reload:
                return _bad_reload_event(daemon, Path(tmp), bad_reload, timeline.start_mono_ns)
            return _command_event(daemon, name, timeline.start_mono_ns)

        at = {"bad-reload": secs / 3} if bad_reload else {name: secs * (k + 1) / 4 for k, name in enumerate(EVENTS)}
        schedule = Schedule(at, fire)
        stack.callback(schedule.pool.shutdown, cancel_futures=True)
        assert load.stdout is not None
        read_load(load.stdout, timeline, schedule.tick)
        load.wait(timeout=30)
        timeline.events = schedule.finish(timeout=60)
        if not timeline.summary:
            raise TimelineError(f"echoload gave no summary (exit status {load.returncode})")
        failed = [e for e in timeline.events if not e.ok]
        if failed:
            raise TimelineError("; ".join(f"{e.name} failed: {e.detail}" for e in failed))
    return timeline


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def write_csv(timeline: Timeline, intervals_path: Path, events_path: Path) -> None:
    """Two tables: one row per interval (milliseconds, connections or round trips per second), one per event."""

    def ms(us: int | None) -> str:
        return "" if us is None else f"{us / 1000:.3f}"

    with open(intervals_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "ops", "ops_per_s", "p50_ms", "p99_ms", "max_ms", "failures", "errors", "refused",
                    "resets", "short"])
        previous_ms = 0
        for i in timeline.intervals:
            per_s = 1000 / max(i.t_ms - previous_ms, 1)  # the last interval may be short
            previous_ms = i.t_ms
            w.writerow([f"{i.t_ms / 1000:.3f}", i.ops, f"{i.ops * per_s:.0f}", ms(i.p50_us), ms(i.p99_us),
                        ms(i.max_us), i.failures, i.errors, i.refused, i.resets, i.short])
    with open(events_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["event", "start_s", "end_s", "duration_ms", "ok", "detail"])
        for e in timeline.events:
            w.writerow([e.name, f"{e.start_s:.3f}", f"{e.end_s:.3f}", f"{(e.end_s - e.start_s) * 1000:.0f}",
                        int(e.ok), e.detail])


@dataclass(frozen=True)
class Segment:
    """The run cut at each event: from one event's start (or the load's) to the next one's (or the end)."""

    name: str  # "before" or an event's name
    start_s: float
    end_s: float
    ops: int
    failures: int
    worst_p99_us: int


def segments(timeline: Timeline) -> list[Segment]:
    """Each interval counts in the segment its end falls in, so every failure is counted exactly once."""
    cuts = [("before", 0.0)] + [(e.name, e.start_s) for e in timeline.events]
    end = timeline.intervals[-1].t_ms / 1000 if timeline.intervals else 0.0
    out = []
    for (name, start), stop in zip(cuts, [*(c[1] for c in cuts[1:]), math.inf], strict=True):
        inside = [i for i in timeline.intervals if start < i.t_ms / 1000 <= stop]
        out.append(Segment(name, start, min(stop, end), sum(i.ops for i in inside), sum(i.failures for i in inside),
                           max((i.p99_us or 0 for i in inside), default=0)))
    return out


def report(timeline: Timeline) -> str:
    """A few lines for the terminal: each event's duration and what the load saw until the next one."""
    s = timeline.summary
    lines = [f"# {timeline.setup.get('date')}: {timeline.setup.get('prefork')}, "
             f"load average {timeline.setup.get('loadavg')} before the run",
             f"{s.get('mode', '?')} mode, {s.get('conns', '?')} clients, {s.get('secs', '?')} s: "
             f"{s.get('ops', '?')} completed; failures: errors={s.get('errors')} refused={s.get('refused')} "
             f"resets={s.get('resets')} short={s.get('short')}; p50 {s.get('p50_us')} us, p99 {s.get('p99_us')} us"]
    events = {e.name: e for e in timeline.events}
    for seg in segments(timeline):
        e = events.get(seg.name)
        what = (f"{seg.name:<8} at {e.start_s:5.2f} s, done after {(e.end_s - e.start_s) * 1000:5.0f} ms ({e.detail})"
                if e else f"{seg.name:<8} the first event")
        lines.append(f"  {what}; {seg.start_s:.1f}-{seg.end_s:.1f} s: {seg.ops} completed, {seg.failures} failed, "
                     f"worst p99 {seg.worst_p99_us / 1000:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--secs", type=float, default=12.0, help="length of the run (default 12)")
    ap.add_argument("--mode", choices=("connect", "ping"), default="connect",
                    help="connect: a new connection per echo, so every one goes through accept (default)")
    ap.add_argument("--prefork-args", default="-k thread -w 2", help="prefork's options (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where the CSV and PNG go")
    ap.add_argument("--no-plot", action="store_true", help="write the CSV only (no matplotlib needed)")
    ap.add_argument("--bad-reload", choices=BAD_RELOADS,
                    help="instead: a reload to a handler that raises, plainly, with a canary, or under probation")
    args = ap.parse_args(argv)
    try:
        timeline = run(args.secs, args.mode, shlex.split(args.prefork_args), bad_reload=args.bad_reload)
        args.out.mkdir(parents=True, exist_ok=True)
        write_csv(timeline, args.out / "timeline.csv", args.out / "timeline-events.csv")
        print(report(timeline))
        print(f"wrote {args.out / 'timeline.csv'} and {args.out / 'timeline-events.csv'}")
        if not args.no_plot:
            import plot_timeline

            plot_timeline.draw(timeline, args.out / "timeline.png")
            print(f"wrote {args.out / 'timeline.png'}")
    except (TimelineError, compare.BuildError, OSError, subprocess.SubprocessError) as exc:
        print(f"timeline: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
