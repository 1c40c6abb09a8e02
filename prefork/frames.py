"""The one codec prefork processes talk with: a frame is a 4-byte big-endian length, then a JSON object.

Every conversation between prefork processes uses it:

* the control socket: ``preforkctl`` and the master (:mod:`prefork.control`);
* the worker channel: each worker to its master, one frame per ``write``,
  kept under ``PIPE_BUF`` so frames from many workers never interleave
  (:mod:`prefork.channel`);
* a mold's socket: the master and a generation's mold (:mod:`prefork.mold.wire`);
* the state a master hands its next image across an upgrade's exec
  (:mod:`prefork.master.handover`).

(The pipe through which an older prefork hands its sockets to this one, in
:mod:`prefork.upgrade`, keeps that version's format: it is the older
version that writes it.)
"""

from __future__ import annotations

import json
import struct
from typing import Any

HEADER = struct.Struct(">I")


class FrameError(ValueError):
    """A frame is malformed; the message says how."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """One frame's JSON object; any failure to decode it, whatever its type, is a FrameError.

    A frame may come from a client and hold anything that fits in it: bad
    UTF-8, brackets nested deeper than the parser recurses, an integer
    longer than CPython converts (``ValueError``), a lone surrogate. None of
    it may escape as anything but a FrameError.
    """
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"request is not UTF-8 JSON: {exc}") from None
    except RecursionError:  # a legal-size frame of nested brackets
        raise FrameError("request is nested too deeply") from None
    except Exception as exc:  # e.g. ValueError: an integer of more digits than int() converts
        raise FrameError(f"request cannot be decoded: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise FrameError("request must be a JSON object")
    return message


def frame_length(buf: bytes | bytearray, limit: int) -> int | None:
    """The body length announced by ``buf``'s header, None if the header is incomplete."""
    if len(buf) < HEADER.size:
        return None
    length: int = HEADER.unpack_from(buf)[0]
    if length > limit:
        raise FrameError(f"frame of {length} bytes is over the {limit}-byte limit")
    return length


def decode(data: bytes, limit: int) -> dict[str, Any]:
    """The one frame ``data`` holds, whole (a datagram, a file); raises FrameError."""
    length = frame_length(data, limit)
    if length is None or len(data) != HEADER.size + length:
        raise FrameError(f"expected one whole frame, got {len(data)} bytes")
    return decode_body(data[HEADER.size:])


class FrameReader:
    """Frames from a byte stream that may split them anywhere (a pipe, a stream socket)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The frames ``data`` completes; raises FrameError on one announced over the limit (the stream is lost)."""
        self._buf += data
        out = []
        while (length := frame_length(self._buf, self.limit)) is not None and len(self._buf) >= HEADER.size + length:
            body = bytes(self._buf[HEADER.size:HEADER.size + length])
            del self._buf[:HEADER.size + length]
            try:
                out.append(decode_body(body))
            except FrameError:
                continue  # one bad frame: the next starts right after it
        return out
