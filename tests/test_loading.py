"""Loading the handler before anything is bound, as the user it will run as: one line naming the user's file and
line, status 2, no port bound, no worker forked; the same from ``--check-config``; ``--chdir`` and
``--pythonpath``."""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from test_cli import free_port, run_prefork

from conftest import Daemon, child_env, exchange, public_directory, wait_for
from prefork.api import make_config
from prefork.config import ConfigError, build_config
from prefork.handlers.echo import EchoHandler

HANDLER = '''\
import socketserver


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())
'''

# (files in the working directory, the handler, what follows "cannot load handler 'HANDLER': ")
FAILURES = {
    "syntax-error": ({"app.py": "import socketserver\n\ndef broken(:\n    pass\n"}, "app:Handler",
                     "app.py:3: SyntaxError: invalid syntax"),
    "name-error": ({"app.py": HANDLER + "\nvalue = undefined_name\n"}, "app:Handler",
                   "app.py:8: NameError: name 'undefined_name' is not defined"),
    "missing-dependency": ({"app.py": "import socketserver\nimport nonexistent_dependency\n" + HANDLER},
                           "app:Handler", "app.py:2: ModuleNotFoundError: No module named 'nonexistent_dependency'"),
    "missing-dependency-of-a-helper": (
        {"app.py": "import helper\n" + HANDLER, "helper.py": '"""Helps."""\n\nimport nonexistent_dependency\n'},
        "app:Handler", "helper.py:3: ModuleNotFoundError: No module named 'nonexistent_dependency'"),
    "raised-in-python-s-library": ({"app.py": "import json\n\nSETTINGS = json.loads('{broken')\n"}, "app:Handler",
                                   "app.py:3: JSONDecodeError: Expecting property name enclosed in double quotes: "
                                   "line 1 column 2 (char 1)"),  # the user's line, not json's
    "missing-class": ({"app.py": HANDLER}, "app:Handlr", "app has no attribute 'Handlr' (did you mean Handler?)"),
    "missing-module": ({"inventory_app.py": HANDLER}, "inventory_ap:Handler",
                       "no module named 'inventory_ap' (did you mean inventory_app?)"),
}


def write_files(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(text)


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


@pytest.mark.parametrize("check", [False, True], ids=["start", "check-config"])
@pytest.mark.parametrize("kind", list(FAILURES))
def test_a_handler_that_cannot_load_is_one_line_naming_the_file_and_line_and_nothing_is_bound(
        tmp_path: Path, kind: str, check: bool) -> None:
    files, handler, why = FAILURES[kind]
    write_files(tmp_path, files)
    port = free_port()
    control = tmp_path / "c.sock"
    result = run_prefork(tmp_path, "--bind", f"127.0.0.1:{port}", "--control", str(control), "-w", "2", handler,
                         *(["--check-config"] if check else []))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [f"prefork: error: cannot load handler {handler!r}: {why}"]
    assert refused(port) and not control.exists()


def test_the_traceback_is_logged_at_debug_level(tmp_path: Path) -> None:
    files, handler, why = FAILURES["name-error"]
    write_files(tmp_path, files)
    for check in ([], ["--check-config"]):
        result = run_prefork(tmp_path, "--bind", "127.0.0.1:0", "--control", str(tmp_path / "c.sock"),
                             "--log-level", "debug", handler, *check)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert "Traceback (most recent call last):" in lines
        assert f'  File "{tmp_path / "app.py"}", line 8, in <module>' in lines
        assert lines[-1] == f"prefork: error: cannot load handler {handler!r}: {why}"


# -- as the user it will run as -------------------------------------------------------------------------------

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory user nobody can read and write."""
    with public_directory("prefork-loading-", 0o777) as d:
        yield d


@as_root
@pytest.mark.parametrize("check", [False, True], ids=["start", "check-config"])
def test_under_user_nobody_an_unreadable_directory_fails_with_a_hint_before_anything_is_bound(
        tmp_path: Path, check: bool) -> None:
    (tmp_path / "app.py").write_text(HANDLER)  # root's: nobody cannot read the directory
    port = free_port()
    result = run_prefork(tmp_path, "--bind", f"127.0.0.1:{port}", "--control", str(tmp_path / "c.sock"),
                         "--user", "nobody", "--group", "nogroup", "app:Handler",
                         *(["--check-config"] if check else []))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"prefork: error: cannot load handler 'app:Handler': no module named 'app' (user nobody cannot read "
        f"{tmp_path}, on the module search path: check the permissions of that directory and those above it)"]
    assert refused(port)


@as_root
def test_under_user_nobody_an_unreadable_chdir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    result = run_prefork(Path("/"), "--bind", "127.0.0.1:0", "--control", str(tmp_path / "c.sock"),
                         "--user", "nobody", "--group", "nogroup", "--chdir", str(tmp_path / "site"))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"prefork: error: chdir: cannot change to {tmp_path / 'site'} as user nobody: Permission denied"]


GATED = '''\
import os

with open("importing", "w") as fifo:  # tell the test the import is under way
    fifo.write(str(os.geteuid()))
with open("go") as fifo:  # and wait for it to look
    fifo.read()
''' + FAILURES["name-error"][0]["app.py"]


@as_root
def test_the_handler_is_imported_as_the_run_user_before_anything_is_bound(public_dir: Path) -> None:
    (public_dir / "app.py").write_text(GATED)
    for fifo in ("importing", "go"):
        os.mkfifo(public_dir / fifo)
        (public_dir / fifo).chmod(0o666)  # past the umask: nobody writes one, reads the other
    port = free_port()
    control = public_dir / "c.sock"
    importing = os.open(public_dir / "importing", os.O_RDONLY | os.O_NONBLOCK)
    proc = subprocess.Popen([sys.executable, "-m", "prefork", "--bind", f"127.0.0.1:{port}", "--control",
                             str(control), "--user", "nobody", "--group", "nogroup", "-w", "2", "app:Handler"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=child_env(), cwd=public_dir)
    try:
        assert select.select([importing], [], [], 20)[0], "the import never began"
        assert os.read(importing, 100) == b"65534"  # the importer runs as nobody
        # meanwhile nothing is bound, no control socket made, and the master forked only the check
        assert refused(port) and not control.exists()
        assert [p.uids().effective for p in psutil.Process(proc.pid).children(recursive=True)] == [65534]
        go = wait_for(lambda: _open_writer(public_dir / "go"), 20, "the import waiting on its gate")
        os.close(go)
        _, err = proc.communicate(timeout=20)
    finally:
        os.close(importing)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(5)
    assert proc.returncode == 2
    assert err.decode().splitlines() == [
        "prefork: error: cannot load handler 'app:Handler': app.py:14: NameError: name 'undefined_name' is not defined"]
    assert refused(port)


def _open_writer(path: Path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return None
        raise


# -- --chdir and --pythonpath ---------------------------------------------------------------------------------

WHERE = '''\
import os
import socketserver

import greeting  # from --pythonpath


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        self.wfile.write(line if line != b"where\\n" else f"{greeting.WORD} {os.getcwd()}\\n".encode())
'''


def app_and_library(tmp_path: Path) -> tuple[Path, Path]:
    site, lib = tmp_path / "site", tmp_path / "lib"
    site.mkdir()
    lib.mkdir()
    (site / "where_app.py").write_text(WHERE)
    (lib / "greeting.py").write_text('WORD = "hello"\n')
    return site, lib


@pytest.mark.parametrize("how", ["command-line", "config-file"])
def test_chdir_and_pythonpath_serve_the_handler_from_there(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, how: str) -> None:
    site, _ = app_and_library(tmp_path)
    if how == "command-line":
        args = ["--chdir", "site", "--pythonpath", "../lib"]  # --pythonpath is relative to --chdir
    else:
        (tmp_path / "prefork.toml").write_text('chdir = "site"\npythonpath = ["../lib"]\n')
        args = ["--config", str(tmp_path / "prefork.toml")]
    d = daemon_factory(*args, "where_app:Handler", workers=2)
    assert exchange(d.address(), b"echo\n") == b"echo\n"
    with d.connect() as s:
        s.sendall(b"where\n")
        assert s.makefile("rb").readline() == f"hello {site}\n".encode()
    assert psutil.Process(d.pid).cwd() == str(site)  # the master works there too
    checked = run_prefork(tmp_path, *args, "--bind", "127.0.0.1:0", "where_app:Handler", "--check-config")
    assert checked.returncode == 0 and "where_app:Handler" in checked.stdout, checked.stderr


def test_an_upgrade_finds_the_files_its_command_line_names_relative_to_where_prefork_started(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    site, _ = app_and_library(tmp_path)
    (tmp_path / "prefork.toml").write_text('chdir = "site"\npythonpath = ["../lib"]\nhandler = "where_app:Handler"\n')
    d = daemon_factory("--config", "prefork.toml", workers=1)  # relative to tmp_path; the master works in site/
    r = d.ctl("upgrade", timeout=60)
    assert r.returncode == 0, r.stderr
    st = d.wait_serving(1)
    assert (st["pid"], st["generation"]) == (d.pid, 2)
    with d.connect() as s:
        s.sendall(b"where\n")
        assert s.makefile("rb").readline() == f"hello {site}\n".encode()


@pytest.mark.parametrize(("args", "why"), [
    (["--chdir", "nowhere"], "chdir: {tmp}/nowhere: no such directory"),
    (["--chdir", "file.txt"], "chdir: {tmp}/file.txt: not a directory"),
    (["--pythonpath", "lib,nowhere"], "pythonpath: {tmp}/nowhere: no such directory"),
])
def test_a_missing_directory_is_one_line(tmp_path: Path, args: list[str], why: str) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "file.txt").write_text("")
    for check in ([], ["--check-config"]):
        result = run_prefork(tmp_path, "--bind", "127.0.0.1:0", *args, *check)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr.splitlines() == [f"prefork: error: {why.format(tmp=tmp_path)}"]


def test_the_paths_are_settings_of_the_config_file_and_the_python_api(tmp_path: Path) -> None:
    site, lib = app_and_library(tmp_path)
    (tmp_path / "prefork.toml").write_text(f'chdir = "{site}"\npythonpath = "../lib"\n')
    config = build_config({}, str(tmp_path / "prefork.toml"))
    assert (config.chdir, config.pythonpath) == (str(site), (str(lib),))
    # (a handler object: a "module:Class" would be imported here, in --chdir, moving this process there)
    config = make_config(EchoHandler, ("127.0.0.1", 0), {"chdir": site, "pythonpath": [lib, str(lib)]})
    assert (config.chdir, config.pythonpath) == (str(site), (str(lib), str(lib)))
    assert os.getcwd() != str(site)  # the settings are read, not acted on
    with pytest.raises(ConfigError, match="pythonpath: expected a list of strings or str, got 3"):
        build_config({"pythonpath": 3})


def test_a_start_without_a_handler_says_it_serves_the_built_in_echo(tmp_path: Path) -> None:
    (tmp_path / "prefork.toml").write_text("workers = 1\n")
    result = run_prefork(tmp_path, "--config", str(tmp_path / "prefork.toml"), "--bind", "127.0.0.1:0",
                         "--check-config")
    assert result.returncode == 0, result.stderr
    assert "(the built-in echo server: no handler given)" in result.stdout
