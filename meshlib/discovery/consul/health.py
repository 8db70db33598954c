"""Consul's ``/v1/health/service/<name>`` answers to meshlib endpoints: pure functions, no I/O.

Kept apart from the HTTP and the query loop so that it can be checked against the bodies published in
Consul's documentation (``tests/discovery/test_consul_contract.py``) without an agent, a clock or a socket.

How an answer becomes endpoints (:func:`endpoints_from_health`): the address is ``Service.Address``, else
``Node.Address``; an instance's health is the worst of all its checks, the node's ``serfHealth`` included
(``passing`` < ``warning`` < ``critical``; maintenance and unknown statuses count as critical); a passing
instance gets ``Service.Weights.Passing``, a warning one ``Weights.Warning`` (default 1 and 1, as Consul
does), and weight 0 removes it, as in Consul's DNS. ``Service.Tags`` go to ``Endpoint.tags``,
``Service.Meta`` to ``Endpoint.meta``. ``Endpoint.zone`` (zone-aware routing, :mod:`meshlib.balance.locality`)
is ``Service.Locality.Zone`` (Consul 1.17+), else the ``zone_key`` metadata of the node (``Node.Meta``), else of
the service (``Service.Meta``), else none; ``zone_key`` is ``MESHLIB_CONSUL_ZONE_KEY``, default ``zone``.
``Node.Datacenter`` is not a zone (a datacenter spans zones) and is not used. Unknown fields are ignored.

:func:`_payload_key` says when two answers are the same (the blocking-query loop compares answers, not
indexes, because the index moves on unrelated writes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from meshlib._config.parse import ascii_digits
from meshlib.discovery.base import Endpoint
from meshlib.errors import ConfigError

__all__ = [
    "DEFAULT_ZONE_KEY",
    "aggregate_status",
    "endpoints_from_health",
    "zone_key_from_env",
]

logger = logging.getLogger("meshlib.discovery")

#: The metadata key read for an instance's zone when ``Service.Locality`` has none (``MESHLIB_CONSUL_ZONE_KEY``).
#: Consul metadata keys allow only letters, digits, ``_`` and ``-``, so Kubernetes' ``topology.kubernetes.io/zone``
#: cannot be one; ``zone`` is the plain name Consul's own ``Locality`` uses.
DEFAULT_ZONE_KEY = "zone"

_PASSING, _WARNING, _CRITICAL, _MAINTENANCE = "passing", "warning", "critical", "maintenance"
_SEVERITY = {_PASSING: 0, _WARNING: 1, _CRITICAL: 2, _MAINTENANCE: 3}
#: CheckIDs of Consul's maintenance mode (``api.NodeMaint``, ``api.ServiceMaintPrefix``).
_NODE_MAINTENANCE = "_node_maintenance"
_SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"


def aggregate_status(checks: object) -> str:
    """The worst status of an instance's checks: ``passing``, ``warning``, ``critical`` or ``maintenance``.

    Maintenance mode is recognised by Consul's check IDs (``_node_maintenance``,
    ``_service_maintenance:<id>``) or a ``maintenance`` status; an unknown status counts as critical; an
    instance without checks is passing (as ``api.HealthChecks.AggregatedStatus``).
    """
    worst = _PASSING
    for check in checks if isinstance(checks, list) else ():
        if not isinstance(check, dict):
            continue
        check_id = str(check.get("CheckID") or "")
        if check_id == _NODE_MAINTENANCE or check_id.startswith(_SERVICE_MAINTENANCE_PREFIX):
            status = _MAINTENANCE
        else:
            status = str(check.get("Status") or "").lower()
            if status not in _SEVERITY:
                status = _CRITICAL
        if _SEVERITY[status] > _SEVERITY[worst]:
            worst = status
    return worst


def _int_field(value: object, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and ascii_digits(value.strip().removeprefix("-"), 18):  # '²'.isdigit() is True
        return int(value)
    return default


def _weights(service: Mapping[str, Any]) -> tuple[int, int]:
    weights = service.get("Weights")
    if not isinstance(weights, dict):
        return 1, 1  # Consul's default when a registration sets none
    return _int_field(weights.get("Passing"), 1), _int_field(weights.get("Warning"), 1)


ZONE_KEY_VARIABLE = "MESHLIB_CONSUL_ZONE_KEY"
_META_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")


def zone_key_from_env(environ: Mapping[str, str]) -> str:
    """``MESHLIB_CONSUL_ZONE_KEY`` (unset or blank: :data:`DEFAULT_ZONE_KEY`), checked as Consul checks a
    metadata key (letters, digits, ``_``, ``-``; at most 128), so a key no registration can hold fails now."""
    raw = environ.get(ZONE_KEY_VARIABLE, "")
    if not raw.strip():
        return DEFAULT_ZONE_KEY
    if not _META_KEY.fullmatch(raw.strip()):
        raise ConfigError(ZONE_KEY_VARIABLE, raw, "a Consul metadata key: letters, digits, '_' and '-' (1 to 128)")
    return raw.strip()


def _zone(node: Mapping[str, Any], service: Mapping[str, Any], key: str) -> str | None:
    """``Service.Locality.Zone``, else ``Node.Meta[key]``, else ``Service.Meta[key]``; blank counts as none."""
    locality = service.get("Locality")
    if isinstance(locality, dict):
        zone = locality.get("Zone")
        if isinstance(zone, str) and zone.strip():
            return zone.strip()
    for meta in (node.get("Meta"), service.get("Meta")):
        if isinstance(meta, dict):
            zone = meta.get(key)
            if isinstance(zone, str) and zone.strip():
                return zone.strip()
    return None


def endpoints_from_health(
    entries: object, *, passing_only: bool = True, tags: Iterable[str] = (), zone_key: str = DEFAULT_ZONE_KEY
) -> tuple[Endpoint, ...]:
    """Endpoints from a ``/v1/health/service/<name>`` body (decoded JSON), in Consul's order.

    Raises :class:`ValueError` when the body is not a JSON array. Entries that cannot be used (no address,
    no valid port, critical or in maintenance, weight 0, missing a required tag, warning while
    ``passing_only``) are left out; unknown fields are ignored.
    """
    if not isinstance(entries, list):
        raise ValueError(f"expected a JSON array of service instances, got {type(entries).__name__}")
    required = tuple(tags)
    found: list[Endpoint] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        node: Mapping[str, Any] = entry["Node"] if isinstance(entry.get("Node"), dict) else {}
        if not isinstance(entry.get("Service"), dict):
            continue
        service: Mapping[str, Any] = entry["Service"]
        status = aggregate_status(entry.get("Checks"))
        passing_weight, warning_weight = _weights(service)
        if status == _PASSING:
            weight = passing_weight
        elif status == _WARNING and not passing_only:
            weight = warning_weight
        else:
            continue
        if weight <= 0:
            continue
        host = str(service.get("Address") or "") or str(node.get("Address") or "")
        port = _int_field(service.get("Port"), 0)
        if not host or not 1 <= port <= 65535:
            logger.debug("Consul instance %r has no usable address or port; skipped", service.get("ID"))
            continue
        raw_tags = service.get("Tags")
        endpoint_tags = tuple(str(t) for t in raw_tags) if isinstance(raw_tags, list) else ()
        if any(tag not in endpoint_tags for tag in required):
            continue
        raw_meta = service.get("Meta")
        meta = MappingProxyType({str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {})
        zone = _zone(node, service, zone_key)
        found.append(Endpoint(host, port, weight=weight, zone=zone, tags=endpoint_tags, meta=meta))
    return tuple(found)


def _payload_key(endpoints: tuple[Endpoint, ...]) -> frozenset[tuple[Any, ...]]:
    """What "the same answer" means: the same endpoints with the same weights, tags and metadata."""
    return frozenset(
        (e.host, e.port, e.weight, e.priority, e.zone, e.tags, tuple(sorted(e.meta.items()))) for e in endpoints
    )
