"""Relay loops through other instances: the relay id, the via TLV each relay's PROXY header carries, the cut."""

from __future__ import annotations

import pickle

import pytest

from prefork.handlers import relay_core, relay_loops
from prefork.proxy_protocol import PP2_TYPE_PREFORK_VIA, RelayedAddress, build_v2, parse, relayed_via


def test_the_master_keeps_its_id_across_an_upgrade_and_another_daemon_makes_its_own() -> None:
    env: dict[str, str] = {}
    first = relay_loops.claim_id(env, 100)
    assert len(first) == 8 and env[relay_loops.ID_ENV] == f"100:{first.hex()}"
    assert relay_loops.claim_id(env, 100) == first  # the same master, executed again in place
    assert relay_loops.own_id(env) == first  # its molds and workers
    other = relay_loops.claim_id(dict(env), 200)  # a daemon started from that environment
    assert other != first


def test_outside_a_daemon_a_process_has_an_id_of_its_own() -> None:
    assert relay_loops.own_id({}) == relay_loops.own_id({relay_loops.ID_ENV: "1:nothex"})
    assert len(relay_loops.own_id({})) == 8


@pytest.mark.parametrize(("via", "own", "cut"), [
    ((), b"A" * 8, False),
    ((b"B" * 8,), b"A" * 8, False),
    ((b"A" * 8, b"B" * 8), b"A" * 8, True),  # back where it started
    (tuple(bytes([i]) * 8 for i in range(relay_loops.MAX_HOPS - 1)), b"A" * 8, False),
    (tuple(bytes([i]) * 8 for i in range(relay_loops.MAX_HOPS)), b"A" * 8, True),  # too many hops
])
def test_looped(via: tuple[bytes, ...], own: bytes, cut: bool) -> None:
    assert relay_loops.looped(via, own) is cut


def test_each_relay_adds_itself_to_what_the_incoming_header_listed() -> None:
    own = relay_loops.own_id()
    first = parse(relay_core.proxy_header(("192.0.2.1", 4000), ("127.0.0.1", 7000)))
    assert first is not None and first.source == ("192.0.2.1", 4000)
    assert relay_loops.via_of(first.source) == (own,)
    # the next relay announces the same client, and both relays
    second = parse(relay_core.proxy_header(first.source, ("127.0.0.1", 7001)))
    assert second is not None and relay_loops.via_of(second.source) == (own, own)
    assert dict(second.tlvs)[PP2_TYPE_PREFORK_VIA] == own * 2


def test_a_relayed_address_is_a_plain_address_to_everyone_else() -> None:
    address = RelayedAddress(("192.0.2.1", 4000), (b"x" * 8,))
    assert address == ("192.0.2.1", 4000) and hash(address) == hash(("192.0.2.1", 4000))
    assert address[0] == "192.0.2.1" and isinstance(address, tuple)
    copied = pickle.loads(pickle.dumps(address))
    assert copied == address and copied.via == address.via
    assert relay_loops.via_of(("192.0.2.1", 4000)) == ()


@pytest.mark.parametrize("value", [b"", b"short", b"x" * 9])
def test_a_malformed_via_tlv_lists_no_relay(value: bytes) -> None:
    header = parse(build_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=[(PP2_TYPE_PREFORK_VIA, value)]))
    assert header is not None and relayed_via(header.tlvs) == ()
    assert type(header.source) is tuple
