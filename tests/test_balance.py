"""``--balance``: workers of a generation hold even shares of the open connections.

The decision is a pure function, tested case by case; then real daemons of
each worker class, 4 workers holding persistent connections, are read
through ``status``: the busiest worker over the mean stays near 1.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from conftest import Daemon, wait_for
from prefork.master.report import WorkerSample, imbalance, open_by_generation, share
from prefork.scoreboard import Scoreboard
from prefork.workers.balance import ACCEPTING, NOT_ACCEPTING, STEPPED_BACK, Balance, Decision, decide, steps_back

# -- the decision ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("own", "siblings", "expected"), [
    (0, [(0, True)], False),  # nothing open anywhere
    (1, [(0, True)], False),  # one over an empty sibling: within the slack
    (2, [(0, True)], True),  # share 1, plus slack 1: at 2 it steps back for the idle sibling
    (2, [(1, True)], False),  # 2 and 1: share 2, under share + slack
    (3, [(1, True)], True),  # 3 and 1: share 2, at share + slack
    (13, [(12, True), (12, True), (12, True)], False),  # 49 over 4: even
    (14, [(12, True), (12, True), (12, True)], True),  # 50 over 4: share 13, 14 is at share + slack
    (14, [(12, False), (12, False), (12, False)], False),  # nobody else accepts: keep accepting
    (14, [(14, True), (14, True), (8, False)], False),  # the one with fewer does not accept, the others hold as many
    (20, [(20, True), (5, True), (20, True)], True),  # one sibling with fewer accepts
    (30, [(40, True), (40, True), (40, True)], False),  # below the mean
    (5, [], False),  # no sibling: nowhere else for a connection to go
    (3, [(-1, True)], True),  # a sibling's counter read mid-update (below 0) counts as 0
])
def test_steps_back(own: int, siblings: list[tuple[int, bool]], expected: bool) -> None:
    assert steps_back(own, siblings) is expected


@pytest.mark.parametrize(("own", "siblings", "expected"), [
    # a burst: the siblings stepped back when the total was small; now under the share, they are woken
    (9, [(3, STEPPED_BACK), (2, STEPPED_BACK), (3, STEPPED_BACK)], Decision(True, (0, 1, 2))),
    (9, [(3, STEPPED_BACK), (2, NOT_ACCEPTING), (9, STEPPED_BACK)], Decision(True, (0,))),
    (9, [(3, STEPPED_BACK), (2, ACCEPTING)], Decision(True, (0,))),
    (9, [(2, NOT_ACCEPTING), (2, ACCEPTING)], Decision(True)),  # one accepts: nobody to wake
    (4, [(3, STEPPED_BACK), (3, STEPPED_BACK)], Decision(False)),  # within its share: nothing to do
    # the stepped-back sibling is over the share itself: it would not accept, so this one keeps on
    (20, [(18, STEPPED_BACK), (0, NOT_ACCEPTING), (0, NOT_ACCEPTING)], Decision(False)),
])
def test_decide_wakes_stepped_back_siblings(own: int, siblings: list[tuple[int, int]], expected: Decision) -> None:
    assert decide(own, siblings) == expected


def test_steps_back_never_leaves_the_generation_without_an_acceptor() -> None:
    """Whatever the counts, the worker holding the fewest never steps back, so someone accepts."""
    for counts in ([5, 5, 5, 5], [0, 9, 9, 9], [3, 40, 2, 7], [100, 0, 0, 0], [1, 2, 3, 4]):
        decisions = [steps_back(own, [(c, True) for j, c in enumerate(counts) if j != i])
                     for i, own in enumerate(counts)]
        assert not decisions[counts.index(min(counts))], counts
        assert not all(decisions), counts


def test_balance_reads_its_generation_from_the_scoreboard() -> None:
    board = Scoreboard(capacity=8)
    mine = board.allocate(101, 2, 0.0)
    siblings = [board.allocate(102 + i, 2, 0.0) for i in range(2)]
    other_generation = board.allocate(200, 1, 0.0)
    board[other_generation].active, board[other_generation].accepting = 0, 1
    board[siblings[0]].active, board[siblings[0]].accepting = 1, 1
    board[siblings[1]].active, board[siblings[1]].accepting = 9, 0
    balance = Balance(board, mine, 2)
    assert sorted(balance.siblings()) == [(1, True), (9, False)]
    assert balance.steps_back(1) is False  # within the slack: the siblings are not even read
    assert balance.steps_back(6) is False  # 16 over 3: share 6, and 6 is within the slack
    assert balance.steps_back(7) is True  # 17 over 3: share 6, and sibling 0 accepts with 1
    board.release(siblings[0])  # gone: no longer a sibling, nor one that accepts
    assert balance.siblings() == [(9, False)]
    assert balance.steps_back(7) is False
    board.allocate(300, 3, 0.0)  # takes the freed record, for another generation
    late = board.allocate(103, 2, 0.0)  # a sibling started after the first look (a respawn), on a new record
    assert late == 4
    board[late].accepting = 1
    assert sorted(balance.siblings()) == [(0, True), (9, False)]
    # the last look (a moment ago, 7 under a limit of 9) is trusted for RECHECK seconds; a fresh look sees it
    assert balance.steps_back(7) is False
    assert Balance(board, mine, 2).steps_back(7) is True


# -- what operators read --------------------------------------------------------------------------


def _sample(generation: int, active: int) -> WorkerSample:
    return WorkerSample(pid=1, slot=0, generation=generation, state="ready", requests=0, active=active, errors=0,
                        proxy_errors=0, bytes_in=0, bytes_out=0, rss_bytes=0, cpu_percent=0.0, age_s=0.0,
                        heartbeat_age_s=0.0)


def test_share_and_imbalance() -> None:
    workers = [_sample(2, 30), _sample(2, 10), _sample(1, 7)]
    totals = open_by_generation(workers)
    assert totals == {2: 40, 1: 7}
    assert [share(w, totals[w.generation]) for w in workers] == [0.75, 0.25, 1.0]
    assert share(_sample(2, 0), 0) == 0.0
    assert imbalance([30, 10]) == 1.5
    assert imbalance([39, 11]) == 1.56
    assert imbalance([0, 0, 0]) == 1.0  # idle is even
    assert imbalance([]) == 1.0
    assert imbalance([0, 0, 0, 200]) == 4.0


# -- real daemons ---------------------------------------------------------------------------------

WORKERS = 4


@contextlib.contextmanager
def held(addr: tuple[str, int], clients: int, payload: bytes, reply: bytes) -> Iterator[list[socket.socket]]:
    """``clients`` connections, all connected first (a burst in the accept queue), then one exchange each."""
    socks: list[socket.socket] = []
    try:
        for _ in range(clients):
            socks.append(socket.create_connection(addr, timeout=10))
        for s in socks:
            s.sendall(payload)
            got = b""
            while len(got) < len(reply):
                chunk = s.recv(len(reply) - len(got))
                assert chunk, "the server closed a connection"
                got += chunk
            assert got == reply
        yield socks
    finally:
        for s in socks:
            s.close()


def actives(d: Daemon, clients: int) -> list[int]:
    """Open connections per worker of the serving generation, once all ``clients`` are counted."""
    def counted() -> list[int] | None:
        st = d.status()
        workers = [w["active"] for w in st["workers"] if w["generation"] == st["generation"]]
        return workers if sum(workers) == clients else None

    result: list[int] = wait_for(counted, 20, f"{clients} open connections in status")
    return result


CASES = [
    pytest.param(("-k", "thread", "--threads", "64"), 200, b"ping\n", b"ping\n", id="thread"),
    pytest.param(("-k", "async"), 200, b"ping\n", b"ping\n", id="async-echo"),
    pytest.param(("-k", "async", "async_handlers:UpperProtocol"), 200, b"ping\n", b"PING\n", id="async-protocol"),
    # sync serves one connection at a time: each worker holds at most one, so every one must hold one
    pytest.param(("-k", "sync"), WORKERS, b"ping\n", b"ping\n", id="sync"),
]


@pytest.mark.parametrize(("args", "clients", "payload", "reply"), CASES)
def test_persistent_clients_spread_evenly(daemon_factory: Callable[..., Daemon], args: tuple[str, ...],
                                          clients: int, payload: bytes, reply: bytes) -> None:
    d = daemon_factory(*args, workers=WORKERS)
    with held(d.address(), clients, payload, reply):
        counts = actives(d, clients)
        st = d.status()
        stats = d.call("stats")
    assert len(counts) == WORKERS
    ratio = max(counts) * WORKERS / clients
    assert ratio <= 1.3, f"max/mean {ratio:.2f} over {counts}"
    assert stats["active_max_mean"] == pytest.approx(ratio, abs=0.001)
    shares = [w["share"] for w in st["workers"] if w["generation"] == st["generation"]]
    assert sum(shares) == pytest.approx(1.0, abs=0.01)
    assert max(shares) == pytest.approx(max(counts) / clients, abs=0.001)


def test_balance_off_serves_every_client(daemon_factory: Callable[..., Daemon]) -> None:
    """The kernel alone decides (the spread may be anything); every client is still served and counted."""
    d = daemon_factory("-k", "async", "--balance", "off", workers=WORKERS)
    with held(d.address(), 200, b"ping\n", b"ping\n"):
        counts = actives(d, 200)
    assert sum(counts) == 200 and len(counts) == WORKERS


def test_imbalance_in_prometheus(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("-k", "thread", workers=2)
    with held(d.address(), 10, b"x", b"x"):
        actives(d, 10)
        text = d.ctl("stats", "--format", "prometheus").stdout
    values: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith(("prefork_connections_imbalance ", "prefork_worker_connections_share{")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert 1.0 <= values["prefork_connections_imbalance"] <= 1.2, text
    shares = [v for k, v in values.items() if k.startswith("prefork_worker_connections_share")]
    assert len(shares) == 2 and sum(shares) == pytest.approx(1.0, abs=0.01)
