"""Files and paths: log files that cannot be written or reopened, symbolic links planted in shared
directories, configuration files that are too big, too deep or not files at all.

See docs/hardening.md for the list of attacks and what the daemon does about each.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Daemon, child_env, public_directory, read_line, wait_for
from prefork import logs
from prefork.config import MAX_CONFIG_BYTES, ConfigError, build_config, read_config_file
from prefork.control import ControlError, prepare_directory
from prefork.privileges import Identity, PrivilegeError, give

DaemonFactory = Callable[..., Daemon]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to be another user, or to chown)")


def nobody() -> Identity:
    entry = pwd.getpwnam("nobody")
    return Identity("nobody", entry.pw_uid, entry.pw_gid)


def prefork(tmp_path: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m prefork ARGS`` that is expected to exit (refusing to start), bounded."""
    return subprocess.run([sys.executable, "-m", "prefork", "--bind", "127.0.0.1:0", "-w", "1", *args],
                          capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=timeout,
                          start_new_session=True)


def echo(d: Daemon, line: bytes = b"still serving\n") -> bytes:
    with d.connect() as s:
        s.sendall(line)
        return read_line(s)


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    """A directory like /tmp: anyone may make entries in it (mode 1777)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


# -- log files that cannot be written or reopened -------------------------------------------------------------


def deleted_file_text(pid: int, name: str) -> str:
    """What process ``pid`` wrote to the file ``name`` it still has open although it was removed."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(f"/{name} (deleted)"):
                with open(f"/proc/{pid}/fd/{fd}", errors="replace") as f:
                    return f.read()
        except OSError:
            continue
    return ""


@pytest.mark.parametrize("worker_class", ["sync", "thread", "async"])
def test_usr1_with_the_log_directory_removed_keeps_the_old_files(daemon_factory: DaemonFactory, tmp_path: Path,
                                                                 worker_class: str) -> None:
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    d = daemon_factory("-k", worker_class, "--log-file", str(logs_dir / "prefork.log"),
                       "--access-log", str(logs_dir / "access.log"), workers=1)
    before = d.status()
    worker = before["workers"][0]["pid"]
    shutil.rmtree(logs_dir)
    d.signal(signal.SIGUSR1)  # master and worker: the new files cannot be made
    for pid in (d.pid, worker):  # each says so in the file it keeps writing to
        wait_for(lambda pid=pid: "cannot reopen log file" in deleted_file_text(pid, "prefork.log"), 10,
                 f"the warning of pid {pid} in its old log file")
    assert d.ctl("reopen").returncode == 0
    assert echo(d) == b"still serving\n"
    after = d.status()
    assert after["pid"] == before["pid"]
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    logs_dir.mkdir()  # the directory is back: the next reopen makes fresh files and writes there
    d.signal(signal.SIGUSR1)
    wait_for(lambda: (logs_dir / "prefork.log").exists(), 5, "the reopened log file")
    d.signal(signal.SIGTTIN)
    d.wait_serving(2)
    wait_for(lambda: "scaling from 1 to 2" in (logs_dir / "prefork.log").read_text(), 5, "a line in the new log")
    assert echo(d) == b"still serving\n"
    wait_for(lambda: (logs_dir / "access.log").exists() and (logs_dir / "access.log").read_text(), 5,
             "an access-log line in the new file")
    assert d.call("stats")["worker_crashes"] == 0


@pytest.mark.parametrize("worker_class", ["sync", "thread", "async"])
def test_a_full_disk_drops_log_lines_and_counts_them(daemon_factory: DaemonFactory, worker_class: str) -> None:
    """/dev/full: every write fails with ENOSPC, as on a full disk."""
    d = daemon_factory("-k", worker_class, "--log-file", "/dev/full", "--access-log", "/dev/full", workers=1)
    before = d.status()
    for _ in range(3):
        assert echo(d) == b"still serving\n"  # each connection's access-log line fails to be written
    d.signal(signal.SIGUSR1)  # closing the old streams fails too (their buffers cannot be flushed)
    d.signal(signal.SIGTTIN)
    st = d.wait_serving(2)
    assert st["pid"] == before["pid"]
    assert before["workers"][0]["pid"] in [w["pid"] for w in st["workers"]]
    assert echo(d) == b"still serving\n"
    stats = d.call("stats")
    assert stats["log_lines_dropped"] > 0 and stats["worker_crashes"] == 0 and stats["master_errors"] == 0
    output = d.log()  # the daemon's stderr: one line per process about the log file, no tracebacks
    assert "cannot write to log file /dev/full: No space left on device" in output
    assert "Traceback" not in output and "Logging error" not in output


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory user nobody may enter."""
    with public_directory("prefork-hardening-", 0o755) as d:
        yield d


@root_only
def test_logrotate_under_user_keeps_the_old_file_and_says_so(public_dir: Path) -> None:
    logs_dir = public_dir / "logs"  # root's, 0755: after --user, the master cannot make files here
    logs_dir.mkdir()
    log_file = logs_dir / "prefork.log"
    control = public_dir / "run" / "ctl.sock"
    proc = subprocess.Popen([sys.executable, "-m", "prefork", "--bind", "127.0.0.1:0", "-w", "1", "--user", "nobody",
                             "--control", str(control), "--log-file", str(log_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(), cwd=public_dir,
                            start_new_session=True)
    d = Daemon(proc=proc, control=str(control), log_path=log_file, args=[])
    try:
        before = d.wait_serving()
        assert log_file.stat().st_uid == nobody().uid
        rotated = logs_dir / "prefork.log.1"
        log_file.rename(rotated)  # what logrotate does, then it sends USR1
        d.signal(signal.SIGUSR1)
        wait_for(lambda: rotated.read_text().count("cannot reopen log file") >= 2, 10,
                 "the master's and the worker's warnings in the old file")
        lines = [x for x in rotated.read_text().splitlines() if "cannot reopen log file" in x]
        assert all(f"{log_file}: Permission denied; still writing to the file open before" in x for x in lines)
        after = d.status()
        assert after["pid"] == before["pid"]
        assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
        assert not log_file.exists()
    finally:
        d.stop()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


# -- symbolic links planted in shared directories --------------------------------------------------------------


def plant(link: Path, target: Path) -> None:
    """A symbolic link made by someone else (nobody), as an attacker would make it in /tmp."""
    link.symlink_to(target)
    if os.geteuid() == 0:
        os.lchown(link, nobody().uid, nobody().gid)


def test_a_control_directory_planted_as_a_link_in_a_shared_directory_is_refused(tmp_path: Path,
                                                                                 shared_dir: Path) -> None:
    mine = tmp_path / "mine"  # ours, 0700: what a stat() through the link sees, and accepted before
    mine.mkdir(mode=0o700)
    plant(shared_dir / "prefork-x", mine)
    r = prefork(tmp_path, "--control", str(shared_dir / "prefork-x" / "t.sock"))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"prefork: error: control socket directory {shared_dir}/prefork-x is a symbolic link in a directory "
        "others can write to (someone else made it?); remove it or pass --control PATH"]
    assert list(mine.iterdir()) == []


def test_prepare_directory_checks_with_lstat(tmp_path: Path, shared_dir: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    plant(shared_dir / "link", mine)
    with pytest.raises(ControlError, match="is a symbolic link"):
        prepare_directory(str(shared_dir / "link" / "t.sock"))
    prepare_directory(str(shared_dir / "made" / "t.sock"))  # one we make ourselves is fine
    st = os.lstat(shared_dir / "made")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    # outside a shared directory a link is the administrator's, and is followed
    (tmp_path / "admin-link").symlink_to(mine)
    prepare_directory(str(tmp_path / "admin-link" / "t.sock"))


def test_a_log_file_planted_as_a_link_in_a_shared_directory_is_refused(tmp_path: Path, shared_dir: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    plant(shared_dir / "prefork.log", victim)
    r = prefork(tmp_path, "--log-file", str(shared_dir / "prefork.log"), "--control", str(tmp_path / "c.sock"))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"prefork: error: {shared_dir}/prefork.log is a symbolic link in a directory others can write to; "
        "refusing to follow it"]
    assert victim.read_text() == "precious\n"


@root_only
def test_a_log_file_that_is_a_link_is_not_handed_to_user(public_dir: Path) -> None:
    victim = public_dir / "victim"
    victim.write_text("root's\n")
    victim.chmod(0o644)
    logs_dir = public_dir / "logs"
    logs_dir.mkdir()
    (logs_dir / "prefork.log").symlink_to(victim)
    r = prefork(public_dir, "--user", "nobody", "--log-file", str(logs_dir / "prefork.log"),
                "--control", str(public_dir / "run" / "c.sock"))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"prefork: error: refusing to hand {logs_dir}/prefork.log to user nobody: it is a symbolic link "
        "(name the file it points to)"]
    assert victim.stat().st_uid == 0  # before: chowned to nobody through the link


@root_only
def test_give_changes_what_it_opened(tmp_path: Path) -> None:
    who = nobody()
    regular = tmp_path / "file"
    regular.write_text("")
    give(str(regular), who)
    assert regular.stat().st_uid == who.uid
    directory = tmp_path / "dir"
    directory.mkdir()
    give(str(directory), who)
    assert directory.stat().st_uid == who.uid
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        give(str(tmp_path / "sock"), who)
    assert (tmp_path / "sock").lstat().st_uid == who.uid
    os.mkfifo(tmp_path / "fifo")  # neither a file, a socket nor a directory (/dev/null, say): left alone
    give(str(tmp_path / "fifo"), who)
    assert (tmp_path / "fifo").stat().st_uid == 0
    (tmp_path / "link").symlink_to(regular)
    with pytest.raises(PrivilegeError, match="is a symbolic link"):
        give(str(tmp_path / "link"), who)
    with pytest.raises(PrivilegeError, match="No such file"):
        give(str(tmp_path / "missing"), who)


def test_log_opener_refuses_links_only_where_others_can_write(tmp_path: Path, shared_dir: Path) -> None:
    target = tmp_path / "target.log"
    (shared_dir / "a.log").symlink_to(target)
    with pytest.raises(OSError, match="is a symbolic link in a directory others can write to"):
        logs.open_log_file(str(shared_dir / "a.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    (tmp_path / "b.log").symlink_to(target)
    os.close(logs.open_log_file(str(tmp_path / "b.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND))
    assert target.exists()


# -- configuration files ---------------------------------------------------------------------------------------


def one_line_error(path: str) -> str:
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        build_config({}, path)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300, message[:500]
    return message


def test_config_from_dev_zero_is_refused_at_once() -> None:
    assert one_line_error("/dev/zero") == "config file /dev/zero: not a regular file"


def test_config_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    assert one_line_error(str(fifo)) == f"config file {fifo}: not a regular file"


def test_config_over_the_size_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    assert one_line_error(str(big)) == f"config file {big}: larger than 2 MiB; is it the right file?"
    fits = tmp_path / "fits.toml"
    fits.write_text("workers = 2\n# " + "x" * (MAX_CONFIG_BYTES - 20) + "\n")
    assert read_config_file(str(fits)) == {"workers": 2}


@pytest.mark.parametrize(("text", "expected"), [
    ("bind = " + "[" * 500 + "]" * 500 + "\n", "invalid TOML: arrays or tables nested too deeply"),
    ("x = {" * 500 + "}" * 500 + "\n", "invalid TOML: arrays or tables nested too deeply"),
    ("workers = " + "9" * 5000 + "\n", "invalid TOML: ValueError: Exceeds the limit (4300 digits)"),
    ("workers = [\n", "invalid TOML: Cannot declare"),
])
def test_config_parse_failures_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    message = one_line_error(str(path))
    assert message.startswith(f"config file {path}: ")
    if "Cannot" not in expected:
        assert expected in message, message


def test_config_errors_quote_at_most_a_hundred_characters(tmp_path: Path) -> None:
    path = tmp_path / "long.toml"
    path.write_text("bind = [" + ",".join(['"x"'] * 500_000) + "]\n")  # 2 MB: within the size limit
    assert one_line_error(str(path)) == f"config file {path}: bind: 500000 entries, more than the 1024 allowed"
    path.write_text('handler = "' + "x" * 1_000_000 + '"\n')
    message = one_line_error(str(path))
    assert message.startswith("handler: 'xxxx") and "xxx...xxx" in message
    assert message.endswith("must look like module:Class (e.g. myapp.echo:Handler)")
    path.write_text("workers = [" + ", ".join(["[1]"] * 10_000) + "]\n")
    assert one_line_error(str(path)) == (f"config file {path}: workers: expected int, got [[1], [1], [1], [1], "
                                         "[1], [1], ...]")
    path.write_text('bind = ["' + "y" * 100_000 + '"]\n')
    message = one_line_error(str(path))
    assert message.startswith("bind 'yyyy") and "expected HOST:PORT" in message


def test_a_config_error_from_the_command_line_is_one_line(tmp_path: Path) -> None:
    r = prefork(tmp_path, "--config", "/dev/zero")
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["prefork: error: config file /dev/zero: not a regular file"]
    deep = tmp_path / "deep.toml"
    deep.write_text("bind = " + "[" * 500 + "]" * 500 + "\n")
    r = prefork(tmp_path, "--config", str(deep))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"prefork: error: config file {deep}: invalid TOML: arrays or tables nested too deeply"]


def test_a_reload_with_a_config_file_turned_fifo_keeps_serving(daemon_factory: DaemonFactory,
                                                                tmp_path: Path) -> None:
    config = tmp_path / "prefork.toml"
    config.write_text("workers = 1\n")
    d = daemon_factory("--config", str(config), workers=None)
    config.unlink()
    os.mkfifo(config)  # a reader would wait for a writer for ever: the master's loop must not
    r = d.ctl("reload", timeout=20)
    assert r.returncode == 1 and "not a regular file" in r.stderr
    assert d.status()["state"] == "serving"
