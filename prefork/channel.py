"""The worker-to-master channel: typed events on one pipe, encoded and decoded here only.

Every worker holds the write end of one pipe the master reads in its loop.
A message is one frame of prefork's codec (:mod:`prefork.frames`),
``{"pid": PID, "event": EVENT, "detail": DETAIL}``, written with a single
``write`` well under ``PIPE_BUF`` bytes, so frames from many workers never
interleave. Both ends use :func:`encode` and :class:`Decoder`, so an event
cannot be spelled two ways; a frame that does not decode (a new event from a
newer worker, say) is skipped, never fatal.
"""

from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass
from typing import Any

from prefork import frames

MAX_DETAIL = 3000  # characters of detail kept
MAX_FRAME = 4000  # bytes of a frame at most: below PIPE_BUF (4096), so a write is never split


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
    detail = message.detail[:MAX_DETAIL]
    data = frames.encode({"pid": message.pid, "event": message.event.value, "detail": detail})
    while len(data) > MAX_FRAME:  # escapes made it longer: cut the detail further, never the frame
        detail = detail[:len(detail) // 2]
        data = frames.encode({"pid": message.pid, "event": message.event.value, "detail": detail})
    return data


def decode(fields: dict[str, Any]) -> Message | None:
    """One frame's fields as a message; None when they are not one."""
    pid, name, detail = fields.get("pid"), fields.get("event"), fields.get("detail", "")
    if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(detail, str):
        return None
    try:
        event = Event(name)
    except ValueError:
        return None
    return Message(pid, event, detail)


class Decoder:
    """Messages from a byte stream that may split frames anywhere."""

    def __init__(self) -> None:
        self._frames = frames.FrameReader(MAX_FRAME)

    def feed(self, data: bytes) -> list[Message]:
        try:
            found = self._frames.feed(data)
        except frames.FrameError:  # not our frames at all: start again on what comes next
            self._frames = frames.FrameReader(MAX_FRAME)
            return []
        return [m for m in map(decode, found) if m is not None]


class Channel:
    """A worker's end of the pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, event: Event, detail: str = "") -> None:
        with contextlib.suppress(OSError):  # the master is gone: nothing to tell
            os.write(self.fd, encode(Message(os.getpid(), event, detail)))
