"""The relay as a load balancer, its pure decisions by table: health, backoff, the choice of upstream.

:mod:`prefork.handlers.relay_core` decides; :mod:`prefork.handlers.upstreams`
keeps what it decides on in shared memory. Both relay forms call the same
functions (the end of tests/test_relay_core.py checks they do); these tables
are the policy, as ``master/exits.py``'s ``classify_exit`` table is the
master's.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

from prefork.config import ConfigError, UpstreamSpec, check_bytes, parse_upstream
from prefork.handlers import relay_core
from prefork.handlers.relay_core import DOWN, HALF_OPEN, PROBE, SKIP, UP, USE, Health, Turns, choose
from prefork.handlers.upstreams import SLOTS, Balanced, UpstreamBoard

# -- --relay HOST:PORT[,options] ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "spec"), [
    ("10.0.0.1:7000", UpstreamSpec("10.0.0.1", 7000)),
    ("db:7000,weight=3", UpstreamSpec("db", 7000, weight=3)),
    ("db:7000,backup", UpstreamSpec("db", 7000, backup=True)),
    ("db:7000,maxconn=100,weight=2,backup", UpstreamSpec("db", 7000, weight=2, backup=True, maxconn=100)),
    ("[::1]:7000, weight=256", UpstreamSpec("::1", 7000, weight=256)),
    ("db:7000,maxconn=0", UpstreamSpec("db", 7000)),
])
def test_an_upstream_with_its_options(text: str, spec: UpstreamSpec) -> None:
    assert parse_upstream(text) == spec


@pytest.mark.parametrize(("text", "message"), [
    ("db:7000,weight=0", "weight must be 1-256, not 0"),
    ("db:7000,weight=257", "weight must be 1-256"),
    ("db:7000,weight=-1", "unknown option 'weight=-1'"),
    ("db:7000,weight", "unknown option 'weight'"),
    ("db:7000,backup=1", "unknown option 'backup=1'"),
    ("db:7000,slow", "unknown option 'slow' (expected weight=N, backup or maxconn=N)"),
    ("db:7000,maxconn=x", "unknown option 'maxconn=x'"),
    ("db:7000,weight=99999999999999999999", "weight must be 1-256, not 99999999999999999999"),
    ("db:7000,maxconn=1000001", "maxconn must be 0 (no cap) to 1000000"),
    ("d\x00b:7000", "is not a host name or address"),
    ("d b:7000", "is not a host name or address"),
    ("db:0", "must be an upstream HOST:PORT"),
    ("unix:/x,weight=2", "must be an upstream HOST:PORT"),
])
def test_a_bad_upstream_option_is_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^relay: ") as raised:
        parse_upstream(text)
    assert message in str(raised.value)


def test_names_are_how_status_shows_them() -> None:
    assert parse_upstream("[::1]:7000,backup").name == "[::1]:7000"
    assert parse_upstream("db.example:7000,weight=2").name == "db.example:7000"


# -- health ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "seconds"), [
    (0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (100, 30.0),
])
def test_backoff_grows_while_it_keeps_failing(failures: int, seconds: float) -> None:
    assert relay_core.backoff(failures) == seconds


@pytest.mark.parametrize(("state", "retry_at", "now", "admitted"), [
    (UP, 0.0, 5.0, USE),
    (UP, 99.0, 5.0, USE),  # up is up, whatever an old retry time says
    (DOWN, 10.0, 5.0, SKIP),  # backing off: nobody tries it
    (DOWN, 10.0, 10.0, PROBE),  # its time came: one connection tries it
    (DOWN, 10.0, 12.0, PROBE),
    (HALF_OPEN, 10.0, 5.0, SKIP),  # someone is trying it
    (HALF_OPEN, 10.0, 11.0, PROBE),  # ... and outlived the try's deadline (died trying): claim it again
])
def test_admission(state: int, retry_at: float, now: float, admitted: str) -> None:
    assert relay_core.admission(state, retry_at, now) == admitted


@pytest.mark.parametrize(("before", "now", "after", "changed"), [
    (Health(), 100.0, Health(DOWN, 1, 101.0), "down"),
    (Health(HALF_OPEN, 1, 105.0), 100.0, Health(DOWN, 2, 102.0), None),  # the half-open try failed: still down
    (Health(HALF_OPEN, 3, 105.0), 100.0, Health(DOWN, 4, 108.0), None),
    (Health(DOWN, 6, 90.0), 100.0, Health(DOWN, 7, 130.0), None),  # capped
])
def test_a_failure_marks_it_down_for_longer_each_time(before: Health, now: float, after: Health,
                                                      changed: str | None) -> None:
    assert relay_core.after_failure(before, now) == after
    assert relay_core.change(before.state, after.state) == changed


@pytest.mark.parametrize(("before", "changed"), [
    (Health(), None),
    (Health(UP, 0, 0.0), None),
    (Health(HALF_OPEN, 2, 105.0), "up"),  # the half-open try worked
    (Health(DOWN, 5, 105.0), "up"),  # a check (or a connection chosen before it went down) worked
])
def test_a_success_brings_it_back(before: Health, changed: str | None) -> None:
    assert relay_core.after_success(before) == Health(UP, 0, 0.0)
    assert relay_core.change(before.state, UP) == changed


def test_a_claim_is_the_one_half_open_try() -> None:
    claimed = relay_core.claimed(Health(DOWN, 2, 10.0), now=12.0, deadline=18.0)
    assert claimed == Health(HALF_OPEN, 2, 18.0)
    assert relay_core.admission(claimed.state, claimed.retry_at, 13.0) == SKIP


@pytest.mark.parametrize(("exc", "stage", "kind"), [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "", "refused"),
    (TimeoutError(), "", "timeout"),  # socket.create_connection's, asyncio.timeout's
    (TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)), "", "timeout"),  # the kernel's SYN retries
    (ssl.SSLCertVerificationError(1, "certificate verify failed"), "TLS handshake", "tls"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), "TLS handshake", "tls"),  # reset mid-handshake
    (TimeoutError(), "TLS handshake", "timeout"),  # the handshake ran out of time
    (OSError(errno.EHOSTUNREACH, "unreachable"), "", "other"),
    (ConnectionResetError(errno.ECONNRESET, "reset"), "PROXY header", "other"),
])
def test_failures_by_reason(exc: BaseException, stage: str, kind: str) -> None:
    assert relay_core.failure_kind(exc, stage) == kind
    assert kind in relay_core.FAILURE_KINDS


@pytest.mark.parametrize(("weight", "up_for", "slow_start", "effective"), [
    (4, None, 10.0, 4.0),  # never went down
    (4, 5.0, 0.0, 4.0),  # no slow start
    (4, 5.0, 10.0, 2.0),  # half-way
    (4, 0.0, 10.0, 0.4),  # just back: a tenth, not nothing
    (4, 12.0, 10.0, 4.0),  # done
])
def test_slow_start(weight: int, up_for: float | None, slow_start: float, effective: float) -> None:
    assert relay_core.effective_weight(weight, up_for, slow_start) == pytest.approx(effective)


# -- the choice ----------------------------------------------------------------------------------------------


def pick(admissions: str, *, weights: Any = None, backups: str = "", actives: Any = None, maxconns: Any = None,
         balance: str = "leastconn", turns: Turns | None = None) -> relay_core.Choice:
    """``admissions`` one letter per upstream: u(se), p(robe), s(kip); ``backups`` "b" marks one."""
    letters = {"u": USE, "p": PROBE, "s": SKIP}
    n = len(admissions)
    return choose([letters[a] for a in admissions], weights or [1.0] * n,
                  [c == "b" for c in backups.ljust(n)], actives or [0] * n, maxconns or [0] * n,
                  turns or Turns(), balance)


@pytest.mark.parametrize(("case", "kwargs", "order", "probe", "full"), [
    ("all up and idle: the first in turn, the rest as failover", {"admissions": "uuu"}, (0, 1, 2), None, ()),
    ("least connections first", {"admissions": "uuu", "actives": [5, 1, 3]}, (1, 2, 0), None, ()),
    ("for their weight", {"admissions": "uu", "actives": [4, 2], "weights": [4.0, 1.0]}, (0, 1), None, ()),
    ("a connection still closing on the heavy one: they still take turns by weight",
     {"admissions": "uu", "actives": [1, 0], "weights": [3.0, 1.0]}, (0, 1), None, ()),
    ("one a connection ahead at weight 1 waits for the other to catch up",
     {"admissions": "uu", "actives": [1, 0]}, (1, 0), None, ()),
    ("a down one is not tried", {"admissions": "su"}, (1,), None, ()),
    ("a due one is tried apart from the connection, once", {"admissions": "upp"}, (0,), 1, ()),
    ("nothing but one due: the connection tries it itself", {"admissions": "ps"}, (0,), 0, ()),
    ("at its cap: left out and counted", {"admissions": "uu", "actives": [0, 3], "maxconns": [0, 3]},
     (0,), None, (1,)),
    ("backups wait while a primary is up", {"admissions": "uuu", "backups": "  b"}, (0, 1, 2), None, ()),
    ("the backup steps in when every primary is down",
     {"admissions": "ssu", "backups": "  b"}, (2,), None, ()),
    ("... or full", {"admissions": "uu", "backups": " b", "actives": [2, 0], "maxconns": [2, 0]},
     (1,), None, (0,)),
    ("a primary due for its try is tried apart while the backup serves",
     {"admissions": "spu", "backups": "  b"}, (2,), 1, ()),
    ("a backup due for its try, with every primary down",
     {"admissions": "sp", "backups": " b"}, (1,), 1, ()),
    ("a backup due while a primary is up waits", {"admissions": "up", "backups": " b"}, (0,), None, ()),
    ("nothing usable: nothing tried (the client is closed at once)", {"admissions": "ss"}, (), None, ()),
    ("no upstreams at all", {"admissions": ""}, (), None, ()),
    ("round robin ignores connections", {"admissions": "uu", "actives": [9, 0], "balance": "roundrobin"},
     (0, 1), None, ()),
])
def test_choose(case: str, kwargs: dict[str, Any], order: tuple[int, ...], probe: int | None,
                full: tuple[int, ...]) -> None:
    admissions = kwargs.pop("admissions")
    choice = pick(admissions, **kwargs)
    assert (choice.order, choice.probe, choice.full) == (order, probe, full), case
    # the half-open try is made apart whenever the connection has something else to use
    assert choice.background == (probe is not None and probe not in order), case


@pytest.mark.parametrize("balance", ["leastconn", "roundrobin"])
def test_weights_share_idle_upstreams_by_turns(balance: str) -> None:
    turns = Turns()
    firsts = Counter(pick("uu", weights=[3.0, 1.0], balance=balance, turns=turns).order[0] for _ in range(400))
    assert firsts == {0: 300, 1: 100}
    # smooth: the light one's picks are spread out, not bunched
    sequence = [pick("uu", weights=[3.0, 1.0], balance=balance, turns=turns).order[0] for _ in range(8)]
    assert sequence.count(1) == 2 and sequence[:4].count(1) == 1


def test_least_connections_balance_to_the_weights() -> None:
    """Connections held open settle at the weights' ratio: each goes where active/weight is lowest."""
    actives = [0, 0]
    turns = Turns()
    for _ in range(40):
        first = pick("uu", weights=[3.0, 1.0], actives=actives, turns=turns).order[0]
        actives[first] += 1
    assert actives == [30, 10]


# -- the shared board ----------------------------------------------------------------------------------------


def test_the_board_keeps_an_upstream_by_name_across_reloads() -> None:
    board = UpstreamBoard(4)
    a, b, c = (parse_upstream(t) for t in ("a:1", "b:1,weight=2", "c:1,backup"))
    board.assign([a, b])
    slot_a, slot_b = board.find("a:1"), board.find("b:1")
    assert slot_a is not None and slot_b is not None
    board.active[1 * SLOTS + slot_b] = 2  # worker 1 holds two connections to b
    board.assign([a, c])  # b removed, c added: a keeps its slot, b's is not reused while held
    assert board.find("a:1") == slot_a and board.find("c:1") not in (slot_a, slot_b)
    described = {u["name"]: u for u in board.describe(0.0, 0.0)}
    assert set(described) == {"a:1", "c:1"} and described["c:1"]["backup"] is True
    assert board.open_connections(slot_b) == 2
    board.retire(1)  # worker 1 is gone: its connections with it
    assert board.open_connections(slot_b) == 0


def test_a_gone_workers_counters_stay_in_the_totals() -> None:
    board = UpstreamBoard(2)
    board.assign([parse_upstream("a:1")])
    slot = board.find("a:1")
    assert slot is not None
    from prefork.handlers.upstreams import CONNECTIONS, N_COUNTERS
    board.counters[(1 * SLOTS + slot) * N_COUNTERS + CONNECTIONS] = 7
    board.counters[(0 * SLOTS + slot) * N_COUNTERS + CONNECTIONS] = 2
    assert board.totals(slot)["connections"] == 9
    board.retire(1)
    assert board.totals(slot)["connections"] == 9
    assert board.counters[(1 * SLOTS + slot) * N_COUNTERS + CONNECTIONS] == 0


def test_the_board_is_full_at_its_slots() -> None:
    board = UpstreamBoard(1)
    listed = [UpstreamSpec(f"h{i}", 1) for i in range(SLOTS)]
    board.assign(listed)
    with pytest.raises(IndexError, match="no free slot"):
        board.assign([*listed, UpstreamSpec("other", 1)])
    board.assign([UpstreamSpec("other", 1)])  # the others unlisted and idle: a slot is reused
    assert board.find("other:1") is not None


@pytest.mark.parametrize(("text", "raw"), [
    ("PING", b"PING"),
    (r"PING\r\n", b"PING\r\n"),
    (r"a\tb\\c", b"a\tb\\c"),
    (r"\x00\xff", b"\x00\xff"),
    ("é", "é".encode()),
])
def test_check_send_and_expect_escapes(text: str, raw: bytes) -> None:
    assert check_bytes(text) == raw


@pytest.mark.parametrize("text", [r"\q", "\\", r"\x4", r"\xzz"])
def test_unknown_escapes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unknown escape"):
        check_bytes(text)


# -- the balancer over a board (this process's own) ----------------------------------------------------------


def balanced(*upstreams: str, **settings: Any) -> Any:
    specs = tuple(parse_upstream(u) for u in upstreams)
    return type("Relay", (Balanced,), {"upstreams": tuple((s.host, s.port) for s in specs), "upstream_specs": specs,
                                       **settings}).balancer


def test_an_upstream_that_came_back_slow_starts() -> None:
    balancer = balanced("a:1", "b:1", balance="roundrobin", slow_start=100.0)
    balancer._entries[0].up_at = time.monotonic() - 10  # back 10 s ago: a tenth of its weight
    firsts = Counter(balancer.candidates()[0] for _ in range(220))
    assert firsts[("a", 1)] == 20 and firsts[("b", 1)] == 200
    balancer._entries[0].up_at = time.monotonic() - 100  # slow start over
    firsts = Counter(balancer.candidates()[0] for _ in range(200))
    assert abs(firsts[("a", 1)] - 100) <= 2


def test_a_failure_then_a_success_as_every_worker_sees_it(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prefork.handlers.upstreams")
    balancer = balanced("a:1", "b:1")
    i = balancer.attempt(("a", 1))
    balancer.failed(i, ConnectionRefusedError(errno.ECONNREFUSED, "refused"), failover=True)
    assert balancer.board.health(balancer.slots[0]).state == DOWN
    assert [balancer.candidates() for _ in range(3)] == [[("b", 1)]] * 3  # nobody tries it while it is down
    described = {u["name"]: u for u in balancer.board.describe(time.monotonic(), time.time())}
    assert described["a:1"]["failed"]["refused"] == 1 and described["a:1"]["failovers"] == 1
    assert described["a:1"]["active"] == 0 and 0 < described["a:1"]["retry_in_s"] <= 1
    i = balancer.attempt(("a", 1))  # a connection chosen before it went down gets through
    balancer.connected(i)
    assert balancer.board.health(balancer.slots[0]) == Health()
    assert described["a:1"]["state_changes"] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "prefork.handlers.upstreams"]
    assert lines == ["upstream a:1 is down: a:1 (connection refused); tried again in 1s",
                     "upstream a:1 is up again (a connection worked after 1 failure)"]


def test_a_generation_resolves_its_upstreams_once(caplog: pytest.LogCaptureFixture) -> None:
    """In a worker (a board given) names are resolved when the relay is configured: a reload resolves again."""
    specs = (parse_upstream("localhost:7000"), parse_upstream("no-such-host.invalid:7000"))
    board = UpstreamBoard(2)
    board.assign(specs)
    relay = type("Relay", (Balanced,), {"upstreams": (("localhost", 7000), ("no-such-host.invalid", 7000)),
                                        "upstream_specs": specs, "upstream_board": board, "worker_index": 1})
    assert ("127.0.0.1", 7000) in relay.balancer.addresses_for(("localhost", 7000))
    # a name that does not resolve now is resolved by each attempt instead, as without a board
    assert relay.balancer.addresses_for(("no-such-host.invalid", 7000)) == [("no-such-host.invalid", 7000)]
    assert "cannot resolve upstream no-such-host.invalid:7000 now" in caplog.text
    assert balanced("localhost:7000").addresses_for(("localhost", 7000)) == [("localhost", 7000)]


def test_a_thread_workers_threads_lose_no_count() -> None:
    """A thread worker's threads share its cells: every open is closed and every connection counted."""
    balancer = balanced("a:1", "b:1")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, mid read-add-store if it can happen

    def connections() -> None:
        for _ in range(3000):
            i = balancer.attempt(balancer.candidates()[0])
            balancer.connected(i)
            balancer.finished(i)

    try:
        threads = [threading.Thread(target=connections) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(interval)
    described = balancer.board.describe(time.monotonic(), time.time())
    assert [u["active"] for u in described] == [0, 0]
    assert sum(u["connections"] for u in described) == 24000
    assert min(u["connections"] for u in described) >= 6000  # and the choices spread over both
