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
    BALANCE_MODES,
    CERT_REQS,
    DEFAULT_BIND,
    DEFAULT_HANDLER,
    LOG_LEVELS,
    LOOPS,
    TLS_VERSIONS,
    WORKER_CLASSES,
    Config,
    ConfigError,
    build_config,
    default_control_path,
    describe_handler,
    parse_bind,
)
from prefork.handlers import relay_loops
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
    p = _Parser(
        prog="prefork",
        description="Run a socketserver request handler in a supervised pool of preforked worker processes.",
        epilog="Signals: TERM graceful stop, INT/QUIT fast stop, HUP reload, TTIN/TTOU one worker more/less, "
        "USR1 reopen log files, USR2 upgrade the master program. Control it with preforkctl.",
        argument_default=argparse.SUPPRESS,  # only what the user gave overrides the config file
    )
    p.add_argument("handler", nargs="?", metavar="HANDLER",
                   help=f"request handler as module:Class (default {DEFAULT_HANDLER}, an echo server)")
    p.add_argument("-b", "--bind", action="append", metavar="ADDR",
                   help=f"HOST:PORT, [V6]:PORT or unix:PATH to listen on; repeatable (default {DEFAULT_BIND})")
    p.add_argument("-w", "--workers", type=int, metavar="N", help="worker processes (default: CPU count)")
    p.add_argument("-k", "--worker-class", choices=WORKER_CLASSES, metavar="CLASS",
                   help="sync: one connection at a time per worker; thread (default): a bounded thread pool; "
                        "async: an asyncio (uvloop) event loop for asyncio.Protocol or async def handlers")
    p.add_argument("--threads", type=int, metavar="N", help="threads per thread worker (default 32)")
    p.add_argument("--loop", choices=LOOPS, metavar="LOOP",
                   help="the async workers' event loop: auto (default: uvloop when installed), asyncio or uvloop")
    p.add_argument("--balance", choices=BALANCE_MODES, metavar="on|off",
                   help="on (default): a worker holding clearly more than its share of open connections "
                        "stops accepting until its siblings catch up; off: the kernel alone decides")
    p.add_argument("--max-connections", type=int, metavar="N",
                   help="open connections per async worker before it stops accepting (default 0: no cap); "
                        "refused for sync and thread workers, which --threads bounds")
    p.add_argument("--idle-timeout", type=float, metavar="SECS",
                   help="close a connection that receives nothing for SECS, whether it waits for its first "
                        "bytes or its handler waits on it (default 60; 0: never)")
    p.add_argument("--reclaim-idle-after", type=float, metavar="SECS",
                   help="when every place is taken and a connection waits, close the one whose handler waits "
                        "on its client and that sent the fewest bytes over the last SECS (default 10; 0: never, "
                        "so silent clients can hold every place until --idle-timeout)")
    p.add_argument("--max-connections-per-source", type=int, metavar="N",
                   help="open connections per client address across all workers (the PROXY header's when "
                        "it sends one; IPv6 per /64); more are closed at accept (default 0: no limit)")
    p.add_argument("--drain-idle", type=float, metavar="SECS",
                   help="while a worker drains (stop, reload, scale-down, recycling, drain --close), close a "
                        "connection that received nothing for SECS and has nothing left to send; busy ones "
                        "keep --graceful-timeout (default 10; 0: never)")
    p.add_argument("--handler-timeout", type=float, metavar="SECS",
                   help="a handler that has held one connection SECS without returning, exchanging no byte "
                        "with its client and not waiting on it: its stack is logged once and the connection "
                        "closed; a thread that still does not return recycles its worker (default 0: off)")
    p.add_argument("--timeout", type=float, metavar="SECS",
                   help="kill and replace a worker whose serving loop stalls this long (default 30); "
                        "with sync workers this bounds one connection's duration")
    p.add_argument("--graceful-timeout", type=float, metavar="SECS",
                   help="on stop and reload, how long open connections may take to finish (default 30)")
    p.add_argument("--max-requests", type=int, metavar="N",
                   help="recycle a worker after N connections (default 0: never)")
    p.add_argument("--max-requests-jitter", type=int, metavar="N",
                   help="add 0..N to --max-requests per worker so they do not recycle together")
    p.add_argument("--max-worker-memory", type=int, metavar="MIB",
                   help="replace a worker whose own memory (USS) exceeds MIB: it stops accepting at once, its "
                        "successor starts; at most a quarter of the workers at a time (default 0: no limit)")
    p.add_argument("--reload-batch", type=int, metavar="N",
                   help="on reload, replace N workers at a time, each batch serving before the old ones it "
                        "replaces drain (default 0: the whole generation at once)")
    p.add_argument("--reload-canary", type=float, metavar="SECS",
                   help="on reload, one new worker serves beside the old generation for SECS first; the reload "
                        "goes on only if it does no worse (default 0: no canary)")
    p.add_argument("--reload-probation", type=float, metavar="SECS",
                   help="after a reload, keep the old generation's mold for SECS and roll back to it if the new "
                        "workers die young or fail more than the old ones did (default 0: no probation)")
    p.add_argument("--backlog", type=int, metavar="N", help="listen backlog (default 2048)")
    p.add_argument("--name", metavar="NAME", help="instance name for titles and the control socket (default prefork)")
    p.add_argument("--control", metavar="PATH", help="control socket path (default RUNTIME_DIR/NAME.sock)")
    p.add_argument("-c", "--config", metavar="FILE",
                   help="TOML file with the long options as keys; the command line wins")
    p.add_argument("--check-config", action="store_true", help="check the configuration and handler, then exit")
    p.add_argument("--log-level", choices=LOG_LEVELS, metavar="LEVEL", help=f"{', '.join(LOG_LEVELS)} (default info)")
    p.add_argument("--log-file", metavar="PATH", help="log to PATH instead of stderr (USR1 reopens it)")
    p.add_argument("--access-log", metavar="PATH|-",
                   help="one line per connection (peer, duration, bytes in/out) to PATH or - for stdout")
    p.add_argument("--metrics-bind", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (and /healthz, /readyz) "
                        "from the master")
    p.add_argument("--agent-bind", metavar="HOST:PORT",
                   help="answer HAProxy's agent-check on HOST:PORT: up with a weight from the free capacity, "
                        "drain, or maint")
    p.add_argument("--user", metavar="USER",
                   help="after binding (as root), run the master and workers as USER (name or uid)")
    p.add_argument("--group", metavar="GROUP", help="and as GROUP (default: USER's primary group)")
    p.add_argument("--proxy-protocol", action="store_true",
                   help="expect a PROXY protocol v1/v2 header on every connection (from --proxy-allow peers)")
    p.add_argument("--proxy-allow", metavar="CIDR,...",
                   help="peers that send PROXY headers (default: all); others are served as they are")
    p.add_argument("--proxy-timeout", type=float, metavar="SECS",
                   help="how long a PROXY header may take to arrive (default 5)")
    p.add_argument("--relay", action="append", metavar="HOST:PORT[,weight=N][,backup][,maxconn=N]",
                   help="serve the built-in TCP relay to this upstream; repeatable: balanced (--relay-balance) "
                        "with failover; a backup is used only while every other upstream is down, maxconn "
                        "caps its connections over all workers (a client over it goes to the next upstream)")
    p.add_argument("--relay-connect-timeout", type=float, metavar="SECS",
                   help="how long connecting to an upstream may take before the next is tried (default 5)")
    p.add_argument("--relay-idle-timeout", type=float, metavar="SECS",
                   help="close a relayed connection idle this long both ways (default 300, 0: never)")
    p.add_argument("--relay-send-proxy", action="store_true",
                   help="announce each client to the upstream with a PROXY protocol v2 header")
    p.add_argument("--relay-balance", choices=("leastconn", "roundrobin"),
                   help="how the relay picks an upstream: fewest open connections over every worker for its "
                        "weight (default), or weighted round robin")
    p.add_argument("--relay-check-interval", type=float, metavar="SECS",
                   help="check each upstream this often (TCP connect, PROXY LOCAL header with "
                        "--relay-send-proxy, TLS with --relay-tls) (default 0: passive health only)")
    p.add_argument("--relay-check-send", metavar="TEXT",
                   help="what a check sends once connected (escapes: \\r \\n \\t \\\\ \\xHH)")
    p.add_argument("--relay-check-expect", metavar="TEXT",
                   help="what the upstream's answer to a check must contain (default: no answer awaited)")
    p.add_argument("--relay-slow-start", type=float, metavar="SECS",
                   help="an upstream that comes back reaches its full weight over this long (default 0: at once)")
    p.add_argument("--preload", action=argparse.BooleanOptionalAction,
                   help="on (default): each generation's mold imports the handler once and forks its workers, "
                        "which share its memory and run its code (respawns too); --no-preload: each worker "
                        "imports the handler itself after the master forks it (for handlers whose import starts "
                        "threads or opens connections)")
    _add_tls_options(p)
    p.add_argument("--version", action="version", version=f"prefork {__version__}")
    return p


def _add_tls_options(p: argparse.ArgumentParser) -> None:
    tls = p.add_argument_group("TLS", "with --certfile every --bind address speaks TLS, unless --tls-bind lists "
                               "the ones that do; a [[listener]] table in the config file sets them per address")
    tls.add_argument("--certfile", metavar="PEM", help="the server's certificate chain (PEM)")
    tls.add_argument("--keyfile", metavar="PEM", help="its private key (default: in --certfile)")
    tls.add_argument("--keyfile-password-file", metavar="FILE", help="read the key's passphrase from FILE")
    tls.add_argument("--ca-certs", metavar="PEM", help="CAs that sign client certificates (mutual TLS)")
    tls.add_argument("--cert-reqs", choices=CERT_REQS, metavar="none|optional|required",
                     help="whether clients must present a certificate signed by --ca-certs (default none)")
    tls.add_argument("--tls-min-version", choices=TLS_VERSIONS, metavar="1.2|1.3",
                     help="the oldest TLS version accepted (default 1.2)")
    tls.add_argument("--ciphers", metavar="LIST", help="OpenSSL cipher list for TLS 1.2 (default: OpenSSL's)")
    tls.add_argument("--alpn", action="append", metavar="PROTO[,PROTO]",
                     help="ALPN protocols offered, most preferred first; repeatable")
    tls.add_argument("--sni", action="append", metavar="NAME=CERT[,KEY]",
                     help="serve CERT to clients asking for server NAME (or *.domain); repeatable")
    tls.add_argument("--tls-handshake-timeout", type=float, metavar="SECS",
                     help="close a connection whose TLS handshake takes longer (default 10)")
    tls.add_argument("--tls-bind", action="append", metavar="ADDR",
                     help="listen on ADDR with TLS, beside the plain --bind addresses; repeatable")
    tls.add_argument("--relay-tls", action="store_true",
                     help="connect to the --relay upstreams with TLS, verifying their certificate")
    tls.add_argument("--relay-ca-certs", metavar="PEM", help="CAs the upstreams' certificates are checked against "
                     "(default: the system's)")
    tls.add_argument("--relay-sni", metavar="NAME",
                     help="the server name asked for and verified upstream (default: the upstream's host)")
    tls.add_argument("--relay-certfile", metavar="PEM", help="a client certificate for upstreams that ask for one")
    tls.add_argument("--relay-keyfile", metavar="PEM", help="its private key (default: in --relay-certfile)")


def parse_args(argv: list[str]) -> tuple[dict[str, Any], str | None, bool]:
    """(settings given on the command line, config file, --check-config)."""
    ns = vars(build_parser().parse_args(argv))
    config_file = ns.pop("config", None)
    check = bool(ns.pop("check_config", False))
    return ns, config_file, check


def check_config(config: Config) -> str:
    """Load the handler in this process (we exit right after) and summarise the config."""
    from prefork import tls
    from prefork.workers.loading import handler_for

    for option, path in (("log-file", config.log_file), ("access-log", config.access_log)):
        # what the daemon would refuse to open; a file that is not there yet is created then
        if path and path != "-" and os.path.exists(path) and not logs.never_blocks(os.stat(path)):
            raise ConfigError(f"{option} {path}: {logs.NOT_REGULAR}")
    setup = tls.load(config)  # certificates and keys load and match, none has expired
    handler_for(config, relay_tls=setup.relay)  # imports it: a handler that cannot load fails here
    loop = f" ({config.event_loop})" if config.event_loop else ""
    certificates = "".join(
        f"; TLS on {spec}: {cert.subject}, expires {cert.describe()['not_after']}"
        + (f" (for {cert.server_name})" if cert.server_name else "")
        for spec, cert in setup.certificates())
    return (f"configuration OK: {config.workers} {config.worker_class} worker(s){loop} of "
            f"{describe_handler(config)} on {', '.join(config.binds)}{certificates}")


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

    identity = privileges.resolve(config.user, config.group)
    logs.setup(config.log_level, config.log_file)
    logs.setup_access_log(config.access_log)
    preload_worker_code(config)
    from prefork.master import handover

    try:
        resumed = handover.received()  # we are the new image of a master that executed us in place
    except handover.HandoverError as exc:
        raise ConfigError(str(exc)) from None
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
        overrides, config_file, check = parse_args(argv)
        config = build_config(overrides, config_file)
        if check:
            print(check_config(config))
            return 0
        return serve(config, overrides, argv)
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
