"""The settings' typed forms, generated from the table in prefork/settings.py: do not edit.

Run ``python -m prefork.settings_gen`` after changing the table; a test fails
while this file differs from what the table generates.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Literal, TypedDict

from prefork.settings import default_workers

PathArg = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class SettingFields:
    """Every setting's value; prefork.config.Config adds what is not a setting and the methods."""

    handler: str = 'prefork.handlers.echo:EchoHandler'
    name: str = 'prefork'
    control: str | None = None
    binds: tuple[str, ...] = ('127.0.0.1:20000',)
    backlog: int = 2048
    workers: int = dataclasses.field(default_factory=default_workers)
    worker_class: str = 'thread'
    threads: int = 32
    loop: str = 'auto'
    balance: str = 'on'
    max_connections: int = 0
    idle_timeout: float = 60.0
    reclaim_idle_after: float = 10.0
    max_connections_per_source: int = 0
    timeout: float = 30.0
    graceful_timeout: float = 30.0
    drain_idle: float = 10.0
    handler_timeout: float = 0.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_worker_memory: int = 0
    chdir: str | None = None
    pythonpath: tuple[str, ...] = ()
    preload: bool = True
    reload_batch: int = 0
    reload_canary: float = 0.0
    reload_probation: float = 0.0
    reload_on_change: bool = False
    reload_dir: tuple[str, ...] = ()
    certfile: str | None = None
    keyfile: str | None = None
    keyfile_password_file: str | None = None
    ca_certs: str | None = None
    cert_reqs: str = 'none'
    tls_min_version: str = '1.2'
    ciphers: str | None = None
    alpn: tuple[str, ...] = ()
    sni: tuple[str, ...] = ()
    tls_handshake_timeout: float = 10.0
    tls_bind: tuple[str, ...] = ()
    relay: tuple[str, ...] = ()
    relay_balance: str = 'leastconn'
    relay_connect_timeout: float = 5.0
    relay_idle_timeout: float = 300.0
    relay_send_proxy: bool = False
    relay_check_interval: float = 0.0
    relay_check_send: str | None = None
    relay_check_expect: str | None = None
    relay_slow_start: float = 0.0
    relay_tls: bool = False
    relay_ca_certs: str | None = None
    relay_sni: str | None = None
    relay_certfile: str | None = None
    relay_keyfile: str | None = None
    proxy_protocol: bool = False
    proxy_allow: tuple[str, ...] = ()
    proxy_timeout: float = 5.0
    log_level: str = 'info'
    log_file: str | None = None
    access_log: str | None = None
    metrics_bind: str | None = None
    agent_bind: str | None = None
    user: str | None = None
    group: str | None = None


class ServerOptions(TypedDict, total=False):
    """The keyword arguments: the ``prefork`` command's long options, ``-`` spelt ``_`` (``prefork --help``)."""

    config: PathArg  # a TOML file, as --config; keyword arguments win over it
    name: str
    control: PathArg
    backlog: int
    workers: int
    worker_class: Literal['sync', 'thread', 'async']
    threads: int
    loop: Literal['auto', 'asyncio', 'uvloop']
    balance: Literal['on', 'off']
    max_connections: int
    idle_timeout: float
    reclaim_idle_after: float
    max_connections_per_source: int
    timeout: float
    graceful_timeout: float
    drain_idle: float
    handler_timeout: float
    max_requests: int
    max_requests_jitter: int
    max_worker_memory: int
    chdir: PathArg
    pythonpath: str | Sequence[str]
    preload: bool
    reload_batch: int
    reload_canary: float
    reload_probation: float
    reload_on_change: bool
    reload_dir: str | Sequence[str]
    certfile: PathArg
    keyfile: PathArg
    keyfile_password_file: PathArg
    ca_certs: PathArg
    cert_reqs: Literal['none', 'optional', 'required']
    tls_min_version: Literal['1.2', '1.3']
    ciphers: str
    alpn: str | Sequence[str]
    sni: str | Sequence[str]
    tls_handshake_timeout: float
    tls_bind: str | Sequence[str]
    relay: str | Sequence[str]
    relay_balance: Literal['leastconn', 'roundrobin']
    relay_connect_timeout: float
    relay_idle_timeout: float
    relay_send_proxy: bool
    relay_check_interval: float
    relay_check_send: str
    relay_check_expect: str
    relay_slow_start: float
    relay_tls: bool
    relay_ca_certs: PathArg
    relay_sni: str
    relay_certfile: PathArg
    relay_keyfile: PathArg
    proxy_protocol: bool
    proxy_allow: str | Sequence[str]
    proxy_timeout: float
    log_level: Literal['debug', 'info', 'warning', 'error', 'critical']
    log_file: PathArg
    access_log: PathArg
    metrics_bind: str
    agent_bind: str
    user: str | int
    group: str | int
