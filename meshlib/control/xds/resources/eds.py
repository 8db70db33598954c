"""EDS: validate an xDS ``ClusterLoadAssignment`` as gRPC does and map it onto meshlib endpoints.

:func:`validate_load_assignment` is pure: a ``envoy.config.endpoint.v3.ClusterLoadAssignment`` in, a frozen
:class:`EndpointsUpdate` out, or :class:`~meshlib.control.xds.resources.errors.XdsResourceError` naming the
field. Rules (gRFC A27 "ClusterLoadAssignment Proto", A61, grpc-go ``xdsresource/unmarshal_eds.go``):

* a locality without ``locality`` is NACKed; one whose ``load_balancing_weight`` is unset or 0 is skipped;
  the same locality twice in one priority is NACKed; locality weights of a priority sum to at most 2^32-1;
* priorities of the localities kept run from 0 without a gap (a gap is NACKed);
* an endpoint needs ``endpoint.address.socket_address`` with an IPv4/IPv6 ``address`` (A27; C-core NACKs a
  host name, grpc-go passes it to the dialer: meshlib NACKs, as C-core) and a ``port_value`` (a named port
  is NACKed); ``load_balancing_weight`` 0 is NACKed, unset is 1; weights of a locality sum to at most
  2^32-1; an address (additional addresses included, A61) appears once in the whole resource;
* ``health_status`` HEALTHY and UNKNOWN endpoints are used; DRAINING ones are listed in
  :attr:`EndpointsUpdate.draining` and not balanced over (A55: gRPC passes them up only so stateful session
  affinity can keep existing sessions, and removes them before the endpoint picker; meshlib has no session
  affinity); any other status is skipped (A27);
* ``policy.drop_overloads``: categories with HUNDRED / TEN_THOUSAND / MILLION denominators, converted to
  per-million; ``overprovisioning_factor`` is ignored (gRPC does not overprovision).

Mapping onto :class:`meshlib.discovery.base.Endpoint`: ``priority`` is the locality's priority (lower is
preferred, as meshlib's balancers already select the lowest priority group); ``zone`` the locality's
``zone`` (what zone-aware routing compares with ``MESHLIB_ZONE``; a sub-zone is finer than routing goes, and
zone names are unique across regions in every cloud); ``meta`` holds ``region``, ``zone``, ``sub_zone``,
``hostname`` and ``additional_addresses`` (comma-separated ``host:port``; meshlib connects to the primary
address only for now). ``weight`` folds gRPC's two levels into one: within a priority, gRPC picks a
locality by locality weight, then an endpoint inside it, so an endpoint's share is ``locality weight /
sum of the priority's locality weights x endpoint weight / sum of its locality's endpoint weights``
(sums over the endpoints used); :func:`flatten_weights` turns those shares into the smallest integers with
exactly these ratios. gRPC's ``round_robin`` ignores endpoint weights inside a locality while meshlib's
balancers honour them (as Envoy does): with equal endpoint weights the two agree.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Any

from meshlib.control.xds.resources.errors import XdsResourceError
from meshlib.discovery.base import Endpoint

#: A protobuf message of xds-protos (untyped: the package ships no stubs).
Proto = Any

__all__ = ["DropCategory", "EndpointsUpdate", "Locality", "flatten_weights", "validate_load_assignment"]

_UINT32_MAX = 2**32 - 1
#: Integer weights above this fall back to shares rounded to a millionth (meshlib's balancers reduce weights
#: by their gcd and bound their schedules; exact ratios that need larger integers are not worth their size).
_MAX_EXACT_WEIGHT = 2**31 - 1
_SHARE_SCALE = 1_000_000
_DENOMINATORS = {0: 100, 1: 10_000, 2: 1_000_000}  # FractionalPercent.DenominatorType: HUNDRED, TEN_THOUSAND, MILLION


@dataclass(frozen=True, slots=True)
class DropCategory:
    """``policy.drop_overloads`` entry: drop ``per_million`` of the requests, counted under ``category``."""

    category: str
    per_million: int


@dataclass(frozen=True, slots=True)
class Locality:
    """A locality kept (weight > 0): its identity, weight and priority, and its usable endpoints."""

    region: str
    zone: str
    sub_zone: str
    weight: int
    priority: int
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class EndpointsUpdate:
    """A validated ``ClusterLoadAssignment``.

    ``endpoints``: every HEALTHY or UNKNOWN endpoint as a meshlib :class:`Endpoint` with its flattened weight
    (module docstring), ordered by priority then locality then position; ``localities``: the same, grouped;
    ``draining``: DRAINING endpoints (not balanced over); ``drops``: the drop policy, in order (gRPC applies
    each category in turn).
    """

    cluster_name: str
    endpoints: tuple[Endpoint, ...]
    localities: tuple[Locality, ...] = ()
    draining: tuple[Endpoint, ...] = ()
    drops: tuple[DropCategory, ...] = ()


def validate_load_assignment(assignment: Proto) -> EndpointsUpdate:
    """Validate ``assignment`` as gRPC does and map it (module docstring); raise :class:`XdsResourceError`."""
    from envoy.config.core.v3.health_check_pb2 import HealthStatus

    if not assignment.cluster_name:
        raise XdsResourceError("cluster_name", "empty: a ClusterLoadAssignment needs a name")
    drops = tuple(_drop(d, f"policy.drop_overloads[{i}]") for i, d in enumerate(assignment.policy.drop_overloads))
    seen_addresses: set[tuple[str, int]] = set()
    seen_localities: set[tuple[int, str, str, str]] = set()
    priority_weights: dict[int, int] = {}
    # (locality fields, weight, priority, [(endpoint kwargs, endpoint weight, draining)])
    kept: list[tuple[tuple[str, str, str], int, int, list[tuple[dict[str, object], int, bool]]]] = []
    for i, entry in enumerate(assignment.endpoints):
        path = f"endpoints[{i}]"
        if not entry.HasField("locality"):
            raise XdsResourceError(f"{path}.locality", "not set: every locality needs its ID (A27)")
        weight = entry.load_balancing_weight.value
        if weight == 0:
            continue  # A27: a locality without weight is skipped
        priority = entry.priority
        priority_weights[priority] = priority_weights.get(priority, 0) + weight
        if priority_weights[priority] > _UINT32_MAX:
            where = f"{path}.load_balancing_weight"
            raise XdsResourceError(where, f"locality weights of priority {priority} sum above {_UINT32_MAX} (A27)")
        ident = (entry.locality.region, entry.locality.zone, entry.locality.sub_zone)
        if (priority, *ident) in seen_localities:
            raise XdsResourceError(f"{path}.locality", f"{_locality_str(ident)} twice in priority {priority} (A27)")
        seen_localities.add((priority, *ident))
        members: list[tuple[dict[str, object], int, bool]] = []
        total = 0
        for j, lb_endpoint in enumerate(entry.lb_endpoints):
            where = f"{path}.lb_endpoints[{j}]"
            endpoint_weight = 1
            if lb_endpoint.HasField("load_balancing_weight"):
                endpoint_weight = lb_endpoint.load_balancing_weight.value
                if endpoint_weight == 0:
                    raise XdsResourceError(f"{where}.load_balancing_weight", "0: at least 1 when set")
            total += endpoint_weight
            if total > _UINT32_MAX:
                raise XdsResourceError(
                    f"{where}.load_balancing_weight", f"endpoint weights of the locality sum above {_UINT32_MAX}"
                )
            endpoint = lb_endpoint.endpoint
            address_path = f"{where}.endpoint.address"
            if not endpoint.address.HasField("socket_address"):
                raise XdsResourceError(f"{address_path}.socket_address", "not set: required (A27)")
            host, port = _socket(endpoint.address.socket_address, f"{address_path}.socket_address", seen_addresses)
            extra = []
            for k, additional in enumerate(endpoint.additional_addresses):
                extra_path = f"{where}.endpoint.additional_addresses[{k}].address"
                if not additional.address.HasField("socket_address"):
                    raise XdsResourceError(f"{extra_path}.socket_address", "not set: required (A61)")
                extra_host, extra_port = _socket(
                    additional.address.socket_address, f"{extra_path}.socket_address", seen_addresses
                )
                extra.append(Endpoint(extra_host, extra_port).address)
            status = lb_endpoint.health_status
            if status not in (HealthStatus.HEALTHY, HealthStatus.UNKNOWN, HealthStatus.DRAINING):
                continue
            meta = {"region": ident[0], "zone": ident[1], "sub_zone": ident[2]}
            if endpoint.hostname:
                meta["hostname"] = endpoint.hostname
            if extra:
                meta["additional_addresses"] = ",".join(extra)
            zone = ident[1]
            fields: dict[str, object] = {
                "host": host,
                "port": port,
                "priority": priority,
                "zone": zone or None,
                "meta": MappingProxyType(meta),
            }
            members.append((fields, endpoint_weight, status == HealthStatus.DRAINING))
        kept.append((ident, weight, priority, members))
    for expected, priority in enumerate(sorted(priority_weights)):
        if priority != expected:
            raise XdsResourceError(
                "endpoints", f"priority {expected} missing (priorities {sorted(priority_weights)}): no gaps (A27)"
            )
    return _build(assignment.cluster_name, kept, drops)


def _build(
    name: str,
    kept: list[tuple[tuple[str, str, str], int, int, list[tuple[dict[str, object], int, bool]]]],
    drops: tuple[DropCategory, ...],
) -> EndpointsUpdate:
    # Shares per priority over the endpoints used (DRAINING ones take no share).
    shares: list[list[Fraction]] = []
    locality_totals = [sum(w for _, w, d in members if not d) for _, _, _, members in kept]
    priority_totals: dict[int, int] = {}
    for (_, weight, priority, _), total in zip(kept, locality_totals, strict=True):
        if total:
            priority_totals[priority] = priority_totals.get(priority, 0) + weight
    for (_, weight, priority, members), total in zip(kept, locality_totals, strict=True):
        shares.append(
            [
                Fraction(weight * w, priority_totals[priority] * total) if total and not d else Fraction(0)
                for _, w, d in members
            ]
        )
    # Integer weights per priority: meshlib balances within one priority group at a time.
    weights = {
        p: iter(
            flatten_weights([s for (_, _, q, _), group in zip(kept, shares, strict=True) if q == p for s in group if s])
        )
        for p in priority_totals
    }
    localities, used, draining = [], [], []
    for (ident, weight, priority, members), group in zip(kept, shares, strict=True):
        endpoints = []
        for (fields, _, is_draining), share in zip(members, group, strict=True):
            if is_draining:
                draining.append(Endpoint(**fields))  # type: ignore[arg-type]
                continue
            endpoint = Endpoint(weight=next(weights[priority]) if share else 1, **fields)  # type: ignore[arg-type]
            endpoints.append(endpoint)
        used.extend(endpoints)
        localities.append(Locality(*ident, weight=weight, priority=priority, endpoints=tuple(endpoints)))
    used.sort(key=lambda e: e.priority)  # stable: locality then position order within a priority
    return EndpointsUpdate(name, tuple(used), tuple(localities), tuple(draining), drops)


def flatten_weights(shares: Sequence[Fraction]) -> list[int]:
    """The smallest integers in exactly the ratios of ``shares`` (all > 0); if those exceed 2^31-1, the
    shares rounded to millionths of the largest (at least 1), which keeps every ratio within 1e-6."""
    if not shares:
        return []
    scale = math.lcm(*(s.denominator for s in shares))
    exact = [int(s * scale) for s in shares]
    divisor = math.gcd(*exact)
    exact = [w // divisor for w in exact]
    if max(exact) <= _MAX_EXACT_WEIGHT:
        return exact
    top = max(shares)
    return [max(1, round(s / top * _SHARE_SCALE)) for s in shares]


def _socket(socket: Proto, path: str, seen: set[tuple[str, int]]) -> tuple[str, int]:
    if socket.resolver_name:
        raise XdsResourceError(f"{path}.resolver_name", f"{socket.resolver_name!r}: custom resolvers unsupported")
    try:
        host = str(ipaddress.ip_address(socket.address))
    except ValueError:
        raise XdsResourceError(
            f"{path}.address", f"{socket.address!r}: an IPv4 or IPv6 address (A27; host names are for LOGICAL_DNS)"
        ) from None
    if socket.WhichOneof("port_specifier") != "port_value":
        raise XdsResourceError(f"{path}.port_value", "not set: a port from 1 to 65535 (named ports unsupported)")
    port = socket.port_value
    if not 1 <= port <= 65535:
        raise XdsResourceError(f"{path}.port_value", f"{port}: a port from 1 to 65535")
    if (host, port) in seen:
        raise XdsResourceError(f"{path}", f"{Endpoint(host, port).address} appears twice in the resource (A27, A61)")
    seen.add((host, port))
    return host, port


def _drop(drop: object, path: str) -> DropCategory:
    percentage = drop.drop_percentage  # type: ignore[attr-defined]
    denominator = _DENOMINATORS.get(percentage.denominator)
    if denominator is None:
        raise XdsResourceError(f"{path}.drop_percentage.denominator", f"{percentage.denominator}: unsupported")
    per_million = min(percentage.numerator * (1_000_000 // denominator), 1_000_000)
    return DropCategory(drop.category, per_million)  # type: ignore[attr-defined]


def _locality_str(ident: tuple[str, str, str]) -> str:
    region, zone, sub_zone = ident
    return f"{{region={region!r}, zone={zone!r}, sub_zone={sub_zone!r}}}"
