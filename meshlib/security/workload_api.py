"""X.509-SVIDs and trust bundles from the SPIFFE Workload API (SPIRE's agent), rotated without a restart.

With ``SPIFFE_ENDPOINT_SOCKET`` set (``unix:///run/spire/agent.sock``), :class:`WorkloadAPISource` opens the
Workload API's ``FetchX509SVID`` stream through the ``spiffe`` package (py-spiffe, the ``meshlib[spiffe]``
extra, imported only here) and turns each message into whole new SSL contexts:

* :meth:`WorkloadAPISource.client_context` -- for calling a service: presents the SVID as the client
  certificate, verifies the server's chain against the trust bundle and requires the server's SPIFFE ID (or
  trust domain) instead of a host name (:class:`~meshlib.security.identity.IdentityContext`);
* :meth:`WorkloadAPISource.server_context` -- for serving: presents the SVID and requires a client certificate
  that chains to the bundle (which caller may do what is the inbound authorization's decision, made on the
  verified peer SPIFFE ID).

Both are :class:`~meshlib.security.tls.ReloadingContext` fronts, the ones file rotation uses: an update from the
Workload API (a new SVID, a changed bundle) builds new inner contexts on py-spiffe's stream thread and swaps
each in with :meth:`~meshlib.security.tls.ReloadingContext.swap` (one reference assignment). New connections
use the new SVID; open connections keep theirs; no connection sees a new certificate with an old key. An update
that cannot be used is logged (ERROR) and the last good contexts stay: never fail open.

**Trust.** By default only the bundle of the SVID's own trust domain is trusted. OpenSSL cannot tie a CA to
the trust domain it signs for, so trusting federated bundles as well (``trust_federated=True``) lets any
federated CA sign a certificate claiming any trust domain's ID; the client's expected SPIFFE ID still has to
match, and the inbound authorization should check trust domains.

**Key material on disk.** ``ssl.SSLContext.load_cert_chain`` reads only files. On Linux the chain and key go
into an anonymous in-memory file (``memfd_create``, read back through ``/proc/self/fd``): never on disk,
invisible to other processes. Elsewhere, a private temporary directory (mode 0700) holds one 0600 file for the
duration of the load, then both are removed.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import ssl
import stat
import tempfile
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from meshlib.errors import ConfigError
from meshlib.security.identity import ExpectedIdentity, IdentityContext, load_x509
from meshlib.security.tls import ReloadingContext, TLSSettings

if TYPE_CHECKING:
    from spiffe import WorkloadApiClient
    from spiffe.workloadapi.workload_api_client import StreamCancelHandler
    from spiffe.workloadapi.x509_context import X509Context

logger = logging.getLogger("meshlib.security")

#: The variable the SPIFFE Workload API standard names for the agent's socket.
ENDPOINT_VARIABLE = "SPIFFE_ENDPOINT_SOCKET"
#: How long construction waits for the first X.509-SVID. SPIRE answers at once for a registered workload; a
#: workload not (yet) registered waits (SPIRE returns PERMISSION_DENIED and the client retries), and a
#: process that cannot get its identity should fail at start, clearly, rather than serve without one.
DEFAULT_TIMEOUT = 10.0
_INSTALL = "pip install 'meshlib[spiffe]'"
_EXPECTED_ENDPOINT = "a Unix socket URI such as unix:///run/spire/agent.sock"

__all__ = ["DEFAULT_TIMEOUT", "ENDPOINT_VARIABLE", "WorkloadAPISource", "from_env"]


def from_env(environ: Mapping[str, str] | None = None, **kwargs: Any) -> WorkloadAPISource | None:
    """A started source when ``SPIFFE_ENDPOINT_SOCKET`` is set (non-empty) in ``environ``, else ``None``."""
    env = os.environ if environ is None else environ
    endpoint = env.get(ENDPOINT_VARIABLE, "").strip()
    if not endpoint:
        return None
    return WorkloadAPISource(environ={ENDPOINT_VARIABLE: endpoint}, **kwargs)


def _socket_path(variable: str, endpoint: str) -> str:
    """The filesystem path of a ``unix:`` endpoint; :class:`ConfigError` for anything else."""
    if not endpoint.startswith("unix:"):
        raise ConfigError(variable, endpoint, _EXPECTED_ENDPOINT + " (meshlib supports Unix sockets only)")
    path = endpoint[len("unix:") :]
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if not path.startswith("/") or any(c in path for c in "?#"):
        raise ConfigError(variable, endpoint, _EXPECTED_ENDPOINT + " (an absolute path, no query or fragment)")
    return path


class _Material:
    """One Workload API update, ready for contexts: PEM chain + key (one blob), PEM CAs, ID, expiry."""

    def __init__(self, context: X509Context, trust_federated: bool) -> None:
        from cryptography.hazmat.primitives import serialization

        svid = context.default_svid  # the standard's default identity: the first SVID
        pem = serialization.Encoding.PEM
        chain = b"".join(cert.public_bytes(pem) for cert in svid.cert_chain)
        key = svid.private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.cert_and_key = chain + key
        self.spiffe_id = str(svid.spiffe_id)
        self.trust_domain = svid.spiffe_id.trust_domain
        self.not_after: datetime.datetime = svid.leaf.not_valid_after_utc
        bundles = context.x509_bundle_set.bundles
        if not trust_federated:
            bundles = {bundle for bundle in bundles if bundle.trust_domain == self.trust_domain}
        cas = {cert for bundle in bundles for cert in bundle.x509_authorities}
        if not cas:
            raise ValueError(f"no trust bundle for the SVID's trust domain {self.trust_domain}")
        self.cadata = "".join(cert.public_bytes(pem).decode("ascii") for cert in cas)


def _load_cert_chain(context: ssl.SSLContext, cert_and_key: bytes) -> None:
    """``load_cert_chain`` from memory: a memfd on Linux, else a 0600 file in a private 0700 directory."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("meshlib-svid", os.MFD_CLOEXEC)
        try:
            os.write(fd, cert_and_key)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    directory = tempfile.mkdtemp(prefix="meshlib-svid-")  # mode 0700
    try:
        path = os.path.join(directory, "svid.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(cert_and_key)
        context.load_cert_chain(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _client_inner(material: _Material, expected: ExpectedIdentity) -> ssl.SSLContext:
    context = IdentityContext(ssl.PROTOCOL_TLS_CLIENT)
    context.expected_identity = expected
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # the SPIFFE ID check replaces it (an SVID names a workload, not a host)
    context.load_verify_locations(cadata=material.cadata)
    _load_cert_chain(context, material.cert_and_key)
    return context


def _server_inner(material: _Material) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=material.cadata)
    _load_cert_chain(context, material.cert_and_key)
    return context


class WorkloadAPISource:
    """The workload's X.509-SVID and trust bundles, streamed from the SPIFFE Workload API; SSL contexts from them.

    ``endpoint`` is the Workload API socket (``unix:///path``); ``None`` reads ``SPIFFE_ENDPOINT_SOCKET``
    from ``environ`` (default ``os.environ``). Construction blocks until the first SVID arrives, at most
    ``timeout`` seconds; a :class:`~meshlib.ConfigError` naming ``SPIFFE_ENDPOINT_SOCKET`` says why not (the
    ``spiffe`` extra missing, a malformed value, no socket, nothing answering, no SVID). Later updates arrive
    on py-spiffe's stream thread and are swapped into every context handed out; if the stream breaks,
    py-spiffe reconnects with backoff and the last SVID stays in use meanwhile. :meth:`close` ends the stream.
    Thread-safe; the request path only reads a context's current inner context.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        trust_federated: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        self.variable = ENDPOINT_VARIABLE if endpoint is None else "WorkloadAPISource.endpoint"
        endpoint = env.get(ENDPOINT_VARIABLE, "") if endpoint is None else endpoint
        if not endpoint.strip():
            raise ConfigError(self.variable, endpoint, _EXPECTED_ENDPOINT)
        self.endpoint = endpoint.strip()
        self.trust_federated = trust_federated
        path = _socket_path(self.variable, self.endpoint)
        try:
            from spiffe import WorkloadApiClient
        except ImportError as error:
            raise ConfigError(
                self.variable,
                self.endpoint,
                f"the spiffe package for the SPIFFE Workload API: {_INSTALL} ({error})",
            ) from None
        load_x509()
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            raise ConfigError(
                self.variable,
                self.endpoint,
                f"the Workload API socket (is the SPIRE agent running, and its socket mounted here?): "
                f"{path}: {error.strerror or error}",
            ) from None
        if not stat.S_ISSOCK(mode):
            raise ConfigError(self.variable, self.endpoint, f"the Workload API socket: {path} is not a socket")

        self._lock = threading.Lock()
        self._first = threading.Event()
        self._first_error: str | None = None
        self._material: _Material | None = None
        self._clients: dict[str, ReloadingContext] = {}
        self._server: ReloadingContext | None = None
        self._closed = False
        self._updates = 0
        self._client: WorkloadApiClient = WorkloadApiClient(self.endpoint)
        self._stream: StreamCancelHandler = self._client.stream_x509_contexts(self._on_update, self._on_error)
        if not self._first.wait(timeout) or self._material is None:
            reason = self._first_error or f"no X.509-SVID within {timeout:g} s (nothing answering on {path}?)"
            self.close()
            raise ConfigError(
                self.variable, self.endpoint, f"a Workload API that issues this workload an SVID; {reason}"
            )
        logger.info(
            "SPIFFE Workload API (%s): X.509-SVID %s, valid until %s",
            self.endpoint,
            self._material.spiffe_id,
            self._material.not_after.isoformat(),
        )

    # -- what callers use -------------------------------------------------------------------------------------

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID of the SVID in use."""
        assert self._material is not None
        return self._material.spiffe_id

    @property
    def not_after(self) -> datetime.datetime:
        """When the SVID in use expires."""
        assert self._material is not None
        return self._material.not_after

    @property
    def updates(self) -> int:
        """Workload API updates applied (1 after construction)."""
        return self._updates

    def client_context(self, server_id: str) -> ReloadingContext:
        """A client context presenting the SVID, trusting the bundle, and requiring ``server_id`` of the server.

        ``server_id`` is a SPIFFE ID (``spiffe://td/path``) or a trust domain (``spiffe://td``). One context
        per ``server_id``, shared and kept current by every later update.
        """
        try:
            expected = ExpectedIdentity.parse(server_id)
        except ValueError as error:
            raise ConfigError("server_id", server_id, f"a SPIFFE ID or trust domain ({error})") from None
        with self._lock:
            context = self._clients.get(str(expected))
            if context is None:
                assert self._material is not None
                inner = _client_inner(self._material, expected)
                context = ReloadingContext(TLSSettings(server_id=str(expected)), inner, not_after=self.not_after)
                self._clients[str(expected)] = context
            return context

    def server_context(self) -> ReloadingContext:
        """A server context presenting the SVID and requiring a client certificate that chains to the bundle."""
        with self._lock:
            if self._server is None:
                assert self._material is not None
                inner = _server_inner(self._material)
                self._server = ReloadingContext(TLSSettings(), inner, not_after=self.not_after)
            return self._server

    def close(self) -> None:
        """End the Workload API stream; contexts handed out keep the last SVID."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stream.cancel()
        self._client.close()

    def __enter__(self) -> WorkloadAPISource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- py-spiffe's stream thread ----------------------------------------------------------------------------

    def _on_update(self, update: X509Context) -> None:
        try:
            material = _Material(update, self.trust_federated)
            with self._lock:
                if self._closed:
                    return
                # Build everything first, then swap: a failure leaves every context on the last good SVID.
                clients = {key: _client_inner(material, ExpectedIdentity.parse(key)) for key in self._clients}
                server = _server_inner(material) if self._server is not None else None
                for key, inner in clients.items():
                    self._clients[key].swap(inner, material.not_after)
                if server is not None and self._server is not None:
                    self._server.swap(server, material.not_after)
                self._material = material
                self._updates += 1
        except Exception as error:  # a bad update must not end the stream thread or the last good contexts
            if not self._first.is_set():
                self._first_error = f"the first update cannot be used ({type(error).__name__}: {error})"
                self._first.set()
                return
            logger.error(
                "SPIFFE Workload API (%s) sent an X.509-SVID update that cannot be used; new connections keep "
                "the previous SVID: %s: %s",
                self.endpoint,
                type(error).__name__,
                error,
            )
            return
        if self._first.is_set():
            logger.info(
                "SPIFFE Workload API (%s): new X.509-SVID %s, valid until %s; new connections use it",
                self.endpoint,
                material.spiffe_id,
                material.not_after.isoformat(),
            )
        self._first.set()

    def _on_error(self, error: Exception) -> None:
        """py-spiffe gave up on the stream (an error it does not retry): keep the last SVID, say so."""
        if not self._first.is_set():
            self._first_error = f"the Workload API stream failed ({error})"
            self._first.set()
            return
        if self._closed:
            return
        logger.error(
            "SPIFFE Workload API (%s) stream ended with %s; new connections keep the SVID %s until it expires "
            "at %s (restart the process to reconnect)",
            self.endpoint,
            error,
            self.spiffe_id,
            self.not_after.isoformat(),
        )
