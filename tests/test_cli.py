"""The ``prefork`` command line: bad input, --check-config, --version/--help, and the TOML config file.

Every bad input gets one line naming the culprit, a non-zero exit, no
traceback, and leaves no process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Daemon, child_env, exchange, group_members, wait_for
from prefork import __version__

RUN_TIMEOUT = 20.0


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr



def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run_prefork(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``python -m prefork ARGS`` to completion in its own session; fail if anything of it is left running."""
    proc = subprocess.Popen([sys.executable, "-m", "prefork", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=env or child_env(), cwd=str(tmp_path))
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate(timeout=5)
        raise AssertionError(f"prefork {args} still running after {RUN_TIMEOUT}s:\n{err.decode()}") from None
    try:
        wait_for(lambda: not group_members(proc.pid), 5.0, f"every process of prefork {args} to exit")
    finally:
        kill_group(proc.pid)
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


# -- bad input: refused before anything starts ---------------------------------------------------------

# (id, extra arguments, culprit that must be named); {tmp} is tmp_path, {busy} a port in use
EARLY_ERRORS = [
    ("unknown-option", ["--bogus"], "--bogus"),
    ("unknown-short-option", ["-z", "3"], "-z"),
    # a misspelt option is named with the one meant, and cannot make the next word the handler
    ("misspelt-option", ["--wokers", "2", "recipe_handlers:EchoHandler"],
     "unknown option '--wokers' (did you mean --workers?)"),
    ("misspelt-option-after-handler", ["recipe_handlers:EchoHandler", "--wokers", "2"],
     "unknown option '--wokers' (did you mean --workers?)"),
    ("misspelt-option-equals", ["--graceful-timout=3"],
     "unknown option '--graceful-timout' (did you mean --graceful-timeout?)"),
    ("misspelt-tls-option", ["--certfle", "cert.pem"], "unknown option '--certfle' (did you mean --certfile?)"),
    ("ambiguous-prefix", ["--max", "3"], "ambiguous option: --max could match"),
    ("misspelt-choice", ["-k", "thred"], "invalid choice: 'thred' (choose from sync, thread, async) "
                                          "(did you mean thread?)"),
    ("workers-0", ["--workers", "0"], "workers: 0"),
    ("workers-2000", ["-w", "2000"], "workers: 2000"),
    ("workers-x", ["--workers", "x"], "'x'"),
    ("threads-0", ["--threads", "0"], "threads: 0"),
    ("timeout-0", ["--timeout", "0"], "timeout: 0"),
    ("timeout-text", ["--timeout", "soon"], "'soon'"),
    ("graceful-negative", ["--graceful-timeout=-1"], "graceful-timeout: -1"),
    ("idle-negative", ["--idle-timeout=-1"], "idle-timeout: -1"),
    ("reclaim-negative", ["--reclaim-idle-after=-1"], "reclaim-idle-after: -1"),
    ("per-source-negative", ["--max-connections-per-source=-2"], "max-connections-per-source: -2"),
    ("drain-idle-negative", ["--drain-idle=-1"], "drain-idle: -1"),
    ("handler-timeout-short", ["--handler-timeout", "0.2"], "handler-timeout: 0.2"),
    ("max-connections-thread", ["--max-connections", "100"], "max-connections: caps the async class"),
    ("backlog-0", ["--backlog", "0"], "backlog: 0"),
    ("port-99999", ["--bind", "127.0.0.1:99999"], "99999"),
    ("port-not-number", ["--bind", "127.0.0.1:http"], "'http'"),
    ("bind-no-port", ["--bind", "127.0.0.1"], "127.0.0.1"),
    ("ipv6-no-brackets", ["--bind", "::1:80"], "::1:80"),
    ("unresolvable-host", ["--bind", "nosuchhost.invalid:80"], "nosuchhost.invalid"),
    ("address-in-use", ["--bind", "127.0.0.1:{busy}"], "127.0.0.1:{busy}: address already in use"),
    ("second-bind-in-use", ["--bind", "127.0.0.1:0", "--bind", "127.0.0.1:{busy}"], "127.0.0.1:{busy}"),
    ("duplicate-bind", ["--bind", "127.0.0.1:{busy}", "--bind", "127.0.0.1:{busy}"], "given twice"),
    ("unix-bind-over-file", ["--bind", "unix:{tmp}/regular"], "{tmp}/regular exists and is not a socket"),
    ("worker-class", ["--worker-class", "nope"], "'nope'"),
    ("loop", ["--loop", "trio"], "'trio'"),
    ("log-level", ["--log-level", "loud"], "'loud'"),
    ("bad-name", ["--name", "a/b"], "'a/b'"),
    ("handler-format", ["no_colon_here"], "'no_colon_here'"),
    ("broken-toml", ["--config", "{tmp}/broken.toml"], "{tmp}/broken.toml: invalid TOML"),
    ("unknown-key", ["--config", "{tmp}/unknown.toml"], "unknown setting 'wokers' (did you mean workers?)"),
    ("wrong-type", ["--config", "{tmp}/wrongtype.toml"], "workers: expected int, got 'two'"),
    ("missing-config", ["--config", "{tmp}/nope.toml"], "{tmp}/nope.toml: no such file"),
    ("control-parent-is-file", ["--control", "{tmp}/regular/ctl.sock"], "{tmp}/regular"),
    ("control-is-file", ["--control", "{tmp}/regular"], "{tmp}/regular"),
    ("log-file-dir-missing", ["--log-file", "{tmp}/nodir/prefork.log"], "{tmp}/nodir/prefork.log"),
    ("extra-positional", ["recipe_handlers:EchoHandler", "another"], "another"),
]


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    (tmp_path / "broken.toml").write_text("workers = [\n")
    (tmp_path / "unknown.toml").write_text("wokers = 2\n")
    (tmp_path / "wrongtype.toml").write_text('workers = "two"\n')
    (tmp_path / "regular").write_text("not a socket\n")
    return tmp_path


@pytest.mark.parametrize(("args", "culprit"), [c[1:] for c in EARLY_ERRORS], ids=[c[0] for c in EARLY_ERRORS])
def test_bad_input_one_line(bad_files: Path, busy_port: int, args: list[str], culprit: str) -> None:
    tmp = str(bad_files)
    fill: Callable[[str], str] = lambda s: s.format(tmp=tmp, busy=busy_port)  # noqa: E731
    base = ["--control", f"{tmp}/c.sock", "-w", "1"]
    if not any(a == "--bind" for a in args):
        base += ["--bind", "127.0.0.1:0"]
    result = run_prefork(bad_files, *base, *map(fill, args))
    assert result.returncode != 0, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("prefork: error: ")
    assert fill(culprit) in lines[0]
    assert not os.path.exists(f"{tmp}/c.sock")  # no control socket left behind
    assert (bad_files / "regular").read_text() == "not a socket\n"  # never removed or overwritten


LONG = "x" * 10_000


@pytest.mark.parametrize("args", [
    [LONG],
    [LONG + ":Handler"],
    ["--check-config", LONG + ":Handler"],
    ["--check-config", "recipe_handlers:" + LONG],
    ["--user", LONG],
    ["--check-config", "--config", "{tmp}/long-module.toml"],
    ["recipe_handlers:EchoHandler", "second", LONG],
    ["--workers", LONG],
    ["--bind", LONG],
    ["--" + LONG],
    ["--worker-class", LONG],
    ["--name", LONG],
    ["--config", "{tmp}/long-handler.toml"],
    ["--config", "{tmp}/long-key.toml"],
    ["--config", "{tmp}/long-value.toml"],
], ids=["handler", "handler-module", "check-handler-module", "check-handler-attribute", "user", "toml-module",
        "unrecognized", "int", "bind", "option", "choice", "name", "toml-handler", "toml-key",
        "toml-value"])
def test_long_values_are_quoted_short(tmp_path: Path, args: list[str]) -> None:
    """The README promises at most 100 characters of a value in an error, from the command line or TOML."""
    (tmp_path / "long-handler.toml").write_text(f'handler = "{LONG}"\n')
    (tmp_path / "long-key.toml").write_text(f'"{LONG}" = 1\n')
    (tmp_path / "long-module.toml").write_text(f'handler = "{"m" * 2_000_000}:Handler"\n')
    (tmp_path / "long-value.toml").write_text(f'workers = "{"x" * 2_000_000}"\n')
    result = run_prefork(tmp_path, "--control", f"{tmp_path}/c.sock", "--bind", "127.0.0.1:0",
                         *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode in (1, 2), result.output[:1000]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefork: error: "), result.stderr[:1000]
    assert "x" * 101 not in lines[0]
    assert len(lines[0]) < 300 + len(str(tmp_path)), lines[0]


# -- bad handler: checked before anything is bound, one line, status 2 (tests/test_loading.py has each kind) ---------


@pytest.mark.parametrize(
    ("handler", "culprit"),
    [
        ("nosuchmod:Handler", "no module named 'nosuchmod'"),
        ("recipe_handlers:Nope", "recipe_handlers has no attribute 'Nope'"),
        ("os:path", "'os:path'"),
        ("cli_broken:Handler", "cli_broken.py:5: RuntimeError: cli_broken refuses to load"),
    ],
)
@pytest.mark.parametrize("worker_class", ["thread", "sync"])
def test_bad_handler_stops_master(tmp_path: Path, handler: str, culprit: str, worker_class: str) -> None:
    control = tmp_path / "c.sock"
    result = run_prefork(tmp_path, "--bind", "127.0.0.1:0", "--control", str(control), "-w", "2",
                         "-k", worker_class, handler)
    assert result.returncode == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"prefork: error: cannot load handler {handler!r}: "), lines
    assert culprit in lines[0]
    assert not control.exists()


def test_version(tmp_path: Path) -> None:
    result = run_prefork(tmp_path, "--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"prefork {__version__}"
    assert result.stderr == ""


def test_help(tmp_path: Path) -> None:
    result = run_prefork(tmp_path, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: prefork")
    for option in ("--bind", "--workers", "--worker-class", "--loop", "--threads", "--timeout", "--graceful-timeout",
                   "--max-requests", "--max-requests-jitter", "--backlog", "--name", "--control", "--config",
                   "--check-config", "--log-level", "--version", "HANDLER"):
        assert option in result.stdout
    assert result.stderr == ""
    help_text = " ".join(result.stdout.split())
    assert "--log-level LEVEL debug, info, warning, error, critical (default info)" in help_text


# -- --check-config -------------------------------------------------------------------------------------


def test_check_config_ok_binds_nothing(tmp_path: Path, busy_port: int) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 3\nworker-class = "sync"\n')
    control = tmp_path / "c.sock"
    # the port is taken: binding it would fail, so success means --check-config did not bind
    result = run_prefork(tmp_path, "--check-config", "--config", str(config), "--bind", f"127.0.0.1:{busy_port}",
                         "--control", str(control), "recipe_handlers:EchoHandler")
    assert result.returncode == 0, result.output
    assert result.stdout.startswith("configuration OK")
    assert "3 sync worker(s)" in result.stdout
    assert "of recipe_handlers:EchoHandler on" in result.stdout  # module:Class, as status and the logs write it
    assert "built-in" not in result.stdout
    assert f"127.0.0.1:{busy_port}" in result.stdout
    assert result.stderr == ""
    assert not control.exists()


@pytest.mark.parametrize(("args", "handler"), [
    ([], "prefork.handlers.echo:EchoHandler"),
    (["-k", "async"], "prefork.handlers.aio:EchoProtocol"),
    (["--config", "{tmp}/prefork.toml"], "prefork.handlers.echo:EchoHandler"),
])
def test_check_config_without_a_handler_says_it_is_the_echo_server(tmp_path: Path, args: list[str],
                                                                   handler: str) -> None:
    (tmp_path / "prefork.toml").write_text("workers = 2\n")
    result = run_prefork(tmp_path, "--check-config", "--bind", "127.0.0.1:0", *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 0, result.output
    assert f" of {handler} (the built-in echo server: no handler given) on 127.0.0.1:0" in result.stdout


@pytest.mark.parametrize(
    ("handler", "culprit"),
    [
        ("nosuchmod:Handler", "nosuchmod"),
        ("recipe_handlers:Nope", "Nope"),
        ("os:path", "os:path"),
        ("cli_broken:Handler", "cli_broken refuses to load"),
    ],
)
def test_check_config_bad_handler(tmp_path: Path, handler: str, culprit: str) -> None:
    result = run_prefork(tmp_path, "--check-config", "--bind", "127.0.0.1:0", handler)
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert culprit in lines[0] and handler in lines[0]


def test_check_config_bad_file(tmp_path: Path) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text("threads = 0\n")
    result = run_prefork(tmp_path, "--check-config", "--config", str(config))
    assert result.returncode != 0
    # the value names the file it came from
    assert result.stderr.strip() == f"prefork: error: config file {config}: threads: 0 is out of range (1-10000)"


# -- the TOML config file with a running daemon --------------------------------------------------------


def test_config_file_honoured(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 3\nbind = ["127.0.0.1:0", "unix:app.sock"]\nname = "fromfile"\n'
                      'worker-class = "sync"\nhandler = "recipe_handlers:StreamEchoHandler"\n')
    d = daemon_factory("--config", str(config), workers=None, bind_default=False)
    st = d.status()
    assert st["target_workers"] == 3
    assert len(d.ready_workers(st)) == 3
    assert st["name"] == "fromfile"
    assert st["worker_class"] == "sync"
    assert st["handler"] == "recipe_handlers:StreamEchoHandler"
    unix_path = str(tmp_path / "app.sock")
    assert st["listeners"] == [f"127.0.0.1:{d.port}", f"unix:{unix_path}"]
    assert d.port not in (0, 20000)
    assert exchange(d.address(), b"tcp line\n") == b"tcp line\n"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(unix_path)
        s.sendall(b"unix line\n")
        assert s.recv(100) == b"unix line\n"


def test_command_line_wins_over_file(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 3\nname = "fromfile"\nbind = "127.0.0.1:0"\nworker-class = "sync"\n')
    d = daemon_factory("--config", str(config), "-w", "1", "--name", "fromcli", workers=None, bind_default=False)
    st = d.status()
    assert st["target_workers"] == 1
    assert len(st["workers"]) == 1
    assert st["name"] == "fromcli"
    assert st["worker_class"] == "sync"  # not on the command line: the file's


def wait_generation(d: Daemon, generation: int, workers: int) -> dict[str, object]:
    def check() -> dict[str, object] | None:
        st = d.try_status()
        if not st or st["generation"] != generation or st["state"] != "serving":
            return None
        everyone_new = all(w["generation"] == generation for w in st["workers"])
        return st if everyone_new and len(d.ready_workers(st)) == workers else None

    result: dict[str, object] = wait_for(check, 15.0, f"generation {generation} with {workers} worker(s)")
    return result


def test_reload_rereads_config_file(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 1\nbind = "127.0.0.1:0"\ngraceful-timeout = 2\n')
    d = daemon_factory("--config", str(config), workers=None, bind_default=False)
    assert d.status()["target_workers"] == 1
    config.write_text('workers = 2\nbind = "127.0.0.1:0"\ngraceful-timeout = 2\n')
    d.signal(signal.SIGHUP)
    st = wait_generation(d, 2, 2)
    assert st["target_workers"] == 2
    assert st["listeners"] == [f"127.0.0.1:{d.port}"]  # the same socket, not a new port
    assert exchange(d.address(), b"after reload") == b"after reload"


def test_reload_keeps_command_line_overrides(tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 3\nhandler = "recipe_handlers:EchoHandler"\n')
    d = daemon_factory("--config", str(config), "-w", "1", workers=None)
    config.write_text('workers = 3\nhandler = "recipe_handlers:StreamEchoHandler"\n')
    d.signal(signal.SIGHUP)
    st = wait_generation(d, 2, 1)
    assert st["target_workers"] == 1
    assert st["handler"] == "recipe_handlers:StreamEchoHandler"


@pytest.mark.parametrize(
    ("new_text", "why"),
    [
        ("workers = [\n", "invalid TOML"),
        ("wokers = 2\n", "unknown setting 'wokers'"),
        ("workers = 0\n", "workers: 0 is out of range"),
        ('name = "renamed"\n', "name cannot change on reload"),
        ('handler = "nosuchmod:Handler"\nworkers = 2\n', "no module named 'nosuchmod'"),
    ],
    ids=["broken-toml", "unknown-key", "bad-value", "name-change", "missing-handler"],
)
def test_failed_reload_keeps_serving(tmp_path: Path, daemon_factory: Callable[..., Daemon],
                                     new_text: str, why: str) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text("workers = 2\n")
    d = daemon_factory("--config", str(config), workers=None)
    before = d.status()
    config.write_text(new_text)
    d.signal(signal.SIGHUP)
    line = wait_for(lambda: next((x for x in d.log().splitlines() if "reload failed" in x), None), 10.0,
                    "'reload failed' in the log")
    assert why in line
    assert "still serving generation 1" in line
    st = d.wait_serving(2)
    assert st["generation"] == 1
    assert st["pid"] == before["pid"]
    assert sorted(w["pid"] for w in d.ready_workers(st)) == sorted(w["pid"] for w in before["workers"])
    assert exchange(d.address(), b"still here") == b"still here"
    assert d.call("stats")["failed_reloads"] == 1
    assert "Traceback" not in d.log()


def test_the_command_imports_handlers_from_its_working_directory(tmp_path: Path) -> None:
    (tmp_path / "here_handlers.py").write_text(
        "from socketserver import BaseRequestHandler\n\n"
        "class Echo(BaseRequestHandler):\n"
        "    def handle(self):\n"
        "        self.request.sendall(self.request.recv(100))\n"
    )
    command = Path(sys.executable).parent / "prefork"  # the installed entry point, not python -m
    env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    result = subprocess.run([str(command), "--check-config", "here_handlers:Echo"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=20)
    assert result.returncode == 0, result.stderr
    assert "here_handlers:Echo" in result.stdout


def test_event_loop_without_uvloop(tmp_path: Path) -> None:
    """Where uvloop is not installed, auto means asyncio and asking for uvloop is a one-line error."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['uvloop'] = None  # as if not installed\n")
    env = child_env()
    env["PYTHONPATH"] = f"{hide}{os.pathsep}{env['PYTHONPATH']}"

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "prefork", "--check-config", "-k", "async", *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=20)

    auto = check()
    assert auto.returncode == 0, auto.stderr
    assert "async worker(s) (asyncio)" in auto.stdout
    wanted = check("--loop", "uvloop")
    assert wanted.returncode == 2
    assert "loop: uvloop is not installed" in wanted.stderr and wanted.stderr.count("\n") == 1
    assert "async worker(s) (uvloop)" in subprocess.run(
        [sys.executable, "-m", "prefork", "--check-config", "-k", "async"], capture_output=True, text=True,
        env=child_env(), cwd=tmp_path, timeout=20).stdout  # and here, where it is, auto picks it


def test_reloads_queued_behind_a_reload_are_all_answered_when_the_follow_up_fails(
        tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    """Three concurrent ``preforkctl reload``; the config file breaks after the first started: all three answer."""
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 1\nhandler = "slow_import:Echo"\n')  # a generation takes ~2 s to be ready
    d = daemon_factory("--config", str(config), workers=None)

    def reload() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "prefork.ctl", "--control", d.control, "reload"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())

    first = reload()
    wait_for(lambda: d.status()["state"] == "reloading", 10, "the first reload to start")
    config.write_text("workers = [\n")  # broken: the follow-up reload cannot start
    queued = [reload(), reload()]
    wait_for(lambda: d.log().count("reload requested during a reload") == 2, 10, "both reloads to be queued")
    outcomes = [(*p.communicate(timeout=20), p.returncode) for p in [first, *queued]]
    assert outcomes[0][2] == 0, outcomes[0]
    assert "reloaded: generation 2" in outcomes[0][0]
    for out, err, code in outcomes[1:]:
        assert code == 1 and "reload failed" in err and "invalid TOML" in err, (out, err)
    assert d.status()["generation"] == 2
    assert exchange(d.address(), b"still here") == b"still here"
