"""--proxy-protocol on listeners: the handler sees the original client; bad headers close one connection."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conftest import Daemon, read_line, recv_exact, wait_for
from prefork.proxy_protocol import build_v1, build_v2


@pytest.mark.parametrize("worker_class", ["thread", "sync"])
@pytest.mark.parametrize(
    ("header", "seen"),
    [
        (build_v1(("203.0.113.7", 40001), ("127.0.0.1", 80)), b"203.0.113.7 40001\n"),
        (build_v2(("198.51.100.9", 5555), ("127.0.0.1", 80)), b"198.51.100.9 5555\n"),
        (build_v2(("2001:db8::1", 6000), ("::1", 80)), b"2001:db8::1 6000\n"),
    ],
)
def test_client_address_is_the_original_client(daemon_factory: Callable[..., Daemon], worker_class: str,
                                               header: bytes, seen: bytes) -> None:
    d = daemon_factory("--proxy-protocol", "-k", worker_class, "proxy_peer:PeerHandler")
    with d.connect() as s:
        s.sendall(header + b"payload")
        assert read_line(s) == seen
        assert recv_exact(s, 7) == b"payload"  # bytes after the header were not swallowed


def test_local_header_is_served_with_the_real_peer(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--proxy-protocol", "proxy_peer:PeerHandler")
    with d.connect() as s:
        s.sendall(build_v2(None, None, command="LOCAL") + b"PING\n")
        assert read_line(s).startswith(b"127.0.0.1 ")
        assert recv_exact(s, 5) == b"PING\n"


@pytest.mark.parametrize(
    "garbage", [b"GET / HTTP/1.1\r\n\r\n", b"PROXY TCP4 1.2.3.4 bad\r\n", b"\r\n\r\n\0\r\nQUIT\n\x99"]
)
def test_malformed_header_closes_that_connection_only(daemon_factory: Callable[..., Daemon], garbage: bytes) -> None:
    d = daemon_factory("--proxy-protocol", "--workers", "1")
    pid = d.status()["workers"][0]["pid"]
    with d.connect() as s:
        s.sendall(garbage)
        assert s.recv(100) == b""  # closed, nothing echoed
    good = build_v1(("192.0.2.1", 1000), ("127.0.0.1", 2000)) + b"ok"
    with d.connect() as s:
        s.sendall(good)
        assert recv_exact(s, 2) == b"ok"
    st = d.status()
    assert st["workers"][0]["pid"] == pid
    wait_for(lambda: "closing it" in d.log(), 5, "one log line about the bad header")
    assert "Traceback" not in d.log()


def test_slow_header_times_out(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--proxy-protocol", "--proxy-timeout", "0.3")
    with d.connect(timeout=5) as s:
        s.sendall(b"PROXY TCP4 ")  # and nothing more
        assert s.recv(100) == b""
    assert "PROXY" in d.log() or "timed out" in d.log()


def test_proxy_allow_limits_who_must_send_headers(daemon_factory: Callable[..., Daemon]) -> None:
    # 127.0.0.1 is not in the list: its connections are plain, the bytes pass through untouched
    d = daemon_factory("--proxy-protocol", "--proxy-allow", "10.0.0.0/8,192.168.0.0/16")
    with d.connect() as s:
        s.sendall(b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n")
        assert recv_exact(s, 32) == b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n"


def test_bad_proxy_allow_is_a_one_line_error(daemon_factory: Callable[..., Daemon]) -> None:
    import subprocess
    import sys

    from conftest import child_env

    r = subprocess.run([sys.executable, "-m", "prefork", "--proxy-protocol", "--proxy-allow", "10.0.0.0/33",
                        "--check-config"], capture_output=True, text=True, env=child_env(), timeout=20)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "proxy-allow" in r.stderr and "10.0.0.0/33" in r.stderr
