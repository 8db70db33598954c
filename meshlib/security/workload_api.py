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

**Reconnecting, fail-static.** Each stream is opened without py-spiffe's own retries, so every break
(the agent restarting, a gRPC error, a message that cannot be parsed) reaches :meth:`WorkloadAPISource._on_error`,
which logs it (WARNING, once per outage) and reconnects with exponential backoff (0.1 s doubling to 5 s) on a
new channel (gRPC's own channel backoff grows to minutes). Meanwhile every context keeps the last good SVID;
the first update after the outage is logged (INFO) and swapped in. If the SVID expires before the agent is
back, an ERROR says so once.

**fork().** gRPC channels and py-spiffe's thread do not survive a fork, and the child must not use the
parent's. In a forked child the source lets go of the parent's client and stream (never closing them) and
opens its own when it is next used (:meth:`WorkloadAPISource.resume`, called by ``client_context``,
``server_context`` and by meshlib clients when they make a connection pool); the contexts it handed out keep
serving the last SVID until then.

**Trust.** By default only the bundle of the SVID's own trust domain is trusted. OpenSSL cannot tie a CA to
the trust domain it signs for, so trusting federated bundles as well (``trust_federated=True``) lets any
federated CA sign a certificate claiming any trust domain's ID; the client's expected SPIFFE ID still has to
match, and the inbound authorization should check trust domains.

**Key material on disk.** Never written to disk: see :mod:`meshlib.security._material`, which this source
shares with :mod:`meshlib.security.consul_ca` (contexts, whole-context swap, in-memory key loading).
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import stat
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from meshlib.errors import ConfigError
from meshlib.security._material import ContextSet, ForkReset, Material, reset_locks
from meshlib.security.identity import ExpectedIdentity, load_x509
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
#: Reconnect backoff after a stream breaks: the first retry after this many seconds, doubling up to the maximum.
RECONNECT_BACKOFF = 0.1
RECONNECT_BACKOFF_MAX = 5.0
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


def _material(context: X509Context, trust_federated: bool) -> Material:
    """One Workload API update, ready for contexts: PEM chain + key (one blob), PEM CAs, ID, expiry."""
    from cryptography.hazmat.primitives import serialization

    svid = context.default_svid  # the standard's default identity: the first SVID
    pem = serialization.Encoding.PEM
    chain = b"".join(cert.public_bytes(pem) for cert in svid.cert_chain)
    key = svid.private_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    trust_domain = svid.spiffe_id.trust_domain
    bundles = context.x509_bundle_set.bundles
    if not trust_federated:
        bundles = {bundle for bundle in bundles if bundle.trust_domain == trust_domain}
    cas = {cert for bundle in bundles for cert in bundle.x509_authorities}
    if not cas:
        raise ValueError(f"no trust bundle for the SVID's trust domain {trust_domain}")
    return Material(
        cert_and_key=chain + key,
        cadata="".join(cert.public_bytes(pem).decode("ascii") for cert in cas),
        spiffe_id=str(svid.spiffe_id),
        trust_domain=str(trust_domain),
        not_after=svid.leaf.not_valid_after_utc,
        serial=svid.leaf.serial_number,
    )


class WorkloadAPISource:
    """The workload's X.509-SVID and trust bundles, streamed from the SPIFFE Workload API; SSL contexts from them.

    ``endpoint`` is the Workload API socket (``unix:///path``); ``None`` reads ``SPIFFE_ENDPOINT_SOCKET``
    from ``environ`` (default ``os.environ``). Construction blocks until the first SVID arrives, at most
    ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`; retrying meanwhile: SPIRE refuses a workload until
    it is registered); a :class:`~meshlib.ConfigError` naming ``SPIFFE_ENDPOINT_SOCKET`` says why not (the
    ``spiffe`` extra missing, a malformed value, no socket, nothing answering, no SVID, with the Workload
    API's last error).
    Later updates arrive on py-spiffe's stream thread and are swapped into every context handed out; if the
    stream breaks, the source reconnects with backoff and the last good SVID stays in use meanwhile (see the
    module docstring). :meth:`close` ends the stream. Thread-safe; the request path only reads a context's
    current inner context.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        timeout: float | None = None,
        trust_federated: bool = False,
    ) -> None:
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        env = os.environ if environ is None else environ
        self.variable = ENDPOINT_VARIABLE if endpoint is None else "WorkloadAPISource.endpoint"
        endpoint = env.get(ENDPOINT_VARIABLE, "") if endpoint is None else endpoint
        if not endpoint.strip():
            raise ConfigError(self.variable, endpoint, _EXPECTED_ENDPOINT)
        self.endpoint = endpoint.strip()
        self.trust_federated = trust_federated
        self._path = path = _socket_path(self.variable, self.endpoint)
        try:
            from spiffe import WorkloadApiClient  # noqa: F401 (the extra is present: say so now, clearly)
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
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._first = threading.Event()
        self._last_error: str | None = None
        self._material: Material | None = None
        self._contexts = ContextSet()
        self._closed = False
        self._updates = 0
        self._errors = 0
        self._attempt = 0  # reconnect attempts since the last good update (the backoff's exponent)
        self._broken = False  # a stream broke and no update has arrived since (the outage is logged once)
        self._expiry_logged = False
        self._pid = os.getpid()
        self._client: WorkloadApiClient | None = None
        self._stream: StreamCancelHandler | None = None
        self._serial = 0  # which stream is current: callbacks of a replaced one are ignored
        _FORK.add(self)
        try:
            self._connect()
        except Exception as error:  # the socket went between the check above and now
            self._last_error = f"{type(error).__name__}: {error}"
            self._spawn_reconnect()
        if not self._first.wait(timeout) or self._material is None:
            reason = f"no X.509-SVID within {timeout:g} s"
            if self._last_error is not None:
                reason += f"; last error: {self._last_error}"
            else:
                reason += f" (nothing answering on {path}?)"
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
    def serial_number(self) -> int:
        """The serial number of the SVID (leaf certificate) in use."""
        assert self._material is not None
        return self._material.serial

    @property
    def updates(self) -> int:
        """Workload API updates applied (1 after construction)."""
        return self._updates

    @property
    def stream_errors(self) -> int:
        """Times a stream (or an attempt to open one) ended in an error; each is followed by a reconnect."""
        return self._errors

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def wait_for_svid(self, serial_number: int, timeout: float) -> bool:
        """Block until the SVID in use has ``serial_number``; ``False`` if ``timeout`` ran out first."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self._material is not None and self._material.serial == serial_number, timeout
            )

    def client_context(self, server_id: str, server_name: str | None = None) -> ReloadingContext:
        """A client context presenting the SVID, trusting the bundle, and requiring ``server_id`` of the server.

        ``server_id`` is a SPIFFE ID (``spiffe://td/path``) or a trust domain (``spiffe://td``);
        ``server_name``, if given, is sent as SNI instead of the URL's host. One context per
        (``server_id``, ``server_name``), shared and kept current by every later update.
        """
        try:
            expected = ExpectedIdentity.parse(server_id)
        except ValueError as error:
            raise ConfigError("server_id", server_id, f"a SPIFFE ID or trust domain ({error})") from None
        self.resume()
        key = (str(expected), server_name)
        settings = TLSSettings(server_id=str(expected), server_name=server_name)
        with self._lock:
            return self._contexts.client(key, lambda _: expected, settings)

    def server_context(self) -> ReloadingContext:
        """A server context presenting the SVID and requiring a client certificate that chains to the bundle."""
        self.resume()
        with self._lock:
            return self._contexts.server()

    def resume(self) -> None:
        """In a forked child, open this process's own stream (once); elsewhere nothing. Cheap: a pid check."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid() or self._closed:
                return
            self._pid = os.getpid()
            self._attempt = 0
        logger.info("SPIFFE Workload API (%s): reconnecting in forked process %d", self.endpoint, os.getpid())
        try:
            self._connect()
        except Exception as error:
            self._failed(error)
            self._spawn_reconnect()

    def close(self) -> None:
        """End the Workload API stream; contexts handed out keep the last SVID."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            client, stream = self._client, self._stream
            self._client = self._stream = None
        self._closing.set()
        if self._pid != os.getpid():
            return  # a forked child that never resumed: those are the parent's (abandoned at the fork)
        if stream is not None:
            stream.cancel()
        if client is not None:
            client.close()

    def __enter__(self) -> WorkloadAPISource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the stream -------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open a new channel and stream (py-spiffe's retries off: every break comes to :meth:`_on_error`)."""
        from spiffe import WorkloadApiClient

        client = WorkloadApiClient(self.endpoint)  # ArgumentError if the socket file is gone (agent restarting)
        with self._lock:
            if self._closed:
                client.close()
                return
            old = self._client
            self._serial += 1
            serial = self._serial
            self._client = client
            self._stream = client.stream_x509_contexts(
                functools.partial(self._on_update, serial),
                functools.partial(self._on_error, serial),
                retry_connect=False,
            )
        if old is not None:
            old.close()  # its stream has ended (that is why we reconnect)

    def _spawn_reconnect(self) -> None:
        threading.Thread(target=self._reconnect, name="meshlib-workload-api-reconnect", daemon=True).start()

    def _reconnect(self) -> None:
        """Try :meth:`_connect` with exponential backoff until it opens a stream or the source closes."""
        while True:
            with self._lock:
                if self._closed:
                    return
                delay = min(RECONNECT_BACKOFF * 2**self._attempt, RECONNECT_BACKOFF_MAX)
                self._attempt = min(self._attempt + 1, 16)
            self._warn_if_expired()
            if self._closing.wait(delay):
                return
            try:
                self._connect()
            except Exception as error:  # the agent's socket is not back yet: try again later
                self._failed(error)
                continue
            return

    def _failed(self, error: BaseException) -> None:
        """Record (and, once per outage, log) a stream that broke or could not be opened."""
        with self._lock:
            self._errors += 1
            self._last_error = f"{type(error).__name__}: {error}"
            first_of_outage = self._first.is_set() and not self._broken and not self._closed
            self._broken = True
            material = self._material
        if first_of_outage and material is not None:
            logger.warning(
                "SPIFFE Workload API (%s) stream broke (%s: %s); reconnecting with backoff; new connections "
                "keep the SVID %s (valid until %s) meanwhile",
                self.endpoint,
                type(error).__name__,
                error,
                material.spiffe_id,
                material.not_after.isoformat(),
            )
        else:
            logger.debug("SPIFFE Workload API (%s): %s: %s", self.endpoint, type(error).__name__, error)

    def _warn_if_expired(self) -> None:
        material = self._material
        if material is None or self._expiry_logged:
            return
        if material.not_after <= datetime.datetime.now(datetime.timezone.utc):
            self._expiry_logged = True
            logger.error(
                "SPIFFE Workload API (%s) still unreachable and the SVID %s expired at %s: peers will refuse "
                "new connections until the agent is back",
                self.endpoint,
                material.spiffe_id,
                material.not_after.isoformat(),
            )

    # -- py-spiffe's stream thread ----------------------------------------------------------------------------

    def _on_update(self, serial: int, update: X509Context) -> None:
        try:
            material = _material(update, self.trust_federated)
            with self._lock:
                if self._closed or serial != self._serial:
                    return
                # Build everything first, then swap: a failure leaves every context on the last good SVID.
                self._contexts.apply(material)
                with self._changed:
                    self._material = material
                    self._changed.notify_all()
                self._updates += 1
                self._attempt = 0
                recovered, self._broken = self._broken, False
                self._expiry_logged = False
        except Exception as error:  # a bad update must not end the stream thread or the last good contexts
            self._last_error = f"an update that cannot be used ({type(error).__name__}: {error})"
            if not self._first.is_set():
                return  # construction keeps waiting (and reports this if nothing better comes)
            logger.error(
                "SPIFFE Workload API (%s) sent an X.509-SVID update that cannot be used; new connections keep "
                "the previous SVID: %s: %s",
                self.endpoint,
                type(error).__name__,
                error,
            )
            return
        if recovered:
            logger.info("SPIFFE Workload API (%s): stream reconnected", self.endpoint)
        if self._first.is_set():
            logger.info(
                "SPIFFE Workload API (%s): new X.509-SVID %s, valid until %s; new connections use it",
                self.endpoint,
                material.spiffe_id,
                material.not_after.isoformat(),
            )
        self._first.set()

    def _on_error(self, serial: int, error: Exception) -> None:
        """The stream ended (py-spiffe's thread, which ends when this returns): record it and reconnect."""
        with self._lock:
            if self._closed or serial != self._serial:
                return
        self._failed(error)
        self._reconnect()

    # -- fork --------------------------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child (only this thread runs): new locks; the parent's client and stream are abandoned.

        They are kept referenced (:data:`_FORK`) so the garbage collector never closes the parent's
        channel from here; :meth:`resume` opens the child's own stream when the source is next used.
        """
        _FORK.abandoned.append((self._client, self._stream))
        self._client = self._stream = None
        self._serial += 1
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        closing, self._closing = self._closing, threading.Event()
        if closing.is_set():
            self._closing.set()
        self._first = threading.Event()
        self._first.set()
        self._broken = False
        reset_locks(self._contexts.contexts())


#: Every source of this process, for the fork hook, and what forked children inherited and must neither use nor
#: close.
_FORK = ForkReset("a SPIFFE Workload API source")
