"""--reload-on-change: a changed Python file reloads the daemon gracefully, through a watcher process.

Real daemons on loopback serve a handler written into the test's directory
(the daemon's working directory, which is watched); the tests edit it and
wait for what the daemon shows: the log's lines, the generation in
``status``, the answer the new code gives.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import test_privileges

from conftest import ROOT, Daemon, Load, child_env, gone, read_line, start_daemon, wait_for
from prefork.config import Config, ConfigError, build_config
from prefork.master.reload import reread_config
from prefork.master.watching import describe_changes
from prefork.reloadwatch import (
    MAX_BURST_S,
    QUIET_S,
    WatchEvent,
    WatchReport,
    decode,
    encode,
    handler_dir,
    next_burst,
    watched_dirs,
)

APP = "changing_app"
HANDLER = f"{APP}:Handler"
readable_by_nobody = test_privileges.public_dir  # a fixture: a directory user nobody can read
WATCHING = re.compile(r"reload on change: watching (.*) for changed Python files \(watcher pid (\d+)\)")


def write_app(directory: Path, version: str, *, broken: bool = False) -> None:
    """An echo handler that answers ``version`` with ``version`` (a SyntaxError instead with ``broken``)."""
    colon = "" if broken else ":"
    (directory / f"{APP}.py").write_text(
        "import socketserver\n"
        f"class Handler(socketserver.StreamRequestHandler){colon}\n"
        "    def handle(self):\n"
        "        for line in self.rfile:\n"
        f"            self.wfile.write(b'{version}\\n' if line == b'version\\n' else line)\n")


def start(daemon_factory: Callable[..., Daemon], tmp_path: Path, *args: str) -> tuple[Daemon, int]:
    """A daemon serving the app with --reload-on-change, once its watcher watches; (it, the watcher's pid)."""
    write_app(tmp_path, "v1")
    d = daemon_factory(HANDLER, "--reload-on-change", *args)
    found = wait_for(lambda: WATCHING.search(d.log()), 20, "the watcher to watch")
    assert str(tmp_path.resolve()) in found.group(1).split(", ")  # the handler's directory, the working one
    return d, int(found.group(2))


def version(d: Daemon) -> bytes:
    with d.connect() as sock:
        sock.sendall(b"version\n")
        return read_line(sock)


def generation_serving(d: Daemon, generation: int) -> bool:
    st = d.try_status()
    return st is not None and st["generation"] == generation and st["state"] == "serving"


def reload_lines(d: Daemon) -> list[str]:
    return [line.split("reloading on change: ", 1)[1] for line in d.log().splitlines()
            if "reloading on change: " in line]



def test_an_edit_reloads_to_the_new_code_and_no_connection_is_dropped(daemon_factory: Callable[..., Daemon],
                                                                      tmp_path: Path) -> None:
    d, _ = start(daemon_factory, tmp_path)
    assert version(d) == b"v1\n"
    with Load(d.address(), clients=3, mode="connect") as fresh, \
            Load(d.address(), clients=3, mode="persistent") as kept:
        fresh.wait_ok(50)
        kept.wait_ok(50)
        write_app(tmp_path, "v2")
        wait_for(lambda: generation_serving(d, 2), 30, "generation 2 serving")
        wait_for(lambda: version(d) == b"v2\n", 10, "the new code answering")
        fresh.wait_ok(50)
        kept.wait_ok(50)
    assert fresh.failures == [] and kept.failures == [], (fresh.failures[:5], kept.failures[:5])
    assert reload_lines(d) == [f"{APP}.py changed"]
    assert not list(tmp_path.glob("__pycache__/*"))  # no cached bytecode that an edit in the same second could hide
    wait_for(lambda: {w["generation"] for w in d.status()["workers"]} == {2}, 30, "the old generation gone")


def test_a_burst_of_writes_is_one_reload_and_editor_files_are_ignored(daemon_factory: Callable[..., Daemon],
                                                                      tmp_path: Path) -> None:
    d, _ = start(daemon_factory, tmp_path)
    for n in range(20):  # as fast as it goes: one burst
        write_app(tmp_path, f"v{n + 2}")
        (tmp_path / f".{APP}.py.swp").write_bytes(b"swap %d" % n)  # vim
        (tmp_path / f"{APP}.py~").write_text("backup")
        (tmp_path / f".#{APP}.py").write_text("lock")  # emacs
    (tmp_path / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "__pycache__" / f"{APP}.cpython-3.pyc").write_bytes(b"compiled")
    (tmp_path / "notes.txt").write_text("not Python")
    wait_for(lambda: generation_serving(d, 2), 30, "generation 2 serving")
    assert version(d) == b"v21\n"
    # a change after the reload: once it is reported, every report of the burst has been
    (tmp_path / "marker.py").write_text("MARK = 1\n")
    wait_for(lambda: generation_serving(d, 3), 30, "generation 3 serving")
    assert reload_lines(d) == [f"{APP}.py changed", "marker.py changed"]


def test_a_broken_edit_fails_the_reload_and_the_old_code_serves_until_it_is_fixed(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d, _ = start(daemon_factory, tmp_path)
    write_app(tmp_path, "v2", broken=True)
    line = wait_for(lambda: next((ln for ln in d.log().splitlines() if "reload failed:" in ln), None), 30,
                    "the failed reload's line")
    assert "SyntaxError" in line and f"{APP}.py:2: SyntaxError" in line and "still serving generation 1" in line, line
    assert version(d) == b"v1\n"
    assert generation_serving(d, 1)
    write_app(tmp_path, "v3")
    wait_for(lambda: version(d) == b"v3\n", 30, "the fixed code answering")
    assert reload_lines(d) == [f"{APP}.py changed"] * 2
    stats = d.call("stats")
    assert stats["failed_reloads"] == 1 and stats["reloads"] == 1, stats


def test_the_watcher_ends_with_the_master(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d, watcher = start(daemon_factory, tmp_path)
    assert psutil.Process(watcher).ppid() == d.pid
    d.signal(signal.SIGKILL)
    assert d.wait_exit(10) == -signal.SIGKILL
    wait_for(lambda: gone(watcher), 10, "the watcher gone with its master")


def test_a_watcher_that_dies_is_started_again(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d, watcher = start(daemon_factory, tmp_path)
    os.kill(watcher, signal.SIGKILL)
    wait_for(lambda: f"the file watcher (pid {watcher}) ended" in d.log(), 10, "the watcher's end logged")
    again = wait_for(lambda: [int(m.group(2)) for m in WATCHING.finditer(d.log())][1:], 20, "a new watcher")
    assert again[0] != watcher and psutil.Process(again[0]).ppid() == d.pid
    write_app(tmp_path, "v2")
    wait_for(lambda: version(d) == b"v2\n", 30, "the new code answering")


def test_a_watcher_that_cannot_watch_is_given_up_in_one_line(daemon_factory: Callable[..., Daemon],
                                                             tmp_path: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    src = tmp_path_factory.mktemp("src").resolve()
    d, watcher = start(daemon_factory, tmp_path, "--reload-dir", str(src))
    assert f"watching {src}, {tmp_path.resolve()} for" in d.log()
    src.rmdir()
    os.kill(watcher, signal.SIGKILL)
    line = wait_for(lambda: next((ln for ln in d.log().splitlines() if "changes are no longer watched" in ln), None),
                    30, "the watching given up")
    assert "ERROR" in line and f"failed 5 times in a row, last: cannot watch {src}: no such directory; " in line, line
    assert d.log().count("starting it again in 1s") == 4
    assert generation_serving(d, 1) and version(d) == b"v1\n"  # serving on, unreloaded


def nobody_can_run_python() -> bool:
    probe = f"test -x {sys.executable} && test -r {os.__file__}"
    return subprocess.run(["sh", "-c", probe], user=65534, group=65534, extra_groups=[], timeout=30).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_under_user_the_watcher_runs_as_it_and_skips_what_it_cannot_read(readable_by_nobody: Path,
                                                                         tmp_path: Path) -> None:
    (readable_by_nobody / "private").mkdir(mode=0o700)  # root's: the daemon's user cannot look inside
    write_app(readable_by_nobody, "v1")
    env = child_env(PYTHONPATH=f"{readable_by_nobody}{os.pathsep}{ROOT}")
    d = start_daemon(tmp_path, HANDLER, "--reload-on-change", "--reload-dir", str(readable_by_nobody),
                     "--user", "nobody", "--group", "nogroup", env=env)
    try:
        assert version(d) == b"v1\n"  # serving as nobody, whatever becomes of the watching
        if not nobody_can_run_python():  # an interpreter under root's home, as on some development machines
            line = wait_for(lambda: next((ln for ln in d.log().splitlines() if "reload on change:" in ln), None), 20,
                            "the watching's line")
            assert "ERROR" in line and f"uid 65534 cannot run {sys.executable}, so changes are not watched" in line
            return
        found = wait_for(lambda: WATCHING.search(d.log()), 20, "the watcher to watch")
        assert found.group(1) == str(readable_by_nobody.resolve())
        assert psutil.Process(int(found.group(2))).uids().effective == 65534
        write_app(readable_by_nobody, "v2")
        wait_for(lambda: version(d) == b"v2\n", 30, "the new code answering")
    finally:
        d.stop()


def test_an_upgrade_in_place_leaves_one_watcher(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d, watcher = start(daemon_factory, tmp_path)
    r = d.ctl("upgrade", timeout=90)
    assert r.returncode == 0 and r.stdout.startswith(f"upgraded in place: master pid {d.pid}"), r.stderr
    watchers = wait_for(lambda: [int(m.group(2)) for m in WATCHING.finditer(d.log())][1:], 20, "a new watcher")
    assert gone(watcher) and watchers[0] != watcher
    assert [p.pid for p in psutil.Process(d.pid).children() if "reload watcher" in " ".join(p.cmdline())] == watchers
    write_app(tmp_path, "v2")
    wait_for(lambda: version(d) == b"v2\n", 30, "the new code answering")


def test_check_config_says_what_is_watched(tmp_path: Path) -> None:
    write_app(tmp_path, "v1")
    r = subprocess.run([sys.executable, "-m", "prefork", HANDLER, "--reload-on-change", "--check-config"],
                       capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.endswith(f"; reloads when a Python file changes under {tmp_path.resolve()}"), r.stdout


def test_without_watchfiles_the_start_fails_in_one_line(tmp_path: Path) -> None:
    hide = "import sys; sys.modules['watchfiles'] = None; from prefork.cli import run; run()"
    r = subprocess.run([sys.executable, "-c", hide, "--reload-on-change", "--bind", "127.0.0.1:0",
                        "--control", str(tmp_path / "c.sock")], capture_output=True, text=True,
                       env=child_env(), cwd=tmp_path, timeout=30)
    assert r.returncode == 2
    assert r.stderr == ("prefork: error: reload-on-change: watchfiles is not installed "
                        "(pip install watchfiles: the reload extra)\n")
    assert not (tmp_path / "c.sock").exists()


# -- the parts without processes ------------------------------------------------------------------------


@pytest.mark.parametrize("report", [WatchReport(WatchEvent.WATCHING, ("/srv/app",)),
                                    WatchReport(WatchEvent.CHANGED, ("/a b/x.py", "/é/y.py")),
                                    WatchReport(WatchEvent.CHANGED, ())])
def test_reports_round_trip(report: WatchReport) -> None:
    line = encode(report)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line.rstrip(b"\n")) == report


@pytest.mark.parametrize("line", [b"", b"Traceback (most recent call last):", b"[1, 2]", b'{"watch": "nope"}',
                                  b'{"watch": "changed"}', b'{"paths": []}', b"\xff\xfe"])
def test_anything_else_the_watcher_writes_is_not_a_report(line: bytes) -> None:
    assert decode(line) is None


def test_what_is_watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    package = Config(handler="pkg.sub.mod:H", reload_on_change=True)
    assert handler_dir(package) == str(tmp_path / "pkg")  # found, not imported
    assert "pkg" not in sys.modules
    # the package is inside the working directory: named once
    assert watched_dirs(package, cwd=str(tmp_path)) == [str(tmp_path)]
    elsewhere = Config(handler="pkg.sub.mod:H", reload_on_change=True, reload_dir=(str(tmp_path / "elsewhere"),))
    assert watched_dirs(elsewhere) == [str(tmp_path / "elsewhere"), str(tmp_path / "pkg")]
    assert handler_dir(Config(handler="json.decoder:JSONDecoder")) is None  # the standard library: installed
    assert handler_dir(Config(handler="psutil:Process")) is None  # site-packages: installed
    assert handler_dir(Config()) == str(ROOT / "prefork")  # the built-in echo handler, in this checkout
    assert handler_dir(Config(handler="no_such_module_here:H")) is None


def test_the_options_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = build_config({"reload_on_change": True, "reload_dir": [str(tmp_path)]})
    assert config.reload_on_change and config.reload_dir == (str(tmp_path),)
    toml = tmp_path / "c.toml"
    toml.write_text(f'reload-on-change = true\nreload-dir = "{tmp_path}"\n')
    assert build_config({"reload_on_change": None}, str(toml)).reload_dir == (str(tmp_path),)
    with pytest.raises(ConfigError, match=r"^reload-dir: is watched only with --reload-on-change$"):
        build_config({"reload_dir": [str(tmp_path)]})
    with pytest.raises(ConfigError, match=r"^reload-dir: '.*/nothing' is not a directory$"):
        build_config({"reload_on_change": True, "reload_dir": [str(tmp_path / "nothing")]})
    monkeypatch.chdir("/")
    with pytest.raises(ConfigError, match=r"^reload-on-change: the working directory is /, too much to watch"):
        build_config({"reload_on_change": True})
    assert build_config({"reload_on_change": True, "reload_dir": [str(tmp_path)]}).reload_on_change


class ScriptedNotify:
    """watchfiles' RustNotify as :func:`next_burst` sees it: each call returns the next of ``script``, a wait
    for changes that times out moves the clock on by its timeout, and every call is recorded."""

    def __init__(self, script: list[set[tuple[int, str]] | str | float]) -> None:
        self.script = script
        self.now = 100.0
        self.timeouts: list[int] = []

    def watch(self, debounce_ms: int, step_ms: int, timeout_ms: int, stop_event: None) -> set[tuple[int, str]] | str:
        self.timeouts.append(timeout_ms)
        step = self.script.pop(0)
        while isinstance(step, float):  # time passes before what comes next
            self.now += step
            step = self.script.pop(0)
        if step == "timeout":
            self.now += timeout_ms / 1000
        return step


def python_only(change: int, path: str) -> bool:
    return path.endswith(".py")


def test_a_burst_ends_once_no_python_file_changed_for_a_while() -> None:
    notify = ScriptedNotify([{(2, "/app/a.py")}, 0.1, {(2, "/app/d.log")}, 0.1, {(2, "/app/a.py"), (1, "/app/b.py")},
                             0.2, {(2, "/app/d.log")}, "timeout", 3.0, {(3, "/app/c.py")}, "timeout"])
    assert next_burst(notify, python_only, lambda: notify.now) == {"/app/a.py", "/app/b.py"}
    # waits without end for the first change, then only as long as the burst may still go on
    assert notify.timeouts[0] == 0 and all(0 < t <= QUIET_S * 1000 for t in notify.timeouts[1:])
    assert next_burst(notify, python_only, lambda: notify.now) == {"/app/c.py"}
    assert notify.script == []
    assert next_burst(ScriptedNotify(["signal"]), python_only) is None


def test_a_burst_that_goes_on_is_reported_after_max_burst() -> None:
    notify = ScriptedNotify([x for n in range(100) for x in ({(2, f"/app/m{n}.py")}, 0.125)])
    burst = next_burst(notify, python_only, lambda: notify.now)
    assert burst is not None and len(burst) == int(MAX_BURST_S / 0.125) + 1  # the last one at MAX_BURST_S


def test_a_reload_cannot_turn_the_watching_on_or_off(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("reload-on-change = true\n")
    current = build_config({}, str(toml))
    toml.write_text("reload-on-change = false\n")
    with pytest.raises(ConfigError, match=r"^reload-on-change cannot change on reload \(restart the daemon\)$"):
        reread_config(current, {})
    toml.write_text(f"reload-on-change = true\nreload-dir = [{str(tmp_path)!r}]\n")
    with pytest.raises(ConfigError, match=r"^reload-dir cannot change on reload"):
        reread_config(current, {})


def test_the_log_names_what_changed() -> None:
    assert describe_changes(["/srv/app/handler.py"], "/srv/app") == "handler.py changed"
    assert describe_changes(["/srv/app/a/b.py", "/lib/c.py"], "/srv/app") == "a/b.py, /lib/c.py changed"
    paths = [f"/srv/app/m{n}.py" for n in range(5)]
    assert describe_changes(paths, "/srv/app/") == "m0.py, m1.py, m2.py and 2 more changed"
