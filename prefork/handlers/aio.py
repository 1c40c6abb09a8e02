"""Built-in handlers for the ``async`` worker class: echo and relay as asyncio protocols.

The daemon picks these automatically under ``--worker-class async`` when the
handler is the built-in echo or when ``--relay`` is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

from prefork.handlers import relay_core
from prefork.handlers.relay_core import Upstream
from prefork.handlers.upstreams import Balanced
from prefork.workers.connection import account, tcp_last_data_recv_ms

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


_EARLY_TLS_BYTES = 256 * 1024  # what a TLS client may send before its upstream is there, before it is paused


class _UpstreamSide(asyncio.Protocol):
    """The relay's connection to the upstream: hands everything to its client side.

    A TLS upstream's side is deaf to its end until the relay takes it
    (``live``): an attempt whose handshake failed ends without ending the
    relay, which tries the next upstream.
    """

    def __init__(self, relay: RelayProtocol) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.live = relay.upstream_tls is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.relay.client.write(data)  # replaced by client.write itself once both sides are up

    def eof_received(self) -> bool:
        if not self.live:
            return False
        self.relay.half_close(from_client=False)
        # keep our side open (the client may still be sending), unless it is TLS: asyncio closes
        # those after an EOF whatever we answer (and warns when we answer True)
        return self.relay.upstream_tls is None

    def pause_writing(self) -> None:
        self.relay.client.pause_reading()  # the upstream is slow: stop reading the client

    def resume_writing(self) -> None:
        self.relay.client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.live:
            self.relay.upstream_lost(exc)


class RelayProtocol(Balanced, asyncio.Protocol):
    """Forward each client connection to an upstream, bytes both ways, half-close propagated.

    The asyncio form of :class:`prefork.handlers.relay.RelayHandler`, configured
    the same way, by subclassing (the daemon does it for ``--relay``):
    ``upstreams``, ``connect_timeout``, ``idle_timeout`` (None: never),
    ``send_proxy``, the balancing settings (``upstream_specs``, ``balance``,
    ``check_interval``, ``slow_start``), checked when the subclass is made.
    Connections are balanced over the upstreams by
    :class:`prefork.handlers.upstreams.Balancer` (health shared by every
    worker, least connections or weighted round robin), failing over to the
    next; override :meth:`upstream_candidates` to choose per connection. Which upstream, the
    PROXY header, the log lines and what counts as an error are
    :mod:`prefork.handlers.relay_core`'s, shared with the socketserver form.

    Flow control keeps memory flat: when one side's transport buffers past its
    high water mark, reading from the other side pauses. The client's bytes
    are added to ``record`` from the kernel (``TCP_INFO``) when the connection
    ends (through TLS these are the bytes on the wire, records and handshake
    included).

    TLS: the client's transport may be a TLS one (a TLS listener), and
    ``upstream_tls`` (``--relay-tls``) connects upstream with TLS: connect,
    the PROXY header in clear, then ``start_tls``, all within
    ``connect_timeout``; a failed handshake is a failed attempt and the next
    upstream is tried. A TLS transport cannot half-close (no ``write_eof``;
    asyncio closes it when its peer ends), so an EOF towards or from a TLS
    side closes that side once what was relayed to it is flushed, and the
    connection ends with it, as stunnel and HAProxy end a TLS connection
    when its server closes. (The socketserver form passes a half-close on
    as a ``close_notify`` and goes on reading.)
    """

    counts_bytes = True  # adds its client's bytes to record at close: the worker need not count them too
    # The worker's scoreboard record, or None (nothing counted). The async worker sets it on each
    # protocol before connection_made; a class-level value (what it once set) is seen as well.
    record: Any = None

    def __init__(self) -> None:
        self.client: asyncio.Transport = None  # type: ignore[assignment]
        self.client_address: Any = None  # the client's peername, set by connection_made
        self.upstream: asyncio.Transport | None = None
        self.upstream_address: Upstream | None = None  # set once an upstream accepted
        self._eof_from = set[bool]()
        self._closed = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        self._early_bytes = 0
        self._early_eof = False
        self._tls_client = False
        self._client_gone = False  # a TLS client ended before the upstream was there; its bytes still go
        self._upstream_index: int | None = None  # the balancer's index of the upstream held open, until close()

    # -- hooks --------------------------------------------------------------------------------------

    def upstream_candidates(self) -> list[Upstream]:
        """The upstreams to try for this connection, in order; the first that accepts is used.

        May be overridden (``self.client_address`` is set). The default is the
        balancer's choice (:func:`relay_core.choose`, as the socketserver
        form's), the rest following as failover. Returning an empty list closes the client's
        connection (logged as no upstream).
        """
        return self.balancer.candidates()

    def proxy_header(self) -> bytes:
        """The PROXY v2 header announcing this connection: the client and the address it connected to.

        A LOCAL header when they are not IP addresses (a Unix socket listener).
        A TLS client is announced with what it negotiated (PP2_TYPE_SSL,
        PP2_TYPE_ALPN; see :func:`relay_core.ssl_tlv`). May be overridden.
        """
        ssl_object = self.client.get_extra_info("ssl_object")
        tls = relay_core.ClientTls.of(ssl_object) if isinstance(ssl_object, ssl.SSLObject) else None
        return relay_core.proxy_header(self.client_address, self.client.get_extra_info("sockname"), tls)

    # -- connecting ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = transport  # type: ignore[assignment]
        self.client_address = transport.get_extra_info("peername")
        self._tls_client = transport.get_extra_info("ssl_object") is not None
        if not self._tls_client:
            # until the upstream is there. (A TLS client is read meanwhile, up to _EARLY_TLS_BYTES: uvloop
            # drops what a paused TLS transport holds when its client ends, and a short client often does.)
            self.client.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        failures: list[str] = []
        balancer = self.balancer
        candidates = self.upstream_candidates()
        for n, address in enumerate(candidates):
            i = balancer.attempt(address)
            try:
                side = await self._open_upstream(address)
            except relay_core.AttemptFailed as failed:
                balancer.failed(i, failed.error, failed.stage, failover=n < len(candidates) - 1)
                failures.append(failed.words(address, self.connect_timeout))
                continue
            except BaseException:  # cancelled: the client went away
                balancer.give_up(i)
                raise
            balancer.connected(i)
            self._upstream_index = i  # open until close()
            if self._closed:  # the client went away while we connected
                self._finished()
                if side.transport is not None:
                    side.transport.close()
                return
            if failures:
                self._report(relay_core.failed_over(self.client_address, failures, address))
            self.upstream_address = address
            if self._client_gone:  # what it sent goes up, then the upstream is closed (after the flush)
                self.upstream = side.transport
                if self.upstream is not None:
                    self.upstream.writelines(self._early)
                self.close()
                return
            self._start(side)
            return
        self._report(relay_core.no_upstream(self.client_address, failures, skipped=bool(self.upstreams)))
        self.close()

    async def _open_upstream(self, address: Upstream) -> _UpstreamSide:
        """Connect to ``address``, send the PROXY header, do the TLS handshake; raises ``AttemptFailed``."""
        loop = asyncio.get_running_loop()
        host = address[0]  # the name TLS asks for and verifies
        deadline = loop.time() + self.connect_timeout
        error: OSError | None = None
        for target_host, target_port in self.balancer.addresses_for(address):  # as resolved for this generation
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the connect in a task of its own
                async with asyncio.timeout(self.connect_timeout):
                    transport, side = await loop.create_connection(lambda: _UpstreamSide(self), target_host,
                                                                   target_port)
                break
            except OSError as exc:  # the timeout's TimeoutError is one too
                error = exc
        else:
            assert error is not None
            raise relay_core.AttemptFailed("", error) from error
        if self.send_proxy:
            transport.write(self.proxy_header())  # first and in clear, before a TLS handshake
        if self.upstream_tls is not None:
            try:
                side.transport = await self._start_tls(transport, side, host, deadline - loop.time())
            except OSError as exc:  # start_tls closed the connection
                raise relay_core.AttemptFailed("TLS handshake", exc) from exc
        return side

    def _finished(self) -> None:
        """The upstream connection this relay held is over (counted once)."""
        if self._upstream_index is not None:
            self.balancer.finished(self._upstream_index)
            self._upstream_index = None

    async def _start_tls(self, transport: asyncio.Transport, side: _UpstreamSide, host: str,
                         remaining: float) -> asyncio.Transport:
        """The TLS handshake on ``transport`` within ``remaining`` seconds, verifying the upstream's certificate.

        Raises ``OSError`` (``ssl.SSLCertVerificationError``, ``TimeoutError``,
        a reset); the connection is closed then.
        """
        assert self.upstream_tls is not None
        loop = asyncio.get_running_loop()
        if remaining <= 0:
            transport.close()
            raise TimeoutError()
        if transport.is_closing():  # it ended before the handshake (an upstream that refused our PROXY header):
            # the TLS layer must not start on a dead connection, where uvloop fails in a callback and the
            # handshake's waiter would only end at the timeout
            raise ConnectionResetError("the upstream closed the connection before the TLS handshake")
        try:
            # asyncio.timeout, not wait_for: wait_for (3.11) starts start_tls in a task of its own, one loop
            # turn later, in which the upstream's end can arrive and close the transport under it
            async with asyncio.timeout(remaining):
                tls_transport = await loop.start_tls(
                    transport, side, self.upstream_tls, server_hostname=relay_core.server_name(
                        self.upstream_server_name, host), ssl_handshake_timeout=remaining)
        except OSError:  # before ValueError: ssl.SSLCertVerificationError is both
            transport.close()  # start_tls does on most failures; a timeout may leave it open
            raise
        except ValueError as exc:  # a server name Python refuses (empty, a leading dot)
            transport.close()
            raise OSError(f"cannot ask for that server name: {exc}") from exc
        except BaseException:
            transport.close()
            raise
        assert tls_transport is not None  # start_tls returns None only for a closed transport, which raised
        return tls_transport

    def _start(self, side: _UpstreamSide) -> None:
        """Both sides are up: send early bytes, then let bytes flow."""
        self.upstream = side.transport
        assert self.upstream is not None
        side.live = True
        sock = self.upstream.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            self._idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout, self._check_idle)

    # -- relaying -----------------------------------------------------------------------------------

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
            self._report(relay_core.idle(self.client_address, self.upstream_address, self.idle_timeout))
            self.close()
            return
        self._idle_handle = asyncio.get_running_loop().call_later(self.idle_timeout - idle, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:  # bytes that came with the connection, before the upstream was there
            self._early.append(data)
            self._early_bytes += len(data)
            if not self._tls_client or self._early_bytes >= _EARLY_TLS_BYTES:
                self.client.pause_reading()
            return
        self.upstream.write(data)

    def eof_received(self) -> bool:
        if self.upstream is None:
            self._early_eof = True
        else:
            self.half_close(from_client=True)
        # keep our side open (the upstream may still answer), unless it is TLS: asyncio closes those
        # after an EOF whatever we answer (and warns when we answer True)
        return not self._tls_client

    def half_close(self, *, from_client: bool) -> None:
        """An EOF from one side: passed on as a half-close, or as a close where the other side is TLS."""
        self._eof_from.add(from_client)
        other = self.upstream if from_client else self.client
        if other is not None:
            if other.can_write_eof():
                other.write_eof()
            else:
                self.close()  # TLS cannot half-close: close after flushing (close() flushes)
                return
        if len(self._eof_from) == 2:
            self.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()  # the client is slow: stop reading the upstream

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- the end ------------------------------------------------------------------------------------

    def upstream_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self._closed:
            self._report(relay_core.upstream_failed(self.client_address, self.upstream_address, exc))
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and self._early_eof and self.upstream is None and self._task is not None \
                and not self._task.done():
            # A TLS client sent its bytes and its EOF before the upstream was there, and asyncio closed
            # it (TLS does not half-close): the connect goes on, to deliver them.
            self._client_gone = True
            return
        if exc is not None and not self._closed:
            self._report(relay_core.client_failed(self.client_address, self.upstream_address, exc))
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finished()
        if self.record is not None and self.client is not None:
            account(self.record, self.client.get_extra_info("socket"))  # the socket is still open here
        if self._idle_handle is not None:
            self._idle_handle.cancel()
        if self._task is not None and not self._task.done() and self._task is not asyncio.current_task():
            self._task.cancel()
        for transport in (self.client, self.upstream):
            if transport is not None:
                with contextlib.suppress(Exception):
                    if transport is self.client and transport.can_write_eof():
                        # as socketserver's shutdown_request: our FIN goes first, so a client whose last bytes
                        # we did not read (the upstream was refused) sees an end of file, not a reset
                        transport.write_eof()
                    transport.close()

    def _report(self, event: relay_core.Event) -> None:
        """Log ``event``; count it in the worker's record when it is an error."""
        log.log(event.level, event.message, *event.args)
        if event.error and self.record is not None:
            self.record.errors += 1
