"""``python -m prefork.ctl`` is ``preforkctl``."""

from __future__ import annotations

from prefork.ctl import run

run()
