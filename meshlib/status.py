"""``client.mesh_status()``: a snapshot of what one client's mesh looks like right now.

Plain frozen dataclasses of strings, numbers, booleans and lists, so a snapshot can be logged, compared in a
test, or turned into JSON with :meth:`MeshStatus.to_dict` (``json.dumps(status.to_dict())``) -- which is what
the admin endpoint's ``/status`` serves and ``meshlib status`` prints as a table.

The table is made from JSON that came over a socket, so :func:`format_status` trusts none of it: it checks the
shape first (:func:`check_status`: a :class:`StatusFormatError` names the first field that is missing or of the
wrong type), and every string it prints goes through :func:`printable` (control characters and escape sequences
written as ``\\x1b``-style escapes, length bounded), so a service name or a discovery error carrying a Consul
body cannot drive the terminal.

Reading a snapshot takes no lock on the request path: it reads the same immutable endpoint view and the
same counters the requests update, so numbers taken at one instant may disagree by a request in flight.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from meshlib.resilience.adaptive import AdaptiveLimitStatus

__all__ = [
    "BudgetStatus",
    "DiscoveryStatus",
    "EndpointStatus",
    "HedgeStatus",
    "MeshStatus",
    "RejectedRoutes",
    "RoutesStatus",
    "ServiceStatus",
    "StatusFormatError",
    "XdsResourceStatus",
    "XdsServerStatus",
    "XdsServiceStatus",
    "XdsStatus",
    "ZoneStatus",
    "check_status",
    "format_status",
    "printable",
    "status_of",
]


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    """One endpoint as this client sees it.

    ``address`` is ``host:port`` as written in discovery (``host`` and ``port`` apart too); ``latency_ms`` is the
    balancer's peak-EWMA estimate (decayed to now); ``requests`` and ``failures`` count
    attempts since the endpoint joined; ``breaker`` is ``closed``, ``open`` or ``half-open``; ``ejected`` is
    outlier detection's verdict and ``ejected_reason`` which detector ejected it (``consecutive``,
    ``success-rate`` or ``failure-percentage``; ``None`` while in rotation).
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
    ejected_reason: str | None = None
    #: The weight the balancer gives it now: the discovery ``weight`` times the slow-start factor, or
    #: ``weighted_round_robin``'s A58 weight from its load reports (0: none usable yet, the mean is used).
    effective_weight: float | None = None
    #: Slow start's multiplier while the endpoint ramps (``None`` once warm or with slow start off).
    slow_start_factor: float | None = None
    #: The last ORCA load report it sent (``endpoint-load-metrics``; kept only for ``weighted_round_robin``), its
    #: age in seconds, and how many malformed reports were ignored.
    load_report: dict[str, Any] | None = None
    load_report_age_s: float | None = None
    invalid_load_reports: int = 0


@dataclass(frozen=True, slots=True)
class ZoneStatus:
    """Zone-aware routing of a service (``MESHLIB_ZONE``) as it stands for the current health.

    ``mode`` is ``zone-aware`` (Envoy's algorithm) or ``failover`` (zones as priority levels). ``state``:
    ``direct`` (everything in-zone), ``residual`` (``in_zone_percent`` in-zone, the rest by spare capacity) or
    ``off`` (balanced over every endpoint; ``reason`` says why) for zone-aware; ``failover`` or ``off`` with the
    load per level in ``level_loads`` (percent, local zone first) for failover. Of the most preferred priority
    level.
    """

    local_zone: str
    mode: str
    state: str
    reason: str = ""
    in_zone_percent: float | None = None
    level_loads: list[int] = field(default_factory=list)


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
class HedgeStatus:
    """The service's hedging: hedges ``sent``, ``won`` (the accepted answer was a hedge's), attempts
    ``cancelled`` as losers, hedges refused by a budget (``budget_exhausted``), hedges the budget would allow now
    (``available``), its share (``max_extra_load``), the delay the last hedging call used (``delay_ms``,
    ``None``: no timed hedge, the window was cold) and the latencies in the window (``samples``)."""

    sent: int = 0
    won: int = 0
    cancelled: int = 0
    budget_exhausted: int = 0
    available: float = 0.0
    max_extra_load: float = 0.0
    delay_ms: float | None = None
    samples: int = 0


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One mesh service: balancer, discovery, budget, ejections and endpoints (empty until first used).

    ``adaptive`` is the adaptive concurrency limit's reading (current limit, window latency, baseline,
    gradient...) when the service uses one (``MESHLIB_ADAPTIVE_CONCURRENCY``); ``None`` with the fixed limit,
    whose value is ``budget.max_inflight``. Either way ``budget.overloaded`` counts the calls refused.
    ``ejections`` counts every ejection so far, ``ejections_by_reason`` the same by detector (``consecutive``,
    ``success-rate``, ``failure-percentage``).
    """

    name: str
    balancer: str
    started: bool
    discovery: DiscoveryStatus
    budget: BudgetStatus
    ejections: int
    endpoints: list[EndpointStatus] = field(default_factory=list)
    adaptive: AdaptiveLimitStatus | None = None
    ejections_by_reason: dict[str, int] = field(default_factory=dict)
    hedge: HedgeStatus = field(default_factory=HedgeStatus)
    #: Zone-aware routing (``None`` without ``MESHLIB_ZONE`` or for ``ring_hash``).
    zones: ZoneStatus | None = None


@dataclass(frozen=True, slots=True)
class RejectedRoutes:
    """A routes version that failed validation and is not serving (an xDS NACK's equivalent): its version (a
    content hash), the error (source, document, field path, what was expected) and when (Unix time)."""

    version: str
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class RoutesStatus:
    """The route table a client routes by, where it came from, and what its filters did.

    ``source`` (``MESHLIB_ROUTES_FILE``'s path, or ``api`` for a table installed in code) and ``version`` (a
    content hash) of the table serving now, ``loaded_at`` (Unix time), the ``routes`` in it
    (``namespace/name``), ``applied`` versions so far, the last ``rejected`` version if it is newer than the
    serving one; ``mirrors`` counts mirrored requests by ``service/outcome``, ``faults`` the faults injected by
    fault filter name.
    """

    source: str
    version: str
    loaded_at: float | None
    routes: list[str] = field(default_factory=list)
    applied: int = 0
    rejected: RejectedRoutes | None = None
    mirrors: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class XdsResourceStatus:
    """One xDS resource as the client holds it (what CSDS reports, gRFC A40).

    ``type`` is the short name (``LDS``, ``RDS``, ``CDS``, ``EDS``), ``type_url`` the full one; ``version`` the
    last *accepted* version (``""`` before one); ``status`` the newest answer about it: ``REQUESTED`` (asked,
    no answer yet), ``ACKED``, ``NACKED`` (the last push was refused: ``error`` says why, and the resource keeps
    ``version``'s value), ``DOES_NOT_EXIST`` (the control plane has none); ``updated_at`` when it last changed
    (Unix time, ``None`` before any answer). Names, versions and errors come from the control plane.
    """

    type: str
    type_url: str
    name: str
    version: str
    status: str
    error: str | None
    updated_at: float | None


@dataclass(frozen=True, slots=True)
class XdsServerStatus:
    """One control plane (management server) and the ADS stream to it: ``server`` its URI, ``connected``
    whether the stream is up, ``since`` when the current (or last) stream was opened (Unix time, ``None``
    before one), ``last_error`` why a stream last broke (kept after a reconnection), ``streams`` how many were
    opened so far; ``resources`` every resource subscribed on it, by type and name."""

    server: str
    connected: bool
    since: float | None
    last_error: str | None
    streams: int
    resources: list[XdsResourceStatus] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class XdsServiceStatus:
    """One ``xds:///`` service: ``service`` its meshlib name, ``target`` its ``xds:`` URI, the Listener and
    RouteConfiguration it is routed by (``route_configuration``: ``None`` for an inline one or before the
    Listener came), ``routed`` whether its routes are installed, else ``error`` why it cannot be routed
    (``None``: still waiting for the control plane's first answer)."""

    service: str
    target: str
    listener: str
    route_configuration: str | None
    routed: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class XdsStatus:
    """A client's xDS state: each control plane with its resources, each xDS service's routing, how many
    configurations were ``applied`` (route tables swapped in), and the clusters an update is ``waiting_for``
    (named by new routes, not answered on CDS yet: the previous configuration serves until they are)."""

    servers: list[XdsServerStatus] = field(default_factory=list)
    services: list[XdsServiceStatus] = field(default_factory=list)
    applied: int = 0
    waiting_for: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ConsulChainStatus:
    """One ``consul+chain://`` service: ``service`` its meshlib name, ``target`` its URI, ``version`` the
    ``X-Consul-Index`` of the chain in force (``""``: none yet), ``routed`` whether its routes are installed,
    ``error`` the last refusal or agent error (the chain in force keeps serving), ``backends`` each chain
    service (resolver node) with its targets in failover order, ``unsupported`` what the chain asks that meshlib
    does not honour (docs/consul-chain.md)."""

    service: str
    target: str
    version: str
    routed: bool
    error: str | None
    backends: dict[str, list[str]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MeshStatus:
    """Every service of one client; ``client`` is ``"sync"`` or ``"async"``, ``taken_at`` Unix time;
    ``routes`` the route table's state (``None``: the client has no routes); ``xds`` its xDS state (``None``:
    no service of the client uses ``xds:``); ``consul`` its discovery chains (``None``: no ``consul+chain:``
    service)."""

    client: str
    pid: int
    taken_at: float
    services: list[ServiceStatus] = field(default_factory=list)
    routes: RoutesStatus | None = None
    xds: XdsStatus | None = None
    consul: list[ConsulChainStatus] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-ready dictionaries and lists."""
        return dataclasses.asdict(self)


class _Viewed(Protocol):
    """Anything that reports its own read model: a mesh service (``meshlib._service.Service.view``)."""

    def view(self) -> ServiceStatus: ...


class _XdsViewed(Protocol):
    """A client's xDS control plane (``meshlib.control.xds.source.XdsSource``), reporting its own state."""

    def status(self) -> XdsStatus: ...


class _ConsulViewed(Protocol):
    """A client's Consul discovery chains (``meshlib.control.consul.source.ConsulChainSource``)."""

    def status(self) -> list[ConsulChainStatus]: ...


def status_of(
    services: Mapping[str, _Viewed],
    client: str,
    routes: RoutesStatus | None = None,
    xds: _XdsViewed | None = None,
    consul: _ConsulViewed | None = None,
) -> MeshStatus:
    """A :class:`MeshStatus` of ``services`` (a mesh's services, each giving its own view) taken now; ``xds`` and
    ``consul``: the client's control-plane sources, if it has them."""
    return MeshStatus(
        client=client,
        pid=os.getpid(),
        taken_at=time.time(),
        services=[service.view() for _, service in sorted(services.items())],
        routes=routes,
        xds=None if xds is None else xds.status(),
        consul=None if consul is None else consul.status(),
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
    ("ZONE", "zone", "<"),
    ("WEIGHT", "effective_weight", ">"),
    ("LOAD", "load_report", "<"),
)


#: Longest text :func:`format_status` prints from one field (a discovery error gets more room).
_TEXT_LIMIT = 200
_ERROR_LIMIT = 400


def printable(text: object, limit: int = _TEXT_LIMIT) -> str:
    """``text`` made safe to print on a terminal, at most about ``limit`` characters.

    Every character :meth:`str.isprintable` refuses -- C0 and C1 controls (``ESC`` starts terminal escape
    sequences), ``DEL``, line and paragraph separators, bidirectional overrides and other format characters
    -- is written as a Python-style escape (``\x1b``, ``\u202e``); longer text is cut and ends with ``...``.
    """
    value = text if isinstance(text, str) else str(text)
    if len(value) <= limit and value.isprintable():
        return value
    out: list[str] = []
    length = 0
    for char in value:
        piece = char if char.isprintable() else _escape(char)
        if length + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        length += len(piece)
    return "".join(out)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class StatusFormatError(ValueError):
    """A ``/status`` payload that is not what meshlib's admin endpoint answers: ``path`` names the first bad
    field (``clients[0].services[2].name``; empty for the payload itself), ``expected`` what it should be,
    ``found`` what it is (already :func:`printable`)."""

    def __init__(self, path: str, expected: str, found: str) -> None:
        self.path = path
        self.expected = expected
        self.found = found
        where = path or "the payload"
        super().__init__(f"{where} is {found}; expected {expected}")


# What format_status reads, and of which JSON type: an object spec is a dict, a list spec a one-item list, a
# scalar spec the allowed kinds. Keys a newer meshlib adds are ignored, so older and newer versions interoperate.
_Spec = Any
_ENDPOINT_SPEC: dict[str, _Spec] = {
    "address": "str",
    "inflight": "int",
    "latency_ms": "number",
    "requests": "int",
    "failures": "int",
    "breaker": "str",
    "breaker_opens": "int",
    "ejected": "bool",
}
_SERVICE_SPEC: dict[str, _Spec] = {
    "name": "str",
    "balancer": "str",
    "started": "bool",
    "discovery": {
        "source": "str",
        "age_s": "number|null",
        "version": "int|null",
        "refreshes": "int",
        "failures": "int",
        "consecutive_failures": "int",
        "last_error": "str|null",
    },
    "budget": {
        "available": "number",
        "retries": "int",
        "exhausted": "int",
        "inflight": "int",
        "max_inflight": "int",
        "overloaded": "int",
    },
    "ejections": "int",
    "endpoints": [_ENDPOINT_SPEC],
}
#: Optional in a service (a fixed limit, or an older version): checked only when present and not null.
_ADAPTIVE_SPEC: dict[str, _Spec] = {
    "limit": "int",
    "min_limit": "int",
    "max_limit": "int",
    "short_rtt_ms": "number|null",
    "long_rtt_ms": "number|null",
    "gradient": "number",
}
#: Optional in a client (older versions have none): checked only when present and not null.
_ROUTES_SPEC: dict[str, _Spec] = {
    "source": "str",
    "version": "str",
    "routes": ["str"],
    "applied": "int",
}
_REJECTED_SPEC: dict[str, _Spec] = {"version": "str", "error": "str"}
#: Optional in a client (no xDS, or an older version): checked only when present and not null.
_XDS_SPEC: dict[str, _Spec] = {
    "servers": [
        {
            "server": "str",
            "connected": "bool",
            "since": "number|null",
            "last_error": "str|null",
            "streams": "int",
            "resources": [
                {
                    "type": "str",
                    "name": "str",
                    "version": "str",
                    "status": "str",
                    "error": "str|null",
                    "updated_at": "number|null",
                }
            ],
        }
    ],
    "services": [
        {
            "service": "str",
            "target": "str",
            "listener": "str",
            "route_configuration": "str|null",
            "routed": "bool",
            "error": "str|null",
        }
    ],
    "applied": "int",
    "waiting_for": ["str"],
}
#: Optional: a client's Consul discovery chains.
_CONSUL_SPEC: list[_Spec] = [
    {
        "service": "str",
        "target": "str",
        "version": "str",
        "routed": "bool",
        "error": "str|null",
        "unsupported": ["str"],
    }
]
#: Optional (older versions have none): the inbound middleware's watched policy files.
_INBOUND_SPEC: dict[str, _Spec] = {
    "what": "str",
    "variable": "str",
    "path": "str",
    "version": "str|null",
    "applied": "int",
    "missing": "bool",
}
_INBOUND_REJECTED_SPEC: dict[str, _Spec] = {"version": "str|null", "error": "str"}
_STATUS_SPEC: dict[str, _Spec] = {
    "meshlib": "str",
    "pid": "int",
    "clients": [{"client": "str", "services": [_SERVICE_SPEC]}],
}
_KINDS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "number": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "null": ("null", lambda v: v is None),
}


def check_status(payload: object) -> Mapping[str, Any]:
    """``payload`` (decoded ``/status`` JSON) if it has every field :func:`format_status` reads, of the right
    type (the optional parts -- ``routes``, ``xds``, ``inbound`` -- too, when present); else
    :class:`StatusFormatError` naming the first field that does not."""
    _check(payload, _STATUS_SPEC, "")
    assert isinstance(payload, Mapping)
    for index, client in enumerate(payload["clients"]):
        for number, service in enumerate(client["services"]):
            if service.get("adaptive") is not None:
                _check(service["adaptive"], _ADAPTIVE_SPEC, f"clients[{index}].services[{number}].adaptive")
        routes = client.get("routes")
        if routes is not None:
            _check(routes, _ROUTES_SPEC, f"clients[{index}].routes")
            if routes.get("rejected") is not None:
                _check(routes["rejected"], _REJECTED_SPEC, f"clients[{index}].routes.rejected")
        if client.get("xds") is not None:
            _check(client["xds"], _XDS_SPEC, f"clients[{index}].xds")
        if client.get("consul") is not None:
            _check(client["consul"], _CONSUL_SPEC, f"clients[{index}].consul")
    inbound = payload.get("inbound")
    if inbound is not None:
        _check(inbound, [_INBOUND_SPEC], "inbound")
        for index, source in enumerate(inbound):
            if source.get("rejected") is not None:
                _check(source["rejected"], _INBOUND_REJECTED_SPEC, f"inbound[{index}].rejected")
    return payload


def _check(value: object, spec: _Spec, path: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise StatusFormatError(path, "a JSON object" + (" (meshlib's /status)" if not path else ""), _kind(value))
        for key, inner in spec.items():
            where = f"{path}.{key}" if path else key
            if key not in value:
                raise StatusFormatError(where, _expected(inner), "missing")
            _check(value[key], inner, where)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise StatusFormatError(path, "a list", _kind(value))
        for index, item in enumerate(value):
            _check(item, spec[0], f"{path}[{index}]")
    elif not any(_KINDS[kind][1](value) for kind in spec.split("|")):
        raise StatusFormatError(path, _expected(spec), _kind(value))


def _expected(spec: _Spec) -> str:
    if isinstance(spec, dict):
        return "a JSON object"
    if isinstance(spec, list):
        return "a list"
    return " or ".join(_KINDS[kind][0] for kind in spec.split("|"))


def _ms(value: float | None) -> str:
    """A latency in milliseconds for the table (``-``: none measured yet)."""
    return "-" if value is None else f"{value:.1f} ms"


def _kind(value: object) -> str:
    """A short, printable description of a JSON value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {printable(repr(value), 40)}"
    if isinstance(value, str):
        return f"the string {printable(repr(value), 60)}"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "a JSON object"
    return printable(type(value).__name__, 40)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else printable(value)


def _endpoint_cell(endpoint: Mapping[str, Any], key: str) -> str:
    """One cell of the endpoint table; the zone, weight and load columns are optional (older meshlibs send none)."""
    if key == "ejected":
        return _ejected_cell(endpoint)
    if key == "zone":
        return _cell(endpoint.get("zone"))
    if key == "effective_weight":
        return _weight_cell(endpoint)
    if key == "load_report":
        return _load_cell(endpoint.get("load_report"))
    return _cell(endpoint[key])


def _weight_cell(endpoint: Mapping[str, Any]) -> str:
    """The balancing weight now (``2``, ``0.35``), with ``ramp 35%`` while slow start ramps the endpoint."""
    weight = endpoint.get("effective_weight")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        weight = endpoint.get("weight")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        return "-"
    cell = f"{weight:.3g}"
    factor = endpoint.get("slow_start_factor")
    if isinstance(factor, (int, float)) and not isinstance(factor, bool):
        cell += f" ramp {factor:.0%}"
    return cell


def _load_cell(report: object) -> str:
    """The last ORCA load report, short: ``util 0.30 qps 12.5 eps 0.1`` (``-`` when none)."""
    if not isinstance(report, Mapping):
        return "-"
    parts = []
    for label, name in (
        ("util", "application_utilization"),
        ("cpu", "cpu_utilization"),
        ("qps", "rps_fractional"),
        ("eps", "eps"),
    ):
        value = report.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {value:.3g}")
    return " ".join(parts) if parts else "-"


def _zones_text(zones: Mapping[str, Any]) -> str:
    """``zones: local a, zone-aware residual, 33.3 % in-zone`` (or ``off (why)``, or failover's level loads)."""
    text = f"zones: local {_cell(zones.get('local_zone'))}, {_cell(zones.get('mode'))} {_cell(zones.get('state'))}"
    share = zones.get("in_zone_percent")
    if isinstance(share, (int, float)) and not isinstance(share, bool) and zones.get("state") != "off":
        text += f", {share:.1f} % in-zone"
    loads = zones.get("level_loads")
    if isinstance(loads, list) and loads and zones.get("state") != "off":
        text += ", load by level " + "/".join(_cell(load) for load in loads) + " %"
    reason = zones.get("reason")
    if isinstance(reason, str) and reason:
        text += f" ({printable(reason, 120)})"
    return text


def _ejected_cell(endpoint: Mapping[str, Any]) -> str:
    """``no``, or why the endpoint is ejected (``consecutive``, ``success-rate``...; ``yes`` from an older
    meshlib, which sends no ``ejected_reason``)."""
    reason = endpoint.get("ejected_reason")
    if endpoint["ejected"] and isinstance(reason, str) and reason:
        return printable(reason, 40)
    return _cell(endpoint["ejected"])


def _reasons_text(counts: object) -> str:
    """`` (success-rate 1)``: the ejections by detector that are not zero (nothing when absent or malformed)."""
    if not isinstance(counts, Mapping):
        return ""
    parts = [
        f"{printable(reason, 40)} {count}"
        for reason, count in counts.items()
        if isinstance(count, int) and not isinstance(count, bool) and count
    ]
    return f" ({', '.join(parts[:10])})" if parts else ""


def _rejected_line(rejected: Mapping[str, Any]) -> str:
    """A refused version of a watched file (routes, inbound policies), escaped and bounded."""
    return (
        f"REJECTED version {_cell(rejected['version'])} (the previous one keeps serving): "
        f"{printable(rejected['error'], _ERROR_LIMIT)}"
    )


def _when(seconds: float | None) -> str:
    """A Unix time as UTC ISO 8601 to the second (``-`` for none; a number no clock has, as it came)."""
    if seconds is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return printable(repr(seconds), 40)


_XDS_COLUMNS = (("TYPE", "type"), ("NAME", "name"), ("VERSION", "version"), ("STATUS", "status"), ("UPDATED", "when"))


def _xds_lines(xds: Mapping[str, Any]) -> list[str]:
    """A client's xDS section: each control plane's connection, then one line per resource (the error of a
    NACKED one after it), then each service's routing. All of it came from a control plane: escaped, bounded."""
    text = printable
    services = xds["services"]
    routed = sum(1 for service in services if service["routed"])
    waiting = xds["waiting_for"]
    lines = [
        f"  xDS: {routed}/{len(services)} service(s) routed, {xds['applied']} update(s) applied"
        + (f", waiting for cluster(s) {text(', '.join(waiting))}" if waiting else "")
    ]
    for server in xds["servers"]:
        if server["connected"]:
            state = f"connected since {_when(server['since'])}"
        else:
            state = "NOT CONNECTED" + (f" (stream opened {_when(server['since'])})" if server["since"] else "")
        failed = server["last_error"]
        lines.append(
            f"    control plane {text(server['server'])}: {state}, {server['streams']} stream(s) opened"
            + (f"; last error: {text(failed, _ERROR_LIMIT)}" if failed else "")
        )
        rows = [[header for header, _ in _XDS_COLUMNS]]
        errors: list[str | None] = [None]
        for resource in server["resources"]:
            cells = {**resource, "when": _when(resource["updated_at"])}
            rows.append([_cell(cells[key] if cells[key] != "" else None) for _, key in _XDS_COLUMNS])
            errors.append(resource["error"] if resource["status"] == "NACKED" else None)
        widths = [max(len(row[i]) for row in rows) for i in range(len(_XDS_COLUMNS))]
        for row, error in zip(rows, errors, strict=True):
            lines.append(
                "      " + "  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True)).rstrip()
            )
            if error is not None:
                lines.append(f"        NACKED (the last accepted version keeps serving): {text(error, _ERROR_LIMIT)}")
    for service in services:
        route = service["route_configuration"]
        if service["routed"]:
            state = "routed"
        elif service["error"] is not None:
            state = f"NOT ROUTED: {text(service['error'], _ERROR_LIMIT)}"
        else:
            state = "waiting for the control plane"
        lines.append(
            f"    service {text(service['service'])} ({text(service['target'])}): listener "
            f"{text(service['listener'])}, route configuration {'inline' if route is None else text(route)}: {state}"
        )
    return lines


def _consul_lines(chain: Mapping[str, Any]) -> list[str]:
    """One discovery chain: its version and state, then what it asks that meshlib does not honour. All of it
    came from Consul: escaped, bounded."""
    text = printable
    if chain["routed"]:
        state = f"routed by the chain of X-Consul-Index {text(chain['version'])}"
    else:
        state = "waiting for Consul" if chain["error"] is None else "NOT ROUTED"
    lines = [f"  Consul discovery chain of {text(chain['service'])} ({text(chain['target'])}): {state}"]
    if chain["error"] is not None:
        lines.append(f"    last error (the chain in force keeps serving): {text(chain['error'], _ERROR_LIMIT)}")
    lines.extend(f"    not honoured: {text(note)}" for note in chain["unsupported"][:20])
    return lines


def format_status(payload: object) -> str:
    """The admin endpoint's ``/status`` JSON as the table ``meshlib status`` prints.

    Checked first (:func:`check_status`, :class:`StatusFormatError`); strings are printed through
    :func:`printable`.
    """
    status = check_status(payload)
    inbound = status.get("inbound")
    text = printable
    clients = status["clients"]
    lines = [f"meshlib {text(status['meshlib'])}, pid {status['pid']}: {len(clients)} client(s)"]
    for source in inbound or ():
        state = " (file missing: the last good version keeps serving)" if source["missing"] else ""
        lines.append(
            f"inbound {text(source['what'])}: {text(source['variable'])}={text(source['path'])} "
            f"version {_cell(source['version'])}, {source['applied']} version(s) applied{state}"
        )
        if source.get("rejected") is not None:
            lines.append("  " + _rejected_line(source["rejected"]))
    for number, client in enumerate(clients, 1):
        services = client["services"]
        lines.append(f"client {number} ({text(client['client'])}): {len(services)} service(s)")
        routes = client.get("routes")
        if routes is not None:
            lines.append(
                f"  routes: {text(routes['source'])} version {text(routes['version'])}, "
                f"{len(routes['routes'])} route(s), {routes['applied']} version(s) applied"
            )
            if routes.get("rejected") is not None:
                lines.append("    " + _rejected_line(routes["rejected"]))
        if client.get("xds") is not None:
            lines.extend(_xds_lines(client["xds"]))
        for chain in client.get("consul") or ():
            lines.extend(_consul_lines(chain))
        for service in services:
            discovery, budget = service["discovery"], service["budget"]
            age = discovery["age_s"]
            state = "" if service["started"] else " (not used yet)"
            lines.append(
                f"  {text(service['name'])}{state}  balancer {text(service['balancer'])}  "
                f"source {text(discovery['source'])}"
            )
            failing = discovery["consecutive_failures"]
            lines.append(
                f"    discovery: {len(service['endpoints'])} endpoint(s), version {_cell(discovery['version'])}, "
                f"age {'-' if age is None else f'{age:.1f} s'}, {discovery['refreshes']} refreshes, "
                f"{discovery['failures']} failures"
                + (f" (failing: {text(discovery['last_error'], _ERROR_LIMIT)})" if failing else "")
            )
            lines.append(
                f"    retries: {budget['retries']} made, {budget['available']:.1f} available, "
                f"{budget['exhausted']} refused by the budget; "
                f"in flight {budget['inflight']}/{budget['max_inflight']}, {budget['overloaded']} overloaded; "
                f"{service['ejections']} ejection(s)" + _reasons_text(service.get("ejections_by_reason"))
            )
            adaptive = service.get("adaptive")
            if adaptive is not None:
                lines.append(
                    f"    adaptive concurrency: limit {adaptive['limit']} "
                    f"({adaptive['min_limit']}-{adaptive['max_limit']}), "
                    f"window latency {_ms(adaptive['short_rtt_ms'])}, baseline {_ms(adaptive['long_rtt_ms'])}, "
                    f"gradient {adaptive['gradient']:.2f}"
                )
            hedge = service.get("hedge")
            if isinstance(hedge, dict) and (hedge.get("sent") or hedge.get("budget_exhausted")):
                delay = hedge.get("delay_ms")
                lines.append(
                    f"    hedges: {_cell(hedge.get('sent'))} sent, {_cell(hedge.get('won'))} won, "
                    f"{_cell(hedge.get('cancelled'))} cancelled, {_cell(hedge.get('budget_exhausted'))} refused by "
                    f"the budget; delay {'-' if not isinstance(delay, (int, float)) else f'{delay:.1f} ms'}"
                )
            zones = service.get("zones")
            if isinstance(zones, Mapping):
                lines.append("    " + _zones_text(zones))
            rows = [[header for header, _, _ in _COLUMNS]]
            rows.extend([_endpoint_cell(endpoint, key) for _, key, _ in _COLUMNS] for endpoint in service["endpoints"])
            widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
            for row in rows:
                cells = [
                    f"{cell:{align}{width}}" for cell, width, (_, _, align) in zip(row, widths, _COLUMNS, strict=True)
                ]
                lines.append("    " + "  ".join(cells).rstrip())
    return "\n".join(lines)
