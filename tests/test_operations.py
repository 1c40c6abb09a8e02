"""Operating the daemon: memory recycling, byte and error counters."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conftest import Daemon, exchange, wait_for


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
