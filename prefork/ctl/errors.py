"""What can go wrong in ``preforkctl``, by meaning; ``main()`` turns each into its exit status and one line."""

from __future__ import annotations

from typing import Any


class UsageError(Exception):
    """The command line asks for something that makes no sense (exit status 2)."""


class CommandFailed(Exception):
    """The daemon refused the command, or did not finish it in time (exit status 1).

    The message is the whole line for stderr; ``reply`` is the daemon's refusal,
    when there is one, for ``--json`` to show.
    """

    def __init__(self, message: str, reply: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class NotAnswering(Exception):
    """Nothing answers on the control socket (exit status 3); the message is the whole line for stderr."""
