"""``preforkctl``'s pure parts: the command table (request builders, text formatters), output formats, the table
renderer, and main()'s exit statuses against a fake control socket (no daemon, no process)."""

from __future__ import annotations

import argparse
import json
import socket
from typing import Any

import pytest

from prefork import __version__, ctl
from prefork.control import ControlError, DaemonNotRunning
from prefork.ctl import client
from prefork.ctl.commands import COMMANDS, output
from prefork.ctl.errors import UsageError
from prefork.ctl.parser import build_parser, output_format
from prefork.ctl.render import human_age, human_bytes, table
from prefork.ctl.top import build_frame, frame_lines
from prefork.metrics import render_prometheus

STATUS: dict[str, Any] = {
    "ok": True, "name": "web", "pid": 42, "state": "serving", "generation": 2, "uptime_s": 3725.0,
    "target_workers": 2, "worker_class": "async", "event_loop": "uvloop", "handler": "app:Echo",
    "listeners": ["127.0.0.1:8000", "[::1]:8000"],
    "workers": [
        {"slot": 0, "pid": 4711, "generation": 2, "state": "ready", "requests": 12345, "active": 1,
         "share": 1.0, "rss_bytes": 3 * 1024 * 1024, "uss_bytes": 1024 * 1024, "pss_bytes": 2 * 1024 * 1024,
         "cpu_percent": 1.25, "age_s": 3600.0, "heartbeat_age_s": 0.44},
        {"slot": 1, "pid": 99, "generation": 1, "state": "stopping", "requests": 0, "active": 0,
         "rss_bytes": 512, "cpu_percent": 0.0, "age_s": 4.5, "heartbeat_age_s": 12.0},
    ],
    "backoff": [{"slot": 2, "failures": 3, "restart_in_s": 1.25}, {"slot": 3, "failures": 1, "restart_in_s": None}],
}
STATS: dict[str, Any] = {
    "ok": True, "name": "web", "pid": 42, "generation": 2, "uptime_s": 200000.0, "requests": 123456, "active": 3,
    "errors": 1, "workers": 2, "workers_spawned": 5, "worker_exits": 3, "worker_crashes": 1, "worker_timeouts": 0,
    "reloads": 2, "failed_reloads": 1,
}


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--control", "/nowhere.sock", *argv])


def build(*argv: str) -> dict[str, Any]:
    args = parse(*argv)
    return COMMANDS[args.command].request(args)


# -- the table covers the command line ------------------------------------------------------------------------


def test_every_subcommand_has_an_entry() -> None:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == sorted(COMMANDS)
    assert sorted(COMMANDS) == sorted(["status", "stats", "top", "reload", "scale", "stop", "reopen", "upgrade",
                                       "drain"])


@pytest.mark.parametrize(("command", "timeout"), [
    ("status", 10.0), ("stats", 10.0), ("top", 5.0), ("reload", 600.0 + 3600.0), ("scale", 10.0), ("stop", 10.0),
    ("reopen", 10.0), ("upgrade", 600.0), ("drain", 10.0),
])
def test_default_timeouts(command: str, timeout: float) -> None:
    assert COMMANDS[command].timeout == timeout


# -- request builders ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    (["status"], {"command": "status"}),
    (["stats"], {"command": "stats"}),
    (["reload"], {"command": "reload"}),
    (["reopen"], {"command": "reopen"}),
    (["upgrade"], {"command": "upgrade"}),
    (["scale", "3"], {"command": "scale", "workers": 3}),
    (["scale", "1"], {"command": "scale", "workers": 1}),
    (["scale", "1024"], {"command": "scale", "workers": 1024}),
    (["scale", "+1"], {"command": "scale", "by": 1}),
    (["scale", "+12"], {"command": "scale", "by": 12}),
    (["scale", "-1"], {"command": "scale", "by": -1}),
    (["scale", "-3"], {"command": "scale", "by": -3}),
    (["scale", "007"], {"command": "scale", "workers": 7}),
    (["stop"], {"command": "stop"}),
    (["stop", "--fast"], {"command": "stop", "fast": True}),
    (["drain"], {"command": "drain"}),
    (["drain", "--off"], {"command": "drain", "off": True}),
    (["drain", "--close"], {"command": "drain", "close": True}),
    (["drain", "--off", "--close"], {"command": "drain", "off": True, "close": True}),
    (["top"], {"interval": 1.0}),
    (["top", "--interval", "0.25"], {"interval": 0.25}),
])
def test_request_builders(argv: list[str], expected: dict[str, Any]) -> None:
    built = build(*argv)
    assert built == expected
    assert list(built) == list(expected)  # the same keys in the same order on the wire


@pytest.mark.parametrize(("argv", "message"), [
    (["scale", "0"], "scale: N must be from 1 to 1024, got 0"),
    (["scale", "1025"], "scale: N must be from 1 to 1024, got 1025"),
    (["scale", "99999999999999"], "scale: N must be at most 1024, got '99999999999999'"),
    (["scale", "+0"], "scale: a change must not be zero, got +0"),
    (["scale", "-0"], "scale: a change must not be zero, got -0"),
    (["scale", "x"], "scale: N must be a count (3) or a change (+2, -1), got 'x'"),
    (["scale", "1.5"], "scale: N must be a count (3) or a change (+2, -1), got '1.5'"),
    (["scale", "+-1"], "scale: N must be a count (3) or a change (+2, -1), got '+-1'"),
    (["scale", "\uff14"], "scale: N must be a count (3) or a change (+2, -1), got '\uff14'"),
    (["scale", "+"], "scale: N must be a count (3) or a change (+2, -1), got '+'"),
    (["top", "--interval", "0"], "top: --interval must be a positive number of seconds, got 0"),
    (["top", "--interval", "-1.5"], "top: --interval must be a positive number of seconds, got -1.5"),
    (["top", "--interval", "nan"], "top: --interval must be a positive number of seconds, got nan"),
    (["top", "--interval", "inf"], "top: --interval must be a positive number of seconds, got inf"),
])
def test_request_builders_refuse_bad_values(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        build(*argv)
    assert str(caught.value) == message


def test_a_long_scale_value_is_quoted_short() -> None:
    with pytest.raises(UsageError) as caught:
        build("scale", "x" * 10_000)
    assert len(str(caught.value)) < 300


def test_scale_help_says_what_n_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scale", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "N 3: run 3 workers; +2: two more than now; -1: one fewer" in out


# -- text formatters ----------------------------------------------------------------------------------------------


def test_status_text() -> None:
    assert COMMANDS["status"].text(STATUS).split("\n") == [
        "web: master pid 42, serving, generation 2, up 62m05s",
        "2 async worker(s) (uvloop) of app:Echo",
        "listening on 127.0.0.1:8000, [::1]:8000",
        "",
        "SLOT  PID   GEN  STATE     REQUESTS  ACTIVE  SHARE   RSS      USS      CPU%  AGE     HEARTBEAT",
        "0     4711  2    ready     12345     1       100.0%  3.0 MiB  1.0 MiB  1.2   60m00s  0.4s",
        "1     99    1    stopping  0         0       -       512 B    -        0.0   4.5s    12.0s",
        "slot 2: 3 early exit(s) in a row, restart in 1.2s",
        "slot 3: 1 early exit(s) in a row, waiting",
    ]


def test_status_text_names_handlers_holding_a_connection_a_while() -> None:
    workers = [{**w, "oldest_handler_s": held, "stuck_handlers": stuck}
               for w, held, stuck in zip(STATUS["workers"], (3725.0, 0.4), (1, 0), strict=True)]
    lines = COMMANDS["status"].text({**STATUS, "workers": workers}).split("\n")
    assert "slot 0 (pid 4711): oldest connection in a handler for 62m05s, 1 handler(s) stuck past --handler-timeout" \
        in lines
    assert not [line for line in lines if "pid 99" in line]  # under a second: not named


def test_status_text_without_workers_loop_or_backoff() -> None:
    reply = {**STATUS, "event_loop": None, "worker_class": "sync", "workers": [], "listeners": ["0.0.0.0:80"]}
    del reply["backoff"]
    assert COMMANDS["status"].text(reply) == (
        "web: master pid 42, serving, generation 2, up 62m05s\n2 sync worker(s) of app:Echo\nlistening on 0.0.0.0:80\n"
        "\nSLOT  PID  GEN  STATE  REQUESTS  ACTIVE  SHARE  RSS  USS  CPU%  AGE  HEARTBEAT")


def test_stats_text() -> None:
    assert COMMANDS["stats"].text(STATS).split("\n") == [
        "web: master pid 42, generation 2, up 2d07h", "requests: 123456", "active: 3", "errors: 1", "workers: 2",
        "workers spawned: 5", "worker exits: 3", "worker crashes: 1", "worker timeouts: 0", "reloads: 2",
        "failed reloads: 1",
    ]


@pytest.mark.parametrize(("command", "reply", "text"), [
    ("reload", {"ok": True, "generation": 3, "workers": 4}, "reloaded: generation 3 serving with 4 worker(s)"),
    ("scale", {"ok": True, "previous": 2, "workers": 5}, "scaled from 2 to 5 worker(s)"),
    ("stop", {"ok": True, "pid": 42}, "stopped (master pid 42 has exited)"),
    ("reopen", {"ok": True}, "log files reopened"),
    ("upgrade", {"ok": True, "pid": 77, "previous_pid": 42},
     "upgraded: new master pid 77 serves; pid 42 is draining"),
    ("drain", {"ok": True}, "not draining: health checks are answered"),
    ("drain", {"ok": True, "drain": None}, "not draining: health checks are answered"),
    ("drain", {"ok": True, "drain": "health-checks"},
     "draining: health checks fail, clients are still served (drain --off undoes it)"),
    ("drain", {"ok": True, "drain": "listeners-closed"},
     "draining: listening sockets closed, open connections finish"),
    ("drain", {"ok": True, "drain": "something-new"}, "something-new"),
])
def test_short_texts(command: str, reply: dict[str, Any], text: str) -> None:
    assert COMMANDS[command].text(reply) == text


def test_top_text_is_one_plain_frame() -> None:
    snapshot = {"status": STATUS, "stats": STATS}
    text = COMMANDS["top"].text(snapshot)
    assert text == "\n".join(frame_lines(build_frame(STATUS, STATS, None)))
    assert text.split("\n")[2:] == [
        "SLOT   PID  GEN  STATE     REQUESTS  REQ/S  ACTIVE   SHARE      RSS      USS  CPU%  HEARTBEAT",
        "0     4711    2  ready        12345      -       1  100.0%  3.0 MiB  1.0 MiB   1.2       0.4s",
        "1       99    1  stopping         0      -       0       -    512 B        -   0.0      12.0s",
    ]


def test_status_and_top_name_and_order_their_common_columns_alike() -> None:
    from prefork.ctl.commands import STATUS_HEADERS
    from prefork.ctl.top import HEADERS as TOP_HEADERS

    assert set(TOP_HEADERS) - set(STATUS_HEADERS) == {"REQ/S"}  # a rate needs two looks: top only
    assert [h for h in TOP_HEADERS if h in STATUS_HEADERS] == [h for h in STATUS_HEADERS if h in TOP_HEADERS]


# -- output formats ----------------------------------------------------------------------------------------------


def test_output_text_json_prometheus() -> None:
    stats = COMMANDS["stats"]
    assert output(stats, STATS, "text") == stats.text(STATS) + "\n"
    assert output(stats, STATS, "json") == json.dumps(STATS, indent=2) + "\n"
    assert output(stats, {"status": STATUS, "stats": STATS}, "prometheus") == render_prometheus(STATUS, STATS)


@pytest.mark.parametrize(("argv", "fmt"), [
    (["status"], "text"), (["status", "--json"], "json"), (["--json", "status"], "json"),
    (["status", "--format", "json"], "json"), (["status", "--json", "--format", "json"], "json"),
    (["stats", "--format", "prometheus"], "prometheus"), (["top"], "text"), (["top", "--format", "text"], "text"),
])
def test_output_format(argv: list[str], fmt: str) -> None:
    assert output_format(parse(*argv)) == fmt


@pytest.mark.parametrize(("argv", "message"), [
    (["stats", "--json", "--format", "prometheus"], "--json and --format prometheus disagree: give one of them"),
    (["top", "--json"], "top draws a table for people: for machines use stats or status with --format"),
    (["status", "--format", "prometheus"], "--format prometheus is for stats, not status"),
])
def test_output_format_refuses(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        output_format(parse(*argv))
    assert str(caught.value) == message


# -- the table renderer and human units -----------------------------------------------------------------------


def test_table_left_aligned_and_stripped() -> None:
    assert table(["A", "LONGER", "C"], [["xyz", "1", ""], ["", "22", ""]]) == ["A    LONGER  C", "xyz  1", "     22"]


def test_table_right_aligned_columns() -> None:
    assert table(["NAME", "N", "LAST"], [["a", "1", "x"], ["bb", "100", "yy"]], right={"N", "LAST"}) == [
        "NAME    N  LAST", "a       1     x", "bb    100    yy"]


def test_table_without_rows() -> None:
    assert table(["A", "B"], []) == ["A  B"]


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (3 * 1024 ** 2, "3.0 MiB"),
    (5 * 1024 ** 3, "5.0 GiB"), (2048 * 1024 ** 3, "2048.0 GiB"),
])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0.0s"), (9.94, "9.9s"), (10.0, "10s"), (119.9, "119s"), (120.0, "2m00s"), (3725.0, "62m05s"),
    (7200.0, "2h00m"), (172799.0, "47h59m"), (172800.0, "2d00h"), (200000.0, "2d07h"),
])
def test_human_age(seconds: float, text: str) -> None:
    assert human_age(seconds) == text


# -- main(): exit statuses and lines against a fake control socket -------------------------------------------------


class FakeDaemon:
    """Stands in for prefork.control.call / wait_exited in prefork.ctl.client; records what was asked."""

    def __init__(self, replies: dict[str, Any], exits: bool = True) -> None:
        self.replies = replies
        self.exits = exits
        self.calls: list[tuple[dict[str, Any], float]] = []
        self.waits: list[tuple[int, float]] = []

    def call(self, path: str, request: dict[str, Any], timeout: float = 10.0) -> tuple[dict[str, Any], socket.socket]:
        self.calls.append((request, timeout))
        reply = self.replies[request["command"]]
        if isinstance(reply, Exception):
            raise reply
        a, b = socket.socketpair()
        b.close()
        return dict(reply), a

    def wait_exited(self, sock: socket.socket, pid: int, timeout: float, said: list[Any] | None = None) -> bool:
        sock.close()
        self.waits.append((pid, timeout))
        return self.exits


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    daemon = FakeDaemon({"status": STATUS, "stats": STATS, "reload": {"ok": True, "generation": 3, "workers": 2},
                         "stop": {"ok": True, "pid": 42}, "scale": {"ok": False, "error": "draining"}})
    monkeypatch.setattr(client, "call", daemon.call)
    monkeypatch.setattr(client, "wait_exited", daemon.wait_exited)
    return daemon


def run_main(*argv: str) -> int:
    return ctl.main(["--control", "/nowhere.sock", *argv])


def test_main_text(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("reload") == ctl.EXIT_OK
    assert capsys.readouterr() == ("reloaded: generation 3 serving with 2 worker(s)\n", "")
    assert fake.calls == [({"command": "reload"}, 4200.0)]


def test_main_json_and_timeout(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("--timeout", "2.5", "status", "--json") == ctl.EXIT_OK
    assert capsys.readouterr() == (json.dumps(STATUS, indent=2) + "\n", "")
    assert fake.calls == [({"command": "status"}, 2.5)]


def test_main_prometheus_asks_status_and_stats(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("stats", "--format", "prometheus") == ctl.EXIT_OK
    assert capsys.readouterr() == (render_prometheus(STATUS, STATS), "")
    assert fake.calls == [({"command": "status"}, 10.0), ({"command": "stats"}, 10.0)]


def test_main_refused(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("scale", "2") == ctl.EXIT_FAILED
    assert capsys.readouterr() == ("", "preforkctl: scale failed: draining\n")
    assert run_main("scale", "2", "--json") == ctl.EXIT_FAILED
    assert capsys.readouterr() == (json.dumps({"ok": False, "error": "draining"}, indent=2) + "\n",
                                   "preforkctl: scale failed: draining\n")


def test_main_stop_waits_for_exit(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("stop") == ctl.EXIT_OK
    assert capsys.readouterr() == ("stopped (master pid 42 has exited)\n", "")
    assert fake.waits == [(42, 3600.0)]
    fake.exits = False
    assert run_main("--timeout", "7", "stop") == ctl.EXIT_FAILED
    assert capsys.readouterr() == ("", "preforkctl: the master (pid 42) did not exit within 7s\n")
    assert fake.waits[-1] == (42, 7.0)


def test_main_not_running_and_errors(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.replies["status"] = DaemonNotRunning("/nowhere.sock", "no such socket")
    assert run_main("status") == ctl.EXIT_NOT_RUNNING
    assert capsys.readouterr() == (
        "", "preforkctl: no prefork daemon is answering on /nowhere.sock (no such socket)\n")
    assert run_main("top") == ctl.EXIT_NOT_RUNNING  # top says it its own way
    assert capsys.readouterr() == ("", "preforkctl: daemon not answering on /nowhere.sock\n")
    fake.replies["status"] = ControlError("no reply from /nowhere.sock within 10s")
    assert run_main("status") == ctl.EXIT_FAILED
    assert capsys.readouterr() == ("", "preforkctl: error: no reply from /nowhere.sock within 10s\n")
    fake.replies["status"] = {"ok": False, "error": "busy"}
    assert run_main("stats", "--format", "prometheus") == ctl.EXIT_FAILED
    assert capsys.readouterr() == ("", "preforkctl: error: status failed: busy\n")


def test_main_top_on_a_pipe(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("top") == ctl.EXIT_OK
    assert capsys.readouterr() == ("\n".join(frame_lines(build_frame(STATUS, STATS, None))) + "\n", "")
    assert fake.calls == [({"command": "status"}, 5.0), ({"command": "stats"}, 5.0)]


@pytest.mark.parametrize("argv", [["scale", "0"], ["top", "--interval", "0"], ["status", "--format", "prometheus"],
                                  ["bogus"]])
def test_main_usage(fake: FakeDaemon, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert run_main(*argv) == ctl.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("preforkctl: error: ") and err.count("\n") == 1
    assert fake.calls == []  # nothing was asked


@pytest.mark.parametrize(("argv", "message"), [
    (["--jsn", "status"], "unknown option '--jsn' (did you mean --json?)"),
    (["status", "--jsn"], "unknown option '--jsn' (did you mean --json?)"),
    (["--nmae", "web", "status"], "unknown option '--nmae' (did you mean --name?)"),
    (["stop", "--fsat"], "unknown option '--fsat' (did you mean --fast?)"),
    (["top", "--intreval", "2"], "unknown option '--intreval' (did you mean --interval?)"),
    (["relaod"], "argument COMMAND: invalid choice: 'relaod' (choose from status, stats, top, reload, scale, stop, "
                 "reopen, upgrade, drain) (did you mean reload?)"),
    (["status", "--" + "x" * 10_000], "unknown option '--" + "x" * 10),
])
def test_main_suggests_what_was_meant(fake: FakeDaemon, capsys: pytest.CaptureFixture[str], argv: list[str],
                                      message: str) -> None:
    assert run_main(*argv) == ctl.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"preforkctl: error: {message}") and err.endswith(" (see preforkctl --help)\n"), err
    assert len(err) < 300
    assert fake.calls == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        ctl.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr() == (f"preforkctl {__version__}\n", "")


def test_stats_text_shows_every_counter_the_daemon_reports() -> None:
    """Built from the master's own stats payload, so a counter added there cannot be left out of the text."""
    from test_master_decisions import snapshot

    from prefork.master import report

    reply = {"ok": True, **report.stats(snapshot())}
    reply["bytes_in"], reply["bytes_out"] = 1_572_864, 512
    lines = COMMANDS["stats"].text(reply).splitlines()
    assert "bytes in: 1.5 MiB (1572864)" in lines
    assert "bytes out: 512 B (512)" in lines
    for key, value in reply.items():
        if isinstance(value, int) and not isinstance(value, bool) and key not in ("pid", "generation"):
            assert any(line.startswith(key.replace("_", " ") + ": ") for line in lines), key


def test_stats_text_shows_the_imbalance_when_the_daemon_reports_it() -> None:
    text = COMMANDS["stats"].text({**STATS, "active_max_mean": 1.04})
    assert text.splitlines()[-1] == "busiest worker's open connections over the mean: 1.04"
    assert "over the mean" not in COMMANDS["stats"].text({k: v for k, v in STATS.items() if k != "active_max_mean"})


@pytest.mark.parametrize(("reply", "line"), [
    ({"ok": True, "pid": 7, "previous_pid": 7, "in_place": True, "generation": 3},
     "upgraded in place: master pid 7 runs the new program; generation 3 serves"),
    ({"ok": True, "pid": 9, "previous_pid": 7},  # a program serving from Python starts itself again
     "upgraded: new master pid 9 serves; pid 7 is draining"),
])
def test_upgrade_replies_in_words(reply: dict[str, Any], line: str) -> None:
    assert COMMANDS["upgrade"].text(reply) == line
