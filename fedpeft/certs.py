"""Development and test certificates for the coordinator's gRPC link (``fedpeft certs``).

A private CA and one server certificate signed by it, with a subject alternative name for every
host name and IP address that sites dial. For a real consortium, use the hospital PKI's
certificates instead: Flower only needs the CA file (sites) and the server certificate and key
(coordinator).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.common.crypto import write_private_key
from fedpeft.common.errors import ConfigError


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path


#: Names a coordinator's certificate also carries (``fedpeft certs`` adds them): its Control API,
#: which ``coordinator add-site --config`` and ``run start`` dial on loopback, serves it too.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_pki(out: Path, names: list[str], days: int = 365) -> Pki:
    """A CA (``ca.crt``, ``ca.key``) and a server certificate (``server.pem``, ``server.key``)
    valid for ``names``, in ``out``. Refuses to overwrite existing files."""
    if not names:
        raise ConfigError("certs: give at least one host name or IP address that sites dial")
    out.mkdir(parents=True, exist_ok=True)
    files = [out / n for n in ("ca.crt", "ca.key", "server.pem", "server.key")]
    existing = [str(f) for f in files if f.exists()]
    if existing:
        raise ConfigError(f"certs: {', '.join(existing)} exist; choose another --out")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fedpeft development CA"))
        .issuer_name(_name("fedpeft development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    ca_cert, ca_key_path, server_cert, server_key_path = files
    ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_private_key(ca_key_path, ca_key, serialization.PrivateFormat.PKCS8)
    server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_private_key(server_key_path, server_key, serialization.PrivateFormat.PKCS8)
    return Pki(ca_cert, server_cert, server_key_path)
