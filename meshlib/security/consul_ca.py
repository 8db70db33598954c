"""Connect Native certificates from the local Consul agent: the service's leaf and the CA roots, rotated live.

With ``MESHLIB_CONSUL_SERVICE=billing``, :class:`ConsulCASource` watches two of the local agent's endpoints
with blocking queries (``index``/``wait``, ``X-Consul-Index``; the rules, pacing and backoff of
:class:`~meshlib.discovery.consul.query.BlockingQuery`, over the agent's HTTP client, address, TLS and ACL token
of :mod:`meshlib.discovery.consul.agent`):

* ``GET /v1/agent/connect/ca/leaf/billing`` -- the leaf certificate (``CertPEM``, intermediates appended by
  Consul) and its key (``PrivateKeyPEM``), valid ``ValidAfter``..``ValidBefore``; the agent renews it before
  it expires and answers the blocked query with the new one. Needs ``service:write`` on the service.
* ``GET /v1/agent/connect/ca/roots`` -- every trusted root (``RootCert`` and ``IntermediateCerts`` of each;
  old and new side by side during a CA rotation) and the cluster's ``TrustDomain``.

From those it builds whole SSL contexts, exactly as the SPIFFE Workload API source does
(:mod:`meshlib.security._material`, shared): :meth:`ConsulCASource.client_context` presents the leaf and
requires the upstream's Consul SPIFFE ID (:class:`ConsulServiceID`:
``spiffe://<trust domain>/ns/<ns>/dc/<dc>/svc/<service>``, ``/ap/<partition>`` first for a partition other
than ``default``), and
:meth:`ConsulCASource.server_context` presents the leaf and requires a client certificate that chains to the
roots (which caller may do what is the inbound authorization's decision: intentions). A new leaf or new roots
are built into new inner contexts and swapped in whole (:class:`~meshlib.security.tls.ReloadingContext`): new
connections use them, open ones keep theirs.

**Never current:** a leaf that is expired or not yet valid (its ``ValidAfter``/``ValidBefore`` and the
certificate's own dates, the stricter of both; ``notBefore`` up to
:data:`~meshlib.security.tls.CLOCK_SKEW` ahead is accepted as issuer clock skew, as for files), a leaf whose
SPIFFE ID is not this service's Consul ID in the roots' trust domain, a key that does not match, an empty
root set. Each is logged (ERROR, never key material) and the previous material stays.

**Agent down, fail-static.** Every failed query (unreachable, timeout, 5xx, 429, an ACL refusal) keeps the
last good material, logs a WARNING once per outage (ERROR for an ACL refusal, naming where the token came
from, never its value) and retries with the blocking-query backoff (1 s doubling to 60 s with jitter; a token
bucket paces successful queries, so the loop never spins). Staleness is bounded by the leaf itself: once its
``ValidBefore`` passes with the agent still unreachable, an ERROR says peers will refuse new connections.

**fork().** Threads do not survive a fork. In a forked child the source lets go of the parent's HTTP clients
(never closing them) and starts its own watches when next used (:meth:`ConsulCASource.resume`, a pid check);
contexts handed out keep the last material until then.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from meshlib.discovery.consul.agent import AgentClient, ConsulAgent, _Closed
from meshlib.discovery.consul.query import BlockingQuery, ConsulQuery, WatchOptions
from meshlib.errors import ConfigError, ConsulACLError, DiscoveryError
from meshlib.security._material import ContextSet, ForkReset, Material, reset_locks
from meshlib.security.identity import ExpectedIdentity, SpiffeId, load_x509
from meshlib.security.tls import CLOCK_SKEW, ReloadingContext, TLSSettings

logger = logging.getLogger("meshlib.security")

#: The variable naming the Consul service this process is ("I am billing").
SERVICE_VARIABLE = "MESHLIB_CONSUL_SERVICE"
#: How long construction waits for the first leaf and roots (the agent signs a leaf in milliseconds; a
#: process that cannot get its identity should fail at start, clearly, rather than serve without one).
DEFAULT_TIMEOUT = 10.0
LEAF_PATH = "/v1/agent/connect/ca/leaf/"
ROOTS_PATH = "/v1/agent/connect/ca/roots"
_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a SPIFFE path segment (Consul service names are DNS-like)
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")

__all__ = ["DEFAULT_TIMEOUT", "SERVICE_VARIABLE", "ConsulCASource", "ConsulServiceID", "from_env"]


def from_env(environ: Mapping[str, str] | None = None, **kwargs: Any) -> ConsulCASource | None:
    """A started source when ``MESHLIB_CONSUL_SERVICE`` is set (non-empty) in ``environ``, else ``None``.

    The agent and token come from the same environment's ``CONSUL_*`` variables.
    """
    env = os.environ if environ is None else environ
    if not env.get(SERVICE_VARIABLE, "").strip():
        return None
    return ConsulCASource(environ=env, **kwargs)


@dataclass(frozen=True, slots=True)
class ConsulServiceID:
    """A Consul service's SPIFFE identity, less the trust domain (which comes from the current roots).

    The checker a client context uses: :meth:`expected` gives the :class:`ExpectedIdentity` for the
    material in use, so a trust-domain change moves every check with it.
    """

    service: str
    namespace: str = "default"
    datacenter: str = "dc1"
    partition: str | None = None  # None or "default": no ``/ap/`` segment (Consul's own rule)

    def __post_init__(self) -> None:
        for attr in ("service", "namespace", "datacenter"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
                raise ValueError(f"{attr} {value!r} is not a Consul name (letters, digits, '.', '-', '_')")
        if self.partition is not None and (not _NAME.fullmatch(self.partition) or self.partition in (".", "..")):
            raise ValueError(f"partition {self.partition!r} is not a Consul name (letters, digits, '.', '-', '_')")

    @property
    def path(self) -> str:
        """``/ns/<ns>/dc/<dc>/svc/<service>``, with ``/ap/<partition>`` first for a non-default partition."""
        path = f"/ns/{self.namespace}/dc/{self.datacenter}/svc/{self.service}"
        if self.partition and self.partition != "default":
            return f"/ap/{self.partition}{path}"
        return path

    def uri(self, trust_domain: str) -> str:
        """The SPIFFE ID in ``trust_domain``."""
        return f"spiffe://{trust_domain}{self.path}"

    def expected(self, material: Material) -> ExpectedIdentity:
        """The identity a peer must present while ``material`` (its trust domain) is current."""
        return ExpectedIdentity(SpiffeId(material.trust_domain, self.path))

    @classmethod
    def parse(cls, uri: str) -> tuple[str, ConsulServiceID]:
        """``(trust domain, ID)`` of a Consul service SPIFFE ID; :class:`ValueError` for anything else."""
        spiffe_id = SpiffeId.parse(uri)
        parts = spiffe_id.path.split("/")[1:]
        partition = None
        if len(parts) == 8 and parts[0] == "ap":
            partition, parts = parts[1], parts[2:]
        if len(parts) != 6 or parts[0] != "ns" or parts[2] != "dc" or parts[4] != "svc":
            raise ValueError(f"{uri} is not a Consul service ID (spiffe://<td>[/ap/<ap>]/ns/<ns>/dc/<dc>/svc/<svc>)")
        return spiffe_id.trust_domain, cls(parts[5], parts[1], parts[3], partition)

    def __str__(self) -> str:
        return self.uri("<trust-domain>")


def _time(value: object, field: str) -> datetime.datetime:
    """A Go ``time.Time`` in JSON (RFC 3339, nanoseconds allowed) as an aware datetime."""
    match = _RFC3339.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{field} is not an RFC 3339 time: {value!r}")
    fraction = (match.group(2) or "")[:7]  # Python keeps microseconds
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    return datetime.datetime.fromisoformat(match.group(1) + fraction + zone)


def _utc(value: datetime.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True, slots=True)
class _Leaf:
    cert_pem: str
    key_pem: str
    valid_after: datetime.datetime
    valid_before: datetime.datetime

    @classmethod
    def parse(cls, document: Any) -> _Leaf:
        if not isinstance(document, dict):
            raise ValueError("the leaf answer is not a JSON object")
        cert, key = document.get("CertPEM"), document.get("PrivateKeyPEM")
        if not isinstance(cert, str) or "BEGIN CERTIFICATE" not in cert:
            raise ValueError("the leaf answer has no CertPEM")
        if not isinstance(key, str) or "PRIVATE KEY" not in key:
            raise ValueError("the leaf answer has no PrivateKeyPEM")
        return cls(
            cert,
            key,
            _time(document.get("ValidAfter"), "ValidAfter"),
            _time(document.get("ValidBefore"), "ValidBefore"),
        )


@dataclass(frozen=True, slots=True)
class _Roots:
    trust_domain: str
    pems: tuple[str, ...]

    @classmethod
    def parse(cls, document: Any) -> _Roots:
        if not isinstance(document, dict):
            raise ValueError("the roots answer is not a JSON object")
        trust_domain = document.get("TrustDomain")
        if not isinstance(trust_domain, str) or not trust_domain:
            raise ValueError("the roots answer has no TrustDomain")
        SpiffeId.parse(f"spiffe://{trust_domain}")  # a usable trust domain, or ValueError saying why
        pems: list[str] = []
        for root in document.get("Roots") or ():
            if not isinstance(root, dict):
                continue
            if isinstance(cert := root.get("RootCert"), str) and "BEGIN CERTIFICATE" in cert:
                pems.append(cert)
            pems.extend(c for c in root.get("IntermediateCerts") or () if isinstance(c, str) and c.strip())
        if not pems:
            raise ValueError("the roots answer has no root certificate")
        return cls(trust_domain, tuple(pems))


def _material(
    leaf: _Leaf, roots: _Roots, identity: ConsulServiceID | None, service: str, now: datetime.datetime
) -> tuple[Material, ConsulServiceID]:
    """The material for ``leaf`` and ``roots``, checked; :class:`ValueError` saying why it must not be used."""
    x509 = load_x509()
    chain = x509.load_pem_x509_certificates(leaf.cert_pem.encode())
    cert = chain[0]
    not_before = max(cert.not_valid_before_utc, leaf.valid_after)
    not_after = min(cert.not_valid_after_utc, leaf.valid_before)
    if not_after <= now:
        raise ValueError(f"the leaf certificate expired at {_utc(not_after)}")
    if not_before > now + CLOCK_SKEW:
        raise ValueError(f"the leaf certificate is not valid before {_utc(not_before)}")
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise ValueError(f"the leaf certificate has {len(uris)} URI SANs, not one SPIFFE ID")
    trust_domain, found = ConsulServiceID.parse(uris[0])
    if found.service != service:
        raise ValueError(f"the leaf certificate is for service {found.service!r} ({uris[0]}), not {service!r}")
    if trust_domain != roots.trust_domain:
        raise ValueError(f"the leaf's trust domain {trust_domain} is not the roots' {roots.trust_domain}")
    if identity is not None and found != identity:
        raise ValueError(f"the leaf's identity {uris[0]} is not the one in use ({identity.uri(trust_domain)})")
    cert_and_key = (leaf.cert_pem.rstrip("\n") + "\n" + leaf.key_pem.rstrip("\n") + "\n").encode()
    cadata = "".join(pem.rstrip("\n") + "\n" for pem in roots.pems)
    material = Material(cert_and_key, cadata, uris[0], trust_domain, not_after, cert.serial_number)
    return material, found


class _Watch:
    """One endpoint's blocking-query loop: its own HTTP client to the agent and the shared query rules."""

    def __init__(self, name: str, query: BlockingQuery, agent: ConsulAgent, closed: threading.Event) -> None:
        self.name = name
        self.query = query
        self.client = AgentClient(agent, closed)
        self.value: _Leaf | _Roots | None = None


class ConsulCASource:
    """The leaf certificate of Consul service ``service`` and the Connect CA roots, from the local agent.

    ``service`` is the Consul service name (``None``: ``MESHLIB_CONSUL_SERVICE`` from ``environ``); the agent,
    its TLS and the ACL token come from ``agent``, else from the ``CONSUL_*`` variables of ``environ``
    (default ``os.environ``). Construction blocks until the first leaf and roots are in hand, at most
    ``timeout`` seconds (default :data:`DEFAULT_TIMEOUT`); a :class:`~meshlib.ConfigError` naming
    ``MESHLIB_CONSUL_SERVICE`` says why not, or :class:`~meshlib.errors.ConsulACLError` when the agent refused
    the token (the message names where the token came from, never its value). ``options`` paces the
    blocking queries (default: Consul's guidance, see :class:`~meshlib.discovery.consul.query.WatchOptions`).
    Later answers arrive on two daemon threads and are swapped into every context handed out. Thread-safe; the
    request path only reads a context's current inner context. :meth:`close` ends the watches.
    """

    def __init__(
        self,
        service: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        agent: ConsulAgent | None = None,
        timeout: float | None = None,
        options: WatchOptions | None = None,
        wait: float = 300.0,
    ) -> None:
        env = os.environ if environ is None else environ
        self.variable = SERVICE_VARIABLE if service is None else "ConsulCASource.service"
        raw = env.get(SERVICE_VARIABLE, "") if service is None else service
        name = raw.strip() if isinstance(raw, str) else ""
        if not _NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(self.variable, raw, "a Consul service name (letters, digits, '.', '-', '_')")
        self.service = name
        self.agent = agent if agent is not None else ConsulAgent.from_env(env)
        self.options = options or WatchOptions()
        self._wait = wait
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        load_x509()

        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._closed_event = threading.Event()
        self._first = threading.Event()
        self._contexts = ContextSet()
        self._identity: ConsulServiceID | None = None
        self._closed = False
        self._updates = 0
        self._errors = 0
        self._refused = 0
        self._broken = False
        self._expiry_logged = False
        self._fatal: ConsulACLError | None = None
        self._last_error: str | None = None
        self._pid = os.getpid()
        self._watches: list[_Watch] = []
        _FORK.add(self)
        self._start()
        self._first.wait(timeout)
        with self._lock:
            material, fatal, last = self._contexts.material, self._fatal, self._last_error
        if material is None:
            self.close()
            if fatal is not None:
                raise fatal
            reason = f"no leaf certificate and CA roots within {timeout:g} s"
            reason += f"; last error: {last}" if last else f" (is the Consul agent at {self.agent.address} running?)"
            raise ConfigError(
                self.variable, self.service, f"a service the local Consul agent issues a leaf for; {reason}"
            )
        logger.info(
            "Consul Connect (%s): leaf certificate %s, valid until %s",
            self.agent.address,
            material.spiffe_id,
            _utc(material.not_after),
        )

    # -- what callers use -------------------------------------------------------------------------------------

    @property
    def identity(self) -> ConsulServiceID:
        """This service's Consul identity (namespace, datacenter and partition as the leaf says)."""
        assert self._identity is not None
        return self._identity

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID of the leaf in use."""
        return self._current().spiffe_id

    @property
    def trust_domain(self) -> str:
        """The trust domain of the roots in use (Consul's ``TrustDomain``)."""
        return self._current().trust_domain

    @property
    def not_after(self) -> datetime.datetime:
        """When the leaf in use expires."""
        return self._current().not_after

    @property
    def serial_number(self) -> int:
        """The serial number of the leaf in use."""
        return self._current().serial

    @property
    def updates(self) -> int:
        """New material made current (1 after construction)."""
        return self._updates

    @property
    def errors(self) -> int:
        """Failed queries (each followed by a backoff and a retry)."""
        return self._errors

    @property
    def refused(self) -> int:
        """Answers that could not be made current (an expired leaf, a wrong identity...): the previous stayed."""
        return self._refused

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Block until ``predicate(source)`` holds (checked at every update, refusal or error)."""
        with self._changed:
            return self._changed.wait_for(lambda: bool(predicate(self)), timeout)

    def upstream(
        self, service: str, *, namespace: str | None = None, datacenter: str | None = None, partition: str | None = None
    ) -> ConsulServiceID:
        """The identity of Consul service ``service``: by default in this service's namespace, datacenter and
        partition (what the leaf says)."""
        own = self.identity
        try:
            return ConsulServiceID(
                service,
                namespace or own.namespace,
                datacenter or own.datacenter,
                partition if partition is not None else own.partition,
            )
        except ValueError as error:
            raise ConfigError("upstream", service, f"a Consul service identity ({error})") from None

    def client_context(self, upstream: str | ConsulServiceID, server_name: str | None = None) -> ReloadingContext:
        """A client context presenting the leaf, trusting the roots and requiring ``upstream``'s Consul SPIFFE ID.

        ``upstream`` is a service name (see :meth:`upstream` for the defaults) or a :class:`ConsulServiceID`;
        ``server_name``, if given, is sent as SNI instead of the URL's host. One context per (upstream,
        ``server_name``), shared and kept current by every later update.
        """
        target = self.upstream(upstream) if isinstance(upstream, str) else upstream
        self.resume()
        with self._lock:
            assert self._contexts.material is not None
            expected = target.expected(self._contexts.material)
            settings = TLSSettings(server_id=str(expected.spiffe_id), server_name=server_name)
            return self._contexts.client((target, server_name), target.expected, settings)

    def server_context(self) -> ReloadingContext:
        """A server context presenting the leaf and requiring a client certificate that chains to the roots."""
        self.resume()
        with self._lock:
            return self._contexts.server()

    def resume(self) -> None:
        """In a forked child, start this process's own watches (once); elsewhere nothing. Cheap: a pid check."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid() or self._closed:
                return
            self._pid = os.getpid()
        logger.info("Consul Connect (%s): watching again in forked process %d", self.agent.address, os.getpid())
        self._start()

    def close(self) -> None:
        """End the watches (a query in flight ends at once); contexts handed out keep the last material."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches)
        self._closed_event.set()
        with self._changed:
            self._changed.notify_all()
        if self._pid != os.getpid():
            return  # a forked child that never resumed: those clients are the parent's
        for watch in watches:
            watch.client.close()

    def __enter__(self) -> ConsulCASource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the watches ------------------------------------------------------------------------------------------

    def _current(self) -> Material:
        material = self._contexts.material
        assert material is not None
        return material

    def _start(self) -> None:
        query = ConsulQuery(self.service, passing=False, stale=False, wait=self._wait)
        scope = [
            (key, value) for key, value in (("ns", self.agent.namespace), ("partition", self.agent.partition)) if value
        ]
        leaf = BlockingQuery(
            query,
            self.agent,
            self.options,
            source=f"Consul Connect leaf of {self.service}",
            path=LEAF_PATH + quote(self.service, safe=""),
            params=scope,
        )
        roots = BlockingQuery(
            query, self.agent, self.options, source="Consul Connect CA roots", path=ROOTS_PATH, params=()
        )
        watches = [
            _Watch("leaf", leaf, self.agent, self._closed_event),
            _Watch("roots", roots, self.agent, self._closed_event),
        ]
        with self._lock:
            if self._closed:
                return
            self._watches = watches
        for watch in watches:
            threading.Thread(
                target=self._run, args=(watch,), name=f"meshlib-consul-ca-{watch.name}", daemon=True
            ).start()

    def _run(self, watch: _Watch) -> None:
        """One endpoint's loop: pause (rate limit or backoff), query, apply; until closed."""
        query = watch.query
        while not self._closed_event.is_set():
            delay = query.pause()
            if delay > 0:
                self._warn_if_expired()
                if self._closed_event.wait(delay):
                    return
            try:
                reply = watch.client.send(query.next_request())
            except _Closed:
                return
            try:
                document = query.document(reply)
                value: _Leaf | _Roots = _Leaf.parse(document) if watch.name == "leaf" else _Roots.parse(document)
            except DiscoveryError as error:
                self._failed(watch, error)
                continue
            except ValueError as error:
                self._failed(
                    watch,
                    query.failed(
                        DiscoveryError(
                            f"Consul answered with an unusable {watch.name}: {error}",
                            service=self.service,
                            source=query.source,
                        )
                    ),
                )
                continue
            query.accept(reply)
            recovered = query.recovered()
            if recovered:
                logger.info("Consul Connect (%s): the %s watch answers again", self.agent.address, watch.name)
            self._apply(watch, value)

    def _apply(self, watch: _Watch, value: _Leaf | _Roots) -> None:
        """Make the leaf and roots current if they changed and can be used; else keep the previous, logged."""
        with self._lock:
            if self._closed or value == watch.value:
                return  # unchanged: the index moved for something else
            leaf, roots = (value, self._watches[1].value) if watch.name == "leaf" else (self._watches[0].value, value)
            watch.value = value
            if not isinstance(leaf, _Leaf) or not isinstance(roots, _Roots):
                return  # the first of the two answers: wait for the other
            first = self._contexts.material is None
            refused: Exception | None = None
            try:
                now = datetime.datetime.now(datetime.timezone.utc)
                material, identity = _material(leaf, roots, self._identity, self.service, now)
                self._contexts.apply(material)  # builds every context first: a failure changes nothing
            except Exception as error:
                self._refused += 1
                self._last_error = f"an unusable {watch.name} ({type(error).__name__}: {error})"
                refused = error
            else:
                self._identity = identity
                self._updates += 1
                self._broken = False
                self._expiry_logged = False
        if refused is not None:
            if first:
                logger.warning(
                    "Consul Connect (%s): %s; waiting for a usable one", self.agent.address, self._last_error
                )
            else:
                logger.error(
                    "Consul Connect (%s) sent a %s that cannot be used; new connections keep the previous leaf %s "
                    "(valid until %s): %s",
                    self.agent.address,
                    watch.name,
                    self.spiffe_id,
                    _utc(self.not_after),
                    refused,
                )
        else:
            if not first:
                logger.info(
                    "Consul Connect (%s): new %s; leaf %s (serial %x) valid until %s; new connections use it",
                    self.agent.address,
                    watch.name,
                    material.spiffe_id,
                    material.serial,
                    _utc(material.not_after),
                )
            self._first.set()
        with self._changed:
            self._changed.notify_all()

    def _failed(self, watch: _Watch, error: DiscoveryError) -> None:
        """Record (and, once per outage, log) a failed query; the loop's backoff is already scheduled."""
        if isinstance(error, ConsulACLError) and watch.name == "leaf":
            error = ConsulACLError(
                f"{error}; the leaf certificate needs an ACL token with service:write on {self.service!r}",
                service=self.service,
                source=watch.query.source,
            )
        with self._lock:
            self._errors += 1
            self._last_error = str(error)
            material = self._contexts.material
            first_of_outage = material is not None and not self._broken
            self._broken = True
            if isinstance(error, ConsulACLError) and material is None and self._fatal is None:
                self._fatal = error
        if material is None and isinstance(error, ConsulACLError):
            self._first.set()  # construction reports it now: no point waiting out the timeout
        elif first_of_outage and material is not None:
            log = logger.error if isinstance(error, ConsulACLError) else logger.warning
            log(
                "Consul Connect (%s): the %s watch failed (%s); retrying with backoff; new connections keep the leaf "
                "%s (valid until %s) meanwhile",
                self.agent.address,
                watch.name,
                error,
                material.spiffe_id,
                _utc(material.not_after),
            )
        else:
            logger.debug("Consul Connect (%s): %s watch: %s", self.agent.address, watch.name, error)
        with self._changed:
            self._changed.notify_all()

    def _warn_if_expired(self) -> None:
        material = self._contexts.material
        if material is None or self._expiry_logged or not self._broken:
            return
        if material.not_after <= datetime.datetime.now(datetime.timezone.utc):
            self._expiry_logged = True
            logger.error(
                "Consul Connect (%s) still failing and the leaf %s expired at %s: peers will refuse new "
                "connections until the agent answers again",
                self.agent.address,
                material.spiffe_id,
                _utc(material.not_after),
            )

    # -- fork --------------------------------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child (only this thread runs): new locks; the parent's HTTP clients are abandoned."""
        _FORK.abandoned.append(self._watches)
        self._watches = []
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        closed, self._closed_event = self._closed_event, threading.Event()
        if closed.is_set():
            self._closed_event.set()
        self._broken = False
        reset_locks(self._contexts.contexts())


#: Every source of this process, for the fork hook, and what forked children inherited and must neither use nor
#: close.
_FORK = ForkReset("a Consul Connect CA source")
