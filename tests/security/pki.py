"""A tiny PKI for TLS tests: CAs and leaf certificates with DNS, IP and URI (SPIFFE) SANs, made with cryptography.

trustme covers DNS/IP names but not URI SANs, validity windows of our choosing and CA-flag leaves, which
SPIFFE and expiry tests need. EC P-256 keys keep generation fast (~1 ms per certificate).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@dataclass
class Leaf:
    """A certificate and its key, as PEM."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>.crt`` and ``<name>.key`` (atomically, by rename) and return their paths."""
        cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
        replace_file(key_path, self.key_pem)
        replace_file(cert_path, self.chain_pem)
        return cert_path, key_path


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` the way rotation tools do: a temporary file renamed over the old one."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class CA:
    """A self-signed root CA (optionally a SPIFFE trust domain's, with its ``spiffe://td`` URI SAN)."""

    def __init__(self, name: str = "meshlib test CA", trust_domain: str | None = None) -> None:
        self.key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY)
            .not_valid_after(NOW + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(signing=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
        )
        if trust_domain is not None:
            uri = x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")
            builder = builder.add_extension(x509.SubjectAlternativeName([uri]), critical=False)
        self.cert = builder.sign(self.key, hashes.SHA256())

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        replace_file(path, self.cert_pem)
        return path

    def issue(
        self,
        *names: str,
        uris: tuple[str, ...] = (),
        common_name: str = "leaf",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        ca: bool = False,
        key_cert_sign: bool = False,
    ) -> Leaf:
        """A leaf for DNS names / IPs ``names`` and URI SANs ``uris``, valid yesterday..+10 days by default."""
        key = _key()
        general: list[x509.GeneralName] = []
        for name in names:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                general.append(x509.DNSName(name))
        general.extend(x509.UniformResourceIdentifier(uri) for uri in uris)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + 10 * DAY)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_key_usage(signing=key_cert_sign), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if general:
            builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=not names)
        cert = builder.sign(self.key, hashes.SHA256())
        return Leaf(cert, key, cert.public_bytes(serialization.Encoding.PEM))


def _key_usage(*, signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signing,
        crl_sign=signing,
        encipher_only=False,
        decipher_only=False,
    )


def server_context(leaf: Leaf, directory: Path, *, client_ca: CA | None = None) -> ssl.SSLContext:
    """A server context presenting ``leaf``; with ``client_ca``, client certificates it signed are required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert_path, key_path = leaf.write(directory, f"server-{leaf.cert.serial_number}")
    context.load_cert_chain(cert_path, key_path)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca.cert_pem.decode())
    return context


def common_name(peercert: dict[str, Any] | None) -> str | None:
    """The subject CN of a certificate as ``SSLSocket.getpeercert()`` returns it."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
