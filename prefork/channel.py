"""The worker-to-master channel: typed events on one pipe, encoded and decoded here only.

Every worker holds the write end of one pipe the master reads in its loop.
A message is one line, ``PID EVENT DETAIL\\n``, written with a single
``write`` well under ``PIPE_BUF`` bytes, so lines from many workers never
interleave. Both ends use :func:`encode` and :class:`Decoder`, so an event
cannot be spelled two ways; a line that does not decode (a new event from a
newer worker during an upgrade, say) is skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass

MAX_DETAIL = 3000  # characters of detail kept: a line stays far below PIPE_BUF (4096 bytes) once encoded


class Event(enum.Enum):
    """What a worker tells its master."""

    READY = "ready"  # the handler is loaded and the worker accepts connections
    BOOT_ERROR = "boot_error"  # the handler cannot be loaded (detail: why); the worker exits next
    RETIRING = "retiring"  # leaving of its own accord (detail: why): start its replacement now
    STOPPED = "stopped"  # no longer accepting connections (a reload's reply waits for every old worker's)
    GREW = "grew"  # its own memory passed --max-worker-memory (detail: bytes): the master looks now


@dataclass(frozen=True)
class Message:
    pid: int
    event: Event
    detail: str = ""


def encode(message: Message) -> bytes:
    detail = message.detail.replace("\n", " ")[:MAX_DETAIL]
    return f"{message.pid} {message.event.value} {detail}".rstrip(" ").encode("utf-8", "replace") + b"\n"


def decode_line(line: bytes) -> Message | None:
    """One line (without its newline) as a message; None when it is not one."""
    pid_text, _, rest = line.decode("utf-8", "replace").partition(" ")
    name, _, detail = rest.partition(" ")
    if not pid_text.isdigit():
        return None
    try:
        event = Event(name)
    except ValueError:
        return None
    return Message(int(pid_text), event, detail)


class Decoder:
    """Messages from a byte stream that may split lines anywhere."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[Message]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [m for m in map(decode_line, lines) if m is not None]


class Channel:
    """A worker's end of the pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, event: Event, detail: str = "") -> None:
        with contextlib.suppress(OSError):  # the master is gone: nothing to tell
            os.write(self.fd, encode(Message(os.getpid(), event, detail)))
