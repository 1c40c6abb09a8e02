"""systemd's file-descriptor store: names that carry a bind spec, and taking listeners back after a restart.

The end-to-end case (a master killed under load, restarted by a real systemd on
the same socket) is in test_systemd_e2e.py.
"""

from __future__ import annotations

import array
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from prefork import fdstore
from prefork.config import parse_bind
from prefork.systemd import InheritedSocket, Notifier


@given(st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=126), max_size=100))
def test_a_name_carries_its_spec_back(spec: str) -> None:
    name = fdstore.fd_name(spec)
    assert name.startswith(fdstore.PREFIX) and ":" not in name
    assert all(0x20 <= ord(c) < 0x7F for c in name) and len(name) <= 255
    assert fdstore.spec_of(name) == spec


@pytest.mark.parametrize(("spec", "name"), [
    ("127.0.0.1:20000", "prefork-bind=127.0.0.1%3A20000"),
    ("[::1]:8000", "prefork-bind=[::1]%3A8000".replace("::", "%3A%3A")),
    ("unix:/run/echo.sock", "prefork-bind=unix%3A/run/echo.sock"),
    ("100%", "prefork-bind=100%25"),
])
def test_names_are_readable(spec: str, name: str) -> None:
    assert fdstore.fd_name(spec) == name


def test_a_spec_too_long_for_a_name_is_not_stored() -> None:
    assert fdstore.fd_name("unix:/" + "x" * 300) == ""


def test_names_of_socket_activation_are_not_ours() -> None:
    assert fdstore.spec_of("prefork.socket") is None
    assert fdstore.spec_of("unknown") is None


class Recorder(Notifier):
    """A notifier that records what it would send."""

    def __init__(self) -> None:
        super().__init__("/nonexistent")
        self.sent: list[tuple[str, ...]] = []

    def store_fd(self, name: str, fd: int) -> bool:
        self.sent.append(("store", name))
        return True

    def remove_fd(self, name: str) -> bool:
        self.sent.append(("remove", name))
        return True


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_reconcile_takes_back_what_is_wanted_binds_the_rest_and_drops_the_others() -> None:
    kept, unwanted = listening(), listening()
    kept_spec = f"127.0.0.1:{kept.getsockname()[1]}"
    unwanted_spec = f"127.0.0.1:{unwanted.getsockname()[1]}"
    inherited = [InheritedSocket(fd=kept.fileno(), name=fdstore.fd_name(kept_spec), sock=kept),
                 InheritedSocket(fd=unwanted.fileno(), name=fdstore.fd_name(unwanted_spec), sock=unwanted),
                 InheritedSocket(fd=99, name="prefork.socket", sock=socket.socket())]
    stored, activated = fdstore.split(inherited)
    assert set(stored) == {kept_spec, unwanted_spec} and [a.name for a in activated] == ["prefork.socket"]
    activated[0].sock.close()
    notifier = Recorder()
    listeners = fdstore.reconcile([parse_bind(kept_spec), parse_bind("127.0.0.1:0")], stored, 16, notifier)
    try:
        assert listeners[0].sock is kept and listeners[0].spec == kept_spec
        assert unwanted.fileno() == -1  # closed
        assert notifier.sent == [("remove", fdstore.fd_name(unwanted_spec)),
                                 ("store", fdstore.fd_name("127.0.0.1:0"))]
    finally:
        for listener in listeners:
            listener.close()


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    path = Path(tempfile.mkdtemp(prefix="pf-fds-")) / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        yield sock
    path.unlink()
    path.parent.rmdir()


def test_store_fd_sends_the_descriptor_with_its_name(receiver: socket.socket) -> None:
    notifier = Notifier(receiver.getsockname())
    with listening() as sock:
        assert notifier.store_fd("prefork-bind=x", sock.fileno())
        data, ancillary, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(4 * 4))
        assert data == b"FDSTORE=1\nFDNAME=prefork-bind=x"
        (level, kind, payload), = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds = array.array("i", payload)
        received = socket.socket(fileno=fds[0])
        try:
            assert received.getsockname() == sock.getsockname()  # the very same listening socket
        finally:
            received.close()
    assert notifier.remove_fd("prefork-bind=x")
    assert receiver.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=prefork-bind=x"
