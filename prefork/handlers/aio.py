"""Built-in handlers for the ``async`` worker class: echo and relay as asyncio protocols.

The daemon picks these automatically under ``--worker-class async`` when the
handler is the built-in echo or when ``--relay`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from typing import Any, ClassVar

from prefork.proxy_protocol import build_v2
from prefork.worker import tcp_bytes, tcp_last_data_recv_ms

log = logging.getLogger(__name__)


class EchoProtocol(asyncio.Protocol):
    """Every byte a client sends comes back: one ``write`` per ``data_received``.

    ``data_received`` becomes the transport's own ``write`` once the connection
    is made, and the protocol is set again so a transport that caches the bound
    method (uvloop does) picks it up: no Python frame runs per echo.
    """

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.data_received = self.transport.write  # type: ignore[method-assign]
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _UpstreamSide(asyncio.Protocol):
    """The relay's connection to the upstream: hands everything to its client side."""

    def __init__(self, relay: RelayProtocol) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.relay.client.write(data)  # replaced by client.write itself once both sides are up

    def eof_received(self) -> bool:
        self.relay.half_close(from_client=False)
        return True  # keep our side open: the client may still be sending

    def pause_writing(self) -> None:
        self.relay.client.pause_reading()  # the upstream is slow: stop reading the client

    def resume_writing(self) -> None:
        self.relay.client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_lost(exc)


class RelayProtocol(asyncio.Protocol):
    """Forward each client connection to an upstream, bytes both ways, half-close propagated.

    Configure by subclassing (the daemon does it for ``--relay``): ``upstreams``,
    ``connect_timeout``, ``idle_timeout`` (None: never), ``send_proxy``. Override
    :meth:`upstream_candidates` to choose the upstream per connection. Flow
    control keeps memory flat: when one side's transport buffers past its high
    water mark, reading from the other side pauses.
    """

    upstreams: ClassVar[tuple[tuple[str, int], ...]] = ()
    connect_timeout: ClassVar[float] = 5.0
    idle_timeout: ClassVar[float | None] = 300.0
    send_proxy: ClassVar[bool] = False
    record: ClassVar[Any] = None  # the worker's scoreboard record, set by the async worker
    _rotation: ClassVar[itertools.count[int]] = itertools.count()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._rotation = itertools.count()  # each configured relay rotates over its own upstreams

    def __init__(self) -> None:
        self.client: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: asyncio.Transport | None = None
        self._eof_from = set[bool]()
        self._closed = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        self._early_eof = False

    def upstream_candidates(self) -> list[tuple[str, int]]:
        """Upstreams to try in order: round-robin start, the others as failover."""
        ups = list(self.upstreams)
        if not ups:
            return []
        start = next(self._rotation) % len(ups)
        return ups[start:] + ups[:start]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]
        self.client.pause_reading()  # until the upstream is there
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        errors = []
        for host, port in self.upstream_candidates():
            try:
                _, side = await asyncio.wait_for(
                    loop.create_connection(lambda: _UpstreamSide(self), host, port), self.connect_timeout)
            except (TimeoutError, OSError) as exc:
                why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
                errors.append(f"{host}:{port} ({why})")
                continue
            if self._closed:  # the client went away while we connected
                if side.transport is not None:
                    side.transport.close()
                return
            self.upstream = side.transport
            assert self.upstream is not None
            sock = self.upstream.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.send_proxy:
                self.upstream.write(self.proxy_header())
            if self._early:
                self.upstream.writelines(self._early)
                self._early.clear()
            # The hot path: each side's data_received becomes the other transport's own write, and the
            # protocols are set again so a transport that caches the bound method (uvloop does) uses
            # it. No Python runs per chunk; bytes are counted from the kernel (TCP_INFO) at the end,
            # and idleness is read from it too.
            self.data_received = self.upstream.write  # type: ignore[method-assign]
            side.data_received = self.client.write  # type: ignore[method-assign]
            self.client.set_protocol(self)
            self.upstream.set_protocol(side)
            if self._early_eof:
                self.half_close(from_client=True)
            else:
                self.client.resume_reading()
            if self.idle_timeout:
                self._idle_handle = loop.call_later(self.idle_timeout, self._check_idle)
            return
        log.warning("relay: no upstream for %s: %s", self._peer(), ", ".join(errors) or "none configured")
        if self.record is not None:
            self.record.errors += 1
        self.close()

    def proxy_header(self) -> bytes:
        peer = self.client.get_extra_info("peername")
        local = self.client.get_extra_info("sockname")
        if isinstance(peer, tuple) and isinstance(local, tuple):
            return build_v2(peer[:2], local[:2])
        return build_v2(None, None, command="LOCAL")

    def _peer(self) -> str:
        peer = self.client.get_extra_info("peername") if self.client else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a unix client"

    def _idle_for(self) -> float:
        """Seconds since either side last sent us data, from the kernel (0 when it cannot tell)."""
        idle = []
        for transport in (self.client, self.upstream):
            sock = transport.get_extra_info("socket") if transport is not None else None
            ms = tcp_last_data_recv_ms(sock)
            if ms is None:
                return 0.0
            idle.append(ms / 1000)
        return min(idle)

    def _check_idle(self) -> None:
        if self._closed:
            return
        assert self.idle_timeout is not None
        idle = self._idle_for()
        if idle >= self.idle_timeout:
            log.info("relay: %s idle for %gs; closing", self._peer(), self.idle_timeout)
            self.close()
            return
        self._idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout - idle, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:  # bytes that came with the connection, before the upstream was there
            self._early.append(data)
            self.client.pause_reading()
            return
        self.upstream.write(data)

    def eof_received(self) -> bool:
        if self.upstream is None:
            self._early_eof = True
            return True
        self.half_close(from_client=True)
        return True

    def half_close(self, *, from_client: bool) -> None:
        self._eof_from.add(from_client)
        other = self.upstream if from_client else self.client
        if other is not None and other.can_write_eof():
            other.write_eof()
        if len(self._eof_from) == 2:
            self.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()  # the client is slow: stop reading the upstream

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def upstream_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self._closed:
            log.warning("relay: upstream of %s failed: %s", self._peer(), exc)
            if self.record is not None:
                self.record.errors += 1
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self._closed:
            log.info("relay: client %s: %s", self._peer(), exc)
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.record is not None and self.client is not None:
            counts = tcp_bytes(self.client.get_extra_info("socket"))
            if counts is not None:
                self.record.bytes_in += counts[0]
                self.record.bytes_out += counts[1]
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()
