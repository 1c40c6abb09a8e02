"""``python -m prefork`` runs the daemon, like the ``prefork`` command."""

from __future__ import annotations

from prefork.cli import run

run()
