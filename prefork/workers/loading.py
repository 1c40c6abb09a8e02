"""Importing the user's handler and checking that the configured worker class can run it.

Runs in every worker before it serves, and in the master for
``--check-config``; a problem is a :class:`HandlerLoadError` with a
one-line message (the worker reports it to the master as ``BOOT_ERROR``).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import socketserver
import ssl
from typing import Any

from prefork.config import Config, check_bytes, cut, quote
from prefork.handlers.aio import RelayProtocol
from prefork.handlers.relay import RelayHandler

WHY_LIMIT = 300  # characters of an exception's own message in the one line (it may quote a value at length)


class HandlerLoadError(Exception):
    """The handler named in the config cannot be imported or is not usable."""


def why(exc: BaseException) -> str:
    """An exception's message on one line, cut short."""
    text = " ".join(str(exc).split("\n"))
    return text if len(text) <= WHY_LIMIT else text[: WHY_LIMIT - 3] + "..."


def is_async_handler(obj: Any) -> bool:
    """An asyncio Protocol subclass or a coroutine function."""
    return (isinstance(obj, type) and issubclass(obj, asyncio.BaseProtocol)) or inspect.iscoroutinefunction(obj)


def load_handler(spec: str, worker_class: str = "thread") -> Any:
    """Import ``module:name`` and check it is a handler ``worker_class`` can run.

    ``sync`` and ``thread`` run ``socketserver.BaseRequestHandler`` subclasses;
    ``async`` runs ``asyncio.Protocol`` subclasses and ``async def handle(reader, writer)``.
    """
    return check_handler(_import_object(spec), spec, worker_class)


def check_handler(obj: Any, spec: str, worker_class: str) -> Any:
    """``obj`` itself when ``worker_class`` can run it; ``spec`` names it in the error."""
    is_socketserver = isinstance(obj, type) and issubclass(obj, socketserver.BaseRequestHandler)
    if worker_class == "async":
        if is_socketserver:
            raise HandlerLoadError(f"cannot load handler {quote(spec)}: a socketserver handler runs under "
                                   "--worker-class sync or thread, not async")
        if not is_async_handler(obj):
            raise HandlerLoadError(f"cannot load handler {quote(spec)}: {quote(obj)} is not an asyncio.Protocol "
                                   "subclass or an async def handle(reader, writer) function")
        return obj
    if is_async_handler(obj):
        raise HandlerLoadError(f"cannot load handler {quote(spec)}: an asyncio handler runs under --worker-class async")
    if not is_socketserver:
        raise HandlerLoadError(
            f"cannot load handler {quote(spec)}: {quote(obj)} is not a socketserver.BaseRequestHandler subclass"
        )
    return obj


def _import_object(spec: str) -> Any:
    module_name, _, attr_path = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise HandlerLoadError(f"cannot load handler {quote(spec)}: no module named {quote(exc.name)}") from exc
        raise HandlerLoadError(f"cannot load handler {quote(spec)}: {type(exc).__name__}: {why(exc)}") from exc
    except BaseException as exc:  # the module's own code failed; say how, in one line
        where = ""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" ({cut(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno})"
        raise HandlerLoadError(f"cannot load handler {quote(spec)}: {type(exc).__name__}: {why(exc)}{where}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerLoadError(
                f"cannot load handler {quote(spec)}: {cut(module_name)} has no attribute {quote(attr_path)}"
            ) from None
    return obj


def handler_for(config: Config, *, relay_tls: ssl.SSLContext | None = None, upstream_board: Any = None,
                worker_index: int = 0) -> Any:
    """Load the configured handler for the configured worker class, with the relay settings applied.

    The built-in echo has an asyncio form, used under ``async``; ``--relay``
    serves the built-in relay (or the user's relay subclass) in the form the
    worker class runs. ``relay_tls`` is the context the relay connects
    upstream with (``--relay-tls``, built by :func:`prefork.tls.load`);
    ``upstream_board`` the daemon's shared one (a worker's, with its
    ``worker_index``), where every worker's relay keeps the upstreams' health
    and connections (None: each relay class keeps its own).
    """
    if config.handler_object is not None:  # given by the program that forked us (prefork.api): no import
        handler = check_handler(config.handler_object, config.handler, config.worker_class)
    else:
        handler = load_handler(config.effective_handler, config.worker_class)
    if not config.relay:
        return handler
    base: type[Any] = RelayProtocol if config.worker_class == "async" else RelayHandler
    if not (isinstance(handler, type) and issubclass(handler, base)):
        raise HandlerLoadError(f"--relay needs the built-in relay or a {base.__name__} subclass "
                               f"as the handler, not {quote(config.handler)}")
    settings = {
        "upstreams": config.relay_upstreams,
        "connect_timeout": config.relay_connect_timeout,
        "idle_timeout": config.relay_idle_timeout or None,
        "send_proxy": config.relay_send_proxy,
        "upstream_tls": relay_tls,
        "upstream_server_name": config.relay_sni,
        "upstream_specs": config.relay_specs,
        "balance": config.relay_balance,
        "check_interval": config.relay_check_interval,
        "slow_start": config.relay_slow_start,
        "check_send": check_bytes(config.relay_check_send) if config.relay_check_send else None,
        "check_expect": check_bytes(config.relay_check_expect) if config.relay_check_expect else None,
        "upstream_board": upstream_board,
        "worker_index": worker_index,
    }
    return type(handler.__name__, (handler,), {"__module__": handler.__module__, **settings})
