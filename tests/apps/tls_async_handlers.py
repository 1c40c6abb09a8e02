"""asyncio handlers for the TLS tests of the ``async`` worker class: what a handler sees of the connection.

Both answer one line, ``version cipher-bits alpn peer-cn client-host`` ("-" for what is absent), from
``get_extra_info`` ("ssl_object", "cipher", "peercert", "peername"), then echo lines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def describe(get_extra_info: Callable[[str], Any]) -> bytes:
    sslobj = get_extra_info("ssl_object")
    cipher = get_extra_info("cipher")
    cert = get_extra_info("peercert") or {}
    cn = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "-")
    fields = [sslobj.version() if sslobj is not None else "-", str(cipher[2]) if cipher else "-",
              (sslobj.selected_alpn_protocol() if sslobj is not None else None) or "-", cn.replace(" ", "_"),
              str(get_extra_info("peername")[0])]
    return (" ".join(fields) + "\n").encode()


async def who(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stream handler: the line about the connection, then a line echo."""
    writer.write(describe(writer.get_extra_info))
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()


class WhoProtocol(asyncio.Protocol):
    """A Protocol handler: the line about the connection, then an echo."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(describe(transport.get_extra_info))

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
