"""Throwaway certificates for the TLS tests: a CA, servers, clients, and the broken ones, as PEM files.

``Pki(directory)`` makes a CA on first use; ``server(...)`` and ``client(...)``
issue certificates signed by it (or by another CA, or already expired) into
``directory``, and return the paths. Keys are EC P-256: fast to make and to
use. ``client_context``/``server_context`` build Python clients for them.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as files."""

    cert: Path
    key: Path
    subject: str

    def args(self) -> list[str]:
        """``--certfile CERT --keyfile KEY``."""
        return ["--certfile", str(self.cert), "--keyfile", str(self.key)]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    path.chmod(0o600)


class Ca:
    """A certificate authority: its certificate file and what it signs."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.subject = subject
        self.certificate = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1)).not_valid_after(_NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.cert = directory / f"{name}.pem"
        self.cert.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, common_name: str, *, names: tuple[str, ...] = (), client: bool = False,
              days: float = 30, not_before_days: float = -1, password: bytes | None = None) -> Issued:
        """A leaf certificate ``stem``.pem / ``stem``.key, valid from now + not_before_days for ``days``."""
        key = _key()
        alt: list[x509.GeneralName] = []
        for name in names or (common_name,):
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        start = _NOW + datetime.timedelta(days=not_before_days)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "prefork tests")]))
            .issuer_name(self.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256()))
        cert_path, key_path = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key, password)
        return Issued(cert_path, key_path, f"CN={common_name}, O=prefork tests")


class Pki:
    """A test's certificates, in ``directory``: one CA by default, another for "the wrong CA"."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.ca = Ca(directory, "test-ca")
        self._other: Ca | None = None

    @property
    def other_ca(self) -> Ca:
        if self._other is None:
            self._other = Ca(self.directory, "other-ca")
        return self._other

    def server(self, stem: str = "server", common_name: str = "localhost",
               names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"), **kwargs: object) -> Issued:
        return self.ca.issue(stem, common_name, names=names, **kwargs)  # type: ignore[arg-type]

    def client(self, stem: str = "client", common_name: str = "client one", *, wrong_ca: bool = False) -> Issued:
        ca = self.other_ca if wrong_ca else self.ca
        return ca.issue(stem, common_name, names=(common_name.replace(" ", "-"),), client=True)


def client_context(pki: Pki, client: Issued | None = None, *, alpn: list[str] | None = None,
                   minimum: ssl.TLSVersion | None = None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A verifying client context trusting ``pki``'s CA, presenting ``client`` when given."""
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    if alpn:
        context.set_alpn_protocols(alpn)
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


def tls_connect(address: tuple[str, int], context: ssl.SSLContext, *, name: str = "localhost",
                timeout: float = 5.0) -> ssl.SSLSocket:
    """A TLS connection to ``address``, its handshake done, asking for server ``name``."""
    raw = socket.create_connection(address, timeout=timeout)
    try:
        return context.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise


def echo(sock: socket.socket, payload: bytes = b"hello\n") -> bytes:
    """Send ``payload`` (a line) and read one line back."""
    sock.sendall(payload)
    line = bytearray()
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return bytes(line)


def closed_without_answer(sock: socket.socket) -> bool:
    """True when the peer closed the connection (EOF or, with our bytes unread, a reset) sending nothing."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
