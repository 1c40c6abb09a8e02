"""The pure parts of the process model: the master-mold messages and the state handed across an upgrade's exec."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from prefork.master import handover
from prefork.master.handover import HandedMold, HandedWorker, Handover, HandoverError
from prefork.mold import wire
from prefork.mold.wire import Kind


@pytest.mark.parametrize(("kind", "fields"), [
    (Kind.READY, {"threads": 0}),
    (Kind.FAILED, {"error": "cannot load handler 'app:H': SyntaxError: invalid syntax (app.py:3)"}),
    (Kind.FORK, {"slot": 3, "record_index": 17, "max_requests": 1000}),
    (Kind.FORKED, {"pid": 4711}),
    (Kind.ERROR, {"error": "Resource temporarily unavailable"}),
    (Kind.CLOSE_LISTENERS, {}),
])
def test_mold_messages_round_trip(kind: Kind, fields: dict[str, Any]) -> None:
    assert wire.decode(wire.encode(kind, **fields)) == (kind, fields)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"{}", b'{"kind": "nonsense"}', b'{"kind": 3}', b"\xff"])
def test_anything_else_is_no_mold_message(data: bytes) -> None:
    assert wire.decode(data) is None


def test_mold_messages_keep_their_boundaries_on_the_socket_pair() -> None:
    ours, theirs = wire.pair()
    with ours, theirs:
        wire.send(ours, Kind.FORK, slot=1, record_index=2, max_requests=0)
        wire.send(ours, Kind.CLOSE_LISTENERS)
        assert wire.receive(theirs) == (Kind.FORK, {"slot": 1, "record_index": 2, "max_requests": 0})
        assert wire.receive(theirs) == (Kind.CLOSE_LISTENERS, {})
        ours.close()
        assert wire.receive(theirs) is None  # the master closed its end: the mold ends


STATE = Handover(
    listeners=[(5, "127.0.0.1:8000"), (6, "unix:/run/app.sock")], side=[(7, "metrics")], control_fd=8,
    events=(9, 10), scoreboard_fd=11, scoreboard_capacity=4096, generation=3, next_generation=5,
    workers=[HandedWorker(pid=100, slot=0, generation=3, record_index=0, started=12.5, state="ready"),
             HandedWorker(pid=101, slot=1, generation=2, record_index=4, started=2.0, state="draining",
                          stop_reason="replaced by generation 3")],
    molds=[HandedMold(generation=3, pid=99, fd=12, threads=1)],
    totals={"requests": 12345, "reloads": 2, "tls": {"tls_handshakes": 3}}, waiters=[13], began=100.25,
    master_started=1.5)


def test_the_handed_state_round_trips() -> None:
    assert handover.decode(handover.encode(STATE)) == STATE
    assert sorted(STATE.descriptors()) == list(range(5, 14))


@pytest.mark.parametrize("data", [b"", b"{}", b"[1, 2]", b'{"listeners": [[1]]}', b"not json"])
def test_a_malformed_handed_state_is_one_clear_error(data: bytes) -> None:
    with pytest.raises(HandoverError, match="PREFORK_HANDOVER: malformed state"):
        handover.decode(data)


def test_the_state_crosses_through_a_memory_file(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    with a, b:
        state = Handover(listeners=[(a.fileno(), "127.0.0.1:1")], side=[], control_fd=b.fileno(),
                         events=(a.fileno(), b.fileno()), scoreboard_fd=a.fileno(), scoreboard_capacity=1,
                         generation=1, next_generation=2)
        env = handover.prepare(state)
        assert os.get_inheritable(a.fileno()) and os.get_inheritable(b.fileno())
        monkeypatch.setenv(handover.HANDOVER_ENV, env[handover.HANDOVER_ENV])
        assert handover.received() == state
        assert handover.HANDOVER_ENV not in os.environ
        assert not os.get_inheritable(a.fileno()) and not os.get_inheritable(b.fileno())
    monkeypatch.delenv(handover.HANDOVER_ENV, raising=False)
    assert handover.received() is None
