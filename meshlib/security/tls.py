"""Client TLS for mesh services: settings, SSL contexts, mTLS, and certificate rotation without restarts.

What a context built here guarantees: TLS 1.2 or newer; the server's chain verified against the CA bundle
(``CERT_REQUIRED``) and its certificate checked against the logical service name, or a configured server
name, or (with a SPIFFE ID configured) its SPIFFE identity instead of a name; the client certificate sent
when the server asks for one (mTLS). Verification is off only when a service's settings say
``verify=False``.

**Trust.** The CA bundle is the configured ``ca_file`` (a PEM file, or a directory of hashed certificates).
Without one, the same default as httpx (``httpx.create_ssl_context``): ``SSL_CERT_FILE``, else
``SSL_CERT_DIR`` (both only when the client's ``trust_env`` is true), else certifi's bundle.

**Rotation.** Endpoint transports (httpx/httpcore pools) keep the ``ssl.SSLContext`` they were given for
their whole life, so the context they hold is a :class:`ReloadingContext`: a front that hands each new
connection to its *current* inner context. When the certificate, key or CA files change, a whole new inner
context is built and validated off the request path, then swapped in with one reference assignment:

* new connections (new handshakes) use the new certificate; pooled connections and requests in flight keep
  the TLS session they have, untouched;
* the swap is atomic: no connection ever sees a new certificate with an old key (which in-place
  ``load_cert_chain`` on a live context would allow between its two file loads, and leave for good if the
  second load failed);
* a CA removed from the bundle stops being trusted (``load_verify_locations`` on a live context can only add);
* files that cannot be used (unreadable, unparseable, key not matching, certificate expired or not yet valid)
  leave the last good context in place and log an ERROR (file names and the reason, never key material).

Files are compared by ``stat()`` (device, inode, size, mtime) every ``reload_interval`` seconds in one
daemon thread per client (:class:`CertificateWatcher`), never on the request path. Replace files
atomically (write elsewhere, then rename; Kubernetes secret volumes do so), or write the key before the
certificate: a check that falls between two writes logs one ERROR and loads the pair at the next check.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import socket
import ssl
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshlib.errors import ConfigError
from meshlib.security.identity import ExpectedIdentity, IdentityContext, load_x509

logger = logging.getLogger("meshlib.security")

#: How often certificate files are checked for changes. Rotation tools replace certificates hours before
#: they expire (24 h leaves renewed at 2/3 of their life: Linkerd, Istio, Dapr), so the interval only bounds
#: how long after a rotation new connections still present the old certificate. gRPC's file watcher
#: example uses 60 s; a ``stat()`` of three files is cheap enough to do every 5 s, which keeps that window
#: (and tests and deployments that check a rotation) short.
DEFAULT_RELOAD_INTERVAL = 5.0
#: A replacement certificate whose ``notBefore`` is this far in the future is accepted (issuer clock skew;
#: the Linkerd/Istio/Dapr tolerance); further in the future it is refused like an expired one.
CLOCK_SKEW = datetime.timedelta(minutes=15)

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_SPIFFE_EXPECTED = (
    "a SPIFFE ID such as spiffe://prod.example/ns/pay/sa/payments, or a trust domain such as spiffe://prod.example"
)

__all__ = [
    "DEFAULT_RELOAD_INTERVAL",
    "CertificateWatcher",
    "ReloadingContext",
    "TLSContexts",
    "TLSSettings",
    "build_context",
]


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """How meshlib makes TLS connections to one service (or, mesh-wide, to every service).

    * ``ca_file`` -- PEM bundle (or directory) of the CAs that sign servers; default: httpx's default trust.
    * ``cert_file`` / ``key_file`` -- the client certificate chain and its key, sent when the server asks
      (mTLS); ``key_file`` may be omitted when ``cert_file`` holds both. Encrypted keys are not supported.
    * ``server_name`` -- check the server certificate against (and send as SNI) this name instead of the
      logical service name.
    * ``server_id`` -- the server must present this SPIFFE ID (``spiffe://td/path``) or any ID of this
      trust domain (``spiffe://td``); it replaces the host-name check (see :mod:`meshlib.security.identity`).
    * ``verify=False`` -- do not authenticate the server at all (no chain, name or identity check). Only for
      one named service; meshlib logs a WARNING for it when the client is built.

    Values are checked here (syntax); files are loaded, and reported as :class:`meshlib.ConfigError` naming
    where they came from, when a client builds its contexts. ``sources`` maps a field to the variable that
    set it (``MESHLIB_TLS_CA_FILE``...), for those errors; it does not take part in equality, so services
    with the same settings share one context per client.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    server_id: str | None = None
    verify: bool = True
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)

    def __post_init__(self) -> None:
        for attr in ("ca_file", "cert_file", "key_file", "server_name", "server_id"):
            value = getattr(self, attr)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(self.variable(attr), value, "a non-empty string, or None")
        if not isinstance(self.verify, bool):
            raise ConfigError(self.variable("verify"), self.verify, "True or False")
        if self.key_file is not None and self.cert_file is None:
            key_variable = self.variable("key_file")
            cert_variable = key_variable.replace("KEY_FILE", "CERT_FILE").replace("key_file", "cert_file")
            raise ConfigError(
                key_variable, self.key_file, f"a key together with its certificate ({cert_variable} is not set)"
            )
        if self.server_name is not None and not _is_server_name(self.server_name):
            raise ConfigError(self.variable("server_name"), self.server_name, "a DNS name or an IP address")
        if self.server_id is not None:
            try:
                ExpectedIdentity.parse(self.server_id)
            except ValueError as error:
                raise ConfigError(self.variable("server_id"), self.server_id, f"{_SPIFFE_EXPECTED} ({error})") from None
            if not self.verify:
                raise ConfigError(
                    self.variable("verify"),
                    "false",
                    f"verification on, since a SPIFFE ID is required ({self.variable('server_id')})",
                )

    def variable(self, attr: str) -> str:
        """Where ``attr`` was set: an environment variable, or ``TLSSettings.<attr>`` for code."""
        return self.sources.get(attr, f"TLSSettings.{attr}")

    @property
    def expected_identity(self) -> ExpectedIdentity | None:
        """The parsed ``server_id``, if one is required."""
        return ExpectedIdentity.parse(self.server_id) if self.server_id is not None else None

    @property
    def files(self) -> tuple[str, ...]:
        """The files a rotation may change: CA bundle, certificate, key (those set)."""
        return tuple(path for path in (self.ca_file, self.cert_file, self.key_file) if path is not None)


def _is_server_name(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return _HOST_NAME.fullmatch(value) is not None
    return True


class _MaterialError(Exception):
    """One TLS file cannot be used: which setting, which file, and why (never the file's content)."""

    def __init__(self, attr: str, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.attr = attr
        self.path = path
        self.reason = reason


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt for a passphrase on the terminal (and hang a server).
    raise ValueError("the private key is encrypted; meshlib needs an unencrypted key file")


def _read(attr: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise _MaterialError(attr, path, f"cannot be read ({error.strerror or error})") from None


def _utc(value: datetime.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _check_client_pair(settings: TLSSettings, now: datetime.datetime) -> datetime.datetime:
    """Parse the client certificate (and key), check validity dates and that they match; its ``notAfter``."""
    x509 = load_x509()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_path = settings.cert_file
    assert cert_path is not None
    cert_pem = _read("cert_file", cert_path)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise _MaterialError("cert_file", cert_path, "is not a PEM certificate (chain)") from None
    leaf = chain[0]
    not_after: datetime.datetime = leaf.not_valid_after_utc
    not_before: datetime.datetime = leaf.not_valid_before_utc
    if not_after <= now:
        raise _MaterialError("cert_file", cert_path, f"the certificate expired at {_utc(not_after)}")
    if not_before > now + CLOCK_SKEW:
        raise _MaterialError("cert_file", cert_path, f"the certificate is not valid before {_utc(not_before)}")
    key_attr, key_path = ("key_file", settings.key_file) if settings.key_file is not None else ("cert_file", cert_path)
    key_pem = cert_pem if key_path == cert_path else _read(key_attr, key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise _MaterialError(key_attr, key_path, "the private key is encrypted (not supported)") from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise _MaterialError(key_attr, key_path, f"no usable PEM private key ({type(error).__name__})") from None
    finally:
        del key_pem
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(encoding, public):
        raise _MaterialError(key_attr, key_path, f"the private key does not match the certificate in {cert_path}")
    return not_after


def _default_trust(context: ssl.SSLContext, trust_env: bool) -> None:
    """The CA bundle httpx would use (``httpx.create_ssl_context(verify=True)``), into ``context``."""
    if trust_env and os.environ.get("SSL_CERT_FILE"):
        context.load_verify_locations(cafile=os.environ["SSL_CERT_FILE"])
    elif trust_env and os.environ.get("SSL_CERT_DIR"):
        context.load_verify_locations(capath=os.environ["SSL_CERT_DIR"])
    else:
        import certifi

        context.load_verify_locations(cafile=certifi.where())


def build_context(
    settings: TLSSettings,
    *,
    trust_env: bool = True,
    alpn_protocols: Iterable[str] | None = None,
    now: datetime.datetime | None = None,
) -> tuple[ssl.SSLContext, datetime.datetime | None]:
    """A new, fully loaded client context for ``settings``, and the client certificate's ``notAfter``.

    Raises :class:`_MaterialError` (internal) when a file cannot be used; :class:`ReloadingContext` turns that
    into a :class:`~meshlib.ConfigError` at construction, or an ERROR log line on reload.
    """
    expected = settings.expected_identity
    context: ssl.SSLContext
    if expected is not None:
        checking = IdentityContext(ssl.PROTOCOL_TLS_CLIENT)
        checking.expected_identity = expected
        context = checking
        load_x509()  # imported now, not by the first handshake
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.verify:
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = expected is None  # a SPIFFE ID replaces the host-name check
        if settings.ca_file is not None:
            path = settings.ca_file
            try:
                if os.path.isdir(path):
                    context.load_verify_locations(capath=path)
                else:
                    context.load_verify_locations(cafile=path)
            except FileNotFoundError:
                raise _MaterialError("ca_file", path, "does not exist") from None
            except OSError as error:  # ssl.SSLError included: unreadable, or no PEM certificate in it
                reason = getattr(error, "reason", None) or error.strerror or str(error)
                raise _MaterialError("ca_file", path, f"is not a usable PEM CA bundle ({reason})") from None
        else:
            _default_trust(context, trust_env)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    not_after = None
    if settings.cert_file is not None:
        not_after = _check_client_pair(settings, now or datetime.datetime.now(datetime.timezone.utc))
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file, password=_no_password)
        except (OSError, ValueError) as error:  # the files changed since they were checked
            attr = "key_file" if settings.key_file is not None else "cert_file"
            path = settings.key_file or settings.cert_file
            raise _MaterialError(attr, path, f"could not be loaded ({error})") from None
    if alpn_protocols is not None:
        context.set_alpn_protocols(list(alpn_protocols))
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and trust_env and not sys.flags.ignore_environment:  # like ssl.create_default_context
        context.keylog_filename = keylog
    return context, not_after


_Signature = tuple[tuple[int, int, int, int] | str, ...]


def _signature(paths: Iterable[str]) -> _Signature:
    """What identifies the current version of each file: (device, inode, size, mtime), or why it is missing."""
    found: list[tuple[int, int, int, int] | str] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as error:
            found.append(f"error {error.errno}")
        else:
            found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


class ReloadingContext(ssl.SSLContext):
    """The ``ssl.SSLContext`` an endpoint transport holds: every new connection uses the current inner context.

    httpcore only calls three methods on the context it was given: ``set_alpn_protocols`` (before each
    connection), ``wrap_socket`` (sync) and ``wrap_bio`` (anyio). This front forwards them to
    :attr:`current`, which :meth:`check` replaces when the files change (see the module docstring). With
    ``server_name`` set, the name passed to the handshake (SNI and certificate check) is replaced by it.

    Other settings made on this object (options, ciphers...) are not forwarded: configure TLS through
    :class:`TLSSettings`. Build one with :meth:`create`.
    """

    settings: TLSSettings
    _inner: ssl.SSLContext

    def __new__(cls, settings: TLSSettings, inner: ssl.SSLContext, **kwargs: object) -> ReloadingContext:
        self = super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)
        return self

    def __init__(
        self,
        settings: TLSSettings,
        inner: ssl.SSLContext,
        *,
        not_after: datetime.datetime | None = None,
        trust_env: bool = True,
        signature: _Signature | None = None,
    ) -> None:
        self.settings = settings
        self._inner = inner
        self._trust_env = trust_env
        self._alpn: list[str] | None = None
        self._not_after = not_after
        # The files' state when ``inner`` was loaded (taken before loading, so a change during it is seen).
        self._signature = signature if signature is not None else _signature(settings.files)
        self._failed: _Signature | None = None
        self._expiry_logged = False
        self._check_lock = threading.Lock()
        self._changed = threading.Condition()
        self._generation = 1
        # Mirror the inner context's policy, so code reading this object sees what connections get.
        self.minimum_version = ssl.TLSVersion.TLSv1_2
        self.check_hostname = False  # (set first: CERT_NONE is refused while it is on)
        self.verify_mode = inner.verify_mode
        self.check_hostname = inner.check_hostname

    @classmethod
    def create(cls, settings: TLSSettings, *, trust_env: bool = True) -> ReloadingContext:
        """Load ``settings`` now; a file that cannot be used raises :class:`~meshlib.ConfigError` naming it."""
        signature = _signature(settings.files)
        try:
            inner, not_after = build_context(settings, trust_env=trust_env)
        except _MaterialError as error:
            raise ConfigError(settings.variable(error.attr), error.path, _expected(error)) from None
        except ImportError as error:
            attr = "server_id" if settings.server_id is not None else "cert_file"
            raise ConfigError(settings.variable(attr), getattr(settings, attr), str(error)) from None
        return cls(settings, inner, not_after=not_after, trust_env=trust_env, signature=signature)

    # -- what httpcore and anyio call -------------------------------------------------------------------------

    @property
    def current(self) -> ssl.SSLContext:
        """The inner context new connections use now."""
        return self._inner

    def set_alpn_protocols(self, alpn_protocols: Iterable[str]) -> None:
        """Record the ALPN protocols (httpcore sets them before each connection) and apply them."""
        protocols = list(alpn_protocols)
        self._alpn = protocols
        self._inner.set_alpn_protocols(protocols)

    def wrap_socket(  # noqa: PLR0917 (the signature of ssl.SSLContext.wrap_socket)
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        """Wrap (and by default handshake) ``sock`` with the current inner context."""
        return self._inner.wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.settings.server_name or server_hostname,
            session=session,
        )

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        """A memory-BIO TLS object from the current inner context (anyio and asyncio use this)."""
        return self._inner.wrap_bio(
            incoming,
            outgoing,
            server_side=server_side,
            server_hostname=self.settings.server_name or server_hostname,
            session=session,
        )

    # -- rotation (watcher thread) ---------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """1 for the context loaded at construction, +1 for every reload swapped in."""
        return self._generation

    @property
    def not_after(self) -> datetime.datetime | None:
        """When the client certificate in use expires (``None`` without one)."""
        return self._not_after

    def wait_for_generation(self, generation: int, timeout: float) -> bool:
        """Block until :attr:`generation` reaches ``generation``; ``False`` if ``timeout`` ran out first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._generation >= generation, timeout)

    def check(self, now: datetime.datetime | None = None) -> bool:
        """Reload if a file changed since the last load; ``True`` when a new context was swapped in.

        Called by :class:`CertificateWatcher`, off the request path. A change that cannot be used is logged
        once (ERROR) and the last good context stays; it is tried again when the files change again.
        """
        if not self.settings.files:
            return False
        with self._check_lock:
            now = now or datetime.datetime.now(datetime.timezone.utc)
            signature = _signature(self.settings.files)
            if signature in (self._signature, self._failed):
                self._warn_if_expired(now)
                return False
            try:
                inner, not_after = build_context(
                    self.settings, trust_env=self._trust_env, alpn_protocols=self._alpn, now=now
                )
            except (_MaterialError, ImportError) as error:
                if _signature(self.settings.files) != signature:
                    return False  # still being written: look again at the next check
                self._failed = signature
                self._warn_if_expired(now)
                logger.error(
                    "TLS files changed but cannot be used; new connections keep the previous certificate "
                    "and CA bundle (%s): %s",
                    ", ".join(self.settings.files),
                    error,
                )
                return False
            self._signature = signature
            self._failed = None
            self._swap(inner, not_after)
        logger.info(
            "TLS files reloaded (%s)%s; new connections use them",
            ", ".join(self.settings.files),
            f", client certificate valid until {_utc(not_after)}" if not_after is not None else "",
        )
        return True

    def swap(self, inner: ssl.SSLContext, not_after: datetime.datetime | None = None) -> None:
        """Swap in ``inner``, a fully built context from another source of material (the SPIFFE Workload API).

        The same whole-context swap as a file rotation (one reference assignment; new connections use
        ``inner``, connections already made keep theirs) and the same :attr:`generation` count.
        """
        with self._check_lock:
            self._swap(inner, not_after)

    def _swap(self, inner: ssl.SSLContext, not_after: datetime.datetime | None) -> None:
        if self._alpn is not None:
            inner.set_alpn_protocols(self._alpn)
        self._inner = inner
        self._not_after = not_after
        self._expiry_logged = False
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _warn_if_expired(self, now: datetime.datetime) -> None:
        if self._not_after is not None and self._not_after <= now and not self._expiry_logged:
            self._expiry_logged = True
            logger.error(
                "the client certificate in %s expired at %s and no valid replacement was found: "
                "servers that require client certificates will refuse new connections",
                self.settings.cert_file,
                _utc(self._not_after),
            )


def _expected(error: _MaterialError) -> str:
    what = {
        "ca_file": "a readable PEM file (or directory) of CA certificates",
        "cert_file": "a readable PEM certificate chain, valid now",
        "key_file": "a readable, unencrypted PEM private key matching the certificate",
    }[error.attr]
    return f"{what}; {error.reason}"


class CertificateWatcher:
    """One daemon thread that calls :meth:`ReloadingContext.check` on its contexts every ``interval`` seconds.

    Contexts are held weakly: when a client is dropped without being closed, its contexts go and the
    thread ends. The thread starts on first use and again after a ``fork()`` (threads do not survive one,
    and a client built before a pre-forking server forks must still rotate in its workers).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._contexts: weakref.WeakSet[ReloadingContext] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        _WATCHERS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: new locks (the parent's watcher thread may have held them; the child lacks it).

        The thread itself restarts on the child's next :meth:`watch` (a new endpoint pool), as ``_pid`` says.
        """
        self._lock = threading.Lock()
        for context in list(self._contexts):
            context._check_lock = threading.Lock()
            context._changed = threading.Condition()

    def watch(self, context: ReloadingContext) -> None:
        """Check ``context``'s files from now on (no-op for contexts without files, or ``interval`` 0)."""
        if self.interval <= 0 or not context.settings.files:
            return
        with self._lock:
            self._contexts.add(context)
            alive = self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()
            if alive or self._stop.is_set():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="meshlib-tls-watcher", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._check_all():
                return

    def _check_all(self) -> bool:
        """One round of checks; ``False`` when no context is left. (Its own frame: no reference survives it.)"""
        contexts = list(self._contexts)
        for context in contexts:
            try:
                context.check()
            except Exception:  # never let one bad check end rotation for the others
                logger.exception("checking TLS files %s failed", ", ".join(context.settings.files))
        return bool(contexts)

    def close(self) -> None:
        """Stop the thread (and wait briefly for it)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)


#: Every certificate watcher of this process, for the fork hook (weakly).
_WATCHERS: weakref.WeakSet[CertificateWatcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for watcher in list(_WATCHERS):
        watcher._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class TLSContexts:
    """One client's TLS contexts: one :class:`ReloadingContext` per distinct :class:`TLSSettings`.

    Services with equal settings share a context (one CA bundle load, one file watch). Contexts are built in
    :meth:`context_for`, at client construction, so bad files fail there as :class:`~meshlib.ConfigError`.
    """

    def __init__(self, *, reload_interval: float = DEFAULT_RELOAD_INTERVAL, trust_env: bool = True) -> None:
        self._trust_env = trust_env
        self._contexts: dict[TLSSettings, ReloadingContext] = {}
        self.watcher = CertificateWatcher(reload_interval)

    def context_for(self, settings: TLSSettings) -> ReloadingContext:
        """The (shared) context for ``settings``, built on first request."""
        context = self._contexts.get(settings)
        if context is None:
            context = ReloadingContext.create(settings, trust_env=self._trust_env)
            self._contexts[settings] = context
        return context

    def watch(self, context: ReloadingContext) -> None:
        """Start (if needed) watching ``context``'s files: called when a transport starts using it."""
        self.watcher.watch(context)

    def close(self) -> None:
        """Stop watching files."""
        self.watcher.close()
