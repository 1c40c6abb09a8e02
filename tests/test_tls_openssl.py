"""``openssl s_client``, a client that is not Python's, against every worker class: SNI, ALPN, a client
certificate, session resumption across workers."""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tlsutil import Pki

from conftest import Daemon, wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed (scripts/setup)")

HANDLERS = {"sync": "tls_handlers:WhoHandler", "thread": "tls_handlers:WhoHandler",
            "async": "tls_async_handlers:WhoProtocol"}


@contextlib.contextmanager
def openssl_s_client(d: Daemon, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``openssl s_client`` connected to the daemon, with pipes to write to and read from; killed at the end."""
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{d.port}", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


def read_more(proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
    """What ``proc`` printed within ``timeout`` seconds: ``b""`` once it closed its output, None if nothing came."""
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], timeout)[0]:
        return None
    return os.read(proc.stdout.fileno(), 65536)


def s_client(d: Daemon, *args: str, data: bytes = b"hello\n", until: bytes = b"hello\n",
             timeout: float = 20) -> str:
    """``openssl s_client`` to the daemon: send ``data``, read until ``until`` comes back or the server
    closes, then end it; its whole output (stdout and stderr)."""
    out = b""
    with openssl_s_client(d, "-ign_eof", *args) as proc:
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while until not in out.split(b"---\n")[-1]:  # what came after the handshake's report
            left = deadline - time.monotonic()
            assert left > 0, f"no {until!r} from openssl s_client within {timeout}s:\n{out.decode(errors='replace')}"
            chunk = read_more(proc, left)
            if chunk == b"":
                break  # the server closed the connection
            out += chunk or b""
    return out.decode(errors="replace")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.mark.parametrize("worker_class", list(HANDLERS))
def test_sni_alpn_and_client_certificate(daemon_factory: Callable[..., Daemon], pki: Pki, worker_class: str) -> None:
    named = pki.server("named", "api.example", names=("api.example",))
    client = pki.client(common_name="carol")
    d = daemon_factory(*pki.server().args(), "--sni", f"api.example={named.cert},{named.key}",
                       "--ca-certs", str(pki.ca.cert), "--cert-reqs", "required", "--alpn", "h2,echo/1",
                       "-k", worker_class, HANDLERS[worker_class])
    out = s_client(d, "-servername", "api.example", "-alpn", "echo/1", "-CAfile", str(pki.ca.cert),
                   "-verify_return_error", "-cert", str(client.cert), "-key", str(client.key))
    assert re.search(r"subject=CN ?= ?api\.example", out), out
    assert "Verify return code: 0 (ok)" in out, out
    assert "ALPN protocol: echo/1" in out, out
    # the handler's line: version, cipher bits, ALPN, the client certificate's CN, the client
    # (s_client writes its session reports to the same stream, so the line may follow one mid-line)
    line = re.search(r"(TLSv1\.[23]) (\d+) echo/1 carol 127\.0\.0\.1\n", out)
    assert line is not None, out
    assert "hello" in out.split(line.group(0), 1)[1], out  # then it echoes


@pytest.mark.parametrize("worker_class", list(HANDLERS))
def test_no_client_certificate_is_refused(daemon_factory: Callable[..., Daemon], pki: Pki, worker_class: str) -> None:
    d = daemon_factory(*pki.server().args(), "--ca-certs", str(pki.ca.cert), "--cert-reqs", "required",
                       "-k", worker_class, HANDLERS[worker_class])
    out = s_client(d, "-CAfile", str(pki.ca.cert), until=b"\0never")  # read until the server closes
    # sync, thread: OpenSSL's alert says why; async: asyncio and uvloop close without flushing the alert
    refused = r"alert (certificate required|handshake failure)"
    if worker_class == "async":
        refused += r"|unexpected eof|read:errno=104"  # the end, or a reset (our bytes unread)
    assert re.search(refused, out), out
    assert "127.0.0.1" not in re.sub(r"connect.*|CONNECTED.*", "", out)  # the handler never answered


@pytest.mark.parametrize("worker_class", list(HANDLERS))
def test_sessions_resume_on_any_worker(daemon_factory: Callable[..., Daemon], pki: Pki, worker_class: str,
                                       tmp_path: Path) -> None:
    """Every worker of a generation has the master's session-ticket key: a ticket from one resumes on another."""
    d = daemon_factory(*pki.server().args(), "-k", worker_class, "--workers", "2")
    session = tmp_path / "session.pem"
    first = s_client(d, "-CAfile", str(pki.ca.cert), "-sess_out", str(session), "-tls1_2")
    wait_for(lambda: session.exists() and session.stat().st_size > 0, 5, "the session saved")
    assert "New, TLSv1.2" in first, first
    for _ in range(6):  # with two workers, some of these land on the other one
        again = s_client(d, "-CAfile", str(pki.ca.cert), "-sess_in", str(session), "-tls1_2")
        assert "Reused, TLSv1.2" in again, again


# -- a client's protocol errors: one log line each, never a traceback ------------------------------------------


def openssl_session(d: Daemon, *args: str, commands: list[bytes], timeout: float = 20) -> str:
    """``openssl s_client`` (without -ign_eof, so a line ``R`` asks for a renegotiation): each command once what
    came before it is answered, then until the server closes; its whole output."""
    out = b""
    with openssl_s_client(d, *args) as proc:
        assert proc.stdin is not None
        deadline = time.monotonic() + timeout
        pending = list(commands)
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"openssl s_client still running after {timeout}s:\n{out.decode(errors='replace')}"
            if pending and (b"---\n" in out and (not out.endswith(b"---\n") or len(pending) == len(commands))):
                proc.stdin.write(pending.pop(0))
                proc.stdin.flush()
            chunk = read_more(proc, min(left, 0.2))
            if chunk == b"":
                break
            out += chunk or b""
    return out.decode(errors="replace")


@pytest.mark.parametrize("worker_class", ["sync", "thread"])
def test_a_renegotiation_after_the_handshake_is_one_line(daemon_factory: Callable[..., Daemon], pki: Pki,
                                                         worker_class: str) -> None:
    d = daemon_factory(*pki.server().args(), "-k", worker_class)
    out = openssl_session(d, "-tls1_2", commands=[b"hello\n", b"R\n"])
    assert "RENEGOTIATING" in out, out
    expected = "TLS error after the handshake: "
    wait_for(lambda: expected in d.log(), 10, "the worker's line about the refused renegotiation")
    assert "Traceback" not in d.log(), d.log()
    lines = [line for line in d.log().splitlines() if expected in line]
    assert len(lines) == 1 and " INFO prefork.workers.servers: connection from 127.0.0.1:" in lines[0], lines


@pytest.mark.parametrize("worker_class", list(HANDLERS))
def test_a_server_name_that_is_not_ascii_is_one_line(daemon_factory: Callable[..., Daemon], pki: Pki,
                                                     worker_class: str) -> None:
    named = pki.server("named", "api.example", names=("api.example",))
    d = daemon_factory(*pki.server().args(), "--sni", f"api.example={named.cert},{named.key}", "-k", worker_class)
    out = s_client(d, "-servername", "\u00e9t\u00e9.example", until=b"no such answer")
    assert "Cipher is (NONE)" in out, out  # the handshake failed
    expected = "CALLBACK_FAILED (the server name it asked for is not ASCII); closing the connection"
    wait_for(lambda: expected in d.log(), 10, "the handshake's failure line")
    assert "Traceback" not in d.log() and "Exception ignored" not in d.log(), d.log()
    assert d.call("stats")["tls"]["failed"] == 1
