"""Long-lived connections: stop, reload and drain with clients that stay connected, and what is reported."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tlsutil import Pki

from conftest import Daemon, child_env, process_exists, read_answers, read_line, recv_exact, refused, wait_for

CLASSES = ["sync", "thread", "async"]


def held_connection(d: Daemon) -> socket.socket:
    """A connection that has been served once and then stays silent."""
    s = d.connect()
    s.sendall(b"hi")
    assert recv_exact(s, 2) == b"hi"
    return s


@pytest.mark.parametrize("worker_class", CLASSES)
def test_stop_with_an_idle_connection_raises_no_false_alarm(daemon_factory: Callable[..., Daemon],
                                                            worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--graceful-timeout", "2", workers=1)
    held = held_connection(d)
    d.signal(15)
    assert d.wait_exit(30) == 0
    held.close()
    log = d.log()
    assert "is gone" not in log and "ERROR" not in log, log


@pytest.mark.parametrize("worker_class", CLASSES)
def test_drain_close_raises_no_false_alarm_and_keeps_its_workers(daemon_factory: Callable[..., Daemon],
                                                                 worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, workers=2)
    held = held_connection(d)
    assert d.ctl("drain", "--close", timeout=20).returncode == 0
    wait_for(lambda: refused(d.address()), 10, "new connections to be refused")
    held.sendall(b"still")
    assert recv_exact(held, 5) == b"still"
    st = d.status()
    assert len(st["workers"]) == 2, st
    log = d.log()
    assert "is gone" not in log and "replacement" not in log and "ERROR" not in log, log
    held.close()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_stray_child_of_a_handler_does_not_keep_the_port(daemon_factory: Callable[..., Daemon],
                                                           worker_class: str) -> None:
    handler = "long_lived_handlers:forking" if worker_class == "async" else "long_lived_handlers:ForkingHandler"
    d = daemon_factory("-k", worker_class, handler, workers=1)
    with d.connect() as s:
        child = int(read_line(s))
    try:
        port = d.address()[1]
        d.signal(15)
        assert d.wait_exit(30) == 0
        assert os.kill(child, 0) is None  # still there, in a session of its own
        again = daemon_factory("-k", worker_class, "--bind", f"127.0.0.1:{port}", handler, workers=1,
                               bind_default=False)
        assert f"127.0.0.1:{port}" in again.status()["listeners"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("worker_class", ["sync", "thread"])
def test_shutdown_from_a_handler_retires_its_worker(daemon_factory: Callable[..., Daemon], worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "long_lived_handlers:ShutdownHandler", workers=1)
    before = d.ready_workers()[0]["pid"]
    with d.connect(timeout=10) as s:
        assert read_line(s) == b"shut down\n"
    wait_for(lambda: [w["pid"] for w in d.ready_workers()] not in ([], [before]), 20, "a replacement to serve")
    wait_for(lambda: not process_exists(before), 20, "the worker that was shut down to exit")
    assert "shutdown()" in d.log()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_handler_that_checks_the_drain_closes_at_its_message_boundary(daemon_factory: Callable[..., Daemon],
                                                                        worker_class: str) -> None:
    handler = ("long_lived_handlers:drain_aware_echo" if worker_class == "async"
               else "long_lived_handlers:DrainAwareEcho")
    d = daemon_factory("-k", worker_class, "--graceful-timeout", "60", handler, workers=1)
    s = d.connect(timeout=20)
    s.sendall(b"one\n")
    assert read_line(s) == b"one\n"
    began = time.monotonic()
    d.signal(15)
    assert read_line(s) == b"bye\n"
    assert s.recv(1) == b""  # closed by the handler, at its boundary
    assert d.wait_exit(30) == 0
    assert time.monotonic() - began < 20  # not the graceful timeout
    s.close()
    assert "graceful timeout" not in d.log()


def test_a_handler_exiting_with_status_3_is_not_a_handler_that_cannot_load(daemon_factory: Callable[..., Daemon]
                                                                           ) -> None:
    d = daemon_factory("long_lived_handlers:ExitThreeHandler", workers=1)
    victim = d.ready_workers()[0]["pid"]
    with d.connect() as s:
        assert s.recv(1) == b""
    wait_for(lambda: f"(pid {victim}) exited with status 3" in d.log(), 20, "the exit to be logged")
    d.wait_serving(1)
    assert "could not load" not in d.log()


def test_where_the_filter_cannot_go_on_listen_0_holds_new_connections_back_and_the_count_is_marked_unsure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prefork.listeners import Listener
    from prefork.master import closing
    from prefork.master.timers import Timers

    monkeypatch.setattr(closing, "refuse_new", lambda sock: False)  # as for an unprivileged master on some kernels
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    queued = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(3)]
    timers = Timers()
    ended: list[closing.Closing] = []
    closer = closing.Closer(timers)
    result = closer.close_after_queue([Listener(sock=sock, spec="test")], time.monotonic() + 0.3, ended.append)
    assert result.unguarded == 1 and result.queued_at_start == 3
    late = socket.socket()
    late.settimeout(0.5)
    with pytest.raises(TimeoutError):  # its SYN is dropped: the queue (backlog 0) is full
        late.connect(sock.getsockname())
    for _ in range(100):  # the master's loop: wait for the nearest deadline, run what is due
        due = timers.next_deadline()
        if ended or due is None:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        timers.run_due(time.monotonic())
    assert ended and ended[0].left_at_close == 3  # nobody accepted them
    for s in [*queued, late, sock]:
        s.close()


@pytest.mark.parametrize("option", ["--log-file", "--access-log", "--certfile", "--keyfile", "--ca-certs",
                                    "--keyfile-password-file", "--config"])
@pytest.mark.parametrize("check", [False, True])
def test_a_fifo_given_as_a_file_is_one_line_at_start_not_a_hang(tmp_path: Path, option: str, check: bool) -> None:
    pki = Pki(tmp_path / "pki")
    server = pki.server()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    tls = {"--certfile": str(server.cert), "--keyfile": str(server.key)}
    if option in tls or option in ("--ca-certs", "--keyfile-password-file"):
        tls[option] = str(fifo)
        args = [a for pair in tls.items() for a in pair]
        if option == "--ca-certs":
            args += ["--cert-reqs", "required"]
        if option == "--keyfile-password-file":
            args += [option, str(fifo)]
    else:
        args = [option, str(fifo)]
    argv = [sys.executable, "-m", "prefork", "--bind", "127.0.0.1:0", "--control", str(tmp_path / "c.sock"),
            *args, *(["--check-config"] if check else [])]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=child_env(), cwd=tmp_path)
    assert r.returncode != 0, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(fifo) in lines[0] and "regular file" in lines[0], r.stderr


def test_a_log_file_replaced_by_a_fifo_keeps_the_old_one_at_usr1(daemon_factory: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    log_file = tmp_path / "prefork.log"
    d = daemon_factory("--log-file", str(log_file), workers=1)
    log_file.rename(tmp_path / "rotated.log")
    os.mkfifo(log_file)
    d.signal(signal.SIGUSR1)
    wait_for(lambda: "regular file" in (tmp_path / "rotated.log").read_text(), 10, "the failed reopen to be logged")
    assert d.status()["state"] == "serving"  # the master's loop still turns
    d.signal(signal.SIGTERM)
    assert d.wait_exit(20) == 0


def test_a_key_replaced_by_a_fifo_fails_the_reload_naming_it(daemon_factory: Callable[..., Daemon],
                                                              tmp_path: Path) -> None:
    server = Pki(tmp_path / "pki").server()
    d = daemon_factory("--certfile", str(server.cert), "--keyfile", str(server.key), workers=1)
    server.key.unlink()
    os.mkfifo(server.key)
    r = d.ctl("reload", timeout=30)
    assert r.returncode == 1 and str(server.key) in r.stderr and "regular file" in r.stderr, r.stderr
    assert d.status()["state"] == "serving"


@pytest.mark.parametrize("worker_class", CLASSES)
def test_reload_returns_once_the_new_generation_serves_despite_a_persistent_client(
        daemon_factory: Callable[..., Daemon], worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--graceful-timeout", "30", workers=1)
    held = held_connection(d)
    began = time.monotonic()
    r = d.ctl("reload", timeout=60)
    took = time.monotonic() - began
    assert r.returncode == 0, r.stderr
    assert took < 10, took  # not the old worker's connection, nor the graceful timeout
    held.sendall(b"old")  # the old worker still serves it
    assert recv_exact(held, 3) == b"old"
    held.close()


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_draining_generation_is_in_status_and_its_progress_in_the_log(daemon_factory: Callable[..., Daemon],
                                                                        worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--graceful-timeout", "30", workers=1)
    held = held_connection(d)
    assert d.ctl("reload", timeout=60).returncode == 0
    st = d.status()
    assert st["generation"] == 2
    [old] = st["draining"]
    assert old["generation"] == 1 and old["workers"] == 1 and old["open_connections"] == 1, st["draining"]
    assert 0 < old["cut_in_s"] <= 31
    assert "generation 1 draining: 1 worker(s), 1 open connection(s), cut in" in d.ctl("status").stdout
    wait_for(lambda: "generation 1 draining: 1 worker(s) with 1 open connection(s)" in d.log(), 15,
             "a progress line while the old generation drains")
    held.close()
    wait_for(lambda: not d.status()["draining"], 15, "the old generation to be gone once its client left")


def test_a_stop_waiting_on_a_client_says_so_every_few_seconds(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--graceful-timeout", "30", workers=2)
    held = held_connection(d)
    d.signal(signal.SIGTERM)
    wait_for(lambda: "draining: 1 worker(s) with 1 open connection(s)" in d.log(), 15, "a progress line")
    st = d.status()
    assert st["state"] == "stopping" and sum(g["open_connections"] for g in st["draining"]) == 1, st
    held.close()
    assert d.wait_exit(20) == 0


@pytest.mark.parametrize("worker_class", ["sync", "thread"])
def test_the_stop_report_counts_the_resets_the_clients_saw(daemon_factory: Callable[..., Daemon],
                                                           worker_class: str) -> None:
    """More queued than the graceful timeout lets the workers serve: what the report says was reset is what the
    clients saw reset, and what it says was served is what they got answered."""
    d = daemon_factory("-k", worker_class, "--threads", "2", "--graceful-timeout", "3",
                       "long_lived_handlers:SecondEcho", workers=1)
    clients = []
    for i in range(60):
        s = socket.create_connection(d.address(), timeout=30)
        s.sendall(f"{i}\n".encode())
        clients.append(s)
    wait_for(lambda: sum(w["active"] for w in d.status()["workers"]) >= 1, 10, "a connection in a handler")
    r = d.ctl("stop", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)["report"]
    answered = reset = 0
    for s in clients:
        try:
            got = s.recv(100)
        except ConnectionResetError:
            reset += 1
        else:
            answered += bool(got)
            reset += not got  # closed unanswered: cut at the graceful timeout, not a queue reset
        s.close()
    assert report["reset_in_queue"] is not None and report["queued_at_stop"] >= report["reset_in_queue"] > 0, report
    assert reset == report["reset_in_queue"], (reset, answered, report)
    assert answered == 60 - report["queued_at_stop"] + report["served_from_queue"], (reset, answered, report)


@pytest.mark.parametrize("worker_class", CLASSES)
def test_a_stop_with_idle_clients_queued_behind_drain_aware_handlers_is_quick_and_resets_none(
        daemon_factory: Callable[..., Daemon], worker_class: str) -> None:
    """Every handler slot holds an idle client and more wait (in the kernel's queue, or accepted and waiting for
    their first bytes): the handlers see the drain as the stop begins, so every waiting client is served (answered
    "bye") instead of reset after the timeout. Under that pressure the async class may have reclaimed a silent
    handler's connection before the stop (closed cleanly, counted and logged): that client reads end of file."""
    handler, cap = (("long_lived_handlers:drain_aware_echo", ["--max-connections", "4"]) if worker_class == "async"
                    else ("long_lived_handlers:DrainAwareEcho", []))
    d = daemon_factory("-k", worker_class, "--threads", "4", *cap, "--graceful-timeout", "30", handler, workers=1)
    clients = [socket.create_connection(d.address(), timeout=20) for _ in range(16)]
    wait_for(lambda: sum(w["active"] for w in d.status()["workers"]) >= (1 if worker_class == "sync" else 4), 10,
             "the handler slots taken")
    began = time.monotonic()
    r = d.ctl("stop", "--json", timeout=60)
    took = time.monotonic() - began
    assert r.returncode == 0, r.stderr
    answers = read_answers(clients)
    reclaimed = answers.count(b"")
    assert answers.count(b"bye\n") + reclaimed == 16, answers  # none reset, none cut
    assert not reclaimed or (worker_class == "async" and "reclaimed for a waiting connection" in d.log()), answers
    assert took < 15, took  # not --graceful-timeout for the queue, then again for the handlers
    assert json.loads(r.stdout)["report"]["reset_in_queue"] == 0


def test_a_stop_whose_waiting_client_waits_behind_a_busy_worker_says_so(daemon_factory: Callable[..., Daemon]) -> None:
    """A client that connects while the one sync worker is busy waits in its waiting room (accepted, waiting for
    its first bytes): it is the worker's connection, counted among its open ones, and served once the worker is free."""
    d = daemon_factory("-k", "sync", "--graceful-timeout", "12", workers=1)
    held = held_connection(d)  # the one sync worker is busy with it (the echo handler does not look at the drain)
    queued = socket.create_connection(d.address(), timeout=5)
    wait_for(lambda: d.status()["workers"][0]["active"] == 2, 10, "the waiting client taken into the waiting room")
    d.signal(signal.SIGTERM)
    wait_for(lambda: "draining: 1 worker(s) with 2 open connection(s)" in d.log(), 15, "a progress line")
    held.close()  # the worker is free: the waiting client is served, and the stop ends
    queued.sendall(b"late")
    assert recv_exact(queued, 4) == b"late"
    queued.close()
    assert d.wait_exit(30) == 0
