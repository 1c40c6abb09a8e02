"""Bind (or adopt) the listening sockets. Raises; never exits."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prefork.config import BindSpec, quote
from prefork.logs import RateLimitedLog

log = logging.getLogger(__name__)
_accept_failures = RateLimitedLog(log)  # a worker out of descriptors fails every accept


class BindError(Exception):
    """A listening socket could not be set up; the message says which and why."""


@dataclass
class Listener:
    """A listening socket shared by the master and every worker."""

    sock: socket.socket
    spec: str  # what the user asked for
    unix_path: str | None = None  # set when we created this Unix socket file and must remove it
    _unix_ino: int | None = None
    address: str = ""  # what it listens on, for logs and status (kept after close)

    def __post_init__(self) -> None:
        self.address = describe(self.sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def hand_over(self) -> None:
        """A new master took this socket: closing our copy must leave its Unix socket file alone."""
        self.unix_path = None

    def close(self) -> None:
        """Close the socket and remove the Unix socket file we made (if it is still ours)."""
        if self.unix_path is not None and self._unix_ino is not None:
            try:
                if os.stat(self.unix_path).st_ino == self._unix_ino:
                    os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
        self.sock.close()


def describe(sock: socket.socket) -> str:
    """The socket's bound address for people: ``127.0.0.1:8000``, ``[::1]:8000``, ``unix:/path``.

    An abstract Unix name shows as ``unix:@name``, as systemd writes it.
    """
    if sock.fileno() == -1:
        return "closed socket"
    try:
        address = sock.getsockname()
    except OSError:
        return "?"
    if sock.family == socket.AF_INET:
        return f"{address[0]}:{address[1]}"
    if sock.family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    if sock.family == socket.AF_UNIX:
        path = os.fsdecode(address)
        if not path:
            return "unix:(unnamed)"
        if path.startswith("\0"):
            return "unix:@" + path[1:]
        return "unix:" + path
    return repr(address)


def _explain(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "address already in use (is another instance running?)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "address not available on this machine"
    return exc.strerror or str(exc)


def bind_tcp(spec: BindSpec, backlog: int) -> Listener:
    host = spec.host or None
    try:
        infos = socket.getaddrinfo(host, spec.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot bind {spec.text}: cannot resolve host {quote(spec.host)} ({exc.strerror})") from exc
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::]:P must not also take the IPv4 port: bind 0.0.0.0:P separately for that
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit this on Linux: Nagle off for every connection, as asyncio, nginx
        # and HAProxy do by default, for the price of one system call per listener, not per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {spec.text}: {_explain(exc)}") from exc
    sock.setblocking(False)
    return Listener(sock=sock, spec=spec.text)


def bind_unix(spec: BindSpec, backlog: int) -> Listener:
    assert spec.path is not None
    path = spec.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(f"cannot bind {spec.text}: {path} exists and is not a socket; refusing to remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: a stale socket file left by a crash
        else:
            raise BindError(f"cannot bind {spec.text}: address already in use (is another instance running?)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot bind {spec.text}: {_explain(exc)}") from exc
    sock.setblocking(False)
    return Listener(sock=sock, spec=spec.text, unix_path=path, _unix_ino=os.stat(path).st_ino)


def bind(spec: BindSpec, backlog: int) -> Listener:
    """Bind and listen on one address; the socket is non-blocking (see prefork/workers/servers.py for why)."""
    return bind_unix(spec, backlog) if spec.is_unix else bind_tcp(spec, backlog)


def bind_all(specs: tuple[BindSpec, ...], backlog: int) -> list[Listener]:
    """Bind every address or none: on a failure the ones already bound are closed."""
    listeners: list[Listener] = []
    try:
        for spec in specs:
            listeners.append(bind(spec, backlog))
    except BindError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def reuse_or_bind(specs: Iterable[BindSpec], have: Mapping[str, Listener],
                  backlog: int) -> tuple[list[Listener], list[Listener]]:
    """(the listeners for ``specs``, those of them bound now): one in ``have`` (keyed by spec) is reused.

    Raises BindError, having closed what it bound.
    """
    listeners: list[Listener] = []
    bound: list[Listener] = []
    try:
        for spec in specs:
            listener = have.get(spec.text)
            if listener is None:
                listener = bind(spec, backlog)
                bound.append(listener)
            listeners.append(listener)
    except BindError:
        for listener in bound:
            listener.close()
        raise
    return listeners, bound


def adopt_inherited(sock: socket.socket, spec: str) -> Listener:
    """Use a listener passed on by the master we replace (an upgrade); we now own its Unix socket file."""
    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:
        path = sock.getsockname()
        path = path.decode() if isinstance(path, bytes) else path
        if path:
            try:
                return Listener(sock=sock, spec=spec, unix_path=path, _unix_ino=os.stat(path).st_ino)
            except FileNotFoundError:
                pass  # its file was removed: serve the socket, there is nothing to clean up
    return Listener(sock=sock, spec=spec)


def adopt(sock: socket.socket, name: str) -> Listener:
    """Use a socket inherited from systemd (already bound and listening)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # see bind_tcp
    return Listener(sock=sock, spec=f"{SYSTEMD_PREFIX}{name}")


SYSTEMD_PREFIX = "systemd:"  # the spec of a socket systemd passed: bind= settings never replace it


# -- accepting, for the workers' loops ------------------------------------------------------------

ACCEPT_PAUSE = 0.1  # seconds a worker stops accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 1 << 28)


def watch(epoll: select.epoll, fd: int) -> None:
    """Register a listening socket with ``EPOLLEXCLUSIVE``: a new connection wakes one idle worker, not all."""
    try:
        epoll.register(fd, select.EPOLLIN | _EPOLLEXCLUSIVE)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: a kernel without EPOLLEXCLUSIVE
            raise
        epoll.register(fd, select.EPOLLIN)


def connection_pending(sock: socket.socket) -> bool:
    """True when a connection waits in ``sock``'s accept queue (a poll that needs no descriptor).

    Linux takes a descriptor for the new connection before it looks at the
    queue, so ``accept()`` fails with EMFILE at the limit even when no client
    waits: that failure alone says nothing about a connection to make room for.
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(ev & select.POLLIN for _, ev in poller.poll(0))


def accept_failed(sock: socket.socket, exc: OSError) -> bool:
    """Log a failed ``accept()``; True when it failed for lack of resources and accepting should pause.

    Readiness is level-triggered, so a worker out of descriptors that kept
    accepting would spin; it pauses for ``ACCEPT_PAUSE`` instead (siblings may
    have room). A client that gave up before the accept is not worth a line.
    """
    if exc.errno in _ACCEPT_RESOURCE_ERRNOS:
        where = describe(sock)
        _accept_failures.warning("cannot accept on %s: %s; pausing accepts for %.1fs", where, exc.strerror,
                                 ACCEPT_PAUSE, key=where)
        return True
    if exc.errno != errno.ECONNABORTED:
        where = describe(sock)
        _accept_failures.warning("cannot accept on %s: %s", where, exc.strerror, key=where)
    return False


# -- closing a listener without resetting its queue ------------------------------------------------

# A classic BPF socket filter that drops a TCP segment with SYN set and ACK clear (a new connection
# request) and keeps everything else (the ACK that completes a handshake already under way, data).
# A socket filter sees the packet from its TCP header on: the flags are byte 13.
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_SO_GET_FILTER = _SO_ATTACH_FILTER  # the same option number, read with getsockopt
_REFUSE_NEW = (
    (0x30, 0, 0, 13),  # ldb [13]: the TCP flags
    (0x54, 0, 0, 0x12),  # and #(SYN|ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN: a new connection request
    (0x06, 0, 0, 0),  # ret #0: drop it
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep the rest
)
_PROGRAM = b"".join(struct.pack("HBBI", code, jt, jf, k) for code, jt, jf, k in _REFUSE_NEW)


def refuse_new(sock: socket.socket) -> bool:
    """Stop the kernel from taking new connections on a TCP listener; those already queued stay.

    Closing a listening socket resets every connection in its accept queue
    (the kernel completed their handshakes; nobody accepted them). With this
    filter attached, new connection requests are dropped, so the queue only
    drains: serve it, then close the socket, and a client whose request was
    dropped is refused when its SYN is sent again (one second later) rather
    than accepted into a queue that is then reset. The filter belongs to the
    socket, so every process holding it sees it (see :func:`refusing_new`).
    Some kernels let only a process with ``CAP_NET_ADMIN`` attach it: a
    master that gave up root (``--user``) asks its :class:`FilterHelper`.
    False where it does not apply (a Unix socket, a closed socket) or
    cannot be done.
    """
    if sock.fileno() < 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        _attach_refuse_filter(sock)
    except OSError as exc:
        if exc.errno == errno.EPERM and _FILTER_HELPER is not None and _FILTER_HELPER.refuse_new(sock):
            return True
        log.warning("cannot stop new connections on %s before closing it: %s", describe(sock), exc.strerror)
        return False
    return True


def _attach_refuse_filter(sock: socket.socket) -> None:
    program = ctypes.create_string_buffer(_PROGRAM)
    fprog = struct.pack("HL", len(_REFUSE_NEW), ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def shrink_backlog(sock: socket.socket) -> bool:
    """Where the filter cannot go on: ``listen(0)``, so the kernel drops new requests while one waits.

    A weaker guard than :func:`refuse_new`: each time the queue empties one
    more connection can get in, so one may still be queued when the socket
    closes. False where it does not apply.
    """
    if sock.fileno() < 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.listen(0)
    except OSError:
        return False
    return True


class FilterHelper:
    """A child that keeps root when the master gives it up (``--user``), only to attach the filter.

    On kernels where attaching a socket filter needs ``CAP_NET_ADMIN``, an
    unprivileged master could not refuse new connections before closing a
    listener, and its stop would reset what is queued. Started before the
    switch, this process holds nothing but its end of a socket pair: the
    master sends it a listener's descriptor, it attaches
    :func:`refuse_new`'s filter (which then holds for every process holding
    that socket), closes the descriptor and answers one byte. It runs no
    handler code, ignores the signals a terminal or a service manager sends
    the group, and leaves when the master's end closes (the master exits).
    """

    TIMEOUT = 2.0  # seconds the master waits for an answer

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock

    @classmethod
    def start(cls, title: Callable[[], None] | None = None) -> FilterHelper:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the helper's side; tests drive it through a stop under --user
            status = 1
            try:
                ours.close()
                if title is not None:
                    title()
                _serve_filter_requests(theirs)
                status = 0
            finally:
                os._exit(status)
        theirs.close()
        ours.settimeout(cls.TIMEOUT)
        return cls(pid, ours)

    def refuse_new(self, sock: socket.socket) -> bool:
        """Ask the helper to attach the filter to ``sock``; False when it could not (or is gone)."""
        try:
            socket.send_fds(self.sock, [b"f"], [sock.fileno()])
            return self.sock.recv(16) == b"\x01"
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def _serve_filter_requests(sock: socket.socket) -> None:
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    keep = sock.fileno()
    os.closerange(3, keep)  # the listeners and everything else the master had open: not ours to hold
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 16, 8)
        if not msg:
            return  # the master is gone
        ok = bool(fds)
        for fd in fds:
            listener = socket.socket(fileno=fd)
            try:
                _attach_refuse_filter(listener)
            except OSError:
                ok = False
            finally:
                listener.close()
        sock.send(b"\x01" if ok else b"\x00")


# The master's helper, when it gave up root (set once, before its loop; see start_filter_helper).
_FILTER_HELPER: FilterHelper | None = None


def start_filter_helper(title: Callable[[], None] | None = None) -> None:
    """Before the master gives up root: start its :class:`FilterHelper` when this kernel needs one.

    Nothing is started when an unprivileged process can attach the filter
    here (a probe on a fresh socket says so). The helper's end is closed in
    every process the master forks, so no worker can reach it.
    """
    global _FILTER_HELPER
    if _FILTER_HELPER is not None or os.geteuid() != 0 or not _unprivileged_attach_fails():
        return
    _FILTER_HELPER = FilterHelper.start(title)
    os.register_at_fork(after_in_child=_forget_filter_helper)


def filter_helper() -> tuple[int, int] | None:
    """The master's helper as an upgrade in place hands it to the next image: (pid, descriptor), or None."""
    return (_FILTER_HELPER.pid, _FILTER_HELPER.sock.fileno()) if _FILTER_HELPER is not None else None


def adopt_filter_helper(pid: int, fd: int) -> None:
    """The new image of a master that executed itself in place takes over the helper the old one started."""
    global _FILTER_HELPER
    if _FILTER_HELPER is not None:
        return
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    sock.settimeout(FilterHelper.TIMEOUT)
    _FILTER_HELPER = FilterHelper(pid, sock)
    os.register_at_fork(after_in_child=_forget_filter_helper)


def _forget_filter_helper() -> None:
    global _FILTER_HELPER
    if _FILTER_HELPER is not None:
        _FILTER_HELPER.close()
        _FILTER_HELPER = None


def _unprivileged_attach_fails() -> bool:
    """True when, on this kernel, a process without CAP_NET_ADMIN cannot attach a socket filter.

    Probed in a short-lived child that drops to an unprivileged uid.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the probe's side
        status = 2
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                _attach_refuse_filter(probe)
                status = 0
            except OSError:
                status = 1
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) != 0


def refusing_new(sock: socket.socket) -> bool:
    """True when :func:`refuse_new` was applied to this listener (by any process)."""
    if sock.fileno() < 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        attached = sock.getsockopt(socket.SOL_SOCKET, _SO_GET_FILTER, 8 * len(_REFUSE_NEW))
    except OSError:
        return False
    # the kernel reports the length in instructions, so only that many bytes come back
    return isinstance(attached, bytes) and len(attached) == len(_REFUSE_NEW) and _PROGRAM.startswith(attached)


_TCP_INFO_STATE_LISTEN = 10  # tcp_states.h
_TCP_INFO_UNACKED = struct.Struct("=I")  # tcpi_unacked: for a listener, the connections in its accept queue
_TCP_INFO_UNACKED_OFFSET = 24


def queued(sock: socket.socket) -> int | None:
    """Connections waiting in a TCP listener's accept queue (handshake done, not yet accepted).

    From ``TCP_INFO``, which reports the accept queue's length as
    ``tcpi_unacked`` for a listening socket; None where the kernel cannot
    tell (a Unix socket, a closed socket).
    """
    if sock.fileno() < 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except OSError:
        return None
    if len(info) < _TCP_INFO_UNACKED_OFFSET + 4 or info[0] != _TCP_INFO_STATE_LISTEN:
        return None
    count: int = _TCP_INFO_UNACKED.unpack_from(info, _TCP_INFO_UNACKED_OFFSET)[0]
    return count
