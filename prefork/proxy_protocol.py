"""Parse and build HAProxy PROXY protocol headers (version 1 text, version 2 binary).

The PROXY protocol (haproxy ``doc/proxy-protocol.txt``) lets a proxy prepend the
original client and server addresses to a relayed connection. Everything here
is a pure function of bytes except :func:`read_header`, which reads exactly one
header from a blocking socket and leaves the payload unread.

A receiver must only speak this protocol when configured to (section 5 of the
spec): never call :func:`parse` to *guess* whether a header is present.

Interpretations of the spec, chosen here and relied on by the tests:

* v1 IPv6 addresses: the spec says "sets of 4 hexadecimal digits" with one
  ``::``; like haproxy (``inet_pton``) we also accept groups of 1-4 digits and
  an embedded dotted IPv4 tail (``::ffff:192.0.2.1``, which haproxy itself emits
  through ``inet_ntop``). Scope ids (``%eth0``) are refused. Addresses are
  returned in canonical compressed form, so ``2001:DB8:0::1`` reads as
  ``2001:db8::1``.
* v1 ``UNKNOWN``: everything between ``UNKNOWN`` and the CRLF is ignored, as
  the spec requires, except that a lone CR or LF is still an error. The header
  reports ``family=AF_UNSPEC`` and no addresses; ``command`` stays ``"PROXY"``.
* v2 family/protocol byte: each nibble must be one of the assigned values, and
  only the seven combinations the spec lists are accepted (``0x00``, ``0x11``,
  ``0x12``, ``0x21``, ``0x22``, ``0x31``, ``0x32``); ``0x10`` and the like are
  refused. This is checked for LOCAL too.
* v2 LOCAL and v2 UNSPEC: the spec says to discard the address block, so the
  bytes after the 16-byte fixed part are skipped unparsed (they still count in
  ``length``), and the header reports ``AF_UNSPEC``, protocol 0, no addresses
  and no TLVs. A LOCAL header may announce a family with a zero length.
* v2 TLVs (after the addresses of a PROXY command with a known family) must
  tile the rest of the header exactly; a truncated TLV is an error. A
  ``PP2_TYPE_CRC32C`` TLV is verified (RFC 4960 CRC32c, network byte order).
* v2 AF_UNIX addresses are returned as ``(path, 0)``: the 108-byte field up to
  its first NUL, decoded as UTF-8 with ``surrogateescape``. A field starting
  with NUL is a Linux abstract name, returned as ``"\\0name"`` with trailing
  NULs removed; an all-zero field reads as ``""``.
* ``max_length`` bounds both versions: v2 headers longer than it are refused as
  soon as the length field is read, and v1 lines must end within
  ``min(MAX_V1_LENGTH, max_length)`` bytes.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_PREFORK_VIA",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_PREFIX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "RelayedAddress",
    "build_v1",
    "build_v2",
    "crc32c",
    "encode_header",
    "parse",
    "read_header",
]

V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1_LENGTH: Final = 107  # "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n"
V2_FIXED_LENGTH: Final = 16  # signature, version/command, family/protocol, length
MAX_V2_LENGTH: Final = V2_FIXED_LENGTH + 0xFFFF
DEFAULT_MAX_LENGTH: Final = 4096
UNIX_PATH_LENGTH: Final = 108

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30
# in the range the spec keeps for applications (0xE0-0xEF): the prefork relays a connection passed through,
# oldest first, each by its daemon's 8-byte relay id (prefork.handlers.relay_loops)
PP2_TYPE_PREFORK_VIA: Final = 0xEA
RELAY_ID_LENGTH: Final = 8

_COMMANDS: Final = {0x0: "LOCAL", 0x1: "PROXY"}
_FAMILIES: Final[dict[int, int]] = {
    0x0: socket.AF_UNSPEC,
    0x1: socket.AF_INET,
    0x2: socket.AF_INET6,
    0x3: socket.AF_UNIX,
}
_FAMILY_NIBBLES: Final = {family: nibble for nibble, family in _FAMILIES.items()}
_PROTOCOLS: Final[dict[int, int]] = {0x0: 0, 0x1: socket.SOCK_STREAM, 0x2: socket.SOCK_DGRAM}
_PROTOCOL_NIBBLES: Final = {protocol: nibble for nibble, protocol in _PROTOCOLS.items()}
_ADDRESS_LENGTHS: Final[dict[int, int]] = {
    socket.AF_INET: 2 * 4 + 2 * 2,
    socket.AF_INET6: 2 * 16 + 2 * 2,
    socket.AF_UNIX: 2 * UNIX_PATH_LENGTH,
}
_FAMILY_NAMES: Final[dict[int, str]] = {
    socket.AF_UNSPEC: "AF_UNSPEC",
    socket.AF_INET: "AF_INET",
    socket.AF_INET6: "AF_INET6",
    socket.AF_UNIX: "AF_UNIX",
}

_V1_FIELDS: Final = ("source address", "destination address", "source port", "destination port")
_IPV4_OCTET: Final = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE: Final = re.compile(rb"(?:%s\.){3}%s" % (_IPV4_OCTET, _IPV4_OCTET))
# Every prefix of a valid dotted quad: an octet with no leading zero can only
# be extended into another valid octet, so the partial last octet is one too.
_IPV4_PREFIX_RE: Final = re.compile(rb"(?:%s\.){0,3}%s?" % (_IPV4_OCTET, _IPV4_OCTET))
_IPV6_TEXT_RE: Final = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_IPV6_PREFIX_RE: Final = re.compile(rb"[0-9A-Fa-f:.]{0,45}")
_PORT_RE: Final = re.compile(rb"0|[1-9][0-9]{0,4}")
_PORT_PREFIX_RE: Final = re.compile(rb"(?:0|[1-9][0-9]{0,4})?")


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """One decoded PROXY protocol header.

    ``version`` is 1 or 2. ``command`` is ``"PROXY"`` (addresses relayed for a
    client) or ``"LOCAL"`` (v2 only: the proxy's own connection, e.g. a health
    check). ``family`` is ``socket.AF_INET``, ``AF_INET6``, ``AF_UNIX`` or
    ``AF_UNSPEC``; ``source`` and ``destination`` are ``(address, port)`` for
    IP families, ``(path, 0)`` for AF_UNIX (see the module docstring for path
    decoding), and ``None`` for LOCAL, v1 UNKNOWN and v2 UNSPEC, where the
    receiver should use the real connection endpoints. ``length`` is the
    number of bytes the header occupies on the wire. ``tlvs`` are the v2
    type-length-value extensions in wire order (``()`` for v1). ``protocol``
    is ``socket.SOCK_STREAM``, ``socket.SOCK_DGRAM`` or 0 when unspecified.
    """

    version: int
    command: str
    family: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    length: int
    tlvs: tuple[tuple[int, bytes], ...] = ()
    protocol: int = socket.SOCK_STREAM


# --------------------------------------------------------------------------- parsing


def parse(
    data: bytes | bytearray | memoryview, *, max_length: int = DEFAULT_MAX_LENGTH
) -> ProxyHeader | None:
    """Decode the PROXY header at the start of ``data``.

    Returns the header (its ``length`` says where the payload starts), or
    ``None`` when ``data`` is a valid beginning of a header that needs more
    bytes. Raises :class:`ProxyProtocolError` as soon as ``data`` cannot be the
    start of a valid header, including headers longer than ``max_length``.
    Bytes after the header are never examined. Raises ``ValueError`` only for
    a ``max_length`` outside ``16..MAX_V2_LENGTH``.
    """
    _check_max_length(max_length)
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    # No valid header is longer than max_length, so nothing past it matters.
    buffer = view[:max_length].tobytes()
    if not buffer:
        return None
    if buffer[0] == V2_SIGNATURE[0]:
        return _parse_v2(buffer, max_length)
    if buffer[0] == V1_PREFIX[0]:
        return _parse_v1(buffer, min(MAX_V1_LENGTH, max_length))
    raise ProxyProtocolError(
        f"not a PROXY protocol header: expected 'PROXY ' or the v2 signature, got {_preview(buffer)}"
    )


def _check_max_length(max_length: int) -> None:
    if not V2_FIXED_LENGTH <= max_length <= MAX_V2_LENGTH:
        raise ValueError(
            f"max_length must be between {V2_FIXED_LENGTH} and {MAX_V2_LENGTH}, got {max_length}"
        )


def _preview(data: bytes, limit: int = 32) -> str:
    """A one-line rendering of untrusted bytes for error messages."""
    text = repr(data[:limit])
    return text + "..." if len(data) > limit else text


def _parse_v1(buffer: bytes, limit: int) -> ProxyHeader | None:
    prefix_length = min(len(buffer), len(V1_PREFIX))
    if buffer[:prefix_length] != V1_PREFIX[:prefix_length]:
        raise ProxyProtocolError(f"not a PROXY protocol header: expected 'PROXY ', got {_preview(buffer)}")
    end = buffer.find(b"\r\n", 0, limit)
    if end < 0:
        line = buffer[:limit]
        if b"\n" in line:
            raise ProxyProtocolError(f"invalid PROXY v1 header: LF without CR in {_preview(line)}")
        if b"\r" in line[:-1]:
            raise ProxyProtocolError(f"invalid PROXY v1 header: CR not followed by LF in {_preview(line)}")
        _decode_v1_line(line.removesuffix(b"\r"), complete=False)
        if len(buffer) >= limit:
            raise ProxyProtocolError(
                f"invalid PROXY v1 header: no CRLF within the first {limit} bytes of {_preview(line)}"
            )
        return None
    line = buffer[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError(f"invalid PROXY v1 header: lone CR or LF in {_preview(line)}")
    header = _decode_v1_line(line, complete=True)
    assert header is not None  # a complete line always decodes or raises
    return header


def _decode_v1_line(line: bytes, *, complete: bool) -> ProxyHeader | None:
    """Decode a v1 line without its CRLF, or check that a partial line can still become valid."""
    if len(line) < len(V1_PREFIX):
        return None  # only reachable for a partial "PROXY " prefix, already checked
    protocol, space, rest = line[len(V1_PREFIX) :].partition(b" ")
    if protocol == b"UNKNOWN" and (space or complete):
        # The spec: "the receiver must ignore anything presented before the CRLF".
        if not complete:
            return None
        return ProxyHeader(1, "PROXY", socket.AF_UNSPEC, None, None, len(line) + 2, (), 0)
    if not space and not complete:
        if not any(name.startswith(protocol) for name in (b"TCP4", b"TCP6", b"UNKNOWN")):
            raise ProxyProtocolError(
                f"invalid PROXY v1 header: protocol {_preview(protocol)} is not TCP4, TCP6 or UNKNOWN"
            )
        return None
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            f"invalid PROXY v1 header: protocol {_preview(protocol)} is not TCP4, TCP6 or UNKNOWN"
        )
    fields = rest.split(b" ")
    if len(fields) > 4 or (complete and len(fields) != 4):
        raise ProxyProtocolError(
            f"invalid PROXY v1 header: expected 4 single-space-separated fields after "
            f"{protocol.decode()}, got {len(fields)} in {_preview(line)}"
        )
    if not complete:
        for index, field in enumerate(fields):
            _check_v1_field_prefix(protocol, index, field, partial=index == len(fields) - 1)
        return None
    source_ip = _decode_v1_address(protocol, 0, fields[0])
    destination_ip = _decode_v1_address(protocol, 1, fields[1])
    source_port = _decode_v1_port(2, fields[2])
    destination_port = _decode_v1_port(3, fields[3])
    family = socket.AF_INET if protocol == b"TCP4" else socket.AF_INET6
    return ProxyHeader(
        1, "PROXY", family, (source_ip, source_port), (destination_ip, destination_port), len(line) + 2
    )


def _check_v1_field_prefix(protocol: bytes, index: int, field: bytes, *, partial: bool) -> None:
    """Raise unless ``field`` is valid (or, when ``partial``, a prefix of a valid field)."""
    if not partial:
        if index < 2:
            _decode_v1_address(protocol, index, field)
        else:
            _decode_v1_port(index, field)
        return
    if index >= 2:
        valid = _PORT_PREFIX_RE.fullmatch(field) is not None and (not field or int(field) <= 0xFFFF)
    elif protocol == b"TCP4":
        valid = _IPV4_PREFIX_RE.fullmatch(field) is not None
    else:
        valid = (
            _IPV6_PREFIX_RE.fullmatch(field) is not None and b":::" not in field and field.count(b"::") <= 1
        )
    if not valid:
        raise ProxyProtocolError(
            f"invalid PROXY v1 header: {_V1_FIELDS[index]} {_preview(field)} cannot start a valid value"
        )


def _decode_v1_address(protocol: bytes, index: int, field: bytes) -> str:
    if protocol == b"TCP4":
        if _IPV4_RE.fullmatch(field) is None:
            raise ProxyProtocolError(
                f"invalid PROXY v1 header: {_V1_FIELDS[index]} {_preview(field)} is not a dotted-quad "
                "IPv4 address without leading zeros"
            )
        return field.decode("ascii")
    try:
        if _IPV6_TEXT_RE.fullmatch(field) is None:
            raise ValueError("unexpected characters")
        return ipaddress.IPv6Address(field.decode("ascii")).compressed
    except ValueError as exc:
        raise ProxyProtocolError(
            f"invalid PROXY v1 header: {_V1_FIELDS[index]} {_preview(field)} is not an IPv6 address ({exc})"
        ) from exc


def _decode_v1_port(index: int, field: bytes) -> int:
    if _PORT_RE.fullmatch(field) is None or int(field) > 0xFFFF:
        raise ProxyProtocolError(
            f"invalid PROXY v1 header: {_V1_FIELDS[index]} {_preview(field)} is not a decimal number "
            "in 0..65535 without leading zeros"
        )
    return int(field)


def _parse_v2(buffer: bytes, max_length: int) -> ProxyHeader | None:
    signature_length = min(len(buffer), len(V2_SIGNATURE))
    if buffer[:signature_length] != V2_SIGNATURE[:signature_length]:
        raise ProxyProtocolError(
            f"not a PROXY protocol header: bytes do not match the v2 signature: {_preview(buffer[:16])}"
        )
    if len(buffer) < 13:
        return None
    version, command_nibble = buffer[12] >> 4, buffer[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"invalid PROXY v2 header: version {version} in byte 13 is not 2")
    command = _COMMANDS.get(command_nibble)
    if command is None:
        raise ProxyProtocolError(
            f"invalid PROXY v2 header: command 0x{command_nibble:X} is not LOCAL (0x0) or PROXY (0x1)"
        )
    if len(buffer) < 14:
        return None
    family, protocol = _decode_v2_family(buffer[13])
    if len(buffer) < V2_FIXED_LENGTH:
        return None
    block_length = int.from_bytes(buffer[14:16], "big")
    total = V2_FIXED_LENGTH + block_length
    if total > max_length:
        raise ProxyProtocolError(f"PROXY v2 header of {total} bytes exceeds the limit of {max_length} bytes")
    address_length = _ADDRESS_LENGTHS.get(family, 0)
    if command == "PROXY" and block_length < address_length:
        raise ProxyProtocolError(
            f"invalid PROXY v2 header: address block of {block_length} bytes is shorter than the "
            f"{address_length} bytes {_FAMILY_NAMES[family]} needs"
        )
    if len(buffer) < total:
        return None
    if command == "LOCAL" or family == socket.AF_UNSPEC:
        # The spec: discard the address block (and with it anything after it).
        return ProxyHeader(2, command, socket.AF_UNSPEC, None, None, total, (), 0)
    block = buffer[V2_FIXED_LENGTH : V2_FIXED_LENGTH + address_length]
    source, destination = _decode_v2_addresses(family, block)
    tlvs = _decode_tlvs(buffer[:total], V2_FIXED_LENGTH + address_length)
    via = relayed_via(tlvs)
    if via and source is not None:
        source = RelayedAddress(source, via)
    return ProxyHeader(2, command, family, source, destination, total, tlvs, protocol)


class RelayedAddress(tuple[str, int]):
    """A PROXY v2 header's source address, for a connection that came through prefork relays.

    A plain ``(host, port)`` tuple to everyone (the handler's ``client_address``, a transport's
    ``peername``), which also carries ``via``: the relays' ids from the header's
    :data:`PP2_TYPE_PREFORK_VIA` TLV, oldest first, so the next relay can pass them on in its own header.
    """

    via: tuple[bytes, ...]

    def __new__(cls, address: tuple[str, int], via: tuple[bytes, ...]) -> RelayedAddress:
        made = super().__new__(cls, address)
        made.via = via
        return made

    def __getnewargs__(self) -> tuple[tuple[str, int], tuple[bytes, ...]]:
        return (self[0], self[1]), self.via


def relayed_via(tlvs: Iterable[tuple[int, bytes]]) -> tuple[bytes, ...]:
    """The relay ids a header's :data:`PP2_TYPE_PREFORK_VIA` TLV lists (``()`` when none, or malformed)."""
    for tlv_type, value in tlvs:
        if tlv_type == PP2_TYPE_PREFORK_VIA and value and len(value) % RELAY_ID_LENGTH == 0:
            return tuple(bytes(value[i:i + RELAY_ID_LENGTH]) for i in range(0, len(value), RELAY_ID_LENGTH))
    return ()


def _decode_v2_family(byte: int) -> tuple[int, int]:
    family_nibble, protocol_nibble = byte >> 4, byte & 0x0F
    if family_nibble not in _FAMILIES:
        raise ProxyProtocolError(
            f"invalid PROXY v2 header: address family 0x{family_nibble:X} is not one of 0x0..0x3"
        )
    if protocol_nibble not in _PROTOCOLS:
        raise ProxyProtocolError(
            f"invalid PROXY v2 header: transport protocol 0x{protocol_nibble:X} is not one of 0x0..0x2"
        )
    if (family_nibble == 0) != (protocol_nibble == 0):
        raise ProxyProtocolError(
            f"invalid PROXY v2 header: family/protocol byte 0x{byte:02X} mixes an unspecified and a "
            "specified value"
        )
    return _FAMILIES[family_nibble], _PROTOCOLS[protocol_nibble]


def _decode_v2_addresses(family: int, block: bytes) -> tuple[tuple[str, int], tuple[str, int]]:
    if family == socket.AF_UNIX:
        return (
            (_decode_unix_path(block[:UNIX_PATH_LENGTH]), 0),
            (_decode_unix_path(block[UNIX_PATH_LENGTH:]), 0),
        )
    size = 4 if family == socket.AF_INET else 16
    source_ip = ipaddress.ip_address(block[:size]).compressed
    destination_ip = ipaddress.ip_address(block[size : 2 * size]).compressed
    source_port = int.from_bytes(block[2 * size : 2 * size + 2], "big")
    destination_port = int.from_bytes(block[2 * size + 2 : 2 * size + 4], "big")
    return (source_ip, source_port), (destination_ip, destination_port)


def _decode_unix_path(raw: bytes) -> str:
    # A leading NUL marks a Linux abstract name, which may itself contain NULs.
    name = raw.rstrip(b"\0") if raw[:1] == b"\0" else raw.split(b"\0", 1)[0]
    return name.decode("utf-8", "surrogateescape")


def _decode_tlvs(header: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    checksum_offsets: list[int] = []
    while offset < len(header):
        if offset + 3 > len(header):
            raise ProxyProtocolError(
                f"invalid PROXY v2 header: {len(header) - offset} trailing bytes at offset {offset} are too "
                "short for a TLV (3 bytes minimum)"
            )
        tlv_type = header[offset]
        value_length = int.from_bytes(header[offset + 1 : offset + 3], "big")
        start, end = offset + 3, offset + 3 + value_length
        if end > len(header):
            raise ProxyProtocolError(
                f"invalid PROXY v2 header: TLV 0x{tlv_type:02X} at offset {offset} declares {value_length} "
                f"bytes but only {len(header) - start} remain in the header"
            )
        if tlv_type == PP2_TYPE_CRC32C:
            if value_length != 4:
                raise ProxyProtocolError(
                    f"invalid PROXY v2 header: CRC32C TLV has {value_length} value bytes instead of 4"
                )
            checksum_offsets.append(start)
        tlvs.append((tlv_type, header[start:end]))
        offset = end
    if len(checksum_offsets) > 1:
        raise ProxyProtocolError("invalid PROXY v2 header: more than one CRC32C TLV")
    if checksum_offsets:
        start = checksum_offsets[0]
        received = int.from_bytes(header[start : start + 4], "big")
        computed = crc32c(header[:start] + b"\0\0\0\0" + header[start + 4 :])
        if received != computed:
            raise ProxyProtocolError(
                f"invalid PROXY v2 header: CRC32C checksum 0x{received:08X} does not match the "
                f"computed 0x{computed:08X}"
            )
    return tuple(tlvs)


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        crc = index
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli, RFC 4960 appendix B) of ``data``, as used by ``PP2_TYPE_CRC32C``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --------------------------------------------------------------------------- building


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if "%" in text:
        raise ValueError(f"cannot use {text!r} in a PROXY header: scoped IPv6 addresses are not supported")
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise ValueError(f"cannot use {text!r} in a PROXY header: not an IP address") from exc


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"cannot use port {port!r} in a PROXY header: not an integer in 0..65535")
    return port


def _ip_pair(
    source: tuple[str, int], destination: tuple[str, int]
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    source_ip, destination_ip = _ip_address(source[0]), _ip_address(destination[0])
    if source_ip.version != destination_ip.version:
        raise ValueError(
            f"cannot build a PROXY header from IPv{source_ip.version} source {source[0]!r} and "
            f"IPv{destination_ip.version} destination {destination[0]!r}: both must be the same family"
        )
    return source_ip, destination_ip


def build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """Return the v1 line for a TCP connection, or ``PROXY UNKNOWN`` when both are ``None``.

    The family (TCP4 or TCP6) follows the IP text; addresses are written in
    canonical form. Raises ``ValueError`` for hostnames, mixed families, ports
    outside 0..65535 or only one of the two addresses.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("cannot build a PROXY v1 header with only one of source and destination")
    source_ip, destination_ip = _ip_pair(source, destination)
    protocol = "TCP4" if source_ip.version == 4 else "TCP6"
    line = (
        f"PROXY {protocol} {source_ip.compressed} {destination_ip.compressed} "
        f"{_check_port(source[1])} {_check_port(destination[1])}\r\n"
    )
    return line.encode("ascii")


def build_v2(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    *,
    command: str = "PROXY",
    protocol: int = socket.SOCK_STREAM,
    family: int | None = None,
    tlvs: Iterable[tuple[int, bytes]] = (),
    checksum: bool = False,
) -> bytes:
    """Return a v2 binary header.

    ``command="LOCAL"``, or ``None`` for both addresses, builds a LOCAL header
    with no address block. Otherwise the family is inferred from the IP text
    (``family=socket.AF_UNIX`` is needed for paths, sent as ``(path, port)``
    with the port ignored). ``protocol`` is ``socket.SOCK_STREAM`` or
    ``socket.SOCK_DGRAM``. ``tlvs`` are appended in order; ``checksum=True``
    appends a ``PP2_TYPE_CRC32C`` TLV, and any CRC32C TLV gets its value
    computed over the finished header. Raises ``ValueError`` for arguments
    that cannot form a valid header.
    """
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"cannot build a PROXY v2 header with command {command!r}: use 'PROXY' or 'LOCAL'")
    tlv_list = list(tlvs)
    if checksum:
        tlv_list.append((PP2_TYPE_CRC32C, b"\0\0\0\0"))
    if command == "LOCAL" or (source is None and destination is None):
        if source is not None or destination is not None:
            raise ValueError("cannot build a LOCAL PROXY v2 header with addresses: LOCAL carries none")
        if tlv_list:
            raise ValueError("cannot build a LOCAL PROXY v2 header with TLVs: receivers discard its block")
        return _build_v2_raw(0x0, 0x00, b"", [])
    if source is None or destination is None:
        raise ValueError("cannot build a PROXY v2 header with only one of source and destination")
    if protocol not in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        raise ValueError(
            f"cannot build a PROXY v2 header for protocol {protocol!r}: use SOCK_STREAM or SOCK_DGRAM"
        )
    family, block = _v2_address_block(source, destination, family)
    fam_byte = _FAMILY_NIBBLES[family] << 4 | _PROTOCOL_NIBBLES[protocol]
    return _build_v2_raw(0x1, fam_byte, block, tlv_list)


def _v2_address_block(
    source: tuple[str, int], destination: tuple[str, int], family: int | None
) -> tuple[int, bytes]:
    """The address family and the address block of a v2 PROXY header for ``source`` and ``destination``:
    ``family`` as given, or (None) inferred from the IP text. Raises ``ValueError``."""
    if family == socket.AF_UNIX:
        return socket.AF_UNIX, _encode_unix_path(source[0]) + _encode_unix_path(destination[0])
    if family in (None, socket.AF_INET, socket.AF_INET6):
        source_ip, destination_ip = _ip_pair(source, destination)
        family_for_text = socket.AF_INET if source_ip.version == 4 else socket.AF_INET6
        if family is not None and family != family_for_text:
            raise ValueError(
                f"cannot build a {_FAMILY_NAMES[family]} PROXY v2 header from address {source[0]!r}"
            )
        return family_for_text, (
            source_ip.packed
            + destination_ip.packed
            + _check_port(source[1]).to_bytes(2, "big")
            + _check_port(destination[1]).to_bytes(2, "big")
        )
    raise ValueError(f"cannot build a PROXY v2 header for address family {family!r}")


def _encode_unix_path(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > UNIX_PATH_LENGTH:
        raise ValueError(
            f"cannot build a PROXY v2 header for UNIX path {path!r}: "
            f"{len(raw)} bytes exceed {UNIX_PATH_LENGTH}"
        )
    abstract = raw[:1] == b"\0"
    if (abstract and raw.endswith(b"\0") and len(raw) > 1) or (not abstract and b"\0" in raw):
        raise ValueError(
            f"cannot build a PROXY v2 header for UNIX path {path!r}: its NUL bytes would not survive decoding"
        )
    return raw.ljust(UNIX_PATH_LENGTH, b"\0")


def _build_v2_raw(command_nibble: int, fam_byte: int, block: bytes, tlvs: list[tuple[int, bytes]]) -> bytes:
    body = bytearray(block)
    checksum_offset = None
    for tlv_type, value in tlvs:
        if not 0 <= tlv_type <= 0xFF:
            raise ValueError(f"cannot build a PROXY v2 TLV of type {tlv_type!r}: types are one byte")
        if len(value) > 0xFFFF:
            raise ValueError(f"cannot build PROXY v2 TLV 0x{tlv_type:02X}: {len(value)} bytes exceed 65535")
        if tlv_type == PP2_TYPE_CRC32C:
            if checksum_offset is not None or len(value) != 4:
                raise ValueError(
                    "cannot build a PROXY v2 header with a CRC32C TLV that is duplicated or not 4 bytes"
                )
            checksum_offset = V2_FIXED_LENGTH + len(body) + 3
            value = b"\0\0\0\0"
        body += bytes((tlv_type,)) + len(value).to_bytes(2, "big") + value
    if len(body) > 0xFFFF:
        raise ValueError(
            f"cannot build a PROXY v2 header: {len(body)} bytes after the fixed part exceed 65535"
        )
    header = bytearray(V2_SIGNATURE)
    header += bytes((0x20 | command_nibble, fam_byte)) + len(body).to_bytes(2, "big") + body
    if checksum_offset is not None:
        header[checksum_offset : checksum_offset + 4] = crc32c(bytes(header)).to_bytes(4, "big")
    return bytes(header)


def encode_header(header: ProxyHeader) -> bytes:
    """Encode ``header`` again in its own version (e.g. to forward it to a backend).

    The result is canonical: parsing it gives ``header`` back with ``length``
    set to the size of the result. Bytes the spec tells receivers to ignore
    (v1 UNKNOWN text, LOCAL/UNSPEC address blocks) are not reproduced.
    """
    if header.version == 1:
        return build_v1(header.source, header.destination)
    if header.version != 2:
        raise ValueError(f"cannot encode a PROXY header of version {header.version!r}")
    if header.command == "LOCAL":
        return _build_v2_raw(0x0, 0x00, b"", [])
    if header.source is None or header.destination is None or header.family == socket.AF_UNSPEC:
        return _build_v2_raw(0x1, 0x00, b"", [])
    return build_v2(
        header.source,
        header.destination,
        family=header.family,
        protocol=header.protocol,
        tlvs=header.tlvs,
    )


# --------------------------------------------------------------------------- sockets


def read_header(
    sock: socket.socket, *, timeout: float, max_length: int = DEFAULT_MAX_LENGTH
) -> tuple[ProxyHeader, bytes]:
    """Read one PROXY header from the connected stream socket ``sock``.

    Returns ``(header, b"")``: only the header's own bytes are consumed (the
    spec requires the receiver not to read past it), so the payload is still
    unread in the socket and the second item is always empty. Bytes are
    peeked, and only those known to belong to the header are then received,
    so a fragmented header is reassembled without over-reading and without
    busy-waiting.

    ``timeout`` bounds the whole header, not each read: a peer trickling one
    byte at a time cannot extend it. Raises ``TimeoutError`` when it expires,
    :class:`ProxyProtocolError` for a malformed or oversized header or when
    the peer closes the connection first, and lets other ``OSError`` through.
    The socket's own timeout is restored before returning.
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    _check_max_length(max_length)
    deadline = time.monotonic() + timeout
    received = bytearray()
    saved_timeout = sock.gettimeout()
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(_timeout_message(timeout, len(received)))
            sock.settimeout(remaining)
            try:
                header = take_header(sock, received, max_length=max_length)
            except TimeoutError as exc:
                raise TimeoutError(_timeout_message(timeout, len(received))) from exc
            if header is not None:
                return header, b""
    finally:
        sock.settimeout(saved_timeout)


def take_header(sock: socket.socket, received: bytearray, *, max_length: int = DEFAULT_MAX_LENGTH
                ) -> ProxyHeader | None:
    """One look at ``sock``: take the PROXY header bytes it holds into ``received``, never a byte past them.

    ``received`` holds what earlier calls took (the caller keeps it for the
    next one). Returns the header once it is complete, None when it needs
    more bytes than have arrived: call again once ``sock`` is readable. The
    bytes are peeked and only those known to belong to the header are
    received, so the payload (a TLS ClientHello, say) stays in the socket,
    and a header arriving in pieces costs no busy loop. The peek blocks, or
    raises ``BlockingIOError`` / ``TimeoutError``, as the socket's mode says
    (it waits only for bytes beyond those already taken). Raises
    :class:`ProxyProtocolError` for a malformed or oversized header or a
    connection closed before it completed.
    """
    peeked = sock.recv(max(1, max_length - len(received)), socket.MSG_PEEK)
    if not peeked:
        raise ProxyProtocolError(
            f"connection closed before the PROXY header completed ({len(received)} header bytes received)"
        )
    header = parse(bytes(received) + peeked, max_length=max_length)
    # None means every byte seen so far is part of the header.
    wanted = len(peeked) if header is None else header.length - len(received)
    _receive_exactly(sock, wanted, received)
    return header


def _timeout_message(timeout: float, count: int) -> str:
    return f"no complete PROXY header within {timeout:g} s ({count} header bytes received)"


def _receive_exactly(sock: socket.socket, count: int, into: bytearray) -> None:
    """Receive ``count`` bytes that a previous peek showed are already buffered."""
    while count > 0:
        chunk = sock.recv(count)
        if not chunk:
            raise ProxyProtocolError("connection closed before the PROXY header completed")
        into += chunk
        count -= len(chunk)
