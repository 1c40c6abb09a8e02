"""Draw a timeline (see timeline.py) as a PNG: throughput, latency and failures per interval, with the events.

matplotlib is optional (the project's ``bench`` extra; ``scripts/bench --timeline`` installs it).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from timeline import Timeline
from timeline import segments as timeline_segments

COLOURS = {"reload": "#1f77b4", "upgrade": "#9467bd", "kill": "#d62728"}
TITLES = {"reload": "preforkctl reload", "upgrade": "preforkctl upgrade", "kill": "kill -9 of a worker"}
DONE = {"reload": "new generation serving", "upgrade": "new master serving", "kill": "replacement ready"}


class PlotError(Exception):
    """The picture cannot be drawn here; the message says what to install."""


def _pyplot() -> ModuleType:
    # imported by name: the type check passes whether or not the optional extra is installed
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ModuleNotFoundError:
        raise PlotError("matplotlib is not installed: run scripts/bench --timeline (it installs the bench "
                        "extra), or .venv/bin/pip install -e '.[bench]', or pass --no-plot") from None
    matplotlib.use("Agg")  # files only: no display needed
    return importlib.import_module("matplotlib.pyplot")


def draw(timeline: Timeline, path: Path) -> None:
    plt = _pyplot()
    ticker = importlib.import_module("matplotlib.ticker")
    setup = timeline.setup
    step_s = timeline.interval_ms / 1000
    per_s = 1 / step_s
    # full intervals only: the last line covers what finished after the last full one, a few ms, and its rate
    # would read as a collapse (its failures still count in the totals written over the bottom panel)
    full = [i for k, i in enumerate(timeline.intervals)
            if i.t_ms - (timeline.intervals[k - 1].t_ms if k else 0) >= timeline.interval_ms * 0.99]
    mid = [i.t_ms / 1000 - step_s / 2 for i in full]  # each interval drawn at its middle
    nan = float("nan")
    unit = "connections/s" if setup.get("mode") == "connect" else "round trips/s"

    fig, (top, middle, bottom) = plt.subplots(3, 1, sharex=True, figsize=(11, 8.2),
                                              gridspec_kw={"height_ratios": [3, 3, 1.5]})
    axes = (top, middle, bottom)

    top.plot(mid, [i.ops * per_s / 1000 for i in full], color="black", lw=1.4)
    top.set_ylabel(f"throughput\n(thousand {unit})")
    top.set_ylim(bottom=0, top=max((i.ops * per_s / 1000 for i in full), default=1) * 1.3)

    middle.plot(mid, [(i.p99_us / 1000) if i.p99_us is not None else nan for i in full],
                color="#ff7f0e", lw=1.4, label="p99")
    middle.plot(mid, [(i.p50_us / 1000) if i.p50_us is not None else nan for i in full],
                color="#2ca02c", lw=1.4, label="p50")
    middle.set_yscale("log")
    middle.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    middle.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
    middle.yaxis.set_minor_formatter(ticker.NullFormatter())
    middle.set_ylabel("latency per echo\n(ms, log scale)")
    middle.legend(loc="upper left", ncols=2, frameon=True, framealpha=0.85, edgecolor="none")

    failed = [i.failures for i in full]
    bottom.bar(mid, failed, width=step_s * 0.9, color="#d62728")
    bottom.plot(mid, failed, color="#d62728", lw=1.6, drawstyle="steps-mid")
    peak = max(failed, default=0)
    bottom.set_ylim(-0.15 * max(4, peak), max(4, peak) * 1.9)
    bottom.yaxis.set_major_locator(importlib.import_module("matplotlib.ticker").MaxNLocator(nbins=3, integer=True))
    bottom.set_ylabel(f"failed {unit.split('/')[0]}\n(per {timeline.interval_ms:g} ms)")
    # the count for each stretch between two events, written over it: the zero-loss claim at a glance
    for seg in timeline_segments(timeline):
        bottom.text((seg.start_s + seg.end_s) / 2, 0.8, f"{seg.failures} failed\nof {seg.ops + seg.failures:,}",
                    transform=bottom.get_xaxis_transform(), ha="center", va="center", fontsize=9,
                    color="#2ca02c" if seg.failures == 0 else "#d62728", weight="bold")
    bottom.set_xlabel(f"seconds since the load started ({timeline.interval_ms:g} ms intervals)")
    bottom.set_xlim(0, max((i.t_ms / 1000 for i in full), default=1))

    for event in timeline.events:
        colour = COLOURS.get(event.name, "grey")
        for ax in axes:
            ax.axvspan(event.start_s, max(event.end_s, event.start_s + step_s / 4), color=colour, alpha=0.15, lw=0)
            ax.axvline(event.start_s, color=colour, ls="--", lw=1.2)
        after_ms = (event.end_s - event.start_s) * 1000
        top.annotate(f"{TITLES.get(event.name, event.name)}\n{DONE.get(event.name, 'done')}\nafter {after_ms:.0f} ms",
                     xy=(event.start_s, 1), xycoords=("data", "axes fraction"), xytext=(4, -4),
                     textcoords="offset points", ha="left", va="top", fontsize=9, color=colour)
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)

    fig.suptitle("prefork under load through a reload, an upgrade and a worker kill", fontsize=13, x=0.01,
                 ha="left")
    fig.text(0.01, 0.948, _conditions(timeline), fontsize=9, color="#444444", ha="left", va="top")
    fig.tight_layout(rect=(0, 0, 1, 0.91))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _conditions(timeline: Timeline) -> str:
    s: dict[str, Any] = timeline.setup
    how = ("a new connection per echo (connect, send, read, close)" if s.get("mode") == "connect"
           else "persistent connections (ping)")
    load = f"; load average {s['loadavg']} before the run" if s.get("loadavg") else ""
    return (f"{s.get('prefork')} on CPU {s.get('server_cpus')}; echoload on CPU {s.get('load_cpus')}: "
            f"{s.get('conns')} clients, {how}, {s.get('size')}-byte messages\n{s.get('date')}, "
            f"{s.get('cpus', '?')} CPUs{load}")
