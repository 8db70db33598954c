"""``client.mesh_status()``: a snapshot of what one client's mesh looks like right now.

Plain frozen dataclasses of strings, numbers, booleans and lists, so a snapshot can be logged, compared in a
test, or turned into JSON with :meth:`MeshStatus.to_dict` (``json.dumps(status.to_dict())``) -- which is what
the admin endpoint's ``/status`` serves and ``meshlib status`` prints as a table.

Reading a snapshot takes no lock on the request path: it reads the same immutable endpoint view and the
same counters the requests update, so numbers taken at one instant may disagree by a request in flight.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "BudgetStatus",
    "DiscoveryStatus",
    "EndpointStatus",
    "MeshStatus",
    "ServiceStatus",
    "format_status",
    "status_of",
]


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """One endpoint as this client sees it.

    ``address`` is ``host:port`` as written in discovery (``host`` and ``port`` apart too); ``latency_ms`` is the
    balancer's peak-EWMA estimate (decayed to now); ``requests`` and ``failures`` count
    attempts since the endpoint joined; ``breaker`` is ``closed``, ``open`` or ``half-open``; ``ejected`` is
    outlier detection's verdict.
    """

    address: str
    host: str
    port: int
    weight: int
    priority: int
    zone: str | None
    inflight: int
    latency_ms: float
    requests: int
    failures: int
    breaker: str
    breaker_failures: int
    breaker_opens: int
    ejected: bool


@dataclass(frozen=True, slots=True)
class DiscoveryStatus:
    """The discovery source of a service and how fresh its answer is (``age_s``: ``None`` before any)."""

    source: str
    age_s: float | None
    version: int | None
    refreshes: int
    failures: int
    consecutive_failures: int
    changes: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """The service's retry budget (``available``: retries it would allow now) and concurrency limit."""

    available: float
    retries: int
    exhausted: int
    percent: float
    min_per_second: int
    inflight: int
    max_inflight: int
    overloaded: int


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One mesh service: balancer, discovery, budget, ejections and endpoints (empty until first used)."""

    name: str
    balancer: str
    started: bool
    discovery: DiscoveryStatus
    budget: BudgetStatus
    ejections: int
    endpoints: list[EndpointStatus] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MeshStatus:
    """Every service of one client; ``client`` is ``"sync"`` or ``"async"``, ``taken_at`` Unix time."""

    client: str
    pid: int
    taken_at: float
    services: list[ServiceStatus] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready dictionaries and lists."""
        return dataclasses.asdict(self)


class _Viewed(Protocol):
    """Anything that reports its own read model: a mesh service (``meshlib._service.Service.view``)."""

    def view(self) -> ServiceStatus: ...


def status_of(services: Mapping[str, _Viewed], client: str) -> MeshStatus:
    """A :class:`MeshStatus` of ``services`` (a mesh's services, each giving its own view) taken now."""
    return MeshStatus(
        client=client,
        pid=os.getpid(),
        taken_at=time.time(),
        services=[service.view() for _, service in sorted(services.items())],
    )


_COLUMNS = (
    ("ENDPOINT", "address", "<"),
    ("INFLIGHT", "inflight", ">"),
    ("EWMA ms", "latency_ms", ">"),
    ("REQUESTS", "requests", ">"),
    ("FAILURES", "failures", ">"),
    ("BREAKER", "breaker", "<"),
    ("OPENS", "breaker_opens", ">"),
    ("EJECTED", "ejected", "<"),
)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def format_status(payload: Mapping[str, Any]) -> str:
    """The admin endpoint's ``/status`` JSON as the table ``meshlib status`` prints."""
    clients = payload.get("clients") or []
    lines = [f"meshlib {payload.get('meshlib', '?')}, pid {payload.get('pid', '?')}: {len(clients)} client(s)"]
    for number, client in enumerate(clients, 1):
        services = client.get("services") or []
        lines.append(f"client {number} ({client.get('client', '?')}): {len(services)} service(s)")
        for service in services:
            discovery, budget = service["discovery"], service["budget"]
            age = discovery["age_s"]
            state = "" if service["started"] else " (not used yet)"
            lines.append(f"  {service['name']}{state}  balancer {service['balancer']}  source {discovery['source']}")
            lines.append(
                f"    discovery: {len(service['endpoints'])} endpoint(s), version {_cell(discovery['version'])}, "
                f"age {'-' if age is None else f'{age:.1f} s'}, {discovery['refreshes']} refreshes, "
                f"{discovery['failures']} failures"
                + (f" (failing: {discovery['last_error']})" if discovery["consecutive_failures"] else "")
            )
            lines.append(
                f"    retries: {budget['retries']} made, {budget['available']:.1f} available, "
                f"{budget['exhausted']} refused by the budget; "
                f"in flight {budget['inflight']}/{budget['max_inflight']}, {budget['overloaded']} overloaded; "
                f"{service['ejections']} ejection(s)"
            )
            rows = [[header for header, _, _ in _COLUMNS]]
            rows.extend([_cell(endpoint[key]) for _, key, _ in _COLUMNS] for endpoint in service["endpoints"])
            widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
            for row in rows:
                cells = [
                    f"{cell:{align}{width}}" for cell, width, (_, _, align) in zip(row, widths, _COLUMNS, strict=True)
                ]
                lines.append("    " + "  ".join(cells).rstrip())
    return "\n".join(lines)
