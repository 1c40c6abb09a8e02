"""Serving from Python: :class:`PreforkServer`, shaped like socketserver's servers, and :func:`serve`.

The socketserver recipe changes by one line::

    serv = PreforkServer(('', 20000), EchoHandler, workers=4)   # was: TCPServer(('', 20000), EchoHandler)
    serv.serve_forever()

Every option of the ``prefork`` command is a keyword argument of the same
name (:class:`ServerOptions`), checked by the same code (:mod:`prefork.config`)
when the server is made; a mistake raises :class:`OptionError` before
anything is bound. The ``PREFORK_*`` environment variables apply as they do
to the command (a container sets them for a program too), under the keyword
arguments, which win; the handler and the address are arguments, so
``PREFORK_HANDLER`` and ``PREFORK_BIND`` never apply here. The handler is the object itself, so it may live in the
script that runs (``__main__``): the master is forked from this process, and
forked workers use the object they already hold.

How a program serves. ``serve_forever()`` makes this process the master,
through the ``prefork`` command's own start path
(:func:`prefork.cli.prepare_master`): it binds the sockets here and runs the
master's loop until the service stops, then returns (or raises
:class:`ServerError` when it ended in failure), so the code after
``serve_forever()`` runs once, in this process, after every worker and mold
is gone. ``preforkctl status`` shows this process's pid; a supervisor's
``kill -9`` of it takes the daemon with it (molds die with their master,
workers close their listeners at once).

Reload. The first generation's mold is forked from this process (the
handler is the object it holds). A reload (HUP, ``preforkctl reload``) runs
the program again, as it was started (the same interpreter, options and
arguments), with ``$PREFORK_MOLD`` set: its code runs up to
``serve_forever()``, which there makes it the new generation's mold, with
the code on disk now. An upgrade (``preforkctl upgrade``) first runs the
program again with ``$PREFORK_CHECK`` (it checks its settings at
``PreforkServer()`` and exits), then executes it in place (same pid,
sockets, molds and workers handed over): the code before
``serve_forever()`` runs again in the new image, and ``serve_forever()``
there takes the service over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import json
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, NoReturn, Unpack

from prefork import logs
from prefork.cli import build_master, prepare_master
from prefork.config import DEFAULT_BIND, SETTINGS, Config, ConfigError, load_config, quote
from prefork.control import ControlConnection
from prefork.generated_settings import ServerOptions
from prefork.master.loop import Master
from prefork.master.reload import Waiter
from prefork.mold.process import MOLD_ENV, MoldSpec, run_mold
from prefork.scoreboard import Scoreboard
from prefork.tls import load as load_tls
from prefork.workers.loading import HandlerLoadError, handler_for

__all__ = ["OptionError", "PreforkServer", "ServerError", "ServerOptions", "serve"]

log = logging.getLogger(__name__)

CHECK_ENV = "PREFORK_CHECK"  # the program run again only to check its settings before an upgrade
# the master's signals: the program's own handlers are put back when serve_forever() returns
MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                  signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
EXIT_FAILED = 1

Address = tuple[str, int] | str
Handler = (type[socketserver.BaseRequestHandler] | type[asyncio.BaseProtocol]
           | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | str)


KEYWORDS = (*(k for k in SETTINGS if k not in ("handler", "bind")), "config")
_DASHED = {key.replace("_", "-"): key for key in SETTINGS}


class OptionError(ConfigError):
    """A keyword argument, the address or the handler is wrong; raised before anything is bound."""


class ServerError(Exception):
    """The service ended in failure: the master stopped on an error (a handler that cannot be loaded)."""


# -- arguments -> a Config ---------------------------------------------------------------------------------


def bind_texts(address: Address | list[Address]) -> list[str]:
    """``('', 20000)`` -> ``['0.0.0.0:20000']``; a string is a bind as ``--bind`` takes it; a list is several."""
    items: list[object] = list(address) if isinstance(address, list) else [address]
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif (isinstance(item, tuple) and len(item) in (2, 4) and isinstance(item[0], str)
              and isinstance(item[1], int) and not isinstance(item[1], bool)):
            host = item[0] or "0.0.0.0"  # as socketserver's TCPServer: '' is every IPv4 interface
            texts.append(f"[{host}]:{item[1]}" if ":" in host else f"{host}:{item[1]}")
        else:
            raise OptionError(f"server address {quote(item)}: expected (HOST, PORT) or a string such as "
                              "'127.0.0.1:20000', '[::1]:20000' or 'unix:/run/app.sock'")
    return texts


def keyword_message(text: str) -> str:
    """A ConfigError's message in the keywords' spelling: ``max-requests: ...`` -> ``max_requests: ...``."""
    name, sep, rest = text.partition(":")
    return f"{_DASHED[name]}:{rest}" if sep and name in _DASHED else text


def handler_name(handler: object) -> str:
    """How status and logs name a handler object: ``__main__:EchoHandler``."""
    qualname = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return f"{getattr(handler, '__module__', None) or '?'}:{qualname}"


def make_config(handler: Handler, address: Address | list[Address], options: Mapping[str, object]) -> Config:
    """The Config the ``prefork`` command would build from the same settings; raises OptionError."""
    settings: dict[str, Any] = {}
    config_file = None
    for key, value in options.items():
        if key not in KEYWORDS:
            close = difflib.get_close_matches(key, KEYWORDS, n=1)
            raise OptionError(f"unknown option {quote(key)}" + (f" (did you mean {quote(close[0])}?)" if close else ""))
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, (tuple, list)):  # the loader takes lists of strings, as TOML gives them
            value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        if key == "config":
            if value is None:
                continue
            if not isinstance(value, str):
                raise OptionError(f"config: expected a path, got {quote(value)}")
            config_file = value
        else:
            settings[key] = value
    settings["bind"] = bind_texts(address)
    if isinstance(handler, str):
        settings["handler"] = handler
    try:
        # the PREFORK_* variables too, under the keywords: a container sets them for a program as for the command
        config = load_config(settings, config_file, os.environ, given_by="keyword argument").config
        if not isinstance(handler, str):
            config = dataclasses.replace(config, handler=handler_name(handler), handler_object=handler)
        # the worker class can run it (a "module:Class" is imported now, as --check-config), and the
        # certificates load
        handler_for(config, relay_tls=load_tls(config).relay)
    except ConfigError as exc:
        raise OptionError(keyword_message(str(exc))) from None
    except HandlerLoadError as exc:
        raise OptionError(str(exc)) from None
    return config


# -- running the program again -----------------------------------------------------------------------------


class CannotRerun(Exception):
    """The program cannot be started again as it was (it was read from standard input)."""


def rerun_command(executable: str, orig_argv: Sequence[str], argv: Sequence[str], main_file: str | None,
                  exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """The command line that starts this program again: the same interpreter, options and arguments.

    ``orig_argv`` and ``argv`` are ``sys.orig_argv`` and ``sys.argv``. A
    script named by a relative path that no longer resolves (the program
    changed directory) is named by ``main_file``, its absolute path.
    """
    if not argv or argv[0] in ("", "-"):
        raise CannotRerun("the program was read from standard input, so it cannot be started again "
                          "(run it from a file to reload it)")
    command = [executable, *orig_argv[1:]]
    script_at = len(command) - len(argv)
    if (script_at > 0 and command[script_at] == argv[0] and not os.path.isabs(argv[0])
            and not exists(argv[0]) and main_file):
        command[script_at] = main_file
    return command


def this_program() -> list[str]:
    """:func:`rerun_command` for this process."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return rerun_command(sys.executable, sys.orig_argv, sys.argv, main_file)


# -- the master is this process -------------------------------------------------------------------------------


class ProgramMaster(Master):
    """The master of a program serving through this module: the program's own process.

    The first generation's mold is forked from it (the handler is the object
    the program holds); every later mold is the program run again, which
    imports the code on disk and becomes the mold at ``serve_forever()``. An
    upgrade executes the program again in place (same pid); before that, the
    program run again with ``$PREFORK_CHECK`` checks its settings and exits.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fatal_reason = ""
        self.upgrader.command = lambda argv: this_program()
        self.upgrader.check_command = lambda argv: (this_program(), {CHECK_ENV: "1"})
        self.molds.rerun = this_program
        # the program holds its handler: a mold per generation is how a reload runs new code, whatever preload says
        self.gens.config = dataclasses.replace(self.gens.config, preload=True)
        self.gens.reread = lambda current: current  # the program run again builds the new configuration

    def fatal(self, why: str) -> None:
        self.fatal_reason = why
        super().fatal(why)

    def begin_reload(self, waiters: Sequence[Waiter], canary: float | None = None) -> None:
        why = cannot_rerun()
        if why is None:
            super().begin_reload(waiters, canary)
            return
        log.error("reload refused: %s", why)
        for waiter in waiters:
            waiter.reply({"ok": False, "error": f"reload failed: {why}"})

    def begin_upgrade(self, waiter: ControlConnection | None = None) -> None:
        why = cannot_rerun()
        if why is None:
            super().begin_upgrade(waiter)
            return
        log.error("upgrade refused: %s", why)
        if waiter is not None:
            waiter.reply({"ok": False, "error": f"upgrade failed: {why}"})


def cannot_rerun() -> str | None:
    """Why this program cannot be run again (read from standard input), or None."""
    try:
        this_program()
    except CannotRerun as exc:
        return str(exc)
    return None


def _serve_here(config: Config) -> None:
    """Be the master in this process until the service stops; raise ServerError when it ended in failure."""
    setup = prepare_master(config)
    saved = {signum: signal.getsignal(signum) for signum in MASTER_SIGNALS}
    try:
        master = build_master(setup, {}, [], master_class=ProgramMaster)
    except BaseException:
        setup.close()
        raise
    try:
        status = master.run()
    finally:
        signal.set_wakeup_fd(-1)
        for signum, handler in saved.items():  # the program's own again, for the code after serve_forever()
            if handler is not None:
                signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
    if status != 0:
        raise ServerError(f"the prefork master (pid {os.getpid()}) stopped with status {status}"
                          + (f": {master.fatal_reason}" if master.fatal_reason else ""))


def _serve_as_mold(config: Config) -> NoReturn:
    """This program was run again by its master to be a generation's mold: be it, with the code on disk now."""
    try:
        handed = json.loads(os.environ.pop(MOLD_ENV))
        logs.setup(config.log_level, config.log_file)
        logs.setup_access_log(config.access_log)
        listeners = tuple(socket.socket(fileno=int(fd)) for fd, _ in handed["listeners"])
        specs = tuple(str(spec) for _, spec in handed["listeners"])
        spec = MoldSpec(generation=int(handed["generation"]), master_pid=int(handed["master_pid"]), config=config,
                        listeners=listeners, channel_fd=int(handed["channel_fd"]), tls=load_tls(config, list(specs)),
                        listener_specs=specs)
        scoreboard = Scoreboard(int(handed["scoreboard_capacity"]), fd=int(handed["scoreboard_fd"]))
        sock = socket.socket(fileno=int(handed["sock"]))
    except BaseException:
        traceback.print_exc()
        os._exit(EXIT_FAILED)
    run_mold(spec, scoreboard, sock)


def _checked() -> NoReturn:
    """This program was run again to check its settings before an upgrade: they are (PreforkServer checked)."""
    print("configuration OK", flush=True)
    os._exit(0)


# -- the API ------------------------------------------------------------------------------------------------


class PreforkServer:
    """A preforking TCP server shaped like ``socketserver.TCPServer(server_address, RequestHandlerClass)``.

    ``RequestHandlerClass`` is a ``socketserver.BaseRequestHandler``
    subclass (worker classes ``thread`` and ``sync``), or, under
    ``worker_class='async'``, an ``asyncio.Protocol`` subclass or an
    ``async def handle(reader, writer)`` function; or a ``"module:Class"``
    string. ``server_address`` is ``(HOST, PORT)`` (``''``: every IPv4
    interface), a string as ``--bind`` takes it (``'unix:/run/app.sock'``), or
    a list of them. The options are :class:`ServerOptions`. Every mistake
    raises :class:`OptionError` here, before anything is bound.
    """

    def __init__(self, server_address: Address | list[Address], RequestHandlerClass: Handler,
                 **options: Unpack[ServerOptions]) -> None:
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.config = make_config(RequestHandlerClass, server_address, options)
        if self.config.reload_on_change and (why := cannot_rerun()) is not None:
            raise OptionError(f"reload_on_change: {why}")  # each reload runs the program again
        self._served = False

    def serve_forever(self) -> None:
        """Serve until the service is stopped (TERM, INT, ``preforkctl stop``), then return.

        Call it from the main thread: this process takes the service's
        signals and passes them on to the master. Raises BindError,
        ControlError, PrivilegeError or OSError when the service cannot start
        (nothing is left behind), and :class:`ServerError` when it ended in
        failure.
        """
        if self._served:
            raise RuntimeError("serve_forever() runs once for each PreforkServer")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("serve_forever() must run in the main thread: it takes the service's signals")
        self._served = True
        if MOLD_ENV in os.environ:  # our master ran the program again to be a generation's mold
            _serve_as_mold(self.config)
        if os.environ.pop(CHECK_ENV, None):  # our master checks the program before it upgrades to it
            _checked()
        _serve_here(self.config)

    def server_close(self) -> None:
        """Nothing to release: the sockets are the masters', and closed when they stop (socketserver's hook)."""

    def __enter__(self) -> PreforkServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server_close()


def serve(handler: Handler, bind: Address | list[Address] = DEFAULT_BIND, **options: Unpack[ServerOptions]) -> None:
    """``PreforkServer(bind, handler, **options).serve_forever()`` in one call."""
    PreforkServer(bind, handler, **options).serve_forever()
