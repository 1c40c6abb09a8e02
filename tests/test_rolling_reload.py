"""``--reload-batch N``: a reload replaces N workers at a time, under load, losing nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest

from conftest import Daemon, Load, child_env


@pytest.mark.parametrize(("batch", "peak"), [(2, 6 + 2), (0, 6 + 6)])
def test_reload_under_load_holds_at_most_w_plus_n_workers(daemon_factory: Callable[..., Daemon], batch: int,
                                                          peak: int) -> None:
    d = daemon_factory("-w", "6", "--reload-batch", str(batch), workers=None)
    with Load(d.address(), clients=6, mode="connect", max_seconds=60) as load:
        load.wait_ok(100)
        done = d.ctl("reload", "--json", timeout=60)
        load.wait_ok(100)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["generation"] == 2 and reply["workers"] == 6
    assert reply["peak_workers"] == peak, reply  # the most alive at once: never more than W + N
    assert load.failures == [], load.failures[:5]
    st = d.wait_serving(6)
    assert {w["generation"] for w in d.ready_workers(st)} == {2}
    if batch:
        log = d.log()
        assert "6 thread worker(s) of prefork.handlers.echo:EchoHandler, 2 at a time" in log
        assert "reloading: 2 of 6 new worker(s) serving; 2 old one(s) draining" in log
        assert "reloading: 4 of 6 new worker(s) serving; 2 old one(s) draining" in log


def test_reload_batch_is_checked() -> None:
    bad = subprocess.run([sys.executable, "-m", "prefork", "--check-config", "--reload-batch", "-1"],
                         capture_output=True, text=True, env=child_env(), timeout=20)
    assert bad.returncode == 2
    assert bad.stderr.startswith("prefork: error: reload-batch: -1 is out of range")
    assert bad.stderr.count("\n") == 1
