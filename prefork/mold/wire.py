"""What the master and a mold say to each other: one frame (:mod:`prefork.frames`) per datagram of a
SOCK_SEQPACKET pair.

The kernel keeps message boundaries, so a message is one ``send`` and one
``recv``; both ends use :func:`send` and :func:`receive`, so a field cannot
be spelt two ways. The mold speaks first, once: ``ready`` (the handler is
imported; ``threads`` that its import left running) or ``failed`` (``error``:
why, in one line). Then each ``fork`` request from the master (``slot``,
``record_index``, ``max_requests``) gets one answer: ``forked`` with the new
worker's ``pid``, or ``error``. ``close_listeners`` (the daemon stops, drains
for a load balancer, or a reload dropped a listener) has no answer: the mold
closes its copies and forks no more workers.
"""

from __future__ import annotations

import enum
import socket
from typing import Any

from prefork import frames

MAX_MESSAGE = 65536


class Kind(enum.Enum):
    READY = "ready"  # mold -> master: the handler is imported, fork requests are welcome
    FAILED = "failed"  # mold -> master: the handler cannot be loaded (error); the mold exits next
    FORK = "fork"  # master -> mold: fork a worker (slot, record_index, max_requests)
    FORKED = "forked"  # mold -> master: the worker's pid
    ERROR = "error"  # mold -> master: the fork failed (error)
    CLOSE_LISTENERS = "close_listeners"  # master -> mold: close your copies of the listening sockets (no answer)


def pair() -> tuple[socket.socket, socket.socket]:
    """(the master's end, the mold's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def encode(kind: Kind, **fields: Any) -> bytes:
    return frames.encode({"kind": kind.value, **fields})


def decode(data: bytes) -> tuple[Kind, dict[str, Any]] | None:
    """A message as (kind, fields); None when it is not one (an empty datagram is the peer gone)."""
    try:
        message = frames.decode(data, MAX_MESSAGE)
        kind = Kind(message.pop("kind"))
    except (ValueError, KeyError):  # FrameError is a ValueError, so is an unknown kind
        return None
    return kind, message


def send(sock: socket.socket, kind: Kind, **fields: Any) -> None:
    sock.send(encode(kind, **fields))


def receive(sock: socket.socket) -> tuple[Kind, dict[str, Any]] | None:
    """The next message; None when the peer is gone (or sent something that is not one)."""
    data = sock.recv(MAX_MESSAGE)
    if not data:
        return None
    return decode(data)
