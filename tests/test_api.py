"""The Python API: the recipe's script with PreforkServer, run as ``python script.py``, and prefork.serve().

Programs run for real on 127.0.0.1 in their own session, with a private
control socket; every wait is bounded and waits for something observable
(a status field, an exit). The pure parts (addresses, messages, the
command line that runs a program again) are tested as functions.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from socketserver import StreamRequestHandler
from typing import Any

import psutil
import pytest

from conftest import APPS, ROOT, Daemon, Load, child_env, exchange, group_members, read_line, refused, wait_for
from prefork import OptionError, PreforkServer, ServerOptions
from prefork.api import (
    KEYWORDS,
    CannotRerun,
    bind_texts,
    handler_name,
    keyword_message,
    rerun_command,
)
from prefork.cli import build_parser
from prefork.config import SETTINGS, ConfigError

RUN_TIMEOUT = 60.0
ProgramFactory = Callable[..., Daemon]


class EchoHandler(StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


class EchoProtocol(asyncio.Protocol):
    pass


def listening_port(status: dict[str, Any]) -> int:
    return int(next(li for li in status["listeners"] if li.startswith("127.0.0.1:")).rsplit(":", 1)[1])


@pytest.fixture
def program(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProgramFactory]:
    """``program(SCRIPT, *ARGS)`` runs ``python SCRIPT CONTROL ARGS`` in tmp_path and waits until it serves."""
    started: list[Daemon] = []

    def start(script: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> Daemon:
        control = str(tmp_path / f"p{len(started)}.sock")
        log_path = tmp_path / f"p{len(started)}.log"
        argv = [sys.executable, script, control, *args]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=env or child_env(), cwd=str(tmp_path),
                                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        d = Daemon(proc=proc, control=control, log_path=log_path, args=argv)
        started.append(d)
        d.port = listening_port(d.wait_serving())
        return d

    yield start
    failed = getattr(request.node, "rep_call", None)
    for d in started:
        d.stop()
        if failed is not None and failed.failed:
            print(f"--- output of {' '.join(d.args)} ---\n{d.log()}")
        wait_for(lambda d=d: not group_members(d.proc.pid), 10, "every process of the program to exit")


def recipe(tmp_path: Path) -> str:
    """The converted recipe, copied to tmp_path (where a test may edit it); its name relative to tmp_path."""
    shutil.copy(APPS / "api_recipe.py", tmp_path / "echo_server.py")
    return "echo_server.py"


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return name


def ask(d: Daemon, line: bytes) -> bytes:
    """One line on a new connection, and the line that comes back."""
    with d.connect() as s:
        s.sendall(line)
        return read_line(s)


def stopped(d: Daemon) -> str:
    """TERM the program's own process; its output once it exited 0."""
    d.signal(signal.SIGTERM)
    assert d.wait_exit(20) == 0, d.log()
    return d.log()


# -- the recipe's script, as ``python script.py`` -----------------------------------------------------------


@pytest.mark.parametrize(("worker_class", "handler"), [
    ("sync", "EchoHandler"),
    ("thread", "StreamEchoHandler"),
    ("async", "EchoProtocol"),
])
def test_recipe_script_serves_its_own_handlers(program: ProgramFactory, tmp_path: Path, worker_class: str,
                                               handler: str) -> None:
    d = program(recipe(tmp_path), worker_class, handler)
    st = d.status()
    assert st["handler"] == f"__main__:{handler}"
    assert st["worker_class"] == worker_class and len(st["workers"]) == 2
    assert st["pid"] == d.pid  # the program's process is the master
    assert exchange(d.address(), b"Hello\n") == b"Hello\n"
    with d.connect() as s:  # the recipe's own session (a line: StreamEchoHandler answers whole lines)
        assert s.send(b"Hello\n") == 6
        assert s.recv(8192) == b"Hello\n"
    r = d.ctl("status")
    assert r.returncode == 0, r.stderr
    assert f"2 {worker_class} worker(s)" in r.stdout and f"of __main__:{handler}" in r.stdout
    out = stopped(d)
    assert out.count("Got connection from ('127.0.0.1', ") == 2
    assert out.count("serve_forever returned in") == 1
    wait_for(lambda: not os.path.exists(d.control), 5, "the control socket removed")


def test_reload_runs_the_edited_script_under_load(program: ProgramFactory, tmp_path: Path) -> None:
    script = recipe(tmp_path)
    d = program(script, "thread", "StreamEchoHandler")
    before = d.status()
    assert ask(d, b"version\n") == b"version\n"
    with Load(d.address(), clients=4, mode="connect") as load:
        load.wait_ok(100)
        path = tmp_path / script
        path.write_text(path.read_text().replace(
            "self.wfile.write(line)", "self.wfile.write(b'v2\\n' if line == b'version\\n' else line)"))
        r = d.ctl("reload", timeout=90)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "reloaded: generation 2 serving with 2 worker(s)"
        # the reply waited until no old worker accepts: every new connection meets the new code
        assert ask(d, b"version\n") == b"v2\n"
        load.wait_ok(100)
    assert load.failures == [], load.failures[:5]
    after = d.status()
    # the program's process is the master, for its whole life
    assert after["pid"] == before["pid"] == d.pid and after["generation"] == 2
    assert after["listeners"] == before["listeners"]
    assert {w["generation"] for w in after["workers"]} == {2}
    # the new generation's mold is the program run again (its code up to serve_forever()), our child
    mold = next(m["pid"] for m in after["molds"] if m["generation"] == 2)
    assert psutil.Process(mold).ppid() == d.pid
    d.signal(signal.SIGHUP)
    wait_for(lambda: (st := d.try_status()) and st["generation"] == 3 and st["state"] == "serving", 30,
             "generation 3 serving")
    assert ask(d, b"version\n") == b"v2\n"
    r = d.ctl("upgrade", timeout=90)  # the program, checked, then executed again in place
    assert r.returncode == 0 and r.stdout.startswith(f"upgraded in place: master pid {d.pid}"), r.stderr
    assert d.status()["generation"] == 4 and d.status()["pid"] == d.pid
    out = stopped(d)
    # the program ran again as it was started, with the same arguments: the two reloads' molds and the
    # upgrade (its check's output is the upgrade's, not the program's)
    started = re.findall(r"started \d+ (\[.*?\])\n", out)
    assert started == [repr([script, d.control, "thread", "StreamEchoHandler"])] * 4
    # the code after serve_forever() ran once, in the process the test started
    assert f"serve_forever returned in {d.pid}\n" in out and out.count("serve_forever returned") == 1


def test_a_broken_edit_fails_the_reload_and_the_old_code_serves(program: ProgramFactory, tmp_path: Path) -> None:
    script = recipe(tmp_path)
    d = program(script, "thread", "StreamEchoHandler")
    pid = d.status()["pid"]
    path = tmp_path / script
    path.write_text(path.read_text().replace("def handle(self):", "def handle(self)", 1))  # a syntax error
    r = d.ctl("reload", timeout=90)
    assert r.returncode == 1
    assert "reload failed: the mold of generation 2 (the program run again) exited with status 1" in r.stderr
    st = d.status()
    assert st["pid"] == pid and st["state"] == "serving" and st["generation"] == 1
    assert exchange(d.address(), b"still here\n") == b"still here\n"
    assert "SyntaxError" in d.log()
    stopped(d)


def test_under_systemd_the_program_is_the_main_pid(program: ProgramFactory, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(20)
        d = program(recipe(tmp_path), "sync", "EchoHandler", env=child_env(NOTIFY_SOCKET=str(tmp_path / "notify")))
        assert d.status()["pid"] == d.pid
        messages: list[str] = []
        while "READY=1" not in messages:
            messages += notify.recv(4096).decode().splitlines()  # bounded by the socket's timeout
    # the program's process is the master: systemd's main pid already, nothing to tell it
    assert [m for m in messages if m.startswith("MAINPID=")] == []
    stopped(d)


def test_reload_of_a_program_read_from_stdin_is_refused(program: ProgramFactory, tmp_path: Path) -> None:
    text = (APPS / "api_recipe.py").read_bytes()
    d = program("-", "sync", "EchoHandler", stdin=text)
    pid = d.status()["pid"]
    r = d.ctl("reload", timeout=30)
    assert r.returncode == 1
    assert "reload failed: the program was read from standard input" in r.stderr
    r = d.ctl("upgrade", timeout=30)  # an upgrade runs the program again too
    assert r.returncode == 1 and "upgrade failed: the program was read from standard input" in r.stderr
    assert d.status()["pid"] == pid
    assert exchange(d.address(), b"ok") == b"ok"
    stopped(d)


WATCHED_PROGRAM = """\
    import socketserver
    import sys

    from prefork import PreforkServer


    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(b'v1\\n' if line == b'version\\n' else line)


    if __name__ == '__main__':
        PreforkServer(('127.0.0.1', 0), Handler, workers=1, control=sys.argv[1], reload_on_change=True).serve_forever()
    """


def test_reload_on_change_runs_the_edited_program(program: ProgramFactory, tmp_path: Path) -> None:
    script = write(tmp_path, "watched.py", WATCHED_PROGRAM)
    d = program(script)
    wait_for(lambda: "reload on change: watching " in d.log(), 20, "the watcher to watch")
    assert ask(d, b"version\n") == b"v1\n"
    path = tmp_path / script
    path.write_text(path.read_text().replace("b'v1", "b'v22"))
    wait_for(lambda: ask(d, b"version\n") == b"v22\n", 30, "the edited program answering")
    assert "reloading on change: watched.py changed" in d.log()
    assert d.status()["pid"] == d.pid  # the program's process is the master still
    stopped(d)


def test_reload_on_change_of_a_program_read_from_stdin_is_refused(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-", str(tmp_path / "c.sock")], input=textwrap.dedent(WATCHED_PROGRAM),
                       capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=30)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == ("prefork.api.OptionError: reload_on_change: the program was read from "
                                         "standard input, so it cannot be started again (run it from a file to "
                                         "reload it)")
    assert not (tmp_path / "c.sock").exists()


def test_serve_runs_an_async_def_handler_in_one_call(program: ProgramFactory, tmp_path: Path) -> None:
    script = write(tmp_path, "one_call.py", """\
        import sys

        import prefork


        async def line_echo(reader, writer):
            while line := await reader.readline():
                writer.write(line.upper())
                await writer.drain()


        if __name__ == '__main__':
            prefork.serve(line_echo, bind='127.0.0.1:0', worker_class='async', workers=1, control=sys.argv[1])
            print('serve returned')
        """)
    d = program(script)
    st = d.status()
    assert st["handler"] == "__main__:line_echo" and st["worker_class"] == "async"
    assert exchange(d.address(), b"hello\n") == b"HELLO\n"
    r = d.ctl("stop")
    assert r.returncode == 0, r.stderr
    assert d.wait_exit(20) == 0
    assert d.log().endswith("serve returned\n")


def test_ctrl_c_stops_the_program_and_serve_forever_returns(program: ProgramFactory, tmp_path: Path) -> None:
    d = program(recipe(tmp_path), "sync", "EchoHandler")
    assert exchange(d.address(), b"Hello") == b"Hello"
    os.killpg(d.pid, signal.SIGINT)  # what the terminal does: every process of the group gets it
    assert d.wait_exit(20) == 0
    assert d.log().endswith(f"serve_forever returned in {d.pid}\n")
    assert "KeyboardInterrupt" not in d.log()


def test_kill_9_of_the_program_frees_the_port_and_takes_every_process(program: ProgramFactory,
                                                                      tmp_path: Path) -> None:
    d = program(recipe(tmp_path), "thread", "StreamEchoHandler")
    assert d.ctl("reload", timeout=90).returncode == 0  # a mold that is the program run again, too
    st = d.status()
    processes = [psutil.Process(pid) for pid in [*(m["pid"] for m in st["molds"]), *(w["pid"] for w in st["workers"])]]
    os.kill(d.pid, signal.SIGKILL)
    assert d.wait_exit(5) == -signal.SIGKILL
    began = time.monotonic()
    wait_for(lambda: refused(d.address()), 2, "the port freed")
    assert time.monotonic() - began < 2
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert alive == []


def test_an_address_in_use_raises_and_harms_nothing(program: ProgramFactory, tmp_path: Path) -> None:
    d = program(recipe(tmp_path), "sync", "EchoHandler")
    script = write(tmp_path, "second.py", """\
        import sys

        import prefork
        from prefork.listeners import BindError


        async def nothing(reader, writer):
            writer.close()


        try:
            prefork.serve(nothing, bind=('127.0.0.1', int(sys.argv[1])), worker_class='async', control=sys.argv[2])
        except BindError as exc:
            print('BindError:', exc)
        """)
    r = subprocess.run([sys.executable, script, str(d.port), str(tmp_path / "second.sock")], capture_output=True,
                       text=True, env=child_env(), cwd=str(tmp_path), timeout=RUN_TIMEOUT, start_new_session=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"BindError: cannot bind 127.0.0.1:{d.port}: address already in use " \
                       "(is another instance running?)\n"
    assert not (tmp_path / "second.sock").exists()
    assert exchange(d.address(), b"still mine") == b"still mine"
    stopped(d)


# -- bad arguments ------------------------------------------------------------------------------------------

# (options, handler, what the one-line message says); every one must raise before anything is bound
BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"workers": 0}, "EchoHandler", "workers: 0 is out of range (1-1024)"),
    ({"wrokers": 2}, "EchoHandler", "unknown option 'wrokers' (did you mean 'workers'?)"),
    ({"worker_class": "fork"}, "EchoHandler", "worker_class: unknown class 'fork' (choose from sync, thread, async)"),
    ({"threads": 0}, "EchoHandler", "threads: 0 is out of range"),
    ({"timeout": "30"}, "EchoHandler", "timeout: expected int or float, got '30'"),
    ({"graceful_timeout": -1}, "EchoHandler", "graceful_timeout: -1 must be 0 to 86400 seconds"),
    ({"idle_timeout": -1}, "EchoHandler", "idle_timeout: -1 must be 0 (never) to 604800 seconds"),
    ({"drain_idle": -1}, "EchoHandler", "drain_idle: -1 must be 0 (never) to 604800 seconds"),
    ({"max_requests": -1}, "EchoHandler", "max_requests: -1 must be 0 (off) or more"),
    ({"backlog": 0}, "EchoHandler", "backlog: 0 is out of range (1-65535)"),
    ({"name": "no spaces"}, "EchoHandler", "name: 'no spaces' must be 1-64 letters"),
    ({"loop": "trio"}, "EchoHandler", "loop: unknown event loop 'trio'"),
    ({"log_level": "loud"}, "EchoHandler", "log_level: unknown level 'loud'"),
    ({"proxy_allow": ["not-a-net"]}, "EchoHandler", "proxy_allow: 'not-a-net' is not an IP network"),
    ({"relay_send_proxy": True}, "EchoHandler", "relay_send_proxy: needs --relay HOST:PORT"),
    ({"config": "/nonexistent/prefork.toml"}, "EchoHandler", "config file /nonexistent/prefork.toml: no such file"),
    ({"worker_class": "async"}, "EchoHandler",
     "cannot load handler '{name}:EchoHandler': a socketserver handler runs under --worker-class sync or thread, "
     "not async"),
    ({}, "EchoProtocol", "cannot load handler '{name}:EchoProtocol': an asyncio handler runs under --worker-class "
     "async"),
    ({}, "nosuchmodule:Handler", "cannot load handler 'nosuchmodule:Handler': no module named 'nosuchmodule'"),
    ({"port": 99999}, "EchoHandler", "bind '127.0.0.1:99999': port 99999 is out of range (0-65535)"),
    ({"x" * 10_000: 1}, "EchoHandler", "unknown option 'xxxxxxxxxx"),
    ({"config": ["x" * 10_000]}, "EchoHandler", "config: expected a path, got ['xxxxxxxxx"),
    ({"port": "x" * 10_000}, "EchoHandler", "server address ('127.0.0.1', 'xxxxxxxxx"),
]


@pytest.mark.parametrize(("options", "handler", "message"), BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_a_bad_argument_raises_one_clear_error(options: dict[str, Any], handler: str, message: str) -> None:
    options = dict(options)
    port = options.pop("port", 20000)
    obj = {"EchoHandler": EchoHandler, "EchoProtocol": EchoProtocol}.get(handler, handler)
    with pytest.raises(OptionError) as caught:
        PreforkServer(("127.0.0.1", port), obj, **options)
    assert isinstance(caught.value, ConfigError)
    text = str(caught.value)
    assert message.format(name=__name__) in text and "\n" not in text
    assert len(text) < 400 and "x" * 101 not in text and "m" * 101 not in text, text[:500]  # values cut short


def test_a_long_handler_name_is_quoted_short() -> None:
    with pytest.raises(OptionError) as caught:
        PreforkServer(("127.0.0.1", 20000), "m" * 10_000 + ":Handler")
    text = str(caught.value)
    assert text.startswith("handler: 'mmmmmmmmmm") and len(text) < 300 and "m" * 101 not in text, text[:500]


def test_serve_binds_nothing_when_an_argument_is_bad(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    control = tmp_path / "c.sock"
    cases = [{**o, "port": o.get("port", port)} | {"handler": h} for o, h, _ in BAD]
    script = write(tmp_path, "bad.py", """\
        import asyncio
        import json
        import sys
        from socketserver import BaseRequestHandler

        import prefork


        class EchoHandler(BaseRequestHandler):
            pass


        class EchoProtocol(asyncio.Protocol):
            pass


        for case in json.loads(sys.argv[2]):
            handler = {'EchoHandler': EchoHandler, 'EchoProtocol': EchoProtocol}.get(case.pop('handler'))
            port = case.pop('port')
            try:
                prefork.serve(handler or 'nosuchmodule:Handler', bind=('127.0.0.1', port), control=sys.argv[1],
                              **case)
            except Exception as exc:
                print(json.dumps([type(exc).__name__, isinstance(exc, prefork.OptionError), str(exc)]))
        """)
    proc = subprocess.run([sys.executable, script, str(control), json.dumps(cases)], capture_output=True, text=True,
                          env=child_env(), cwd=str(tmp_path), timeout=RUN_TIMEOUT, start_new_session=True)
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(results) == len(BAD), proc.stdout + proc.stderr
    for (_, _, message), (kind, is_option_error, text) in zip(BAD, results, strict=True):
        assert kind == "OptionError" and is_option_error, text
        assert message.format(name="__main__") in text  # the script's own handlers
    # nothing was bound: no control socket, and nobody listens on the port
    assert not control.exists()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))


def test_keywords_are_the_command_lines_long_options() -> None:
    dests = {a.dest for a in build_parser()._actions} - {"help", "version"}
    assert dests == set(SETTINGS) | {"config", "check_config"}
    # every setting but the two PreforkServer takes as arguments, and the config file; typed alike
    assert set(KEYWORDS) == set(SETTINGS) - {"handler", "bind"} | {"config"}
    assert set(ServerOptions.__annotations__) == set(KEYWORDS)


def test_the_typed_api_checks_under_mypy_strict(tmp_path: Path) -> None:
    bad = tmp_path / "bad_usage.py"
    bad.write_text(textwrap.dedent("""\
        from socketserver import StreamRequestHandler

        from prefork import PreforkServer


        class EchoHandler(StreamRequestHandler):
            def handle(self) -> None:
                pass


        PreforkServer(("", 20000), EchoHandler, wrokers=4)
        PreforkServer(("", 20000), EchoHandler, worker_class="fork")
        PreforkServer(("", "20000"), EchoHandler)
        PreforkServer(("", 20000), 42)
        """))
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache")]
    good = subprocess.run([*command, str(APPS / "api_typed.py")], capture_output=True, text=True, cwd=str(ROOT),
                          timeout=RUN_TIMEOUT)
    assert good.returncode == 0, good.stdout
    r = subprocess.run([*command, str(bad)], capture_output=True, text=True, cwd=str(ROOT), timeout=RUN_TIMEOUT)
    assert r.returncode == 1
    errors = [line.split(": error: ")[1] for line in r.stdout.splitlines() if ": error: " in line]
    assert len(errors) == 4, r.stdout
    assert 'Unexpected keyword argument "wrokers"' in errors[0]
    assert 'Argument "worker_class" to "PreforkServer" has incompatible type "Literal[\'fork\']"' in errors[1]
    assert 'Argument 1 to "PreforkServer" has incompatible type "tuple[str, str]"' in errors[2]
    assert 'Argument 2 to "PreforkServer" has incompatible type "int"' in errors[3]


# -- the pure parts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "binds"), [
    (("", 20000), ["0.0.0.0:20000"]),
    (("127.0.0.1", 0), ["127.0.0.1:0"]),
    (("::1", 8000), ["[::1]:8000"]),
    ("unix:/run/app.sock", ["unix:/run/app.sock"]),
    ([("127.0.0.1", 1), "[::1]:2"], ["127.0.0.1:1", "[::1]:2"]),
])
def test_addresses_become_bind_settings(address: Any, binds: list[str]) -> None:
    assert bind_texts(address) == binds


@pytest.mark.parametrize("address", [("", "20000"), ("", True), (20000,), [b"x"], 20000])
def test_a_bad_address_is_one_clear_error(address: Any) -> None:
    with pytest.raises(OptionError, match=r"^server address .*: expected \(HOST, PORT\) or a string"):
        bind_texts(address)


def test_config_messages_name_the_keyword() -> None:
    assert keyword_message("max-requests: -1 must be 0 (off) or more") == "max_requests: -1 must be 0 (off) or more"
    assert keyword_message("bind 'x': expected HOST:PORT") == "bind 'x': expected HOST:PORT"
    assert keyword_message("config file a.toml: no such file") == "config file a.toml: no such file"
    assert handler_name(EchoHandler) == f"{__name__}:EchoHandler"
    assert handler_name(EchoHandler.handle) == f"{__name__}:EchoHandler.handle"


@pytest.mark.parametrize(("orig_argv", "argv", "exists", "command"), [
    (["python3", "script.py", "a"], ["script.py", "a"], True, ["/venv/python", "script.py", "a"]),
    (["python3", "-X", "dev", "script.py"], ["script.py"], True, ["/venv/python", "-X", "dev", "script.py"]),
    (["python3", "script.py"], ["script.py"], False, ["/venv/python", "/srv/script.py"]),  # it changed directory
    (["python3", "-m", "app", "-v"], ["/srv/app.py", "-v"], True, ["/venv/python", "-m", "app", "-v"]),
    (["python3", "-c", "code", "x"], ["-c", "x"], True, ["/venv/python", "-c", "code", "x"]),
])
def test_a_program_runs_again_as_it_was_started(orig_argv: list[str], argv: list[str], exists: bool,
                                                command: list[str]) -> None:
    assert rerun_command("/venv/python", orig_argv, argv, "/srv/script.py", lambda path: exists) == command


@pytest.mark.parametrize("argv", [[""], ["-"], []])
def test_a_program_from_stdin_cannot_run_again(argv: list[str]) -> None:
    with pytest.raises(CannotRerun, match="read from standard input"):
        rerun_command("/venv/python", ["python3"], argv, None)


def test_the_package_names_its_api_lazily() -> None:
    import prefork

    assert prefork.PreforkServer is PreforkServer and "serve" in dir(prefork)
    with pytest.raises(AttributeError, match="module 'prefork' has no attribute 'no_such_name'"):
        _ = prefork.no_such_name  # type: ignore[attr-defined]
