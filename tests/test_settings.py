"""Each setting declared once (prefork.settings), and the PREFORK_* environment variables.

The drift tests prove that the command line, the loader, the typed ``Config``
and ``ServerOptions`` and the options reference are what the table says, so
nothing can be declared twice and differ. The environment is tested as pure
loading and through real ``prefork`` processes: ``--check-config`` showing
where each value came from, and a daemon started from the environment alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import signal
import socketserver
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_cli import run_prefork, wait_generation

from conftest import ROOT, Daemon, child_env, exchange, start_daemon
from prefork import OptionError, PreforkServer, ServerOptions
from prefork.cli import build_parser
from prefork.config import _FIELD_TYPES, Config, ConfigError, build_config, environ_settings, load_config
from prefork.generated_settings import SettingFields
from prefork.handlers.echo import EchoHandler
from prefork.master.reload import reread_config
from prefork.settings import COMMAND_OPTIONS, ENV_INTERNAL, GROUPS, SETTINGS, Setting
from prefork.settings_gen import API_ARGUMENTS, DOCS, MODULE, field_type, keyword_type, render_docs, render_module

RUN_TIMEOUT = 30.0


def actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in build_parser()._actions if a.dest not in ("help", "version")}


# -- the table against everything built from it ------------------------------------------------------------


def test_generated_files_are_what_the_table_generates() -> None:
    assert MODULE.read_text(encoding="utf-8") == render_module(), "run python -m prefork.settings_gen"
    assert DOCS.read_text(encoding="utf-8") == render_docs(), "run python -m prefork.settings_gen"
    check = subprocess.run([sys.executable, "-m", "prefork.settings_gen", "--check"], capture_output=True,
                           text=True, cwd=str(ROOT), env=child_env(), timeout=RUN_TIMEOUT)
    assert check.returncode == 0, check.stderr


def test_config_fields_are_the_table() -> None:
    fields = {f.name: f for f in dataclasses.fields(SettingFields)}
    assert list(fields) == [s.attr for s in SETTINGS]
    for setting in SETTINGS:
        assert fields[setting.attr].type == field_type(setting), setting.name
        assert getattr(Config(), setting.attr) == setting.default_value(), setting.name
    assert set(_FIELD_TYPES) == {s.name for s in SETTINGS}
    assert all(_FIELD_TYPES[s.name] == s.types for s in SETTINGS)


def test_server_options_are_the_table() -> None:
    wanted = {s.name: keyword_type(s) for s in SETTINGS if s.name not in API_ARGUMENTS} | {"config": "PathArg"}
    found = {key: getattr(value, "__forward_arg__", value) for key, value in ServerOptions.__annotations__.items()}
    assert found == wanted


def test_command_line_is_the_table() -> None:
    found = actions()
    assert set(found) == {s.name for s in (*SETTINGS, *COMMAND_OPTIONS)}
    for setting in (*SETTINGS, *COMMAND_OPTIONS):
        action = found[setting.name]
        flags = [] if setting.positional else [f for f in (setting.short, setting.option) if f]
        if setting.negatable:
            flags.append(f"--no-{setting.key}")
        assert sorted(action.option_strings) == sorted(flags), setting.name
        assert tuple(action.choices or ()) == setting.choices, setting.name
        assert action.help is not None and setting.describe_default() in action.help, setting.name
        if setting.kind in ("int", "float"):
            assert action.type is {"int": int, "float": float}[setting.kind], setting.name
        if setting.kind == "list" and setting.repeat:
            assert isinstance(action, argparse._AppendAction), setting.name
        assert action.default is argparse.SUPPRESS  # only what the user gives overrides the rest


def test_help_shows_defaults_from_the_table() -> None:
    by_name = {s.name: s for s in SETTINGS}
    assert by_name["threads"].full_help() == "threads per thread worker (default 32)"
    assert by_name["workers"].describe_default() == "(default: the CPU count)"
    assert by_name["idle_timeout"].full_help().endswith("; 0: never (default 60)")
    assert by_name["max_requests"].describe_default() == "(default 0: never)"
    assert by_name["preload"].describe_default() == "(default on)"
    assert by_name["certfile"].describe_default() == ""


def test_help_is_in_groups(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "prefork", "--help"], capture_output=True, text=True,
                            env=child_env(), cwd=str(tmp_path), timeout=RUN_TIMEOUT)
    assert result.returncode == 0 and result.stderr == ""
    headings = [line[:-1] for line in result.stdout.splitlines() if re.fullmatch(r"[A-Za-z]+:", line)]
    assert headings == ["options", *GROUPS]
    sections = dict(zip(GROUPS, re.split(r"^(?:" + "|".join(GROUPS) + r"):$", result.stdout, flags=re.M)[1:],
                        strict=True))
    for setting in SETTINGS:
        shown = setting.metavar if setting.positional else setting.option
        assert shown is not None and shown in sections[setting.group], (setting.name, setting.group)
    assert "-w N, --workers N     worker processes (default: the CPU count)" in sections["workers"]


def test_every_option_is_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for action in build_parser()._actions:
        for flag in action.option_strings or [action.metavar]:
            assert f"`{flag}" in text, flag
    for setting in (*SETTINGS, *COMMAND_OPTIONS):
        assert setting.full_help()[1:] in text, setting.name
        if setting.env:
            assert f"`{setting.env_var}`" in text, setting.name
        if setting.toml:
            assert f"config file: `{setting.key}`" in text, setting.name
    for keyword in ServerOptions.__annotations__:
        assert f"- Python API: `{keyword}=`" in text, keyword
    for group in GROUPS:
        assert f"\n## {group}\n" in text


def test_adding_a_setting_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new row of the table reaches every form without another line anywhere."""
    import prefork.settings_gen as gen

    extra = Setting("chdir", "general", "str", None, "change to DIR before loading the handler", metavar="DIR",
                    path=True)
    monkeypatch.setattr(gen, "SETTINGS", (*SETTINGS, extra))
    assert "    chdir: str | None = None\n" in gen.render_module()
    assert "    chdir: PathArg\n" in gen.render_module()
    assert "### `--chdir DIR`" in gen.render_docs() and "`PREFORK_CHDIR`" in gen.render_docs()


def test_the_daemons_own_variables_are_never_settings() -> None:
    """Every PREFORK_* name the code uses is a setting's variable or listed as the daemon's own."""
    settings = {s.env_var for s in (*SETTINGS, *COMMAND_OPTIONS) if s.env}
    used: set[str] = set()
    for folder in ("prefork", "scripts", "bench", "systemd"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in ("", ".py", ".service", ".socket", ".sh"):
                used |= set(re.findall(r"\bPREFORK_[A-Z][A-Z0-9_]*", path.read_text(errors="replace")))
    used -= {"PREFORK_NAME"}  # docs prose: "PREFORK_<NAME>"
    assert used - settings <= ENV_INTERNAL, used - settings - ENV_INTERNAL
    assert not settings & ENV_INTERNAL
    environ = dict.fromkeys(ENV_INTERNAL, "x")
    assert environ_settings(environ) == {}


# -- the environment as the loader reads it -----------------------------------------------------------------


def test_precedence_command_line_environment_file_default(tmp_path: Path) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text("workers = 3\nthreads = 7\nbacklog = 100\n")
    environ = {"PREFORK_WORKERS": "5", "PREFORK_THREADS": "9"}
    loaded = load_config({"workers": 6}, str(config), environ)
    assert (loaded.config.workers, loaded.config.threads, loaded.config.backlog, loaded.config.timeout) == (
        6, 9, 100, 30.0)
    assert loaded.origins == {"workers": "command line", "threads": "environment variable PREFORK_THREADS",
                              "backlog": f"config file {config}"}
    assert loaded.overrides == {"workers": 6, "threads": 9}


def test_a_reload_keeps_the_environment_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text("threads = 7\nbacklog = 100\n")
    loaded = load_config({}, None, {"PREFORK_CONFIG": str(config), "PREFORK_THREADS": "9"})
    assert loaded.config.config_file == str(config) and loaded.config.threads == 9
    config.write_text("threads = 8\nbacklog = 200\n")
    again = reread_config(loaded.config, loaded.overrides)
    assert (again.threads, again.backlog) == (9, 200)


@pytest.mark.parametrize(("environ", "field", "value"), [
    ({"PREFORK_BIND": "127.0.0.1:8001, [::1]:8001"}, "binds", ("127.0.0.1:8001", "[::1]:8001")),
    ({"PREFORK_RELAY": "10.0.0.1:80,weight=3 10.0.0.2:80,backup"}, "relay", ("10.0.0.1:80,weight=3",
                                                                            "10.0.0.2:80,backup")),
    ({"PREFORK_ALPN": "h2,http/1.1", "PREFORK_CERTFILE": "/c.pem"}, "alpn", ("h2", "http/1.1")),
    ({"PREFORK_PROXY_ALLOW": "10.0.0.0/8,127.0.0.1"}, "proxy_allow", ("10.0.0.0/8", "127.0.0.1")),
    ({"PREFORK_PRELOAD": "no"}, "preload", False),
    ({"PREFORK_PRELOAD": "FALSE"}, "preload", False),
    ({"PREFORK_PROXY_PROTOCOL": "1"}, "proxy_protocol", True),
    ({"PREFORK_PROXY_PROTOCOL": "on"}, "proxy_protocol", True),
    ({"PREFORK_TIMEOUT": "2.5"}, "timeout", 2.5),
    ({"PREFORK_GRACEFUL_TIMEOUT": "7"}, "graceful_timeout", 7.0),
    ({"PREFORK_USER": "1000"}, "user", "1000"),
    ({"PREFORK_LOG_LEVEL": "DEBUG"}, "log_level", "debug"),
    ({"PREFORK_WORKER_CLASS": "async", "PREFORK_HANDLER": "prefork.handlers.aio:EchoProtocol"}, "handler",
     "prefork.handlers.aio:EchoProtocol"),
    ({"PREFORK_WORKERS": ""}, "workers", Config().workers),  # empty: not set
    ({"PREFORK_CHECK": "1", "PREFORK_CMD": "x", "OTHER_WORKERS": "9"}, "workers", Config().workers),
])
def test_environment_values(environ: dict[str, str], field: str, value: Any) -> None:
    assert getattr(load_config({}, None, environ).config, field) == value


@pytest.mark.parametrize(("environ", "message"), [
    ({"PREFORK_WOKERS": "2"}, "environment variable PREFORK_WOKERS: no such setting (did you mean PREFORK_WORKERS?)"),
    ({"PREFORK_QQQ": "2"}, "environment variable PREFORK_QQQ: no such setting (see docs/options.md)"),
    ({"PREFORK_WORKERS": "two"}, "environment variable PREFORK_WORKERS: expected a whole number, got 'two'"),
    ({"PREFORK_WORKERS": "2.5"}, "environment variable PREFORK_WORKERS: expected a whole number, got '2.5'"),
    ({"PREFORK_WORKERS": "9" * 40}, "environment variable PREFORK_WORKERS: expected a whole number"),
    ({"PREFORK_WORKERS": "0"}, "environment variable PREFORK_WORKERS: workers: 0 is out of range (1-1024)"),
    ({"PREFORK_TIMEOUT": "soon"}, "environment variable PREFORK_TIMEOUT: expected a number, got 'soon'"),
    ({"PREFORK_TIMEOUT": "nan"}, "environment variable PREFORK_TIMEOUT: timeout: nan must be more than 0"),
    ({"PREFORK_PRELOAD": "maybe"}, "environment variable PREFORK_PRELOAD: expected true or false"),
    ({"PREFORK_WORKER_CLASS": "gevent"}, "environment variable PREFORK_WORKER_CLASS: worker-class: unknown class "
                                         "'gevent' (choose from sync, thread, async)"),
    ({"PREFORK_HANDLER_TIMEOUT": "x" * 10_000}, "expected a number, got 'xxxx"),
])
def test_bad_environment_is_one_line_naming_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"workers": 2}, None, environ)
    text = str(caught.value)
    assert message in text and "\n" not in text and len(text) < 250


def test_a_bad_file_value_is_refused_even_when_overridden(tmp_path: Path) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text("workers = 0\n")
    with pytest.raises(ConfigError, match=f"config file {config}: workers: 0 is out of range"):
        build_config({"workers": 2}, str(config))


def test_the_api_reads_the_environment_under_its_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFORK_WORKERS", "3")
    monkeypatch.setenv("PREFORK_THREADS", "5")
    monkeypatch.setenv("PREFORK_BIND", "127.0.0.1:1")  # the address is an argument: it wins
    server = PreforkServer(("127.0.0.1", 0), EchoHandler, workers=2)
    assert (server.config.workers, server.config.threads, server.config.binds) == (2, 5, ("127.0.0.1:0",))
    monkeypatch.setenv("PREFORK_THREDS", "5")
    with pytest.raises(OptionError, match=r"PREFORK_THREDS: no such setting \(did you mean PREFORK_THREADS\?\)"):
        PreforkServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)


# -- real processes ------------------------------------------------------------------------------------------


def test_check_config_says_where_each_value_came_from(tmp_path: Path) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 3\nthreads = 7\nbacklog = 100\nlog-level = "warning"\n')
    env = child_env(PREFORK_CONFIG=str(config), PREFORK_WORKERS="5", PREFORK_THREADS="9", PREFORK_BIND="127.0.0.1:0",
                    PREFORK_PRELOAD="no")
    result = run_prefork(tmp_path, "--check-config", "--workers", "4", "--control", str(tmp_path / "c.sock"), env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("configuration OK: 4 thread worker(s)") and "on 127.0.0.1:0" in lines[0]
    assert sorted(lines[1:]) == sorted([
        "  bind = 127.0.0.1:0  (environment variable PREFORK_BIND)",
        "  workers = 4  (command line)",
        "  threads = 9  (environment variable PREFORK_THREADS)",
        f"  backlog = 100  (config file {config})",
        f"  log-level = warning  (config file {config})",
        "  preload = false  (environment variable PREFORK_PRELOAD)",
        f"  control = {tmp_path / 'c.sock'}  (command line)",
    ])


@pytest.mark.parametrize(("environ", "message"), [
    ({"PREFORK_WROKERS": "2"}, "prefork: error: environment variable PREFORK_WROKERS: no such setting "
                               "(did you mean PREFORK_WORKERS?) (see docs/options.md)"),
    ({"PREFORK_BACKLOG": "lots"}, "prefork: error: environment variable PREFORK_BACKLOG: expected a whole number, "
                                  "got 'lots'"),
    ({"PREFORK_BIND": "127.0.0.1"}, "prefork: error: bind '127.0.0.1': expected HOST:PORT, [V6]:PORT or unix:PATH"),
])
def test_bad_environment_stops_the_command_in_one_line(tmp_path: Path, environ: dict[str, str],
                                                       message: str) -> None:
    for args in (["--check-config"], ["--workers", "1"]):  # checking, and starting: nothing starts
        result = run_prefork(tmp_path, *args, env=child_env(**environ))
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.splitlines() == [message]


def test_a_daemon_started_from_the_environment_alone(tmp_path: Path) -> None:
    env = child_env(PREFORK_WORKERS="2", PREFORK_BIND="127.0.0.1:0", PREFORK_WORKER_CLASS="sync",
                    PREFORK_NAME="fromenv")
    daemon = start_daemon(tmp_path, workers=None, bind_default=False, env=env)
    try:
        status = daemon.status()
        assert (status["target_workers"], status["name"], len(status["listeners"])) == (2, "fromenv", 1)
        assert {w["pid"] for w in daemon.ready_workers(status)} and daemon.port
        assert exchange(daemon.address(), b"from the environment\n") == b"from the environment\n"
    finally:
        daemon.stop()


def test_a_reload_reads_the_file_again_under_the_environment(tmp_path: Path,
                                                             daemon_factory: Callable[..., Daemon]) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 3\nhandler = "recipe_handlers:EchoHandler"\n')
    d = daemon_factory(workers=None, env=child_env(PREFORK_CONFIG=str(config), PREFORK_WORKERS="1"))
    assert d.status()["target_workers"] == 1
    config.write_text('workers = 3\nhandler = "recipe_handlers:StreamEchoHandler"\n')
    d.signal(signal.SIGHUP)
    st = wait_generation(d, 2, 1)  # the file's new handler, the environment's worker count still
    assert (st["target_workers"], st["handler"]) == (1, "recipe_handlers:StreamEchoHandler")
