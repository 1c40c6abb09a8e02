"""The TLS benchmark that ships in bench/: compare.py's tls-* modes run from a fresh copy (tlsload.c built
from the copy's sources) against stunnel and prefork with no failure, and the load generator counts the
failures it is there to count: wrong bytes, a peer that closes early, a server that does not speak TLS."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import compare
from test_bench import fresh_copy

CONNS = 4
FAILURES = ("hs_failed", "errors", "refused", "resets", "short", "starved")


def require(*commands: str) -> None:
    """Fail (not skip) when a reference server or tool the TLS benchmark drives is missing."""
    for command, package in (("stunnel4", "stunnel4"), ("haproxy", "haproxy"), ("openssl", "openssl")):
        if command in commands and not shutil.which(command):
            pytest.fail(f"{command} is not installed: the TLS benchmark needs it (scripts/setup installs it "
                        f"with apt-get; or apt-get install {package})")


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_copy(tmp_path_factory.mktemp("bench-tls") / "prefork")


def run_compare(copy: Path, mode: str, *servers: str) -> tuple[dict[str, dict[str, str]], str]:
    """compare.py from the copy, 1 s of CONNS connections per server: {server: {column: value}}, and its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("BENCH_TOOLS", "PROJECT", "PREFORK_TLS_CMD")}
    done = subprocess.run([sys.executable, str(copy / "bench" / "compare.py"), "--mode", mode, "-c", str(CONNS),
                           "-d", "1", "--tls-key", "p256", *servers], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = done.stdout.splitlines()
    header = next(line.split() for line in lines if line.startswith("server "))
    rows: dict[str, dict[str, str]] = {}
    for fields in (line.split() for line in lines):
        if fields[:1] and fields[0] in servers:
            assert len(fields) == len(header), f"{fields[0]} did not run:\n{output}"  # e.g. "did not listen"
            rows[fields[0]] = dict(zip(header, fields, strict=True))
    assert set(rows) == set(servers), output
    return rows, output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["tls-handshake", "tls-resume", "tls-ping"])
def test_compare_tls_modes_run_from_a_fresh_copy_with_no_failure(copy: Path, mode: str) -> None:
    require("stunnel4", "haproxy", "openssl")
    servers = ("stunnel", "haproxy-tls", "prefork-tls", "prefork-tls-thread")
    rows, output = run_compare(copy, mode, *servers)
    for server, row in rows.items():
        assert all(row[k] == "0" for k in FAILURES), f"{server}: {row}\n{output}"
        assert float(row["ops_per_s"]) > 0 and row["proto"].startswith("TLSv1."), f"{server}: {row}\n{output}"
        handshakes, resumed = int(row["handshakes"]), int(row["resumed"])
        if mode == "tls-resume":  # every connection after each slot's first offers a session: all resume
            assert handshakes > CONNS and resumed >= handshakes - CONNS, f"{server}: {row}\n{output}"
        else:
            assert resumed == 0, f"{server}: {row}\n{output}"
        if mode == "tls-ping":  # persistent: one handshake per connection
            assert handshakes == CONNS, f"{server}: {row}\n{output}"
    # built from the copy's own sources, into the copy
    assert (copy / "build" / "bench" / "tlsload").is_file()


def test_compare_rejects_a_plain_server_in_a_tls_mode(copy: Path) -> None:
    done = subprocess.run([sys.executable, str(copy / "bench" / "compare.py"), "--mode", "tls-ping", "-d", "1",
                           "cecho"], cwd=copy, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "TLS servers" in done.stderr, done.stdout + done.stderr


def tlsload(*args: str) -> dict[str, str]:
    compare.build_tools(tls=True)
    done = subprocess.run([compare.TLSLOAD, *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return dict(kv.split("=", 1) for kv in done.stdout.split())


@pytest.fixture
def bad_server(request: pytest.FixtureRequest) -> Iterator[int]:
    """A server on loopback, serving one connection at a time as ``request.param`` says:
    flip (a TLS echo of wrong bytes), close (TLS handshake, read, close without answering), plain (no TLS)."""
    require("openssl")
    files = compare.tls_files("p256")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.certfile, files.keyfile)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed at the end of the test (or 10 s without a client)
                return
            with conn:
                conn.settimeout(5)
                try:
                    if request.param == "plain":
                        conn.sendall(conn.recv(4096))  # a ClientHello echoed back is no ServerHello
                        continue
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        data = tls.recv(64)
                        if request.param == "flip":
                            tls.sendall(bytes(b ^ 1 for b in data))
                except OSError:  # the client gave up on this connection (ssl.SSLError is an OSError)
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("bad_server", "counted"), [("flip", "errors"), ("close", "short"), ("plain", "hs_failed")],
                         indirect=["bad_server"])
def test_tlsload_counts_what_goes_wrong(bad_server: int, counted: str) -> None:
    for mode in ("handshake", "ping"):
        res = tlsload("-m", mode, "-c", "1", "-d", "0.5", "127.0.0.1", str(bad_server))
        assert res["ops"] == "0" and int(res[counted]) > 0, res
        assert all(res[k] == "0" for k in FAILURES if k not in (counted, "starved")), res
        assert res["starved"] == "1", res


def test_tlsload_counts_refused_connections() -> None:
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        res = tlsload("-m", "handshake", "-c", "2", "-d", "0.3", "127.0.0.1", str(closed.getsockname()[1]))
    assert res["ops"] == "0" and int(res["refused"]) > 0 and res["hs_failed"] == "0", res


def test_tlsload_rejects_a_bad_mode() -> None:
    compare.build_tools(tls=True)
    done = subprocess.run([compare.TLSLOAD, "-m", "connect", "127.0.0.1", "9"], capture_output=True, text=True,
                          timeout=10)
    assert done.returncode == 2 and "usage: tlsload" in done.stderr and done.stdout == ""
