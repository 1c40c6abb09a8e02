"""Relay loops through other instances: the PROXY header says which prefork relays a connection passed.

The relay refuses an upstream that is one of its own listeners (at start and
on reload), but a loop can run through another instance: A relays to B and B
relays to A, each accepting the other's connections. Every client connection
then opens a new connection at each hop, for ever, until both run out of
threads or descriptors.

So each relay that sends a PROXY header (``--relay-send-proxy``) adds a TLV
to it (:data:`prefork.proxy_protocol.PP2_TYPE_PREFORK_VIA`, in the range the
protocol keeps for applications) listing the relays the connection passed
through, oldest first, each by its daemon's relay id: the ids the incoming
header listed (``client_address.via``, see
:class:`prefork.proxy_protocol.RelayedAddress`), then its own. A worker that
reads a header (``--proxy-protocol``) naming its own daemon, or naming
:data:`MAX_HOPS` relays, closes the connection at once, before any handler
has it: counted in ``stats`` as ``closed.relay_loop`` and said in a
rate-limited line. The chain collapses hop by hop as each relay sees its
upstream close, and the client sees its connection closed.

A daemon's relay id is 8 random bytes its master makes when it starts and
hands to its molds and workers in the environment (:data:`ID_ENV`); an
upgrade in place keeps it (the same master PID), another daemon started from
that environment makes its own.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from prefork.proxy_protocol import PP2_TYPE_PREFORK_VIA, RELAY_ID_LENGTH

ID_ENV = "PREFORK_RELAY_ID"  # "MASTER_PID:HEX": the daemon's relay id, and the master that made it
MAX_HOPS = 8  # a header naming this many relays is cut wherever it arrives (a loop through non-prefork hops)

_fallback: list[bytes] = []  # a relay handler run outside a daemon: an id for this process, made once


def claim_id(environ: MutableMapping[str, str], pid: int) -> bytes:
    """The master, as it starts: this daemon's relay id, kept from ``environ`` when this master (``pid``)
    made it already (an upgrade in place), else made afresh and put there for its molds and workers."""
    owner, _, value = environ.get(ID_ENV, "").partition(":")
    if owner == str(pid) and len(value) == 2 * RELAY_ID_LENGTH:
        return bytes.fromhex(value)
    made = os.urandom(RELAY_ID_LENGTH)
    environ[ID_ENV] = f"{pid}:{made.hex()}"
    return made


def own_id(environ: MutableMapping[str, str] = os.environ) -> bytes:
    """This daemon's relay id (in a process outside a daemon: one of its own, made once)."""
    value = environ.get(ID_ENV, "").partition(":")[2]
    try:
        found = bytes.fromhex(value)
    except ValueError:
        found = b""
    if len(found) == RELAY_ID_LENGTH:
        return found
    if not _fallback:
        _fallback.append(os.urandom(RELAY_ID_LENGTH))
    return _fallback[0]


def via_of(client_address: Any) -> tuple[bytes, ...]:
    """The relays a connection came through, as its PROXY header listed them (``()``: none, or no header)."""
    via = getattr(client_address, "via", ())
    return via if isinstance(via, tuple) else ()


def via_tlv(client_address: Any, own: bytes) -> tuple[int, bytes]:
    """The TLV this relay's header carries: the relays the connection came through, then this one."""
    return PP2_TYPE_PREFORK_VIA, b"".join((*via_of(client_address), own))


def looped(via: tuple[bytes, ...], own: bytes) -> bool:
    """True when a connection that came through the relays ``via`` must be cut here: it came back to this
    daemon, or it has come through :data:`MAX_HOPS` relays (a loop that also runs through other proxies)."""
    return own in via or len(via) >= MAX_HOPS
