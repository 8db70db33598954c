"""Zone-aware routing (Envoy's algorithm) and priority failover across zones (Istio's ``localityLbSetting``).

Two ways to keep traffic in the caller's zone, both pure logic with an injected ``rng`` and both built on the
slow path like every :class:`~meshlib.balance.base.Picker`:

* :func:`plan_zones` / :class:`ZoneAwarePicker`: Envoy's zone-aware routing (``ZoneAwareLoadBalancerBase`` in
  ``source/common/upstream/load_balancer_impl.cc``: ``regenerateLocalityRoutingStructures``,
  ``calculateLocalityPercentages``, ``tryChooseLocalLocalityHosts``, ``earlyExitNonLocalityRouting``; the
  arch-overview page "Zone aware routing"). Each zone's share of the upstream's *healthy* endpoints and of the
  *callers* is computed in ten-thousandths (integer arithmetic, as Envoy). When the local zone's upstream share
  covers its caller share, every request stays in-zone (``direct``, Envoy's ``LocalityDirect``); otherwise
  ``upstream_share / caller_share`` of requests stay in-zone (a draw in 0..9999) and the rest go to the other
  zones in proportion to their *residual capacity* ``max(0, upstream_share - caller_share)``
  (``residual``, Envoy's ``LocalityResidual``). Routing is ``off`` (Envoy's ``NoLocalityRouting``: balance over
  every endpoint) when no local zone is set, in panic, with fewer than two zones, with no healthy endpoint in
  the local zone (so traffic spills at once), with no caller in the local zone, or with fewer healthy
  endpoints than ``min_cluster_size`` (Envoy's default 6).
* :func:`priority_loads` / :class:`FailoverPicker`: zones as priority levels (local zone first, then an ordered
  failover list, then every other zone), with Envoy's priority load: each level's health is
  ``min(100, 1.4 x healthy %)`` (the overprovisioning factor 1.4) and levels take load in order until 100 %.

The callers' distribution: Envoy reads it from its *local cluster* (the caller service's own endpoints).
meshlib has no such view by default, so a picker takes an explicit ``callers`` mapping (zone -> number of
callers, e.g. from the zones of the caller service's own endpoints) and otherwise assumes callers are spread
like the upstream's *total* endpoints (healthy or not) per zone. The client passes the most endpoints it has
seen per zone (:meth:`meshlib._service.Service._zone_picker`), so endpoints that leave discovery lower their
zone's healthy share but not its caller share. See ``docs/locality.md``.

Health: a picker is built once per endpoint set; which endpoints are healthy (not ejected, breaker not held)
changes between builds. :meth:`ZoneAwarePicker.pick` therefore takes the ``unhealthy`` addresses and the
``panic`` flag of the request and re-plans only when they change (one cached plan per picker, O(endpoints)
to rebuild, nothing shared between clients).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Container, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from meshlib._config.model import DEFAULT_MIN_CLUSTER_SIZE, ZoneSettings
from meshlib.balance.base import EndpointStats, Picker
from meshlib.discovery.base import Endpoint

__all__ = [
    "ANY",
    "DEFAULT_MIN_CLUSTER_SIZE",
    "OVERPROVISIONING_FACTOR",
    "FailoverPicker",
    "FailoverPlan",
    "ZoneAwarePicker",
    "ZonePlan",
    "ZoneSettings",
    "failover_tiers",
    "plan_zones",
    "priority_loads",
]

#: A zone name; ``None`` is "no zone" (an endpoint whose source gave none): its own group, never local.
Zone = str | None
HostPort = tuple[str, int]
#: Builds a picker over some endpoints with the service's own balancer (``Balancer.build``).
BuildPicker = Callable[[Sequence[EndpointStats]], Picker]

#: Envoy's default overprovisioning factor (``kDefaultOverProvisioningFactor`` = 140, in percent).
OVERPROVISIONING_FACTOR = 1.4
#: :meth:`ZonePlan.choose`'s answer when the plan does not route by zone: pick from every endpoint.
ANY = -1
#: Envoy samples the local share in ten-thousandths (``random() % 10000 < local_percent_to_route_``).
_SCALE = 10_000

State = Literal["off", "direct", "residual"]
_P = TypeVar("_P")


@dataclass(frozen=True, slots=True)
class ZonePlan:
    """Where requests go, by zone: immutable, computed on the slow path by :func:`plan_zones`.

    ``zones``: every zone of the endpoint set, the local one first (if present). ``local_percent``: in-zone
    share in ten-thousandths (10,000 when ``direct``, 0 when ``off``). ``residual``: per zone of ``zones``,
    its residual capacity in ten-thousandths (0 for the local zone and zones without spare capacity).
    ``reason``: why routing is off (empty otherwise).
    """

    state: State
    reason: str
    zones: tuple[Zone, ...]
    local_percent: int = 0
    residual: tuple[int, ...] = ()
    #: Running sums of ``residual`` (for the weighted draw).
    _cumulative: tuple[int, ...] = ()

    @property
    def local_share(self) -> float:
        """The in-zone fraction of requests, 0.0..1.0."""
        return self.local_percent / _SCALE

    def choose(self, rng: random.Random) -> int:
        """The index into ``zones`` of the zone for one request, or :data:`ANY` (balance over every endpoint)."""
        if self.state == "direct":
            return 0
        if self.state == "off":
            return ANY
        if rng.randrange(_SCALE) < self.local_percent:
            return 0
        return self.draw_residual(rng)

    def draw_residual(self, rng: random.Random) -> int:
        """A non-local zone drawn in proportion to residual capacity; :data:`ANY` when no zone has any.

        Envoy picks a random locality when rounding leaves no residual capacity; meshlib balances over every
        endpoint instead, which is the same thing weighted by size.
        """
        cumulative = self._cumulative
        if not cumulative or cumulative[-1] == 0:
            return ANY
        return bisect.bisect_right(cumulative, rng.randrange(cumulative[-1]))


def _percentages(counts: Mapping[Zone, int]) -> dict[Zone, int]:
    """Envoy's ``calculateLocalityPercentages``: each zone's share of ``counts`` in ten-thousandths (floored)."""
    total = sum(counts.values())
    return {zone: (_SCALE * n // total if total else 0) for zone, n in counts.items()}


def _order(zones: Set[Zone] | Sequence[Zone], local: Zone) -> tuple[Zone, ...]:
    """``zones`` with ``local`` first, then by name, "no zone" last: a stable order for the draws."""
    named: list[str] = sorted(z for z in set(zones) if z is not None and z != local)
    head: list[Zone] = [local] if local is not None and local in zones else []
    tail: list[Zone] = [None] if None in zones else []
    return (*head, *named, *tail)


def plan_zones(
    local_zone: str | None,
    healthy: Mapping[Zone, int],
    callers: Mapping[Zone, int],
    *,
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE,
    panic: bool = False,
) -> ZonePlan:
    """Envoy's zone-aware routing plan for one priority level.

    ``healthy``: healthy endpoints per zone, every zone of the endpoint set present (0 when none is healthy).
    ``callers``: the callers per zone (Envoy's local cluster; see the module docstring for the default).
    ``panic``: the service is in panic (too few healthy endpoints): Envoy then balances over every endpoint.
    """
    zones = _order(healthy.keys(), local_zone)
    if local_zone is None:
        return ZonePlan("off", "no local zone (MESHLIB_ZONE is unset)", zones)
    if panic:
        return ZonePlan("off", "the service is in panic", zones)
    if len(zones) < 2:
        return ZonePlan("off", "fewer than two zones", zones)
    if healthy.get(local_zone, 0) <= 0:
        return ZonePlan("off", f"no healthy endpoint in the local zone {local_zone!r}", zones)
    if callers.get(local_zone, 0) <= 0:
        return ZonePlan("off", f"no caller in the local zone {local_zone!r}", zones)
    size = sum(healthy.values())
    if size < min_cluster_size:
        return ZonePlan(
            "off", f"{size} healthy endpoint(s), fewer than the minimum cluster size {min_cluster_size}", zones
        )
    upstream = _percentages(healthy)
    local = _percentages(callers)
    if upstream[local_zone] >= local[local_zone]:
        return ZonePlan("direct", "", zones, local_percent=_SCALE, residual=(0,) * len(zones))
    local_percent = upstream[local_zone] * _SCALE // local[local_zone]
    residual = tuple(0 if z == local_zone else max(0, upstream[z] - local.get(z, 0)) for z in zones)
    cumulative: list[int] = []
    running = 0
    for capacity in residual:
        running += capacity
        cumulative.append(running)
    return ZonePlan("residual", "", zones, local_percent, residual, tuple(cumulative))


# --- priority failover ------------------------------------------------------------------------------------------


def failover_tiers(
    local_zone: str, zones: Set[Zone] | Sequence[Zone], order: Sequence[str] = ()
) -> tuple[tuple[Zone, ...], ...]:
    """Zones grouped into priority levels, most preferred first (Istio's ``localityLbSetting.failover``, simplified).

    Level 0 is ``local_zone``; then each zone of ``order`` present in ``zones``, one level each, in that order;
    then every remaining zone ("no zone" included) as one last level. Levels without zones are left out.
    """
    present = set(zones)
    tiers: list[tuple[Zone, ...]] = []
    seen: set[Zone] = set()
    for zone in (local_zone, *order):
        if zone in present and zone not in seen:
            tiers.append((zone,))
            seen.add(zone)
    rest = tuple(z for z in _order(present - seen, local_zone) if z not in seen)
    if rest:
        tiers.append(rest)
    return tuple(tiers)


def priority_loads(
    healthy: Sequence[int], total: Sequence[int], *, overprovisioning: float = OVERPROVISIONING_FACTOR
) -> tuple[int, ...]:
    """Envoy's per-priority load in percent (summing to 100) from healthy and total endpoints per level.

    A level's health is ``min(100, overprovisioning x 100 x healthy / total)`` (integer percent); levels take
    load in order, each at most its health scaled by the normalized total health ``min(100, sum of
    health)``, so a level at >= 71.5 % healthy (with 1.4) keeps all of it (Envoy's ``distributeLoad``). The
    rounding remainder goes to the first level with health. When no level has any health ("total panic"),
    load follows the number of endpoints per level, as Envoy's ``recalculateLoadInTotalPanic``.
    """
    if len(healthy) != len(total):
        raise ValueError("healthy and total need one entry per priority level")
    factor = round(overprovisioning * 100)
    health = [min(100, factor * h // t) if t > 0 else 0 for h, t in zip(healthy, total, strict=True)]
    normalized = min(100, sum(health))
    if normalized == 0:
        health = list(total)
        normalized = sum(total)
        if normalized == 0:
            return (0,) * len(total)
    remaining = 100
    loads: list[int] = []
    for level_health in health:
        load = min(remaining, level_health * 100 // normalized)
        loads.append(load)
        remaining -= load
    if remaining:
        first = next(i for i, level_health in enumerate(health) if level_health > 0)
        loads[first] += remaining
    return tuple(loads)


@dataclass(frozen=True, slots=True)
class FailoverPlan:
    """Load per priority level (percent), from :func:`priority_loads`; ``off`` balances over every endpoint."""

    loads: tuple[int, ...]
    off: bool = False
    reason: str = ""
    _cumulative: tuple[int, ...] = ()

    @classmethod
    def of(cls, loads: tuple[int, ...]) -> FailoverPlan:
        """A plan with the running sums the draw needs."""
        cumulative: list[int] = []
        running = 0
        for load in loads:
            running += load
            cumulative.append(running)
        return cls(loads, _cumulative=tuple(cumulative))

    def choose(self, rng: random.Random) -> int:
        """The priority level for one request, or :data:`ANY`."""
        if self.off or not self._cumulative:
            return ANY
        return bisect.bisect_right(self._cumulative, rng.randrange(100))


# --- pickers ------------------------------------------------------------------------------------------------------


_NO_HEALTH: Set[HostPort] = frozenset()


def _group(endpoints: Sequence[EndpointStats]) -> dict[Zone, list[EndpointStats]]:
    groups: dict[Zone, list[EndpointStats]] = {}
    for stats in endpoints:
        groups.setdefault(stats.endpoint.zone, []).append(stats)
    return groups


def _healthy_counts(groups: Mapping[Zone, Sequence[EndpointStats]], unhealthy: Set[HostPort]) -> dict[Zone, int]:
    if not unhealthy:
        return {zone: len(members) for zone, members in groups.items()}
    return {
        zone: sum(1 for s in members if (s.endpoint.host, s.endpoint.port) not in unhealthy)
        for zone, members in groups.items()
    }


class _Replanning(Picker, Generic[_P]):
    """What both zone pickers share: per-group pickers, an all-endpoints fallback and a one-entry plan cache.

    The cache holds ``(unhealthy, panic, plan)`` in one tuple, replaced whole, so concurrent picks never see a
    torn entry (two threads may both recompute after a change: harmless, the plans are equal).
    """

    def __init__(self, endpoints: Sequence[EndpointStats], build: BuildPicker, rng: random.Random) -> None:
        if not endpoints:
            raise ValueError("a zone picker needs at least one endpoint")
        self._rng = rng
        self._groups = _group(endpoints)
        self._all = build(endpoints)
        self._cached: tuple[Set[HostPort], bool, _P] | None = None

    def _plan_for(self, unhealthy: Set[HostPort], panic: bool) -> _P:
        cached = self._cached
        if cached is not None and cached[1] == panic and (cached[0] is unhealthy or cached[0] == unhealthy):
            return cached[2]
        plan = self._plan(_healthy_counts(self._groups, unhealthy), panic)
        self._cached = (unhealthy, panic, plan)
        return plan

    def _plan(self, healthy: dict[Zone, int], panic: bool) -> _P:
        raise NotImplementedError

    def plan(self, unhealthy: Set[HostPort] = _NO_HEALTH, *, panic: bool = False) -> _P:
        """The plan for this health (cached): for status views and tests."""
        return self._plan_for(unhealthy, panic)


class ZoneAwarePicker(_Replanning[ZonePlan]):
    """Envoy's zone-aware routing over per-zone pickers built by the service's own balancer.

    Each request draws a zone from the :class:`ZonePlan` for the current health and delegates to that zone's
    picker; when it returns ``None`` (every endpoint there excluded: tried by this call's retries or hedges,
    ejected, breaker held) a residual zone is drawn, then every endpoint is tried. With the plan ``off``
    (below ``min_cluster_size``, in panic, no healthy local endpoint...) it balances over every endpoint.
    """

    def __init__(
        self,
        endpoints: Sequence[EndpointStats],
        build: BuildPicker,
        *,
        local_zone: str | None,
        rng: random.Random,
        min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE,
        callers: Mapping[Zone, int] | None = None,
    ) -> None:
        super().__init__(endpoints, build, rng)
        self.local_zone = local_zone
        self.min_cluster_size = min_cluster_size
        #: Explicit callers per zone, else the upstream's total endpoints per zone (see the module docstring).
        self.callers: Mapping[Zone, int] = (
            dict(callers) if callers is not None else {zone: len(m) for zone, m in self._groups.items()}
        )
        self._zones = _order(self._groups.keys(), local_zone)
        self._pickers = tuple(build(self._groups[zone]) for zone in self._zones)

    def _plan(self, healthy: dict[Zone, int], panic: bool) -> ZonePlan:
        return plan_zones(self.local_zone, healthy, self.callers, min_cluster_size=self.min_cluster_size, panic=panic)

    def pick(
        self,
        *,
        key: bytes | None = None,
        exclude: Container[Endpoint] = (),
        unhealthy: Set[HostPort] = _NO_HEALTH,
        panic: bool = False,
    ) -> EndpointStats | None:
        """One endpoint not in ``exclude``, in-zone as the plan for ``unhealthy``/``panic`` says; ``None`` if all are.

        ``unhealthy``: the addresses the service skips now (ejected, breaker held), used to count healthy
        endpoints per zone; they must also be in ``exclude`` to be skipped. ``panic``: zone routing yields.
        """
        plan = self._plan_for(unhealthy, panic)
        rng = self._rng
        index = plan.choose(rng)
        if index != ANY:
            chosen = self._pickers[index].pick(key=key, exclude=exclude)
            if chosen is not None:
                return chosen
            spill = plan.draw_residual(rng)
            if spill not in (ANY, index):
                chosen = self._pickers[spill].pick(key=key, exclude=exclude)
                if chosen is not None:
                    return chosen
        return self._all.pick(key=key, exclude=exclude)


class FailoverPicker(_Replanning[FailoverPlan]):
    """Priority failover across zones: the local zone first, then ``order``, then the rest (see :func:`failover_tiers`).

    Each request draws a level by :func:`priority_loads` over the current health and delegates to its picker;
    a level whose endpoints are all excluded passes to the next, then every endpoint is tried. In panic, or
    with no local zone, it balances over every endpoint.
    """

    def __init__(
        self,
        endpoints: Sequence[EndpointStats],
        build: BuildPicker,
        *,
        local_zone: str | None,
        rng: random.Random,
        order: Sequence[str] = (),
        overprovisioning: float = OVERPROVISIONING_FACTOR,
    ) -> None:
        super().__init__(endpoints, build, rng)
        self.local_zone = local_zone
        self.overprovisioning = overprovisioning
        self.tiers = failover_tiers(local_zone, self._groups.keys(), order) if local_zone is not None else ()
        self._pickers = tuple(build([s for zone in tier for s in self._groups[zone]]) for tier in self.tiers)

    def _plan(self, healthy: dict[Zone, int], panic: bool) -> FailoverPlan:
        if self.local_zone is None:
            return FailoverPlan((), off=True, reason="no local zone (MESHLIB_ZONE is unset)")
        if panic:
            return FailoverPlan((), off=True, reason="the service is in panic")
        loads = priority_loads(
            [sum(healthy[z] for z in tier) for tier in self.tiers],
            [sum(len(self._groups[z]) for z in tier) for tier in self.tiers],
            overprovisioning=self.overprovisioning,
        )
        return FailoverPlan.of(loads)

    def pick(
        self,
        *,
        key: bytes | None = None,
        exclude: Container[Endpoint] = (),
        unhealthy: Set[HostPort] = _NO_HEALTH,
        panic: bool = False,
    ) -> EndpointStats | None:
        """One endpoint not in ``exclude`` from the drawn level, else the next levels, else any; ``None`` if all are."""
        plan = self._plan_for(unhealthy, panic)
        index = plan.choose(self._rng)
        if index != ANY:
            for picker in self._pickers[index:]:
                chosen = picker.pick(key=key, exclude=exclude)
                if chosen is not None:
                    return chosen
        return self._all.pick(key=key, exclude=exclude)
