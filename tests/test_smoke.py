"""The recipe's client session against the default daemon."""

from __future__ import annotations

import socket
from collections.abc import Callable

from conftest import Daemon


def test_recipe_client_session(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(("localhost", d.port))
    assert s.send(b"Hello") == 5
    assert s.recv(8192) == b"Hello"
    s.close()
