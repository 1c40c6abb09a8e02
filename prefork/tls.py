"""TLS: the contexts listeners and the relay speak it with, built from the configuration and checked.

The master builds every context (:func:`load`) when it starts and again on
each reload, before it forks a worker: a certificate that does not load, a
key that is not the certificate's, a certificate that has expired or is not
valid yet, a CA file without a certificate, an unknown cipher list, each is a
:class:`TlsError` (a :class:`~prefork.config.ConfigError`) with one line that
names the file and says what to do. At start that is exit status 2; on
reload the reload fails and the serving generation carries on with the
contexts it has. Workers inherit the contexts over ``fork``, so every worker
of a generation shares one session-ticket key and a client resumes its
session on any of them.

The handshake itself happens in the workers (see
:mod:`prefork.workers.servers` and :mod:`prefork.workers.async_worker`);
what they count of it (handshakes, versions, failures by reason) goes into
the scoreboard through :func:`count_handshake` and :func:`count_failure`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import ssl
import stat
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefork.config import Config, ConfigError, TlsOptions, cut, quote

log = logging.getLogger(__name__)

__all__ = [
    "FAILURE_REASONS",
    "CertInfo",
    "ServerTls",
    "TlsError",
    "TlsSetup",
    "close_notify",
    "count_failure",
    "count_handshake",
    "failure_reason",
    "load",
    "relay_context",
    "server_tls",
]

MAX_PASSWORD_BYTES = 4096
# Why a handshake failed, as counted per worker (scoreboard fields tls_failed_<reason>) and exported
FAILURE_REASONS = ("timeout", "not_tls", "version", "cipher", "certificate", "closed", "other")
VERSIONS = {"TLSv1.2": "tls_v12", "TLSv1.3": "tls_v13"}  # negotiated version -> its scoreboard counter


class TlsError(ConfigError):
    """A certificate, key or CA file cannot be used as configured; the message names it."""


@dataclass(frozen=True)
class CertInfo:
    """A certificate in use: for ``status`` and the expiry metric."""

    certfile: str
    subject: str  # "CN=example.com, O=Example"
    issuer: str
    not_before: float  # seconds since the epoch
    not_after: float
    server_name: str | None = None  # the SNI name it is chosen for; None: the default certificate

    def describe(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "certfile": self.certfile,
            "subject": self.subject,
            "issuer": self.issuer,
            "not_after": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.not_after)),
            "not_after_epoch": self.not_after,
            "expires_in_days": round((self.not_after - now) / 86400, 1),
            "server_name": self.server_name,
        }


@dataclass
class ServerTls:
    """A TLS listener's context (choosing among ``certs`` by SNI) and its handshake deadline."""

    context: ssl.SSLContext
    options: TlsOptions
    certs: tuple[CertInfo, ...]
    handshake_timeout: float


@dataclass
class TlsSetup:
    """Every context a configuration needs: per listening address, and the relay's towards its upstreams."""

    listeners: dict[str, ServerTls] = field(default_factory=dict)  # by --bind text
    default: ServerTls | None = None  # for listeners systemd passed, when every listener speaks TLS
    relay: ssl.SSLContext | None = None
    relay_certificate: CertInfo | None = None  # the client certificate the relay presents upstream

    def for_listener(self, spec: str) -> ServerTls | None:
        """The TLS of the listener made for ``spec`` (Listener.spec), None when it speaks plain TCP."""
        found = self.listeners.get(spec)
        if found is not None:
            return found
        if spec.startswith("systemd:"):
            return self.default
        return None

    def certificates(self) -> list[tuple[str, CertInfo]]:
        """(listener, certificate) for every certificate in use, each once per listener."""
        return [(spec, cert) for spec, tls in self.listeners.items() for cert in tls.certs]


def load(config: Config, listener_specs: list[str] | None = None) -> TlsSetup:
    """Build and check every context ``config`` asks for; raises :class:`TlsError` for the first problem.

    ``listener_specs`` are the listeners' own names (``Listener.spec``) when
    they differ from the --bind texts (sockets systemd passed).
    """
    setup = TlsSetup()
    built: dict[TlsOptions, ServerTls] = {}  # listeners with the same settings share one context
    for text, options in config.listener_tls:
        if options is None:
            continue
        if options not in built:
            built[options] = server_tls(options)
        setup.listeners[text] = built[options]
    for spec in listener_specs or []:
        if spec not in setup.listeners and (options := config.tls_for(spec)) is not None:
            if options not in built:
                built[options] = server_tls(options)
            setup.listeners[spec] = built[options]
    if config.certfile and not config.tls_bind:
        options = config.tls_options({})
        setup.default = built.get(options) or server_tls(options)
    setup.relay = relay_context(config)
    if setup.relay is not None and config.relay_certfile:
        setup.relay_certificate = certificate_info(config.relay_certfile, option="relay-certfile")
    return setup


# -- building contexts -------------------------------------------------------------------------------------


def server_tls(options: TlsOptions) -> ServerTls:
    """A server-side context for ``options``, with one context per SNI name beside the default one."""
    context, cert = _server_context(options, options.certfile, options.keyfile)
    certs = [cert]
    by_name: dict[str, ssl.SSLContext] = {}
    for name, certfile, keyfile in options.sni:
        by_name[name], named = _server_context(options, certfile, keyfile)
        certs.append(CertInfo(named.certfile, named.subject, named.issuer, named.not_before, named.not_after,
                              server_name=name))
    if by_name:
        context.sni_callback = _choose_by_name(by_name)
    return ServerTls(context, options, tuple(certs), options.tls_handshake_timeout)


def _server_context(options: TlsOptions, certfile: str, keyfile: str | None) -> tuple[ssl.SSLContext, CertInfo]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if options.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    # a client that ends with a bare FIN (no close_notify) is done sending, not an attacker: without this
    # OpenSSL 3 fails the connection, and a relay could not deliver the rest of its reply
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    if options.ciphers:
        try:
            context.set_ciphers(options.ciphers)
        except ssl.SSLError:
            raise TlsError(f"ciphers: no cipher matches {cut(options.ciphers)!r} "
                           "(an OpenSSL cipher list, e.g. ECDHE+AESGCM)") from None
    if options.alpn:
        context.set_alpn_protocols(list(options.alpn))
    if options.ca_certs:
        _load_verify(context, "ca-certs", options.ca_certs)
    context.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                           "required": ssl.CERT_REQUIRED}[options.cert_reqs]
    password = _password(options.keyfile_password_file, keyfile or certfile)
    _load_chain(context, certfile, keyfile, password, "certfile", "keyfile", options.keyfile_password_file)
    return context, certificate_info(certfile)


def relay_context(config: Config) -> ssl.SSLContext | None:
    """The client-side context the relay connects upstream with (--relay-tls); None without it."""
    if not config.relay_tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the certificate and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)  # as the server side's
    if config.relay_ca_certs:
        _load_verify(context, "relay-ca-certs", config.relay_ca_certs)
    else:
        context.load_default_certs()
    if config.relay_certfile:
        password = _password(None, config.relay_keyfile or config.relay_certfile)
        _load_chain(context, config.relay_certfile, config.relay_keyfile, password, "relay-certfile",
                    "relay-keyfile")
        certificate_info(config.relay_certfile, option="relay-certfile")
    return context


def _choose_by_name(by_name: Mapping[str, ssl.SSLContext]) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext],
                                                                         None]:
    """An ``sni_callback`` serving each named context: the exact name first, then a ``*.`` wildcard."""
    def choose(sslobj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        if not name:
            return
        name = name.lower()
        chosen = by_name.get(name)
        if chosen is None and "." in name:
            chosen = by_name.get("*." + name.split(".", 1)[1])
        if chosen is not None:
            sslobj.context = chosen
    return choose


def _readable(option: str, path: str) -> None:
    """Raise TlsError unless ``path`` is a file this process can read (load_cert_chain would not say which)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TlsError(f"{option} {path}: no such file") from None
    except PermissionError:
        raise TlsError(f"{option} {path}: permission denied (the daemon runs as uid {os.getuid()}; "
                       "make the file readable to it)") from None
    except OSError as exc:
        raise TlsError(f"{option} {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise TlsError(f"{option} {path}: is a directory")
        if not stat.S_ISREG(mode):  # OpenSSL would wait on a FIFO for a writer, freezing the master
            raise TlsError(f"{option} {path}: not a regular file (a FIFO or a device could block the daemon)")
    finally:
        os.close(fd)


def _password(password_file: str | None, keyfile: str) -> Callable[[], bytes]:
    """The passphrase callback for ``keyfile``: from ``password_file``, or one that says the key needs one.

    Always a callback: without one, OpenSSL would ask for a passphrase on the terminal.
    """
    if password_file is None:
        def missing() -> bytes:
            raise TlsError(f"keyfile {keyfile}: the key is encrypted; give its passphrase with "
                           "--keyfile-password-file")
        return missing
    _readable("keyfile-password-file", password_file)
    # non-blocking, and only a regular file: replaced by a FIFO since the check, it gives no bytes, not a hang
    fd = os.open(password_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        data = os.read(fd, MAX_PASSWORD_BYTES + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except BlockingIOError:
        data = b""
    finally:
        os.close(fd)
    if len(data) > MAX_PASSWORD_BYTES:
        raise TlsError(f"keyfile-password-file {password_file}: longer than {MAX_PASSWORD_BYTES} bytes; "
                       "is it the right file?")
    passphrase = data.rstrip(b"\r\n")
    return lambda: passphrase


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None, password: Callable[[], bytes],
                cert_option: str, key_option: str, password_file: str | None = None) -> None:
    _readable(cert_option, certfile)
    if keyfile:
        _readable(key_option, keyfile)
    try:
        context.load_cert_chain(certfile, keyfile, password=password)
    except ssl.SSLError as exc:
        if password_file is not None and exc.reason != "KEY_VALUES_MISMATCH":
            raise TlsError(f"{key_option} {keyfile or certfile}: cannot decrypt it with the passphrase in "
                           f"{password_file} (the wrong passphrase?)") from None
        raise TlsError(_chain_error(exc, certfile, keyfile, cert_option, key_option)) from None
    except OSError as exc:
        raise TlsError(f"cannot load {cert_option} {certfile}: {exc.strerror or exc}") from None


def _chain_error(exc: ssl.SSLError, certfile: str, keyfile: str | None, cert_option: str, key_option: str) -> str:
    reason = exc.reason or ""
    key = f"{key_option} {keyfile}" if keyfile else f"the key in {cert_option} {certfile}"
    if reason == "KEY_VALUES_MISMATCH":
        return (f"{cert_option} {certfile} and {key} do not match: the key is not that certificate's "
                "(was one of them renewed without the other?)")
    if exc.library == "SSL" and reason in ("CA_MD_TOO_WEAK", "EE_KEY_TOO_SMALL"):
        return f"{cert_option} {certfile}: the certificate's key or signature is too weak for OpenSSL ({reason})"
    if reason in ("NO_START_LINE", "PEM_LIB", "ASN1_LIB", "UNSUPPORTED", ""):  # "": OpenSSL's PEM lib, no reason
        if keyfile is None:
            return (f"{cert_option} {certfile}: needs the certificate and its private key in PEM "
                    f"(or give --{key_option})")
        return f"{cert_option} {certfile} / {key}: not a PEM certificate and private key ({reason})"
    return f"cannot load {cert_option} {certfile} with {key}: {reason or exc}"


def _load_verify(context: ssl.SSLContext, option: str, path: str) -> None:
    _readable(option, path)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsError(f"{option} {path}: no CA certificate in it ({exc.reason or exc})") from None
    except OSError as exc:
        raise TlsError(f"{option} {path}: {exc.strerror or exc}") from None


# -- the certificate in use --------------------------------------------------------------------------------


def certificate_info(certfile: str, *, option: str = "certfile", now: float | None = None) -> CertInfo:
    """The first certificate in ``certfile``; raises TlsError when it has expired or is not valid yet.

    An expired certificate would fail every handshake with a verifying
    client: refusing it at load time keeps the old one serving on reload.
    """
    _readable(option, certfile)  # a regular file: the decoder would wait on a FIFO
    try:
        # the ssl module's own decoder (what getpeercert() returns), for a certificate in a file
        decoded: dict[str, Any] = ssl._ssl._test_decode_cert(certfile)  # type: ignore[attr-defined]
    except (ssl.SSLError, OSError, AttributeError) as exc:
        raise TlsError(f"{option} {certfile}: cannot read a certificate from it ({exc})") from None
    subject = _name(decoded.get("subject", ()))
    info = CertInfo(certfile, subject, _name(decoded.get("issuer", ())),
                    float(ssl.cert_time_to_seconds(decoded["notBefore"])),
                    float(ssl.cert_time_to_seconds(decoded["notAfter"])))
    now = time.time() if now is None else now
    if info.not_after <= now:
        raise TlsError(f"{option} {certfile}: the certificate ({subject}) expired on "
                       f"{_date(info.not_after)}; renew it")
    if info.not_before > now:
        raise TlsError(f"{option} {certfile}: the certificate ({subject}) is not valid before "
                       f"{_date(info.not_before)}; is the clock right?")
    return info


_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "stateOrProvinceName": "ST", "localityName": "L", "emailAddress": "emailAddress"}


def _name(rdns: Any) -> str:
    return ", ".join(f"{_SHORT.get(k, k)}={v}" for rdn in rdns for k, v in rdn) or "(no subject)"


def _date(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


# -- handshakes, as workers count them ---------------------------------------------------------------------


def from_the_peer(exc: ssl.SSLError, conn: ssl.SSLSocket) -> bool:
    """Whether ``exc``, raised by a handler, came from the client's side of ``conn`` (and not from a TLS
    connection of the handler's own): OpenSSL raised it on ``conn`` itself."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_locals.get("self") is conn:
            return True
        tb = tb.tb_next
    return False


def describe_error(exc: ssl.SSLError) -> str:
    """OpenSSL's reason for ``exc`` in a few words, not its file and line."""
    if exc.reason == "CALLBACK_FAILED":  # our sni_callback cannot fail: CPython could not decode the name
        return "CALLBACK_FAILED (the server name it asked for is not ASCII)"
    if exc.reason:
        verify = getattr(exc, "verify_message", None)
        return f"{exc.reason}" + (f" ({verify})" if verify else "")
    if isinstance(exc, ssl.SSLEOFError):
        return "connection closed in the middle of a TLS record"
    text = str(exc.args[1]) if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    return re.sub(r" \(_ssl\.c:\d+\)$", "", text)


def quiet_bad_server_names() -> None:
    """Keep a client's undecodable server name (SNI) out of stderr.

    CPython decodes the name a client asks for as ASCII before our
    ``sni_callback`` runs; when it cannot, it prints the UnicodeDecodeError as
    an "Exception ignored" traceback to stderr and fails the handshake with
    CALLBACK_FAILED, which the handshake's own log line reports. Any other
    unraisable exception goes to the hook there was.
    """
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, UnicodeDecodeError) and isinstance(unraisable.object, bytes):
            log.debug("a TLS client asked for a server name that is not ASCII: %s", quote(unraisable.object))
            return
        previous(unraisable)

    sys.unraisablehook = hook


def failure_reason(exc: BaseException) -> str:
    """Which of FAILURE_REASONS a failed handshake's exception is."""
    if isinstance(exc, (TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                      "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL", "RECORD_LENGTH_MISMATCH", "BAD_PACKET_LENGTH"):
            return "not_tls"
        if reason in ("UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "VERSION_TOO_LOW",
                      "NO_PROTOCOLS_AVAILABLE"):
            return "version"
        if reason in ("NO_SHARED_CIPHER", "NO_CIPHERS_AVAILABLE", "SSLV3_ALERT_HANDSHAKE_FAILURE",
                      "NO_APPLICATION_PROTOCOL", "TLSV1_ALERT_NO_APPLICATION_PROTOCOL"):
            return "cipher"
        if "CERTIFICATE" in reason or reason.startswith(("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERT",
                                                          "TLSV13_ALERT_CERTIFICATE_REQUIRED")):
            return "certificate"
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) or reason in ("UNEXPECTED_EOF_WHILE_READING",):
            return "closed"
        return "other"
    if isinstance(exc, (ConnectionError, EOFError)) or (isinstance(exc, OSError) and exc.errno in (
            errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)):
        return "closed"
    return "other"


def count_handshake(record: Any, version: str | None) -> None:
    """A completed handshake into the worker's record: one more, and one more of its version."""
    # the version first: a reader between the two stores never sees a handshake of no known version
    field_name = VERSIONS.get(version or "")
    if field_name is not None:
        setattr(record, field_name, getattr(record, field_name) + 1)
    record.tls_handshakes += 1


def count_failure(record: Any, reason: str) -> None:
    """A failed handshake into the worker's record, by reason (one of FAILURE_REASONS)."""
    name = f"tls_failed_{reason if reason in FAILURE_REASONS else 'other'}"
    setattr(record, name, getattr(record, name) + 1)


def close_notify(sock: Any) -> None:
    """Tell a TLS peer we are done (a close_notify alert) without waiting for its own; never raises.

    Without it a careful client reads the end of the connection as a
    truncation attack ("unexpected EOF").
    """
    if not isinstance(sock, ssl.SSLSocket) or sock.fileno() < 0:
        return
    try:
        sock.setblocking(False)
        sock.unwrap()
    except (OSError, ValueError):  # SSLWantReadError: our alert is sent, the peer's is not awaited
        pass
