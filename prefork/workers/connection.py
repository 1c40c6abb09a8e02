"""Per-connection helpers shared by every worker class and the built-in handlers.

Who must send a PROXY header (:class:`ProxyPolicy`), a connection's byte
counts from the kernel (``TCP_INFO``), the access-log line, the one way
a peer address is written for people, and what a failed TLS handshake
costs (counted by reason, one line).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any

from prefork import logs, tls
from prefork.config import Config

log = logging.getLogger(__name__)
_access = logging.getLogger(logs.ACCESS_LOGGER)


@dataclass(frozen=True)
class ProxyPolicy:
    """Which peers must start with a PROXY protocol header, and how long it may take."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # empty: every peer
    timeout: float

    @classmethod
    def from_config(cls, config: Config) -> ProxyPolicy | None:
        if not config.proxy_protocol:
            return None
        networks = tuple(ipaddress.ip_network(c, strict=False) for c in config.proxy_allow)
        return cls(networks=networks, timeout=config.proxy_timeout)

    def applies(self, client_address: Any) -> bool:
        if not self.networks:
            return True
        if not isinstance(client_address, tuple):
            return False  # a Unix socket peer: not one of the listed networks
        ip = ipaddress.ip_address(client_address[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


def format_peer(address: Any) -> str:
    """A peer for log lines: ``1.2.3.4:80``, ``[::1]:80``, the Unix socket path, or ``unix socket``."""
    if address is None:
        return "(unknown)"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "unix socket"


def counts_own_bytes(handler: Any) -> bool:
    """True for a handler that adds its bytes to the worker's record itself (the relays, as they pass).

    Declared with the class attribute ``counts_bytes = True``; the worker then
    does not read ``TCP_INFO`` for it as well.
    """
    return bool(getattr(handler, "counts_bytes", False))


_TCP_INFO_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received (Linux >= 4.1/4.6)
_TCP_INFO_BYTES_OFFSET = 120
_FIN_RECEIVED_STATES = frozenset({6, 8, 9, 11})  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING (tcp_states.h)
_TCP_INFO_LAST_DATA_RECV = struct.Struct("=I")  # tcpi_last_data_recv, milliseconds
_TCP_INFO_LAST_DATA_RECV_OFFSET = 52
_TCP_INFO_LAST_DATA_SENT_OFFSET = 44  # tcpi_last_data_sent, milliseconds (the same u32 layout)
_TCP_INFO_UNACKED_OFFSET = 24  # tcpi_unacked: segments sent and not yet acknowledged
_TCP_INFO_NOTSENT_OFFSET = 144  # tcpi_notsent_bytes: bytes queued and not yet sent (Linux >= 4.6)


def _tcp_info(sock: Any, length: int, needed: int) -> bytes | None:
    """The kernel's TCP_INFO of ``sock`` (``length`` bytes asked for); None where it is no TCP socket, or the
    kernel's is shorter than the ``needed`` bytes (an older kernel has fewer fields)."""
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, length)
    except (OSError, AttributeError):
        return None
    return info if len(info) >= needed else None


def tcp_bytes(sock: Any) -> tuple[int, int] | None:
    """(bytes received, bytes sent and acknowledged) of a TCP connection, from the kernel's TCP_INFO."""
    info = _tcp_info(sock, 192, _TCP_INFO_BYTES_OFFSET + _TCP_INFO_BYTES.size)
    if info is None:
        return None
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_OFFSET)
    if info[0] in _FIN_RECEIVED_STATES:
        received -= 1  # the peer's FIN takes a sequence number, not a byte
    return received, acked


def tcp_activity(sock: Any) -> tuple[int, float, float, bool] | None:
    """(bytes received, seconds since data last arrived, seconds since data last went either way, whether
    bytes are still to be sent or acknowledged) of a TCP connection, from one TCP_INFO read."""
    info = _tcp_info(sock, 192, _TCP_INFO_NOTSENT_OFFSET + 4)
    if info is None:
        return None
    received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_OFFSET)[1]
    if info[0] in _FIN_RECEIVED_STATES:
        received -= 1
    last_recv: int = _TCP_INFO_LAST_DATA_RECV.unpack_from(info, _TCP_INFO_LAST_DATA_RECV_OFFSET)[0]
    last_sent: int = _TCP_INFO_LAST_DATA_RECV.unpack_from(info, _TCP_INFO_LAST_DATA_SENT_OFFSET)[0]
    unacked: int = _TCP_INFO_LAST_DATA_RECV.unpack_from(info, _TCP_INFO_UNACKED_OFFSET)[0]
    notsent: int = _TCP_INFO_LAST_DATA_RECV.unpack_from(info, _TCP_INFO_NOTSENT_OFFSET)[0]
    return received, last_recv / 1000.0, min(last_recv, last_sent) / 1000.0, bool(unacked or notsent)


def account(record: Any, sock: Any) -> tuple[int, int] | None:
    """A finished connection's (bytes in, bytes out) from the kernel, added to ``record`` when given.

    The one place a connection's bytes are read from ``TCP_INFO``: every
    worker class and the asyncio relay call it as a connection ends.
    """
    counts = tcp_bytes(sock) if getattr(sock, "family", None) != socket.AF_UNIX else None
    if counts is not None and record is not None:
        record.bytes_in += counts[0]
        record.bytes_out += counts[1]
    return counts


def tcp_last_data_recv_ms(sock: Any) -> int | None:
    """Milliseconds since the connection last received data, from TCP_INFO (None if unknown)."""
    info = _tcp_info(sock, 64, _TCP_INFO_LAST_DATA_RECV_OFFSET + 4)
    if info is None:
        return None
    ms: int = _TCP_INFO_LAST_DATA_RECV.unpack_from(info, _TCP_INFO_LAST_DATA_RECV_OFFSET)[0]
    return ms


def log_access(client_address: Any, started: float, counts: tuple[int, int] | None, outcome: str) -> None:
    """One access-log line: peer, duration, bytes in and out (from the kernel, so any handler is covered)."""
    received, sent = counts if counts is not None else ("-", "-")
    _access.info("%s %.6fs in=%s out=%s %s", format_peer(client_address), time.monotonic() - started,
                 received, sent, outcome)


def handshake_begun(sock: socket.socket) -> bool | None:
    """Whether the client on the non-blocking ``sock`` has begun its TLS handshake (every worker class asks).

    True once its first byte is there (peeked: it stays for OpenSSL), False
    when the connection ended, closed or reset, before any (behind a PROXY
    header: before any after it), None while nothing has arrived yet. A
    connection that ends before its first TLS byte never began a handshake
    (a TCP health check, a port probe, a load balancer dropping a forward it
    no longer needs), so it is not a failed one: see
    :func:`closed_before_handshake`. Other errors raise ``OSError``.
    """
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return None
    except ConnectionError:  # reset (or aborted) before any byte: as closed
        return False


def closed_before_handshake(peer: Any) -> None:
    """A connection on a TLS listener ended before its first TLS byte: not counted as a failed handshake."""
    log.debug("connection from %s closed before its TLS handshake began", format_peer(peer))


def tls_handshake_failed(record: Any, peer: Any, exc: BaseException) -> None:
    """A TLS handshake failed (every worker class alike): counted in ``record`` by reason, one log line.

    The caller closes the connection.
    """
    reason = tls.failure_reason(exc)
    tls.count_failure(record, reason)
    log.info("TLS handshake with %s failed (%s): %s; closing the connection", format_peer(peer),
             reason.replace("_", " "), _describe_tls_failure(exc))


def _describe_tls_failure(exc: BaseException) -> str:
    """A failed handshake's exception in a few words: OpenSSL's reason, not its file and line."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason or not isinstance(exc, ssl.SSLEOFError):
            return tls.describe_error(exc)
        return "connection closed in the middle of the handshake"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
