"""Every setting, declared once: the table the rest is built from.

One :class:`Setting` per option says its name (the TOML key, the ``Config``
field, the keyword of :mod:`prefork.api`), its command-line flag, its
``PREFORK_*`` environment variable, type, default, allowed values, help and
``--help`` group. From this table come the command line (:mod:`prefork.cli`),
the loader's type and range checks (:mod:`prefork.config`), the ``Config``
fields and the API's ``ServerOptions`` (generated into
:mod:`prefork.generated_settings`, so they stay statically typed), and the
options reference (``docs/options.md``). ``python -m prefork.settings_gen``
writes the generated files again; a test fails while they differ.

Adding a setting is one entry in :data:`SETTINGS` (then run the generator);
only a check that involves other settings is written by hand, in
``prefork.config.validate``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

DEFAULT_BIND = "127.0.0.1:20000"
DEFAULT_HANDLER = "prefork.handlers.echo:EchoHandler"
WORKER_CLASSES = ("sync", "thread", "async")
LOOPS = ("auto", "asyncio", "uvloop")  # the async worker's event loop; auto: uvloop when installed
BALANCE_MODES = ("on", "off")  # on: a worker holding more than its share of connections steps back
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CERT_REQS = ("none", "optional", "required")  # --cert-reqs: whether clients present a certificate
TLS_VERSIONS = ("1.2", "1.3")  # --tls-min-version
RELAY_BALANCES = ("leastconn", "roundrobin")
MAX_WORKERS = 1024  # the scoreboard is sized once, before the first fork
MAX_CANARY = 3600.0  # seconds a reload's canary may serve before it is judged, and its probation last
ENV_PREFIX = "PREFORK_"
# PREFORK_* variables that are not settings: what a master hands the program it starts (prefork.upgrade,
# prefork.master.handover, prefork.mold.process, prefork.api), the relays' id of a daemon
# (prefork.handlers.relay_loops) and the benchmarks' commands (bench/compare.py)
ENV_INTERNAL = frozenset({"PREFORK_CHECK", "PREFORK_HANDOVER", "PREFORK_INHERIT", "PREFORK_UPGRADE_PIPE",
                          "PREFORK_MOLD", "PREFORK_RELAY_ID", "PREFORK_CMD", "PREFORK_RELAY_CMD", "PREFORK_TLS_CMD"})

Kind = Literal["int", "float", "str", "bool", "list", "id"]
GROUPS = {  # the --help groups and the reference's sections, in order
    "general": "what to serve, the configuration, the instance's name",
    "listeners": "where to listen",
    "workers": "the worker processes and how they take connections",
    "lifecycle": "deadlines, recycling and reloads",
    "TLS": "with --certfile every --bind address speaks TLS, unless --tls-bind lists the ones that do; "
           "a [[listener]] table in the config file sets them per address",
    "relay": "the built-in TCP relay to upstream servers, and TLS towards them",
    "PROXY": "the PROXY protocol header a load balancer in front sends",
    "observability": "logs, metrics, health checks",
    "privileges": "the user the daemon runs as",
}


def default_workers() -> int:
    """The default worker count: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class Range:
    """The values a number may take; ``text`` follows the value in the complaint."""

    low: float
    high: float
    text: str  # e.g. "is out of range (1-1024)"
    above: bool = False  # more than ``low``, not ``low`` itself
    zero: bool = False  # 0 (off) besides

    def allows(self, value: float) -> bool:
        if self.zero and value == 0:
            return True
        return (self.low < value if self.above else self.low <= value) and value <= self.high


@dataclass(frozen=True)
class Setting:
    """One setting: everything the command line, the loader, the API and the reference say of it."""

    name: str  # TOML key, Config field and API keyword (``_``); the flag spells it with ``-``
    group: str
    kind: Kind  # int, float (seconds), str, bool, list (of strings) or id (a user or group: name or number)
    default: object
    help: str  # what it does, without the default (added from ``default`` and ``default_text``)
    metavar: str | None = None
    short: str | None = None  # e.g. "-w"
    choices: tuple[str, ...] = ()
    choice_noun: str = ""  # "class": "unknown class 'x' (choose from ...)"; else "'x' is not one of ..."
    check: Range | None = None
    default_text: str = ""  # what the default means ("0: never"), or stands for ("the CPU count")
    factory: str = ""  # a function of this module that computes the default (workers)
    path: bool = False  # a file's path: made absolute; the API takes os.PathLike too
    repeat: bool = True  # list: the flag once per item; False: one comma-separated value
    separator: str = ","  # between a list's items in the environment variable (" ": any white space)
    negatable: bool = False  # bool: --no-NAME too
    fold_case: bool = False  # a choice given in any case
    field: str = ""  # the Config field, when it is not ``name``
    positional: bool = False  # the command line takes it as an argument, not a flag
    toml: bool = True  # a key of the config file (and a Config field)
    env: bool = True  # read from PREFORK_NAME

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """How messages name it: the long option without its dashes (``max-requests``)."""
        return self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def attr(self) -> str:
        return self.field or self.name

    @property
    def types(self) -> tuple[type, ...]:
        """The types the loader accepts (TOML and the API; the environment and the command line give these)."""
        return {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list": (list, str),
                "id": (str, int)}[self.kind]

    def default_value(self) -> object:
        return globals()[self.factory]() if self.factory else self.default

    def describe_default(self) -> str:
        """``(default 30)``, ``(default 0: never)``, ``(default: the CPU count)``; empty when there is none."""
        if (self.kind == "bool" and not self.negatable) or (self.default in (None, ()) and not self.default_text):
            return ""
        if self.factory or self.default in (None, ()):
            return f"(default: {self.default_text})"
        shown = ("on" if self.default else "off") if self.kind == "bool" else self.default
        if isinstance(shown, tuple):
            shown = ", ".join(shown)
        elif isinstance(shown, float):
            shown = f"{shown:g}"
        return f"(default {shown}: {self.default_text})" if self.default_text else f"(default {shown})"

    def full_help(self) -> str:
        return f"{self.help} {self.describe_default()}".strip()

    def problem(self, value: object) -> str | None:
        """What is wrong with ``value`` (of one of :attr:`types`) on its own, or None."""
        if self.choices and isinstance(value, str):
            if (value.lower() if self.fold_case else value) in self.choices:
                return None
            if self.choice_noun:
                return f"unknown {self.choice_noun} {_quote(value)} (choose from {', '.join(self.choices)})"
            return f"{_quote(value)} is not one of {', '.join(self.choices)}"
        check = self.check
        if isinstance(value, int | float) and not isinstance(value, bool) and check and not check.allows(value):
            return f"{value:g} {check.text}" if isinstance(value, float) else f"{value} {check.text}"
        return None


def _quote(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


_s = Setting  # the table's rows are long enough
_WEEK = 86400 * 7
# the settings, by group in --help's order
SETTINGS: tuple[Setting, ...] = (
    # -- general
    _s("handler", "general", "str", DEFAULT_HANDLER, "request handler as module:Class", metavar="HANDLER",
       positional=True, default_text="an echo server"),
    _s("name", "general", "str", "prefork", "instance name for process titles and the control socket",
       metavar="NAME"),
    _s("control", "general", "str", None, "control socket path", metavar="PATH", path=True,
       default_text="RUNTIME_DIR/NAME.sock"),
    # -- listeners
    _s("bind", "listeners", "list", (DEFAULT_BIND,), "HOST:PORT, [V6]:PORT or unix:PATH to listen on; repeatable",
       metavar="ADDR", short="-b", field="binds"),
    _s("backlog", "listeners", "int", 2048, "listen backlog", metavar="N", check=Range(1, 65535, "is out of range "
       "(1-65535)")),
    # -- workers
    _s("workers", "workers", "int", None, "worker processes", metavar="N", short="-w", factory="default_workers",
       default_text="the CPU count", check=Range(1, MAX_WORKERS, f"is out of range (1-{MAX_WORKERS})")),
    _s("worker_class", "workers", "str", "thread", "sync: one connection at a time per worker; thread: a bounded "
       "thread pool; async: an asyncio (uvloop) event loop for asyncio.Protocol or async def handlers",
       metavar="CLASS", short="-k", choices=WORKER_CLASSES, choice_noun="class"),
    _s("threads", "workers", "int", 32, "threads per thread worker", metavar="N",
       check=Range(1, 10000, "is out of range (1-10000)")),
    _s("loop", "workers", "str", "auto", "the async workers' event loop: auto (uvloop when installed), asyncio or "
       "uvloop", metavar="LOOP", choices=LOOPS, choice_noun="event loop"),
    _s("balance", "workers", "str", "on", "on: a worker holding clearly more than its share of open connections "
       "stops accepting until its siblings catch up; off: the kernel alone decides", metavar="on|off",
       choices=BALANCE_MODES),
    _s("max_connections", "workers", "int", 0, "open connections per async worker before it stops accepting; "
       "refused for sync and thread workers, which --threads bounds", metavar="N", default_text="no cap",
       check=Range(0, 1_000_000, "is out of range (0 = no cap, up to 1000000)")),
    _s("idle_timeout", "workers", "float", 60.0, "close a connection that receives nothing for SECS, whether it "
       "waits for its first bytes or its handler waits on it; 0: never", metavar="SECS",
       check=Range(0, _WEEK, "must be 0 (never) to 604800 seconds")),
    _s("reclaim_idle_after", "workers", "float", 10.0, "when every place is taken and a connection waits, close "
       "the one whose handler waits on its client and that sent the fewest bytes over the last SECS; 0: never, "
       "so silent clients can hold every place until --idle-timeout", metavar="SECS",
       check=Range(0, 3600, "must be 0 (never reclaim) to 3600 seconds")),
    _s("max_connections_per_source", "workers", "int", 0, "open connections per client address across all "
       "workers (the PROXY header's when it sends one; IPv6 per /64); more are closed at accept", metavar="N",
       default_text="no limit", check=Range(0, 1_000_000, "is out of range (0 = no limit, up to 1000000)")),
    # -- lifecycle
    _s("timeout", "lifecycle", "float", 30.0, "kill and replace a worker whose serving loop stalls this long; "
       "with sync workers this bounds one connection's duration", metavar="SECS",
       check=Range(0, 86400, "must be more than 0 seconds (at most a day)", above=True)),
    _s("graceful_timeout", "lifecycle", "float", 30.0, "on stop and reload, how long open connections may take to "
       "finish", metavar="SECS", check=Range(0, 86400, "must be 0 to 86400 seconds")),
    _s("drain_idle", "lifecycle", "float", 10.0, "while a worker drains (stop, reload, scale-down, recycling, "
       "drain --close), close a connection that received nothing for SECS and has nothing left to send; busy ones "
       "keep --graceful-timeout; 0: never", metavar="SECS",
       check=Range(0, _WEEK, "must be 0 (never) to 604800 seconds")),
    _s("handler_timeout", "lifecycle", "float", 0.0, "a handler that has held one connection SECS without "
       "returning, exchanging no byte with its client and not waiting on it: its stack is logged once and the "
       "connection closed; a thread that still does not return recycles its worker", metavar="SECS",
       default_text="off", check=Range(1, _WEEK, "must be 0 (off) or 1 to 604800 seconds", zero=True)),
    _s("max_requests", "lifecycle", "int", 0, "recycle a worker after N connections", metavar="N",
       default_text="never", check=Range(0, float("inf"), "must be 0 (off) or more")),
    _s("max_requests_jitter", "lifecycle", "int", 0, "add 0..N to --max-requests per worker so they do not "
       "recycle together", metavar="N", check=Range(0, float("inf"), "must be 0 or more")),
    _s("max_worker_memory", "lifecycle", "int", 0, "replace a worker whose own memory (USS) exceeds MIB: it stops "
       "accepting at once, its successor starts; at most a quarter of the workers at a time", metavar="MIB",
       default_text="no limit", check=Range(0, 1024 * 1024, "MiB is out of range (0 = no limit)")),
    _s("chdir", "general", "str", None, "work in DIR (the master, the molds and the workers): the handler is "
       "imported from there and relative paths are taken from there; a relative DIR is taken from where prefork "
       "starts", metavar="DIR", default_text="where prefork starts", path=True),
    _s("pythonpath", "general", "list", (), "put DIR first on the module search path to import the handler; "
       "repeatable, relative to --chdir", metavar="DIR[,DIR]", path=True, separator=":"),
    _s("preload", "lifecycle", "bool", True, "on: each generation's mold imports the handler once and forks its "
       "workers, which share its memory and run its code (respawns too); --no-preload: each worker imports the "
       "handler itself after the master forks it (for handlers whose import starts threads or opens connections)",
       negatable=True),
    _s("reload_batch", "lifecycle", "int", 0, "on reload, replace N workers at a time, each batch serving before "
       "the old ones it replaces drain", metavar="N", default_text="the whole generation at once",
       check=Range(0, MAX_WORKERS, f"is out of range (0 = the whole generation, up to {MAX_WORKERS})")),
    _s("reload_canary", "lifecycle", "float", 0.0, "on reload, one new worker serves beside the old generation for "
       "SECS first; the reload goes on only if it does no worse", metavar="SECS", default_text="no canary",
       check=Range(0, MAX_CANARY, f"must be 0 (off) to {MAX_CANARY:g} seconds")),
    _s("reload_probation", "lifecycle", "float", 0.0, "after a reload, keep the old generation's mold for SECS and "
       "roll back to it if the new workers die young or fail more than the old ones did", metavar="SECS",
       default_text="no probation", check=Range(0, MAX_CANARY, f"must be 0 (off) to {MAX_CANARY:g} seconds")),
    _s("reload_on_change", "lifecycle", "bool", False, "development: reload (as HUP does) when a Python file "
       "under the working directory or the handler's package changes; needs watchfiles "
       "(pip install watchfiles: the reload extra)"),
    _s("reload_dir", "lifecycle", "list", (), "with --reload-on-change, watch DIR instead of the working "
       "directory; repeatable", metavar="DIR", path=True, separator=":"),
    # -- TLS
    _s("certfile", "TLS", "str", None, "the server's certificate chain (PEM)", metavar="PEM", path=True),
    _s("keyfile", "TLS", "str", None, "its private key", metavar="PEM", path=True, default_text="in --certfile"),
    _s("keyfile_password_file", "TLS", "str", None, "read the key's passphrase from FILE", metavar="FILE",
       path=True),
    _s("ca_certs", "TLS", "str", None, "CAs that sign client certificates (mutual TLS)", metavar="PEM", path=True),
    _s("cert_reqs", "TLS", "str", "none", "whether clients must present a certificate signed by --ca-certs",
       metavar="none|optional|required", choices=CERT_REQS),
    _s("tls_min_version", "TLS", "str", "1.2", "the oldest TLS version accepted", metavar="1.2|1.3",
       choices=TLS_VERSIONS),
    _s("ciphers", "TLS", "str", None, "OpenSSL cipher list for TLS 1.2", metavar="LIST", default_text="OpenSSL's"),
    _s("alpn", "TLS", "list", (), "ALPN protocols offered, most preferred first; repeatable",
       metavar="PROTO[,PROTO]"),
    _s("sni", "TLS", "list", (), "serve CERT to clients asking for server NAME (or *.domain); repeatable "
       "(environment: separated by spaces)", metavar="NAME=CERT[,KEY]", separator=" "),
    _s("tls_handshake_timeout", "TLS", "float", 10.0, "close a connection whose TLS handshake takes longer",
       metavar="SECS", check=Range(0, 3600, "must be more than 0 seconds (at most an hour)", above=True)),
    _s("tls_bind", "TLS", "list", (), "listen on ADDR with TLS, beside the plain --bind addresses; repeatable",
       metavar="ADDR"),
    # -- relay
    _s("relay", "relay", "list", (), "serve the built-in TCP relay to this upstream; repeatable: balanced "
       "(--relay-balance) with failover; a backup is used only while every other upstream is down, maxconn caps "
       "its connections over all workers (a client over it goes to the next upstream) (environment: separated "
       "by spaces)", metavar="HOST:PORT[,weight=N][,backup][,maxconn=N]", separator=" "),
    _s("relay_balance", "relay", "str", "leastconn", "how the relay picks an upstream: leastconn, the fewest open "
       "connections over every worker for its weight, or roundrobin, weighted round robin",
       metavar="leastconn|roundrobin", choices=RELAY_BALANCES),
    _s("relay_connect_timeout", "relay", "float", 5.0, "how long connecting to an upstream may take before the "
       "next is tried", metavar="SECS", check=Range(0, 3600, "must be 0-3600 seconds (not 0)", above=True)),
    _s("relay_idle_timeout", "relay", "float", 300.0, "close a relayed connection idle this long both ways; "
       "0: never", metavar="SECS", check=Range(0, _WEEK, "must be 0 (none) to 604800 seconds")),
    _s("relay_send_proxy", "relay", "bool", False, "announce each client to the upstream with a PROXY protocol "
       "v2 header"),
    _s("relay_check_interval", "relay", "float", 0.0, "check each upstream this often (TCP connect, PROXY LOCAL "
       "header with --relay-send-proxy, TLS with --relay-tls)", metavar="SECS", default_text="passive health "
       "only", check=Range(0.05, 3600, "must be 0 (off) or 0.05-3600 seconds", zero=True)),
    _s("relay_check_send", "relay", "str", None, "what a check sends once connected (escapes: \\r \\n \\t \\\\ "
       "\\xHH)", metavar="TEXT"),
    _s("relay_check_expect", "relay", "str", None, "what the upstream's answer to a check must contain",
       metavar="TEXT", default_text="no answer awaited"),
    _s("relay_slow_start", "relay", "float", 0.0, "an upstream that comes back reaches its full weight over this "
       "long", metavar="SECS", default_text="at once",
       check=Range(0, 3600, "must be 0 (off) to 3600 seconds")),
    _s("relay_tls", "relay", "bool", False, "connect to the --relay upstreams with TLS, verifying their "
       "certificate"),
    _s("relay_ca_certs", "relay", "str", None, "CAs the upstreams' certificates are checked against",
       metavar="PEM", path=True, default_text="the system's"),
    _s("relay_sni", "relay", "str", None, "the server name asked for and verified upstream", metavar="NAME",
       default_text="the upstream's host"),
    _s("relay_certfile", "relay", "str", None, "a client certificate for upstreams that ask for one",
       metavar="PEM", path=True),
    _s("relay_keyfile", "relay", "str", None, "its private key", metavar="PEM", path=True,
       default_text="in --relay-certfile"),
    # -- PROXY
    _s("proxy_protocol", "PROXY", "bool", False, "expect a PROXY protocol v1/v2 header on every connection (from "
       "--proxy-allow peers)"),
    _s("proxy_allow", "PROXY", "list", (), "peers that send PROXY headers; others are served as they are",
       metavar="CIDR,...", repeat=False, default_text="all"),
    _s("proxy_timeout", "PROXY", "float", 5.0, "how long a PROXY header may take to arrive", metavar="SECS",
       check=Range(0, 3600, "must be more than 0 seconds (at most an hour)", above=True)),
    # -- observability
    _s("log_level", "observability", "str", "info", ", ".join(LOG_LEVELS), metavar="LEVEL", choices=LOG_LEVELS,
       choice_noun="level", fold_case=True),
    _s("log_file", "observability", "str", None, "log to PATH instead of stderr (USR1 reopens it)", metavar="PATH",
       path=True),
    _s("access_log", "observability", "str", None, "one line per connection (peer, duration, bytes in/out) to "
       "PATH or - for stdout", metavar="PATH|-", path=True),
    _s("metrics_bind", "observability", "str", None, "serve Prometheus metrics at http://HOST:PORT/metrics (and "
       "/healthz, /readyz) from the master", metavar="HOST:PORT"),
    _s("agent_bind", "observability", "str", None, "answer HAProxy's agent-check on HOST:PORT: up with a weight "
       "from the free capacity, drain, or maint", metavar="HOST:PORT"),
    # -- privileges
    _s("user", "privileges", "id", None, "after binding (as root), run the master and workers as USER (name or "
       "uid)", metavar="USER"),
    _s("group", "privileges", "id", None, "and as GROUP", metavar="GROUP", default_text="USER's primary group"),
)

# what the command line has besides the settings (not TOML keys; --config has an environment variable)
COMMAND_OPTIONS: tuple[Setting, ...] = (
    _s("config", "general", "str", None, "TOML file with the long options as keys; the environment and the "
       "command line win", metavar="FILE", short="-c", path=True, toml=False),
    _s("check_config", "general", "bool", False, "do what a start does short of binding (the handler loaded as "
       "--user, in --chdir; the certificates; the log files), print the settings not at their defaults and where "
       "they came from, then exit", toml=False, env=False),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
