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

from prefork.generated_settings import SettingFields
from prefork.settings import (
    CERT_REQS,
    COMMAND_OPTIONS,
    DEFAULT_HANDLER,
    ENV_INTERNAL,
    ENV_PREFIX,
    TLS_VERSIONS,
    Setting,
)
from prefork.settings import DEFAULT_BIND as DEFAULT_BIND  # these are prefork.config's names too
from prefork.settings import MAX_CANARY as MAX_CANARY
from prefork.settings import MAX_WORKERS as MAX_WORKERS
from prefork.settings import SETTINGS as TABLE
from prefork.settings import default_workers as default_workers

ASYNC_ECHO_HANDLER = "prefork.handlers.aio:EchoProtocol"
RELAY_HANDLERS = ("prefork.handlers.relay:RelayHandler", "prefork.handlers.aio:RelayProtocol")  # [is async]
# the TLS settings a [[listener]] table of the config file may set for its own address
TLS_KEYS = ("certfile", "keyfile", "keyfile_password_file", "ca_certs", "cert_reqs", "tls_min_version", "ciphers",
            "alpn", "sni", "tls_handshake_timeout")
MAX_CONFIG_BYTES = 2 * 1024 * 1024  # a configuration is a few hundred bytes; 2 MiB is plenty
try:
    LAUNCH_DIR = os.getcwd()  # where prefork started: a relative --chdir is taken from here, wherever the master is
except OSError:  # removed under us: nothing relative can be found from it anyway
    LAUNCH_DIR = "/"
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


def did_you_mean(given: str, known: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean X?)`` for the one of ``known`` closest to ``given`` (a typo), or nothing."""
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=cutoff)
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
class Config(SettingFields):
    """Everything the daemon is told: the settings (prefork.settings, ``prefork --help``) and what follows."""

    # The handler itself, given by a program (prefork.api) rather than named: forked workers use this object, and
    # ``handler`` is only its name for status and logs ("__main__:EchoHandler"). Never read from a file.
    handler_object: Any = dataclasses.field(default=None, repr=False)
    # each listening address with its TLS settings (None: plain), from the TLS settings and [[listener]] tables
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


# key -> type the loader accepts for it (the TOML file, the environment and the command line use the same keys)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {setting.name: setting.types for setting in TABLE}
BY_NAME = {setting.name: setting for setting in TABLE}
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


@dataclass(frozen=True)
class Loaded:
    """A configuration with where each setting came from (what ``--check-config`` shows)."""

    config: Config
    origins: dict[str, str]  # setting -> "command line", "environment variable PREFORK_...", "config file PATH"
    overrides: dict[str, Any]  # what wins over the config file, which a reload reads again: environment, given


def build_config(overrides: Mapping[str, Any], config_file: str | None = None) -> Config:
    """Merge the config file (if any) under ``overrides`` (the command line) and check it all.

    The environment is not read here (a reload's ``overrides`` already hold
    what it gave at the start): :func:`load_config` reads it.
    """
    return load_config(overrides, config_file).config


def load_config(given: Mapping[str, Any], config_file: str | None = None, environ: Mapping[str, str] | None = None,
                given_by: str = "command line") -> Loaded:
    """The settings ``given`` over those of ``environ`` (PREFORK_*) over the config file's, checked.

    The config file is ``config_file``, else ``$PREFORK_CONFIG``. Raises ConfigError naming the culprit.
    """
    from_env = environ_settings(environ or {})
    config_file = config_file or from_env.pop("config", None)
    from_env.pop("config", None)
    file_settings = read_config_file(config_file) if config_file else {}
    tables: list[dict[str, Any]] = file_settings.pop("listener", [])  # checked as they were read
    for key, value in file_settings.items():
        _check_value(key, value, f"config file {config_file}: ")
    given = {k: v for k, v in given.items() if v is not None}
    for key, value in given.items():
        if key not in _FIELD_TYPES:
            raise ConfigError(f"unknown setting {quote(key)}")
        _check_type(key, value, "")
    origins = {key: f"config file {config_file}" for key in (*file_settings, *(["bind"] if tables else []))}
    origins.update({key: f"environment variable {ENV_PREFIX}{key.upper()}" for key in from_env})
    origins.update({key: given_by for key in given})
    overrides = {**from_env, **given}
    return Loaded(_merge({**file_settings, **overrides}, tables, config_file), origins, overrides)


def _merge(merged: dict[str, Any], tables: list[dict[str, Any]], config_file: str | None) -> Config:
    """The Config of ``merged`` settings (each of its type) and the config file's [[listener]] ``tables``."""
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
    dirs = merged.get("reload_dir")
    if dirs is not None:
        merged["reload_dir"] = (dirs,) if isinstance(dirs, str) else tuple(dirs)
    for key in ("user", "group"):
        if isinstance(merged.get(key), int):
            merged[key] = str(merged[key])
    for setting in TABLE:
        if setting.kind == "float" and setting.name in merged:
            merged[setting.name] = float(merged[setting.name])
    allow = merged.get("proxy_allow")
    if allow is not None:
        items = allow.split(",") if isinstance(allow, str) else allow
        merged["proxy_allow"] = tuple(i.strip() for i in items if i.strip())
        if len(merged["proxy_allow"]) > MAX_LIST:
            raise ConfigError(f"proxy-allow: {len(merged['proxy_allow'])} entries, more than the {MAX_LIST} allowed")
    if "log_level" in merged:
        merged["log_level"] = merged["log_level"].lower()
    _normalise_paths(merged)
    _normalise_tls(merged)
    config = _with_listeners(Config(**merged), tables)
    validate(config)
    return config


def _check_value(key: str, value: Any, origin: str) -> None:
    """A setting's value on its own, from ``origin``: its type, then its range or choices."""
    _check_type(key, value, origin)
    problem = BY_NAME[key].problem(value)
    if problem is not None:
        raise ConfigError(f"{origin}{key.replace('_', '-')}: {problem}")


def environ_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the ``PREFORK_*`` variables of ``environ`` give (an empty one gives none), each checked.

    A variable that names no setting is refused, with the one it is closest
    to; the daemon's own (prefork.settings.ENV_INTERNAL) are not settings.
    """
    known = {setting.env_var: setting for setting in (*TABLE, *COMMAND_OPTIONS) if setting.env}
    found: dict[str, Any] = {}
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var in ENV_INTERNAL:
            continue
        setting = known.get(var)
        if setting is None:
            # the names after the prefix, which they all share
            hint = did_you_mean(var.removeprefix(ENV_PREFIX), [name.removeprefix(ENV_PREFIX) for name in known])
            raise ConfigError(f"environment variable {cut(var)}: no such setting"
                              f"{hint.replace('mean ', 'mean ' + ENV_PREFIX)} (see docs/options.md)")
        if text.strip():
            found[setting.name] = env_value(setting, text)
    return found


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def env_value(setting: Setting, text: str) -> Any:
    """The value of ``setting`` that its environment variable's ``text`` gives; raises ConfigError."""
    var = setting.env_var
    word = text.strip()
    value: Any = word
    if setting.kind == "int" or (setting.kind == "id" and word.isdigit()):
        if not re.fullmatch(r"[+-]?[0-9]{1,18}", word):
            raise ConfigError(f"environment variable {var}: expected a whole number, got {quote(text)}")
        value = int(word)
    elif setting.kind == "float":
        try:
            value = float(word)
        except ValueError:
            raise ConfigError(f"environment variable {var}: expected a number, got {quote(text)}") from None
    elif setting.kind == "bool":
        if word.lower() not in (*_TRUE, *_FALSE):
            raise ConfigError(f"environment variable {var}: expected true or false (1/0, yes/no, on/off), "
                              f"got {quote(text)}")
        value = word.lower() in _TRUE
    elif setting.kind == "list":
        items = word.split() if setting.separator == " " else word.split(setting.separator)
        value = [item.strip() for item in items if item.strip()]
    if setting.name in _FIELD_TYPES:
        _check_value(setting.name, value, f"environment variable {var}: ")
    return value
def _normalise_paths(merged: dict[str, Any]) -> None:
    """--chdir from the directory prefork started in, --pythonpath from --chdir's (both absolute, so that
    a reload in the master, which works in --chdir, reads them the same); each must be a directory."""
    base = LAUNCH_DIR
    if merged.get("chdir") is not None:
        merged["chdir"] = base = _directory("chdir", os.path.join(LAUNCH_DIR, merged["chdir"]))
    paths = merged.get("pythonpath")
    if paths is not None:
        items = [part for item in ([paths] if isinstance(paths, str) else paths) for part in str(item).split(",")]
        merged["pythonpath"] = tuple(_directory("pythonpath", os.path.join(base, i.strip()))
                                     for i in items if i.strip())
        if len(merged["pythonpath"]) > MAX_LIST:
            raise ConfigError(f"pythonpath: {len(merged['pythonpath'])} entries, more than the {MAX_LIST} allowed")


def _directory(option: str, path: str) -> str:
    """``path`` made absolute when it is a directory; else ConfigError."""
    path = os.path.normpath(path)
    if not os.path.isdir(path):
        why = "not a directory" if os.path.exists(path) else "no such directory"
        raise ConfigError(f"{option}: {cut(path)}: {why}")
    return path


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


def watchfiles_installed() -> bool:
    """--reload-on-change's watcher can run (looked up, not imported: the master never needs it)."""
    try:
        return importlib.util.find_spec("watchfiles") is not None
    except (ImportError, ValueError):  # a broken or half-removed installation
        return False


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
    """Raise ConfigError for the first bad value: each setting's own check (prefork.settings), then those
    that involve several."""
    for setting in TABLE:
        problem = setting.problem(getattr(config, setting.attr))
        if problem is not None:
            raise ConfigError(f"{setting.key}: {problem}")
    if not config.binds:
        raise ConfigError("bind: at least one address is needed")
    specs = config.bind_specs  # parses each one
    if len({(s.host, s.port, s.path) for s in specs}) != len(specs):
        raise ConfigError(f"bind: the same address is given twice: {cut(', '.join(config.binds))}")
    if config.loop == "uvloop" and not uvloop_installed():
        raise ConfigError("loop: uvloop is not installed (pip install 'prefork[fast]'), or choose asyncio")
    if config.max_connections and config.worker_class != "async":
        raise ConfigError(f"max-connections: caps the async class's connections; a {config.worker_class} worker "
                          "holds at most --threads in handlers (sync: one) and those waiting for their first "
                          "bytes cost a descriptor each, bounded by the file limit")
    if config.reload_probation and not config.preload:
        raise ConfigError("reload-probation: a rollback runs the old generation's code from its mold, and "
                          "--no-preload has none (use --preload, the default)")
    _check_reload_on_change(config)
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
    _check_relay_balancing(config)
    _check_relay_loop(config, specs)
    if config.relay_send_proxy and not config.relay:
        raise ConfigError("relay-send-proxy: needs --relay HOST:PORT")
    _check_relay_tls(config)


def _check_reload_on_change(config: Config) -> None:
    if config.reload_dir and not config.reload_on_change:
        raise ConfigError("reload-dir: is watched only with --reload-on-change")
    if not config.reload_on_change:
        return
    if not watchfiles_installed():
        raise ConfigError("reload-on-change: watchfiles is not installed (pip install watchfiles: the reload extra)")
    for path in config.reload_dir:
        if not os.path.isdir(path):
            raise ConfigError(f"reload-dir: {quote(path)} is not a directory")
    if not config.reload_dir and (config.chdir or os.getcwd()) == os.sep:
        raise ConfigError("reload-on-change: the working directory is /, too much to watch: start in the "
                          "application's directory or name it with --reload-dir")


def _check_relay_balancing(config: Config) -> None:
    """The --relay upstreams with their options, and the balancing settings that go with them."""
    if len(config.relay) > MAX_UPSTREAMS:
        raise ConfigError(f"relay: {len(config.relay)} upstreams, more than the {MAX_UPSTREAMS} allowed")
    names = set()
    for spec in config.relay_specs:
        if spec.name in names:
            raise ConfigError(f"relay: {spec.name} is given twice (give it a weight instead)")
        names.add(spec.name)
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
