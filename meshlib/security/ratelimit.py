"""Local rate limits per caller with Linkerd's ``HTTPLocalRateLimitPolicy`` semantics, enforced by GCRA.

**What is limited** (``policy.linkerd.io/v1alpha1`` ``HTTPLocalRateLimitPolicy``, as linkerd2-proxy's
``server-policy/src/local_rate_limit.rs`` applies it):

* ``total``: one bucket for the whole server, every request counts;
* ``identity``: one bucket per client identity (the verified peer SPIFFE ID); callers without an identity
  (plain TCP, or TLS without a client certificate) all share one "no identity" bucket, as in Linkerd;
* ``overrides``: named clients get their own rate *instead of* the identity limit (the total limit still
  applies). Like Linkerd, every override entry has ONE bucket shared by all the clients it lists; list a
  client in an entry of its own to give it a bucket of its own.

A request is admitted only if the total limit and the caller's limit (override or identity) both admit it, and
then it counts against both. Unlike linkerd2-proxy (which takes a cell from the total bucket before it asks the
identity bucket), a request one limit refuses consumes nothing from the other: a caller over its own limit
cannot drain the total that other callers share.

**Algorithm.** GCRA (the generic cell rate algorithm, as in ``redis-cell`` and ``throttled``), which is what
Linkerd's ``governor`` crate implements. Each bucket is one number, its theoretical arrival time ``tat``. With
emission interval ``T = 1/rate`` and burst ``B``: a request at ``now`` is admitted iff
``max(tat, now) + T - B*T <= now``, and then ``tat = max(tat, now) + T``; otherwise it may retry after
``max(tat, now) + T - B*T - now`` seconds. Linkerd builds its limiters with ``Quota::per_second(rps)``, whose
burst is ``rps``: a fresh bucket admits one second's worth at once, then one request every ``T``. meshlib does
the same (``burst`` defaults to ``ceil(rate)``; code may set it). Times are integer nanoseconds and ``T`` is
rounded *up* to a whole nanosecond, so the rate is never exceeded by rounding: in any interval of ``D``
seconds a bucket admits at most ``B + D/T`` requests.

**Bounded memory.** At most ``max_identities`` identity buckets are tracked (default 10,000; overrides, the
total and the no-identity bucket are fixed and not counted). A bucket whose ``tat <= now`` is *full*: it is
exactly equivalent to a bucket never seen, because every later decision depends on the state only through
``max(tat, t)`` for a later time ``t >= now``, which is ``t`` for both. So forgetting a full bucket never lets
its caller exceed its rate. When the table is full and a new identity arrives, meshlib forgets the least
recently admitted buckets if they are full; if the least recently admitted one is not full (``max_identities``
callers were all admitted within the last burst window), the newcomer is refused (``limit="identity"``,
``retry_after_s`` = when that bucket is full again) rather than letting anyone's state be forgotten: refusing
is the safe side. Time fed to the limiter never goes back (a ``now`` older than one already seen counts as
the newest seen), which keeps the equivalence true when threads read the clock in one order and take the lock
in another.

**Threads and fork.** One :class:`threading.Lock` per limiter, held for a few dictionary operations and never
across I/O; the clock is read under it. The limiter starts no thread; after ``os.fork()`` a child gets a new
lock (an at-fork hook), so a lock held by another thread of the parent at fork time cannot deadlock it.

**Configuration.** :func:`parse_rate_limits` reads the Linkerd YAML (or JSON) document; code builds
:class:`RateLimits` directly. See ``docs/security.md`` ("Rate limits per caller").
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from meshlib.errors import ConfigError, RoutesError, SourceError

__all__ = [
    "DEFAULT_MAX_IDENTITIES",
    "Limit",
    "Override",
    "RateLimitError",
    "RateLimiter",
    "RateLimits",
    "Verdict",
    "parse_rate_limits",
]

logger = logging.getLogger("meshlib")

#: How many identity buckets a :class:`RateLimiter` tracks at most by default.
DEFAULT_MAX_IDENTITIES = 10_000
#: Linkerd reads ``requestsPerSecond`` into a ``u32``.
MAX_RPS = 2**32 - 1
#: At most this many override entries, and client references in one entry (hostile input).
MAX_OVERRIDES = 1000
MAX_CLIENT_REFS = 1000
#: Full buckets forgotten at most per check when the table is at its bound (keeps the lock hold short).
_SWEEP = 32
_NS = 1_000_000_000
_API = "policy.linkerd.io/v1alpha1"
_KIND = "HTTPLocalRateLimitPolicy"
_SERVER_GROUP = "policy.linkerd.io"
_SPIFFE = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
#: The ``tat`` of a bucket never used: earlier than any time (a full bucket).
_FRESH = -(2**62)

LimitName = Literal["total", "identity", "override"]


class RateLimitError(SourceError):
    """A rate limit source is invalid: names the source, the document, the field path, the value found and
    what was expected (the same shape as :class:`~meshlib.errors.RoutesError`)."""


# -- configuration ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate: ``requests_per_second`` (> 0, may be fractional in code) and ``burst``, the requests a fresh
    bucket admits at once (default ``ceil(requests_per_second)``: one second's worth, as Linkerd)."""

    requests_per_second: float
    burst: int | None = None

    def __post_init__(self) -> None:
        rps = self.requests_per_second
        if isinstance(rps, bool) or not isinstance(rps, (int, float)) or not math.isfinite(rps) or rps <= 0:
            raise ConfigError("Limit.requests_per_second", rps, "a finite number of requests per second > 0")
        if rps < 1e-6:
            raise ConfigError("Limit.requests_per_second", rps, "at least 1e-6 (one request in 11.6 days)")
        burst = self.burst
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
            raise ConfigError("Limit.burst", burst, "an integer >= 1 (or None: one second's worth)")

    @property
    def effective_burst(self) -> int:
        """The burst in force: ``burst``, or one second's worth of requests (at least 1)."""
        return self.burst if self.burst is not None else max(1, math.ceil(self.requests_per_second))


@dataclass(frozen=True, slots=True)
class Override:
    """A rate for named clients, replacing the identity limit for them; one bucket shared by all of them.

    ``clients``: full SPIFFE IDs (``spiffe://prod.example/ns/shop/sa/web``), or bare paths
    (``/ns/shop/sa/web``) that match that path in any trust domain.
    """

    limit: Limit
    clients: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.limit, Limit):
            raise ConfigError("Override.limit", self.limit, "a Limit")
        if isinstance(self.clients, str):
            raise ConfigError("Override.clients", self.clients, "a sequence of SPIFFE IDs or paths, not one string")
        for client in self.clients:
            if not isinstance(client, str) or not (client.startswith(_SPIFFE) or client.startswith("/")):
                raise ConfigError(
                    "Override.clients", client, "a SPIFFE ID (spiffe://td/ns/NS/sa/NAME) or a path (/ns/NS/sa/NAME)"
                )


@dataclass(frozen=True, slots=True)
class RateLimits:
    """What one server enforces: a ``total`` limit, a per-``identity`` limit, ``overrides``; each optional
    (no limit at all admits everything). ``name`` labels the policy in logs (``namespace/name`` from YAML)."""

    total: Limit | None = None
    identity: Limit | None = None
    overrides: tuple[Override, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        for attr in ("total", "identity"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, Limit):
                raise ConfigError(f"RateLimits.{attr}", value, "a Limit or None")
        if isinstance(self.overrides, Override) or not all(isinstance(o, Override) for o in self.overrides):
            raise ConfigError("RateLimits.overrides", self.overrides, "a tuple of Override")


# -- the limiter --------------------------------------------------------------------------------------------------


class Verdict(NamedTuple):
    """One decision. ``limit``: the limit that refused the request, or, admitted, the caller's own limit
    (``"override"``/``"identity"``, else ``"total"``; ``None`` when nothing is limited). ``key``: the bucket:
    the caller's identity for ``identity``/``override`` (``""`` for the shared no-identity bucket), ``"*"``
    for ``total``. ``retry_after_s``: 0 when admitted, else seconds until that request would be admitted."""

    allowed: bool
    retry_after_s: float
    limit: LimitName | None
    key: str

    @property
    def retry_after(self) -> str:
        """The ``Retry-After`` header value: whole seconds rounded up, as HTTP requires (RFC 9110, 10.2.3)."""
        return str(math.ceil(self.retry_after_s))


class _Rate:
    """A limit's GCRA constants in integer nanoseconds: ``interval`` (T, rounded up) and ``tolerance`` (B*T)."""

    __slots__ = ("interval", "tolerance")

    def __init__(self, limit: Limit) -> None:
        self.interval = math.ceil(_NS / limit.requests_per_second)
        self.tolerance = self.interval * limit.effective_burst


_LIVE: weakref.WeakSet[RateLimiter] = weakref.WeakSet()


class RateLimiter:
    """Decides, per request, whether a caller is within its limits (:meth:`check`). Thread-safe.

    ``limits``: what to enforce. ``max_identities``: identity buckets tracked at most (see the module
    docstring for why refusing a newcomer, not forgetting a busy bucket, is what happens at the bound).
    ``clock``: seconds, never going back (default :func:`time.monotonic`); inject one for exact tests.
    A new configuration means a new limiter (its buckets start full).
    """

    __slots__ = (
        "__weakref__",
        "_by_id",
        "_by_path",
        "_clock",
        "_identities",
        "_identity",
        "_lock",
        "_max",
        "_none_tat",
        "_now",
        "_override_tats",
        "_overrides",
        "_total",
        "_total_tat",
        "limits",
    )

    def __init__(
        self,
        limits: RateLimits,
        *,
        max_identities: int = DEFAULT_MAX_IDENTITIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(limits, RateLimits):
            raise ConfigError("RateLimiter.limits", limits, "a RateLimits")
        if isinstance(max_identities, bool) or not isinstance(max_identities, int) or max_identities < 1:
            raise ConfigError("RateLimiter.max_identities", max_identities, "an integer >= 1")
        self.limits = limits
        self._max = max_identities
        self._clock = clock
        self._lock = threading.Lock()
        self._total = _Rate(limits.total) if limits.total is not None else None
        self._identity = _Rate(limits.identity) if limits.identity is not None else None
        self._overrides = [_Rate(o.limit) for o in limits.overrides]
        self._override_tats = [_FRESH] * len(limits.overrides)
        self._by_id: dict[str, int] = {}
        self._by_path: dict[str, int] = {}
        for index, override in enumerate(limits.overrides):  # a client in several entries: the last wins (Linkerd)
            for client in override.clients:
                (self._by_id if client.startswith(_SPIFFE) else self._by_path)[client] = index
        self._identities: OrderedDict[str, int] = OrderedDict()
        self._none_tat = _FRESH
        self._total_tat = _FRESH
        self._now = _FRESH
        _LIVE.add(self)

    def __len__(self) -> int:
        """Identity buckets tracked now (at most ``max_identities``)."""
        return len(self._identities)

    def _override_of(self, identity: str) -> int | None:
        index = self._by_id.get(identity)
        if index is None and self._by_path and identity.startswith(_SPIFFE):
            slash = identity.find("/", len(_SPIFFE))
            if slash > 0:
                index = self._by_path.get(identity[slash:])
        return index

    def check(self, identity: str | None, now: float | None = None) -> Verdict:
        """Count one request from ``identity`` (the verified peer SPIFFE ID; ``None`` or ``""``: none) at
        ``now`` (seconds on the limiter's clock; default: read it) if every limit admits it.

        Refused: nothing is consumed anywhere; the verdict names the limit that refused (the later one to
        admit when both refuse) and how long to wait.
        """
        override = self._override_of(identity) if identity and (self._by_id or self._by_path) else None
        with self._lock:
            at = round((self._clock() if now is None else now) * _NS)
            if at < self._now:
                at = self._now
            else:
                self._now = at
            wait_total = 0
            new_total = 0
            total = self._total
            if total is not None:
                tat = self._total_tat
                new_total = (tat if tat > at else at) + total.interval
                wait_total = new_total - total.tolerance - at
            # the caller's own limit
            limit: LimitName | None
            key = identity or ""
            wait_own = 0
            new_own = 0
            rate: _Rate | None
            if override is not None:
                limit, rate = "override", self._overrides[override]
                tat = self._override_tats[override]
            elif self._identity is not None:
                limit, rate = "identity", self._identity
                if identity:
                    found = self._identities.get(identity)
                    if found is None:
                        tat = _FRESH
                        if len(self._identities) >= self._max:
                            wait_own = self._make_room(at)
                    else:
                        tat = found
                else:
                    tat = self._none_tat
            else:
                limit, rate, tat = None, None, _FRESH
            if rate is not None and wait_own <= 0:
                new_own = (tat if tat > at else at) + rate.interval
                wait_own = new_own - rate.tolerance - at
            if wait_total > 0 or wait_own > 0:
                if wait_total >= wait_own:
                    return Verdict(False, wait_total / _NS, "total", "*")
                return Verdict(False, wait_own / _NS, limit, key)
            # admitted by both: count it in both
            if total is not None:
                self._total_tat = new_total
            if override is not None:
                self._override_tats[override] = new_own
            elif limit == "identity":
                if identity:
                    self._identities[identity] = new_own
                    self._identities.move_to_end(identity)
                else:
                    self._none_tat = new_own
            elif total is not None:
                limit, key = "total", "*"
            return Verdict(True, 0.0, limit, key)

    def _make_room(self, at: int) -> int:
        """Forget full buckets, least recently admitted first; 0 if there is room now, else the nanoseconds
        until the least recently admitted bucket is full (the table is busy: the newcomer is refused)."""
        table = self._identities
        for _ in range(_SWEEP):
            oldest = next(iter(table))
            tat = table[oldest]
            if tat > at:
                return 0 if len(table) < self._max else tat - at
            del table[oldest]
            if not table:
                break
        return 0

    def _after_fork(self) -> None:
        self._lock = threading.Lock()


def _after_fork_in_child() -> None:
    for limiter in list(_LIVE):
        limiter._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the Linkerd document -----------------------------------------------------------------------------------------


def parse_rate_limits(text: str | bytes, *, source: str, trust_domain: str | None = None) -> RateLimits:
    """Read one ``policy.linkerd.io/v1alpha1`` ``HTTPLocalRateLimitPolicy`` (YAML or JSON) into
    :class:`RateLimits`.

    The source must hold exactly one such document (Linkerd: one policy per Server; meshlib's file is for
    the one server of this workload); documents of other kinds are skipped. Validation is the CRD's plus
    Linkerd's admission webhook: ``targetRef`` a ``policy.linkerd.io`` ``Server``; every ``requestsPerSecond``
    an integer from 1 to 2**32-1; ``identity`` and every override at most ``total``; ``clientRefs`` of kind
    ``ServiceAccount`` (core group), namespace defaulting to the policy's (itself defaulting to ``default``).
    A client reference becomes ``spiffe://<trust_domain>/ns/<ns>/sa/<name>``, or, without ``trust_domain``,
    the path ``/ns/<ns>/sa/<name>`` in any trust domain the TLS settings accept. Bounded like the routes file
    (size, documents, depth, nodes). Raises :class:`RateLimitError` naming source, document, field, value and
    what was expected.
    """
    from meshlib.control.documents import load_documents  # the bounded loader (only when parsing)
    from meshlib.routing import gateway_api as g  # its field readers

    if trust_domain is not None and (not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain)):
        raise RateLimitError(source, "", "trust_domain", trust_domain, "a SPIFFE trust domain (a-z 0-9 . - _)")
    try:
        found: list[RateLimits] = []
        for label, value in load_documents(text, source, error=RateLimitError, what="rate limits"):
            doc = g._Doc(source, label)
            if not isinstance(value, Mapping):
                doc.fail("", value, "a Kubernetes object (apiVersion, kind, metadata, spec)")
            kind, api = value.get("kind"), value.get("apiVersion")
            if not isinstance(kind, str) or not isinstance(api, str):
                doc.fail(
                    "kind" if not isinstance(kind, str) else "apiVersion",
                    kind if not isinstance(kind, str) else api,
                    "a Kubernetes object (apiVersion and kind strings)",
                )
            if kind != _KIND:
                logger.debug("rate limits %s, %s: %s %s skipped (not an %s)", source, label, api, kind, _KIND)
                continue
            if api != _API:
                doc.fail("apiVersion", api, _API)
            _mapping(g, doc, "", value, ("apiVersion", "kind", "metadata", "spec", "status"))
            namespace, name, _ = g._metadata(doc, value.get("metadata"))
            doc.label = f"{label} ({_KIND} {namespace}/{name})"
            found.append(_spec(g, doc, value.get("spec"), namespace=namespace, name=name, trust_domain=trust_domain))
    except RoutesError as exc:
        raise RateLimitError(exc.source, exc.document, exc.path, exc.value, exc.expected) from None
    if len(found) != 1:
        raise RateLimitError(source, "", "", f"{len(found)} {_KIND} documents", f"exactly one {_KIND} ({_API})")
    return found[0]


def _mapping(g: Any, doc: Any, path: str, value: object, allowed: Sequence[str]) -> Mapping[str, Any]:
    result: Mapping[str, Any] = g._mapping(doc, path, value, allowed)
    return result


def _rps(g: Any, doc: Any, path: str, value: object) -> int:
    body = _mapping(g, doc, path, value, ("requestsPerSecond",))
    if "requestsPerSecond" not in body:
        doc.fail(f"{path}.requestsPerSecond", None, "an integer from 1 to 4,294,967,295 (required)")
    rps: int = g._integer(doc, f"{path}.requestsPerSecond", body["requestsPerSecond"], 1, MAX_RPS)
    return rps


def _spec(g: Any, doc: Any, value: object, *, namespace: str, name: str, trust_domain: str | None) -> RateLimits:
    spec = _mapping(g, doc, "spec", value, ("targetRef", "total", "identity", "overrides"))
    target = _mapping(g, doc, "spec.targetRef", spec.get("targetRef"), ("group", "kind", "name"))
    if target.get("group") != _SERVER_GROUP or target.get("kind") != "Server":
        shown = f"{target.get('group')!r}/{target.get('kind')!r}"
        doc.fail(
            "spec.targetRef", shown, f"a Server (group {_SERVER_GROUP}, kind Server): the only target Linkerd allows"
        )
    g._string(doc, "spec.targetRef.name", target.get("name"), max_len=253)
    total = _rps(g, doc, "spec.total", spec["total"]) if spec.get("total") is not None else None
    identity = _rps(g, doc, "spec.identity", spec["identity"]) if spec.get("identity") is not None else None
    if total is not None and identity is not None and identity > total:
        doc.fail("spec.identity.requestsPerSecond", identity, f"at most total.requestsPerSecond ({total})")
    overrides: list[Override] = []
    for index, item in enumerate(g._list(doc, "spec.overrides", spec.get("overrides"), MAX_OVERRIDES)):
        where = f"spec.overrides[{index}]"
        body = _mapping(g, doc, where, item, ("requestsPerSecond", "clientRefs"))
        if "requestsPerSecond" not in body:
            doc.fail(f"{where}.requestsPerSecond", None, "an integer from 1 to 4,294,967,295 (required)")
        rps = g._integer(doc, f"{where}.requestsPerSecond", body["requestsPerSecond"], 1, MAX_RPS)
        if total is not None and rps > total:
            doc.fail(f"{where}.requestsPerSecond", rps, f"at most total.requestsPerSecond ({total})")
        if "clientRefs" not in body:
            doc.fail(f"{where}.clientRefs", None, "a list of ServiceAccount references (required)")
        clients: list[str] = []
        for number, item_ref in enumerate(g._list(doc, f"{where}.clientRefs", body["clientRefs"], MAX_CLIENT_REFS)):
            at = f"{where}.clientRefs[{number}]"
            ref = _mapping(g, doc, at, item_ref, ("group", "kind", "namespace", "name"))
            if ref.get("group") not in (None, "", "core") or ref.get("kind") != "ServiceAccount":
                doc.fail(
                    at,
                    f"{ref.get('group')!r}/{ref.get('kind')!r}",
                    "a ServiceAccount (core group, kind ServiceAccount)",
                )
            sa = g._pattern(doc, f"{at}.name", ref.get("name"), g._PRECISE_HOSTNAME, "a ServiceAccount name (RFC 1123)")
            ns = ref.get("namespace")
            ns = (
                namespace
                if ns is None
                else g._pattern(doc, f"{at}.namespace", ns, g._NAMESPACE, "a namespace (RFC 1123 label)", max_len=63)
            )
            path = f"/ns/{ns}/sa/{sa}"
            clients.append(f"{_SPIFFE}{trust_domain}{path}" if trust_domain else path)
        overrides.append(Override(Limit(rps), tuple(clients)))
    return RateLimits(
        total=Limit(total) if total is not None else None,
        identity=Limit(identity) if identity is not None else None,
        overrides=tuple(overrides),
        name=f"{namespace}/{name}",
    )
