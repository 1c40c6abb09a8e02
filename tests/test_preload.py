"""--preload: the master imports the handler once, workers share it, and a reload still runs the code on disk."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from conftest import Daemon, Load, child_env, exchange, read_line, wait_for

MODULE = '''\
import os
import socketserver

with open(os.environ["PRELOAD_IMPORTS"], "a") as f:  # who imported this module
    f.write(f"{{os.getpid()}}\\n")
VERSION = b"{version}"


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(VERSION + b"\\n" if line == b"version\\n" else line)
'''


def write_module(tmp_path: Path, version: str, broken: bool = False) -> None:
    # each version has a different length, so Python never takes a stale .pyc for the edited source
    text = MODULE.format(version=version) + ('raise RuntimeError("broken on purpose")\n' if broken else "")
    (tmp_path / "preloaded.py").write_text(text)


def importers(tmp_path: Path) -> list[int]:
    path = tmp_path / "imports"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def version(d: Daemon) -> bytes:
    with socket.create_connection(d.address(), timeout=5) as s:
        s.sendall(b"version\n")
        return read_line(s).strip()


def start(daemon_factory: Callable[..., Daemon], tmp_path: Path, **kwargs: object) -> Daemon:
    env = child_env(PRELOAD_IMPORTS=str(tmp_path / "imports"))
    return daemon_factory("--preload", "preloaded:Handler", env=env, **kwargs)


def test_the_master_imports_the_handler_once_and_workers_serve_it(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path, workers=3)
    st = d.status()
    assert importers(tmp_path) == [st["pid"]]
    assert version(d) == b"v1"
    assert exchange(d.address(), b"hello\n") == b"hello\n"
    # a respawned worker is forked from the master too: still no import of its own
    victim = st["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (s := d.try_status()) is not None and victim not in {w["pid"] for w in s["workers"]}
             and len(d.ready_workers(s)) == 3, 20, "the killed worker replaced")
    assert version(d) == b"v1"
    assert importers(tmp_path) == [st["pid"]]


def test_reload_runs_the_edited_code_with_no_failed_exchange(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path)
    before = d.status()
    with Load(d.address(), clients=4) as load:
        load.wait_ok(100)
        write_module(tmp_path, "v2-edited")
        r = d.ctl("reload", timeout=60)
        assert r.returncode == 0, r.stderr
        assert "generation 2" in r.stdout
        assert version(d) == b"v2-edited"  # every connection made after the reply meets the new code
        load.wait_ok(100)
    assert load.failures == []
    after = d.status()
    assert after["pid"] != before["pid"] and after["generation"] == 2
    assert importers(tmp_path) == [before["pid"], after["pid"]]  # one import per master, none in workers


def test_a_handler_that_fails_to_import_at_start_is_one_line_and_exit_2(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1", broken=True)
    d = start(daemon_factory, tmp_path, wait=False)
    assert d.wait_exit() == 2
    lines = d.log().splitlines()
    errors = [line for line in lines if line.startswith("prefork: error:")]
    assert errors == [f"prefork: error: cannot load handler 'preloaded:Handler': RuntimeError: broken on purpose "
                      f"({tmp_path / 'preloaded.py'}:{len(MODULE.splitlines()) + 1})"], lines
    assert not any("Traceback" in line for line in lines)
    assert not Path(d.control).exists()  # what it made is gone
    assert importers(tmp_path) == [d.pid]  # the master tried, no worker was forked


def test_reload_onto_broken_code_fails_and_the_old_code_keeps_serving(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    write_module(tmp_path, "v1")
    d = start(daemon_factory, tmp_path)
    before = d.status()
    with Load(d.address(), clients=2) as load:
        load.wait_ok(50)
        write_module(tmp_path, "v2", broken=True)
        r = d.ctl("reload", timeout=60)
        assert r.returncode == 1
        assert "reload failed" in r.stderr and "RuntimeError: broken on purpose" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        load.wait_ok(50)
    assert load.failures == []
    after = d.status()
    assert (after["pid"], after["generation"], after["state"]) == (before["pid"], 1, "serving")
    assert version(d) == b"v1"
    # once the code is fixed, a reload takes it
    write_module(tmp_path, "v3-fixed")
    r = d.ctl("reload", timeout=60)
    assert r.returncode == 0, r.stderr
    assert version(d) == b"v3-fixed"
