"""Pure parts, tested as pure functions: bind parsing, config loading, backoff, exit descriptions, the control codec."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork.config import (
    DEFAULT_BIND,
    DEFAULT_HANDLER,
    MAX_WORKERS,
    BindSpec,
    Config,
    ConfigError,
    build_config,
    default_control_path,
    default_workers,
    parse_bind,
)
from prefork.control import HEADER, MAX_REQUEST, ProtocolError, decode_body, encode, frame_length
from prefork.master.exits import BACKOFF_FIRST, BACKOFF_MAX, backoff_delay, describe_exit
from prefork.workers.entry import WORKER_BOOT_ERROR

PROPERTY = settings(max_examples=300, deadline=None)

# -- parse_bind ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:20000", "127.0.0.1", 20000),
        ("localhost:8080", "localhost", 8080),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("127.0.0.1:65535", "127.0.0.1", 65535),
        ("127.0.0.1:00080", "127.0.0.1", 80),
        (":9000", "", 9000),
        ("  127.0.0.1:1  ", "127.0.0.1", 1),
        ("[::1]:20000", "::1", 20000),
        ("[::]:0", "::", 0),
        ("[fe80::1%lo]:443", "fe80::1%lo", 443),
        ("example.com:443", "example.com", 443),
    ],
)
def test_parse_bind_tcp(text: str, host: str, port: int) -> None:
    spec = parse_bind(text)
    assert (spec.host, spec.port, spec.path, spec.is_unix) == (host, port, None, False)
    assert spec.text == text.strip()


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("unix:/run/prefork/app.sock", "/run/prefork/app.sock"),
        ("unix:/tmp/../tmp/x.sock", "/tmp/x.sock"),
        ("unix:rel/app.sock", os.path.join(os.getcwd(), "rel/app.sock")),
        ("unix:/path with space.sock", "/path with space.sock"),
    ],
)
def test_parse_bind_unix(text: str, path: str) -> None:
    spec = parse_bind(text)
    assert spec.is_unix
    assert spec.path == path
    assert spec.text == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
        ("[::1]:70000", "port 70000 is out of range"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("127.0.0.1:+80", "port '+80' is not a number"),
        ("127.0.0.1: 80", "is not a number"),
        ("127.0.0.1:8.0", "is not a number"),
        ("127.0.0.1:", "port '' is not a number"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("", "expected HOST:PORT"),
        ("20000", "expected HOST:PORT"),
        ("::1:80", "put an IPv6 address in brackets"),
        ("fe80::1:443", "put an IPv6 address in brackets"),
        ("[::1]", "[ADDR]:PORT"),
        ("[::1]80", "[ADDR]:PORT"),
        ("[::1:80", "[ADDR]:PORT"),
        ("[::1]:", "port '' is not a number"),
        ("unix:", "unix: needs a path"),
        ("  unix:  ", "unix: needs a path"),
    ],
)
def test_parse_bind_rejects(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bind(text)
    message = str(info.value)
    assert fragment in message
    assert repr(text.strip()) in message  # names the culprit
    assert "\n" not in message


@pytest.mark.parametrize(
    "port_text",
    [
        "²",  # str.isdigit() is true for superscripts, but int() refuses them
        "9" * 5000,  # over int()'s digit limit
    ],
)
def test_parse_bind_rejects_ports_int_cannot_read(port_text: str) -> None:
    with pytest.raises(ConfigError):
        parse_bind(f"127.0.0.1:{port_text}")


@PROPERTY
@given(st.text(max_size=40))
def test_parse_bind_arbitrary_text_gives_spec_or_config_error(text: str) -> None:
    try:
        spec = parse_bind(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(spec, BindSpec)
    if not spec.is_unix:
        assert 0 <= spec.port <= 65535


@PROPERTY
@given(st.sampled_from(["127.0.0.1", "localhost", "", "[::1]", "[::]"]), st.integers(0, 65535))
def test_parse_bind_any_valid_port(host: str, port: int) -> None:
    spec = parse_bind(f"{host}:{port}")
    assert spec.port == port
    assert spec.host == host.strip("[]")


# -- build_config -------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "prefork.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    config = build_config({})
    assert config.binds == (DEFAULT_BIND,)
    assert config.handler == DEFAULT_HANDLER
    assert config.workers == default_workers() >= 1
    assert config.worker_class == "thread"
    assert config.threads == 32
    assert config.timeout == 30.0
    assert config.graceful_timeout == 30.0
    assert (config.idle_timeout, config.reclaim_idle_after, config.max_connections_per_source) == (60.0, 10.0, 0)
    assert (config.drain_idle, config.handler_timeout) == (10.0, 0.0)
    assert (config.max_requests, config.max_requests_jitter) == (0, 0)
    assert config.backlog == 2048
    assert config.name == "prefork"
    assert config.control is None
    assert config.log_level == "info"
    assert config.log_file is None
    assert config.config_file is None
    assert config.bind_specs == (parse_bind(DEFAULT_BIND),)


def test_config_is_frozen() -> None:
    config = build_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 5


def test_file_values(tmp_path: Path) -> None:
    path = write(tmp_path, """
bind = ["127.0.0.1:7000", "unix:app.sock"]
handler = "myapp.echo:Handler"
workers = 3
worker-class = "sync"
threads = 4
timeout = 5
graceful_timeout = 2.5
max-requests = 100
max_requests_jitter = 10
backlog = 128
name = "web-1"
control = "/run/web.sock"
log-level = "DEBUG"
log_file = "/var/log/web.log"
""")
    config = build_config({}, path)
    assert config.binds == ("127.0.0.1:7000", "unix:app.sock")
    assert config.handler == "myapp.echo:Handler"
    assert config.workers == 3
    assert config.worker_class == "sync"
    assert config.threads == 4
    assert config.timeout == 5.0 and isinstance(config.timeout, float)
    assert config.graceful_timeout == 2.5
    assert (config.max_requests, config.max_requests_jitter) == (100, 10)
    assert config.backlog == 128
    assert config.name == "web-1"
    assert config.control == "/run/web.sock"
    assert config.control_path == "/run/web.sock"
    assert config.log_level == "debug"
    assert config.log_file == "/var/log/web.log"
    assert config.config_file == path


def test_config_file_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "workers = 2\n", "rel.toml")
    monkeypatch.chdir(tmp_path)
    config = build_config({}, "rel.toml")
    assert config.config_file == str(tmp_path / "rel.toml")


def test_command_line_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 3\nname = "fromfile"\nbind = "127.0.0.1:7000"\ntimeout = 9\n')
    config = build_config({"workers": 1, "bind": ["127.0.0.1:7001", "127.0.0.1:7002"], "timeout": None}, path)
    assert config.workers == 1
    assert config.binds == ("127.0.0.1:7001", "127.0.0.1:7002")
    assert config.name == "fromfile"  # not given on the command line: the file's
    assert config.timeout == 9.0  # None means "not given"


@pytest.mark.parametrize(("value", "binds"), [
    ('"127.0.0.1:7000"', ("127.0.0.1:7000",)),
    ('["127.0.0.1:7000"]', ("127.0.0.1:7000",)),
    ('["127.0.0.1:7000", "[::1]:7000", "unix:/tmp/a.sock"]', ("127.0.0.1:7000", "[::1]:7000", "unix:/tmp/a.sock")),
])
def test_bind_string_or_list(tmp_path: Path, value: str, binds: tuple[str, ...]) -> None:
    assert build_config({}, write(tmp_path, f"bind = {value}\n")).binds == binds


def test_bind_string_override() -> None:
    assert build_config({"bind": "127.0.0.1:1234"}).binds == ("127.0.0.1:1234",)


@pytest.mark.parametrize("key", ["wokers", "port", "Workers", "check_config", "config"])
def test_unknown_key_in_file(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f"{key} = 2\n")
    with pytest.raises(ConfigError) as info:
        build_config({}, path)
    assert f"unknown setting {key!r}" in str(info.value)
    assert path in str(info.value)


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'port'"):
        build_config({"port": 80})


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('workers = "two"', "workers"),
        ("workers = true", "workers"),
        ("workers = 2.0", "workers"),
        ("threads = false", "threads"),
        ('timeout = "3"', "timeout"),
        ("timeout = true", "timeout"),
        ("graceful-timeout = [1]", "graceful-timeout"),
        ("bind = 8000", "bind"),
        ("bind = [8000]", "bind"),
        ('bind = ["127.0.0.1:1", 2]', "bind"),
        ("name = 3", "name"),
        ("handler = {module = 'x'}", "handler"),
        ("backlog = 1e3", "backlog"),
        ("log-level = 10", "log-level"),
    ],
)
def test_wrong_types_in_file(tmp_path: Path, line: str, key: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as info:
        build_config({}, path)
    message = str(info.value)
    assert f"{key}: expected" in message
    assert path in message
    assert "\n" not in message


@pytest.mark.parametrize(("overrides", "key"), [
    ({"workers": "2"}, "workers"),
    ({"workers": True}, "workers"),
    ({"timeout": "soon"}, "timeout"),
    ({"bind": [1]}, "bind"),
])
def test_wrong_types_in_overrides(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        build_config(overrides)


@pytest.mark.parametrize("text", ["workers = [", "workers = ", "= 3", "workers = 3\nworkers = 4", "[bind\n"])
def test_broken_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        build_config({}, path)
    message = str(info.value)
    assert message.startswith(f"config file {path}: invalid TOML")
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="no such file") as info:
        build_config({}, path)
    assert path in str(info.value)


def test_directory_as_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        build_config({}, str(tmp_path))


def test_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8|invalid TOML"):
        build_config({}, str(path))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"workers": 0}, "workers: 0 is out of range"),
        ({"workers": 2000}, "workers: 2000 is out of range"),
        ({"workers": MAX_WORKERS + 1}, f"workers: {MAX_WORKERS + 1} is out of range"),
        ({"workers": -3}, "workers: -3 is out of range"),
        ({"threads": 0}, "threads: 0 is out of range"),
        ({"threads": 10001}, "threads: 10001 is out of range"),
        ({"timeout": 0}, "timeout: 0 must be more than 0"),
        ({"timeout": -1.5}, "timeout: -1.5"),
        ({"timeout": 86401}, "timeout: 86401"),
        ({"graceful_timeout": -1}, "graceful-timeout: -1"),
        ({"graceful_timeout": 1e9}, "graceful-timeout: 1e+09"),
        ({"idle_timeout": -1}, "idle-timeout: -1 must be 0 (never)"),
        ({"reclaim_idle_after": -1}, "reclaim-idle-after: -1 must be 0 (never reclaim) to 3600"),
        ({"reclaim_idle_after": 3601}, "reclaim-idle-after: 3601 must be 0 (never reclaim) to 3600"),
        ({"max_connections_per_source": -1}, "max-connections-per-source: -1 is out of range"),
        ({"drain_idle": -1}, "drain-idle: -1 must be 0 (never)"),
        ({"handler_timeout": 0.5}, "handler-timeout: 0.5 must be 0 (off) or 1"),
        ({"handler_timeout": -3}, "handler-timeout: -3 must be 0 (off) or 1"),
        ({"max_connections": 10}, "max-connections: caps the async class's connections; a thread worker"),
        ({"max_connections": 10, "worker_class": "sync"}, "a sync worker holds at most --threads"),
        ({"max_requests": -1}, "max-requests: -1"),
        ({"max_requests_jitter": -1}, "max-requests-jitter: -1"),
        ({"backlog": 0}, "backlog: 0 is out of range"),
        ({"backlog": 65536}, "backlog: 65536 is out of range"),
        ({"worker_class": "gevent"}, "worker-class: unknown class 'gevent'"),
        ({"loop": "trio"}, "loop: unknown event loop 'trio'"),
        ({"log_level": "loud"}, "log-level: unknown level 'loud'"),
        ({"name": ""}, "name: ''"),
        ({"name": "-x"}, "name: '-x'"),
        ({"name": "a/b"}, "name: 'a/b'"),
        ({"name": "a b"}, "name: 'a b'"),
        ({"name": "x" * 65}, "name: 'xxxx"),
        ({"handler": "nocolon"}, "handler: 'nocolon' must look like module:Class"),
        ({"handler": "mod:"}, "handler: 'mod:'"),
        ({"handler": ":Class"}, "handler: ':Class'"),
        ({"handler": "1mod:Class"}, "handler: '1mod:Class'"),
        ({"handler": "mod:Cl-ass"}, "handler: 'mod:Cl-ass'"),
        ({"handler": "a:b:c"}, "handler: 'a:b:c'"),
        ({"bind": []}, "bind: at least one address"),
        ({"bind": ["127.0.0.1:99999"]}, "port 99999 is out of range"),
        ({"bind": ["127.0.0.1:80", "127.0.0.1:80"]}, "the same address is given twice"),
        ({"bind": ["127.0.0.1:80", " 127.0.0.1:80"]}, "the same address is given twice"),
        ({"bind": ["unix:/tmp/a.sock", "unix:/tmp/../tmp/a.sock"]}, "the same address is given twice"),
    ],
)
def test_invalid_values(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"workers": 1},
        {"workers": MAX_WORKERS},
        {"threads": 1},
        {"graceful_timeout": 0},
        {"timeout": 0.01},
        {"backlog": 1},
        {"backlog": 65535},
        {"name": "a"},
        {"name": "Web.api_1-x"},
        {"name": "x" * 64},
        {"handler": "pkg.sub.mod:Outer.Inner"},
        {"handler": "_m:_C"},
        {"log_level": "WARNING"},
        {"bind": ["127.0.0.1:80", "127.0.0.1:81", "[::1]:80", "unix:/tmp/a.sock"]},
    ],
)
def test_valid_edge_values(overrides: dict[str, Any]) -> None:
    config = build_config(overrides)
    for key, value in overrides.items():
        if key == "bind":
            assert config.binds == tuple(value)
        elif key == "log_level":
            assert config.log_level == value.lower()
        else:
            assert getattr(config, key) == value


def test_invalid_value_in_file_names_setting(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 0\n")
    with pytest.raises(ConfigError, match="workers: 0 is out of range"):
        build_config({}, path)


def test_control_path_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/a:/run/b")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert build_config({"name": "web"}).control_path == "/run/a/web.sock"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert build_config({"name": "web"}).control_path == "/run/user/1000/web.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    assert default_control_path("web") == f"/tmp/prefork-{os.getuid()}/web.sock"
    assert build_config({"control": "/x/y.sock"}).control_path == "/x/y.sock"


def test_config_dataclass_defaults_match_build_config() -> None:
    assert Config() == build_config({})


# -- backoff_delay ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "delay"),
    [
        (0, 0.0),
        (1, 0.0),
        (2, BACKOFF_FIRST),
        (3, 2 * BACKOFF_FIRST),
        (4, 4 * BACKOFF_FIRST),
        (5, 8 * BACKOFF_FIRST),
        (8, 64 * BACKOFF_FIRST),
        (9, BACKOFF_MAX),
        (50, BACKOFF_MAX),
        (1025, BACKOFF_MAX),
        # a worker that keeps dying young reaches these counts after hours; the master must not crash
        (1026, BACKOFF_MAX),
        (100_000, BACKOFF_MAX),
    ],
)
def test_backoff_delay(failures: int, delay: float) -> None:
    assert backoff_delay(failures) == pytest.approx(delay)


@PROPERTY
@given(st.integers(min_value=0, max_value=10**6))
def test_backoff_delay_is_monotonic_and_capped(failures: int) -> None:
    delay = backoff_delay(failures)
    assert 0.0 <= delay <= BACKOFF_MAX
    assert backoff_delay(failures + 1) >= delay


# -- describe_exit, from real wait statuses -----------------------------------------------------------


def wait_status(*, code: int | None = None, sig: int | None = None) -> int:
    """Fork a child that exits with ``code`` or kills itself with ``sig``; return its raw wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            if sig is not None:
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from SIGSEGV/SIGABRT
                if sig != signal.SIGKILL:  # SIGKILL cannot be caught, so it has no handler to reset
                    signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
                os.kill(os.getpid(), sig)
            os._exit(code if code is not None else 99)
        finally:
            os._exit(98)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize(
    ("code", "text", "clean"),
    [
        (0, "exited with status 0", True),
        (1, "exited with status 1", False),
        (7, "exited with status 7", False),
        (255, "exited with status 255", False),
        (WORKER_BOOT_ERROR, "exited with status 3", False),  # unless the worker said it could not load
    ],
)
def test_describe_exit_code(code: int, text: str, clean: bool) -> None:
    assert describe_exit(wait_status(code=code)) == (text, clean)


@pytest.mark.parametrize(
    ("sig", "text"),
    [
        (signal.SIGKILL, "was killed by SIGKILL (out of memory?)"),
        (signal.SIGTERM, "was killed by SIGTERM"),
        (signal.SIGSEGV, "was killed by SIGSEGV"),
        (signal.SIGABRT, "was killed by SIGABRT"),
        (signal.SIGUSR1, "was killed by SIGUSR1"),
    ],
)
def test_describe_exit_signal(sig: int, text: str) -> None:
    assert describe_exit(wait_status(sig=sig)) == (text, False)


def test_describe_exit_unnamed_signal() -> None:
    sig = signal.SIGRTMIN + 3  # a real-time signal has no name in signal.Signals
    how, clean = describe_exit(wait_status(sig=sig))
    assert how.startswith("was killed by")
    assert str(int(sig)) in how
    assert clean is False


# -- the control codec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"command": "status"},
        {"command": "scale", "workers": 3},
        {"ok": False, "error": "caf\u00e9 \u2603 \"quoted\"\n"},
        {},
        {"nested": {"list": [1, 2.5, None, True, "x"]}},
    ],
)
def test_codec_round_trip(message: dict[str, Any]) -> None:
    frame = encode(message)
    length = frame_length(frame, MAX_REQUEST)
    assert length == len(frame) - HEADER.size
    assert decode_body(frame[HEADER.size:]) == message


def test_frame_length_incomplete_header() -> None:
    frame = encode({"command": "status"})
    for n in range(HEADER.size):
        assert frame_length(frame[:n], MAX_REQUEST) is None
    assert frame_length(bytearray(frame[: HEADER.size]), MAX_REQUEST) == len(frame) - HEADER.size


def test_frame_length_limit() -> None:
    assert frame_length(HEADER.pack(MAX_REQUEST), MAX_REQUEST) == MAX_REQUEST
    assert frame_length(HEADER.pack(0), MAX_REQUEST) == 0
    for length in (MAX_REQUEST + 1, 0xFFFFFFFF, 0x47455420):  # the last one is b"GET "
        with pytest.raises(ProtocolError, match=f"frame of {length} bytes is over the {MAX_REQUEST}-byte limit"):
            frame_length(HEADER.pack(length), MAX_REQUEST)
    with pytest.raises(ProtocolError):
        frame_length(b"GET / HTTP/1.1\r\n", MAX_REQUEST)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "not UTF-8 JSON"),
        (b"hello", "not UTF-8 JSON"),
        (b"{'command': 'status'}", "not UTF-8 JSON"),
        (b'{"command": "status"', "not UTF-8 JSON"),
        (b"\xff\xfe{}", "not UTF-8 JSON"),
        (b'{"command": "\xc3"}', "not UTF-8 JSON"),
        (b"[]", "must be a JSON object"),
        (b'["status"]', "must be a JSON object"),
        (b'"status"', "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"true", "must be a JSON object"),
    ],
)
def test_decode_body_rejects(body: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        decode_body(body)


@pytest.mark.parametrize("depth", [1000, 5000, MAX_REQUEST // 2 - 1])
def test_decode_body_deep_nesting(depth: int) -> None:
    """A request fits in MAX_REQUEST bytes, yet may nest deeper than json.loads can recurse."""
    arrays = b"[" * depth + b"]" * depth
    assert len(arrays) <= MAX_REQUEST
    with pytest.raises(ProtocolError):
        decode_body(arrays)
    objects = b'{"a":' * (depth // 8) + b"1" + b"}" * (depth // 8)
    assert len(objects) <= MAX_REQUEST
    try:
        message = decode_body(objects)
    except ProtocolError:
        return
    assert isinstance(message, dict)


@PROPERTY
@given(st.binary(max_size=64))
def test_codec_arbitrary_bytes(data: bytes) -> None:
    """Whatever a client sends, the codec returns or raises ProtocolError: nothing else."""
    try:
        length = frame_length(data, 16)
    except ProtocolError:
        pass
    else:
        assert length is None or 0 <= length <= 16
        assert (length is None) == (len(data) < HEADER.size)
    try:
        message = decode_body(data)
    except ProtocolError:
        return
    assert isinstance(message, dict)


@PROPERTY
@given(st.text(alphabet="[]{}\":,0123456789 \\u", max_size=64).map(str.encode))
def test_codec_json_like_bytes(data: bytes) -> None:
    try:
        message = decode_body(data)
    except ProtocolError:
        return
    assert isinstance(message, dict)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(), JSON_VALUES, max_size=6))
def test_codec_round_trip_property(message: dict[str, Any]) -> None:
    frame = encode(message)
    assert frame_length(frame, len(frame)) == len(frame) - HEADER.size
    assert decode_body(frame[HEADER.size:]) == json.loads(json.dumps(message))


UNIX_TABLE = """Num       RefCount Protocol Flags    Type St Inode Path
0000000089675bfa: 00000002 00000000 00010000 0001 01 6914148 /run/user/0/web.sock
0000000028098a1a: 00000003 00000000 00000000 0001 03 6928464 /run/user/0/client-side.sock
0000000091c0a64c: 00000002 00000000 00010000 0002 01   339 /run/dgram.sock
000000000ad1a6f1: 00000002 00000000 00010000 0001 01 6914150 @abstract
000000000ad1a6f2: 00000003 00000000 00000000 0001 03 6914151
000000000ad1a6f3: 00000002 00000000 00010000 0001 01 6914152 /tmp/a dir/web.sock
"""


def test_unix_listeners_from_the_kernels_table() -> None:
    from prefork.config import unix_listeners

    assert unix_listeners(UNIX_TABLE) == ["/run/user/0/web.sock", "/tmp/a dir/web.sock"]
    assert unix_listeners("") == []


def test_listening_control_sockets_are_ours_and_named_so(tmp_path: Path) -> None:
    import socket

    from prefork.config import listening_control_sockets

    paths = [tmp_path / "web.sock", tmp_path / "other.sock"]
    servers = []
    for path in paths:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)
    table = "header\n" + "".join(f"0: 00000002 00000000 00010000 0001 01 1 {p}\n" for p in [*paths, "/gone/web.sock"])
    (tmp_path / "unix").write_text(table)
    try:
        assert listening_control_sockets("web", str(tmp_path / "unix")) == [str(paths[0])]
        assert listening_control_sockets("nope", str(tmp_path / "unix")) == []
        assert listening_control_sockets("web", str(tmp_path / "missing")) == []
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize(("relay", "bind", "refused"), [
    ("127.0.0.1:20000", "127.0.0.1:20000", True),
    ("localhost:20000", "127.0.0.1:20000", True),  # the same address by name
    ("127.0.0.1:20000", "0.0.0.0:20000", True),  # a wildcard listener is every local address
    ("127.0.0.1:20001", "127.0.0.1:20000", False),
    ("192.0.2.7:20000", "0.0.0.0:20000", False),  # another host's port 20000
    ("127.0.0.1:20000", "unix:/run/x.sock", False),
])
def test_relay_to_its_own_listener_is_refused(relay: str, bind: str, refused: bool) -> None:
    if not refused:
        assert build_config({"relay": [relay], "bind": [bind]}).relay == (relay,)
        return
    with pytest.raises(ConfigError, match=rf"relay: {relay} is this instance's own listener {bind}: it would "
                                          "relay to itself"):
        build_config({"relay": [relay], "bind": [bind]})
