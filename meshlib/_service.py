"""One mesh service inside one client: discovery cache, balancer, per-endpoint stats and transports.

A :class:`Service` turns each new discovery :class:`~meshlib.discovery.cache.Snapshot` into an immutable
:class:`Active` view (endpoint stats, one picker per SRV priority level) and swaps it in with a single
attribute assignment, so the request path reads ``service.active`` without a lock (grpc-go's
picker-per-state model). Each endpoint's pooled inner transport is made on its first request. Stats and
transports of endpoints that stay are carried over, so latency history and pooled connections survive
refreshes; transports of endpoints that leave are closed once their last in-flight request is done.

The class is generic over the transport type so ``Client`` (``httpx.BaseTransport``) and ``AsyncClient``
(``httpx.AsyncBaseTransport``) share every decision; only creating and closing transports differs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from meshlib._config import MeshConfig, ServiceConfig, service_key
from meshlib._config.env import wrr_settings_from_env, zone_settings_from_env
from meshlib._testmode import MODE as _TESTING
from meshlib.balance import make_balancer
from meshlib.balance.base import Balancer, BalancerOptions, EndpointStats, Picker
from meshlib.balance.slow_start import slow_start_factor
from meshlib.discovery.base import Endpoint, Resolver
from meshlib.discovery.cache import DiscoveryCache, Snapshot
from meshlib.errors import NoEndpointsError
from meshlib.resilience.breaker import STATE_CLOSED, EndpointBreaker
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.hedging import HedgeState
from meshlib.resilience.limit import ConcurrencyLimit
from meshlib.resilience.outlier import CONSECUTIVE, FAILURE_PERCENTAGE, SUCCESS_RATE, OutlierDetector
from meshlib.status import BudgetStatus, DiscoveryStatus, EndpointStatus, HedgeStatus, ServiceStatus, ZoneStatus

if TYPE_CHECKING:
    from meshlib._config.model import ResilienceSettings
    from meshlib.resilience.adaptive import AdaptiveConcurrencyLimit

logger = logging.getLogger("meshlib.discovery")

T = TypeVar("T")

#: One endpoint's ``(host, port)``: the key of its stats, breaker and pool (``Endpoint.address`` is the
#: ``host:port`` string shown to people).
HostPort = tuple[str, int]


class ZoneRouting(Protocol):
    """What a zone-aware picker (:mod:`meshlib.balance.locality`) adds to :class:`Picker`'s ``pick``."""

    def pick(
        self,
        *,
        key: bytes | None = None,
        exclude: Container[Endpoint] = (),
        unhealthy: frozenset[HostPort] = ...,
        panic: bool = False,
    ) -> EndpointStats | None: ...


def adaptive_limit(settings: ResilienceSettings) -> AdaptiveConcurrencyLimit:
    """The adaptive in-flight limit ``settings`` ask for (imported only when a service enables it)."""
    from meshlib.resilience.adaptive import AdaptiveConcurrencyLimit, AdaptiveSettings

    least, start, most = settings.adaptive_bounds()
    window = settings.adaptive_window
    return AdaptiveConcurrencyLimit(
        AdaptiveSettings(
            initial_limit=start,
            min_limit=least,
            max_limit=most,
            min_window=window,
            max_window=max(window, 1.0),  # AdaptiveSettings' max_window
            window_samples=settings.adaptive_window_samples,
        )
    )


@dataclass(frozen=True, slots=True)
class Active(Generic[T]):
    """What the request path reads: built on the slow path, never mutated afterwards."""

    snapshot: Snapshot
    stats: dict[HostPort, EndpointStats]
    #: One picker per SRV priority level, lowest (most preferred) first.
    pickers: tuple[Picker, ...]
    #: The pickers route by zone (``MESHLIB_ZONE``): they take the unhealthy set and the panic flag.
    zoned: bool = False

    def pick(
        self,
        key: bytes | None,
        exclude: Container[Endpoint],
        unhealthy: frozenset[HostPort] = frozenset(),
        panic: bool = False,
    ) -> EndpointStats | None:
        """Pick from the most preferred priority level that still has a usable endpoint (RFC 2782).

        ``unhealthy`` (the addresses skipped now: ejected or behind an open breaker, also in ``exclude``) and
        ``panic`` matter only to zone-aware pickers, which count healthy endpoints per zone and stand aside
        in panic (Envoy).
        """
        if self.zoned:
            for zone_picker in cast("tuple[ZoneRouting, ...]", self.pickers):
                chosen = zone_picker.pick(key=key, exclude=exclude, unhealthy=unhealthy, panic=panic)
                if chosen is not None:
                    return chosen
            return None
        for picker in self.pickers:
            chosen = picker.pick(key=key, exclude=exclude)
            if chosen is not None:
                return chosen
        return None


class Service(Generic[T]):
    """A logical service as one client sees it."""

    def __init__(
        self,
        config: ServiceConfig,
        mesh: MeshConfig,
        resolver: Resolver,
        new_transport: Callable[[Endpoint], T],
    ) -> None:
        self.name = config.name
        self.config = config
        self.resolver = resolver
        self.hash_header = config.hash_header or mesh.hash_header
        self.lb_name = config.lb or mesh.lb
        self._mesh = mesh
        self.cache = DiscoveryCache(
            config.name, resolver.source, ttl_min=mesh.ttl_min, ttl_max=mesh.ttl_max, max_stale=mesh.max_stale
        )
        self._new_transport = new_transport
        key = service_key(config.name)
        #: Zone-aware routing (``MESHLIB_ZONE*``; checked when the client was built): off without a local zone.
        self.zones = zone_settings_from_env(mesh.environ, key)
        #: The most endpoints seen per zone (the callers' assumed spread: :meth:`_zone_picker`).
        self._zone_high_water: dict[str | None, int] = {}
        #: The service's call policy (defaults, env, per-service env); scopes and requests narrow it per call.
        self.policy = mesh.policy_for(key)
        settings = config.resilience if config.resilience is not None else mesh.resilience_for(key)
        self.settings = settings
        self.balancer: Balancer = make_balancer(
            self.lb_name,
            BalancerOptions(
                default_rtt=mesh.default_rtt,
                decay=mesh.ewma_decay,
                slow_start=settings.slow_start,
                # from the client's environment (checked when it was built), not the process's
                wrr=wrr_settings_from_env(mesh.environ) if self.lb_name == "weighted_round_robin" else None,
            ),
        )
        # Resilience state shared by every call to this service from this client (sync and async alike).
        self.budget = RetryBudget(
            ttl=settings.retry_budget_ttl,
            min_retries_per_second=settings.retry_budget_min_per_second,
            percent_can_retry=settings.retry_budget_fraction,
        )
        #: Hedging's budget, latency window and counters (used by calls whose policy hedges).
        self.hedging = HedgeState(settings.hedge)
        #: Where the in-flight limit comes from, for the error of a call it refuses.
        self.limit_source = (
            f"circuit_breakers max_requests of {config.variable}"
            if config.target.startswith("xds-cluster:")
            else "MESHLIB_MAX_INFLIGHT"
        )
        #: The service's in-flight limit: fixed, or learnt from latency when ``adaptive_concurrency`` is set. Chosen
        #: here once; the request path calls ``try_acquire()``/``release(rtt)`` on either the same way.
        self.limit: ConcurrencyLimit | AdaptiveConcurrencyLimit
        if settings.adaptive_concurrency:
            self.limit = adaptive_limit(settings)
            self.limit_source = "the adaptive concurrency limit's current value (MESHLIB_ADAPTIVE_CONCURRENCY)"
        else:
            self.limit = ConcurrencyLimit(settings.max_inflight)
        #: Calls the control plane drops before any endpoint is chosen (an xDS cluster's EDS
        #: ``drop_overloads``: :class:`~meshlib.control.xds.eds_resolver.Drops`); ``None`` for other services.
        self.drops: Any = getattr(resolver, "drops", None)
        #: Every call goes over TLS whatever its URL's scheme (``ServiceConfig.tls_required``).
        self.tls_required = config.tls_required
        self.detector: OutlierDetector[HostPort] = OutlierDetector(
            settings.outlier_failures,
            settings.outlier_base_ejection,
            settings.outlier_max_ejection,
            settings.outlier_max_percent,
            interval=settings.outlier_interval,
            success_rate=settings.outlier_success_rate,
            failure_percentage=settings.outlier_failure_percentage,
            name=config.name,
        )
        #: The fewest endpoints at which a rate-based detector (success rate, failure percentage) can eject, or
        #: ``None`` when both are off: from then on the client's sweep evaluates the detector every interval.
        self.sweep_from: int | None = min(
            (rule.minimum_hosts for rule in (self.detector.success_rate, self.detector.failure_percentage) if rule),
            default=None,
        )
        #: Breakers by endpoint address, created on an endpoint's first failure (:meth:`breaker_for`) and kept
        #: across refreshes like the stats. Replaced, never mutated, so the request path reads it without a lock.
        self.breakers: dict[HostPort, EndpointBreaker] = {}
        # Addresses whose breaker is not closed: maintained by the breakers' listener, read per attempt.
        self._not_closed: frozenset[HostPort] = frozenset()
        self._budget_logged = 0.0
        self.active: Active[T] | None = None
        #: Each endpoint's pooled inner transport, made on its first request (:meth:`transport_for`): a
        #: service with 10,000 endpoints does not open 10,000 pools, nor build them on its first request.
        #: Only ever added to under the update lock; the request path reads it without one.
        self.transports: dict[HostPort, T] = {}
        #: Transports of endpoints that left while requests were still using them: closed when those end.
        self.retiring: dict[HostPort, tuple[EndpointStats, T]] = {}
        self._update_lock = threading.Lock()
        #: Testing mode's view (:meth:`stand_in`): one endpoint named after the service, no discovery.
        self._stand_in: Active[T] | None = None

    def stand_in(self, port: int) -> Active[T]:
        """Testing mode (:func:`meshlib.testing.set_testing`): a view of one stand-in endpoint, the service's name.

        Made on first use without asking discovery (a user's unit test has no DNS or Consul) and kept apart
        from the discovered view, which it neither replaces nor starts. Requests keep their logical URL in
        testing mode, so the stand-in only holds the call's bookkeeping (stats, the pool it is sent through).
        """
        view = self._stand_in
        if view is None:
            with self._update_lock:
                view = self._stand_in
                if view is None:
                    endpoint = Endpoint(self.name.lower(), port)
                    stats = EndpointStats(endpoint, default_rtt=self._mesh.default_rtt, decay=self._mesh.ewma_decay)
                    snapshot = Snapshot(endpoints=(endpoint,), fetched_at=time.monotonic(), version=0)
                    picker = self.balancer.build([stats])
                    view = self._stand_in = Active(
                        snapshot=snapshot, stats={(endpoint.host, port): stats}, pickers=(picker,)
                    )
        return view

    def current(self) -> Active[T]:
        """The active view, or :class:`NoEndpointsError` if discovery has nothing usable (or too stale)."""
        if _TESTING.enabled and self._stand_in is not None:
            return self._stand_in
        active = self.active
        if active is None or self.cache.consecutive_failures:
            self.cache.usable()  # raises when there is nothing, or only a too-stale set
            if active is None:
                raise NoEndpointsError(self.name, self.resolver.source, "endpoints not applied yet")
        return active

    def apply(self, snapshot: Snapshot) -> list[T]:
        """Build and swap in the view for ``snapshot``; returns transports to close now (nothing in flight).

        After the first set, only the difference is applied (set operations in C, then work per changed
        endpoint), so 1 % churn on 10,000 endpoints does not walk every endpoint in Python; the pickers are
        rebuilt whole, as they must be.
        """
        with self._update_lock:
            old = self.active
            if old is None:
                stats = self._build(snapshot.endpoints)
                to_close: list[T] = []
            else:
                stats, to_close = self._diff(old, snapshot.endpoints)
            self._update_breakers(stats)
            self.detector.set_endpoints(stats.keys())
            levels: dict[int, list[EndpointStats]] = {}
            for s in stats.values():
                levels.setdefault(s.endpoint.priority, []).append(s)
            zones = self.zones
            if zones.zone is not None and self.lb_name != "ring_hash":  # Envoy does not zone-route ring hash
                seen = self._zone_high_water
                for zone, count in Counter(s.endpoint.zone for s in stats.values()).items():
                    if zone is not None and count > seen.get(zone, 0):
                        seen[zone] = count
                callers = dict(seen)  # each picker keeps its own copy: later sets do not change it
                pickers = tuple(self._zone_picker(levels[p], callers) for p in sorted(levels))
                self.active = Active(snapshot=snapshot, stats=stats, pickers=pickers, zoned=True)
            else:
                pickers = tuple(self.balancer.build(levels[p]) for p in sorted(levels))
                self.active = Active(snapshot=snapshot, stats=stats, pickers=pickers)
            _log_change(self.name, old.stats if old else {}, stats)
            return to_close

    def _zone_picker(self, level: list[EndpointStats], callers: dict[str | None, int]) -> Picker:
        """One priority level's picker when ``MESHLIB_ZONE`` is set: Envoy's zone-aware routing, or priority
        failover across zones with ``MESHLIB_ZONE_FAILOVER`` (docs/locality.md); the service's balancer picks
        within each zone.

        ``callers``: Envoy divides callers by zone from its local cluster, which a library does not see. meshlib
        assumes callers are spread like the most endpoints this service has had in each zone since the client
        started (a high-water mark): endpoints that fail, are ejected or leave discovery (a Consul check going
        critical) lower their zone's healthy share but not its caller share, so the zone keeps only the traffic
        its remaining endpoints can take, as Envoy's formula intends.
        """
        from meshlib.balance.locality import FailoverPicker, ZoneAwarePicker

        zones = self.zones
        balancer = self.balancer
        if zones.failover:
            return FailoverPicker(
                level, balancer.build, local_zone=zones.zone, rng=balancer.rng, order=zones.failover_order
            )
        return ZoneAwarePicker(
            level,
            balancer.build,
            local_zone=zones.zone,
            rng=balancer.rng,
            min_cluster_size=zones.min_cluster_size,
            callers=callers,
        )

    def needs_sweep(self) -> bool:
        """Whether rate-based ejection can act on the current endpoint set (the client then sweeps it)."""
        active = self.active
        return self.sweep_from is not None and active is not None and len(active.stats) >= max(self.sweep_from, 1)

    def _build(self, endpoints: tuple[Endpoint, ...]) -> dict[HostPort, EndpointStats]:
        """Stats for a first endpoint set (an address listed twice keeps its first entry)."""
        stats: dict[HostPort, EndpointStats] = {}
        for endpoint in endpoints:
            address = (endpoint.host, endpoint.port)
            if address not in stats:
                stats[address] = self._admit(address, endpoint)
        return stats

    def _admit(self, address: HostPort, endpoint: Endpoint) -> EndpointStats:
        """Stats of an endpoint joining the set: new, or back (with its pool) before its old requests ended."""
        if address in self.retiring:
            existing, transport = self.retiring.pop(address)
            existing.endpoint = endpoint
            self.transports[address] = transport
            return existing
        return EndpointStats(endpoint, default_rtt=self._mesh.default_rtt, decay=self._mesh.ewma_decay)

    def transport_for(self, stats: EndpointStats) -> T:
        """The endpoint's pooled inner transport, made on first use (once: the update lock orders makers)."""
        endpoint = stats.endpoint
        address = (endpoint.host, endpoint.port)
        transport = self.transports.get(address)
        if transport is not None:
            return transport
        with self._update_lock:
            transport = self.transports.get(address)
            if transport is not None:
                return transport
            retired = self.retiring.get(address)
            if retired is not None:
                return retired[1]
            transport = self._new_transport(endpoint)
            active = self.active
            stand_in = self._stand_in
            if (active is not None and active.stats.get(address) is stats) or (
                stand_in is not None and stand_in.stats.get(address) is stats
            ):
                self.transports[address] = transport
            else:  # the endpoint left between the pick and now: serve this attempt, close the pool after it
                self.retiring[address] = (stats, transport)
            return transport

    def _diff(self, old: Active[T], endpoints: tuple[Endpoint, ...]) -> tuple[dict[HostPort, EndpointStats], list[T]]:
        """The new stats from the old ones plus the difference; transports of departed endpoints to close now."""
        before, after = frozenset(old.snapshot.endpoints), frozenset(endpoints)
        joined: dict[HostPort, Endpoint] = {}
        for endpoint in after - before:
            joined.setdefault((endpoint.host, endpoint.port), endpoint)
        stats = dict(old.stats)
        to_close: list[T] = []
        for endpoint in before - after:
            address = (endpoint.host, endpoint.port)
            if address in joined or address not in stats or stats[address].endpoint in after:
                continue  # still there with new weight or metadata (updated below), or a duplicate entry
            gone, transport = stats.pop(address), self.transports.pop(address, None)
            if transport is None:
                continue  # never used: no pool was ever made
            if gone.inflight > 0:
                self.retiring[address] = (gone, transport)  # closed when its last request ends
            else:
                to_close.append(transport)
        for address, endpoint in joined.items():
            existing = stats.get(address)
            if existing is not None:
                existing.endpoint = endpoint  # weight or metadata changed; latency history and pool stay
            else:
                stats[address] = joiner = self._admit(address, endpoint)
                joiner.joined_at = self.balancer.clock()  # joined a live set: slow start may ramp it
        return stats, to_close

    def _update_breakers(self, stats: dict[HostPort, EndpointStats]) -> None:
        """Forget the breakers of endpoints that left (the others keep their state)."""
        if any(address not in stats for address in self.breakers):
            self.breakers = {a: b for a, b in self.breakers.items() if a in stats}
            self._not_closed = frozenset(a for a, b in self.breakers.items() if b.state is not STATE_CLOSED)

    def breaker_for(self, address: HostPort) -> EndpointBreaker:
        """The endpoint's breaker, created on its first failure.

        Lazily, because a breaker costs about 25 µs to build and healthy endpoints never need one: building
        them for every endpoint of a 10,000-endpoint service would stall the event loop applying the set.
        """
        breaker = self.breakers.get(address)
        if breaker is not None:
            return breaker
        settings = self.settings
        with self._update_lock:
            breaker = self.breakers.get(address)
            if breaker is None:
                breaker = EndpointBreaker(
                    f"{self.name}/{address[0]}:{address[1]}",
                    fail_max=settings.breaker_failures,
                    reset_timeout=settings.breaker_reset,
                    max_reset_timeout=max(settings.breaker_reset, 60.0),
                    listeners=(self._breaker_changed,),
                )
                self.breakers = {**self.breakers, address: breaker}  # copy-on-write: readers take no lock
            return breaker

    def _breaker_changed(self, breaker: EndpointBreaker, old: str, new: str) -> None:
        with self._update_lock:
            self._not_closed = frozenset(a for a, b in self.breakers.items() if b.state is not STATE_CLOSED)

    def open_breakers(self) -> frozenset[HostPort]:
        """Addresses whose breaker refuses requests right now (open, penalty not yet over)."""
        not_closed = self._not_closed
        if not not_closed:
            return not_closed
        breakers = self.breakers
        return frozenset(a for a in not_closed if a in breakers and not breakers[a].available())

    def unhealthy(self) -> tuple[frozenset[HostPort], frozenset[HostPort]]:
        """``(skip, held)`` from one reading: the addresses the balancer should skip (ejected by outlier detection
        or behind an open breaker) and, of those, the ones behind an open breaker. One reading, because a
        breaker whose penalty ends between two would be neither skipped nor reported as open."""
        ejected = self.detector.ejected()
        if not self._not_closed:
            return ejected, self._not_closed  # no breaker open: nothing held (and nothing allocated)
        held = self.open_breakers()
        return (ejected | held if held else ejected), held

    def hash_key(self, request: Any) -> bytes | None:
        """The request's consistent-hashing key (ring_hash only)."""
        if self.lb_name != "ring_hash":
            return None
        value = request.headers.get(self.hash_header)
        return value.encode() if value is not None else None

    def view(self) -> ServiceStatus:
        """The service's read model, taken now: what status, metrics, the admin endpoint and the demo read.

        Observers read this and receive call events; none of them reaches into the service's parts. It takes no
        lock the request path takes for long: it reads the immutable endpoint view and the counters requests
        update, so numbers taken at one instant may disagree by a request in flight.
        """
        cache = self.cache
        published = cache.snapshot
        age = cache.age()
        budget = self.budget
        limit = self.limit
        active = self.active
        endpoints: list[EndpointStatus] = []
        zones: ZoneStatus | None = None
        if active is not None:
            now = time.monotonic()
            reasons = self.detector.reasons()
            breakers = self.breakers
            balance_now = self.balancer.clock()
            slow_start = self.balancer.options.slow_start
            wrr_weights = self._wrr_weights(active)
            if active.zoned:
                zones = self._zone_view(active)
            for address, stats in sorted(active.stats.items()):
                breaker = breakers.get(address)
                endpoint = stats.endpoint
                joined = stats.joined_at
                factor = (
                    slow_start_factor(slow_start, balance_now - joined)
                    if joined is not None and self.lb_name != "ring_hash"
                    else 1.0
                )
                report = stats.load_report
                # weighted_round_robin's A58 weight (0: none usable yet), else the weight slow start scales
                effective = wrr_weights.get(endpoint, 0.0) if wrr_weights is not None else endpoint.weight * factor
                endpoints.append(
                    EndpointStatus(
                        address=endpoint.address,
                        host=address[0],
                        port=address[1],
                        weight=endpoint.weight,
                        priority=endpoint.priority,
                        zone=endpoint.zone,
                        inflight=stats.inflight,
                        latency_ms=round(stats.cost(now) * 1000.0, 3),
                        requests=stats.requests,
                        failures=stats.failures,
                        breaker=breaker.state if breaker is not None else STATE_CLOSED,
                        breaker_failures=breaker.failures if breaker is not None else 0,
                        breaker_opens=breaker.trips if breaker is not None else 0,
                        ejected=address in reasons,
                        ejected_reason=reasons.get(address),
                        effective_weight=round(effective, 4),
                        slow_start_factor=round(factor, 4) if factor < 1.0 else None,
                        load_report=None if report is None else report.to_dict(),
                        load_report_age_s=None if report is None else round(balance_now - stats.load_report_time, 3),
                        invalid_load_reports=stats.invalid_reports,
                    )
                )
        return ServiceStatus(
            name=self.name,
            balancer=self.lb_name,
            started=active is not None,
            discovery=DiscoveryStatus(
                source=cache.source,
                age_s=None if age is None else round(age, 3),
                version=None if published is None else published.version,
                refreshes=cache.refreshes,
                failures=cache.failures,
                consecutive_failures=cache.consecutive_failures,
                changes=cache.changes,
                last_error=cache.last_error,
            ),
            budget=BudgetStatus(
                available=round(budget.balance(), 2),
                retries=budget.withdrawals,
                exhausted=budget.exhausted,
                percent=budget.percent_can_retry,
                min_per_second=budget.min_retries_per_second,
                inflight=limit.inflight,
                max_inflight=limit.max_inflight,
                overloaded=limit.rejected,
            ),
            ejections=self.detector.ejections,
            endpoints=endpoints,
            adaptive=None if isinstance(limit, ConcurrencyLimit) else limit.status(),
            ejections_by_reason={
                CONSECUTIVE: self.detector.consecutive_ejections,
                SUCCESS_RATE: self.detector.success_rate_ejections,
                FAILURE_PERCENTAGE: self.detector.failure_percentage_ejections,
            },
            hedge=self._hedge_view(),
            zones=zones,
        )

    def _wrr_weights(self, active: Active[T]) -> dict[Endpoint, float] | None:
        """``weighted_round_robin``'s current weight per endpoint (``None`` for other balancers, or when zone
        pickers hold the round-robin pickers inside them)."""
        if self.lb_name != "weighted_round_robin" or active.zoned:
            return None
        from meshlib.balance.wrr import WeightedRoundRobinPicker

        weights: dict[Endpoint, float] = {}
        for picker in active.pickers:
            if isinstance(picker, WeightedRoundRobinPicker):
                weights.update(picker.endpoint_weights())
        return weights

    def _zone_view(self, active: Active[T]) -> ZoneStatus | None:
        """Zone-aware routing of the most preferred level for the current health (the plan the next pick uses)."""
        from meshlib.balance.locality import FailoverPicker, FailoverPlan

        zones = self.zones
        if zones.zone is None or not active.pickers:
            return None
        unhealthy, held = self.unhealthy()
        total = len(active.stats)
        panic = bool(unhealthy) and self.detector.panic(total, total - len(unhealthy))
        picker = active.pickers[0]
        plan = cast("Any", picker).plan(held if panic else unhealthy, panic=panic)
        if isinstance(picker, FailoverPicker) and isinstance(plan, FailoverPlan):
            return ZoneStatus(
                local_zone=zones.zone,
                mode="failover",
                state="off" if plan.off else "failover",
                reason=plan.reason,
                level_loads=list(plan.loads),
            )
        return ZoneStatus(
            local_zone=zones.zone,
            mode="zone-aware",
            state=plan.state,
            reason=plan.reason,
            in_zone_percent=round(plan.local_percent / 100.0, 2),
        )

    def _hedge_view(self) -> HedgeStatus:
        hedging = self.hedging
        budget = hedging.budget
        delay = hedging.last_delay
        window = hedging.window
        return HedgeStatus(
            sent=budget.sent,
            won=hedging.won,
            cancelled=hedging.cancelled,
            budget_exhausted=budget.exhausted,
            available=round(budget.balance(), 2),
            max_extra_load=budget.max_extra_load,
            delay_ms=None if delay is None else round(delay * 1000.0, 3),
            samples=0 if window is None else window.count,
        )

    def log_budget_exhausted(self) -> None:
        """One WARNING per 10 s at most: the retry budget refused retries (each refusal is counted)."""
        now = time.monotonic()
        if now - self._budget_logged >= 10.0:
            self._budget_logged = now
            logging.getLogger("meshlib.resilience").warning(
                "retry budget of service %s exhausted: retries are skipped (%d refused so far)",
                self.name,
                self.budget.exhausted,
            )

    def retire(self, stats: EndpointStats) -> T | None:
        """After a request on a retiring endpoint ends: its pool, if it is now idle and should be closed."""
        address = (stats.endpoint.host, stats.endpoint.port)
        with self._update_lock:
            entry = self.retiring.get(address)
            if entry is None or entry[0] is not stats or stats.inflight > 0:
                return None
            del self.retiring[address]
            return entry[1]

    def take_pools(self) -> list[T]:
        """Empty the service for closing the client: the pools it owns that are idle, to be closed now.

        A pool with a request still in flight (a body being read, an attempt on the wire) is not closed under
        it: it stays in :attr:`retiring`, and the lease of its last request closes it (:meth:`retire`, asked by
        every lease once the mesh is closed).
        """
        with self._update_lock:
            current: dict[HostPort, EndpointStats] = {}
            for view in (self._stand_in, self.active):  # testing mode's stand-in, then the discovered view
                if view is not None:
                    current.update(view.stats)
            idle: list[T] = []
            busy: dict[HostPort, tuple[EndpointStats, T]] = {}
            entries = [(a, current.get(a), t) for a, t in self.transports.items()]
            entries.extend((a, s, t) for a, (s, t) in self.retiring.items())
            for address, stats, transport in entries:
                if stats is not None and stats.inflight > 0:
                    busy[address] = (stats, transport)
                else:
                    idle.append(transport)
            self.transports = {}
            self.retiring = busy
            self.active = None
            return idle


def _log_change(service: str, old: dict[HostPort, EndpointStats], new: dict[HostPort, EndpointStats]) -> None:
    """One INFO line per endpoint-set change, after the new set serves traffic."""
    if old.keys() == new.keys():
        return
    added = sorted(new[a].endpoint.address for a in new.keys() - old.keys())
    removed = sorted(old[a].endpoint.address for a in old.keys() - new.keys())
    logger.info(
        "endpoints of service %s changed: %d now; added %s; removed %s",
        service,
        len(new),
        ", ".join(added) or "none",
        ", ".join(removed) or "none",
    )
