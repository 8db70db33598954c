"""Two services over mutual TLS, each authenticated by its SPIFFE ID, on loopback.

    .venv/bin/python examples/mtls.py

At start the script makes a throw-away PKI in a temporary directory with ``cryptography`` (a runtime dependency
of meshlib, so nothing else is needed): one CA for the trust domain ``spiffe://example.org`` and an X.509-SVID
(a certificate whose one URI SAN is a SPIFFE ID) for each workload:

* ``payments``  -- ``spiffe://example.org/ns/shop/sa/payments``, a server;
* ``users``     -- ``spiffe://example.org/ns/shop/sa/users``, a server;
* ``frontend``  -- ``spiffe://example.org/ns/shop/sa/frontend``, the client.

The two servers are :class:`meshlib.testing.Backend` instances serving HTTPS that *require* a client
certificate signed by the CA (mutual TLS). The client is a ``meshlib.httpx.Client`` configured as a deployment would
configure it, with ``MESHLIB_*`` variables (passed as ``environ=`` here so the example does not depend on your
shell)::

    MESHLIB_TLS_CA_FILE=ca.pem  MESHLIB_TLS_CERT_FILE=frontend.pem  MESHLIB_TLS_KEY_FILE=frontend.key
    MESHLIB_SERVICE_PAYMENTS=static://127.0.0.1:<port>
    MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_ID=spiffe://example.org/ns/shop/sa/payments   # exactly this workload

and, for ``users``, in code: ``ServiceConfig(tls=TLSSettings(..., server_id="spiffe://example.org"))``, which
accepts any workload of the trust domain. The SPIFFE check replaces the host-name check (the certificates carry
no DNS name) and runs inside the TLS handshake. The script prints who answered each call, the identity the
server presented, and the identity the server saw for the caller.

Then a second client expects ``payments`` to be ``.../sa/billing``: the handshake fails with
``httpx.ConnectError`` (a :class:`meshlib.IdentityError` on its chain) and ``payments`` receives no request.
"""

from __future__ import annotations

import argparse
import datetime
import ssl
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import meshlib
from meshlib.testing import Backend

TRUST_DOMAIN = "spiffe://example.org"
PAYMENTS_ID = f"{TRUST_DOMAIN}/ns/shop/sa/payments"
USERS_ID = f"{TRUST_DOMAIN}/ns/shop/sa/users"
FRONTEND_ID = f"{TRUST_DOMAIN}/ns/shop/sa/frontend"
WRONG_ID = f"{TRUST_DOMAIN}/ns/shop/sa/billing"


# -- a throw-away PKI (what SPIRE, cert-manager or Istio would hand a workload) ------------------------------------


@dataclass(frozen=True)
class Files:
    """PEM files of one workload: its certificate and key."""

    cert: Path
    key: Path


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class CertificateAuthority:
    """A self-signed CA for one SPIFFE trust domain; issues leaf X.509-SVIDs (EC P-256, valid one day)."""

    def __init__(self, trust_domain: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} example CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(ca=True), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def write(self, path: Path) -> Path:
        """The CA certificate as a PEM bundle: what clients and servers trust."""
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, spiffe_id: str, directory: Path, name: str) -> Files:
        """An X.509-SVID for ``spiffe_id``: exactly one URI SAN, no DNS name, not a CA; written as PEM files."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            # SPIFFE: a SAN extension holding only a URI is marked critical (the subject says nothing useful).
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        files = Files(directory / f"{name}.pem", directory / f"{name}.key")
        files.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        files.key.chmod(0o600)
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return files


def server_context(files: Files, ca_file: Path) -> ssl.SSLContext:
    """A server context presenting ``files`` and requiring a client certificate the CA signed (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=ca_file)
    return context


# -- what each side saw -----------------------------------------------------------------------------------------


def server_identity(response: httpx.Response) -> str:
    """The SPIFFE ID in the certificate the server presented on the connection this response came over.

    meshlib already checked it during the handshake; this reads it back (httpcore's ``network_stream``
    extension) so the example can print it.
    """
    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    der = ssl_object.getpeercert(True)
    return _uri_san(x509.load_der_x509_certificate(der))


def _uri_san(cert: x509.Certificate) -> str:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = sans.get_values_for_type(x509.UniformResourceIdentifier)
    return str(uri)


def client_identity(peercert: Mapping[str, Any] | None) -> str:
    """The caller's SPIFFE ID as the server's TLS layer verified it (``SSLSocket.getpeercert()`` form)."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        if kind == "URI":
            return str(value)
    return "(no client certificate)"


@dataclass(frozen=True)
class Answer:
    """One call that succeeded: which backend answered, at which address, and both identities."""

    url: str
    backend: str
    endpoint: str
    server_id: str
    client_id: str


@dataclass(frozen=True)
class Refusal:
    """The call whose expected identity did not match."""

    error: str
    expected: str
    presented: str
    requests_received: int


# -- the run ----------------------------------------------------------------------------------------------------


def call(client: httpx.Client, url: str, backend: Backend) -> Answer:
    """GET ``url`` through the mesh and collect what the client and the server each saw."""
    response = client.get(url)
    response.raise_for_status()
    seen = backend.requests[-1]
    answer = Answer(
        url=url,
        backend=response.json()["backend"],
        endpoint=response.extensions["meshlib.endpoint"],
        server_id=server_identity(response),
        client_id=client_identity(seen.peercert),
    )
    print(
        f"GET {url} -> answered by {answer.backend} at {answer.endpoint}\n"
        f"    server presented {answer.server_id}; it saw the caller as {answer.client_id}"
    )
    return answer


def run(directory: Path) -> tuple[list[Answer], Refusal]:
    """Make the PKI in ``directory``, start both servers, call each over mTLS, then show a mismatch fail."""
    authority = CertificateAuthority(TRUST_DOMAIN)
    ca_file = authority.write(directory / "ca.pem")
    payments_files = authority.issue(PAYMENTS_ID, directory, "payments")
    users_files = authority.issue(USERS_ID, directory, "users")
    frontend = authority.issue(FRONTEND_ID, directory, "frontend")

    payments = Backend("payments-1", ssl_context=server_context(payments_files, ca_file))
    users = Backend("users-1", ssl_context=server_context(users_files, ca_file))
    with payments, users:
        environ = {
            # Mesh-wide: the trust bundle and this workload's own SVID, sent when a server asks (mTLS).
            "MESHLIB_TLS_CA_FILE": str(ca_file),
            "MESHLIB_TLS_CERT_FILE": str(frontend.cert),
            "MESHLIB_TLS_KEY_FILE": str(frontend.key),
            # payments must be exactly this workload.
            "MESHLIB_SERVICE_PAYMENTS": f"static://{payments.address}",
            "MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_ID": PAYMENTS_ID,
        }
        # users in code: any workload of the trust domain (TLSSettings are a service's complete TLS settings).
        users_tls = meshlib.TLSSettings(
            ca_file=str(ca_file), cert_file=str(frontend.cert), key_file=str(frontend.key), server_id=TRUST_DOMAIN
        )
        services = {"users": meshlib.ServiceConfig("users", f"static://{users.address}", tls=users_tls)}
        with meshlib.httpx.Client(environ=environ, services=services) as client:
            answers = [
                call(client, "https://payments/charge", payments),
                call(client, "https://users/users/7", users),
            ]

        # The same client configuration, except that payments is expected to be another workload.
        wrong = {**environ, "MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_ID": WRONG_ID}
        before = payments.count
        with meshlib.httpx.Client(environ=wrong) as client:
            try:
                client.get("https://payments/charge")
            except httpx.ConnectError as exc:
                identity_error = meshlib.find_identity_error(exc)
                if identity_error is None:
                    raise  # some other connection failure: not what this example shows
                refusal = Refusal(
                    error=type(exc).__name__,
                    expected=identity_error.expected,
                    presented=identity_error.presented,
                    requests_received=payments.count - before,
                )
            else:
                raise AssertionError(f"payments was accepted although {WRONG_ID} was expected")
        print(
            f"GET https://payments/charge expecting {refusal.expected} -> {refusal.error}: "
            f"presented {refusal.presented}\n"
            f"    requests payments received from that client: {refusal.requests_received} "
            "(the check runs inside the TLS handshake, before any request byte is sent)"
        )
    return answers, refusal


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; exit 0 when both calls were mutually authenticated and the mismatch was refused unsent."""
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None).parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshlib-mtls-") as directory:
        answers, refusal = run(Path(directory))
    ok = (
        [a.server_id for a in answers] == [PAYMENTS_ID, USERS_ID]
        and all(a.client_id == FRONTEND_ID for a in answers)
        and refusal.presented == PAYMENTS_ID
        and refusal.requests_received == 0
    )
    print("mutual TLS with SPIFFE IDs: OK" if ok else "mutual TLS with SPIFFE IDs: UNEXPECTED RESULT")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
