"""--user/--group: bind a low port as root, then master and workers run unprivileged."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_cli import free_port

from conftest import APPS, ROOT, Load, child_env, wait_for
from prefork.control import call

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def free_low_port() -> int:
    for port in range(600, 1024):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below 1024")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory user nobody can read: the handler module and the daemon's working directory."""
    d = Path(tempfile.mkdtemp(prefix="prefork-priv-"))
    d.chmod(0o755)
    shutil.copy(APPS / "ops_handlers.py", d / "ops_handlers.py")
    (d / "ops_handlers.py").chmod(0o644)
    # the daemon imports its own code before switching users; the handler module must be readable
    code = "import os, socketserver; os.setgroups([]); os.setgid(65534); os.setuid(65534); import ops_handlers"
    probe = subprocess.run([sys.executable, "-c", code], env={**child_env(), "PYTHONPATH": str(d)}, cwd=d,
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 0, probe.stderr
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_serving(proc: subprocess.Popen[bytes], control: str, log: Path) -> dict[str, Any]:
    """The status of the daemon ``proc`` once it serves (asked on ``control``); fails at once if it exits."""
    def serving() -> dict[str, Any] | None:
        assert proc.poll() is None, log.read_text()
        try:
            reply, sock = call(control, {"command": "status"})
        except Exception:
            return None
        sock.close()
        return reply if reply.get("state") == "serving" else None

    status: dict[str, Any] = wait_for(serving, 20, "the daemon to serve")
    return status


def test_bind_low_port_then_run_as_nobody(public_dir: Path) -> None:
    port = free_low_port()
    env = child_env()
    env["PYTHONPATH"] = f"{public_dir}{os.pathsep}{ROOT}"
    env.pop("XDG_RUNTIME_DIR", None)
    env.pop("RUNTIME_DIRECTORY", None)
    name = f"priv{os.getpid()}"
    log = open(public_dir / "daemon.log", "wb")  # noqa: SIM115 -- the daemon writes to it until the finally
    proc = subprocess.Popen([sys.executable, "-m", "prefork", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                             "--user", "nobody", "--group", "nogroup", "--name", name, "ops_handlers:WhoAmI"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=public_dir, start_new_session=True)
    control = f"/tmp/prefork-65534/{name}.sock"
    try:
        status = wait_serving(proc, control, public_dir / "daemon.log")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(100) == b"65534 65534\n"  # the worker runs as nobody:nogroup
        master = psutil.Process(proc.pid)
        assert master.uids().real == master.uids().effective == 65534
        assert master.gids().real == 65534
        for w in status["workers"]:
            assert psutil.Process(w["pid"]).uids().effective == 65534
        st = os.stat(control)
        assert st.st_uid == 65534 and stat.S_IMODE(st.st_mode) == 0o600
        # preforkctl as root, with no options but the name, finds it
        r = subprocess.run([sys.executable, "-m", "prefork.ctl", "--name", name, "status", "--json"],
                           env=env, capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert "running as user nobody" in (public_dir / "daemon.log").read_text()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not os.path.exists(control)  # removed by the unprivileged master on the way out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        log.close()


def test_unknown_user_is_a_one_line_error() -> None:
    r = subprocess.run([sys.executable, "-m", "prefork", "--bind", "127.0.0.1:0", "--user", "no-such-user-x"],
                       env=child_env(), capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert r.stderr.strip() == "prefork: error: user: no such user 'no-such-user-x'"



def test_stop_as_nobody_under_connect_load_resets_nothing_and_says_so(public_dir: Path) -> None:
    """An unprivileged master cannot attach the socket filter on every kernel: its stop must lose nothing anyway,
    and its report must count what really happened."""
    report, resets, text = stop_under_connect_load(public_dir, ["--user", "nobody", "--group", "nogroup"], root=True)
    assert resets == [], (resets[:5], report, text[-3000:])
    assert report.get("reset_in_queue") == 0, report
    assert "Operation not permitted" not in text, text  # the helper attached the filter


def stop_under_connect_load(public_dir: Path, options: list[str], *, root: bool
                            ) -> tuple[dict[str, object], list[str], str]:
    """Start the daemon (as root with ``options``, or as nobody), stop it under 100 connecting clients:
    (its stop report, the clients' failures other than a refusal, its log)."""
    port = free_port()
    env = child_env()
    env["PYTHONPATH"] = f"{public_dir}{os.pathsep}{ROOT}"
    (public_dir / "run").mkdir(mode=0o700)
    os.chown(public_dir / "run", 65534, 65534)
    control = str(public_dir / "run" / "d.sock")
    log = open(public_dir / "daemon.log", "wb")  # noqa: SIM115 -- the daemon writes to it until the finally
    as_nobody: dict[str, Any] = {} if root else {"user": 65534, "group": 65534, "extra_groups": []}
    proc = subprocess.Popen([sys.executable, "-m", "prefork", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                             *options, "--control", control],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=public_dir, start_new_session=True,
                            **as_nobody)
    try:
        wait_serving(proc, control, public_dir / "daemon.log")
        with Load(("127.0.0.1", port), clients=100, mode="connect", max_seconds=60) as load:
            load.wait_ok(300, timeout=30)
            r = subprocess.run([sys.executable, "-m", "prefork.ctl", "--control", control, "stop", "--json"],
                               env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)["report"]
        assert proc.wait(20) == 0
        resets = [why for why in load.failures if not why.startswith(("ConnectionRefusedError", "TimeoutError"))]
        return report, resets, (public_dir / "daemon.log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        log.close()
