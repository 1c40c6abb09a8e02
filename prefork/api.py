"""Serving from Python: :class:`PreforkServer`, shaped like socketserver's servers, and :func:`serve`.

The socketserver recipe changes by one line::

    serv = PreforkServer(('', 20000), EchoHandler, workers=4)   # was: TCPServer(('', 20000), EchoHandler)
    serv.serve_forever()

Every option of the ``prefork`` command is a keyword argument of the same
name (:class:`ServerOptions`), checked by the same code (:mod:`prefork.config`)
when the server is made; a mistake raises :class:`OptionError` before
anything is bound. The handler is the object itself, so it may live in the
script that runs (``__main__``): the master is forked from this process, and
forked workers use the object they already hold.

How a program serves. ``serve_forever()`` binds the sockets here (through
the ``prefork`` command's own start path, :func:`prefork.cli.prepare_master`),
then forks the master and stays as the service's stand-in: it passes on every
signal it gets (TERM, INT, QUIT, HUP, USR1, USR2, TTIN, TTOU) to the master
serving now, and returns once the last master has stopped (or raises
:class:`ServerError` when it ended in failure). So the code after
``serve_forever()`` runs once, in this process, after the service stopped.

Reload. The master holds the program's code in memory, so forking new
workers from it would run the old code again. Instead, a reload (HUP,
``preforkctl reload``) runs the program again, as it was started (the same
interpreter, options and arguments), as a new master on the same sockets: an
upgrade (:mod:`prefork.upgrade`). Once it serves, the old master drains its
workers and exits; no connection is refused. The new master ends its own
process when it stops, without running the code after ``serve_forever()``:
the stand-in does that. ``preforkctl upgrade`` does the same.

The masters tell the stand-in about themselves on an inherited datagram
socket: ``SERVING`` (signals go to the newest master that serves) and
``EXIT`` (its status, and why when it failed), one event per datagram
(:func:`encode`, :func:`decode`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import enum
import functools
import logging
import os
import selectors
import signal
import socket
import socketserver
import stat
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, Literal, NoReturn, TypedDict, Unpack

from prefork.cli import MasterSetup, build_master, prepare_master
from prefork.config import DEFAULT_BIND, SETTINGS, Config, ConfigError, build_config
from prefork.control import ControlError
from prefork.listeners import BindError
from prefork.master.rerun import RerunMaster
from prefork.preload import preload
from prefork.privileges import PrivilegeError
from prefork.systemd import Notifier
from prefork.tls import load as load_tls
from prefork.upgrade import INHERIT_ENV
from prefork.workers.loading import HandlerLoadError, handler_for

__all__ = ["OptionError", "PreforkServer", "ServerError", "ServerOptions", "serve"]

log = logging.getLogger(__name__)

STANDIN_ENV = "PREFORK_STANDIN_FD"  # the masters' end of the stand-in's socket
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
EXIT_FAILED = 1
MAX_REPORT = 4096

Address = tuple[str, int] | str
Handler = (type[socketserver.BaseRequestHandler] | type[asyncio.BaseProtocol]
           | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]] | str)
PathArg = str | os.PathLike[str]


class ServerOptions(TypedDict, total=False):
    """The keyword arguments: the ``prefork`` command's long options, ``-`` spelt ``_`` (``prefork --help``)."""

    config: PathArg  # a TOML file, as --config; keyword arguments win over it
    workers: int
    worker_class: Literal["sync", "thread", "async"]
    threads: int
    loop: Literal["auto", "asyncio", "uvloop"]
    balance: Literal["on", "off"]
    max_connections: int
    idle_timeout: float
    reclaim_idle_after: float
    max_connections_per_source: int
    timeout: float
    graceful_timeout: float
    max_requests: int
    max_requests_jitter: int
    max_worker_memory: int
    reload_batch: int
    backlog: int
    name: str
    control: PathArg
    log_level: Literal["debug", "info", "warning", "error", "critical"]
    log_file: PathArg
    access_log: PathArg
    metrics_bind: str
    agent_bind: str
    user: str | int
    group: str | int
    proxy_protocol: bool
    proxy_allow: str | Sequence[str]
    proxy_timeout: float
    relay: str | Sequence[str]
    relay_connect_timeout: float
    relay_idle_timeout: float
    relay_send_proxy: bool
    preload: bool
    certfile: PathArg
    keyfile: PathArg
    keyfile_password_file: PathArg
    ca_certs: PathArg
    cert_reqs: Literal["none", "optional", "required"]
    tls_min_version: Literal["1.2", "1.3"]
    ciphers: str
    alpn: str | Sequence[str]
    sni: str | Sequence[str]
    tls_handshake_timeout: float
    tls_bind: str | Sequence[str]
    relay_tls: bool
    relay_ca_certs: PathArg
    relay_sni: str
    relay_certfile: PathArg
    relay_keyfile: PathArg


KEYWORDS = (*(k for k in SETTINGS if k not in ("handler", "bind")), "config")
_DASHED = {key.replace("_", "-"): key for key in SETTINGS}


class OptionError(ConfigError):
    """A keyword argument, the address or the handler is wrong; raised before anything is bound."""


class ServerError(Exception):
    """The service ended in failure: its master crashed, was killed, or stopped on an error."""


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
            raise OptionError(f"server address {item!r}: expected (HOST, PORT) or a string such as "
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
            raise OptionError(f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, tuple):
            value = list(value)  # the loader takes lists, as TOML gives them
        if key == "config":
            if value is None:
                continue
            if not isinstance(value, str):
                raise OptionError(f"config: expected a path, got {value!r}")
            config_file = value
        else:
            settings[key] = value
    settings["bind"] = bind_texts(address)
    if isinstance(handler, str):
        settings["handler"] = handler
    try:
        config = build_config(settings, config_file)
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


# -- what masters tell the stand-in --------------------------------------------------------------------------


class Event(enum.Enum):
    SERVING = "serving"  # a master's first generation serves: signals go to it from now on
    EXIT = "exit"  # a master is about to exit, with its status (and why, when it failed)


@dataclasses.dataclass(frozen=True)
class Report:
    event: Event
    pid: int
    status: int = 0
    why: str = ""


def encode(report: Report) -> bytes:
    return f"{report.event.value} {report.pid} {report.status} {report.why}".encode()[:MAX_REPORT]


def decode(data: bytes) -> Report | None:
    """The report in one datagram, or None for anything else."""
    parts = data.decode("utf-8", "replace").split(" ", 3)
    try:
        event, pid, status = Event(parts[0]), int(parts[1]), int(parts[2])
    except (ValueError, IndexError):
        return None
    return Report(event, pid, status, parts[3] if len(parts) > 3 else "")


class Reporter:
    """A master's end of the stand-in's socket (inherited across the re-execution of a reload)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @classmethod
    def from_environment(cls) -> Reporter:
        value = os.environ.get(STANDIN_ENV, "")
        try:
            fd = int(value)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                return cls(None)
        except (ValueError, OSError):  # no stand-in: nobody to tell
            return cls(None)
        return cls(fd)

    def send(self, event: Event, status: int = 0, why: str = "") -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the stand-in is gone, or its queue is full: nothing to do about it
            os.write(self.fd, encode(Report(event, os.getpid(), status, why)))


# -- the master of a program ---------------------------------------------------------------------------------


class ProgramMaster(RerunMaster):
    """The master of a program serving through this module: a reload runs the program again, from disk."""

    def __init__(self, *args: Any, reporter: Reporter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reporter = reporter
        self.fatal_reason = ""
        self.upgrader.command = lambda argv: this_program()

    def on_serving(self) -> None:
        super().on_serving()
        self.reporter.send(Event.SERVING)

    def fatal(self, why: str) -> None:
        self.fatal_reason = why
        super().fatal(why)

    def cannot_rerun(self) -> str | None:
        why = super().cannot_rerun()
        if why is None:
            try:
                this_program()
            except CannotRerun as exc:
                return str(exc)
        return why


def run_master(setup: MasterSetup, reporter: Reporter) -> int:
    """Run the master over ``setup`` in this process; tell the stand-in how it ended."""
    if setup.config.preload:  # the handler is in memory already: this freezes the collector over it
        preload(setup)
    master = build_master(setup, {}, [], master_class=functools.partial(ProgramMaster, reporter=reporter))
    status = master.run()
    reporter.send(Event.EXIT, status, master.fatal_reason)
    return status


def _exit_now(status: int) -> NoReturn:
    """The end of a master process we started: flush what it wrote, never run the program's code after it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        logging.shutdown()
    os._exit(status)


# -- the program's process while it serves -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a master ended: ``status`` is its exit code, -N when signal N killed it, None if unknown."""

    pid: int
    status: int | None
    why: str = ""

    @property
    def ok(self) -> bool:
        """It stopped as asked: exit 0, or a stop signal that came before it handled signals."""
        return self.status == 0 or (self.status is not None and -self.status in STOP_SIGNALS)

    def describe(self) -> str:
        if self.status is None:
            how = "ended without saying how (was it killed?)"
        elif self.status < 0:
            how = f"was killed by {signal.Signals(-self.status).name}"
        else:
            how = f"exited with status {self.status}"
        return f"the prefork master (pid {self.pid}) {how}" + (f": {self.why}" if self.why else "")


@dataclasses.dataclass
class _Master:
    pid: int
    pidfd: int
    report: Report | None = None
    outcome: Outcome | None = None  # once it ended

    @property
    def ended(self) -> bool:
        return self.outcome is not None


def _noop(signum: int, frame: FrameType | None) -> None:
    """Only records: the wakeup fd brings the signal number to the stand-in's loop."""


class StandIn:
    """The program's process while its masters serve: passes signals on to the newest, ends with the last.

    One selector: signals arrive as bytes on a wakeup socket, the masters'
    reports on a datagram socket, and each master's end as its pidfd turning
    readable. No sleep, no polling.
    """

    def __init__(self) -> None:
        self.receiver, self.sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.receiver.setblocking(False)
        self.sender.setblocking(False)  # a master never waits on us
        self.sender.set_inheritable(True)  # through the re-execution of a reload
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.masters: dict[int, _Master] = {}  # pid -> master, oldest first
        self._saved: dict[int, Any] = {}
        self._saved_wakeup = -1

    def install(self) -> None:
        """From now on this process's signals are the service's (main thread only)."""
        for signum in FORWARDED:
            self._saved[signum] = signal.signal(signum, _noop)
        self._saved_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def close(self) -> None:
        """Give the program its signals back and close our sockets."""
        if self._saved:
            signal.set_wakeup_fd(self._saved_wakeup)
            for signum, handler in self._saved.items():
                signal.signal(signum, handler)
            self._saved.clear()
        for m in self.masters.values():
            if not m.ended:
                with contextlib.suppress(OSError):
                    os.close(m.pidfd)
        self.selector.close()
        for sock in (self.receiver, self.sender, self._wake_r, self._wake_w):
            sock.close()

    def enter_master(self) -> Reporter:
        """In the forked master, before it runs: drop the stand-in, keep the socket that reports to it."""
        signal.set_wakeup_fd(-1)
        for signum in FORWARDED:  # until the master sets its own: a stop ends it, the rest wait
            signal.signal(signum, signal.SIG_DFL if signum in STOP_SIGNALS else signal.SIG_IGN)
        self.selector.close()
        for sock in (self.receiver, self._wake_r, self._wake_w):
            sock.close()
        fd = self.sender.detach()
        os.environ[STANDIN_ENV] = str(fd)
        if "WATCHDOG_USEC" in os.environ:  # systemd's watchdog: this process pings it from now on
            os.environ["WATCHDOG_PID"] = str(os.getpid())
        return Reporter(fd)

    def run(self, first: int) -> Outcome:
        """Stand in for master ``first`` (our child) and its successors until all ended; how the newest did."""
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._on_signals)
        self.selector.register(self.receiver, selectors.EVENT_READ, self._on_reports)
        self._track(first)
        while any(not m.ended for m in self.masters.values()):
            for key, _ in self.selector.select():
                key.data()
        outcome = list(self.masters.values())[-1].outcome
        assert outcome is not None
        return outcome

    def current(self) -> _Master | None:
        """The newest master still running: it gets the signals."""
        alive = [m for m in self.masters.values() if not m.ended]
        return alive[-1] if alive else None

    def _track(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # a reload's program that served and ended at once: its EXIT may follow
            self.masters[pid] = _Master(pid, -1, outcome=Outcome(pid, None))
            return
        self.masters[pid] = _Master(pid, pidfd)
        self.selector.register(pidfd, selectors.EVENT_READ, lambda: self._ended(pid))

    def _on_signals(self) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        master = self.current()
        for signum in data:
            if master is not None:
                log.debug("passing %s on to the master (pid %d)", signal.Signals(signum).name, master.pid)
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(master.pidfd, signum)

    def _on_reports(self) -> None:
        while True:
            try:
                data = self.receiver.recv(MAX_REPORT)
            except BlockingIOError:
                return
            report = decode(data)
            if report is None:
                continue
            if report.event is Event.SERVING and report.pid not in self.masters:
                self._track(report.pid)  # the program run again by a reload
            elif report.event is Event.EXIT and report.pid in self.masters:
                master = self.masters[report.pid]
                master.report = report
                if master.pidfd < 0:  # it ended before we could watch it
                    master.outcome = Outcome(report.pid, report.status, report.why)

    def _ended(self, pid: int) -> None:
        self._on_reports()  # what it said before it went
        master = self.masters[pid]
        status: int | None = None
        # ours to reap: the first master, and a later one whose parent ended before it (when we are pid 1)
        with contextlib.suppress(ChildProcessError):
            reaped, wait_status = os.waitpid(pid, os.WNOHANG)
            if reaped:
                status = os.waitstatus_to_exitcode(wait_status)
        report = master.report
        if report is not None and (status is None or status == report.status):
            status = report.status
        self.selector.unregister(master.pidfd)
        os.close(master.pidfd)
        master.outcome = Outcome(pid, status, report.why if report else "")
        log.debug("%s", master.outcome.describe())


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
        if INHERIT_ENV in os.environ:  # a reload started this program again, to take over from its master
            _serve_in_successor(self.config)
        _serve_in_program(self.config)

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


def _serve_in_program(config: Config) -> None:
    """Bind here, fork the master, stand in for the service until its last master ends."""
    setup = prepare_master(config)
    stand_in = StandIn()
    try:
        stand_in.install()
        for stream in (sys.stdout, sys.stderr):  # or the master and every worker would write it again
            stream.flush()
        pid = os.fork()
    except BaseException:
        stand_in.close()
        setup.close()
        raise
    if pid == 0:
        _master_child(setup, stand_in)
    setup.forget()
    Notifier().mainpid(pid)  # under systemd: the master speaks for the service (no-op elsewhere)
    try:
        outcome = stand_in.run(pid)
    finally:
        stand_in.close()
    if not outcome.ok:
        raise ServerError(outcome.describe())


def _master_child(setup: MasterSetup, stand_in: StandIn) -> NoReturn:
    status = EXIT_FAILED
    try:
        status = run_master(setup, stand_in.enter_master())
    except BaseException:
        log.exception("the master (pid %d) crashed", os.getpid())
    finally:
        _exit_now(status)


def _serve_in_successor(config: Config) -> NoReturn:
    """This program was started again by a reload: be the new master on the inherited sockets, then end."""
    status = EXIT_FAILED
    try:
        status = run_master(prepare_master(config), Reporter.from_environment())
    except (ConfigError, BindError, ControlError, PrivilegeError, OSError) as exc:
        print(f"prefork: error: {exc}", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        _exit_now(status)
