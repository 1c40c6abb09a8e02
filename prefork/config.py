"""Settings: a frozen dataclass and its loader.

This is the only module that reads files and the environment for settings.
Every value is checked here, so the rest of the daemon can trust a
:class:`Config`; a bad one raises :class:`ConfigError` with a one-line message
that names the culprit.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.util
import ipaddress
import os
import re
import reprlib
import socket
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_BIND = "127.0.0.1:20000"
DEFAULT_HANDLER = "prefork.handlers.echo:EchoHandler"
WORKER_CLASSES = ("sync", "thread", "async")
LOOPS = ("auto", "asyncio", "uvloop")  # the async worker's event loop; auto: uvloop when installed
BALANCE_MODES = ("on", "off")  # on: a worker holding more than its share of connections steps back
ASYNC_ECHO_HANDLER = "prefork.handlers.aio:EchoProtocol"
RELAY_HANDLERS = ("prefork.handlers.relay:RelayHandler", "prefork.handlers.aio:RelayProtocol")  # [is async]
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
CERT_REQS = ("none", "optional", "required")  # --cert-reqs: whether clients present a certificate
TLS_VERSIONS = ("1.2", "1.3")  # --tls-min-version
# the TLS settings a [[listener]] table of the config file may set for its own address
TLS_KEYS = ("certfile", "keyfile", "keyfile_password_file", "ca_certs", "cert_reqs", "tls_min_version", "ciphers",
            "alpn", "sni", "tls_handshake_timeout")
MAX_WORKERS = 1024  # the scoreboard is sized once, before the first fork
MAX_CANARY = 3600.0  # seconds a reload's canary may serve before it is judged, and its probation last
MAX_CONFIG_BYTES = 2 * 1024 * 1024  # a configuration is a few hundred bytes; 2 MiB is plenty
MAX_LIST = 1024  # entries in a list setting (bind, relay, proxy-allow)
MAX_HANDLER = 500  # characters of a handler's module:Class
QUOTE_LIMIT = 100  # characters of a value an error message quotes
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HANDLER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ConfigError(ValueError):
    """A setting is invalid; the message names it and says why."""


class _Quote(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # more digits than int-to-str converts
            return f"<an integer of {x.bit_length()} bits>"


_QUOTE = _Quote()
_QUOTE.maxstring = _QUOTE.maxother = 80
_QUOTE.maxlist = _QUOTE.maxdict = 6
_QUOTE.maxlevel = 3


def cut(text: str) -> str:
    """``text`` for an error message: at most QUOTE_LIMIT characters, on one line."""
    text = " ".join(text.split("\n"))
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def did_you_mean(given: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the one of ``known`` closest to ``given`` (a typo), or nothing."""
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def quote(value: object) -> str:
    """``repr(value)`` for an error message, cut to QUOTE_LIMIT characters (a setting may be 8 MB long)."""
    return cut(_QUOTE.repr(value))


@dataclass(frozen=True)
class BindSpec:
    """One address to listen on: TCP (``host``, ``port``) or a Unix ``path``."""

    text: str
    host: str = ""
    port: int = 0
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


def parse_bind(text: str) -> BindSpec:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"bind {quote(text)}: unix: needs a path, e.g. unix:/run/prefork/app.sock")
        return BindSpec(text=text, path=os.path.abspath(path))
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"bind {quote(text)}: an IPv6 address needs the form [ADDR]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"bind {quote(text)}: expected HOST:PORT, [V6]:PORT or unix:PATH")
        if ":" in host:
            raise ConfigError(f"bind {quote(text)}: put an IPv6 address in brackets: [ADDR]:PORT")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise ConfigError(f"bind {quote(text)}: port {quote(port_text)} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"bind {quote(text)}: port {port} is out of range (0-65535)")
    return BindSpec(text=text, host=host, port=port)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class TlsOptions:
    """How one listener speaks TLS: its certificate(s) and what it asks of clients (see prefork.tls)."""

    certfile: str
    keyfile: str | None = None  # None: the key is in certfile
    keyfile_password_file: str | None = None  # the key's passphrase, read from this file (never the command line)
    ca_certs: str | None = None  # CAs that sign client certificates (mutual TLS)
    cert_reqs: str = "none"  # none, optional or required: the client's certificate
    tls_min_version: str = "1.2"
    ciphers: str | None = None  # OpenSSL cipher list for TLS 1.2 (1.3's suites are OpenSSL's defaults)
    alpn: tuple[str, ...] = ()  # protocols offered, in order of preference
    sni: tuple[tuple[str, str, str | None], ...] = ()  # (server name, certfile, keyfile) chosen by SNI
    tls_handshake_timeout: float = 10.0


@dataclass(frozen=True)
class Config:
    """Everything the daemon is told; see ``prefork --help`` for each field."""

    binds: tuple[str, ...] = (DEFAULT_BIND,)
    handler: str = DEFAULT_HANDLER
    # The handler itself, given by a program (prefork.api) rather than named: forked workers use this object, and
    # ``handler`` is only its name for status and logs ("__main__:EchoHandler"). Never read from a file.
    handler_object: Any = dataclasses.field(default=None, repr=False)
    workers: int = dataclasses.field(default_factory=default_workers)
    worker_class: str = "thread"
    threads: int = 32
    max_connections: int = 0  # per async worker; 0: no cap
    # admission (prefork.workers.admission): what a connection may cost before a handler has it, and after
    idle_timeout: float = 60.0  # close a connection that receives nothing this long; 0: never
    reclaim_idle_after: float = 10.0  # under pressure, reclaim the quietest connection over this window; 0: never
    max_connections_per_source: int = 0  # open connections per client address (IPv6: per /64); 0: no limit
    # per-connection deadlines (prefork.workers.admission): while draining, and for a handler that never returns
    drain_idle: float = 10.0  # a draining worker closes a connection silent this long with nothing to send; 0: never
    handler_timeout: float = 0.0  # a handler stuck on one connection this long: stack logged, connection closed; 0: off
    loop: str = "auto"  # the async worker's event loop: auto, asyncio or uvloop
    balance: str = "on"  # on: workers even out their open connections (prefork.workers.balance)
    timeout: float = 30.0
    graceful_timeout: float = 30.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_worker_memory: int = 0  # MiB of a worker's own memory (USS, see prefork.memory); 0: no limit
    reload_batch: int = 0  # workers replaced at a time on reload; 0: the whole generation at once
    reload_canary: float = 0.0  # seconds one new worker serves beside the old generation before a reload goes on
    reload_probation: float = 0.0  # seconds after a reload the old generation's mold is kept for a rollback
    backlog: int = 2048
    name: str = "prefork"
    control: str | None = None
    log_level: str = "info"
    log_file: str | None = None
    access_log: str | None = None  # PATH, or "-" for standard output
    metrics_bind: str | None = None  # HOST:PORT serving GET /metrics, /healthz, /readyz
    agent_bind: str | None = None  # HOST:PORT answering HAProxy's agent-check
    user: str | None = None
    group: str | None = None
    proxy_protocol: bool = False
    proxy_allow: tuple[str, ...] = ()  # CIDRs that must send a PROXY header; empty: every peer
    proxy_timeout: float = 5.0
    relay: tuple[str, ...] = ()  # upstream HOST:PORTs: serve the built-in relay handler
    relay_connect_timeout: float = 5.0
    relay_idle_timeout: float = 300.0  # 0: none
    relay_send_proxy: bool = False
    # the relay as a load balancer (relay_core): choice, health checks, slow start
    relay_balance: str = "leastconn"  # or "roundrobin" (both weighted)
    relay_check_interval: float = 0.0  # seconds between active checks of each upstream; 0: passive health only
    relay_slow_start: float = 0.0  # seconds an upstream that came back takes to reach its full weight; 0: at once
    relay_check_send: str | None = None  # what a check sends once connected (backslash escapes: \r \n \xHH)
    relay_check_expect: str | None = None  # what the upstream's answer must contain for the check to pass
    preload: bool = True  # workers are forked from a mold per generation that imported the handler
    # TLS on listeners: with certfile and no tls_bind, every --bind address speaks TLS
    certfile: str | None = None
    keyfile: str | None = None
    keyfile_password_file: str | None = None
    ca_certs: str | None = None
    cert_reqs: str = "none"
    tls_min_version: str = "1.2"
    ciphers: str | None = None
    alpn: tuple[str, ...] = ()
    sni: tuple[str, ...] = ()  # "SERVERNAME=CERTFILE[,KEYFILE]"
    tls_handshake_timeout: float = 10.0
    tls_bind: tuple[str, ...] = ()  # addresses that speak TLS, beside the plain --bind ones
    # TLS towards the relay's upstreams
    relay_tls: bool = False
    relay_ca_certs: str | None = None  # None: the system's CAs
    relay_sni: str | None = None  # the name asked for and verified; None: the upstream's host
    relay_certfile: str | None = None  # a client certificate for upstreams that ask for one
    relay_keyfile: str | None = None
    # each listening address with its TLS settings (None: plain), from the above and [[listener]] tables
    listener_tls: tuple[tuple[str, TlsOptions | None], ...] = ()
    config_file: str | None = None

    def tls_for(self, bind: str) -> TlsOptions | None:
        """The TLS settings of the listener for ``bind`` (a --bind text), None when it speaks plain TCP.

        A listener systemd passed (socket activation) speaks TLS when --certfile
        is given without --tls-bind, as every --bind address would.
        """
        for text, options in self.listener_tls:
            if text == bind:
                return options
        if self.certfile and not self.tls_bind:
            return self.tls_options({})
        return None

    def tls_options(self, table: Mapping[str, Any]) -> TlsOptions:
        """The top-level TLS settings, with what a [[listener]] ``table`` sets of its own instead."""
        values = {key: table.get(key, getattr(self, key)) for key in TLS_KEYS}
        values["sni"] = tuple(parse_sni(item) for item in values["sni"])
        values["alpn"] = tuple(values["alpn"])
        values["tls_handshake_timeout"] = float(values["tls_handshake_timeout"])
        return TlsOptions(**values)

    @property
    def relay_upstreams(self) -> tuple[tuple[str, int], ...]:
        return tuple((u.host, u.port) for u in self.relay_specs)

    @property
    def relay_specs(self) -> tuple[UpstreamSpec, ...]:
        """Each --relay upstream with its balancing options (weight, backup, maxconn)."""
        return tuple(parse_upstream(r) for r in self.relay)

    @property
    def bind_specs(self) -> tuple[BindSpec, ...]:
        return tuple(parse_bind(b) for b in self.binds)

    @property
    def count_bytes(self) -> bool:
        """Bytes per connection are counted (one TCP_INFO read each) when they are exported or logged."""
        return bool(self.metrics_bind or self.access_log)

    @property
    def effective_handler(self) -> str:
        """What the workers run: --relay means the built-in relay; built-ins have asyncio forms."""
        if self.handler != DEFAULT_HANDLER:
            return self.handler
        if self.relay:
            return RELAY_HANDLERS[self.worker_class == "async"]
        return ASYNC_ECHO_HANDLER if self.worker_class == "async" else self.handler

    @property
    def event_loop(self) -> str | None:
        """The event loop async workers run (None for the other classes)."""
        if self.worker_class != "async":
            return None
        if self.loop == "auto":
            return "uvloop" if uvloop_installed() else "asyncio"
        return self.loop

    @property
    def control_path(self) -> str:
        return self.control or default_control_path(self.name)


# key -> type the loader accepts for it (the TOML file and the command line use the same keys)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "bind": (list, str),
    "handler": (str,),
    "workers": (int,),
    "worker_class": (str,),
    "threads": (int,),
    "loop": (str,),
    "balance": (str,),
    "max_connections": (int,),
    "idle_timeout": (int, float),
    "reclaim_idle_after": (int, float),
    "max_connections_per_source": (int,),
    "drain_idle": (int, float),
    "handler_timeout": (int, float),
    "timeout": (int, float),
    "graceful_timeout": (int, float),
    "max_requests": (int,),
    "max_requests_jitter": (int,),
    "max_worker_memory": (int,),
    "reload_batch": (int,),
    "reload_canary": (int, float),
    "reload_probation": (int, float),
    "backlog": (int,),
    "name": (str,),
    "control": (str,),
    "log_level": (str,),
    "log_file": (str,),
    "access_log": (str,),
    "metrics_bind": (str,),
    "agent_bind": (str,),
    "user": (str, int),
    "group": (str, int),
    "proxy_protocol": (bool,),
    "proxy_allow": (list, str),
    "proxy_timeout": (int, float),
    "relay": (list, str),
    "relay_connect_timeout": (int, float),
    "relay_idle_timeout": (int, float),
    "relay_send_proxy": (bool,),
    "relay_balance": (str,),
    "relay_check_interval": (int, float),
    "relay_slow_start": (int, float),
    "relay_check_send": (str,),
    "relay_check_expect": (str,),
    "preload": (bool,),
    "certfile": (str,),
    "keyfile": (str,),
    "keyfile_password_file": (str,),
    "ca_certs": (str,),
    "cert_reqs": (str,),
    "tls_min_version": (str,),
    "ciphers": (str,),
    "alpn": (list, str),
    "sni": (list, str),
    "tls_handshake_timeout": (int, float),
    "tls_bind": (list, str),
    "relay_tls": (bool,),
    "relay_ca_certs": (str,),
    "relay_sni": (str,),
    "relay_certfile": (str,),
    "relay_keyfile": (str,),
}

SETTINGS = tuple(_FIELD_TYPES)  # every setting's name: the TOML keys, the long options, prefork.api's keywords


def _read_bounded(path: str) -> bytes:
    """A regular file's bytes, at most MAX_CONFIG_BYTES of them.

    ``/dev/zero`` or a FIFO must not make the master (which reads the file
    again on every reload) read for ever, or wait for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"config file {path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config file {path}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES and (chunk := os.read(fd, MAX_CONFIG_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES // 1024 // 1024} MiB; "
                          "is it the right file?")
    return data


def read_config_file(path: str) -> dict[str, Any]:
    """Read a TOML file into raw settings (keys may use - or _); every failure is one line."""
    data = _read_bounded(path)
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {cut(str(exc))}") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: invalid TOML: arrays or tables nested too deeply") from None
    except Exception as exc:  # e.g. ValueError: an integer of more digits than int() converts
        raise ConfigError(f"config file {path}: invalid TOML: {type(exc).__name__}: {cut(str(exc))}") from None
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        norm = key.replace("-", "_")
        if norm == "listener":
            settings[norm] = _listener_tables(path, value)
            continue
        if norm not in _FIELD_TYPES:
            known = [k.replace("_", "-") for k in (*_FIELD_TYPES, "listener")]
            raise ConfigError(f"config file {path}: unknown setting {quote(key)}"
                              f"{did_you_mean(key.replace('_', '-'), known)}")
        settings[norm] = value
    return settings


def _listener_tables(path: str, value: Any) -> list[dict[str, Any]]:
    """The config file's ``[[listener]]`` tables: an address (``bind``) and TLS settings of its own."""
    origin = f"config file {path}: listener"
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"{origin}: expected [[listener]] tables, got {quote(value)}")
    if len(value) > MAX_LIST:
        raise ConfigError(f"{origin}: {len(value)} tables, more than the {MAX_LIST} allowed")
    tables = []
    for number, table in enumerate(value, 1):
        checked: dict[str, Any] = {}
        for key, item in table.items():
            norm = key.replace("-", "_")
            if norm not in (*TLS_KEYS, "bind", "tls"):
                raise ConfigError(f"{origin} {number}: unknown setting {quote(key)} (a listener table takes bind, "
                                  f"tls and the TLS settings: {', '.join(k.replace('_', '-') for k in TLS_KEYS)})")
            if norm == "tls":
                if not isinstance(item, bool):
                    raise ConfigError(f"{origin} {number}: tls: expected true or false, got {quote(item)}")
            else:
                _check_type(norm, [item] if norm in ("alpn", "sni") and isinstance(item, str) else item,
                            f"{origin} {number}: ")
            checked[norm] = item
        if not isinstance(checked.get("bind"), str):
            raise ConfigError(f"{origin} {number}: needs bind = \"HOST:PORT\" (or unix:PATH)")
        tables.append(checked)
    return tables


RELAY_BALANCES = ("leastconn", "roundrobin")
MAX_UPSTREAMS = 64  # --relay entries: each has a fixed slot in the shared upstream board
MAX_WEIGHT = 256
MAX_UPSTREAM_CONNECTIONS = 1_000_000  # ,maxconn=


@dataclass(frozen=True)
class UpstreamSpec:
    """One --relay upstream: ``HOST:PORT[,weight=N][,backup][,maxconn=N]``."""

    host: str
    port: int
    weight: int = 1  # its share of new connections against the others (1-256)
    backup: bool = False  # used only while every other (primary) upstream is down
    maxconn: int = 0  # at most this many relayed connections at once, over every worker; 0: no cap

    @property
    def name(self) -> str:
        """``HOST:PORT`` (``[V6]:PORT``): how status, metrics and logs name it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_upstream(text: str) -> UpstreamSpec:
    """A --relay value: ``HOST:PORT`` then options after commas, ``weight=3``, ``backup``, ``maxconn=100``."""
    address, *options = text.split(",")
    spec = parse_bind(address)
    if spec.is_unix or not spec.host or spec.port == 0:
        raise ConfigError(f"relay: {quote(text)} must be an upstream HOST:PORT (port 1-65535)")
    if not re.fullmatch(r"[^\s\x00-\x1f\x7f,]{1,253}", spec.host):
        raise ConfigError(f"relay: {quote(text)}: {quote(spec.host)} is not a host name or address")
    values: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.strip().partition("=")
        if key == "backup" and not sep:
            values["backup"] = True
        elif key in ("weight", "maxconn") and sep and value.isascii() and value.isdigit():
            number = int(value[:12])
            if key == "weight" and not 1 <= number <= MAX_WEIGHT:
                raise ConfigError(f"relay: {quote(text)}: weight must be 1-{MAX_WEIGHT}, not {cut(value)}")
            if key == "maxconn" and number > MAX_UPSTREAM_CONNECTIONS:
                raise ConfigError(f"relay: {quote(text)}: maxconn must be 0 (no cap) to "
                                  f"{MAX_UPSTREAM_CONNECTIONS}, not {cut(value)}")
            values[key] = number
        else:
            raise ConfigError(f"relay: {quote(text)}: unknown option {quote(option.strip())} "
                              "(expected weight=N, backup or maxconn=N)")
    return UpstreamSpec(spec.host, spec.port, **values)


def parse_sni(text: str) -> tuple[str, str, str | None]:
    """``SERVERNAME=CERTFILE[,KEYFILE]`` (an --sni value) as (server name, certfile, keyfile)."""
    name, sep, files = text.partition("=")
    certfile, _, keyfile = files.partition(",")
    name = name.strip().lower()
    if not sep or not name or not certfile.strip():
        raise ConfigError(f"sni: {quote(text)} must look like SERVERNAME=CERTFILE[,KEYFILE], "
                          "e.g. example.com=/etc/tls/example.pem,/etc/tls/example.key")
    if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", name):
        raise ConfigError(f"sni: {quote(name)} is not a server name (e.g. example.com or *.example.com)")
    return name, os.path.abspath(certfile.strip()), os.path.abspath(keyfile.strip()) if keyfile.strip() else None


def _check_type(key: str, value: Any, origin: str) -> None:
    types = _FIELD_TYPES[key]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        want = " or ".join("a list of strings" if t is list else t.__name__ for t in types)
        raise ConfigError(f"{origin}{key.replace('_', '-')}: expected {want}, got {quote(value)}")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{origin}{key.replace('_', '-')}: expected a list of strings, got {quote(value)}")
    if isinstance(value, list) and len(value) > MAX_LIST:
        raise ConfigError(f"{origin}{key.replace('_', '-')}: {len(value)} entries, more than the {MAX_LIST} allowed")


def build_config(overrides: Mapping[str, Any], config_file: str | None = None) -> Config:
    """Merge the config file (if any) under ``overrides`` (the command line) and check it all."""
    file_settings = read_config_file(config_file) if config_file else {}
    tables: list[dict[str, Any]] = file_settings.pop("listener", [])  # checked as they were read
    for key, value in file_settings.items():
        _check_type(key, value, f"config file {config_file}: ")
    merged: dict[str, Any] = {**file_settings, **{k: v for k, v in overrides.items() if v is not None}}
    for key, value in merged.items():
        if key not in _FIELD_TYPES:
            raise ConfigError(f"unknown setting {quote(key)}")
        _check_type(key, value, "")
    binds = merged.pop("bind", None)
    if binds is None and (tables or merged.get("tls_bind")):
        binds = []  # the addresses are given elsewhere: no default plain one beside them
    if isinstance(binds, str):
        binds = [binds]
    if binds is not None:
        merged["binds"] = tuple(binds)
    merged["config_file"] = os.path.abspath(config_file) if config_file else None
    relays = merged.get("relay")
    if isinstance(relays, str):
        merged["relay"] = (relays,)
    elif relays is not None:
        merged["relay"] = tuple(relays)
    for key in ("user", "group"):
        if isinstance(merged.get(key), int):
            merged[key] = str(merged[key])
    for key in ("timeout", "graceful_timeout", "proxy_timeout", "relay_connect_timeout", "relay_idle_timeout",
                "relay_check_interval", "relay_slow_start", "reload_canary",
                "reload_probation", "idle_timeout", "reclaim_idle_after", "drain_idle", "handler_timeout"):
        if key in merged:
            merged[key] = float(merged[key])
    allow = merged.get("proxy_allow")
    if allow is not None:
        items = allow.split(",") if isinstance(allow, str) else allow
        merged["proxy_allow"] = tuple(i.strip() for i in items if i.strip())
        if len(merged["proxy_allow"]) > MAX_LIST:
            raise ConfigError(f"proxy-allow: {len(merged['proxy_allow'])} entries, more than the {MAX_LIST} allowed")
    if "log_level" in merged:
        merged["log_level"] = merged["log_level"].lower()
    _normalise_tls(merged)
    config = _with_listeners(Config(**merged), tables)
    validate(config)
    return config


def _normalise_tls(merged: dict[str, Any]) -> None:
    """The TLS settings as Config holds them: tuples, absolute paths, seconds as floats."""
    for key in ("alpn", "sni", "tls_bind"):
        if key in merged:
            items = [merged[key]] if isinstance(merged[key], str) else merged[key]
            if key == "alpn":  # --alpn h2,http/1.1 as well as one per option
                items = [part for item in items for part in item.split(",")]
            merged[key] = tuple(i.strip() for i in items if i.strip())
    for key in ("certfile", "keyfile", "keyfile_password_file", "ca_certs", "relay_ca_certs", "relay_certfile",
                "relay_keyfile"):
        if merged.get(key):
            merged[key] = os.path.abspath(merged[key])  # a reload re-reads them, whatever the working directory
    if "tls_handshake_timeout" in merged:
        merged["tls_handshake_timeout"] = float(merged["tls_handshake_timeout"])


def _with_listeners(config: Config, tables: list[dict[str, Any]]) -> Config:
    """``config`` with every listening address and its TLS settings: the --bind ones (TLS when --certfile
    is given without --tls-bind), the --tls-bind ones, then each [[listener]] table's."""
    _check_tls_values("", config)
    if not config.certfile and not config.tls_bind and not tables:
        return config  # plain TCP everywhere: tls_for() says None for every address
    plain_tls = config.tls_options({}) if config.certfile and not config.tls_bind else None
    if config.tls_bind and not config.certfile:
        raise ConfigError("tls-bind: needs --certfile (and --keyfile) for those addresses")
    listeners: list[tuple[str, TlsOptions | None]] = [(b, plain_tls) for b in config.binds]
    listeners += [(b, config.tls_options({})) for b in config.tls_bind]
    for number, table in enumerate(tables, 1):
        for key in ("certfile", "keyfile", "keyfile_password_file", "ca_certs"):
            if table.get(key):
                table[key] = os.path.abspath(table[key])
        for key in ("alpn", "sni"):
            if isinstance(table.get(key), str):
                table[key] = [table[key]]
        speaks_tls = table.get("tls", True) and (table.get("certfile") or config.certfile)
        if table.get("tls") and not speaks_tls:
            raise ConfigError(f"listener {number} ({cut(table['bind'])}): tls = true needs a certfile")
        options = None
        if speaks_tls:
            options = config.tls_options(table)
            _check_tls_values(f"listener {number} ({cut(table['bind'])}): ", options)
        listeners.append((table["bind"].strip(), options))
    binds = tuple(text for text, _ in listeners)
    return dataclasses.replace(config, binds=binds, listener_tls=tuple(listeners))


def _check_tls_values(origin: str, options: Config | TlsOptions) -> None:
    """The TLS settings' values (whether the files hold what they should is prefork.tls's to say)."""
    if options.cert_reqs not in CERT_REQS:
        raise ConfigError(f"{origin}cert-reqs: {quote(options.cert_reqs)} is not one of {', '.join(CERT_REQS)}")
    if options.tls_min_version not in TLS_VERSIONS:
        raise ConfigError(f"{origin}tls-min-version: {quote(options.tls_min_version)} is not one of "
                          f"{', '.join(TLS_VERSIONS)}")
    if options.cert_reqs != "none" and not options.ca_certs:
        raise ConfigError(f"{origin}cert-reqs {options.cert_reqs}: needs --ca-certs, the CAs that sign "
                          "client certificates")
    if not 0 < float(options.tls_handshake_timeout) <= 3600:
        raise ConfigError(f"{origin}tls-handshake-timeout: {float(options.tls_handshake_timeout):g} must be more "
                          "than 0 seconds (at most an hour)")
    for protocol in options.alpn:
        if not 0 < len(protocol.encode("utf-8", "surrogatepass")) < 256:
            raise ConfigError(f"{origin}alpn: {quote(protocol)} must be 1-255 bytes")
    if options.keyfile and not options.certfile:
        raise ConfigError(f"{origin}keyfile: needs --certfile, the certificate it belongs to")
    if options.keyfile_password_file and not options.certfile:
        raise ConfigError(f"{origin}keyfile-password-file: needs --certfile and --keyfile")
    if options.sni and not options.certfile:
        raise ConfigError(f"{origin}sni: needs --certfile, the certificate for clients that name no server")
    for item in options.sni:
        if isinstance(item, str):
            parse_sni(item)


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def _check_side_port(option: str, value: str | None, specs: tuple[BindSpec, ...]) -> None:
    """--metrics-bind and --agent-bind: a TCP HOST:PORT of the master's own, not one of the --bind addresses."""
    if value is None:
        return
    spec = parse_bind(value)
    if spec.is_unix:
        raise ConfigError(f"{option}: {quote(value)} must be HOST:PORT")
    if any((s.host, s.port) == (spec.host, spec.port) for s in specs if spec.port):
        raise ConfigError(f"{option}: {value} is also a --bind address")


def validate(config: Config) -> None:
    """Raise ConfigError for the first bad value."""
    if not config.binds:
        raise ConfigError("bind: at least one address is needed")
    specs = config.bind_specs  # parses each one
    if len({(s.host, s.port, s.path) for s in specs}) != len(specs):
        raise ConfigError(f"bind: the same address is given twice: {cut(', '.join(config.binds))}")
    if not 1 <= config.workers <= MAX_WORKERS:
        raise ConfigError(f"workers: {config.workers} is out of range (1-{MAX_WORKERS})")
    if config.worker_class not in WORKER_CLASSES:
        raise ConfigError(
            f"worker-class: unknown class {quote(config.worker_class)} (choose from {', '.join(WORKER_CLASSES)})"
        )
    if config.loop not in LOOPS:
        raise ConfigError(f"loop: unknown event loop {quote(config.loop)} (choose from {', '.join(LOOPS)})")
    if config.balance not in BALANCE_MODES:
        raise ConfigError(f"balance: {quote(config.balance)} is neither on nor off")
    if config.loop == "uvloop" and not uvloop_installed():
        raise ConfigError("loop: uvloop is not installed (pip install 'prefork[fast]'), or choose asyncio")
    if not 1 <= config.threads <= 10000:
        raise ConfigError(f"threads: {config.threads} is out of range (1-10000)")
    if not 0 <= config.max_connections <= 1_000_000:
        raise ConfigError(f"max-connections: {config.max_connections} is out of range (0 = no cap, up to 1000000)")
    if config.max_connections and config.worker_class != "async":
        raise ConfigError(f"max-connections: caps the async class's connections; a {config.worker_class} worker "
                          "holds at most --threads in handlers (sync: one) and those waiting for their first "
                          "bytes cost a descriptor each, bounded by the file limit")
    _check_admission(config)
    if not 0 < config.timeout <= 86400:
        raise ConfigError(f"timeout: {config.timeout:g} must be more than 0 seconds (at most a day)")
    if not 0 <= config.graceful_timeout <= 86400:
        raise ConfigError(f"graceful-timeout: {config.graceful_timeout:g} must be 0 to 86400 seconds")
    if config.max_requests < 0:
        raise ConfigError(f"max-requests: {config.max_requests} must be 0 (off) or more")
    if config.max_requests_jitter < 0:
        raise ConfigError(f"max-requests-jitter: {config.max_requests_jitter} must be 0 or more")
    if not 0 <= config.reload_batch <= MAX_WORKERS:
        raise ConfigError(f"reload-batch: {config.reload_batch} is out of range (0 = the whole generation, "
                          f"up to {MAX_WORKERS})")
    if not 0 <= config.reload_canary <= MAX_CANARY:
        raise ConfigError(f"reload-canary: {config.reload_canary:g} must be 0 (off) to {MAX_CANARY:g} seconds")
    if not 0 <= config.reload_probation <= MAX_CANARY:
        raise ConfigError(f"reload-probation: {config.reload_probation:g} must be 0 (off) to {MAX_CANARY:g} seconds")
    if config.reload_probation and not config.preload:
        raise ConfigError("reload-probation: a rollback runs the old generation's code from its mold, and "
                          "--no-preload has none (use --preload, the default)")
    if not 0 <= config.max_worker_memory <= 1024 * 1024:
        raise ConfigError(f"max-worker-memory: {config.max_worker_memory} MiB is out of range (0 = no limit)")
    if not 1 <= config.backlog <= 65535:
        raise ConfigError(f"backlog: {config.backlog} is out of range (1-65535)")
    check_name(config.name)
    if not _HANDLER_RE.match(config.handler):
        raise ConfigError(f"handler: {quote(config.handler)} must look like module:Class (e.g. myapp.echo:Handler)")
    if len(config.handler) > MAX_HANDLER:  # it is written in every start and status: a name, not a payload
        raise ConfigError(f"handler: {quote(config.handler)} is {len(config.handler)} characters long, "
                          f"over {MAX_HANDLER}")
    _check_side_port("metrics-bind", config.metrics_bind, specs)
    _check_side_port("agent-bind", config.agent_bind, specs)
    if config.agent_bind is not None and config.metrics_bind is not None:
        agent, metrics = parse_bind(config.agent_bind), parse_bind(config.metrics_bind)
        if agent.port and (agent.host, agent.port) == (metrics.host, metrics.port):
            raise ConfigError(f"agent-bind: {config.agent_bind} is also the --metrics-bind address")
    for cidr in config.proxy_allow:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"proxy-allow: {quote(cidr)} is not an IP network "
                              "(e.g. 10.0.0.0/8 or 127.0.0.1)") from None
    if not 0 < config.proxy_timeout <= 3600:
        raise ConfigError(f"proxy-timeout: {config.proxy_timeout:g} must be more than 0 seconds (at most an hour)")
    _check_relay_balancing(config)
    _check_relay_loop(config, specs)
    if not 0 < config.relay_connect_timeout <= 3600:
        raise ConfigError(f"relay-connect-timeout: {config.relay_connect_timeout:g} must be 0-3600 seconds (not 0)")
    if not 0 <= config.relay_idle_timeout <= 86400 * 7:
        raise ConfigError(f"relay-idle-timeout: {config.relay_idle_timeout:g} must be 0 (none) to 604800 seconds")
    if config.relay_send_proxy and not config.relay:
        raise ConfigError("relay-send-proxy: needs --relay HOST:PORT")
    _check_relay_tls(config)
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log-level: unknown level {quote(config.log_level)} (choose from {', '.join(LOG_LEVELS)})")


def _check_relay_balancing(config: Config) -> None:
    """The --relay upstreams with their options, and the balancing settings that go with them."""
    if len(config.relay) > MAX_UPSTREAMS:
        raise ConfigError(f"relay: {len(config.relay)} upstreams, more than the {MAX_UPSTREAMS} allowed")
    names = set()
    for spec in config.relay_specs:
        if spec.name in names:
            raise ConfigError(f"relay: {spec.name} is given twice (give it a weight instead)")
        names.add(spec.name)
    if config.relay_balance not in RELAY_BALANCES:
        raise ConfigError(f"relay-balance: {quote(config.relay_balance)} is not one of {', '.join(RELAY_BALANCES)}")
    if not (config.relay_check_interval == 0 or 0.05 <= config.relay_check_interval <= 3600):
        raise ConfigError(f"relay-check-interval: {config.relay_check_interval:g} must be 0 (off) "
                          "or 0.05-3600 seconds")
    if not 0 <= config.relay_slow_start <= 3600:
        raise ConfigError(f"relay-slow-start: {config.relay_slow_start:g} must be 0 (off) to 3600 seconds")
    for key in ("relay_check_send", "relay_check_expect"):
        value = getattr(config, key)
        if value is None:
            continue
        option = key.replace("_", "-")
        if not config.relay_check_interval:
            raise ConfigError(f"{option}: needs --relay-check-interval SECS")
        try:
            raw = check_bytes(value)
        except ValueError as exc:
            raise ConfigError(f"{option}: {quote(value)}: {exc}") from None
        if not raw or len(raw) > 4096:
            raise ConfigError(f"{option}: {quote(value)} must be 1 to 4096 bytes")


def check_bytes(text: str) -> bytes:
    """A --relay-check-send/--relay-check-expect value as bytes: UTF-8, with \\r, \\n, \\t, \\\\ and \\xHH.

    Raises ``ValueError`` for any other backslash escape.
    """
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        code = text[i + 1:i + 2]
        if code in ("r", "n", "t", "\\"):
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[code]
            i += 2
        elif code == "x" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 2:i + 4]):
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        else:
            raise ValueError(f"unknown escape {text[i:i + 2]!r} (\\r, \\n, \\t, \\\\ or \\xHH)")
    return bytes(out)


def _check_relay_loop(config: Config, specs: tuple[BindSpec, ...]) -> None:
    """--relay pointed at one of this instance's own listeners would relay to itself until it runs out."""
    for target in config.relay_specs:
        up = _addresses(target.host, target.port)
        for bind in specs:
            if bind.is_unix or bind.port != target.port:
                continue
            own = _addresses(bind.host, bind.port)
            wildcard = any(ipaddress.ip_address(a).is_unspecified for a in own)
            if up & own or (wildcard and any(_is_local(a) for a in up)):
                raise ConfigError(f"relay: {target.name} is this instance's own listener {bind.text}: "
                                  "it would relay to itself (point --relay at the upstream servers)")


def _addresses(host: str, port: int) -> set[str]:
    """The IP addresses ``host`` stands for (empty when it does not resolve: nothing to compare then)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    return {str(info[4][0]).split("%", 1)[0] for info in infos}


def _is_local(address: str) -> bool:
    """True for an address of this host: loopback, or one a socket can bind (an interface's)."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def _check_admission(config: Config) -> None:
    """--idle-timeout, --reclaim-idle-after, --max-connections-per-source, --drain-idle, --handler-timeout."""
    if not 0 <= config.idle_timeout <= 86400 * 7:
        raise ConfigError(f"idle-timeout: {config.idle_timeout:g} must be 0 (never) to 604800 seconds")
    if not 0 <= config.reclaim_idle_after <= 3600:
        raise ConfigError(f"reclaim-idle-after: {config.reclaim_idle_after:g} must be 0 (never reclaim) to 3600 "
                          "seconds")
    if not 0 <= config.max_connections_per_source <= 1_000_000:
        raise ConfigError(f"max-connections-per-source: {config.max_connections_per_source} is out of range "
                          "(0 = no limit, up to 1000000)")
    if not 0 <= config.drain_idle <= 86400 * 7:
        raise ConfigError(f"drain-idle: {config.drain_idle:g} must be 0 (never) to 604800 seconds")
    if not (config.handler_timeout == 0 or 1 <= config.handler_timeout <= 86400 * 7):
        raise ConfigError(f"handler-timeout: {config.handler_timeout:g} must be 0 (off) or 1 to 604800 seconds")


def _check_relay_tls(config: Config) -> None:
    """--relay-tls and the settings that only mean something with it."""
    if config.relay_tls and not config.relay:
        raise ConfigError("relay-tls: needs --relay HOST:PORT")
    for key in ("relay_ca_certs", "relay_sni", "relay_certfile", "relay_keyfile"):
        if getattr(config, key) and not config.relay_tls:
            raise ConfigError(f"{key.replace('_', '-')}: needs --relay-tls")
    if config.relay_keyfile and not config.relay_certfile:
        raise ConfigError("relay-keyfile: needs --relay-certfile, the certificate it belongs to")
    if config.relay_sni is not None and not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", config.relay_sni):
        raise ConfigError(f"relay-sni: {quote(config.relay_sni)} is not a server name")


def describe_handler(config: Config) -> str:
    """The handler as status and logs name it (``module:Class``), and what it is when no other was given."""
    name = config.effective_handler
    if config.handler == DEFAULT_HANDLER and not config.relay:
        return f"{name} (the built-in echo server: no handler given)"
    return name


def check_name(name: str) -> None:
    """Refuse an instance name that cannot be a file name (ConfigError)."""
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"name: {quote(name)} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


def runtime_dir(uid: int | None = None) -> str:
    """Where control sockets live: systemd's RuntimeDirectory, else XDG_RUNTIME_DIR, else /tmp/prefork-UID.

    ``uid`` is the user the daemon will run as (--user), when it is not us.
    """
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        value = os.environ.get(var, "")
        # RUNTIME_DIRECTORY lists every directory of RuntimeDirectory= separated by ':'
        first = value.split(":")[0]
        if first:
            return first
    return f"/tmp/prefork-{os.getuid() if uid is None else uid}"


def default_control_path(name: str, uid: int | None = None) -> str:
    return os.path.join(runtime_dir(uid), f"{name}.sock")


def control_candidates(name: str) -> list[str]:
    """Where a client looks for daemon ``name``, in order, each place once.

    The daemon's own default place seen from here, then both runtime
    directories whichever of them our environment names: $XDG_RUNTIME_DIR (or,
    when it is not set, /run/user/UID, where pam_systemd points it) and
    /tmp/prefork-UID, the daemon's place when it is not set; then the shipped
    units' /run/prefork/NAME.sock (prefork.service) and
    /run/prefork-NAME/NAME.sock (prefork@NAME.service), as an operator's shell
    has neither $RUNTIME_DIRECTORY nor the service user's $XDG_RUNTIME_DIR.
    """
    check_name(name)
    uid = os.getuid()
    xdg = os.environ.get("XDG_RUNTIME_DIR", "") or f"/run/user/{uid}"
    places = [default_control_path(name), os.path.join(xdg, f"{name}.sock"), f"/tmp/prefork-{uid}/{name}.sock",
              f"/run/prefork/{name}.sock", f"/run/prefork-{name}/{name}.sock"]
    return list(dict.fromkeys(places))


def find_control_path(name: str) -> str | None:
    """The control socket of daemon ``name``; None when there is none.

    First the places of :func:`control_candidates`; then any listening Unix
    socket called NAME.sock that the kernel lists (``/proc/net/unix``) and we
    own, when there is exactly one: a daemon started with a runtime directory
    of its own (another ``XDG_RUNTIME_DIR``) is found too.
    """
    for path in control_candidates(name):
        if os.path.exists(path):
            return path
    listening = listening_control_sockets(name)
    if len(listening) == 1:
        return listening[0]
    if os.geteuid() == 0:  # root looking for a daemon that switched to another user (--user)
        found = glob.glob(f"/tmp/prefork-[0-9]*/{glob.escape(name)}.sock")
        if len(found) == 1:
            return found[0]
    return None


def listening_control_sockets(name: str, table: str = "/proc/net/unix") -> list[str]:
    """The listening Unix sockets called NAME.sock in ``table`` that are ours (root: anyone's), each once."""
    try:
        with open(table, encoding="utf-8", errors="replace") as f:
            paths = unix_listeners(f.read())
    except OSError:
        return []
    found = []
    for path in dict.fromkeys(p for p in paths if os.path.basename(p) == f"{name}.sock"):
        try:
            st = os.stat(path)
        except OSError:
            continue  # gone, or a socket of another mount namespace
        if stat.S_ISSOCK(st.st_mode) and (st.st_uid == os.geteuid() or os.geteuid() == 0):
            found.append(path)
    return found


def unix_listeners(text: str) -> list[str]:
    """The paths of the listening Unix stream sockets in the text of ``/proc/net/unix``."""
    paths = []
    for line in text.splitlines()[1:]:
        fields = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path: Flags 00010000 is __SO_ACCEPTCON (listening),
        # Type 0001 SOCK_STREAM; an abstract name starts with '@', an unbound socket has no path
        if len(fields) == 8 and int(fields[3], 16) & 0x10000 and fields[4] == "0001" and fields[7].startswith("/"):
            paths.append(fields[7])
    return paths
