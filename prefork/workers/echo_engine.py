"""The built-in echo under ``--worker-class async``, served straight from the event loop's readiness.

An asyncio transport costs a connection more than the echo itself: uvloop
makes a transport and a protocol, asks the kernel for both addresses and sets
``TCP_NODELAY`` again, for every connection. For a service that opens a
connection per exchange that is most of the user-space CPU it spends. The echo
needs none of it, so the async worker serves its built-in echo with one
``epoll`` object of its own, watched by the event loop: accept, read, write
what was read, close at end of file. The loop still runs everything else (the
heartbeat, signals, the drain), and the worker's contract is unchanged: the
connection cap, ``--max-requests``, drain on stop and reload, counters in the
scoreboard (bytes included, counted as they pass).

Flow control: when the kernel takes only part of a write (the client is not
reading), the rest waits here and the connection is watched for writability
only, so nothing more is read from it until the client catches up. Memory per
connection is bounded by one read (64 KiB).

The worker falls back to the transport-based :class:`~prefork.handlers.aio.EchoProtocol`
when a connection needs more than bytes: with ``--proxy-protocol`` (the header
is parsed first) and with ``--access-log`` (a line per connection).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterable

from prefork.listeners import ACCEPT_PAUSE, accept_failed, connection_pending, describe, watch
from prefork.scoreboard import Record
from prefork.workers.admission import (
    ACCEPT_BATCH,
    LISTENER_GONE_ERRNOS,
    MIN_SILENCE,
    Policy,
    Sample,
    Stage,
    Tracked,
    drain_idle_expired,
    idle_expired,
    observe,
)
from prefork.workers.connection import tcp_activity

log = logging.getLogger(__name__)

READ_SIZE = 65536  # one read; also the most a connection holds while its client is not reading
_MAX_EVENTS = 512  # readiness events handled per turn of the event loop
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT


class EchoEngine:
    """Echo on raw sockets from one epoll set the event loop watches.

    ``on_open`` and ``on_close`` run once per connection (the worker counts
    and caps there); ``can_accept`` says whether accepting may resume after a
    pause for lack of file descriptors; ``on_listener_gone`` is told when a
    listening socket no longer accepts (closed under us), once the engine
    has stopped watching it; ``on_accepting`` each time accepting starts or stops.
    """

    def __init__(self, listeners: Iterable[socket.socket], record: Record, *, on_open: Callable[[], None],
                 on_close: Callable[[], None], can_accept: Callable[[], bool],
                 on_listener_gone: Callable[[str, OSError], None] | None = None,
                 on_accepting: Callable[[bool], None] | None = None,
                 on_reclaim: Callable[[], None] | None = None, reclaims: bool = True) -> None:
        self.listeners = {sock.fileno(): sock for sock in listeners}
        self.addresses = {fd: describe(sock) for fd, sock in self.listeners.items()}
        self.record = record
        self.on_open = on_open
        self.on_close = on_close
        self.can_accept = can_accept
        self.on_listener_gone = on_listener_gone
        self.on_accepting = on_accepting
        self.on_reclaim = on_reclaim  # a connection closed to make room (out of descriptors)
        self.reclaims = reclaims  # False: nothing is closed to make room (--reclaim-idle-after 0)
        self.epoll = select.epoll()
        self.connections: dict[int, float] = {}  # fd -> accepted (time.monotonic()), oldest first
        self.pending: dict[int, memoryview] = {}  # output the kernel did not take yet, by fd
        self.accepting = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.epoll.fileno(), self._on_ready)

    # -- accepting ----------------------------------------------------------------------------------

    def set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        for fd in self.listeners:
            if on:
                watch(self.epoll, fd)
            else:
                self.epoll.unregister(fd)
        self.accepting = on
        if self.on_accepting is not None:
            self.on_accepting(on)

    def drop_listeners(self) -> None:
        """Stop accepting for good: the worker is about to close its listening sockets."""
        self.set_accepting(False)
        self.listeners = {}

    def _accept(self, sock: socket.socket) -> None:
        accept = sock._accept  # type: ignore[attr-defined]  # (fd, address): no socket object to build
        register, connections, set_blocking = self.epoll.register, self.connections, os.set_blocking
        monotonic = time.monotonic
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _ = accept()
            except BlockingIOError:
                return  # a sibling took it
            except OSError as exc:
                if exc.errno in LISTENER_GONE_ERRNOS:
                    self._lose_listener(sock, exc)
                elif exc.errno in (errno.EMFILE, errno.ENFILE) and not connection_pending(sock):
                    return  # at the limit with nobody queued: no connection to make room for
                elif exc.errno in (errno.EMFILE, errno.ENFILE) and self.reclaims and self._make_room():
                    continue  # the quietest connections gave way: accept again
                elif accept_failed(sock, exc):
                    self.set_accepting(False)
                    assert self.loop is not None
                    self.loop.call_later(ACCEPT_PAUSE, self._resume_after_pause)
                return
            set_blocking(fd, False)
            register(fd, _EPOLLIN)
            connections[fd] = monotonic()
            self.on_open()  # may stop accepting: the connection cap, max-requests
            if not self.accepting:
                return

    def _lose_listener(self, sock: socket.socket, exc: OSError) -> None:
        """A listener closed under us: its registration cannot be removed, so the epoll set is made afresh."""
        fd = next((fd for fd, s in self.listeners.items() if s is sock), None)
        if fd is None:
            return
        del self.listeners[fd]
        if sock.fileno() != -1:
            sock.detach()  # its number may be someone else's descriptor now: never close it
        old, self.epoll = self.epoll, select.epoll()
        for conn in self.connections:
            self.epoll.register(conn, _EPOLLOUT if conn in self.pending else _EPOLLIN)
        if self.accepting:
            for other in self.listeners:
                watch(self.epoll, other)
        if self.loop is not None:
            self.loop.remove_reader(old.fileno())
            self.loop.add_reader(self.epoll.fileno(), self._on_ready)
        old.close()
        if self.on_listener_gone is not None:
            self.on_listener_gone(self.addresses.get(fd, f"fd {fd}"), exc)

    def _resume_after_pause(self) -> None:
        if self.can_accept():
            self.set_accepting(True)

    # -- connections --------------------------------------------------------------------------------

    def _on_ready(self) -> None:
        try:
            events = self.epoll.poll(0, _MAX_EVENTS)
        except InterruptedError:
            return
        read, write = os.read, os.write
        listeners, pending = self.listeners, self.pending
        bytes_in = bytes_out = 0
        for fd, _ in events:
            if fd in listeners:
                if self.accepting:
                    self._accept(listeners[fd])
                continue
            if fd in pending:
                bytes_out += self._flush(fd)
                continue
            try:
                data = read(fd, READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:  # reset by the client
                self._close(fd)
                continue
            if not data:  # end of file: everything read was written back already
                self._close(fd)
                continue
            size = len(data)
            bytes_in += size
            try:
                sent = write(fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(fd)
                continue
            bytes_out += sent
            if sent < size:  # the client is not reading: keep the rest, read nothing more until it is out
                pending[fd] = memoryview(data)[sent:]
                self.epoll.modify(fd, _EPOLLOUT)
        if bytes_in or bytes_out:
            record = self.record
            record.bytes_in += bytes_in
            record.bytes_out += bytes_out

    def _flush(self, fd: int) -> int:
        rest = self.pending[fd]
        try:
            sent = os.write(fd, rest)
        except BlockingIOError:
            return 0
        except OSError:
            self._close(fd)
            return 0
        if sent < len(rest):
            self.pending[fd] = rest[sent:]
        else:
            del self.pending[fd]
            self.epoll.modify(fd, _EPOLLIN)
        return sent

    def _make_room(self) -> bool:
        """Out of descriptors with clients waiting: the connections silent longest give way (a sixteenth of
        them, at least one; the kernel's time since each last received data, TCP_INFO), counted as
        reclaimed. False when there is none to close."""
        silence = []
        recent = time.monotonic() - MIN_SILENCE
        for fd, accepted in self.connections.items():
            if accepted > recent or _unread(fd):
                continue  # just accepted, or its bytes are there to be echoed: not a silent one
            sock = socket.socket(fileno=fd)
            try:
                seen = tcp_activity(sock)
            finally:
                sock.detach()
            if seen is None or seen[1] >= MIN_SILENCE:
                silence.append((seen[1] if seen is not None else 0.0, fd))
        if not silence:
            return False
        silence.sort(reverse=True)
        for _, fd in silence[:max(1, len(silence) // 16)]:
            self._close(fd)
            if self.on_reclaim is not None:
                self.on_reclaim()
        return True

    def oldest_since(self) -> float:
        """When the connection open longest was accepted (0.0 when none is)."""
        return next(iter(self.connections.values()), 0.0)

    def oldest_silent_since(self, now: float) -> float:
        """When the connection silent longest last received data (0.0 when none is open): the kernel's time
        since each last received data (TCP_INFO), read on the watch's tick, so the echo itself pays nothing."""
        oldest = 0.0
        for fd in self.connections:
            sock = socket.socket(fileno=fd)
            try:
                seen = tcp_activity(sock)
            finally:
                sock.detach()
            if seen is not None and (not oldest or now - seen[1] < oldest):
                oldest = now - seen[1]
        return oldest

    def close_drain_idle(self, policy: Policy, now: float) -> int:
        """While the worker drains: close the connections past ``--drain-idle`` by the admission core's rule
        (silent that long, nothing read and not yet echoed, nothing left to send). Returns how many."""
        return self._close_where(drain_idle_expired, policy, now, busy_pending=True)

    def close_idle(self, policy: Policy, now: float) -> int:
        """Close the connections that received nothing for ``--idle-timeout``, by the admission core's rule, as
        every other class does: a client that stopped talking (or stopped reading its echo) gives its
        descriptor back. Returns how many."""
        return self._close_where(idle_expired, policy, now, busy_pending=False, need_figures=True)

    def _close_where(self, expired_by: Callable[[Tracked, Sample, float, Policy], bool], policy: Policy,
                     now: float, busy_pending: bool, need_figures: bool = False) -> int:
        """Close the connections ``expired_by`` the admission core's rule, judged from the kernel's figures
        (TCP_INFO) on the watch's tick. ``busy_pending``: an echo under way counts as work, not silence;
        ``need_figures``: a connection the kernel gives no figures for (a Unix socket) is never judged."""
        expired = []
        for fd, accepted in self.connections.items():
            if (busy_pending and fd in self.pending) or _unread(fd):
                continue  # bytes read and not yet echoed (busy), or bytes arrived: not silent
            sock = socket.socket(fileno=fd)
            try:
                seen = tcp_activity(sock)
            finally:
                sock.detach()
            if seen is None and need_figures:
                continue
            sample = Sample(None) if seen is None else Sample(seen[0], silent_for=seen[1], unsent=seen[3])
            conn = Tracked(Stage.HANDLER, accepted)
            observe(conn, sample, now, policy.reclaim_window)
            if expired_by(conn, sample, now, policy):
                expired.append(fd)
        for fd in expired:
            self._close(fd)
        return len(expired)

    def _close(self, fd: int) -> None:
        self.connections.pop(fd, None)
        self.pending.pop(fd, None)
        os.close(fd)  # leaves the epoll set with it: no other descriptor refers to this socket
        self.on_close()


def _unread(fd: int) -> bool:
    """True when bytes wait in the kernel for ``fd`` (FIONREAD): an accepted connection not yet read."""
    try:
        count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return False
    return count > 0
