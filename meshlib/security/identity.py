"""SPIFFE identities: what a peer must present, and the check that runs inside the TLS handshake.

A SPIFFE ID is ``spiffe://<trust domain>/<path>`` (SPIFFE-ID spec); an X.509-SVID carries it as the one and
only URI SAN of a leaf certificate (X509-SVID spec, sections 2 and 5.2). meshlib accepts as *expected*
identity either a full ID (``spiffe://prod.example/ns/pay/sa/payments``: only that workload) or a bare trust
domain (``spiffe://prod.example``: any workload whose SVID the trust domain's CA signed).

Why inside the handshake: the check must fail the call before any request byte leaves the process. httpcore
wraps sync sockets with ``SSLContext.wrap_socket`` (so :attr:`ssl.SSLContext.sslsocket_class`) and anyio, for
async clients, with ``SSLContext.wrap_bio`` (so :attr:`ssl.SSLContext.sslobject_class`); both call
``do_handshake()`` until it completes. :class:`IdentityContext` plugs in socket and object classes whose
``do_handshake()`` checks the peer's leaf certificate right after OpenSSL finished (chain already verified
against the configured CA) and raises :class:`IdentityError`, an :class:`ssl.SSLCertVerificationError`.
httpcore maps it like any certificate failure, so the caller sees :class:`httpx.ConnectError` (message: what
was expected and what was presented), which meshlib classifies as a connect error: never sent.

The check parses the DER certificate with ``cryptography``, imported when a context is built (client
construction), never for the first time on the request path.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from types import ModuleType

from meshlib.errors import MeshError

SPIFFE_SCHEME = "spiffe://"
#: SPIFFE-ID spec 2.3: implementations must support IDs up to 2048 bytes (and need not accept longer ones).
MAX_ID_LENGTH = 2048
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
#: Presented values are quoted in errors and logs: bound what a hostile certificate can make us print.
_QUOTE_LIMIT = 200

__all__ = [
    "ExpectedIdentity",
    "IdentityContext",
    "IdentityError",
    "SpiffeId",
    "check_peer_certificate",
    "find_identity_error",
]


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A syntactically valid SPIFFE ID: ``trust_domain`` and ``path`` (``""`` or ``/seg/seg``)."""

    trust_domain: str
    path: str = ""

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``value`` by the SPIFFE-ID spec's rules (those of go-spiffe's ``spiffeid.FromString``).

        Lower-case ``spiffe://`` scheme; a non-empty trust domain of ``a-z 0-9 . - _`` (so no user info, port,
        upper case or percent-encoding); path segments of ``A-Z a-z 0-9 . - _``, none empty, ``.`` or ``..``,
        no trailing ``/``; no query or fragment; at most 2048 bytes. Raises :class:`ValueError` saying why.
        """
        if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_LENGTH:
            raise ValueError(f"longer than {MAX_ID_LENGTH} bytes")
        if not value.startswith(SPIFFE_SCHEME):
            scheme = value.split("://", 1)[0] if "://" in value else ""
            raise ValueError(f"scheme is {scheme!r}, not 'spiffe'" if scheme else "does not start with spiffe://")
        rest = value[len(SPIFFE_SCHEME) :]
        trust_domain, slash, path = rest.partition("/")
        if not trust_domain:
            raise ValueError("the trust domain is empty")
        if not _TRUST_DOMAIN.fullmatch(trust_domain):
            raise ValueError(
                f"trust domain {trust_domain!r} may only contain lower-case letters, digits, '.', '-' and '_'"
            )
        if not slash:
            return cls(trust_domain)
        for segment in path.split("/"):
            if not segment:
                raise ValueError("the path has an empty segment or a trailing '/'")
            if segment in (".", ".."):
                raise ValueError("the path has a '.' or '..' segment")
            if not _SEGMENT.fullmatch(segment):
                raise ValueError(f"path segment {segment!r} may only contain letters, digits, '.', '-' and '_'")
        return cls(trust_domain, "/" + path)

    def __str__(self) -> str:
        return f"{SPIFFE_SCHEME}{self.trust_domain}{self.path}"


@dataclass(frozen=True, slots=True)
class ExpectedIdentity:
    """The identity a server must present: one SPIFFE ID, or (no path) any workload of one trust domain."""

    spiffe_id: SpiffeId

    @classmethod
    def parse(cls, value: str) -> ExpectedIdentity:
        """``spiffe://td/path`` or ``spiffe://td``; :class:`ValueError` (with the reason) when malformed."""
        return cls(SpiffeId.parse(value.strip()))

    @property
    def trust_domain_only(self) -> bool:
        """Whether any workload of the trust domain is accepted (the expected value had no path)."""
        return not self.spiffe_id.path

    def matches(self, presented: SpiffeId) -> bool:
        """Whether a (leaf) SPIFFE ID is acceptable."""
        if self.trust_domain_only:
            return presented.trust_domain == self.spiffe_id.trust_domain
        return presented == self.spiffe_id

    def __str__(self) -> str:
        if self.trust_domain_only:
            return f"any SPIFFE ID of trust domain {self.spiffe_id}"
        return str(self.spiffe_id)


class IdentityError(ssl.SSLCertVerificationError, MeshError):
    """The server's certificate is a valid certificate of the trusted CA, but not the expected SPIFFE identity.

    Raised inside the TLS handshake, before any request byte is sent. httpx reports it as
    :class:`httpx.ConnectError` (same message); the original is on the chain (``exc.__cause__.__context__``),
    :func:`find_identity_error` finds it. ``expected`` and ``presented`` are printable descriptions;
    ``server_name`` is the TLS server name the connection was made for.
    """

    def __init__(self, expected: str, presented: str, server_name: str | None = None) -> None:
        target = f" of {server_name}" if server_name else ""
        message = f"TLS peer identity{target} rejected: expected {expected}, presented {presented}"
        super().__init__(1, message)
        self.expected = expected
        self.presented = presented
        self.server_name = server_name
        # The attributes OpenSSL's own verification errors carry, for code that logs them.
        self.verify_code = 0
        self.verify_message = message
        self.library = "meshlib"
        self.reason = "SPIFFE_ID_MISMATCH"

    def __str__(self) -> str:
        return self.verify_message

    def __reduce__(self) -> tuple[type[IdentityError], tuple[str, str, str | None]]:
        return (type(self), (self.expected, self.presented, self.server_name))


def find_identity_error(exc: BaseException | None) -> IdentityError | None:
    """The :class:`IdentityError` behind an exception (an ``httpx.ConnectError``), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, IdentityError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def load_x509() -> ModuleType:
    """``cryptography.x509``; :class:`ImportError` with how to install it when missing."""
    try:
        from cryptography import x509
    except ImportError as error:  # pragma: no cover - cryptography is installed with meshlib's TLS support
        raise ImportError("SPIFFE identity checks need the 'cryptography' package: pip install cryptography") from error
    return x509


def _quote(value: str) -> str:
    return repr(value if len(value) <= _QUOTE_LIMIT else value[:_QUOTE_LIMIT] + "...")


def presented_identity(der: bytes | None) -> tuple[SpiffeId | None, str]:
    """The leaf SVID's SPIFFE ID, or ``None`` and why the certificate is not a usable leaf X.509-SVID.

    The second item describes what was presented, for error messages. Applies X509-SVID section 5.2: exactly
    one URI SAN, scheme ``spiffe``, a valid ID with a non-root path, ``cA`` false, neither ``keyCertSign``
    nor ``cRLSign``.
    """
    if not der:
        return None, "no certificate"
    x509 = load_x509()
    try:
        cert = x509.load_der_x509_certificate(der)
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris: list[str] = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        try:
            is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        except x509.ExtensionNotFound:
            is_ca = False
        try:
            usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            signs = bool(usage.key_cert_sign or usage.crl_sign)
        except x509.ExtensionNotFound:
            signs = False
    except ValueError as error:  # malformed extensions: cryptography refuses the certificate
        return None, f"a certificate meshlib cannot parse ({error})"
    if not uris:
        return None, "a certificate without a URI SAN (not an X.509-SVID)"
    if len(uris) > 1:
        listed = ", ".join(_quote(uri) for uri in uris[:3])
        return None, f"a certificate with {len(uris)} URI SANs ({listed}); an X.509-SVID has exactly one"
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except ValueError as error:
        return None, f"URI SAN {_quote(uris[0])}, not a valid SPIFFE ID ({error})"
    if not spiffe_id.path:
        return None, f"{spiffe_id}, a trust domain ID without a workload path (not a leaf SVID)"
    if is_ca or signs:
        return None, f"{spiffe_id} in a CA/signing certificate, which must not authenticate a workload"
    return spiffe_id, str(spiffe_id)


def check_peer_certificate(expected: ExpectedIdentity, der: bytes | None, server_name: str | None = None) -> None:
    """Raise :class:`IdentityError` unless ``der`` is a leaf X.509-SVID whose ID ``expected`` accepts."""
    spiffe_id, presented = presented_identity(der)
    if spiffe_id is None or not expected.matches(spiffe_id):
        raise IdentityError(str(expected), presented, server_name)


class _CheckedSocket(ssl.SSLSocket):
    """Sync TLS socket (httpcore: ``wrap_socket``) that checks the peer's SPIFFE ID once the handshake is done."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)  # raises SSLWantRead/Write on non-blocking sockets until complete
        _check(self.context, self.getpeercert(binary_form=True), self.server_hostname)


class _CheckedObject(ssl.SSLObject):
    """Memory-BIO TLS object (anyio, asyncio's sslproto: ``wrap_bio``) with the same check as the socket."""

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the handshake completed
        _check(self.context, self.getpeercert(binary_form=True), self.server_hostname)


def _check(context: ssl.SSLContext, der: bytes | None, server_name: str | None) -> None:
    expected = getattr(context, "expected_identity", None)
    if expected is not None:
        check_peer_certificate(expected, der, server_name)


class IdentityContext(ssl.SSLContext):
    """A client :class:`ssl.SSLContext` whose connections also require ``expected_identity`` of the server.

    Build it as any context (``IdentityContext(ssl.PROTOCOL_TLS_CLIENT)``), configure trust, then set
    :attr:`expected_identity`. Chain verification stays OpenSSL's (``CERT_REQUIRED``); the SPIFFE check
    replaces the host-name check, since SVIDs identify workloads, not DNS names (as go-spiffe and Envoy do).
    """

    sslsocket_class = _CheckedSocket
    sslobject_class = _CheckedObject
    expected_identity: ExpectedIdentity | None = None
