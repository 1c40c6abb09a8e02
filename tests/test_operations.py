"""Operating the daemon: memory recycling, byte and error counters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import Daemon, exchange, recv_exact, wait_for


@pytest.mark.timeout(60)
def test_worker_over_the_memory_limit_is_replaced(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--workers", "1", "--max-worker-memory", "48", "-k", "sync", "ops_handlers:Hog")
    old = d.status()["workers"][0]["pid"]
    with d.connect() as s:
        assert int(s.recv(100)) == old
    wait_for(lambda: [w["pid"] for w in d.status()["workers"] if w["state"] == "ready"] not in ([], [old]),
             20, "the fat worker replaced")
    assert "over --max-worker-memory 48 MiB" in d.log()
    wait_for(lambda: d.call("stats")["memory_recycles"] == 1, 5, "the recycle counted")
    # the replacement is small and stays
    assert d.status()["workers"][0]["rss_bytes"] < 48 * 2**20


def test_relay_counts_bytes(daemon_factory: Callable[..., Daemon]) -> None:
    upstream = daemon_factory(name="up")
    relay = daemon_factory("--relay", f"127.0.0.1:{upstream.port}", "-k", "thread", name="relay")
    payload = b"z" * 100_000
    assert exchange(relay.address(), payload, timeout=20) == payload
    wait_for(lambda: relay.call("stats")["bytes_in"] == len(payload) and
             relay.call("stats")["bytes_out"] == len(payload), 10, "the relayed bytes counted")


@pytest.mark.parametrize("worker_class", ["sync", "thread", "async"])
def test_access_log_has_a_line_per_connection(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                              worker_class: str) -> None:
    d = daemon_factory("-k", worker_class, "--access-log", "access.log")
    ports = []
    for size in (10, 5000):
        with d.connect() as s:
            ports.append(s.getsockname()[1])
            s.sendall(b"a" * size)
            assert recv_exact(s, size) == b"a" * size
    log = tmp_path / "access.log"

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    wait_for(lambda: len(lines()) == 2, 10, "two access-log lines")
    for line, port, size in zip(sorted(lines(), key=lambda x: "in=10 " not in x), ports, (10, 5000), strict=True):
        assert f"127.0.0.1:{port} " in line, line
        assert f" in={size} out={size} ok" in line, line  # the kernel's counts, read before the socket closes
    assert "access.log" not in d.log()  # access lines stay out of the daemon log
    assert not any("127.0.0.1:" in x and " in=" in x for x in d.log().splitlines())


@pytest.mark.parametrize(
    ("worker_class", "handler"),
    [
        ("sync", "prefork.handlers.echo:EchoHandler"),
        ("thread", "prefork.handlers.echo:EchoHandler"),
        ("async", "prefork.handlers.echo:EchoHandler"),  # the built-in echo: the async worker's echo engine
        ("async", "async_handlers:UpperProtocol"),  # a user's Protocol: the kernel's counts at connection_lost
        ("async", "async_handlers:upper_stream"),  # a user's stream handler
    ],
)
def test_bytes_counted_per_worker_when_exported(daemon_factory: Callable[..., Daemon], worker_class: str,
                                                handler: str) -> None:
    import socket as socketlib

    probe = socketlib.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    d = daemon_factory("-k", worker_class, "--metrics-bind", f"127.0.0.1:{port}", "--workers", "1", handler)
    for size in (100, 30_000):
        payload = b"b" * size
        assert exchange(d.address(), payload) == (payload.upper() if "upper" in handler.lower() else payload)
    wait_for(lambda: (d.call("stats")["bytes_in"], d.call("stats")["bytes_out"]) == (30_100, 30_100), 10,
             "bytes in and out counted")
    worker = d.status()["workers"][0]
    assert (worker["bytes_in"], worker["bytes_out"]) == (30_100, 30_100)


def test_journald_lines_carry_no_second_timestamp(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    import os
    import re

    from conftest import child_env

    log = tmp_path / "journal.log"  # stands in for the journal stream: the daemon's stderr is this file
    log.touch()
    st = os.stat(log)
    d = daemon_factory(name="journal", env=child_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    assert d.log_path == log
    lines = [line for line in d.log().splitlines() if "prefork.master" in line]
    assert lines and all(line.startswith("[") for line in lines), lines[:3]
    assert not any(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines)
    other = daemon_factory(name="plain")  # without it, lines start with a timestamp
    assert re.match(r"\d{4}-\d\d-\d\d ", other.log().splitlines()[0])
