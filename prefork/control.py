"""The control socket: wire codec, the master-side server, and the client.

Wire format, both ways: a 4-byte big-endian length, then that many bytes of
UTF-8 JSON holding one object. A request is ``{"command": NAME, ...}``; a
reply is ``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``.
One request per connection.

The server side runs inside the master's single-threaded selector loop: every
client socket is non-blocking, every client has a deadline, and a frame over
:data:`MAX_REQUEST` bytes is refused, so a silent, slow, garbage-sending or
oversized client costs the master nothing but a few bytes of buffer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import reprlib
import select
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from prefork.config import cut

# the frames are prefork's one codec (prefork.frames); named here too, as the control socket's wire format
from prefork.frames import HEADER as HEADER
from prefork.frames import FrameError as ProtocolError
from prefork.frames import decode_body as decode_body
from prefork.frames import encode as encode
from prefork.frames import frame_length as frame_length
from prefork.listeners import ACCEPT_PAUSE, accept_failed
from prefork.logs import RateLimitedLog

if TYPE_CHECKING:
    from prefork.privileges import Identity

log = logging.getLogger(__name__)
_bad_requests = RateLimitedLog(log)  # a client may send garbage in a loop
_closed_clients = RateLimitedLog(log)  # or connect and say nothing, in a loop

MAX_REQUEST = 64 * 1024  # a request is a command and a few arguments
MAX_REPLY = 16 * 1024 * 1024  # a status of a thousand workers fits with room to spare
CLIENT_TIMEOUT = 5.0  # seconds a client may take to send its request or read its reply


class ControlError(Exception):
    """The control socket cannot be set up, or a reply is malformed."""


class DaemonNotRunning(ControlError):
    """Nothing answers on the control socket."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"no prefork daemon is answering on {path} ({reason})")
        self.path = path


_PREVIEW = reprlib.Repr()
_PREVIEW.maxstring = _PREVIEW.maxother = 60
_PREVIEW.maxlevel = 3


def preview(value: object) -> str:
    """A client's value for a log line or a reply: its repr, cut short (it may be 64 KiB deep or long)."""
    try:
        return cut(_PREVIEW.repr(value))
    except Exception:  # an integer too long for repr(), say
        return f"<{type(value).__name__}>"


# -- server side (in the master's loop) ---------------------------------------------------------------

ACCEPT_BATCH = 64  # clients taken per wake-up: a flood must not starve the rest of the master's loop
MAX_CLIENTS = 64  # control clients held at once; the master lowers it to fit its descriptor limit
# accept() on a descriptor that is no longer a listening socket: closed under us, or its number reused
LISTENER_GONE_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL})


class Clients(Protocol):
    """The clients a :class:`ClientGate` admits, as its server keeps them."""

    def client_count(self) -> int: ...

    def has_idle(self) -> bool:
        """True when a client has not sent a complete request yet."""
        ...

    def evict_idle(self) -> None:
        """Close the oldest client that has not sent a complete request."""
        ...


class ClientGate:
    """A listening socket in the master's selector, guarded against floods and descriptor exhaustion.

    * At most :data:`ACCEPT_BATCH` clients per wake-up.
    * At most ``max_clients`` held at once: a newcomer past the cap closes the
      oldest client still silent (connected, request incomplete), so idle
      connections cannot take the master's descriptors while a real client,
      who sends its request at once, gets in; when every held client is busy,
      the listener is not watched until one leaves.
    * Out of descriptors (``EMFILE``, ``ENFILE``, ...): the listener is not
      watched for :data:`~prefork.listeners.ACCEPT_PAUSE` seconds, one log line
      per pause, exactly as a worker pauses. Readiness is level-triggered: a
      listener left watched would wake the loop again at once, for ever.

    The gate is a timer source (:mod:`prefork.master.timers`): a pause ends at
    its deadline.
    """

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, what: str, clients: Clients,
                 on_client: Callable[[socket.socket], None], max_clients: int = MAX_CLIENTS) -> None:
        self.sock = sock
        self.selector = selector
        self.what = what
        self.clients = clients
        self.on_client = on_client
        self.max_clients = max(1, max_clients)
        self.paused_until: float | None = None  # out of descriptors: watched again at this time
        self.evictions = 0
        self._evictions_log = RateLimitedLog(log)
        self._watching = False
        self._closed = False

    @property
    def watching(self) -> bool:
        return self._watching

    def start(self) -> None:
        self._watch(True)

    def _watch(self, on: bool) -> None:
        if on == self._watching or (on and self._closed):
            return
        if on:
            self.selector.register(self.sock, selectors.EVENT_READ, self._on_readable)
        else:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.sock)
        self._watching = on

    def _on_readable(self, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            full = self.clients.client_count() >= self.max_clients
            if full and not self.clients.has_idle():
                self._watch(False)  # every client is busy: watched again when one leaves
                return
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in LISTENER_GONE_ERRNOS:
                    log.error("%s: the listening socket is gone (%s); no longer accepting", self.what, exc.strerror)
                    self.close()
                    return
                if accept_failed(self.sock, exc):
                    self._watch(False)
                    self.paused_until = time.monotonic() + ACCEPT_PAUSE
                    return
                continue  # the client gave up before we took it
            if full:
                self._make_room()
            conn.setblocking(False)
            self.on_client(conn)

    def _make_room(self) -> None:
        self.clients.evict_idle()
        self.evictions += 1
        self._evictions_log.warning("%s: %d clients open, the most it holds; closing the oldest silent one for "
                                    "each newcomer (%d so far)", self.what, self.max_clients, self.evictions)

    def client_left(self) -> None:
        """A client closed: a gate that stopped watching at the cap watches again."""
        if self.paused_until is None and self.clients.client_count() < self.max_clients:
            self._watch(True)

    def next_deadline(self) -> float | None:
        return self.paused_until

    def expire(self, now: float) -> None:
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            self._watch(True)

    def close(self) -> None:
        """Stop watching for good (the socket itself is the caller's)."""
        self._watch(False)
        self._closed = True
        self.paused_until = None


Reply = Callable[[dict[str, Any]], None]
Dispatch = Callable[[dict[str, Any], "ControlConnection"], None]


def _others_may_write(directory: str) -> bool:
    """True for a directory where other users can make entries (``/tmp``, ``/var/tmp``, ``/dev/shm``)."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IWOTH | stat.S_ISVTX))


def prepare_directory(path: str, owner: Identity | None = None) -> None:
    """Make the socket's directory safely.

    In a directory others can write to (the default ``/tmp/prefork-UID``), the
    socket's directory must be a real directory, not a symbolic link (checked
    with ``lstat``: ``stat`` would accept a link someone planted to a directory
    of ours), owned by us (or ``owner``) with mode 0700.
    """
    directory = os.path.dirname(path) or "."
    shared = _others_may_write(os.path.dirname(os.path.abspath(directory)))
    created = not os.path.lexists(directory)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except FileExistsError:
        raise ControlError(
            f"cannot create control socket directory {directory}: it exists and is not a directory"
        ) from None
    except NotADirectoryError:
        raise ControlError(f"cannot create control socket directory {directory}: a parent is not a directory") from None
    except OSError as exc:
        raise ControlError(f"cannot create control socket directory {directory}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        if shared:
            raise ControlError(f"control socket directory {directory} is a symbolic link in a directory others "
                               "can write to (someone else made it?); remove it or pass --control PATH")
        st = os.stat(directory)  # a link the administrator made, somewhere only they can write
    if not stat.S_ISDIR(st.st_mode):
        raise ControlError(f"cannot create control socket directory {directory}: it exists and is not a directory")
    if created and owner is not None:
        os.chown(directory, owner.uid, owner.gid, follow_symlinks=False)
        st = os.lstat(directory)
    want_uid = owner.uid if owner is not None else os.getuid()
    if shared and (st.st_uid != want_uid or stat.S_IMODE(st.st_mode) & 0o077):
        raise ControlError(
            f"control socket directory {directory} must be owned by uid {want_uid} with mode 0700 "
            "(someone else made it?); remove it or pass --control PATH"
        )


class ControlServer:
    """The listening Unix socket, mode 0600, and its clients, all in one selector."""

    def __init__(self, path: str, owner: Identity | None = None) -> None:
        self.path = path
        prepare_directory(path, owner)
        self._take_over_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is born 0600: no window where others can connect
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot bind control socket {path}: {exc.strerror}") from exc
        finally:
            os.umask(old_umask)
        if owner is not None:
            os.chown(path, owner.uid, owner.gid, follow_symlinks=False)  # mode 0600: that user, and root, may connect
        sock.listen(512)
        sock.setblocking(False)
        self.sock = sock
        self._ino = os.stat(path).st_ino
        self.connections: dict[ControlConnection, None] = {}  # oldest first
        self.selector: selectors.BaseSelector | None = None
        self.dispatch: Dispatch | None = None
        self.gate: ClientGate | None = None

    @classmethod
    def adopt(cls, path: str, sock: socket.socket) -> ControlServer:
        """Serve a control socket passed on by the master we replace (an upgrade)."""
        self = cls.__new__(cls)
        self.path = path
        sock.setblocking(False)
        self.sock = sock
        try:
            self._ino = os.stat(path).st_ino
        except OSError:
            self._ino = -1
        self.connections = {}
        self.selector = None
        self.dispatch = None
        self.gate = None
        return self

    def hand_over(self) -> None:
        """Stop accepting (a new master serves this socket now); clients already here get their replies."""
        if self.gate is not None:
            self.gate.close()
        self._ino = -1  # the socket file is the new master's: never remove it
        self.sock.close()

    @staticmethod
    def _take_over_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"control socket path {path} exists and is not a socket; refusing to remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nothing answers: left behind by a daemon that was killed
            return
        finally:
            probe.close()
        raise ControlError(
            f"another prefork daemon answers on {path}; stop it first, or use another --name or --control"
        )

    def attach(self, selector: selectors.BaseSelector, dispatch: Dispatch, max_clients: int = MAX_CLIENTS) -> None:
        self.selector = selector
        self.dispatch = dispatch
        self.gate = ClientGate(self.sock, selector, "control socket", self, self._on_client, max_clients)
        self.gate.start()

    def _on_client(self, sock: socket.socket) -> None:
        self.connections[ControlConnection(self, sock, time.monotonic() + CLIENT_TIMEOUT)] = None

    def client_count(self) -> int:
        return len(self.connections)

    def has_idle(self) -> bool:
        return any(not conn.handled for conn in self.connections)

    def evict_idle(self) -> None:
        for conn in self.connections:
            if not conn.handled:
                conn.close()
                return

    def left(self, conn: ControlConnection) -> None:
        """``conn`` closed."""
        self.connections.pop(conn, None)
        if self.gate is not None:
            self.gate.client_left()

    def drop(self, sock: object) -> bool:
        """Close the client on ``sock`` (a callback of it failed); False when it is not one of ours."""
        for conn in self.connections:
            if conn.sock is sock:
                conn.close("dropped after an internal error")
                return True
        return False

    def next_deadline(self) -> float | None:
        deadlines = [c.deadline for c in self.connections if c.deadline is not None]
        if self.gate is not None and self.gate.paused_until is not None:
            deadlines.append(self.gate.paused_until)
        return min(deadlines) if deadlines else None

    def expire(self, now: float) -> None:
        for conn in list(self.connections):
            if conn.deadline is not None and now >= conn.deadline:
                conn.close("timed out")
        if self.gate is not None:
            self.gate.expire(now)

    def final_word(self, message: dict[str, Any]) -> None:
        """One last message to the clients waiting for the master to exit (what the stop did)."""
        for conn in list(self.connections):
            if conn.kept_open:
                conn.reply(message, keep_open=True)

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()
        if self.gate is not None:
            self.gate.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:  # never remove a successor's socket
                os.unlink(self.path)
        if self.sock.fileno() >= 0:
            self.sock.close()

    def close_in_child(self) -> None:
        """After fork, in a worker: drop our copies without touching the socket file."""
        for conn in list(self.connections):
            conn.sock.close()
        if self.sock.fileno() >= 0:
            self.sock.close()


class ControlConnection:
    """One client: read one framed request, dispatch it, write the reply."""

    def __init__(self, server: ControlServer, sock: socket.socket, deadline: float) -> None:
        self.server = server
        self.sock = sock
        self.deadline: float | None = deadline
        self._inbuf = bytearray()
        self._outbuf = b""
        self._close_after_write = True
        self.kept_open = False  # a client waiting for the master to exit (stop)
        self._closed = False
        self.handled = False  # its request is in (a silent client is the one closed to make room)
        assert server.selector is not None
        server.selector.register(sock, selectors.EVENT_READ, self._on_event)

    def _on_event(self, mask: int) -> None:
        if self._closed:
            return  # closed earlier in this turn of the loop (to make room for a newcomer)
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if mask & selectors.EVENT_READ and not self._closed:
            self._on_readable()

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()  # the client hung up (after a reply, or before finishing its request)
            return
        if self.handled:
            return  # one request per connection: anything after it is ignored
        self._inbuf += data
        try:
            length = frame_length(self._inbuf, MAX_REQUEST)
            if length is None or len(self._inbuf) < HEADER.size + length:
                return
            request = decode_body(bytes(self._inbuf[HEADER.size : HEADER.size + length]))
        except ProtocolError as exc:
            self.handled = True
            _bad_requests.warning("control socket: bad request: %s", exc)
            self.reply({"ok": False, "error": f"bad request: {exc}"})
            return
        self.handled = True
        self._inbuf.clear()
        self.deadline = None  # the master may take its time (a reload); the client waits
        assert self.server.dispatch is not None
        try:
            self.server.dispatch(request, self)
        except Exception as exc:  # a bug in a command must not take the master down
            log.exception("control command %s failed", preview(request.get("command")))
            self.reply({"ok": False, "error": f"internal error: {type(exc).__name__}: {str(exc)[:200]}"})

    def reply(self, message: dict[str, Any], *, keep_open: bool = False) -> None:
        """Send ``message``; with ``keep_open`` the connection stays until the master exits."""
        if self._closed:
            return
        self._close_after_write = not keep_open
        self.kept_open = self.kept_open or keep_open
        self._outbuf += encode(message)
        self.deadline = time.monotonic() + CLIENT_TIMEOUT
        self._flush()

    def _flush(self) -> None:
        try:
            while self._outbuf:
                sent = self.sock.send(self._outbuf)
                self._outbuf = self._outbuf[sent:]
        except BlockingIOError:
            assert self.server.selector is not None
            self.server.selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_event)
            return
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.debug("control socket: send failed: %s", exc)
            self.close()
            return
        if self._close_after_write:
            self.close()
        else:
            self.deadline = None
            assert self.server.selector is not None
            self.server.selector.modify(self.sock, selectors.EVENT_READ, self._on_event)

    def close(self, why: str | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if why:
            _closed_clients.info("control socket: client %s; closing it", why)
        if self.server.selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.server.selector.unregister(self.sock)
        self.sock.close()
        self.server.left(self)


# -- client side (preforkctl) ---------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 1 << 20))
        if not chunk:
            raise ControlError("the daemon closed the connection before replying in full")
        chunks += chunk
    return bytes(chunks)


def connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A Unix socket with a Python timeout is non-blocking, and its connect() fails with EAGAIN when
    # the daemon's backlog is full; a blocking connect bounded by SO_SNDTIMEO waits for room instead.
    seconds = int(timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000)))
    try:
        sock.connect(path)
    except (BlockingIOError, TimeoutError):
        sock.close()
        raise ControlError(f"{path} did not accept the connection within {timeout:g}s (is the daemon stuck?)") from None
    except FileNotFoundError:
        sock.close()
        raise DaemonNotRunning(path, "no such socket") from None
    except ConnectionRefusedError:
        sock.close()
        raise DaemonNotRunning(path, "connection refused: a stale socket?") from None
    except PermissionError:
        sock.close()
        raise ControlError(f"cannot connect to {path}: permission denied (run as the daemon's user)") from None
    sock.settimeout(timeout)
    return sock


def call(path: str, request: dict[str, Any], timeout: float = 10.0) -> tuple[dict[str, Any], socket.socket]:
    """Send one request, return the reply and the still-open socket (for commands that wait for exit)."""
    sock = connect(path, timeout)
    try:
        sock.sendall(encode(request))
        (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
        if length > MAX_REPLY:
            raise ControlError(f"reply of {length} bytes is over the {MAX_REPLY}-byte limit")
        body = _recv_exact(sock, length)
        try:
            reply = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ControlError(f"the daemon's reply is not JSON: {exc}") from None
        if not isinstance(reply, dict):
            raise ControlError("the daemon's reply is not a JSON object")
    except TimeoutError:
        sock.close()
        raise ControlError(f"no reply from {path} within {timeout:g}s") from None
    except OSError as exc:
        sock.close()
        raise ControlError(f"talking to {path}: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return reply, sock


def wait_exited(sock: socket.socket, pid: int, timeout: float, said: list[dict[str, Any]] | None = None) -> bool:
    """Wait until the daemon's process ``pid`` is gone; False on timeout.

    The master closes ``sock`` only as it exits, and a pidfd turns readable
    when the process has really ended (after the interpreter's own teardown),
    so both are waited for, without polling. What the master said meanwhile
    (its report of the stop) is appended to ``said``.
    """
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # ProcessLookupError: already gone
        pidfd = None
    try:
        sock.settimeout(timeout)
        try:
            while chunk := sock.recv(65536):
                if len(received) < MAX_REPLY:
                    received += chunk
        except TimeoutError:
            return False
        except OSError:
            pass  # a reset is a close too
        if said is not None:
            said.extend(_frames(bytes(received)))
        if pidfd is not None:
            readable, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
            return bool(readable)
        return True
    finally:
        sock.close()
        if pidfd is not None:
            os.close(pidfd)


def _frames(data: bytes) -> list[dict[str, Any]]:
    """The complete JSON-object frames in ``data``; anything malformed ends the list."""
    frames: list[dict[str, Any]] = []
    while len(data) >= HEADER.size:
        (length,) = HEADER.unpack_from(data)
        body = data[HEADER.size:HEADER.size + length]
        if len(body) < length:
            break
        try:
            frame = json.loads(body)
        except ValueError:
            break
        if not isinstance(frame, dict):
            break
        frames.append(frame)
        data = data[HEADER.size + length:]
    return frames
