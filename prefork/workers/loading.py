"""Importing the user's handler and checking that the configured worker class can run it.

Runs in a generation's mold (or, with ``--no-preload``, in every worker
before it serves), and before anything is bound in a child that checks the
handler as the user it will run as (:mod:`prefork.loadcheck`); a problem is a
:class:`HandlerLoadError` with a one-line message naming the user's file and
line (the traceback is logged at debug level).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import pkgutil
import pwd
import socketserver
import ssl
import sys
import sysconfig
import traceback
from typing import Any

from prefork.config import Config, check_bytes, cut, did_you_mean, quote
from prefork.handlers.aio import RelayProtocol
from prefork.handlers.relay import RelayHandler

log = logging.getLogger(__name__)

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
    except BaseException as exc:  # the module's own code failed, or it is not there: say which, in one line
        log.debug("cannot load handler %s:", quote(spec), exc_info=exc)  # the whole traceback at debug
        raise HandlerLoadError(f"cannot load handler {quote(spec)}: {import_failure(exc, module_name)}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            known = [name for name in dir(obj) if not name.startswith("_")]
            raise HandlerLoadError(
                f"cannot load handler {quote(spec)}: {cut(module_name)} has no attribute {quote(attr_path)}"
                + did_you_mean(part, known)) from None
    return obj


def import_failure(exc: BaseException, module_name: str) -> str:
    """Why importing ``module_name`` failed, on one line: where in the user's code, or what is missing."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and (
            exc.name == module_name or module_name.startswith(exc.name + ".")):
        # a directory the user cannot read explains it better than a name that looks alike
        return f"no module named {quote(exc.name)}{_unreadable_path() or _module_suggestion(exc.name)}"
    where = user_line(exc)
    text = f"{where}: " if where else ""
    message = exc.msg if isinstance(exc, SyntaxError) and exc.msg else why(exc)
    text += f"{type(exc).__name__}: {message}"
    if isinstance(exc, PermissionError) and os.geteuid() != 0:
        text += f" (the handler is loaded as user {_user_name()}: check the permissions of that file)"
    return text


def user_line(exc: BaseException) -> str:
    """``file:line`` in the user's code where ``exc`` arose (a SyntaxError: the broken line), or ``""``.

    The deepest frame outside Python's own library and prefork: a ModuleNotFoundError
    raised inside the user's module names the line that imported the missing module.
    """
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{_shown(exc.filename)}:{exc.lineno}"
    found = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if not _is_library(filename):
            found = f"{_shown(filename)}:{lineno}"
    return found


def _both(path: str) -> set[str]:
    return {os.path.join(os.path.abspath(path), ""), os.path.join(os.path.realpath(path), "")}


_STDLIB = tuple(_both(sysconfig.get_paths()["stdlib"]) | _both(sysconfig.get_paths()["platstdlib"]))
_PREFORK = tuple(_both(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _is_library(filename: str) -> bool:
    """Code of Python's own library (importlib's frozen bootstrap too) or of prefork, not the user's."""
    if filename.startswith(("<", *_PREFORK)):
        return True
    for root in _STDLIB:
        if filename.startswith(root):  # what pip installs beside it is the user's
            return not filename[len(root):].startswith(("site-packages" + os.sep, "dist-packages" + os.sep))
    return False


def _shown(filename: str) -> str:
    """A file under the working directory by its relative name (as the user wrote it), others in full."""
    with contextlib.suppress(OSError):
        here = os.path.join(os.getcwd(), "")
        if filename.startswith(here):
            return cut(filename[len(here):])
    return cut(filename)


def _module_suggestion(name: str) -> str:
    """`` (did you mean X?)`` for a module name close to ``name`` where it was looked for."""
    parent, _, last = name.rpartition(".")
    try:
        path = getattr(sys.modules[parent], "__path__", None) if parent else None
        names = [m.name for m in pkgutil.iter_modules(path)] if path is not None or not parent else []
    except (KeyError, OSError):
        return ""
    close = did_you_mean(last, [n for n in names if n != last], cutoff=0.75)  # among every module: close ones
    return close.replace("mean ", f"mean {parent}.", 1) if close and parent else close


def _unreadable_path() -> str:
    """A hint when a directory on the module search path cannot be read by the user loading the handler."""
    if os.geteuid() == 0:
        return ""
    for entry in sys.path:
        directory = entry or "."
        try:
            os.stat(directory)
        except PermissionError:
            pass
        except OSError:
            continue  # not there: nothing to read
        else:
            if os.access(directory, os.R_OK | os.X_OK):
                continue
        shown = os.path.abspath(directory)
        return (f" (user {_user_name()} cannot read {cut(shown)}, on the module search path: check the "
                "permissions of that directory and those above it)")
    return ""


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def enter_paths(config: Config) -> None:
    """--chdir and --pythonpath, as the handler's import needs them: go to the directory, put them first on
    the module search path (--pythonpath in its order, then --chdir). Raises HandlerLoadError."""
    if config.chdir:
        try:
            os.chdir(config.chdir)
        except OSError as exc:
            raise HandlerLoadError(f"chdir: cannot change to {cut(config.chdir)} as user {_user_name()}: "
                                   f"{exc.strerror}") from None
    first = [*config.pythonpath, *([config.chdir] if config.chdir else [])]
    if sys.path[:len(first)] != first:
        sys.path[:] = first + [entry for entry in sys.path if entry not in first]


def load_configured(config: Config) -> Any:
    """The handler ``config`` names, imported after :func:`enter_paths` and checked for its worker class."""
    enter_paths(config)
    return load_handler(config.effective_handler, config.worker_class)


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
        handler = load_configured(config)
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
