"""Development certificates: a CA, a server certificate and client certificates per principal.

`netswap-server gen-dev-certs DIR --principal alice --principal bob` writes
ca.pem, server.pem/server.key (for localhost and 127.0.0.1) and
client-NAME.pem/client-NAME.key whose SAN URI is
spiffe://netswap.dev/principal/NAME -- the name the server takes as the
principal under mutual TLS. For development and tests; use your own PKI in
production.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "netswap.dev"


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(common_name: str = "netswap dev CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), cert, key)


def issue(
    ca: Issued,
    common_name: str,
    *,
    server: bool = False,
    principal: str | None = None,
    valid_from: datetime.datetime | None = None,
    valid_days: float = 825,
) -> Issued:
    """A leaf certificate: a server one (localhost, 127.0.0.1) or a client one naming `principal`."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    sans: list[x509.GeneralName] = []
    if server:
        sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if principal is not None:
        sans.append(x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/principal/{principal}"))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), cert, key)


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its mode otherwise
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_dev_certs(directory: Path, principals: list[str]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = make_ca()
    written = [directory / "ca.pem"]
    _write(written[0], ca.cert_pem, 0o644)
    leaves = [("server", issue(ca, "netswap server", server=True))]
    leaves += [(f"client-{p}", issue(ca, f"netswap client {p}", principal=p)) for p in principals]
    for stem, leaf in leaves:
        _write(directory / f"{stem}.pem", leaf.cert_pem, 0o644)
        _write(directory / f"{stem}.key", leaf.key_pem, 0o600)
        written += [directory / f"{stem}.pem", directory / f"{stem}.key"]
    return written
