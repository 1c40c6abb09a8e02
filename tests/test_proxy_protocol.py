"""Tests for prefork.proxy_protocol: the PROXY protocol v1/v2 parser, builders and socket reader."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork.proxy_protocol import (
    DEFAULT_MAX_LENGTH,
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    V1_PREFIX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    build_v1,
    build_v2,
    crc32c,
    encode_header,
    parse,
    read_header,
)

AF_INET, AF_INET6, AF_UNIX, AF_UNSPEC = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_UNSPEC
STREAM, DGRAM = socket.SOCK_STREAM, socket.SOCK_DGRAM
SIG = V2_SIGNATURE


def v2raw(ver_cmd: int, fam: int, block: bytes) -> bytes:
    """A v2 header assembled by hand, independently of build_v2."""
    return SIG + bytes((ver_cmd, fam)) + len(block).to_bytes(2, "big") + block


def ip4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def ip6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def port(number: int) -> bytes:
    return number.to_bytes(2, "big")


def tlv(tlv_type: int, value: bytes) -> bytes:
    return bytes((tlv_type,)) + len(value).to_bytes(2, "big") + value


def unix_path(raw: bytes) -> bytes:
    return raw.ljust(108, b"\0")


def v1(source: tuple[str, int], destination: tuple[str, int], length: int, family: int) -> ProxyHeader:
    return ProxyHeader(1, "PROXY", family, source, destination, length)


V1_UNKNOWN = ProxyHeader(1, "PROXY", AF_UNSPEC, None, None, 15, (), 0)
V2_LOCAL = ProxyHeader(2, "LOCAL", AF_UNSPEC, None, None, 16, (), 0)
FULL_V6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
WORST_CASE_V1 = f"PROXY UNKNOWN {FULL_V6} {FULL_V6} 65535 65535\r\n".encode()
# Captured from haproxy (send-proxy-v2) in github.com/seriousben/experiment-proxy-protocol.
HAPROXY_TCP4 = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")

# --------------------------------------------------------------------------- v1 tables

V1_VALID = [
    pytest.param(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        v1(("192.168.0.1", 56324), ("192.168.0.11", 443), 47, AF_INET),
        id="spec-example",
    ),
    pytest.param(
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        v1(("0.0.0.0", 0), ("255.255.255.255", 65535), 44, AF_INET),
        id="tcp4-port-bounds",
    ),
    pytest.param(
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        v1(("255.255.255.255", 65535), ("255.255.255.255", 65535), 56, AF_INET),
        id="tcp4-longest-56",
    ),
    pytest.param(
        b"PROXY TCP4 10.0.0.1 10.0.0.2 1 10\r\n",
        v1(("10.0.0.1", 1), ("10.0.0.2", 10), 35, AF_INET),
        id="tcp4-short-ports",
    ),
    pytest.param(
        b"PROXY TCP6 ::1 ::1 1 2\r\n",
        v1(("::1", 1), ("::1", 2), 24, AF_INET6),
        id="tcp6-loopback",
    ),
    pytest.param(
        f"PROXY TCP6 {FULL_V6} {FULL_V6} 65535 65535\r\n".encode(),
        v1((FULL_V6, 65535), (FULL_V6, 65535), 104, AF_INET6),
        id="tcp6-longest-104",
    ),
    pytest.param(
        b"PROXY TCP6 2001:DB8::A :: 80 0\r\n",
        v1(("2001:db8::a", 80), ("::", 0), 32, AF_INET6),
        id="tcp6-uppercase-normalised",
    ),
    pytest.param(
        b"PROXY TCP6 2001:0db8:0000:0000:0000:0000:0000:0001 fe80::1 443 8443\r\n",
        v1(("2001:db8::1", 443), ("fe80::1", 8443), 69, AF_INET6),
        id="tcp6-uncompressed-normalised",
    ),
    pytest.param(
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 5 6\r\n",
        v1((ipaddress.IPv6Address("::ffff:192.0.2.1").compressed, 5), ("::1", 6), 37, AF_INET6),
        id="tcp6-ipv4-mapped-dotted",
    ),
    pytest.param(b"PROXY UNKNOWN\r\n", V1_UNKNOWN, id="unknown-short"),
    pytest.param(WORST_CASE_V1, replace(V1_UNKNOWN, length=107), id="unknown-worst-case-107"),
    pytest.param(b"PROXY UNKNOWN \r\n", replace(V1_UNKNOWN, length=16), id="unknown-trailing-space"),
    pytest.param(
        b"PROXY UNKNOWN whatever \x00\xff ignored\r\n",
        replace(V1_UNKNOWN, length=35),
        id="unknown-rest-ignored",
    ),
]

V1_INVALID = [
    pytest.param(b"GET / HTTP/1.1\r\n", "not a PROXY protocol header", id="http"),
    pytest.param(b"PROXY\r\n", "not a PROXY protocol header", id="no-space"),
    pytest.param(b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header", id="lowercase-proxy"),
    pytest.param(b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol b''", id="double-space"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol b'TCP5'", id="tcp5"),
    pytest.param(b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol b'tcp4'", id="lowercase-tcp4"),
    pytest.param(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol b'UDP4'", id="udp4"),
    pytest.param(b"PROXY UNKNOWNX\r\n", "protocol b'UNKNOWNX'", id="unknownx"),
    pytest.param(b"PROXY \r\n", "protocol b''", id="empty-protocol"),
    pytest.param(b"PROXY TCP4\r\n", "expected 4", id="tcp4-no-fields"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "got 3", id="missing-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "got 5", id="extra-field"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "got 5", id="trailing-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "got 5", id="inner-double-space"),
    pytest.param(b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "got 3", id="tab-separator"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "destination port b'65536'", id="port-65536"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n", "source port b'99999'", id="port-99999"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 123456 2\r\n", "source port", id="port-6-digits"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "source port b'01'", id="port-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", "source port b'00'", id="port-00"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "source port", id="port-negative"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "source port", id="port-plus"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n", "source port", id="port-hex"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n", "source port", id="port-underscore"),
    pytest.param("PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(), "source port", id="port-unicode-digit"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "destination port", id="port-nul"),
    pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "source address b'1.2.3.256'", id="octet-256"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "source address", id="octet-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n", "destination address", id="octet-08"),
    pytest.param(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "source address", id="three-octets"),
    pytest.param(b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "source address", id="five-octets"),
    pytest.param(b"PROXY TCP4 1.2.3.4. 5.6.7.8 1 2\r\n", "source address", id="trailing-dot"),
    pytest.param(b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "source address", id="hostname"),
    pytest.param(b"PROXY TCP4 ::1 ::1 1 2\r\n", "source address", id="ipv6-in-tcp4"),
    pytest.param(b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "source address", id="ipv4-in-tcp6"),
    pytest.param(b"PROXY TCP6 ::1 ::g 1 2\r\n", "destination address", id="ipv6-bad-hex"),
    pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "source address", id="ipv6-nine-groups"),
    pytest.param(b"PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n", "source address", id="ipv6-seven-groups"),
    pytest.param(b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "source address", id="ipv6-two-double-colons"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "source address", id="ipv6-scope-id"),
    pytest.param(b"PROXY TCP6 12345::1 ::1 1 2\r\n", "source address", id="ipv6-five-digit-group"),
    pytest.param(b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n", "source address", id="ipv6-dotted-leading-zero"),
    pytest.param(b"PROXY TCP6 [::1] ::1 1 2\r\n", "source address", id="ipv6-brackets"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF without CR", id="lf-only"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "lone CR or LF", id="cr-inside-line"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "lone CR or LF", id="cr-cr-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n", "lone CR or LF", id="lf-inside-line"),
    pytest.param(b"PROXY UNKNOWN a\nb\r\n", "lone CR or LF", id="unknown-with-lf"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "no CRLF within the first 107", id="108-bytes"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 200, "no CRLF within the first 107", id="no-crlf-at-all"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b"0" * 80, "destination port", id="port-runs-on"),
]


@pytest.mark.parametrize(("data", "expected"), V1_VALID)
def test_v1_valid(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected
    assert expected.length == len(data)


@pytest.mark.parametrize(("data", "expected"), V1_VALID)
def test_v1_valid_with_trailing_payload(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data + b"GET / HTTP/1.1\r\n\r\n") == expected


@pytest.mark.parametrize(("data", "message"), V1_INVALID)
def test_v1_invalid(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=re.escape(message)) as caught:
        parse(data)
    assert "\n" not in str(caught.value)


def test_v1_length_limit_is_exactly_107_bytes() -> None:
    assert len(WORST_CASE_V1) == MAX_V1_LENGTH
    assert parse(WORST_CASE_V1) is not None
    longer = WORST_CASE_V1.replace(b"UNKNOWN ", b"UNKNOWN  ")
    assert len(longer) == MAX_V1_LENGTH + 1
    with pytest.raises(ProxyProtocolError, match="no CRLF within the first 107 bytes"):
        parse(longer)
    # 106 bytes without a CRLF may still end with one: wait for more.
    assert parse(WORST_CASE_V1[:106]) is None


def test_v1_max_length_below_107_limits_the_line() -> None:
    line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert parse(line, max_length=56) is not None
    with pytest.raises(ProxyProtocolError, match="no CRLF within the first 55 bytes"):
        parse(line, max_length=55)


# --------------------------------------------------------------------------- v2 tables

TCP4_BLOCK = ip4("1.2.3.4") + ip4("5.6.7.8") + port(1) + port(2)
TCP6_BLOCK = ip6("2001:db8::1") + ip6("::ffff:0:1") + port(443) + port(65535)
UNIX_BLOCK = unix_path(b"/run/client.sock") + unix_path(b"/run/server.sock")

V2_VALID = [
    pytest.param(
        HAPROXY_TCP4,
        ProxyHeader(2, "PROXY", AF_INET, ("172.19.0.1", 42578), ("172.19.0.3", 80), 28),
        id="haproxy-capture",
    ),
    pytest.param(
        v2raw(0x21, 0x11, TCP4_BLOCK), ProxyHeader(2, "PROXY", AF_INET, ("1.2.3.4", 1), ("5.6.7.8", 2), 28), id="tcp4"
    ),
    pytest.param(
        v2raw(0x21, 0x12, TCP4_BLOCK),
        ProxyHeader(2, "PROXY", AF_INET, ("1.2.3.4", 1), ("5.6.7.8", 2), 28, (), DGRAM),
        id="udp4",
    ),
    pytest.param(
        v2raw(0x21, 0x11, ip4("0.0.0.0") + ip4("255.255.255.255") + port(0) + port(65535)),
        ProxyHeader(2, "PROXY", AF_INET, ("0.0.0.0", 0), ("255.255.255.255", 65535), 28),
        id="tcp4-bounds",
    ),
    pytest.param(
        v2raw(0x21, 0x21, TCP6_BLOCK),
        ProxyHeader(2, "PROXY", AF_INET6, ("2001:db8::1", 443), ("::ffff:0:1", 65535), 52),
        id="tcp6",
    ),
    pytest.param(
        v2raw(0x21, 0x22, TCP6_BLOCK),
        ProxyHeader(2, "PROXY", AF_INET6, ("2001:db8::1", 443), ("::ffff:0:1", 65535), 52, (), DGRAM),
        id="udp6",
    ),
    pytest.param(
        v2raw(0x21, 0x31, UNIX_BLOCK),
        ProxyHeader(2, "PROXY", AF_UNIX, ("/run/client.sock", 0), ("/run/server.sock", 0), 232),
        id="unix-stream",
    ),
    pytest.param(
        v2raw(0x21, 0x32, unix_path(b"\0abstract") + unix_path(b"")),
        ProxyHeader(2, "PROXY", AF_UNIX, ("\0abstract", 0), ("", 0), 232, (), DGRAM),
        id="unix-dgram-abstract-and-unnamed",
    ),
    pytest.param(
        v2raw(0x21, 0x31, unix_path(b"/a\0junk") + unix_path("/ünï".encode())),
        ProxyHeader(2, "PROXY", AF_UNIX, ("/a", 0), ("/ünï", 0), 232),
        id="unix-junk-after-nul-and-utf8",
    ),
    pytest.param(v2raw(0x20, 0x00, b""), V2_LOCAL, id="local"),
    pytest.param(v2raw(0x20, 0x11, b""), V2_LOCAL, id="local-family-without-addresses"),
    pytest.param(v2raw(0x20, 0x11, TCP4_BLOCK), replace(V2_LOCAL, length=28), id="local-addresses-skipped"),
    pytest.param(v2raw(0x20, 0x00, b"\xff" * 5), replace(V2_LOCAL, length=21), id="local-opaque-block"),
    pytest.param(
        v2raw(0x21, 0x00, b""),
        ProxyHeader(2, "PROXY", AF_UNSPEC, None, None, 16, (), 0),
        id="proxy-unspec",
    ),
    pytest.param(
        v2raw(0x21, 0x00, b"\x01\x02\x03\x04"),
        ProxyHeader(2, "PROXY", AF_UNSPEC, None, None, 20, (), 0),
        id="proxy-unspec-opaque-block",
    ),
    pytest.param(
        v2raw(
            0x21,
            0x11,
            TCP4_BLOCK + tlv(PP2_TYPE_ALPN, b"h2") + tlv(PP2_TYPE_AUTHORITY, b"example.com") + tlv(PP2_TYPE_NOOP, b""),
        ),
        ProxyHeader(
            2,
            "PROXY",
            AF_INET,
            ("1.2.3.4", 1),
            ("5.6.7.8", 2),
            28 + 5 + 14 + 3,
            ((PP2_TYPE_ALPN, b"h2"), (PP2_TYPE_AUTHORITY, b"example.com"), (PP2_TYPE_NOOP, b"")),
        ),
        id="tlvs-in-order",
    ),
    pytest.param(
        v2raw(0x21, 0x21, TCP6_BLOCK + tlv(0xE0, b"x" * 300)),
        ProxyHeader(2, "PROXY", AF_INET6, ("2001:db8::1", 443), ("::ffff:0:1", 65535), 52 + 303, ((0xE0, b"x" * 300),)),
        id="tlv-custom-long",
    ),
]


def with_crc(header: bytes, offset: int) -> bytes:
    """Fill in the 4 zero bytes at ``offset`` with the header's CRC32c, computed independently."""
    value = crc32c(header)
    return header[:offset] + value.to_bytes(4, "big") + header[offset + 4 :]


CRC_TEMPLATE = v2raw(0x21, 0x11, TCP4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\0\0\0\0"))
CRC_VALID = with_crc(CRC_TEMPLATE, 31)

V2_INVALID = [
    *(
        pytest.param(
            SIG[:i] + bytes((SIG[i] ^ 0x40,)) + SIG[i + 1 :] + HAPROXY_TCP4[12:],
            "not a PROXY protocol header",
            id=f"signature-byte-{i}",
        )
        for i in range(12)
    ),
    *(
        pytest.param(v2raw(version << 4 | 1, 0x11, TCP4_BLOCK), f"version {version}", id=f"version-{version}")
        for version in (0, 1, 3, 0xF)
    ),
    *(
        pytest.param(v2raw(0x20 | command, 0x11, TCP4_BLOCK), f"command 0x{command:X}", id=f"command-{command}")
        for command in (2, 3, 0xF)
    ),
    *(
        pytest.param(v2raw(0x21, family << 4 | 1, TCP4_BLOCK), "address family", id=f"family-{family}")
        for family in (4, 8, 0xF)
    ),
    *(
        pytest.param(v2raw(0x21, 0x10 | proto, TCP4_BLOCK), "transport protocol", id=f"protocol-{proto}")
        for proto in (3, 0xF)
    ),
    *(
        pytest.param(v2raw(0x21, fam, TCP4_BLOCK), "mixes an unspecified", id=f"fam-0x{fam:02x}")
        for fam in (0x10, 0x20, 0x30, 0x01, 0x02)
    ),
    pytest.param(v2raw(0x20, 0x41, b""), "address family", id="local-bad-family"),
    pytest.param(v2raw(0x21, 0x11, TCP4_BLOCK[:11]), "shorter than the 12 bytes AF_INET", id="ipv4-block-11"),
    pytest.param(v2raw(0x21, 0x11, b""), "shorter than the 12 bytes AF_INET", id="ipv4-block-0"),
    pytest.param(v2raw(0x21, 0x21, TCP6_BLOCK[:35]), "shorter than the 36 bytes AF_INET6", id="ipv6-block-35"),
    pytest.param(v2raw(0x21, 0x21, TCP4_BLOCK), "shorter than the 36 bytes AF_INET6", id="ipv6-with-ipv4-block"),
    pytest.param(v2raw(0x21, 0x31, UNIX_BLOCK[:215]), "shorter than the 216 bytes AF_UNIX", id="unix-block-215"),
    pytest.param(SIG + b"\x21\x11\xff\xff", "65551 bytes exceeds the limit of 4096", id="oversized-65535"),
    pytest.param(SIG + b"\x21\x11\x0f\xf1", "4097 bytes exceeds the limit of 4096", id="oversized-by-one"),
    pytest.param(v2raw(0x21, 0x11, TCP4_BLOCK + b"\x01"), "too short for a TLV", id="tlv-1-byte"),
    pytest.param(v2raw(0x21, 0x11, TCP4_BLOCK + b"\x01\x00"), "too short for a TLV", id="tlv-2-bytes"),
    pytest.param(v2raw(0x21, 0x11, TCP4_BLOCK + b"\x01\x00\x03ab"), "declares 3 bytes", id="tlv-overrun"),
    pytest.param(
        v2raw(0x21, 0x11, TCP4_BLOCK + tlv(PP2_TYPE_ALPN, b"h2") + b"\x02\xff\xff"),
        "declares 65535 bytes",
        id="second-tlv-overrun",
    ),
    pytest.param(CRC_TEMPLATE, "does not match the computed", id="crc-zero"),
    pytest.param(CRC_VALID[:20] + b"\x63" + CRC_VALID[21:], "does not match", id="crc-after-address-change"),
    pytest.param(
        v2raw(0x21, 0x11, TCP4_BLOCK + tlv(PP2_TYPE_CRC32C, b"abc")), "3 value bytes instead of 4", id="crc-short"
    ),
    pytest.param(
        v2raw(0x21, 0x11, TCP4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\0" * 4) + tlv(PP2_TYPE_CRC32C, b"\0" * 4)),
        "more than one CRC32C",
        id="crc-twice",
    ),
]


@pytest.mark.parametrize(("data", "expected"), V2_VALID)
def test_v2_valid(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected
    assert expected.length == len(data)


@pytest.mark.parametrize(("data", "expected"), V2_VALID)
def test_v2_valid_with_trailing_payload(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data + b"\r\n\r\n\x00payload") == expected


@pytest.mark.parametrize(("data", "message"), V2_INVALID)
def test_v2_invalid(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=re.escape(message)) as caught:
        parse(data)
    assert "\n" not in str(caught.value)


def test_v2_crc32c_valid_header_is_accepted() -> None:
    header = parse(CRC_VALID)
    assert header is not None
    assert header.tlvs == ((PP2_TYPE_CRC32C, CRC_VALID[31:35]),)


def test_crc32c_known_vector() -> None:
    # RFC 3720 / iSCSI check value for CRC32c.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_v2_max_length_is_inclusive() -> None:
    assert parse(HAPROXY_TCP4, max_length=28) is not None
    with pytest.raises(ProxyProtocolError, match="28 bytes exceeds the limit of 27"):
        parse(HAPROXY_TCP4, max_length=27)
    big = v2raw(0x21, 0x11, TCP4_BLOCK + tlv(0xE1, b"z" * (MAX_V2_LENGTH - 16 - 12 - 3)))
    assert len(big) == MAX_V2_LENGTH
    header = parse(big, max_length=MAX_V2_LENGTH)
    assert header is not None and header.length == MAX_V2_LENGTH


@pytest.mark.parametrize("max_length", [0, 15, MAX_V2_LENGTH + 1])
def test_max_length_argument_is_checked(max_length: int) -> None:
    with pytest.raises(ValueError, match="max_length must be between 16 and 65551"):
        parse(b"PROXY ", max_length=max_length)


# --------------------------------------------------------------------------- early rejection and prefixes

EARLY_REJECT = [
    b"G",
    b"GET / HTTP/1.1",
    b"\x16\x03\x01\x02\x00",  # TLS ClientHello
    b"SSH-2.0-OpenSSH",
    b"\x00",
    b"PROXX",
    b"PROXY\t",
    b"PROXY X",
    b"PROXY TCP44",
    b"PROXY UNKNOWNX",
    b"PROXY  ",
    b"PROXY TCP4  ",
    b"PROXY TCP4 1.2.3.256",
    b"PROXY TCP4 01",
    b"PROXY TCP4 1.2.3.4.",
    b"PROXY TCP4 1..",
    b"PROXY TCP4 ::",
    b"PROXY TCP6 1:::",
    b"PROXY TCP6 1::2::",
    b"PROXY TCP6 g",
    b"PROXY TCP6 " + b"1" * 46,
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 00",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
    b"PROXY TCP4 1.2.3.4\n",
    b"PROXY TCP4 1.2.3.4\rx",
    b"PROXY UNKNOWN \n",
    b"\r\r",
    b"\r\n\r\n\x00\r\nQUIX",
    SIG + b"\x11",
    SIG + b"\x31",
    SIG + b"\x22",
    SIG + b"\x21\x41",
    SIG + b"\x21\x13",
    SIG + b"\x21\x10",
    SIG + b"\x21\x11\x00\x0b",
    SIG + b"\x21\x11\xff\xff",
]


@pytest.mark.parametrize("data", EARLY_REJECT, ids=repr)
def test_rejects_as_soon_as_the_bytes_cannot_become_a_header(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(data)


VALID_PREFIXES = [
    b"",
    b"P",
    b"PROXY",
    b"PROXY ",
    b"PROXY T",
    b"PROXY TCP4",
    b"PROXY TCP4 ",
    b"PROXY TCP4 1.2.",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
    b"PROXY TCP6 ::ffff:1.2",
    b"PROXY UNKNOWN",
    b"PROXY UNKNOWN anything at all",
    b"\r",
    SIG[:5],
    SIG,
    SIG + b"\x21",
    SIG + b"\x21\x11\x00",
    SIG + b"\x21\x11\x00\x0c" + b"\x01" * 11,
    SIG + b"\x20\x31\x00\x05",
]


@pytest.mark.parametrize("data", VALID_PREFIXES, ids=repr)
def test_incomplete_but_valid_prefix_returns_none(data: bytes) -> None:
    assert parse(data) is None


INCREMENTAL_SAMPLES = [p.values[0] for p in V1_VALID] + [p.values[0] for p in V2_VALID] + [CRC_VALID]


@pytest.mark.parametrize("data", INCREMENTAL_SAMPLES, ids=repr)
def test_every_prefix_is_incomplete_until_the_header_ends(data: bytes) -> None:
    for end in range(len(data)):
        assert parse(data[:end]) is None, f"prefix of {end} bytes"
    header = parse(data)
    assert header is not None and header.length == len(data)
    assert parse(data + b"\x00\r\nPROXY payload") == header


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_like_inputs(kind: type[bytes] | type[bytearray] | type[memoryview]) -> None:
    expected = parse(HAPROXY_TCP4)
    assert parse(kind(HAPROXY_TCP4 + b"payload")) == expected
    assert parse(memoryview(b"xx" + HAPROXY_TCP4)[2:]) == expected


# --------------------------------------------------------------------------- builders

BUILD_V1 = [
    pytest.param(("192.168.0.1", 56324), ("192.168.0.11", 443), b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"),
    pytest.param(("2001:DB8:0::1", 0), ("::1", 65535), b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n"),
    pytest.param(None, None, b"PROXY UNKNOWN\r\n"),
]


@pytest.mark.parametrize(("source", "destination", "expected"), BUILD_V1)
def test_build_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None, expected: bytes) -> None:
    assert build_v1(source, destination) == expected
    header = parse(expected)
    assert header is not None
    assert encode_header(header) == expected


def test_build_v2_matches_haproxy() -> None:
    assert build_v2(("172.19.0.1", 42578), ("172.19.0.3", 80)) == HAPROXY_TCP4


def test_build_v2_forms() -> None:
    assert build_v2(None, None) == SIG + b"\x20\x00\x00\x00"
    assert build_v2(None, None, command="LOCAL") == SIG + b"\x20\x00\x00\x00"
    assert build_v2(("2001:db8::1", 443), ("::ffff:0:1", 65535)) == v2raw(0x21, 0x21, TCP6_BLOCK)
    assert build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), protocol=DGRAM) == v2raw(0x21, 0x12, TCP4_BLOCK)
    unix = build_v2(("/run/client.sock", 0), ("/run/server.sock", 0), family=AF_UNIX)
    assert unix == v2raw(0x21, 0x31, UNIX_BLOCK)
    with_tlvs = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(PP2_TYPE_ALPN, b"h2"), (0xE0, b"")])
    assert with_tlvs == v2raw(0x21, 0x11, TCP4_BLOCK + tlv(PP2_TYPE_ALPN, b"h2") + tlv(0xE0, b""))


def test_build_v2_checksum_is_verified_by_parse() -> None:
    data = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), checksum=True)
    assert data == CRC_VALID
    flipped = data[:27] + bytes((data[27] ^ 1,)) + data[28:]
    with pytest.raises(ProxyProtocolError, match="CRC32C checksum"):
        parse(flipped)


BUILD_ERRORS = [
    pytest.param(lambda: build_v1(("1.2.3.4", 1), ("::1", 2)), "same family", id="v1-mixed-family"),
    pytest.param(lambda: build_v1(("1.2.3.4", 65536), ("5.6.7.8", 2)), "65536", id="v1-port-high"),
    pytest.param(lambda: build_v1(("1.2.3.4", -1), ("5.6.7.8", 2)), "-1", id="v1-port-negative"),
    pytest.param(lambda: build_v1(("1.2.3.4", True), ("5.6.7.8", 2)), "True", id="v1-port-bool"),
    pytest.param(lambda: build_v1(("localhost", 1), ("5.6.7.8", 2)), "not an IP address", id="v1-hostname"),
    pytest.param(lambda: build_v1(("fe80::1%eth0", 1), ("::1", 2)), "scoped", id="v1-scope"),
    pytest.param(lambda: build_v1(("1.2.3.4", 1), None), "only one", id="v1-one-address"),
    pytest.param(lambda: build_v2(("1.2.3.4", 1), ("::1", 2)), "same family", id="v2-mixed-family"),
    pytest.param(lambda: build_v2(None, ("::1", 2)), "only one", id="v2-one-address"),
    pytest.param(lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), command="LOCAL"), "LOCAL", id="v2-local-addr"),
    pytest.param(lambda: build_v2(None, None, tlvs=[(1, b"x")]), "TLVs", id="v2-local-tlvs"),
    pytest.param(lambda: build_v2(None, None, command="HEALTH"), "HEALTH", id="v2-bad-command"),
    pytest.param(lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), protocol=0), "protocol", id="v2-protocol"),
    pytest.param(lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), family=AF_INET6), "AF_INET6", id="v2-family"),
    pytest.param(lambda: build_v2(("/a", 0), ("/b", 0)), "not an IP address", id="v2-path-without-family"),
    pytest.param(lambda: build_v2(("/" + "a" * 108, 0), ("/b", 0), family=AF_UNIX), "exceed 108", id="v2-path-long"),
    pytest.param(lambda: build_v2(("/a\0b", 0), ("/b", 0), family=AF_UNIX), "NUL", id="v2-path-nul"),
    pytest.param(lambda: build_v2(("\0a\0", 0), ("/b", 0), family=AF_UNIX), "NUL", id="v2-abstract-trailing-nul"),
    pytest.param(lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(256, b"")]), "one byte", id="v2-tlv-type"),
    pytest.param(lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(1, b"x" * 65536)]), "65536", id="v2-tlv-long"),
    pytest.param(
        lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(1, b"x" * 65000), (2, b"y" * 600)]),
        "exceed 65535",
        id="v2-total-long",
    ),
    pytest.param(
        lambda: build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(PP2_TYPE_CRC32C, b"")]), "CRC32C", id="v2-crc-size"
    ),
]


@pytest.mark.parametrize(("call", "message"), BUILD_ERRORS)
def test_build_rejects_bad_arguments(call: Callable[[], bytes], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        call()
    assert not isinstance(caught.value, ProxyProtocolError)


@pytest.mark.parametrize(("data", "expected"), V2_VALID)
def test_encode_header_round_trips_v2(data: bytes, expected: ProxyHeader) -> None:
    encoded = encode_header(expected)
    assert parse(encoded) == replace(expected, length=len(encoded))


def test_encode_header_recomputes_checksum_over_canonical_bytes() -> None:
    junk_path = v2raw(0x21, 0x31, unix_path(b"/a\0junk") + unix_path(b"/b") + tlv(PP2_TYPE_CRC32C, b"\0" * 4))
    data = with_crc(junk_path, 16 + 216 + 3)
    header = parse(data)
    assert header is not None and header.source == ("/a", 0)
    encoded = encode_header(header)
    assert encoded != data
    assert parse(encoded) == replace(header, tlvs=((PP2_TYPE_CRC32C, encoded[-4:]),))


# --------------------------------------------------------------------------- property tests

PORTS = st.integers(0, 0xFFFF)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)
TLVS = st.lists(
    st.tuples(st.integers(0, 0xFF).filter(lambda t: t != PP2_TYPE_CRC32C), st.binary(max_size=24)), max_size=4
)
UNIX_PATHS = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=20).map(lambda s: "/tmp/" + s),
    st.text(st.characters(codec="ascii", exclude_characters="\0"), min_size=1, max_size=30).map(lambda s: "\0" + s),
)


@st.composite
def valid_headers(draw: st.DrawFn) -> bytes:
    """Wire bytes of an arbitrary valid header of either version."""
    kind = draw(st.sampled_from(["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-ip", "v2-unix", "v2-local"]))
    if kind == "v1-unknown":
        return b"PROXY UNKNOWN\r\n"
    if kind == "v2-local":
        return build_v2(None, None)
    if kind == "v2-unix":
        source, destination = (draw(UNIX_PATHS), 0), (draw(UNIX_PATHS), 0)
        family: int | None = AF_UNIX
    else:
        if kind == "v1-tcp4":
            addresses = IPV4
        elif kind == "v1-tcp6":
            addresses = IPV6
        else:
            addresses = draw(st.sampled_from([IPV4, IPV6]))
        source, destination = (draw(addresses), draw(PORTS)), (draw(addresses), draw(PORTS))
        family = None
    if kind.startswith("v1"):
        return build_v1(source, destination)
    return build_v2(
        source,
        destination,
        family=family,
        protocol=draw(st.sampled_from([STREAM, DGRAM])),
        tlvs=draw(TLVS),
        checksum=draw(st.booleans()),
    )


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_headers()) + draw(st.binary(max_size=6)))
    for _ in range(draw(st.integers(1, 3))):
        operation = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "flip"]))
        index = draw(st.integers(0, max(0, len(data) - 1)))
        if operation == "insert":
            data.insert(index, draw(st.integers(0, 0xFF)))
        elif not data:
            continue
        elif operation == "replace":
            data[index] = draw(st.integers(0, 0xFF))
        elif operation == "flip":
            data[index] ^= 1 << draw(st.integers(0, 7))
        elif operation == "delete":
            del data[index]
        else:
            del data[index:]
    return bytes(data)


def assert_faithful(data: bytes, header: ProxyHeader) -> None:
    """``header`` must say exactly what ``data`` says: nothing malformed was accepted."""
    assert 15 <= header.length <= len(data)
    wire = data[: header.length]
    again = encode_header(header)
    assert parse(again) == replace(header, length=len(again))
    if header.version == 1:
        assert wire.endswith(b"\r\n") and b"\r" not in wire[:-2] and b"\n" not in wire[:-2]
        tokens = wire[:-2].split(b" ")
        if header.family == AF_UNSPEC:
            assert tokens[:2] == [b"PROXY", b"UNKNOWN"]
        elif header.family == AF_INET:
            assert again == wire  # dotted quads without leading zeros are canonical
        else:
            assert header.source is not None and header.destination is not None
            assert tokens[:2] == [b"PROXY", b"TCP6"] and len(tokens) == 6
            assert ipaddress.IPv6Address(tokens[2].decode()) == ipaddress.IPv6Address(header.source[0])
            assert ipaddress.IPv6Address(tokens[3].decode()) == ipaddress.IPv6Address(header.destination[0])
            assert tokens[4:] == [str(header.source[1]).encode(), str(header.destination[1]).encode()]
        return
    assert wire[:12] == SIG and header.length == 16 + int.from_bytes(wire[14:16], "big")
    if header.command == "LOCAL" or header.family == AF_UNSPEC:
        assert wire[12] in (0x20, 0x21)
    elif header.family in (AF_INET, AF_INET6):
        assert again == wire  # the binary IP form is canonical, TLVs included
    else:
        assert wire[12:14] == again[12:14]
        for offset in (16, 16 + 108):
            sent, name = wire[offset : offset + 108], again[offset : offset + 108].rstrip(b"\0")
            # Abstract names keep everything but trailing NULs; paths end at their first NUL.
            assert (sent.rstrip(b"\0") if sent[:1] == b"\0" else sent.split(b"\0", 1)[0]) == name
        if not any(t == PP2_TYPE_CRC32C for t, _ in header.tlvs):
            assert wire[16 + 216 :] == again[16 + 216 :]


PROPERTY_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

V1_PIECES = [b"TCP4", b"TCP6", b"UNKNOWN", b" ", b"1.2.3.4", b"::1", b"ffff:", b"65535", b"0", b"00", b"256"]
V1_PIECES += [b"\r\n", b"\r", b"\n", b":", b".", b"1", b"a", b"\x00", b"\xff"]


@PROPERTY_SETTINGS
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=120).map(lambda b: V1_PREFIX + b),
        st.lists(st.sampled_from(V1_PIECES), max_size=14).map(lambda p: V1_PREFIX + b"".join(p)),
        st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
        st.tuples(st.sampled_from([0x20, 0x21]), st.binary(max_size=300)).map(
            lambda t: V2_SIGNATURE + bytes((t[0],)) + t[1]
        ),
    ),
    st.integers(16, 1024),
)
def test_random_bytes_only_ever_raise_proxy_protocol_error(data: bytes, max_length: int) -> None:
    try:
        header = parse(data, max_length=max_length)
    except ProxyProtocolError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    if header is not None:
        assert header.length <= max_length
        assert_faithful(data, header)


@PROPERTY_SETTINGS
@given(mutations())
def test_mutated_headers_are_rejected_incomplete_or_faithful(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    if header is not None:
        assert_faithful(data, header)


@PROPERTY_SETTINGS
@given(valid_headers(), st.binary(max_size=16))
def test_valid_headers_parse_incrementally(data: bytes, payload: bytes) -> None:
    for end in range(len(data)):
        assert parse(data[:end]) is None
    header = parse(data + payload)
    assert header is not None and header.length == len(data)
    assert encode_header(header) == data


@PROPERTY_SETTINGS
@given(st.one_of(st.tuples(IPV4, IPV4), st.tuples(IPV6, IPV6)), PORTS, PORTS)
def test_ip_round_trip_both_versions(addresses: tuple[str, str], source_port: int, destination_port: int) -> None:
    source, destination = (addresses[0], source_port), (addresses[1], destination_port)
    family = AF_INET if ":" not in addresses[0] else AF_INET6
    line = build_v1(source, destination)
    assert parse(line) == ProxyHeader(1, "PROXY", family, source, destination, len(line))
    binary = build_v2(source, destination)
    assert parse(binary) == ProxyHeader(2, "PROXY", family, source, destination, len(binary))


@PROPERTY_SETTINGS
@given(UNIX_PATHS, UNIX_PATHS, TLVS)
def test_unix_round_trip(source: str, destination: str, tlvs: list[tuple[int, bytes]]) -> None:
    data = build_v2((source, 0), (destination, 0), family=AF_UNIX, tlvs=tlvs, checksum=True)
    header = parse(data)
    assert header is not None
    assert (header.family, header.source, header.destination) == (AF_UNIX, (source, 0), (destination, 0))
    assert header.tlvs[:-1] == tuple(tlvs) and header.tlvs[-1][0] == PP2_TYPE_CRC32C


# --------------------------------------------------------------------------- read_header on real sockets


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    server.settimeout(2.0)
    client.settimeout(2.0)
    yield server, client
    server.close()
    client.close()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(2.0)
        client = socket.create_connection(listener.getsockname(), timeout=2.0)
        server, _ = listener.accept()
    server.settimeout(2.0)
    yield server, client
    server.close()
    client.close()


class Trickler(threading.Thread):
    """Sends ``chunks`` with a pause before each, until stopped."""

    def __init__(self, sock: socket.socket, chunks: list[bytes], pause: float) -> None:
        super().__init__(daemon=True)
        self.sock, self.chunks, self.pause = sock, chunks, pause
        self.stopped = threading.Event()

    def run(self) -> None:
        for chunk in self.chunks:
            if self.stopped.wait(self.pause):
                return
            try:
                self.sock.sendall(chunk)
            except OSError:
                return

    def stop(self) -> None:
        self.stopped.set()
        self.finish()

    def finish(self) -> None:
        self.join(timeout=2.0)
        assert not self.is_alive()


def rest_of_stream(sock: socket.socket, expected: int) -> bytes:
    data = b""
    sock.settimeout(1.0)
    while len(data) < expected:
        chunk = sock.recv(expected - len(data))
        if not chunk:
            break
        data += chunk
    return data


PAYLOAD = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
SOCKET_SAMPLES = [
    pytest.param(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", id="v1"),
    pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
    pytest.param(HAPROXY_TCP4, id="v2"),
    pytest.param(build_v2(("/a", 0), ("/b", 0), family=AF_UNIX, tlvs=[(1, b"h2")]), id="v2-unix"),
    pytest.param(build_v2(None, None), id="v2-local"),
]


@pytest.mark.parametrize("data", SOCKET_SAMPLES)
@pytest.mark.parametrize("sockets", ["pair", "tcp_pair"])
def test_read_header_leaves_payload_unread(data: bytes, sockets: str, request: pytest.FixtureRequest) -> None:
    server, client = request.getfixturevalue(sockets)
    client.sendall(data + PAYLOAD)
    header, extra = read_header(server, timeout=1.0)
    assert header == parse(data)
    assert extra == b""
    assert server.gettimeout() == 2.0
    assert rest_of_stream(server, len(PAYLOAD)) == PAYLOAD


@pytest.mark.parametrize("data", SOCKET_SAMPLES)
def test_read_header_reassembles_fragments(data: bytes, pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    chunks = [data[:1], data[1:7], data[7:17], data[17:] + PAYLOAD]
    sender = Trickler(client, chunks, pause=0.01)
    sender.start()
    try:
        header, _ = read_header(server, timeout=1.5)
    finally:
        sender.finish()  # let it send the payload too
    assert header == parse(data)
    assert rest_of_stream(server, len(PAYLOAD)) == PAYLOAD


def test_read_header_timeout_bounds_a_slow_loris(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    sender = Trickler(client, [bytes((b,)) for b in line], pause=0.04)  # ~1.9 s for the whole line
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match=r"within 0.3 s \(([1-9][0-9]*) header bytes received\)"):
            read_header(server, timeout=0.3)
    finally:
        sender.stop()
    elapsed = time.monotonic() - started
    assert 0.29 <= elapsed < 0.8
    assert server.gettimeout() == 2.0


def test_read_header_times_out_when_nothing_arrives(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"\(0 header bytes received\)"):
        read_header(server, timeout=0.1)
    assert time.monotonic() - started < 0.5


def test_read_header_eof_before_completion(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"PROXY TCP4 1.2.3.4")
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ProxyProtocolError, match=r"connection closed before the PROXY header completed \(18 "):
        read_header(server, timeout=1.0)


def test_read_header_eof_before_anything(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ProxyProtocolError, match="connection closed before the PROXY header completed"):
        read_header(server, timeout=1.0)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        SIG + b"\x21\x11\xff\xff",
        b"PROXY UNKNOWN " + b"x" * 200,
    ],
    ids=["http", "bad-port", "v2-oversized", "v1-no-crlf"],
)
def test_read_header_rejects_malformed_without_waiting(data: bytes, pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(data)
    started = time.monotonic()
    with pytest.raises(ProxyProtocolError):
        read_header(server, timeout=5.0)
    assert time.monotonic() - started < 0.5


def test_read_header_honours_max_length(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    data = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(0xE0, b"x" * 100)])
    client.sendall(data)
    with pytest.raises(ProxyProtocolError, match=f"{len(data)} bytes exceeds the limit of 64"):
        read_header(server, timeout=1.0, max_length=64)


def test_read_header_restores_non_blocking_mode(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    server.setblocking(False)
    client.sendall(HAPROXY_TCP4)
    header, _ = read_header(server, timeout=1.0, max_length=DEFAULT_MAX_LENGTH)
    assert header.source == ("172.19.0.1", 42578)
    assert server.gettimeout() == 0.0


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_read_header_requires_positive_timeout(timeout: float, pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(ValueError, match="timeout must be positive"):
        read_header(pair[0], timeout=timeout)
