"""Listening sockets that outlive the master: systemd's file-descriptor store.

With ``FileDescriptorStoreMax=`` in the unit, the master hands each
listening socket it bound to systemd (``FDSTORE=1`` with ``FDNAME=``). When
the master dies and ``Restart=`` starts a new one, systemd passes them back
(``$LISTEN_FDS``, their names in ``$LISTEN_FDNAMES``) and the new master
serves on them: the sockets never closed, so no client was refused while no
master ran, and the connections queued meanwhile are served. A name carries
the bind spec it was bound for, so a new master whose ``bind`` changed keeps
what is still wanted, binds what is new and drops the rest from the store.
Outside systemd, or without a store, nothing here does anything.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable

from prefork.config import BindSpec
from prefork.listeners import Listener, adopt_inherited, reuse_or_bind
from prefork.systemd import InheritedSocket, Notifier

log = logging.getLogger(__name__)

PREFIX = "prefork-bind="  # stored names start with this; socket-activation names never do


def fd_name(spec: str) -> str:
    """The store name of the listener bound for ``spec``: ASCII without ':' (the separator of
    ``$LISTEN_FDNAMES``) and control characters, so ``%``, ``:`` and those are %-escaped."""
    out = []
    for ch in spec:
        code = ord(ch)
        out.append(f"%{code:02X}" if ch in "%:" or code < 0x20 or code == 0x7F else ch)
    name = PREFIX + "".join(out)
    return name if name.isascii() and len(name) <= 255 else ""


def spec_of(name: str) -> str | None:
    """The bind spec a stored name was made for; None for a name that is not one of ours."""
    if not name.startswith(PREFIX):
        return None
    text = name[len(PREFIX):]
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "%" and _is_hex(text[i + 1:i + 3]):
            out.append(chr(int(text[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789ABCDEFabcdef" for c in text)


def split(inherited: Iterable[InheritedSocket]) -> tuple[dict[str, socket.socket], list[InheritedSocket]]:
    """(the stored listeners by bind spec, the sockets of socket activation)."""
    stored: dict[str, socket.socket] = {}
    activated: list[InheritedSocket] = []
    for item in inherited:
        spec = spec_of(item.name)
        if spec is None:
            activated.append(item)
        else:
            stored[spec] = item.sock
    return stored, activated


def reconcile(specs: Iterable[BindSpec], stored: dict[str, socket.socket], backlog: int,
              notifier: Notifier) -> list[Listener]:
    """The listeners for ``specs``: stored ones taken back, the others bound now and stored.

    Stored sockets no longer wanted are closed and dropped from the store.
    Raises BindError (having closed what it bound) when an address cannot be bound.
    """
    adopted = {spec: adopt_inherited(sock, spec) for spec, sock in stored.items()}
    listeners, bound = reuse_or_bind(specs, adopted, backlog)
    if stored:
        log.info("taking back %d listening socket(s) from systemd's store: %s", len(listeners) - len(bound),
                 ", ".join(li.address for li in listeners if li not in bound) or "none")
    left = {spec: li.sock for spec, li in adopted.items() if li not in listeners}
    drop(notifier, left)
    keep(notifier, bound)
    return listeners


def drop(notifier: Notifier, stored: dict[str, socket.socket]) -> None:
    """Close stored listeners no longer wanted, and take them out of the store."""
    for spec_text, sock in stored.items():
        log.info("no longer listening on %s (dropped from systemd's store)", spec_text)
        notifier.remove_fd(fd_name(spec_text))
        sock.close()


def keep(notifier: Notifier, listeners: Iterable[Listener]) -> None:
    """Put newly bound listeners in the store (a no-op without systemd)."""
    if not notifier.enabled:
        return
    for listener in listeners:
        name = fd_name(listener.spec)
        if name:
            notifier.store_fd(name, listener.fileno())


def forget(notifier: Notifier, listeners: Iterable[Listener]) -> None:
    """Drop listeners the daemon stopped using from the store."""
    if not notifier.enabled:
        return
    for listener in listeners:
        name = fd_name(listener.spec)
        if name:
            notifier.remove_fd(name)
