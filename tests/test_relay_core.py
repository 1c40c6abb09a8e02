"""The relay's shared decisions as pure functions: settings, upstream order, PROXY header, words for failures.

Both relay forms (``RelayHandler``, socketserver; ``RelayProtocol``, asyncio)
call :mod:`prefork.handlers.relay_core`; the last tests check that each form
really does, so the two cannot drift apart again.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import ssl
import threading
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefork.handlers import relay_core
from prefork.handlers.aio import RelayProtocol
from prefork.handlers.relay import RelayHandler
from prefork.handlers.relay_core import Event, RelaySettings
from prefork.handlers.upstreams import Balanced
from prefork.proxy_protocol import parse

A, B, C = ("10.0.0.1", 7000), ("10.0.0.2", 7000), ("10.0.0.3", 7001)
ports = st.integers(min_value=1, max_value=65535)
hosts = st.text(min_size=1, max_size=30)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


def os_error(code: int) -> OSError:
    """The exception the kernel's ``code`` becomes in Python (``ConnectionRefusedError`` for ECONNREFUSED)."""
    return OSError(code, os.strerror(code))


def text(event: Event) -> str:
    return event.message % event.args


# -- upstreams ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("upstreams", "expected"), [
    ((), ()),
    ([], ()),
    ((A,), (A,)),
    ((A, B, C), (A, B, C)),
    ([["10.0.0.1", 7000]], (A,)),  # a list of lists, as read from a configuration file
    ((("::1", 1), ("h", 65535)), (("::1", 1), ("h", 65535))),
])
def test_upstreams_accepted_and_normalised_to_tuples(upstreams: Any, expected: Any) -> None:
    checked = relay_core.check_upstreams("Relay", upstreams)
    assert checked == expected
    assert type(checked) is tuple and all(type(item) is tuple for item in checked)


@pytest.mark.parametrize(("upstreams", "message"), [
    ("localhost:80", "Relay.upstreams must be a tuple of (host, port) pairs, not 'localhost:80'"),
    (b"localhost", "Relay.upstreams must be a tuple of (host, port) pairs"),
    (None, "Relay.upstreams must be a tuple of (host, port) pairs, not None"),
    ({"localhost": 80}, "Relay.upstreams must be a tuple of (host, port) pairs"),
    (("localhost", 80), "Relay.upstreams: 'localhost' is not a (host, port) pair"),
    ((("localhost", 0),), "Relay.upstreams: ('localhost', 0) is not a (host, port) pair with a port in 1-65535"),
    ((("localhost", 65536),), "port in 1-65535"),
    ((("localhost", -1),), "port in 1-65535"),
    ((("localhost", "80"),), "port in 1-65535"),
    ((("localhost", 80.0),), "port in 1-65535"),
    ((("localhost", True),), "port in 1-65535"),
    (((80, "localhost"),), "is not a (host, port) pair"),
    ((("localhost", 80, 0),), "is not a (host, port) pair"),
    (("ab",), "'ab' is not a (host, port) pair"),
    ((A, ("localhost",)), "('localhost',) is not a (host, port) pair"),
])
def test_bad_upstreams_are_refused_naming_the_class(upstreams: Any, message: str) -> None:
    with pytest.raises(TypeError) as caught:
        relay_core.check_upstreams("Relay", upstreams)
    assert message in str(caught.value)


@given(st.lists(st.tuples(hosts, ports), max_size=8))
def test_any_list_of_host_port_pairs_is_kept_in_order(pairs: list[tuple[str, int]]) -> None:
    assert relay_core.check_upstreams("R", [list(pair) for pair in pairs]) == tuple(pairs)


@given(hosts, st.one_of(st.integers(max_value=0), st.integers(min_value=65536)))
def test_any_port_outside_1_to_65535_is_refused(host: str, port: int) -> None:
    with pytest.raises(TypeError, match=r"^R\.upstreams: .* port in 1-65535$"):
        relay_core.check_upstreams("R", [(host, port)])


# -- timeouts and buffer size ------------------------------------------------------------------------------


@pytest.mark.parametrize(("connect_timeout", "idle_timeout"), [
    (5.0, 300.0), (1, 1), (0.001, None), (3600, 86400 * 7), (1e-9, 1e9),
])
def test_good_timeouts(connect_timeout: Any, idle_timeout: Any) -> None:
    assert relay_core.check_timeouts("R", connect_timeout, idle_timeout) is None


@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, float("nan"), float("inf"), True, False, "5", None, [5]])
def test_bad_connect_timeout(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^R\.connect_timeout must be positive seconds, not "):
        relay_core.check_timeouts("R", value, None)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, float("nan"), float("inf"), True, "300"])
def test_bad_idle_timeout(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^R\.idle_timeout must be positive seconds or None \(never\), not "):
        relay_core.check_timeouts("R", 5.0, value)


@pytest.mark.parametrize("value", [1, 4096, 65536, 1 << 24])
def test_good_buffer_size(value: int) -> None:
    assert relay_core.check_buffer_size("R", value) == value


@pytest.mark.parametrize("value", [0, -1, 1.5, 65536.0, True, "65536", None])
def test_bad_buffer_size(value: Any) -> None:
    with pytest.raises(ValueError, match=r"^R\.buffer_size must be a positive number of bytes, not "):
        relay_core.check_buffer_size("R", value)


@given(st.floats(min_value=1e-6, max_value=1e9), st.one_of(st.none(), st.floats(min_value=1e-6, max_value=1e9)))
def test_any_positive_finite_seconds_are_accepted(connect_timeout: float, idle_timeout: float | None) -> None:
    relay_core.check_timeouts("R", connect_timeout, idle_timeout)


@given(st.one_of(st.floats(max_value=0), st.integers(max_value=0)))
def test_no_zero_or_negative_timeout_is_accepted(value: float) -> None:
    with pytest.raises(ValueError):
        relay_core.check_timeouts("R", value, None)
    with pytest.raises(ValueError):
        relay_core.check_timeouts("R", 1.0, value)


# -- settings at class creation ----------------------------------------------------------------------------


def test_settings_are_checked_when_a_subclass_is_made() -> None:
    with pytest.raises(TypeError, match=r"^Bad\.upstreams"):
        type("Bad", (RelaySettings,), {"upstreams": "localhost:80"})
    with pytest.raises(ValueError, match=r"^Slow\.connect_timeout"):
        type("Slow", (RelaySettings,), {"connect_timeout": 0})
    # and again for a subclass of a configured one: what it inherits is checked too
    good = type("Good", (RelaySettings,), {"upstreams": [("h", 1)]})
    assert good.upstreams == (("h", 1),)
    with pytest.raises(ValueError, match=r"^Sub\.idle_timeout"):
        type("Sub", (good,), {"idle_timeout": -1})


def test_each_subclass_has_its_own_balancer() -> None:
    first = type("First", (Balanced,), {"upstreams": (A, B)})
    second = type("Second", (Balanced,), {"upstreams": (A, B)})
    child = type("Child", (first,), {})
    assert len({id(first.balancer), id(second.balancer), id(child.balancer)}) == 3
    assert first.balancer.candidates() == [A, B]
    assert first.balancer.candidates() == [B, A]
    assert second.balancer.candidates() == [A, B]  # whatever first did
    assert child.balancer.candidates() == [A, B]


# -- upstream order ----------------------------------------------------------------------------------------


def balancer(upstreams: Any, balance: str = "leastconn") -> Any:
    return type("Relay", (Balanced,), {"upstreams": tuple(upstreams), "balance": balance}).balancer


@pytest.mark.parametrize("balance", ["leastconn", "roundrobin"])
def test_idle_upstreams_take_turns_with_the_rest_as_failover(balance: str) -> None:
    picks = balancer((A, B, C), balance)
    got = [picks.candidates() for _ in range(4)]
    assert [order[0] for order in got] == [A, B, C, A]
    assert all(sorted(order) == sorted((A, B, C)) for order in got)


@pytest.mark.parametrize("upstreams", [(), (A,)])
def test_one_upstream_or_none(upstreams: tuple[tuple[str, int], ...]) -> None:
    picks = balancer(upstreams)
    for _ in range(3):
        assert picks.candidates() == list(upstreams)


def test_candidates_are_a_new_list_each_time() -> None:
    picks = balancer([A])
    got = picks.candidates()
    got.append(B)
    assert picks.candidates() == [A]


@given(st.lists(st.tuples(hosts, ports), min_size=2, max_size=6, unique=True), st.integers(1, 20))
def test_each_call_starts_one_further_and_tries_every_upstream(upstreams: list[tuple[str, int]], calls: int) -> None:
    picks = balancer(upstreams, "roundrobin")
    for turn in range(calls):
        first = turn % len(upstreams)
        assert picks.candidates() == [upstreams[first], *(u for u in upstreams if u != upstreams[first])]


def test_threads_share_a_balancer_evenly() -> None:
    picks = balancer((A, B, C))
    starts: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    def pick() -> None:
        mine = Counter(picks.candidates()[0] for _ in range(3000))
        with lock:
            starts.update(mine)

    threads = [threading.Thread(target=pick) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert starts == {A: 8000, B: 8000, C: 8000}


# -- the PROXY header --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("client", "local", "family", "source", "destination"), [
    (("192.0.2.7", 4000), ("192.0.2.1", 80), socket.AF_INET, ("192.0.2.7", 4000), ("192.0.2.1", 80)),
    (("2001:db8::7", 4000, 0, 0), ("2001:db8::1", 80, 0, 0), socket.AF_INET6,
     ("2001:db8::7", 4000), ("2001:db8::1", 80)),
    (("2001:db8::7", 4000, 0, 0), ("192.0.2.1", 80), socket.AF_INET6, ("2001:db8::7", 4000), ("::ffff:c000:201", 80)),
    (("192.0.2.7", 4000), ("2001:db8::1", 80, 0, 0), socket.AF_INET6, ("::ffff:c000:207", 4000), ("2001:db8::1", 80)),
    (("::ffff:192.0.2.7", 4000, 0, 0), ("192.0.2.1", 80), socket.AF_INET6,
     ("::ffff:c000:207", 4000), ("::ffff:c000:201", 80)),
    (("fe80::7%eth0", 4000, 0, 2), ("fe80::1%eth0", 80, 0, 2), socket.AF_INET6, ("fe80::7", 4000), ("fe80::1", 80)),
    (("127.0.0.1", 0), ("127.0.0.1", 65535), socket.AF_INET, ("127.0.0.1", 0), ("127.0.0.1", 65535)),
])
def test_proxy_header_announces_ip_clients(client: Any, local: Any, family: int, source: tuple[str, int],
                                           destination: tuple[str, int]) -> None:
    header = parse(relay_core.proxy_header(client, local))
    assert header is not None
    assert (header.version, header.command, header.family) == (2, "PROXY", family)
    assert (header.source, header.destination) == (source, destination)


@pytest.mark.parametrize(("client", "local"), [
    ("", "/run/relay.sock"),  # a Unix socket listener: an unnamed client
    ("/tmp/client.sock", "/run/relay.sock"),
    (b"\0abstract", b"\0relay"),
    (None, ("127.0.0.1", 80)),
    (("127.0.0.1", 4000), None),
    (("localhost", 4000), ("127.0.0.1", 80)),  # a name, not an address
    (("127.0.0.1", -1), ("127.0.0.1", 80)),
    (("127.0.0.1", 65536), ("127.0.0.1", 80)),
    (("127.0.0.1", "4000"), ("127.0.0.1", 80)),
    (("127.0.0.1",), ("127.0.0.1", 80)),
    ((), ()),
])
def test_proxy_header_is_local_for_anything_but_ip_addresses(client: Any, local: Any) -> None:
    header = parse(relay_core.proxy_header(client, local))
    assert header is not None
    assert (header.command, header.family, header.source, header.destination) == ("LOCAL", socket.AF_UNSPEC,
                                                                                  None, None)


@given(st.one_of(ipv4, ipv6), ports, st.one_of(ipv4, ipv6), ports)
def test_proxy_header_round_trips_any_ip_pair(source_ip: str, source_port: int, local_ip: str,
                                              local_port: int) -> None:
    header = parse(relay_core.proxy_header((source_ip, source_port), (local_ip, local_port)))
    assert header is not None and header.command == "PROXY"
    assert header.source is not None and header.destination is not None
    mixed = ipaddress.ip_address(source_ip).version != ipaddress.ip_address(local_ip).version
    for sent, got in ((source_ip, header.source), (local_ip, header.destination)):
        ip = ipaddress.ip_address(got[0])
        if mixed and isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and ":" not in sent:
            ip = ip.ipv4_mapped  # the IPv4 one of a mixed pair, written IPv4-mapped
        assert ip == ipaddress.ip_address(sent)
    assert (header.source[1], header.destination[1]) == (source_port, local_port)
    assert header.family == (socket.AF_INET6 if ":" in source_ip or ":" in local_ip else socket.AF_INET)


junk = st.one_of(st.none(), st.text(max_size=20), st.binary(max_size=20), st.integers(),
                 st.tuples(st.text(max_size=20), st.integers()),
                 st.tuples(st.one_of(ipv4, ipv6), st.one_of(st.integers(), st.text(max_size=3)), st.integers()))


@given(junk, junk)
def test_proxy_header_never_raises_and_is_always_a_valid_header(client: Any, local: Any) -> None:
    data = relay_core.proxy_header(client, local)
    header = parse(data)
    assert header is not None and header.length == len(data)


# -- failures in words -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "timeout", "words"), [
    (os_error(errno.ECONNREFUSED), None, "connection refused"),
    (os_error(errno.ECONNREFUSED), 5.0, "connection refused"),
    (os_error(errno.ECONNRESET), None, "connection reset by peer"),
    (os_error(errno.EPIPE), None, "broken pipe"),
    (os_error(errno.ETIMEDOUT), 5.0, "connection timed out"),  # the kernel's timeout, not ours
    (TimeoutError(), 0.3, "timed out after 0.3s"),  # socket.create_connection's and asyncio.wait_for's own
    (TimeoutError("timed out"), 5, "timed out after 5s"),
    (TimeoutError(), None, "timed out"),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), 5.0, "name or service not known"),
    (OSError("Custom failure"), None, "custom failure"),
    # asyncio's create_connection: the errno's words, not "connect call failed ('127.0.0.1', 1)"
    (OSError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 1)"), 5.0, "connection refused"),
    (OSError(errno.EHOSTUNREACH, "Multiple exceptions: ..."), 5.0, os.strerror(errno.EHOSTUNREACH).lower()),
    (ssl.SSLError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), None,
     "certificate verify failed"),  # its number is not an errno; OpenSSL's code in brackets goes
    (ConnectionResetError(), None, "ConnectionResetError"),
    (RuntimeError("Boom"), None, "boom"),
    (Exception(), None, "Exception"),
])
def test_reason_in_words(exc: BaseException, timeout: float | None, words: str) -> None:
    assert relay_core.reason(exc, timeout) == words


@given(st.integers(1, 133))
def test_reason_for_any_errno_is_its_strerror_mid_sentence(code: int) -> None:
    words = relay_core.reason(os_error(code), 5.0)
    message = os.strerror(code)
    assert words == message[:1].lower() + message[1:]
    assert words


def test_attempt_failed_names_the_address_and_why() -> None:
    assert relay_core.attempt_failed(("127.0.0.1", 7000), os_error(errno.ECONNREFUSED), 5.0) == \
        "127.0.0.1:7000 (connection refused)"
    assert relay_core.attempt_failed(("::1", 7000), TimeoutError(), 0.25) == "[::1]:7000 (timed out after 0.25s)"


# -- what is logged and counted ----------------------------------------------------------------------------

CLIENT, UPSTREAM = ("127.0.0.1", 5555), ("127.0.0.1", 7000)


def test_failing_over_is_info_and_not_an_error() -> None:
    event = relay_core.failed_over(CLIENT, ["127.0.0.1:7001 (connection refused)", "h:2 (timed out after 1s)"],
                                   UPSTREAM)
    assert (event.level, event.error) == (logging.INFO, False)
    assert text(event) == ("relay for client 127.0.0.1:5555: upstream 127.0.0.1:7001 (connection refused), "
                           "h:2 (timed out after 1s) unavailable, connected to 127.0.0.1:7000 instead")


def test_no_upstream_is_a_warning_and_an_error() -> None:
    event = relay_core.no_upstream(CLIENT, ["127.0.0.1:7000 (connection refused)"])
    assert (event.level, event.error) == (logging.WARNING, True)
    assert text(event) == ("relay for client 127.0.0.1:5555: cannot connect upstream: 127.0.0.1:7000 "
                           "(connection refused); closing the client connection")
    assert "cannot connect upstream: no upstream configured;" in text(relay_core.no_upstream(CLIENT, []))
    assert "cannot connect upstream: every upstream is down or at its maxconn;" in text(
        relay_core.no_upstream(CLIENT, [], skipped=True))


def test_an_upstream_failing_is_a_warning_and_an_error() -> None:
    event = relay_core.upstream_failed(CLIENT, UPSTREAM, os_error(errno.ECONNRESET))
    assert (event.level, event.error) == (logging.WARNING, True)
    assert text(event) == ("relay for client 127.0.0.1:5555: upstream 127.0.0.1:7000 failed: "
                           "connection reset by peer; closing the client connection")


def test_a_client_failing_is_info_and_not_an_error() -> None:
    event = relay_core.client_failed(CLIENT, UPSTREAM, os_error(errno.EPIPE))
    assert (event.level, event.error) == (logging.INFO, False)
    assert text(event) == ("relay for client 127.0.0.1:5555: client connection failed: broken pipe; "
                           "closing upstream 127.0.0.1:7000")


@pytest.mark.parametrize(("seconds", "words"), [(0.3, "idle for 0.3s"), (300.0, "idle for 300s"), (60, "idle for 60s")])
def test_idle_is_info_and_not_an_error(seconds: float, words: str) -> None:
    event = relay_core.idle(CLIENT, UPSTREAM, seconds)
    assert (event.level, event.error) == (logging.INFO, False)
    assert text(event) == f"relay for client 127.0.0.1:5555: {words}, closing it and upstream 127.0.0.1:7000"


@pytest.mark.parametrize(("peer", "written"), [
    (("::1", 80, 0, 0), "[::1]:80"), ("", "unix socket"), ("/run/c.sock", "/run/c.sock"), (None, "(unknown)"),
])
def test_events_write_peers_the_one_way(peer: Any, written: str) -> None:
    assert text(relay_core.idle(peer, UPSTREAM, 1)).startswith(f"relay for client {written}: ")
    assert f"upstream {written} failed" in text(relay_core.upstream_failed(CLIENT, peer, os_error(errno.EPIPE)))


@given(st.text(max_size=20), st.lists(st.text(max_size=20), max_size=3))
def test_events_keep_percent_signs_in_addresses_as_they_are(host: str, failures: list[str]) -> None:
    # the addresses are arguments, never part of the template: a '%' in them cannot break the line
    for event in (relay_core.no_upstream((host, 1), failures), relay_core.failed_over((host, 1), failures, (host, 2)),
                  relay_core.idle(host, (host, 2), 1.0)):
        assert "%s" in event.message and host in text(event)


# -- both forms use the core -------------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"upstreams": ("localhost", 80)}, "is not a (host, port) pair"),
    ({"upstreams": "localhost:80"}, "must be a tuple of (host, port) pairs"),
    ({"upstreams": (("localhost", 0),)}, "port in 1-65535"),
    ({"upstreams": (("localhost", "80"),)}, "port in 1-65535"),
    ({"connect_timeout": 0}, "connect_timeout must be positive seconds"),
    ({"idle_timeout": -1.0}, "idle_timeout must be positive seconds or None"),
]


@pytest.mark.parametrize("form", [RelayHandler, RelayProtocol])
@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS)
def test_both_forms_refuse_bad_settings_at_class_creation(form: type[Any], settings: dict[str, Any],
                                                          message: str) -> None:
    with pytest.raises((TypeError, ValueError)) as caught:
        type("Bad", (form,), settings)
    assert message in str(caught.value)
    assert str(caught.value).startswith("Bad.")


def test_buffer_size_is_checked_where_it_applies() -> None:
    with pytest.raises(ValueError, match=r"^Bad\.buffer_size must be a positive number of bytes"):
        type("Bad", (RelayHandler,), {"buffer_size": 0})
    assert not hasattr(RelayProtocol, "buffer_size")  # asyncio's transports size their own reads


@pytest.mark.parametrize("form", [RelayHandler, RelayProtocol])
def test_both_forms_share_the_settings_and_count_their_own_bytes(form: type[Any]) -> None:
    configured = type("Configured", (form,), {"upstreams": [["10.0.0.1", 7000], ["10.0.0.2", 7000]]})
    assert issubclass(configured, RelaySettings)
    assert configured.upstreams == (A, B)
    assert (configured.connect_timeout, configured.idle_timeout, configured.send_proxy) == (5.0, 300.0, False)
    assert configured.counts_bytes is True
    relay = configured.__new__(configured)  # no connection: only the choice of upstream is exercised
    assert [relay.upstream_candidates() for _ in range(3)] == [[A, B], [B, A], [A, B]]
    assert type("Other", (form,), {"upstreams": (A, B)}).balancer is not configured.balancer
