"""From the checkout to a running service the way an operator installs it.

``python -m build`` makes a wheel and an sdist; the wheel, installed into a
fresh virtual environment outside the checkout (nothing of the checkout on
``sys.path``), serves the echo handler; the shipped units' ``ExecStart`` and
``ExecReload`` command lines run that install through the ``/usr/local/bin``
links the install steps of docs/install.md make; ``scripts/serve`` in a fresh copy of the
checkout installs what serving needs, not the test tools, and serves exactly
the address it is given. pip installs from the configured index and its cache;
every step is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, exchange, session_process, wait_for

pytestmark = pytest.mark.timeout(900)

INSTALL_TIMEOUT = 600.0  # seconds for one pip install (from the index or its cache)


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without anything that would make Python find the checkout or our own venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(argv: list[str], *, timeout: float, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env or clean_env())
    assert done.returncode == 0, f"{shlex.join(argv)} exited with {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], timeout=INSTALL_TIMEOUT, cwd=out)
    return out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """/opt/prefork of docs/install.md, somewhere under /tmp: a fresh venv with the wheel (and its fast extra)."""
    where = tmp_path_factory.mktemp("opt") / "prefork"
    run([sys.executable, "-m", "venv", str(where)], timeout=120, cwd=where.parent)
    wheel = next(dist.glob("prefork-*.whl"))
    run([str(where / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", f"{wheel}[fast]"],
        timeout=INSTALL_TIMEOUT, cwd=where.parent)
    return where


def serving(argv: list[str], cwd: Path, env: dict[str, str]) -> contextlib.AbstractContextManager[
        subprocess.Popen[bytes]]:
    """``argv`` started in its own session, its output in cwd/out.log; its group ended (TERM, then KILL)."""
    return session_process(argv, cwd / "out.log", cwd=cwd, env=env, grace=15.0)


def wait_status(ctl: list[str], proc: subprocess.Popen[bytes], env: dict[str, str], cwd: Path,
                workers: int) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        assert proc.poll() is None, f"it exited with {proc.returncode}:\n{(cwd / 'out.log').read_text()}"
        done = subprocess.run([*ctl, "status", "--json"], capture_output=True, text=True, timeout=30, env=env,
                              cwd=cwd)
        if done.returncode != 0:
            return None
        status: dict[str, Any] = json.loads(done.stdout)
        ready = [w for w in status["workers"] if w["state"] == "ready"]
        return status if status["state"] == "serving" and len(ready) == workers else None

    found: dict[str, Any] = wait_for(check, 60, "the installed prefork serving")
    return found


def port_of(status: dict[str, Any]) -> tuple[str, int]:
    host, port = status["listeners"][0].rsplit(":", 1)
    return host, int(port)


def test_build_makes_a_wheel_and_an_sdist(dist: Path) -> None:
    wheel, = dist.glob("prefork-*-py3-none-any.whl")
    sdist, = dist.glob("prefork-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"prefork/cli.py", "prefork/ctl/__init__.py", "prefork/py.typed", "prefork/__init__.pyi"} <= names
    assert not [n for n in names if n.startswith("tests/")]
    assert "prefork = prefork.cli:run" in entry_points and "preforkctl = prefork.ctl:run" in entry_points
    with tarfile.open(sdist) as t:
        inside = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"pyproject.toml", "README.md", "prefork/cli.py", "systemd/prefork.service", "systemd/prefork@.service",
            "systemd/prefork.socket", "systemd/prefork.toml", "docs/hardening.md", "docs/install.md",
            "docs/containers/Containerfile", "docs/containers/deployment.yaml"} <= inside


def test_the_sdist_carries_the_tests_and_the_benchmarks(dist: Path) -> None:
    """What runs the test suite and the benchmarks from an unpacked sdist: every tracked file under tests/,
    scripts/ and bench/ (the harness, the apps, the C load generators, the peers), scripts executable."""
    sdist, = dist.glob("prefork-*.tar.gz")
    with tarfile.open(sdist) as t:
        modes = {m.name.split("/", 1)[1]: m.mode for m in t.getmembers() if "/" in m.name and m.isfile()}
    tracked = subprocess.run(["git", "ls-files", "-z", "tests", "scripts", "bench"], capture_output=True,
                             timeout=60, cwd=ROOT, check=True).stdout.decode().split("\0")
    wanted = {name for name in tracked if name}
    assert {"tests/conftest.py", "tests/tlsutil.py", "tests/apps/long_lived_handlers.py", "scripts/setup",
            "scripts/bench_balance.py", "bench/compare.py", "bench/echoload.c", "bench/peers/asyncio_echo.py"} <= wanted
    assert sorted(wanted - set(modes)) == []
    for script in ("scripts/setup", "scripts/test", "scripts/serve", "scripts/bench"):
        assert modes[script] & 0o111, (script, oct(modes[script]))


def test_the_wheel_serves_from_a_fresh_environment(venv: Path, tmp_path: Path) -> None:
    env = clean_env()
    where = run([str(venv / "bin" / "python"), "-c", "import prefork, uvloop; print(prefork.__file__)"],
                timeout=60, cwd=tmp_path)
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    control = tmp_path / "c.sock"
    ctl = [str(venv / "bin" / "preforkctl"), "--control", str(control)]
    for worker_class in ("thread", "async"):
        with serving([str(venv / "bin" / "prefork"), "--bind", "127.0.0.1:0", "--control", str(control), "-w", "2",
                      "-k", worker_class], tmp_path, env) as proc:
            status = wait_status(ctl, proc, env, tmp_path, 2)
            assert status["handler"] == ("prefork.handlers.aio:EchoProtocol" if worker_class == "async"
                                         else "prefork.handlers.echo:EchoHandler")
            assert status["event_loop"] == ("uvloop" if worker_class == "async" else None)  # the fast extra
            assert exchange(port_of(status), b"Hello") == b"Hello"
            stopped = subprocess.run([*ctl, "stop"], capture_output=True, text=True, timeout=60, env=env)
            assert stopped.returncode == 0, stopped.stderr
            assert proc.wait(30) == 0


def unit_command(unit: str, key: str) -> list[str]:
    text = (ROOT / "systemd" / unit).read_text()
    line, = re.findall(rf"^{key}=(.+)$", text, re.M)
    return shlex.split(line)


def test_the_units_command_lines_run_that_install(venv: Path, tmp_path: Path) -> None:
    """docs/install.md, "As a system service": links in /usr/local/bin to the venv's commands, the example
    configuration in /etc/prefork, the unit's RuntimeDirectory. Here each of those is under tmp_path."""
    bindir = tmp_path / "usr-local-bin"
    bindir.mkdir()
    for command in ("prefork", "preforkctl"):
        (bindir / command).symlink_to(venv / "bin" / command)  # ln -s /opt/prefork/bin/prefork ... /usr/local/bin/
    etc = tmp_path / "etc-prefork"
    etc.mkdir()
    config = (ROOT / "systemd" / "prefork.toml").read_text()
    config, changed = re.subn(r'^bind = \[.*\]$', 'bind = ["127.0.0.1:0"]', config, flags=re.M)
    assert changed == 1
    (etc / "prefork.toml").write_text(config.replace("workers = 4", "workers = 2"))
    (etc / "web.toml").write_text(config.replace("workers = 4", "workers = 2"))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)

    def local(argv: list[str]) -> list[str]:
        assert argv[0].startswith("/usr/local/bin/"), argv
        return [str(bindir / argv[0].rsplit("/", 1)[1]),
                *(a.replace("/etc/prefork/", f"{etc}/").replace("%i", "web") for a in argv[1:])]

    env = clean_env(RUNTIME_DIRECTORY=str(runtime))  # what RuntimeDirectory= gives the service
    for unit, name in (("prefork.service", "prefork"), ("prefork@.service", "web")):
        start, reload = local(unit_command(unit, "ExecStart")), local(unit_command(unit, "ExecReload"))
        ctl = [str(bindir / "preforkctl"), "--name", name]
        with serving(start, tmp_path, env) as proc:
            status = wait_status(ctl, proc, env, tmp_path, 2)
            assert status["name"] == name
            assert exchange(port_of(status), b"through the links") == b"through the links"
            reloaded = subprocess.run(reload, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
            assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
            assert wait_status(ctl, proc, env, tmp_path, 2)["generation"] == 2
            proc.send_signal(signal.SIGTERM)  # KillSignal=SIGTERM
            assert proc.wait(60) == 0
    # and systemd itself accepts the unit pointed at that install (it refuses a missing ExecStart binary)
    unit = tmp_path / "prefork.service"
    unit.write_text((ROOT / "systemd" / "prefork.service").read_text().replace("/usr/local/bin/", f"{bindir}/"))
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_scripts_serve_installs_what_serving_needs_and_serves_the_address_given(tmp_path: Path) -> None:
    """A copy of the checkout (its tracked files), no .venv yet: scripts/serve sets one up for serving only."""
    copy = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, timeout=60, cwd=ROOT, check=True)
    for name in files.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    control = tmp_path / "c.sock"
    env = clean_env(PYTHON=shutil.which("python3") or sys.executable)
    ctl = [str(copy / ".venv" / "bin" / "preforkctl"), "--control", str(control)]
    with serving([str(copy / "scripts" / "serve"), "--bind", f"127.0.0.1:{port}", "--control", str(control),
                  "-w", "1"], tmp_path, env) as proc:
        wait_for(lambda: (copy / ".venv" / "bin" / "preforkctl").exists() or proc.poll() is not None,
                 INSTALL_TIMEOUT, "scripts/serve to install prefork")
        status = wait_status(ctl, proc, env, tmp_path, 1)
        assert status["listeners"] == [f"127.0.0.1:{port}"]  # the address given, and not 127.0.0.1:20000 too
        assert exchange(("127.0.0.1", port), b"served") == b"served"
    installed = run([str(copy / ".venv" / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                    timeout=120, cwd=tmp_path)
    names = {p["name"].lower() for p in json.loads(installed)}
    assert {"prefork", "psutil", "setproctitle"} <= names
    assert not names & {"pytest", "mypy", "ruff", "hypothesis", "matplotlib", "cryptography"}, names
