"""``prefork [OPTIONS] [HANDLER]``: the daemon's command line. The only place that maps errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from prefork import __version__, logs
from prefork.config import (
    Config,
    ConfigError,
    Loaded,
    cut,
    default_control_path,
    describe_handler,
    load_config,
    parse_bind,
)
from prefork.handlers import relay_loops
from prefork.settings import COMMAND_OPTIONS, GROUPS, SETTINGS, Setting
from prefork.usage import Parser

if TYPE_CHECKING:
    import socket

    from prefork.control import ControlServer
    from prefork.listeners import Listener
    from prefork.master.handover import Handover
    from prefork.master.loop import Master
    from prefork.privileges import Identity
    from prefork.tls import TlsSetup
    from prefork.upgrade import Inherited

EXIT_USAGE = 2
AnyMaster = TypeVar("AnyMaster", bound="Master")


class UsageError(Exception):
    """A command-line mistake; the message is one line."""


class _Parser(Parser):
    usage_error = UsageError


def build_parser() -> argparse.ArgumentParser:
    """The command line, built from the settings table (prefork.settings), in its groups."""
    p = _Parser(
        prog="prefork",
        description="Run a socketserver request handler in a supervised pool of preforked worker processes. "
        "Every option can also be given as a PREFORK_* environment variable (--workers: PREFORK_WORKERS) or a "
        "key of the --config file; the command line wins over the environment, which wins over the file.",
        epilog="Signals: TERM graceful stop, INT/QUIT fast stop, HUP reload, TTIN/TTOU one worker more/less, "
        "USR1 reopen log files, USR2 upgrade the master program. Control it with preforkctl.",
        argument_default=argparse.SUPPRESS,  # only what the user gave overrides the environment and config file
    )
    groups = {name: p.add_argument_group(name, about) for name, about in GROUPS.items()}
    for setting in (*SETTINGS[:1], *COMMAND_OPTIONS, *SETTINGS[1:]):  # the handler, --config first
        add_option(groups[setting.group], setting)
    groups["general"].add_argument("--version", action="version", version=f"prefork {__version__}")
    return p


def add_option(group: argparse._ArgumentGroup, setting: Setting) -> None:
    """``setting``'s flag (or argument): its type, choices and help, the default shown, from the table."""
    options: dict[str, Any] = {"help": setting.full_help().replace("%", "%%")}
    if setting.positional:
        group.add_argument(setting.name, nargs="?", metavar=setting.metavar, **options)
        return
    if setting.kind == "bool":
        options["action"] = argparse.BooleanOptionalAction if setting.negatable else "store_true"
    else:
        options["metavar"] = setting.metavar
        if setting.kind in ("int", "float"):
            options["type"] = {"int": int, "float": float}[setting.kind]
        if setting.choices:
            options["choices"] = setting.choices
        if setting.kind == "list" and setting.repeat:
            options["action"] = "append"
    group.add_argument(*(flag for flag in (setting.short, setting.option) if flag), **options)


def parse_args(argv: list[str]) -> tuple[dict[str, Any], str | None, bool]:
    """(settings given on the command line, config file, --check-config)."""
    ns = vars(build_parser().parse_args(argv))
    config_file = ns.pop("config", None)
    check = bool(ns.pop("check_config", False))
    return ns, config_file, check


def check_config(loaded: Loaded) -> str:
    """What a start does short of binding (the handler loaded as the workers' user, the certificates,
    the log files), then a summary of the config: a line, then each setting that is not at its default,
    with where it came from."""
    config = loaded.config
    from prefork import privileges, tls
    from prefork.loadcheck import check_loads

    identity = privileges.resolve(config.user, config.group)
    enter_directory(config)
    if config.log_level == "debug":
        logs.setup(config.log_level)  # a failing import's traceback, on stderr
    for option, path in (("log-file", config.log_file), ("access-log", config.access_log)):
        # what the daemon would refuse to open; a file that is not there yet is created then
        if path and path != "-" and os.path.exists(path) and not logs.never_blocks(os.stat(path)):
            raise ConfigError(f"{option} {path}: {logs.NOT_REGULAR}")
    setup = tls.load(config)  # certificates and keys load and match, none has expired
    check_loads(config, identity)  # as a start does: a handler that cannot load fails here
    loop = f" ({config.event_loop})" if config.event_loop else ""
    certificates = "".join(
        f"; TLS on {spec}: {cert.subject}, expires {cert.describe()['not_after']}"
        + (f" (for {cert.server_name})" if cert.server_name else "")
        for spec, cert in setup.certificates())
    watching = ""
    if config.reload_on_change:
        from prefork.reloadwatch import watched_dirs

        watching = f"; reloads when a Python file changes under {', '.join(watched_dirs(config))}"
    summary = (f"configuration OK: {config.workers} {config.worker_class} worker(s){loop} of "
               f"{describe_handler(config)} on {', '.join(config.binds)}{certificates}{watching}")
    return "\n".join([summary, *changed_settings(loaded)])


def changed_settings(loaded: Loaded) -> list[str]:
    """``  workers = 4  (environment variable PREFORK_WORKERS)`` for each setting not at its default."""
    lines = []
    for setting in SETTINGS:
        value = getattr(loaded.config, setting.attr)
        if value == setting.default_value():
            continue
        shown = (", ".join(value) or "none") if isinstance(value, tuple) else value
        if isinstance(shown, bool):
            shown = "true" if shown else "false"
        origin = loaded.origins.get(setting.name, "implied by the other settings")
        lines.append(f"  {setting.key} = {cut(str(shown))}  ({origin})")
    return lines


def enter_directory(config: Config) -> None:
    """--chdir: the master works there too (relative paths in the settings are taken from there). Raises."""
    if config.chdir:
        try:
            os.chdir(config.chdir)
        except OSError as exc:
            raise ConfigError(f"chdir: cannot change to {config.chdir}: {exc.strerror}") from None


def preload_worker_code(config: Config) -> None:
    """Import the workers' own code (never the user's handler) in the master, before any fork.

    Every worker then shares those pages with the master instead of importing
    them again, and after --user the workers need no read access to where
    Python and prefork are installed for our part of the work.
    """
    import prefork.handlers.aio
    import prefork.handlers.echo
    import prefork.handlers.relay
    import prefork.workers.async_worker
    import prefork.workers.entry

    if config.worker_class == "async":
        prefork.workers.async_worker.new_event_loop(config.event_loop).close()  # imports uvloop when the workers use it


def take_listeners(config: Config, resumed: Handover | None = None) -> tuple[list[Listener], Inherited | None]:
    """The listening sockets: our previous image's (an upgrade in place), a replaced master's (an upgrade
    from Python), systemd's (socket activation, or its file-descriptor store after a restart), or bound now
    (and then stored, under systemd)."""
    from prefork import fdstore, systemd, upgrade
    from prefork.listeners import adopt, adopt_filter_helper, adopt_inherited
    from prefork.master import handover

    try:
        # we replace a running master (or our own previous image): its sockets are ours now
        handed = handover.inherited(resumed) if resumed is not None else upgrade.inherited()
        inherited = [] if handed else systemd.listen_fds()  # socket activation: systemd bound them for us
    except (ValueError, upgrade.UpgradeError) as exc:
        raise ConfigError(f"inherited sockets: {exc}") from None
    stored, activated = fdstore.split(inherited)  # a previous master's listeners, kept by systemd
    if resumed is not None and resumed.filter_helper is not None:
        adopt_filter_helper(*resumed.filter_helper)  # a stop's filter still goes on through it
    if handed:
        listeners = [adopt_inherited(sock, spec) for sock, spec in handed.listeners]
        if resumed is None:
            logging.getLogger("prefork").info("upgrade: serving the %d socket(s) of the master we replace",
                                              len(listeners))
    elif activated:
        listeners = [adopt(s.sock, s.name) for s in activated]
        logging.getLogger("prefork").info(
            "using %d socket(s) from systemd: %s", len(listeners), ", ".join(li.address for li in listeners))
        fdstore.drop(systemd.Notifier(), stored)  # socket activation owns the addresses now
    else:
        listeners = fdstore.reconcile(config.bind_specs, stored, config.backlog, systemd.Notifier())
    return listeners, handed


@dataclass
class MasterSetup:
    """What a master starts with, set up by :func:`prepare_master`: its sockets, bound, inherited or adopted."""

    config: Config
    listeners: list[Listener]
    control: ControlServer
    metrics_sock: socket.socket | None
    agent_sock: socket.socket | None
    handed: Inherited | None  # from the master we replace (an upgrade)
    tls: TlsSetup | None = None  # every TLS context, built before --user (keys may be root's to read)
    resumed: Handover | None = None  # from our previous image (an upgrade in place): its workers, molds, counters

    def close(self) -> None:
        """The master never started: close everything, the socket files we made too."""
        for listener in self.listeners:
            listener.close()
        self.control.close()
        self._close_side_ports()

    def forget(self) -> None:
        """In a process that forked the master and serves nothing: close our copies, leave its socket files."""
        for listener in self.listeners:
            listener.sock.close()
        self.control.close_in_child()
        self._close_side_ports()

    def _close_side_ports(self) -> None:
        for sock in (self.metrics_sock, self.agent_sock):
            if sock is not None:
                sock.close()


def prepare_master(config: Config) -> MasterSetup:
    """Everything before the master's loop: logging, listeners, metrics and control sockets, --user. Raises."""
    from prefork import privileges, tls
    from prefork.control import ControlServer
    from prefork.listeners import bind
    from prefork.loadcheck import check_loads

    identity = privileges.resolve(config.user, config.group)
    enter_directory(config)
    logs.setup(config.log_level, config.log_file)
    logs.setup_access_log(config.access_log)
    preload_worker_code(config)
    from prefork.master import handover

    try:
        resumed = handover.received()  # we are the new image of a master that executed us in place
    except handover.HandoverError as exc:
        raise ConfigError(str(exc)) from None
    if resumed is None and config.handler_object is None:  # (an upgrade in place checked it before the exec)
        check_loads(config, identity)  # as the workers' user, before anything is bound; raises
    listeners, handed = take_listeners(config, resumed)
    metrics_sock = agent_sock = None
    try:
        tls_setup = tls.load(config, [li.spec for li in listeners])
        side = dict(handed.side) if handed is not None else {}  # an upgrade: the old master's are ours
        if config.metrics_bind:
            metrics_sock = side.pop("metrics", None) or bind(parse_bind(config.metrics_bind), 64).sock
        if config.agent_bind:
            agent_sock = side.pop("agent", None) or bind(parse_bind(config.agent_bind), 64).sock
        for unwanted in side.values():
            unwanted.close()  # the new configuration has no such port
        control_path = config.control or default_control_path(config.name, identity.uid if identity else None)
        if handed is not None and handed.control is not None:
            control = ControlServer.adopt(control_path, handed.control)
        else:
            control = ControlServer(control_path, owner=identity)
        if identity is not None:
            _give_up_root(config, identity, listeners)
    except BaseException:
        for listener in listeners:
            listener.close()
        for sock in (metrics_sock, agent_sock):
            if sock is not None:
                sock.close()
        raise
    return MasterSetup(config, listeners, control, metrics_sock, agent_sock, handed, tls_setup, resumed)


def _give_up_root(config: Config, identity: Identity, listeners: list[Listener]) -> None:
    """--user: hand our files to the user, keep a root helper for the stop's filter if needed, switch. Raises."""
    from prefork import privileges
    from prefork.listeners import start_filter_helper

    # the control socket, our Unix listeners and the log file stay ours after the switch
    files = [config.log_file or "", config.access_log if config.access_log != "-" else ""]
    for path in [li.unix_path for li in listeners if li.unix_path] + [f for f in files if f]:
        if path:
            privileges.give(path, identity)
    # attaching the filter that lets a stop lose nothing may need root here: keep a helper for it
    start_filter_helper(lambda: logs.set_title("filter helper", config.name))
    privileges.drop(identity)
    logging.getLogger("prefork").info("running as user %s (uid %d, gid %d)",
                                      identity.user, identity.uid, identity.gid)


def build_master(setup: MasterSetup, overrides: dict[str, Any], argv: list[str],
                 master_class: Callable[..., AnyMaster]) -> AnyMaster:
    """The master over ``setup``'s sockets (``master_class``: Master, or prefork.api's subclass); ``run()`` it."""
    from prefork.listeners import SYSTEMD_PREFIX

    relay_loops.claim_id(os.environ, os.getpid())  # the relays' id of this daemon, for its molds and workers
    adopted = any(li.spec.startswith(SYSTEMD_PREFIX) for li in setup.listeners)
    handed = setup.handed
    return master_class(setup.config, setup.listeners, setup.control, cli_overrides=overrides, adopted=adopted,
                        argv=argv, upgrade_pipe=handed.pipe_fd if handed else None, metrics_sock=setup.metrics_sock,
                        agent_sock=setup.agent_sock, tls=setup.tls, resumed=setup.resumed)


def serve(config: Config, overrides: dict[str, Any], argv: list[str]) -> int:
    from prefork.master.loop import Master

    setup = prepare_master(config)
    return build_master(setup, overrides, argv, Master).run()


def main(argv: list[str] | None = None) -> int:
    from prefork.control import ControlError
    from prefork.listeners import BindError
    from prefork.privileges import PrivilegeError
    from prefork.workers.loading import HandlerLoadError

    argv = sys.argv[1:] if argv is None else argv
    try:
        given, config_file, check = parse_args(argv)
        loaded = load_config(given, config_file, os.environ)
        if check:
            print(check_config(loaded))
            return 0
        return serve(loaded.config, loaded.overrides, argv)
    except (UsageError, ConfigError, HandlerLoadError) as exc:
        print(f"prefork: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (BindError, ControlError, PrivilegeError) as exc:
        print(f"prefork: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the log file cannot be opened
        where = f" {exc.filename}" if exc.filename else ""
        print(f"prefork: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the master installed its handlers
        return 130


def run() -> NoReturn:
    # as under ``python -m prefork``: handler modules in the working directory import (gunicorn and
    # uvicorn do the same); systemd's WorkingDirectory= says where that is
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    sys.exit(main())
