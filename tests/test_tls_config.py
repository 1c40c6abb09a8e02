"""The TLS settings as the loader reads them: which listener speaks TLS with what, and every mistake in one line."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tlsutil import Pki

from conftest import child_env
from prefork import tls
from prefork.config import ConfigError, build_config, parse_sni


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_certfile_makes_every_bind_address_tls() -> None:
    config = build_config({"bind": ["127.0.0.1:1", "127.0.0.1:2"], "certfile": "c.pem", "keyfile": "k.pem"})
    options = config.tls_for("127.0.0.1:1")
    assert options is not None and options.certfile.endswith("/c.pem") and options.keyfile.endswith("/k.pem")
    assert config.tls_for("127.0.0.1:2") == options
    assert config.tls_for("systemd:web") == options  # a socket systemd passed speaks TLS as well


def test_tls_bind_adds_tls_addresses_beside_plain_ones() -> None:
    config = build_config({"bind": ["127.0.0.1:1"], "tls_bind": ["127.0.0.1:2"], "certfile": "/c.pem"})
    assert config.binds == ("127.0.0.1:1", "127.0.0.1:2")
    assert config.tls_for("127.0.0.1:1") is None and config.tls_for("127.0.0.1:2") is not None
    assert config.tls_for("systemd:web") is None
    # without --bind, only the TLS address: no default plain one beside it
    assert build_config({"tls_bind": ["127.0.0.1:2"], "certfile": "/c.pem"}).binds == ("127.0.0.1:2",)


def test_no_tls_settings_no_tls() -> None:
    config = build_config({})
    assert config.listener_tls == () and config.tls_for(config.binds[0]) is None


def test_listener_tables_override_per_address(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", """
certfile = "/etc/tls/default.pem"
alpn = ["h2"]
[[listener]]
bind = "127.0.0.1:1"
[[listener]]
bind = "127.0.0.1:2"
certfile = "/etc/tls/other.pem"
cert-reqs = "required"
ca-certs = "/etc/tls/ca.pem"
alpn = "echo/1"
[[listener]]
bind = "127.0.0.1:3"
tls = false
""")
    config = build_config({}, path)
    assert config.binds == ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    first, second = config.tls_for("127.0.0.1:1"), config.tls_for("127.0.0.1:2")
    assert first is not None and first.certfile == "/etc/tls/default.pem" and first.alpn == ("h2",)
    assert second is not None and second.certfile == "/etc/tls/other.pem" and second.cert_reqs == "required"
    assert second.alpn == ("echo/1",)
    assert config.tls_for("127.0.0.1:3") is None


@pytest.mark.parametrize(("text", "message"), [
    ("[[listener]]\ncertfile = '/x.pem'\n", "needs bind"),
    ("[[listener]]\nbind = '127.0.0.1:1'\nworkers = 3\n", "unknown setting 'workers'"),
    ("[[listener]]\nbind = '127.0.0.1:1'\ntls = 'yes'\n", "tls: expected true or false"),
    ("[[listener]]\nbind = '127.0.0.1:1'\ntls = true\n", "tls = true needs a certfile"),
    ("[[listener]]\nbind = '127.0.0.1:1'\ncertfile = '/x.pem'\ncert-reqs = 'always'\n", "cert-reqs"),
    ("[[listener]]\nbind = '127.0.0.1:1'\ncertfile = 7\n", "certfile: expected str"),
    ("listener = 'x'\n", "expected [[listener]] tables"),
    ("bind = ['127.0.0.1:1']\n[[listener]]\nbind = '127.0.0.1:1'\n", "the same address is given twice"),
])
def test_listener_table_mistakes(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        build_config({}, write(tmp_path / "c.toml", text))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("settings", "message"), [
    ({"certfile": "/c.pem", "cert_reqs": "maybe"}, "cert-reqs: 'maybe' is not one of none, optional, required"),
    ({"certfile": "/c.pem", "tls_min_version": "1.1"}, "tls-min-version: '1.1'"),
    ({"certfile": "/c.pem", "cert_reqs": "optional"}, "needs --ca-certs"),
    ({"certfile": "/c.pem", "tls_handshake_timeout": 0}, "tls-handshake-timeout"),
    ({"certfile": "/c.pem", "alpn": ["x" * 300]}, "alpn"),
    ({"keyfile": "/k.pem"}, "keyfile: needs --certfile"),
    ({"sni": ["a.example=/a.pem"]}, "sni: needs --certfile"),
    ({"certfile": "/c.pem", "sni": ["a.example"]}, "must look like SERVERNAME=CERTFILE"),
    ({"relay_tls": True}, "relay-tls: needs --relay"),
    ({"relay": ["127.0.0.1:1"], "relay_ca_certs": "/ca.pem"}, "relay-ca-certs: needs --relay-tls"),
    ({"relay": ["127.0.0.1:1"], "relay_tls": True, "relay_keyfile": "/k.pem"}, "relay-keyfile: needs"),
    ({"relay": ["127.0.0.1:1"], "relay_tls": True, "relay_sni": "bad name"}, "relay-sni"),
])
def test_tls_setting_mistakes(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config(settings)


def test_sni_values() -> None:
    assert parse_sni("API.example=/a.pem,/a.key") == ("api.example", "/a.pem", "/a.key")
    assert parse_sni("*.example=/w.pem")[0] == "*.example"
    for bad in ("=/a.pem", "a.example=", "a b=/x.pem", "*.*.example=/x.pem"):
        with pytest.raises(ConfigError):
            parse_sni(bad)


def test_load_builds_one_context_per_distinct_setting(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    server = pki.server()
    config = build_config({"bind": ["127.0.0.1:1", "127.0.0.1:2"], "certfile": str(server.cert),
                           "keyfile": str(server.key), "alpn": ["h2"]})
    setup = tls.load(config)
    first, second = setup.for_listener("127.0.0.1:1"), setup.for_listener("127.0.0.1:2")
    assert first is not None and first is second  # one session-ticket key for both
    assert first.context.minimum_version == ssl.TLSVersion.TLSv1_2
    (cert,) = first.certs
    assert cert.subject == server.subject and cert.issuer == "CN=test-ca"
    assert setup.relay is None


def test_relay_context_verifies_its_upstreams(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    client = pki.client()
    config = build_config({"relay": ["127.0.0.1:1"], "relay_tls": True, "relay_ca_certs": str(pki.ca.cert),
                           "relay_certfile": str(client.cert), "relay_keyfile": str(client.key)})
    context = tls.load(config).relay
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    mismatched = build_config({"relay": ["127.0.0.1:1"], "relay_tls": True, "relay_certfile": str(client.cert),
                               "relay_keyfile": str(pki.server().key)})
    with pytest.raises(tls.TlsError, match=r"relay-certfile .* do not match"):
        tls.load(mismatched)


def test_check_config_loads_the_certificates(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    expired = pki.server("old", days=1, not_before_days=-3)
    proc = subprocess.run([sys.executable, "-m", "prefork", "--check-config", *expired.args()],
                          capture_output=True, text=True, timeout=30, env=child_env())
    assert proc.returncode == 2 and "expired on" in proc.stderr, proc.stderr
    good = pki.server()
    proc = subprocess.run([sys.executable, "-m", "prefork", "--check-config", *good.args()],
                          capture_output=True, text=True, timeout=30, env=child_env())
    assert proc.returncode == 0 and "configuration OK" in proc.stdout, proc.stderr
    assert "TLS on 127.0.0.1:20000: CN=localhost, O=prefork tests, expires " in proc.stdout, proc.stdout


def test_python_api_takes_the_tls_keywords(tmp_path: Path) -> None:
    from prefork.api import OptionError, make_config

    pki = Pki(tmp_path / "pki")
    server = pki.server()
    config = make_config("prefork.handlers.echo:EchoHandler", "127.0.0.1:0",
                         {"certfile": server.cert, "keyfile": server.key, "alpn": ("h2", "echo/1")})
    options = config.tls_for("127.0.0.1:0")
    assert options is not None and options.alpn == ("h2", "echo/1")
    with pytest.raises(OptionError, match="do not match"):  # checked before anything is bound
        make_config("prefork.handlers.echo:EchoHandler", "127.0.0.1:0",
                    {"certfile": server.cert, "keyfile": pki.server("other").key})


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_sni_values_are_parsed_or_refused_in_one_line(text: str) -> None:
    try:
        name, certfile, keyfile = parse_sni(text)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("sni: ")
        return
    assert name == name.lower() and "=" not in name and certfile.startswith("/")
    assert keyfile is None or keyfile.startswith("/")


@given(st.from_regex(r"(\*\.)?[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
       st.from_regex(r"/[a-z]{1,8}\.pem", fullmatch=True))
def test_sni_names_round_trip(name: str, certfile: str) -> None:
    assert parse_sni(f"{name.upper()}={certfile}") == (name, certfile, None)
