"""Handlers scripts/bench runs to show what a user's own handler costs (the built-ins take shortcuts)."""

from __future__ import annotations

import asyncio


class Echo(asyncio.Protocol):
    """The echo a user would write: the same as the bare asyncio/uvloop reference server's."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
