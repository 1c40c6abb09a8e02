"""socketserver's per-connection hooks under a worker's rules (the ``sync`` and ``thread`` classes).

:class:`ConnectionHooks` is the part of a worker's ``TCPServer`` that runs
for each connection, in the thread that handles it: the PROXY header before
the handler, the connection watched while the handler has it
(:mod:`prefork.workers.watch`), its bytes and access-log line at its end, a
quiet end for one the worker closed itself, and the handler's errors to the
log. :class:`prefork.workers.servers.WorkerServer` adds the serving loop.
"""

from __future__ import annotations

import logging
import socketserver
import ssl
import sys
import time
from typing import Any

from prefork import logs, tls
from prefork.proxy_protocol import ProxyProtocolError, read_header
from prefork.scoreboard import count_error
from prefork.workers.admission import Reason
from prefork.workers.base import WorkerLifecycle
from prefork.workers.connection import account, format_peer, log_access
from prefork.workers.watch import Watch

log = logging.getLogger("prefork.workers.servers")  # the name these lines always had
_client_failures = logs.RateLimitedLog(log)  # timeouts, resets, TLS errors (keys): a client can repeat them


class ConnectionHooks(socketserver.TCPServer, WorkerLifecycle):
    """``finish_request``, ``shutdown_request`` and ``handle_error`` as a worker runs them (see the module)."""

    _watch: Watch
    account: bool  # bytes per connection are read at its end (for the record or the access log)
    count_bytes: bool
    access_log: bool

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Read the PROXY header first when the policy asks for one, then run the handler.

        The handler sees the original client as ``client_address``. A health
        check (a ``LOCAL`` header) is served like any connection, unless the
        master set this instance to drain for its load balancer: then it is
        closed at once, so the balancer takes the instance out of its pool.
        """
        self.handler_begins(request)
        try:
            if self.proxy is None and not self.account:  # the common case: socketserver's finish_request, inline
                self.RequestHandlerClass(request, client_address, self)  # type: ignore[arg-type]  # typeshed: Self
            else:
                self._finish_request(request, client_address)
        except Exception:
            if not self._watch.was_closed(request):
                raise
            # the worker closed it (idle timeout, reclaimed) and counted it: no handler error
        finally:
            self.handler_ends(request)

    def handler_begins(self, request: Any) -> None:
        """A handler takes ``request`` in this thread: watched from now on. May be extended."""
        self._watch.begin(request)

    def handler_ends(self, request: Any) -> None:
        """The handler is done with ``request``. May be extended."""
        self._watch.end(request)

    def closed_for(self, reason: Reason) -> None:
        self._watch.close_counted(reason)

    def _finish_request(self, request: Any, client_address: Any) -> None:
        # a TLS connection's PROXY header was read before its handshake (prefork.workers.handshakes)
        proxy = None if isinstance(request, ssl.SSLSocket) else self.proxy_for(client_address)
        if proxy is not None:
            try:
                header, _ = read_header(request, timeout=proxy.timeout)
            except (ProxyProtocolError, TimeoutError) as exc:
                self.proxy_header_failed(client_address, exc)
                return
            if self.closes_health_check(header):
                return
            if header.command == "LOCAL":  # a load balancer's health check
                try:
                    super().finish_request(request, client_address)
                except ConnectionError as exc:  # balancers end their checks with a reset (HAProxy does)
                    log.debug("health check from %s: %s", format_peer(client_address), exc)
                return
            if header.command == "PROXY" and header.source is not None:
                client_address = header.source
            if not self._watch.admit_source(request, client_address):
                return  # over --max-connections-per-source, by the client the header names: counted
        if not self.account:
            super().finish_request(request, client_address)
            return
        started = time.monotonic()
        outcome = "error"
        try:
            super().finish_request(request, client_address)
            outcome = "ok"
        finally:
            counts = account(self.record if self.count_bytes else None, request)
            if self.access_log:
                log_access(client_address, started, counts, outcome)

    def shutdown_request(self, request: Any) -> None:
        """Close a connection; a TLS one says so first (close_notify), so its client sees a clean end."""
        if self._watch.sources is not None:
            self._watch.release_source(request.fileno())
        if isinstance(request, ssl.SSLSocket):
            tls.close_notify(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log the handler's exception (socketserver would print it to stderr); this connection only."""
        if self._watch.was_closed(request):
            return  # the worker closed it (idle timeout, reclaimed): counted and logged as such
        exc = sys.exc_info()[1]
        count_error(self.record, exc)
        if isinstance(exc, TimeoutError):
            _client_failures.warning("connection from %s timed out", format_peer(client_address), key="timeout")
        elif isinstance(exc, ConnectionError):
            _client_failures.info("connection from %s: %s", format_peer(client_address), exc, key="reset")
        elif isinstance(exc, ssl.SSLError) and isinstance(request, ssl.SSLSocket) and tls.from_the_peer(exc, request):
            # the client broke TLS after the handshake (garbage, a renegotiation we refuse): its doing, one line
            _client_failures.info("connection from %s: TLS error after the handshake: %s; closing it",
                                  format_peer(client_address), tls.describe_error(exc), key="tls")
            log.debug("the TLS error of %s", format_peer(client_address), exc_info=True)
        else:
            log.exception("error handling connection from %s", format_peer(client_address))
