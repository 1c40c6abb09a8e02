"""Talk to systemd: readiness notifications and socket-activated listeners.

Everything here is a no-op outside systemd: ``notify`` returns False when
``$NOTIFY_SOCKET`` is unset, ``listen_fds`` returns ``[]`` when no sockets were
passed. No dependency beyond the standard library and the package; the protocols are described
in sd_notify(3), sd_listen_fds(3) and sd_watchdog_enabled(3).

Notification failures are never fatal: a daemon must keep serving when the
service manager has gone away, so send errors are logged at debug level and
reported as ``False``. Malformed environment values, which mean the process was
started wrongly, raise ``ValueError`` naming the variable.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from dataclasses import dataclass

from prefork.config import quote
from prefork.listeners import describe

__all__ = [
    "LISTEN_FDS_START",
    "InheritedSocket",
    "Notifier",
    "describe",
    "listen_fds",
    "notify",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

# The first fd passed by the service manager (SD_LISTEN_FDS_START in sd-daemon.h).
LISTEN_FDS_START = 3

# Seconds one notification may block when the manager's receive queue is full
# (it holds only net.unix.max_dgram_qlen datagrams, 10 by default). A stuck
# manager must not freeze the master's loop, and a merely slow one should still
# get READY=1, so wait a little, never indefinitely.
SEND_TIMEOUT = 1.0

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# The name systemd reports for a passed fd without a FileDescriptorName=.
_UNKNOWN_FD_NAME = "unknown"


# --- sd_notify ---------------------------------------------------------------


def _notify_address(value: str | None) -> bytes | None:
    """Turn a ``$NOTIFY_SOCKET`` value into an ``AF_UNIX`` address, or None.

    Like libsystemd, accept only an absolute path or ``@name`` (an abstract
    socket: the '@' stands for a leading NUL byte); anything else would be
    resolved against the current directory and reach the wrong socket.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    log.debug("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an @abstract name", value)
    return None


def _payload(states: tuple[str, ...]) -> bytes:
    """Encode ``("A=1", "B=2")`` as the datagram ``b"A=1\\nB=2"``.

    Raises ValueError for a state that is not one ``NAME=value`` line, so a
    programming mistake shows up even when no service manager is listening.
    """
    if not states:
        raise ValueError("notify needs at least one state such as 'READY=1'")
    for state in states:
        name, sep, _ = state.partition("=")
        if not sep or not name:
            raise ValueError(f"notify state {quote(state)} is not of the form NAME=value")
        if "\n" in state:
            raise ValueError(f"notify state {quote(state)} contains a newline (one state per argument)")
    return "\n".join(states).encode("utf-8")


def _send(address: bytes, payload: bytes, fds: tuple[int, ...] = ()) -> bool:
    """Send one datagram to ``address`` (with ``fds`` attached); log and return False on failure."""
    try:
        # One socket per call: nothing cached survives into a forked worker.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            # connect + send rather than sendto: on a connected datagram socket
            # the kernel reports the receiver's queue in poll(), so a full
            # queue waits (bounded) instead of busy-looping until the timeout.
            sock.connect(address)
            if fds:
                sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            else:
                sock.send(payload)
    except OSError as exc:
        # The manager may be gone (ENOENT, ECONNREFUSED) or stuck (timeout):
        # never fatal for the daemon, see the module docstring.
        log.debug("cannot notify %r: %s", address, exc)
        return False
    return True


def notify(*states: str) -> bool:
    """Send ``states`` (each ``NAME=value``) as one datagram to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when ``$NOTIFY_SOCKET`` is
    unset or empty or the send failed (logged at debug level). The variable is
    read on every call; use ``Notifier`` to read it once.
    """
    payload = _payload(states)
    address = _notify_address(os.environ.get("NOTIFY_SOCKET"))
    if address is None:
        return False
    return _send(address, payload)


def _parse_int(variable: str, value: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise ValueError(f"{variable}={quote(value)} is not a decimal integer") from None


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is expected.

    That is half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3) recommends
    pinging at half the timeout), provided ``$WATCHDOG_PID`` is unset or names
    this process. Raises ValueError for malformed values.
    """
    watchdog_pid = os.environ.get("WATCHDOG_PID")
    if watchdog_pid and _parse_int("WATCHDOG_PID", watchdog_pid) != os.getpid():
        return None
    watchdog_usec = os.environ.get("WATCHDOG_USEC")
    if not watchdog_usec:
        return None
    usec = _parse_int("WATCHDOG_USEC", watchdog_usec)
    if usec <= 0:
        raise ValueError(f"WATCHDOG_USEC={quote(watchdog_usec)} is not a positive number of microseconds")
    return usec / 2_000_000


class Notifier:
    """Sends sd_notify messages to the address ``$NOTIFY_SOCKET`` had at construction.

    Every method returns what ``notify`` returns: True when a datagram was
    sent. ``$NOTIFY_SOCKET`` is read, never removed: a re-executed master (a
    binary upgrade) needs it, and the manager ignores messages from workers
    under the default ``NotifyAccess=main``.
    """

    def __init__(self, notify_socket: str | None = None) -> None:
        """Use ``notify_socket`` (a path or ``@name``), by default ``$NOTIFY_SOCKET``."""
        if notify_socket is None:
            notify_socket = os.environ.get("NOTIFY_SOCKET")
        self.address = _notify_address(notify_socket)

    @property
    def enabled(self) -> bool:
        """Whether there is a service manager to notify."""
        return self.address is not None

    def send(self, *states: str) -> bool:
        """Send ``states`` (each ``NAME=value``) as one datagram."""
        payload = _payload(states)
        if self.address is None:
            return False
        return _send(self.address, payload)

    def ready(self, status: str | None = None) -> bool:
        """Start-up or reload finished (``READY=1``), with an optional status line."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", _status(status))

    def reloading(self) -> bool:
        """A reload begins; ``ready()`` must follow when it is done.

        ``MONOTONIC_USEC`` is what ``Type=notify-reload`` (systemd 253+) needs
        to match this message to its reload request; older managers ignore it.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={now_usec}")

    def stopping(self) -> bool:
        """A graceful stop begins (``STOPPING=1``)."""
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """Set the one-line status shown by ``systemctl status``."""
        return self.send(_status(text))

    def mainpid(self, pid: int) -> bool:
        """Tell the manager that ``pid`` is now the service's main process."""
        return self.send(f"MAINPID={pid}")

    def store_fd(self, name: str, fd: int) -> bool:
        """Hand ``fd`` to the service's file-descriptor store under ``name`` (``FDSTORE=1``).

        The manager keeps it across a restart of the service and passes it back
        in ``$LISTEN_FDS`` with the name in ``$LISTEN_FDNAMES``; it is refused
        (logged by the manager) unless the unit sets ``FileDescriptorStoreMax=``.
        """
        if self.address is None:
            return False
        return _send(self.address, _payload(("FDSTORE=1", f"FDNAME={name}")), (fd,))

    def remove_fd(self, name: str) -> bool:
        """Drop the stored descriptors named ``name`` (``FDSTOREREMOVE=1``)."""
        return self.send("FDSTOREREMOVE=1", f"FDNAME={name}")

    def watchdog(self) -> bool:
        """Keep-alive ping (``WATCHDOG=1``); see ``watchdog_interval``."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Like the module's ``watchdog_interval``, but None when nobody would hear the pings."""
        if self.address is None:
            return None
        return watchdog_interval()


def _status(text: str) -> str:
    # STATUS= is a single line: fold a multi-line message rather than let its
    # second line be parsed as another assignment.
    return "STATUS=" + " ".join(text.splitlines())


# --- sd_listen_fds -----------------------------------------------------------


@dataclass(frozen=True)
class InheritedSocket:
    """A socket passed by the service manager: its fd, its name, and a socket object."""

    fd: int
    name: str
    sock: socket.socket


def listen_fds(*, unset_environment: bool = True) -> list[InheritedSocket]:
    """Adopt the sockets passed by systemd socket activation, in the order passed.

    Returns one ``InheritedSocket`` per fd from ``LISTEN_FDS_START`` on when
    ``$LISTEN_PID`` is this process and ``$LISTEN_FDS`` is positive, else
    ``[]``. Names come from ``$LISTEN_FDNAMES``, "unknown" when it is unset.
    The fds are made close-on-exec so that programs we exec do not inherit
    them. With ``unset_environment`` the three variables are removed from
    ``os.environ`` whatever the outcome, so children cannot mistake them for
    their own.

    Raises ValueError, naming the variable, for a malformed value, a name
    count that differs from the fd count, or an fd that is not an open socket.
    """
    try:
        return _adopt_listen_fds()
    finally:
        if unset_environment:
            for variable in _LISTEN_VARIABLES:
                os.environ.pop(variable, None)


def _adopt_listen_fds() -> list[InheritedSocket]:
    listen_pid = os.environ.get("LISTEN_PID")
    if not listen_pid:
        return []
    pid = _parse_int("LISTEN_PID", listen_pid)
    if pid != os.getpid():
        log.debug("ignoring inherited fds: LISTEN_PID=%d is not this process (pid %d)", pid, os.getpid())
        return []
    listen_fds_value = os.environ.get("LISTEN_FDS", "")
    count = _parse_int("LISTEN_FDS", listen_fds_value) if listen_fds_value else 0
    if count < 0:
        raise ValueError(f"LISTEN_FDS={quote(listen_fds_value)} is negative")
    if count == 0:
        return []
    names = _fd_names(os.environ.get("LISTEN_FDNAMES"), count)

    # Everything is validated: only now touch the fds.
    inherited = []
    for index, name in enumerate(names):
        fd = LISTEN_FDS_START + index
        try:
            # sd_listen_fds sets FD_CLOEXEC on every passed fd.
            os.set_inheritable(fd, False)
            # Family, type and protocol are read from the fd itself.
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(
                f"LISTEN_FDS={count} but fd {fd} ({name!r}) is not an open socket: {exc.strerror or exc}"
            ) from exc
        inherited.append(InheritedSocket(fd=fd, name=name, sock=sock))
    return inherited


def _fd_names(value: str | None, count: int) -> list[str]:
    if not value:
        return [_UNKNOWN_FD_NAME] * count
    names = value.split(":")
    if len(names) != count:
        # libsystemd fails the same way (-EINVAL); guessing which name belongs
        # to which fd could serve a socket under the wrong role.
        raise ValueError(f"LISTEN_FDNAMES={quote(value)} has {len(names)} names for LISTEN_FDS={count}")
    return names
