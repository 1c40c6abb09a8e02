"""How signals and other threads reach the serving loop of a ``sync`` or ``thread`` worker: one socket pair.

``signal.set_wakeup_fd`` writes each signal's number to the pair's write
end; :meth:`Wakeup.wake` writes a 0 byte there (no signal has number 0),
safe from any thread. The loop watches the read end with its epoll and,
when it is readable, :meth:`Wakeup.drain` runs the actions of the signals
that came, in the order they came: the loop acts on a signal in its own
thread, between connections, as the master's loop does (``master/loop.py``).
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Mapping
from types import FrameType

SignalHandler = Callable[[int, FrameType | None], None]


class Wakeup:
    """The socket pair and the signal table: the numbers that arrive, and the action each one runs."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.actions: dict[int, Callable[[], None]] = {}  # by number, as they arrive on the socket

    def fileno(self) -> int:
        """The end the loop watches."""
        return self.reader.fileno()

    def wake(self) -> None:
        """Make the loop turn. Safe from any thread (a full socket already will)."""
        with contextlib.suppress(BlockingIOError):
            self.writer.send(b"\0")

    def install(self, actions: Mapping[signal.Signals, Callable[[], None]],
                handler_for: Callable[[int], SignalHandler]) -> None:
        """Deliver ``actions``' signals through the socket; ``handler_for`` gives each signal's Python-level
        handler (what must happen at once, in the main thread, before the loop reads it)."""
        self.actions = {int(signum): action for signum, action in actions.items()}
        for signum in self.actions:
            signal.signal(signum, handler_for(signum))
        signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)

    def drain(self) -> None:
        """Read every byte waiting and run each signal's action, in order."""
        while True:
            try:
                data = self.reader.recv(512)
            except BlockingIOError:
                return
            for signum in data:
                action = self.actions.get(signum)
                if action is not None:
                    action()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
