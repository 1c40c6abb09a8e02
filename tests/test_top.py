"""``preforkctl top``: the live table in a real terminal (tmux), one frame for pipes, and its pure parts."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, child_env, exchange, wait_for
from conftest import preforkctl as ctl
from prefork.ctl.top import HEADERS, Frame, Sample, build_frame, frame_lines, rate


@dataclass
class Tmux:
    """A private tmux server (its own socket) running one command in a 120x30 pane.

    The command's exit status, stderr and the terminal settings after it exits
    are written to files, since the pane goes away with the command.
    """

    socket: Path
    session: str
    rc_file: Path
    err_file: Path
    stty_file: Path

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, timeout=10)

    def start(self, argv: list[str]) -> None:
        # `stty -a` runs on the same terminal after the command: it shows what the command left behind
        command = (f"{shlex.join(argv)} 2>{shlex.quote(str(self.err_file))}; "
                   f"echo $? >{shlex.quote(str(self.rc_file))}.tmp; "
                   f"stty -a >{shlex.quote(str(self.stty_file))}; "
                   f"mv {shlex.quote(str(self.rc_file))}.tmp {shlex.quote(str(self.rc_file))}")
        # a fresh server started with this environment, so the pane's python finds the test's packages
        result = subprocess.run(["tmux", "-S", str(self.socket), "-f", "/dev/null", "new-session", "-d",
                                 "-s", self.session, "-x", "120", "-y", "30", command],
                                capture_output=True, text=True, env=child_env(), timeout=10)
        assert result.returncode == 0, result.stderr

    def screen(self) -> str:
        result = self.tmux("capture-pane", "-p", "-t", self.session)
        return result.stdout if result.returncode == 0 else ""

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", self.session).returncode == 0

    def wait_screen(self, predicate: Callable[[str], Any], what: str, timeout: float = 10.0) -> str:
        last = [""]

        def check() -> Any:
            last[0] = self.screen()
            return predicate(last[0])

        try:
            wait_for(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pane shows:\n{last[0]}\nstderr: {self.stderr()}") from None
        return last[0]

    def wait_exited(self, timeout: float = 10.0) -> int:
        wait_for(lambda: not self.alive(), timeout, "the top command to exit (its tmux session to end)")
        wait_for(self.rc_file.exists, timeout, "the exit status file")
        return int(self.rc_file.read_text())

    def stderr(self) -> str:
        return self.err_file.read_text() if self.err_file.exists() else ""

    def kill(self) -> None:
        self.tmux("kill-server")


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    assert shutil.which("tmux"), "tmux is needed to drive top in a terminal (apt-get install tmux)"
    term = Tmux(socket=tmp_path / "tmux.sock", session="top", rc_file=tmp_path / "rc",
                err_file=tmp_path / "stderr", stty_file=tmp_path / "stty")
    try:
        yield term
    finally:
        term.kill()


def top_argv(control: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "prefork.ctl", "--control", control, "top", "--interval", "0.2", *extra]


def table_rows(screen: str, pids: list[int]) -> dict[int, list[str]]:
    """The table row of each pid in ``pids`` found on the screen, split into cells."""
    rows = {}
    for line in screen.splitlines():
        cells = re.split(r"\s{2,}", line.strip())  # columns are two spaces apart; "3.0 MiB" is one cell
        if len(cells) == len(HEADERS) and cells[1].isdigit() and int(cells[1]) in pids:
            rows[int(cells[1])] = cells
    return rows


def assert_terminal_restored(term: Tmux) -> None:
    settings = term.stty_file.read_text().split()
    assert "icanon" in settings and "echo" in settings, f"terminal left in cbreak mode: {settings}"


def test_live_table_refreshes_and_q_quits(daemon_factory: Callable[..., Daemon], tmux: Tmux) -> None:
    d = daemon_factory("--workers", "3")
    pids = [w["pid"] for w in d.status()["workers"]]
    tmux.start(top_argv(d.control))
    header = re.compile(rf"master pid {d.pid}, serving, generation 1, up \S+, 3/3 workers, 0 open, \S+ req/s")
    screen = tmux.wait_screen(lambda s: header.search(s) and len(table_rows(s, pids)) == 3,
                              "the header and a row for each worker")
    assert " ".join(HEADERS) in " ".join(screen.split())

    made = 4
    for i in range(made):
        assert exchange(d.address(), f"top {i}\n".encode()) == f"top {i}\n".encode()

    def requests_column(s: str) -> int:
        rows = table_rows(s, pids)
        return sum(int(r[HEADERS.index("REQUESTS")]) for r in rows.values()) if len(rows) == 3 else -1

    # the table refreshes by itself: the connections show up without a key press
    screen = tmux.wait_screen(lambda s: requests_column(s) == made, f"the REQUESTS column to add up to {made}")
    for cells in table_rows(screen, pids).values():
        assert cells[HEADERS.index("STATE")] == "ready"
        assert cells[HEADERS.index("GEN")] == "1"
        assert re.fullmatch(r"\d+\.\d", cells[HEADERS.index("REQ/S")]), cells  # a rate: a second look was taken
        assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB|GiB)", cells[HEADERS.index("RSS")]), cells

    tmux.tmux("send-keys", "-t", tmux.session, "q")
    assert tmux.wait_exited() == 0
    assert tmux.stderr() == ""
    assert_terminal_restored(tmux)
    assert d.proc.poll() is None  # quitting top leaves the daemon alone


def test_ctrl_c_exits_quietly(daemon_factory: Callable[..., Daemon], tmux: Tmux) -> None:
    d = daemon_factory()
    pids = [w["pid"] for w in d.status()["workers"]]
    tmux.start(top_argv(d.control))
    tmux.wait_screen(lambda s: len(table_rows(s, pids)) == 2, "a row for each worker")
    tmux.tmux("send-keys", "-t", tmux.session, "C-c")
    assert tmux.wait_exited() == 0
    assert tmux.stderr() == ""  # no traceback, no message
    assert_terminal_restored(tmux)


def test_daemon_going_away(daemon_factory: Callable[..., Daemon], tmux: Tmux) -> None:
    d = daemon_factory()
    pids = [w["pid"] for w in d.status()["workers"]]
    tmux.start(top_argv(d.control))
    tmux.wait_screen(lambda s: len(table_rows(s, pids)) == 2, "a row for each worker")
    stopped = ctl("--control", d.control, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert tmux.wait_exited() == 3
    assert tmux.stderr().splitlines() == [f"preforkctl: daemon not answering on {d.control}"]
    assert_terminal_restored(tmux)


def test_one_frame_without_a_terminal(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--workers", "3")
    pids = [w["pid"] for w in d.status()["workers"]]
    result = ctl("--control", d.control, "top")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "\x1b" not in result.stdout  # plain text for scripts: no escape sequences
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"prefork: master pid {d.pid}, serving, generation 1, ")
    assert lines[0].endswith(", 3/3 workers, 0 open, - req/s")
    assert re.split(r"\s{2,}", lines[2].strip()) == HEADERS
    rows = table_rows(result.stdout, pids)
    assert sorted(rows) == sorted(pids)
    assert len(lines) == 3 + len(pids)


def test_missing_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "none.sock")
    result = ctl("--control", path, "top")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"preforkctl: daemon not answering on {path}"]


# -- pure parts: rates and layout ---------------------------------------------------------------------------


def replies(uptime: float, requests: int, workers: list[tuple[int, int]], master: int = 100) -> tuple[
        dict[str, Any], dict[str, Any]]:
    status = {
        "pid": master, "name": "web", "state": "serving", "generation": 2, "uptime_s": uptime, "target_workers": 2,
        "workers": [{"slot": i, "pid": pid, "generation": 2, "state": "ready", "active": 1, "requests": n,
                     "rss_bytes": 3 * 1024 * 1024, "cpu_percent": 12.25, "heartbeat_age_s": 0.44}
                    for i, (pid, n) in enumerate(workers)],
    }
    stats = {"pid": master, "uptime_s": uptime, "requests": requests, "active": 2}
    return status, stats


def cells(frame: Frame, pid: int) -> dict[str, str]:
    row = next(r for r in frame.rows if r[1] == str(pid))
    return dict(zip(HEADERS, row, strict=True))


def test_first_frame_has_no_rates() -> None:
    frame = build_frame(*replies(10.0, 50, [(1, 20), (2, 30)]), None)
    assert frame.header == "web: master pid 100, serving, generation 2, up 10s, 2/2 workers, 2 open, - req/s"
    assert cells(frame, 1) == {"SLOT": "0", "PID": "1", "GEN": "2", "STATE": "ready", "ACTIVE": "1", "SHARE": "-",
                               "REQ/S": "-",
                               "REQUESTS": "20", "RSS": "3.0 MiB", "USS": "-", "CPU%": "12.2", "HEARTBEAT": "0.4s"}
    assert frame.sample == Sample(master_pid=100, clock=10.0, requests=50, worker_clock=10.0,
                                  worker_requests={1: 20, 2: 30})


def test_rates_from_the_masters_clock() -> None:
    first = build_frame(*replies(10.0, 50, [(1, 20), (2, 30)]), None)
    second = build_frame(*replies(12.0, 90, [(1, 25), (3, 7)]), first.sample)
    assert second.header.endswith(", 20.0 req/s")  # (90 - 50) / 2 s
    assert cells(second, 1)["REQ/S"] == "2.5"  # (25 - 20) / 2 s
    assert cells(second, 3)["REQ/S"] == "-"  # a new worker: nothing to compare with yet
    assert second.sample is not None and 2 not in second.sample.worker_requests


def test_new_master_resets_rates() -> None:
    first = build_frame(*replies(100.0, 500, [(1, 20)]), None)
    second = build_frame(*replies(101.0, 600, [(1, 30)], master=200), first.sample)
    assert second.header.endswith(", - req/s")
    assert cells(second, 1)["REQ/S"] == "-"


@pytest.mark.parametrize(("now", "clock", "before", "before_clock", "expected"), [
    (10, 2.0, 0, 1.0, 10.0),
    (10, 1.5, 4, 1.0, 12.0),
    (10, 2.0, None, None, None),  # first look
    (10, 1.0, 0, 1.0, None),  # no time passed
    (10, 1.0, 0, 2.0, None),  # the clock went back
    (3, 2.0, 10, 1.0, None),  # the counter went back
])
def test_rate(now: int, clock: float, before: int | None, before_clock: float | None,
              expected: float | None) -> None:
    assert rate(now, clock, before, before_clock) == expected


def test_frame_cut_to_the_window() -> None:
    frame = build_frame(*replies(10.0, 0, [(pid, 0) for pid in range(1, 11)]), None)
    full = frame_lines(frame)
    assert len(full) == 3 + 10
    cut = frame_lines(frame, height=8, width=30)
    assert len(cut) == 8
    assert cut[-1].startswith("... 6 more worker(s)")
    assert all(len(line) <= 30 for line in cut)
    assert cut[:7] == [line[:30] for line in full[:7]]


def test_tiny_window_keeps_header_and_notice() -> None:
    frame = build_frame(*replies(10.0, 0, [(1, 0), (2, 0)]), None)
    assert frame_lines(frame, height=0) == [frame.header, "... 2 more worker(s) (enlarge the window)"]
