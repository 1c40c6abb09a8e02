"""TLS made visible: certificates in ``status``, handshake counts in ``stats``, both in Prometheus.

The shaping (sums over live and gone workers, the JSON sections, the
exposition and the text) is tested as pure functions; real daemons show the
certificate they serve, the one a reload rotated in, and the handshakes their
workers count.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from tlsutil import Issued, Pki, client_context, closed_without_answer

from conftest import Daemon, wait_for
from prefork.config import Config, TlsOptions
from prefork.ctl.commands import format_stats, format_status
from prefork.master import report
from prefork.master.state import TLS_COUNTERS, Totals
from prefork.metrics import render_prometheus
from prefork.scoreboard import Record
from prefork.tls import FAILURE_REASONS, CertInfo, ServerTls, TlsSetup

EXPIRY = "prefork_tls_certificate_expiry_timestamp_seconds"
HANDSHAKES = "prefork_tls_handshakes_total"
FAILURES = "prefork_tls_handshake_failures_total"
NOW = 1_750_000_000.0


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples called ``name`` in exposition ``text`` (parsed by prometheus_client), by sorted labels."""
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def not_after(issued: Issued) -> float:
    return x509.load_pem_x509_certificate(issued.cert.read_bytes()).not_valid_after_utc.timestamp()


# -- pure: sums, sections, exposition, text ----------------------------------------------------------------


def sample(pid: int, **tls: int) -> report.WorkerSample:
    return report.WorkerSample(pid=pid, slot=pid % 10, generation=1, state="ready", requests=0, active=0, errors=0,
                               proxy_errors=0, bytes_in=0, bytes_out=0, rss_bytes=0, cpu_percent=0.0, age_s=1.0,
                               heartbeat_age_s=0.0, tls=tls)


def snapshot(workers: list[report.WorkerSample], totals: Totals | None = None,
             tls: report.TlsView | None = None) -> report.Snapshot:
    return report.Snapshot(pid=1, name="t", generation=1, uptime_s=1.0, state="serving", drain=None,
                           worker_class="thread", event_loop=None, handler="h:H", target_workers=len(workers),
                           listeners=["127.0.0.1:8443"], control="/c", workers=workers, backoff=[],
                           totals=totals or Totals(), tls=tls or report.TlsView(), wall_time=NOW)


CERT = CertInfo("/etc/tls/site.pem", 'CN=site "one", O=Example', "CN=Example CA", NOW - 86400, NOW + 20 * 86400)
NAMED = CertInfo("/etc/tls/other.pem", "CN=other.example", "CN=Example CA", NOW - 86400, NOW + 5 * 86400,
                 server_name="other.example")
VIEW = report.TlsView((report.ListenerTls("127.0.0.1:8443", (CERT, NAMED), "optional", "1.3", ("h2",), 10.0),),
                      report.RelayTls(("db:5432",), "db.internal", "/etc/tls/ca.pem", None))


def test_stats_sum_tls_counters_over_live_and_gone_workers_and_never_go_back() -> None:
    record = Record()
    record.tls_handshakes, record.tls_v12, record.tls_v13, record.tls_failed_not_tls = 7, 2, 5, 3
    live = [sample(11, tls_handshakes=4, tls_v13=4, tls_failed_timeout=1), report.WorkerSample(
        **{**dataclasses.asdict(sample(12)), "tls": report.tls_counts(record)})]
    totals = Totals()
    totals.add_tls({"tls_handshakes": 10, "tls_v12": 1, "tls_v13": 9, "tls_failed_certificate": 2})
    before = report.stats(snapshot(live, totals, VIEW))["tls"]
    assert before == {"handshakes": 21, "versions": {"TLSv1.2": 3, "TLSv1.3": 18},
                      "failures": {"timeout": 1, "not_tls": 3, "version": 0, "cipher": 0, "certificate": 2,
                                   "closed": 0, "other": 0},
                      "failed": 6}
    # worker 12 exits: the pool folds its record into the totals; the sums stay where they were
    totals.add_tls(report.tls_counts(record))
    after = report.stats(snapshot(live[:1], totals, VIEW))["tls"]
    assert after == before
    assert set(totals.tls) == set(TLS_COUNTERS) and totals.tls["tls_failed_not_tls"] == 3


def test_versions_the_scoreboard_does_not_count_apart_are_other() -> None:
    section = report.tls_stats({"tls_handshakes": 5, "tls_v12": 1, "tls_v13": 3})
    assert section["versions"] == {"TLSv1.2": 1, "TLSv1.3": 3, "other": 1}
    assert report.tls_stats({"tls_handshakes": 4, "tls_v13": 4})["versions"] == {"TLSv1.2": 0, "TLSv1.3": 4}


def test_a_plain_daemon_has_no_tls_sections_unless_it_counted_handshakes() -> None:
    plain = snapshot([sample(11)])
    assert report.status(plain)["tls"] == {} and report.status(plain)["relay_tls"] is None
    assert "tls" not in report.stats(plain)
    assert report.stats(snapshot([sample(11)], tls=VIEW))["tls"]["handshakes"] == 0
    # a reload took TLS away: what was counted stays reported
    assert report.stats(snapshot([sample(11, tls_handshakes=2, tls_v13=2)]))["tls"]["handshakes"] == 2
    text = render_prometheus(report.status(plain), report.stats(plain))
    assert "prefork_tls" not in text


def test_status_describes_each_tls_listener_and_the_relay() -> None:
    status = report.status(snapshot([sample(11)], tls=VIEW))
    assert status["listeners"] == ["127.0.0.1:8443"]  # unchanged: a list of addresses
    listener = status["tls"]["127.0.0.1:8443"]
    assert listener["cert_reqs"] == "optional" and listener["min_version"] == "1.3" and listener["alpn"] == ["h2"]
    first, named = listener["certificates"]
    assert first == {"certfile": "/etc/tls/site.pem", "subject": 'CN=site "one", O=Example',
                     "issuer": "CN=Example CA", "not_after": "2025-07-05T15:06:40Z", "expires_in_days": 20.0,
                     "server_name": None, "not_after_epoch": NOW + 20 * 86400}
    assert named["server_name"] == "other.example" and named["expires_in_days"] == 5.0
    assert status["relay_tls"] == {"upstreams": ["db:5432"], "server_name": "db.internal",
                                   "ca_certs": "/etc/tls/ca.pem", "certfile": None, "certificate": None}


def test_tls_view_takes_each_listener_from_the_serving_setup() -> None:
    class FakeListener:
        def __init__(self, spec: str, address: str) -> None:
            self.spec, self.address = spec, address

    options = TlsOptions(certfile="/etc/tls/site.pem", keyfile=None, keyfile_password_file=None, ca_certs=None,
                         cert_reqs="none", tls_min_version="1.2", ciphers=None, alpn=(), sni=(),
                         tls_handshake_timeout=3.0)
    setup = TlsSetup(listeners={"0.0.0.0:443": ServerTls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), options,
                                                           (CERT,), 3.0)})
    listeners: list[Any] = [FakeListener("0.0.0.0:80", "0.0.0.0:80"), FakeListener("0.0.0.0:443", "0.0.0.0:443")]
    view = report.tls_view(setup, listeners, Config())
    assert view == report.TlsView((report.ListenerTls("0.0.0.0:443", (CERT,), "none", "1.2", (), 3.0),), None)


def test_prometheus_exports_expiry_handshakes_and_every_failure_reason() -> None:
    snap = snapshot([sample(11, tls_handshakes=3, tls_v12=1, tls_v13=2, tls_failed_not_tls=1)], tls=VIEW)
    text = render_prometheus(report.status(snap), report.stats(snap))
    assert f"# TYPE {EXPIRY} gauge" in text and f"# TYPE {HANDSHAKES} counter" in text
    assert samples(text, EXPIRY) == {
        (("certfile", "/etc/tls/site.pem"), ("listener", "127.0.0.1:8443"), ("server_name", ""),
         ("subject", 'CN=site "one", O=Example')): NOW + 20 * 86400,
        (("certfile", "/etc/tls/other.pem"), ("listener", "127.0.0.1:8443"), ("server_name", "other.example"),
         ("subject", "CN=other.example")): NOW + 5 * 86400,
    }
    assert samples(text, HANDSHAKES) == {(("version", "TLSv1.2"),): 1, (("version", "TLSv1.3"),): 2}
    assert samples(text, FAILURES) == {(("reason", r),): (1 if r == "not_tls" else 0) for r in FAILURE_REASONS}


def test_text_shows_certificates_and_handshake_counts() -> None:
    snap = snapshot([sample(11, tls_handshakes=3, tls_v13=3, tls_failed_timeout=2)], tls=VIEW)
    text = format_status({"ok": True, **report.status(snap)})
    assert "TLS on 127.0.0.1:8443: TLS 1.3+, client certificates optional, ALPN h2" in text
    assert ('  CN=site "one", O=Example (issued by CN=Example CA), expires 2025-07-05T15:06:40Z, in 20.0 days: '
            "/etc/tls/site.pem") in text
    assert "  for other.example: CN=other.example" in text
    assert "relay to upstreams over TLS: verifying server name db.internal against /etc/tls/ca.pem" in text
    stats = format_stats({"ok": True, **report.stats(snap)})
    assert "tls handshakes: 3 (TLSv1.2 0, TLSv1.3 3)" in stats
    assert "tls handshake failures: 2 (timeout 2)" in stats
    expired = dataclasses.replace(snap, wall_time=NOW + 21 * 86400)
    assert "EXPIRED 1.0 days ago" in format_status({"ok": True, **report.status(expired)})
    plain = snapshot([sample(11)])
    assert "TLS" not in format_status({"ok": True, **report.status(plain)})
    assert "tls" not in format_stats({"ok": True, **report.stats(plain)})


# -- real daemons --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.timeout(60)
def test_status_and_metrics_show_the_certificate_served(daemon_factory: Callable[..., Daemon],
                                                        tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    site = pki.server(days=20)
    named = pki.server("named", common_name="other.example", names=("other.example",), days=9)
    metrics_port = free_port()
    d = daemon_factory(*site.args(), "--sni", f"other.example={named.cert},{named.key}",
                       "--metrics-bind", f"127.0.0.1:{metrics_port}")
    st = d.status()
    address = f"127.0.0.1:{d.port}"
    assert st["listeners"] == [address]
    listener = st["tls"][address]
    first, second = listener["certificates"]
    assert (first["subject"], first["issuer"], first["certfile"], first["server_name"]) == (
        "CN=localhost, O=prefork tests", "CN=test-ca", str(site.cert), None)
    assert first["not_after_epoch"] == not_after(site)
    assert abs(first["expires_in_days"] - (not_after(site) - time.time()) / 86400) < 0.1  # 19 days: from yesterday
    assert (second["subject"], second["server_name"]) == ("CN=other.example, O=prefork tests", "other.example")
    assert (listener["cert_reqs"], listener["min_version"]) == ("none", "1.2")
    assert st["relay_tls"] is None

    text = d.ctl("status")
    assert text.returncode == 0, text.stderr
    assert f"TLS on {address}: TLS 1.2+, client certificates none" in text.stdout
    assert "CN=localhost, O=prefork tests (issued by CN=test-ca)" in text.stdout
    assert f"in {first['expires_in_days']:.1f} days" in text.stdout

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        exposition = resp.read().decode()
    assert samples(exposition, EXPIRY) == {
        (("certfile", str(site.cert)), ("listener", address), ("server_name", ""),
         ("subject", "CN=localhost, O=prefork tests")): not_after(site),
        (("certfile", str(named.cert)), ("listener", address), ("server_name", "other.example"),
         ("subject", "CN=other.example, O=prefork tests")): not_after(named),
    }
    assert set(samples(exposition, FAILURES)) == {(("reason", r),) for r in FAILURE_REASONS}


@pytest.mark.timeout(60)
def test_the_relays_client_certificate_is_shown_and_exported(daemon_factory: Callable[..., Daemon],
                                                             tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    client = pki.ca.issue("relay-client", "relay one", names=("relay-one",), client=True, days=12)
    metrics_port = free_port()
    d = daemon_factory("--relay", "127.0.0.1:9", "--relay-tls", "--relay-ca-certs", str(pki.ca.cert),
                       "--relay-certfile", str(client.cert), "--relay-keyfile", str(client.key),
                       "--metrics-bind", f"127.0.0.1:{metrics_port}")
    relay = d.status()["relay_tls"]
    assert relay["certfile"] == str(client.cert)
    assert relay["certificate"]["subject"] == "CN=relay one, O=prefork tests"
    assert relay["certificate"]["not_after_epoch"] == not_after(client)
    assert "CN=relay one, O=prefork tests (issued by CN=test-ca)" in d.ctl("status").stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        exposition = resp.read().decode()
    assert samples(exposition, EXPIRY) == {
        (("certfile", str(client.cert)), ("listener", "relay"), ("server_name", ""),
         ("subject", "CN=relay one, O=prefork tests")): not_after(client)}


@pytest.mark.timeout(60)
def test_a_plain_daemon_shows_no_tls(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(workers=1)
    st = d.status()
    assert st["tls"] == {} and st["relay_tls"] is None
    assert "tls" not in d.call("stats")
    text = d.ctl("status")
    assert text.returncode == 0 and "TLS" not in text.stdout
    prometheus = d.ctl("stats", "--format", "prometheus")
    assert prometheus.returncode == 0 and "prefork_connections_total" in prometheus.stdout
    assert "prefork_tls" not in prometheus.stdout


@pytest.mark.timeout(60)
def test_only_the_listeners_that_speak_tls_are_described(daemon_factory: Callable[..., Daemon],
                                                        tmp_path: Path) -> None:
    site = Pki(tmp_path / "pki").server(days=20)
    d = daemon_factory(*site.args(), "--tls-bind", "127.0.0.2:0", workers=1)
    st = d.status()
    plain, tls = st["listeners"]
    assert plain == f"127.0.0.1:{d.port}" and tls.startswith("127.0.0.2:")
    assert list(st["tls"]) == [tls]
    assert st["tls"][tls]["certificates"][0]["certfile"] == str(site.cert)
    text = d.ctl("status").stdout
    assert f"TLS on {tls}:" in text and f"TLS on {plain}" not in text


def write_config(path: Path, issued: Issued) -> None:
    path.write_text(f'certfile = "{issued.cert}"\nkeyfile = "{issued.key}"\n')


@pytest.mark.timeout(90)
def test_reload_rotates_the_certificate_status_and_metrics_show(daemon_factory: Callable[..., Daemon],
                                                                tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    old = pki.server("old", common_name="old.example", names=("localhost",), days=20)
    config = tmp_path / "prefork.toml"
    write_config(config, old)
    d = daemon_factory("-c", str(config), workers=1)
    address = f"127.0.0.1:{d.port}"

    def served(status: dict[str, Any]) -> tuple[str, str, float]:
        cert = status["tls"][address]["certificates"][0]
        return cert["subject"], cert["certfile"], cert["not_after_epoch"]

    assert served(d.status()) == ("CN=old.example, O=prefork tests", str(old.cert), not_after(old))

    # new files, named in the configuration
    new = pki.server("new", common_name="new.example", names=("localhost",), days=60)
    write_config(config, new)
    assert d.call("reload", timeout=60)["ok"] is True
    assert served(d.status()) == ("CN=new.example, O=prefork tests", str(new.cert), not_after(new))
    prometheus = d.ctl("stats", "--format", "prometheus").stdout
    assert samples(prometheus, EXPIRY) == {
        (("certfile", str(new.cert)), ("listener", address), ("server_name", ""),
         ("subject", "CN=new.example, O=prefork tests")): not_after(new)}

    # a renewal written over the same files (as certbot does)
    renewed = pki.server("new", common_name="renewed.example", names=("localhost",), days=90)
    assert d.call("reload", timeout=60)["ok"] is True
    assert served(d.status()) == ("CN=renewed.example, O=prefork tests", str(renewed.cert), not_after(renewed))

    # a reload that cannot load its certificate fails: the one serving is still the one shown
    (tmp_path / "broken.pem").write_text("not a certificate\n")
    config.write_text(f'certfile = "{tmp_path / "broken.pem"}"\nkeyfile = "{renewed.key}"\n')
    assert d.call("reload", timeout=60)["ok"] is False
    assert served(d.status()) == ("CN=renewed.example, O=prefork tests", str(renewed.cert), not_after(renewed))
    assert d.call("stats")["failed_reloads"] == 1


def tls_exchange(address: tuple[str, int], context: ssl.SSLContext, payload: bytes = b"ping\n") -> str:
    """One TLS connection: handshake, an echoed line, close; the negotiated version."""
    with socket.create_connection(address, timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = tls.recv(len(payload) - len(got))
            assert chunk, "the server closed before echoing"
            got += chunk
        assert got == payload
        version = tls.version()
        assert version is not None
        return version


@pytest.mark.timeout(90)
@pytest.mark.parametrize("worker_class", ["sync", "thread"])
def test_handshakes_by_version_and_failures_by_reason_survive_worker_recycling(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, worker_class: str) -> None:
    pki = Pki(tmp_path / "pki")
    site = pki.server(days=20)
    # one worker, recycled every 2 connections: most counts come from workers that have exited
    d = daemon_factory(*site.args(), "--worker-class", worker_class, "--max-requests", "2", workers=1)
    tls13 = client_context(pki)
    tls12 = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)
    versions = [tls_exchange(d.address(), tls13) for _ in range(4)] + [tls_exchange(d.address(), tls12)]
    assert versions == ["TLSv1.3"] * 4 + ["TLSv1.2"]
    with d.connect() as plain:  # plain text on the TLS port: closed without a byte
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert closed_without_answer(plain)

    def counted() -> dict[str, Any] | None:
        tls: dict[str, Any] = d.call("stats").get("tls", {})
        return tls if tls.get("handshakes") == 5 and tls.get("failed") == 1 else None

    tls = wait_for(counted, 10, "5 handshakes and 1 failure counted")
    assert tls["versions"] == {"TLSv1.2": 1, "TLSv1.3": 4}
    assert tls["failures"] == {r: int(r == "not_tls") for r in FAILURE_REASONS}
    assert d.call("stats")["worker_exits"] >= 1  # the sums include workers that are gone

    prometheus = d.ctl("stats", "--format", "prometheus")
    assert prometheus.returncode == 0, prometheus.stderr
    assert samples(prometheus.stdout, HANDSHAKES) == {(("version", "TLSv1.2"),): 1, (("version", "TLSv1.3"),): 4}
    assert samples(prometheus.stdout, FAILURES) == {(("reason", r),): int(r == "not_tls") for r in FAILURE_REASONS}
    text = d.ctl("stats").stdout
    assert "tls handshakes: 5 (TLSv1.2 1, TLSv1.3 4)" in text and "tls handshake failures: 1 (not_tls 1)" in text


@pytest.mark.timeout(60)
def test_startup_log_says_which_listeners_speak_tls_and_where_metrics_and_agent_listen(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    site = Pki(tmp_path / "pki").server()
    metrics_port, agent_port, plain_port = free_port(), free_port(), free_port()
    d = daemon_factory(*site.args(), "--tls-bind", "127.0.0.1:0", "--bind", f"127.0.0.1:{plain_port}",
                       "--metrics-bind", f"127.0.0.1:{metrics_port}", "--agent-bind", f"127.0.0.1:{agent_port}")
    tls_address = next(a for a in d.status()["listeners"] if a != f"127.0.0.1:{plain_port}")
    line = next(line for line in d.log().splitlines() if " master (pid " in line)
    assert " worker(s) of prefork.handlers.echo:EchoHandler (the built-in echo server: no handler given) on " in line
    assert f" on 127.0.0.1:{plain_port}, {tls_address} (TLS); control socket {d.control}; " in line, line
    assert line.endswith(f"; metrics at http://127.0.0.1:{metrics_port}/metrics (and /healthz, /readyz); "
                         f"HAProxy agent-check on 127.0.0.1:{agent_port}"), line
