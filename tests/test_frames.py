"""prefork's one codec (frames), and the worker channel's messages on it: pure functions, many cases."""

from __future__ import annotations

from typing import Any

import pytest

from prefork import frames
from prefork.channel import MAX_FRAME, Decoder, Event, Message, encode


@pytest.mark.parametrize("message", [{}, {"command": "status"}, {"a": [1, 2, {"b": None}], "é": "ü"}])
def test_a_frame_round_trips(message: dict[str, Any]) -> None:
    data = frames.encode(message)
    assert frames.decode(data, 1 << 20) == message
    assert frames.FrameReader(1 << 20).feed(data) == [message]


def test_a_stream_may_split_frames_anywhere() -> None:
    messages = [{"n": i, "pad": "x" * i} for i in range(20)]
    data = b"".join(map(frames.encode, messages))
    for step in (1, 3, 7, 64):
        reader = frames.FrameReader(1 << 20)
        got = []
        for i in range(0, len(data), step):
            got += reader.feed(data[i:i + step])
        assert got == messages


@pytest.mark.parametrize(("body", "why"), [
    (b"\xff", "not UTF-8 JSON"), (b"[1]", "must be a JSON object"), (b"[" * 100_000, "nested too deeply"),
    (b"1" * 5000, "cannot be decoded"), (b"{", "not UTF-8 JSON"),
])
def test_a_bad_body_is_one_frame_error(body: bytes, why: str) -> None:
    with pytest.raises(frames.FrameError, match=why):
        frames.decode_body(body)


def test_a_bad_frame_in_a_stream_is_skipped_and_an_oversized_one_is_refused() -> None:
    reader = frames.FrameReader(100)
    bad = frames.HEADER.pack(3) + b"[1]"
    assert reader.feed(bad + frames.encode({"ok": 1})) == [{"ok": 1}]
    with pytest.raises(frames.FrameError, match="over the 100-byte limit"):
        reader.feed(frames.HEADER.pack(101))


@pytest.mark.parametrize("data", [b"", b"\0\0", frames.HEADER.pack(5) + b"{}", frames.encode({}) + b"x"])
def test_decode_wants_exactly_one_whole_frame(data: bytes) -> None:
    with pytest.raises(frames.FrameError):
        frames.decode(data, 100)


@pytest.mark.parametrize("detail", ["", "boot failed", "é" * 5000, "\n" * 4000, "x" * 10_000])
def test_a_worker_message_is_one_write_under_pipe_buf(detail: str) -> None:
    data = encode(Message(4711, Event.BOOT_ERROR, detail))
    assert len(data) <= MAX_FRAME < 4096
    (message,) = Decoder().feed(data)
    assert message.pid == 4711 and message.event is Event.BOOT_ERROR and detail.startswith(message.detail)


def test_a_frame_that_is_no_message_is_skipped() -> None:
    unknown = frames.encode({"pid": 1, "event": "from-a-newer-worker", "detail": ""})
    no_pid = frames.encode({"event": "ready"})
    ready = encode(Message(7, Event.READY))
    assert Decoder().feed(unknown + no_pid + ready) == [Message(7, Event.READY)]
