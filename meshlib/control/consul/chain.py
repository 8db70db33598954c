"""Consul's compiled discovery chain (``GET /v1/discovery-chain/:service``) validated and mapped onto a RouteTable.

Consul compiles a service's ``service-router``, ``service-splitter`` and ``service-resolver`` config entries into
one graph: ``StartNode`` names a router, splitter or resolver node of ``Nodes``; routers send each route to a
splitter or resolver; splitters send weighted legs to resolvers; each resolver names its ``Target`` and, in
order, its ``Failover.Targets``; ``Targets`` says which service instances each target is (service, subset filter,
namespace, partition, datacenter, peer). meshlib consumes that graph; it never re-compiles config entries.

Two pure steps (no I/O):

1. :func:`parse_chain` validates the decoded JSON defensively (sizes and nesting bounded, every field's type
   checked, errors name the field path: ``Chain.Nodes["router:web"].Routes[1].Definition.Match.HTTP.Header[0]``);
   unknown fields are ignored (newer Consul versions add some); what meshlib cannot honour is either refused
   (:class:`ChainError`) when honouring it differently would send traffic elsewhere, or listed in
   :attr:`ChainMapping.unsupported` when the difference is only in how (a load-balancer tuning knob).
2. :func:`map_chain` turns it into what ``_Mesh.apply_control_plane(table, added, replaced)`` installs: a
   :class:`~meshlib.routing.model.RouteTable` for the called service (one rule per router route, in order;
   or one catch-all rule when the chain starts at a splitter or resolver), and one meshlib service per
   resolver node reached, whose endpoints are the union of its targets' instances, each target at the
   priority of its place in the failover order (0: the resolver's own target, 1: the first failover
   target...). meshlib's balancers pick from the lowest priority level that has a usable endpoint, so a
   target with no healthy instance fails over to the next, and back, with no extra machinery.

docs/consul-chain.md maps every field and lists what is not honoured yet.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from meshlib._config.model import ServiceConfig, service_key
from meshlib._config.parse import is_header_name
from meshlib.control.consul.bexpr import BexprError, Filter, compile_filter
from meshlib.errors import ConfigError
from meshlib.policy import MAX_RETRIES, NO_POLICY, Policy
from meshlib.routing.model import (
    NO_FILTERS,
    Backend,
    EnvoyHeaderMatch,
    Filters,
    HeaderMatch,
    HeaderModifier,
    HostRoutes,
    PathMatch,
    PathModifier,
    QueryMatch,
    RouteMatch,
    RouteTable,
    Rule,
    URLRewrite,
)
from meshlib.routing.re2 import Re2Error, compile_re2, shown

__all__ = [
    "CHAIN_PREFIX",
    "MAX_CHAIN_BYTES",
    "ChainError",
    "ChainMapping",
    "ChainNode",
    "ChainResolver",
    "ChainTarget",
    "CompiledChain",
    "LiteralPrefixMatch",
    "map_chain",
    "parse_chain",
    "parse_chain_json",
]

logger = logging.getLogger("meshlib")

#: A resolver node is the meshlib service ``consul-chain:<node name>`` (``~<CustomizationHash>`` appended when the
#: chain was compiled with overrides): the prefix keeps it apart from services configured by name.
CHAIN_PREFIX = "consul-chain:"
#: The largest response body :func:`parse_chain_json` accepts.
MAX_CHAIN_BYTES = 4 * 1024 * 1024
MAX_NODES = 1024
MAX_TARGETS = 1024
MAX_ROUTES = 256
MAX_SPLITS = 64
MAX_FAILOVER = 64
MAX_MATCHES = 64
MAX_STRING = 4096
#: Router -> splitter (-> splitter ...) -> resolver: how many hops a walk may take before it is refused.
MAX_HOPS = 8

_NODE_TYPES = ("router", "splitter", "resolver")
#: RetryOn tokens (Consul validates them against this list) -> the statuses they retry; transport ones below.
_RETRY_STATUSES: Mapping[str, frozenset[int]] = {
    "5xx": frozenset(range(500, 600)),
    "gateway-error": frozenset({502, 503, 504}),
    "retriable-4xx": frozenset({409}),
    "envoy-ratelimited": frozenset({429}),
    "cancelled": frozenset({499}),
    "deadline-exceeded": frozenset({504}),
    "internal": frozenset({500}),
    "resource-exhausted": frozenset({429}),
    "unavailable": frozenset({503}),
}
_RETRY_TRANSPORT = frozenset({"reset", "connect-failure", "refused-stream"})
_LB_POLICIES: Mapping[str, str | None] = {
    "": None,
    "round_robin": "round_robin",
    "least_request": "least_request",
    "random": "random",
    "ring_hash": "ring_hash",
    "maglev": "ring_hash",
}
_DURATION_PART = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ChainError(ConfigError):
    """A compiled discovery chain meshlib refuses: ``path`` is the field (``Chain.Targets["web.default.dc1"]``),
    the message what was found and what was expected. The chain's previous version stays in force."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        # ConfigError's attributes, for code that reports any ConfigError.
        self.variable = path
        self.value = None
        self.expected = message
        Exception.__init__(self, f"Consul discovery chain: {path}: {message}")


# -- the validated chain --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainTarget:
    """One ``Targets`` entry: which service instances it is, and how to select them.

    The endpoints come from ``/v1/health/connect/<service>`` (``/v1/health/service`` for a non-mesh target) with
    ``dc=<datacenter>``, ``ns=<namespace>``, ``partition=<partition>`` or ``peer=<peer>`` where set, and
    ``filter=<filter>`` (or :attr:`subset_filter` applied locally), passing instances only when ``only_passing``
    (Consul's proxies otherwise also use instances in ``warning``).
    """

    id: str
    service: str
    service_subset: str = ""
    namespace: str = ""
    partition: str = ""
    datacenter: str = ""
    peer: str = ""
    filter: str = ""
    only_passing: bool = False
    sni: str = ""
    name: str = ""
    connect_timeout_s: float | None = None
    external: bool = False
    mesh_gateway_mode: str = ""
    #: ``filter`` compiled (``None``: no filter, every instance of the service).
    subset_filter: Filter | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """One ``LoadBalancer.HashPolicies`` entry."""

    field: str = ""
    field_value: str = ""
    source_ip: bool = False
    terminal: bool = False
    cookie: bool = False


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    """A node's ``LoadBalancer``: the policy, its tuning, the hash policies."""

    policy: str = ""
    hash_policies: tuple[HashPolicy, ...] = ()
    ring_hash_config: bool = False
    choice_count: int | None = None


@dataclass(frozen=True, slots=True)
class ChainResolver:
    """A resolver node's ``Resolver``."""

    target: str
    failover: tuple[str, ...] = ()
    connect_timeout_s: float | None = None
    request_timeout_s: float | None = None
    default: bool = False
    failover_mode: str = ""
    failover_regions: tuple[str, ...] = ()
    prioritize_by_locality: str = ""


@dataclass(frozen=True, slots=True)
class HTTPRouteMatch:
    """A router route's ``Match.HTTP``, compiled: one :class:`RouteMatch` per method (OR), or one."""

    matches: tuple[RouteMatch, ...]
    reads_query: bool = False
    path_kind: Literal["", "exact", "prefix", "regex"] = ""


@dataclass(frozen=True, slots=True)
class ChainRoute:
    """One router route: its compiled match, the destination's settings, its next node."""

    match: HTTPRouteMatch
    next_node: str
    policy: Policy = NO_POLICY
    filters: Filters = NO_FILTERS
    request_timeout_set: bool = False


@dataclass(frozen=True, slots=True)
class ChainSplit:
    """One splitter leg: its weight in hundredths of a percent (``Weight`` 90.5 -> 9050), its next node, and
    the header changes of its ``Definition``."""

    weight: int
    next_node: str
    filters: Filters = NO_FILTERS


@dataclass(frozen=True, slots=True)
class ChainNode:
    """One ``Nodes`` entry."""

    key: str
    type: Literal["router", "splitter", "resolver"]
    name: str
    routes: tuple[ChainRoute, ...] = ()
    splits: tuple[ChainSplit, ...] = ()
    resolver: ChainResolver | None = None
    load_balancer: LoadBalancer | None = None


@dataclass(frozen=True, slots=True)
class CompiledChain:
    """A validated ``Chain``."""

    service_name: str
    namespace: str
    partition: str
    datacenter: str
    protocol: str
    start_node: str
    nodes: Mapping[str, ChainNode]
    targets: Mapping[str, ChainTarget]
    customization_hash: str = ""
    default: bool = False
    #: ``path: what`` for each field meshlib reads but does not honour (see docs/consul-chain.md).
    unsupported: tuple[str, ...] = ()


# -- match types Consul's router needs (Envoy semantics) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiteralPrefixMatch(PathMatch):
    """A router's ``PathPrefix`` (Envoy's ``prefix``): a plain string prefix, so ``/admin`` matches
    ``/administrators`` too, unlike Gateway API's segment prefix. ``kind`` is ``RegularExpression`` so no path
    index rules it out; ``literal_prefix`` is what ``PrefixRewrite`` replaces (:mod:`meshlib.routing.filters`)."""

    literal_prefix: str = ""

    def test(self, path: str) -> bool:
        """Whether ``path`` starts with the prefix."""
        return path.startswith(self.literal_prefix)


@dataclass(frozen=True, slots=True)
class ConsulQueryMatch(QueryMatch):
    """A router ``QueryParam`` with ``Present``: the parameter is there (any value, even empty)."""

    def test_value(self, found: str | None) -> bool:
        """Whether the parameter is present."""
        return found is not None


# -- reading JSON defensively ---------------------------------------------------------------------------------------


def _key(path: str, name: str) -> str:
    return f"{path}[{json.dumps(name)}]"


def _obj(value: Any, path: str, *, required: bool = False) -> Mapping[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ChainError(path, f"expected an object, found {_kind(value)}")
    return value


def _list(value: Any, path: str, limit: int) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ChainError(path, f"expected a list, found {_kind(value)}")
    if len(value) > limit:
        raise ChainError(path, f"{len(value)} entries: meshlib accepts at most {limit}")
    return value


def _str(value: Any, path: str, *, required: bool = False) -> str:
    if value is None or value == "":
        if required:
            raise ChainError(path, "missing: expected a non-empty string")
        return ""
    if not isinstance(value, str):
        raise ChainError(path, f"expected a string, found {_kind(value)}")
    if len(value) > MAX_STRING:
        raise ChainError(path, f"a string of {len(value)} characters: meshlib accepts at most {MAX_STRING}")
    return value


def _bool(value: Any, path: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ChainError(path, f"expected true or false, found {_kind(value)}")
    return value


def _int(value: Any, path: str, low: int, high: int) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ChainError(path, f"expected an integer, found {shown(value)}")
    number = int(value)
    if not low <= number <= high:
        raise ChainError(path, f"{number}: expected an integer from {low} to {high}")
    return number


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else f"a {type(value).__name__}"
    )


def _duration(value: Any, path: str) -> float | None:
    """A Go duration string (``"15s"``, ``"1m30s"``, ``"250ms"``) or nanoseconds as a number; ``None`` if 0/unset."""
    if value is None or value in ("", 0):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) / 1e9
    elif isinstance(value, str):
        text = value
        sign = 1.0
        if text[:1] in "+-":
            sign = -1.0 if text[0] == "-" else 1.0
            text = text[1:]
        if text == "0":
            return None
        position = 0
        seconds = 0.0
        while position < len(text):
            part = _DURATION_PART.match(text, position)
            if part is None:
                raise ChainError(path, f"{shown(value)} is not a duration (like 15s, 1m30s, 250ms)")
            seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
            position = part.end()
        if not text:
            raise ChainError(path, f"{shown(value)} is not a duration (like 15s, 1m30s, 250ms)")
        seconds *= sign
    else:
        raise ChainError(path, f"expected a duration, found {_kind(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ChainError(path, f"{shown(value)}: expected a duration >= 0")
    return seconds or None


def _regex(pattern: str, path: str) -> re.Pattern[str]:
    try:
        return compile_re2(pattern, path)
    except Re2Error as error:
        raise ChainError(error.where, error.message) from None


# -- parsing --------------------------------------------------------------------------------------------------------


def parse_chain_json(body: bytes | str) -> CompiledChain:
    """The response body of ``/v1/discovery-chain/:service`` parsed and validated (see :func:`parse_chain`)."""
    if len(body) > MAX_CHAIN_BYTES:
        raise ChainError("(body)", f"{len(body)} bytes: meshlib accepts at most {MAX_CHAIN_BYTES}")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise ChainError("(body)", f"not JSON: {error}") from None
    return parse_chain(document)


def parse_chain(document: Any) -> CompiledChain:
    """The decoded response (``{"Chain": {...}}``) validated into a :class:`CompiledChain`, or :class:`ChainError`."""
    chain = _obj(_obj(document, "(response)", required=True).get("Chain"), "Chain", required=True)
    unsupported: list[str] = []
    service_name = _str(chain.get("ServiceName"), "Chain.ServiceName", required=True)
    protocol = _str(chain.get("Protocol"), "Chain.Protocol") or "tcp"
    start = _str(chain.get("StartNode"), "Chain.StartNode", required=True)
    raw_targets = _obj(chain.get("Targets"), "Chain.Targets")
    if len(raw_targets) > MAX_TARGETS:
        raise ChainError("Chain.Targets", f"{len(raw_targets)} targets: meshlib accepts at most {MAX_TARGETS}")
    targets = {name: _target(name, raw, _key("Chain.Targets", name), unsupported) for name, raw in raw_targets.items()}
    raw_nodes = _obj(chain.get("Nodes"), "Chain.Nodes")
    if len(raw_nodes) > MAX_NODES:
        raise ChainError("Chain.Nodes", f"{len(raw_nodes)} nodes: meshlib accepts at most {MAX_NODES}")
    nodes = {name: _node(name, raw, _key("Chain.Nodes", name), unsupported) for name, raw in raw_nodes.items()}
    if start not in nodes:
        raise ChainError("Chain.StartNode", f"{shown(start)} is not one of Chain.Nodes")
    for node in nodes.values():
        where = _key("Chain.Nodes", node.key)
        nexts = [
            (f"{where}.Routes[{i}].NextNode", r.next_node, ("splitter", "resolver")) for i, r in enumerate(node.routes)
        ]
        nexts += [
            (f"{where}.Splits[{i}].NextNode", s.next_node, ("splitter", "resolver")) for i, s in enumerate(node.splits)
        ]
        for path, name, allowed in nexts:
            found = nodes.get(name)
            if found is None:
                raise ChainError(path, f"{shown(name)} is not one of Chain.Nodes")
            if found.type not in allowed:
                raise ChainError(path, f"{shown(name)} is a {found.type}: expected a {' or '.join(allowed)}")
        if node.resolver is not None:
            for path, name in [(f"{where}.Resolver.Target", node.resolver.target)] + [
                (f"{where}.Resolver.Failover.Targets[{i}]", t) for i, t in enumerate(node.resolver.failover)
            ]:
                if name not in targets:
                    raise ChainError(path, f"{shown(name)} is not one of Chain.Targets")
    return CompiledChain(
        service_name=service_name,
        namespace=_str(chain.get("Namespace"), "Chain.Namespace"),
        partition=_str(chain.get("Partition"), "Chain.Partition"),
        datacenter=_str(chain.get("Datacenter"), "Chain.Datacenter"),
        protocol=protocol,
        start_node=start,
        nodes=nodes,
        targets=targets,
        customization_hash=_str(chain.get("CustomizationHash"), "Chain.CustomizationHash"),
        default=_bool(chain.get("Default"), "Chain.Default"),
        unsupported=tuple(unsupported),
    )


def _target(name: str, raw: Any, where: str, unsupported: list[str]) -> ChainTarget:
    target = _obj(raw, where, required=True)
    subset = _obj(target.get("Subset"), f"{where}.Subset")
    expression = _str(subset.get("Filter"), f"{where}.Subset.Filter")
    compiled = None
    if expression:
        try:
            compiled = compile_filter(expression, where=f"{where}.Subset.Filter")
        except BexprError as error:
            raise ChainError(error.where, str(error).split(": ", 1)[1]) from None
    gateway = _str(_obj(target.get("MeshGateway"), f"{where}.MeshGateway").get("Mode"), f"{where}.MeshGateway.Mode")
    if gateway in ("local", "remote"):
        unsupported.append(f"{where}.MeshGateway.Mode: {gateway!r} (meshlib connects to the instances directly)")
    ident = _str(target.get("ID"), f"{where}.ID") or name
    if ident != name:
        raise ChainError(f"{where}.ID", f"{shown(ident)} differs from its key {shown(name)}")
    return ChainTarget(
        id=name,
        service=_str(target.get("Service"), f"{where}.Service", required=True),
        service_subset=_str(target.get("ServiceSubset"), f"{where}.ServiceSubset"),
        namespace=_str(target.get("Namespace"), f"{where}.Namespace"),
        partition=_str(target.get("Partition"), f"{where}.Partition"),
        datacenter=_str(target.get("Datacenter"), f"{where}.Datacenter"),
        peer=_str(target.get("Peer"), f"{where}.Peer"),
        filter=expression,
        only_passing=_bool(subset.get("OnlyPassing"), f"{where}.Subset.OnlyPassing"),
        sni=_str(target.get("SNI"), f"{where}.SNI"),
        name=_str(target.get("Name"), f"{where}.Name"),
        connect_timeout_s=_duration(target.get("ConnectTimeout"), f"{where}.ConnectTimeout"),
        external=_bool(target.get("External"), f"{where}.External"),
        mesh_gateway_mode=gateway,
        subset_filter=compiled,
    )


def _node(key: str, raw: Any, where: str, unsupported: list[str]) -> ChainNode:
    node = _obj(raw, where, required=True)
    kind = _str(node.get("Type"), f"{where}.Type", required=True)
    if kind not in _NODE_TYPES:
        raise ChainError(f"{where}.Type", f"{shown(kind)}: expected one of {', '.join(_NODE_TYPES)}")
    name = _str(node.get("Name"), f"{where}.Name")
    balancer = None
    if node.get("LoadBalancer") is not None:
        balancer = _load_balancer(node["LoadBalancer"], f"{where}.LoadBalancer")
    if kind == "router":
        raw_routes = _list(node.get("Routes"), f"{where}.Routes", MAX_ROUTES)
        routes = tuple(_route(r, f"{where}.Routes[{i}]", unsupported) for i, r in enumerate(raw_routes))
        return ChainNode(key, "router", name, routes=routes, load_balancer=balancer)
    if kind == "splitter":
        raw_splits = _list(node.get("Splits"), f"{where}.Splits", MAX_SPLITS)
        if not raw_splits:
            raise ChainError(f"{where}.Splits", "a splitter with no splits")
        splits = tuple(_split(s, f"{where}.Splits[{i}]") for i, s in enumerate(raw_splits))
        if sum(s.weight for s in splits) <= 0:
            raise ChainError(f"{where}.Splits", "the weights sum to 0")
        return ChainNode(key, "splitter", name, splits=splits, load_balancer=balancer)
    resolver = _obj(node.get("Resolver"), f"{where}.Resolver", required=True)
    at = f"{where}.Resolver"
    failover = _obj(resolver.get("Failover"), f"{at}.Failover")
    policy = _obj(failover.get("Policy"), f"{at}.Failover.Policy")
    mode = _str(policy.get("Mode"), f"{at}.Failover.Policy.Mode")
    if mode not in ("", "sequential"):
        unsupported.append(f"{at}.Failover.Policy.Mode: {mode!r} (meshlib fails over in the order listed)")
    regions = tuple(
        _str(r, f"{at}.Failover.Regions[{i}]")
        for i, r in enumerate(_list(failover.get("Regions"), f"{at}.Failover.Regions", MAX_FAILOVER))
    )
    if regions:
        unsupported.append(f"{at}.Failover.Regions: locality-ordered failover (meshlib uses the order listed)")
    locality = _str(
        _obj(resolver.get("PrioritizeByLocality"), f"{at}.PrioritizeByLocality").get("Mode"),
        f"{at}.PrioritizeByLocality.Mode",
    )
    if locality not in ("", "none"):
        unsupported.append(f"{at}.PrioritizeByLocality.Mode: {locality!r}")
    return ChainNode(
        key,
        "resolver",
        name,
        resolver=ChainResolver(
            target=_str(resolver.get("Target"), f"{at}.Target", required=True),
            failover=tuple(
                _str(t, f"{at}.Failover.Targets[{i}]", required=True)
                for i, t in enumerate(_list(failover.get("Targets"), f"{at}.Failover.Targets", MAX_FAILOVER))
            ),
            connect_timeout_s=_duration(resolver.get("ConnectTimeout"), f"{at}.ConnectTimeout"),
            request_timeout_s=_duration(resolver.get("RequestTimeout"), f"{at}.RequestTimeout"),
            default=_bool(resolver.get("Default"), f"{at}.Default"),
            failover_mode=mode,
            failover_regions=regions,
            prioritize_by_locality=locality,
        ),
        load_balancer=balancer,
    )


def _load_balancer(raw: Any, where: str) -> LoadBalancer:
    balancer = _obj(raw, where, required=True)
    policy = _str(balancer.get("Policy"), f"{where}.Policy")
    if policy not in _LB_POLICIES:
        raise ChainError(
            f"{where}.Policy", f"{shown(policy)}: expected one of {', '.join(p for p in _LB_POLICIES if p)}"
        )
    hashes = []
    for index, raw_hash in enumerate(_list(balancer.get("HashPolicies"), f"{where}.HashPolicies", MAX_MATCHES)):
        at = f"{where}.HashPolicies[{index}]"
        entry = _obj(raw_hash, at, required=True)
        kind = _str(entry.get("Field"), f"{at}.Field")
        if kind not in ("", "header", "cookie", "query_parameter"):
            raise ChainError(f"{at}.Field", f"{shown(kind)}: expected header, cookie or query_parameter")
        hashes.append(
            HashPolicy(
                field=kind,
                field_value=_str(entry.get("FieldValue"), f"{at}.FieldValue"),
                source_ip=_bool(entry.get("SourceIP"), f"{at}.SourceIP"),
                terminal=_bool(entry.get("Terminal"), f"{at}.Terminal"),
                cookie=entry.get("CookieConfig") is not None,
            )
        )
    choice = _obj(balancer.get("LeastRequestConfig"), f"{where}.LeastRequestConfig").get("ChoiceCount")
    return LoadBalancer(
        policy=policy,
        hash_policies=tuple(hashes),
        ring_hash_config=bool(_obj(balancer.get("RingHashConfig"), f"{where}.RingHashConfig")),
        choice_count=_int(choice, f"{where}.LeastRequestConfig.ChoiceCount", 0, 2**32 - 1) or None,
    )


def _split(raw: Any, where: str) -> ChainSplit:
    split = _obj(raw, where, required=True)
    weight = split.get("Weight", 0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
        raise ChainError(f"{where}.Weight", f"{shown(weight)}: expected a percentage from 0 to 100")
    hundredths = round(weight * 100)
    if abs(weight * 100 - hundredths) > 0.01:  # float32 noise is far below this; a third decimal is not
        raise ChainError(f"{where}.Weight", f"{shown(weight)}: Consul weights have at most two decimals")
    definition = _obj(split.get("Definition"), f"{where}.Definition")
    filters = _header_filters(definition, f"{where}.Definition")
    return ChainSplit(hundredths, _str(split.get("NextNode"), f"{where}.NextNode", required=True), filters)


def _route(raw: Any, where: str, unsupported: list[str]) -> ChainRoute:
    route = _obj(raw, where, required=True)
    definition = _obj(route.get("Definition"), f"{where}.Definition")
    http = _obj(
        _obj(definition.get("Match"), f"{where}.Definition.Match").get("HTTP"), f"{where}.Definition.Match.HTTP"
    )
    at = f"{where}.Definition.Destination"
    destination = _obj(definition.get("Destination"), at)
    rewrite = _str(destination.get("PrefixRewrite"), f"{at}.PrefixRewrite")
    match = _http_match(http, f"{where}.Definition.Match.HTTP", literal=bool(rewrite))
    filters = _header_filters(destination, at)
    if rewrite:
        if match.path_kind == "exact":
            modifier = PathModifier("ReplaceFullPath", rewrite)
        elif match.path_kind == "prefix":
            modifier = PathModifier("ReplacePrefixMatch", rewrite)
        else:
            raise ChainError(f"{at}.PrefixRewrite", "needs a PathPrefix or PathExact match (as Consul requires)")
        filters = Filters(filters.request_headers, filters.response_headers, URLRewrite(path=modifier))
    policy = _retry_policy(destination, at, unsupported)
    timeout = _duration(destination.get("RequestTimeout"), f"{at}.RequestTimeout")
    if timeout is not None:
        policy = policy.merge(Policy(timeout=timeout))
    if _duration(destination.get("IdleTimeout"), f"{at}.IdleTimeout") is not None:
        unsupported.append(f"{at}.IdleTimeout: meshlib has no per-route idle timeout")
    next_node = _str(route.get("NextNode"), f"{where}.NextNode", required=True)
    return ChainRoute(match, next_node, policy, filters, timeout is not None)


def _retry_policy(destination: Mapping[str, Any], at: str, unsupported: list[str]) -> Policy:
    """Consul's ``getRetryPolicyForDestination``: a retry policy only when the destination sets one of
    ``NumRetries``, ``RetryOnConnectFailure``, ``RetryOnStatusCodes``, ``RetryOn``; Envoy's ``num_retries``
    defaults to 1; a policy naming no condition retries nothing."""
    retries = _int(destination.get("NumRetries"), f"{at}.NumRetries", 0, 2**32 - 1)
    connect = _bool(destination.get("RetryOnConnectFailure"), f"{at}.RetryOnConnectFailure")
    codes = _list(destination.get("RetryOnStatusCodes"), f"{at}.RetryOnStatusCodes", 512)
    tokens = _list(destination.get("RetryOn"), f"{at}.RetryOn", 32)
    if not (retries or connect or codes or tokens):
        return NO_POLICY
    statuses = {_int(code, f"{at}.RetryOnStatusCodes[{i}]", 100, 599) for i, code in enumerate(codes)}
    transport = connect
    for index, raw_token in enumerate(tokens):
        token = _str(raw_token, f"{at}.RetryOn[{index}]")
        if token in _RETRY_STATUSES:
            statuses |= _RETRY_STATUSES[token]
        elif token in _RETRY_TRANSPORT:
            transport = True
        else:
            known = ", ".join([*_RETRY_STATUSES, *sorted(_RETRY_TRANSPORT)])
            raise ChainError(f"{at}.RetryOn[{index}]", f"{shown(token)}: expected one of {known}")
    if not statuses and not transport:
        return Policy(retries=0)
    if retries > MAX_RETRIES:
        unsupported.append(f"{at}.NumRetries: {retries} retries capped at meshlib's {MAX_RETRIES}")
    return Policy(retries=min(retries or 1, MAX_RETRIES), retry_on=frozenset(statuses))


def _header_filters(owner: Mapping[str, Any], where: str) -> Filters:
    request = _modifier(owner.get("RequestHeaders"), f"{where}.RequestHeaders")
    response = _modifier(owner.get("ResponseHeaders"), f"{where}.ResponseHeaders")
    if request is None and response is None:
        return NO_FILTERS
    return Filters(request_headers=request, response_headers=response)


def _modifier(raw: Any, where: str) -> HeaderModifier | None:
    """``HTTPHeaderModifiers`` -> :class:`HeaderModifier`. Envoy removes first, then sets and appends; meshlib
    sets, appends, then removes, so a name both removed and added becomes a set, and one removed and set
    stays a set: the same headers either way."""
    if raw is None:
        return None
    modifiers = _obj(raw, where)

    def pairs(name: str) -> dict[str, str]:
        found = _obj(modifiers.get(name), f"{where}.{name}")
        if len(found) > MAX_MATCHES:
            raise ChainError(f"{where}.{name}", f"{len(found)} headers: meshlib accepts at most {MAX_MATCHES}")
        out = {}
        for header, value in found.items():
            _header_name(header, _key(f"{where}.{name}", header))
            text = _str(value, _key(f"{where}.{name}", header))
            if "%" in text.replace("%%", ""):
                raise ChainError(
                    _key(f"{where}.{name}", header),
                    f"{shown(text)} uses an Envoy variable (%...%), which meshlib cannot fill in",
                )
            out[header.lower()] = text.replace("%%", "%")
        return out

    sets = pairs("Set")
    adds = pairs("Add")
    removes = [
        _header_name(_str(h, f"{where}.Remove[{i}]", required=True), f"{where}.Remove[{i}]").lower()
        for i, h in enumerate(_list(modifiers.get("Remove"), f"{where}.Remove", MAX_MATCHES))
    ]
    for name in removes:
        if name in adds:
            sets[name] = adds.pop(name)
    removes = [name for name in removes if name not in sets]
    if not (sets or adds or removes):
        return None
    return HeaderModifier(tuple(sets.items()), tuple(adds.items()), tuple(removes))


def _header_name(name: str, where: str) -> str:
    if not isinstance(name, str) or not is_header_name(name):
        raise ChainError(where, f"{shown(name)} is not a header name")
    return name


def _http_match(http: Mapping[str, Any], where: str, *, literal: bool = False) -> HTTPRouteMatch:
    """``Match.HTTP`` compiled. ``PathPrefix`` is Envoy's plain string prefix (:class:`LiteralPrefixMatch`);
    ``/`` alone, when no ``PrefixRewrite`` needs the literal prefix (``literal``), is the model's indexable
    ``PathPrefix /`` (the same paths)."""
    exact = _str(http.get("PathExact"), f"{where}.PathExact")
    prefix = _str(http.get("PathPrefix"), f"{where}.PathPrefix")
    regex = _str(http.get("PathRegex"), f"{where}.PathRegex")
    if sum(bool(v) for v in (exact, prefix, regex)) > 1:
        raise ChainError(where, "more than one of PathExact, PathPrefix, PathRegex")
    path: PathMatch = PathMatch("PathPrefix", "/")
    kind: Literal["", "exact", "prefix", "regex"] = ""
    if exact:
        path, kind = PathMatch("Exact", exact), "exact"
    elif prefix:
        kind = "prefix"
        if prefix != "/" or literal:
            path = LiteralPrefixMatch("RegularExpression", re.escape(prefix) + ".*", None, prefix)
    elif regex:
        path, kind = PathMatch("RegularExpression", regex, _regex(regex, f"{where}.PathRegex")), "regex"
    headers = tuple(
        _header_match(h, f"{where}.Header[{i}]")
        for i, h in enumerate(_list(http.get("Header"), f"{where}.Header", MAX_MATCHES))
    )
    query = tuple(
        _query_match(q, f"{where}.QueryParam[{i}]")
        for i, q in enumerate(_list(http.get("QueryParam"), f"{where}.QueryParam", MAX_MATCHES))
    )
    methods = [
        _str(m, f"{where}.Methods[{i}]", required=True)
        for i, m in enumerate(_list(http.get("Methods"), f"{where}.Methods", 32))
    ]
    chosen: list[str | None] = list(dict.fromkeys(methods)) or [None]
    matches = tuple(RouteMatch(path, method, headers, query) for method in chosen)
    return HTTPRouteMatch(matches, bool(query), kind)


def _header_match(raw: Any, where: str) -> HeaderMatch:
    """One ``Header`` condition (Consul's ``makeRouteMatchForDiscoveryRoute``: exactly one of Present, Exact,
    Prefix, Suffix, Regex; ``Invert`` negates it)."""
    header = _obj(raw, where, required=True)
    name = _header_name(_str(header.get("Name"), f"{where}.Name", required=True), f"{where}.Name").lower()
    invert = _bool(header.get("Invert"), f"{where}.Invert")
    present = _bool(header.get("Present"), f"{where}.Present")
    exact = _str(header.get("Exact"), f"{where}.Exact")
    prefix = _str(header.get("Prefix"), f"{where}.Prefix")
    suffix = _str(header.get("Suffix"), f"{where}.Suffix")
    regex = _str(header.get("Regex"), f"{where}.Regex")
    if sum(bool(v) for v in (present, exact, prefix, suffix, regex)) != 1:
        raise ChainError(where, "expected exactly one of Present, Exact, Prefix, Suffix, Regex")
    if present:
        return EnvoyHeaderMatch(name, "RegularExpression", "absent" if invert else "present", present=not invert)
    if exact and not invert:
        return HeaderMatch(name, "Exact", exact)
    if regex:
        compiled = _regex(regex, f"{where}.Regex")
        if not invert:
            return HeaderMatch(name, "RegularExpression", regex, compiled)
        return EnvoyHeaderMatch(name, "RegularExpression", f"not /{regex}/", None, compiled.fullmatch, True)
    if exact:
        return EnvoyHeaderMatch(name, "RegularExpression", f"not {exact!r}", None, exact.__eq__, True)
    if prefix:
        return EnvoyHeaderMatch(
            name,
            "RegularExpression",
            f"{'not ' if invert else ''}prefix {prefix!r}",
            None,
            lambda v: v.startswith(prefix),
            invert,
        )
    return EnvoyHeaderMatch(
        name,
        "RegularExpression",
        f"{'not ' if invert else ''}suffix {suffix!r}",
        None,
        lambda v: v.endswith(suffix),
        invert,
    )


def _query_match(raw: Any, where: str) -> QueryMatch:
    """One ``QueryParam`` condition: exactly one of Present, Exact, Regex (on the parameter's first value)."""
    param = _obj(raw, where, required=True)
    name = _str(param.get("Name"), f"{where}.Name", required=True)
    present = _bool(param.get("Present"), f"{where}.Present")
    exact = _str(param.get("Exact"), f"{where}.Exact")
    regex = _str(param.get("Regex"), f"{where}.Regex")
    if sum(bool(v) for v in (present, exact, regex)) != 1:
        raise ChainError(where, "expected exactly one of Present, Exact, Regex")
    if present:
        return ConsulQueryMatch(name, "RegularExpression", "present")
    if exact:
        return QueryMatch(name, "Exact", exact)
    return QueryMatch(name, "RegularExpression", regex, _regex(regex, f"{where}.Regex"))


# -- mapping --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainMapping:
    """What the lead installs with ``_Mesh.apply_control_plane(table, added, replaced)``.

    ``table`` routes the called service; ``services`` maps each backend's service key (:func:`service_key` of
    its name) to its :class:`ServiceConfig` and the targets whose healthy instances are its endpoints, each with
    its priority (0 preferred; the failover order). ``connect_timeouts`` holds each service's ``ConnectTimeout``
    (seconds; not applied by meshlib yet). ``unsupported`` lists what the chain asks that meshlib does not honour.
    """

    table: RouteTable
    services: Mapping[str, tuple[ServiceConfig, tuple[tuple[ChainTarget, int], ...]]]
    connect_timeouts: Mapping[str, float]
    unsupported: tuple[str, ...]
    chain: CompiledChain


def resolver_service(chain: CompiledChain, node: str) -> str:
    """The meshlib service name of resolver node ``node`` (see :data:`CHAIN_PREFIX`)."""
    suffix = f"~{chain.customization_hash}" if chain.customization_hash else ""
    return f"{CHAIN_PREFIX}{chain.nodes[node].name or node.partition(':')[2]}{suffix}"


def map_chain(chain: CompiledChain, *, called: str | None = None, version: str = "") -> ChainMapping:
    """The route table and backend services of ``chain`` for calls to host ``called`` (default: the chain's
    ``ServiceName``). ``version`` (the response's ``X-Consul-Index``) is shown in status and logs."""
    host = called if called is not None else chain.service_name
    unsupported = list(chain.unsupported)
    label = f"consul:{chain.service_name}"
    reached: dict[str, None] = {}
    entries: list[tuple[RouteMatch, Rule]] = []
    reads_query = False
    start = chain.nodes[chain.start_node]
    if start.type == "router":
        for index, route in enumerate(start.routes):
            where = f"{_key('Chain.Nodes', start.key)}.Routes[{index}]"
            legs = _legs(chain, route.next_node, where, 0)
            policy = route.policy
            if not route.request_timeout_set:
                policy = _resolver_timeout(chain, legs, policy)
            rule = Rule(label, index, route.match.matches, route.filters, _backends(chain, legs, reached), policy)
            entries.extend((match, rule) for match in route.match.matches)
            reads_query = reads_query or route.match.reads_query
    else:
        legs = _legs(chain, start.key, "Chain.StartNode", 0)
        policy = _resolver_timeout(chain, legs, NO_POLICY)
        rule = Rule(label, 0, (RouteMatch(),), NO_FILTERS, _backends(chain, legs, reached), policy)
        entries.append((RouteMatch(), rule))
    services: dict[str, tuple[ServiceConfig, tuple[tuple[ChainTarget, int], ...]]] = {}
    timeouts: dict[str, float] = {}
    for node_key in reached:
        name = resolver_service(chain, node_key)
        config, targets, timeout = _backend_service(chain, chain.nodes[node_key], name, unsupported)
        services[service_key(name)] = (config, targets)
        if timeout is not None:
            timeouts[service_key(name)] = timeout
    routes = HostRoutes(host, tuple(entries), reads_query=reads_query)
    table = RouteTable({service_key(host): {None: routes}}, label, version, (label,))
    for note in unsupported:
        logger.info("Consul discovery chain %s: not honoured: %s", chain.service_name, note)
    return ChainMapping(table, services, timeouts, tuple(unsupported), chain)


def _legs(chain: CompiledChain, key: str, where: str, hops: int) -> list[tuple[str, Fraction, Filters]]:
    """The resolver nodes ``key`` leads to, each with its share of the calls and its split's header changes."""
    if hops > MAX_HOPS:
        raise ChainError(where, f"more than {MAX_HOPS} splitter hops (a loop?)")
    node = chain.nodes[key]
    if node.type == "resolver":
        return [(key, Fraction(1), NO_FILTERS)]
    total = sum(split.weight for split in node.splits)
    legs = []
    for index, split in enumerate(node.splits):
        if split.weight == 0:
            continue
        here = f"{_key('Chain.Nodes', key)}.Splits[{index}]"
        for resolver, share, filters in _legs(chain, split.next_node, here, hops + 1):
            if not split.filters.empty and not filters.empty:
                raise ChainError(here, "header changes on two nested splits of one leg are not supported")
            legs.append(
                (resolver, Fraction(split.weight, total) * share, filters if split.filters.empty else split.filters)
            )
    return legs


def _backends(
    chain: CompiledChain, legs: Sequence[tuple[str, Fraction, Filters]], reached: dict[str, None]
) -> tuple[Backend, ...]:
    """Legs as weighted backends: weights in hundredths of a percent (summing to 10000) when the shares allow it
    exactly (one splitter always does), else the smallest integers in the same exact ratio."""
    scale = 10000
    if any((share * scale).denominator != 1 for _, share, _ in legs):
        scale = math.lcm(*(share.denominator for _, share, _ in legs))
    backends = []
    for node_key, share, filters in legs:
        reached[node_key] = None
        backends.append(Backend(resolver_service(chain, node_key), int(share * scale), filters))
    return tuple(backends)


def _resolver_timeout(chain: CompiledChain, legs: Sequence[tuple[str, Fraction, Filters]], policy: Policy) -> Policy:
    """A resolver's ``RequestTimeout`` applies when the route (or chain) leads to that one resolver only."""
    resolvers = {node for node, _, _ in legs}
    if len(resolvers) != 1:
        return policy
    resolver = chain.nodes[next(iter(resolvers))].resolver
    if resolver is None or resolver.request_timeout_s is None:
        return policy
    return policy.merge(Policy(timeout=resolver.request_timeout_s))


def _backend_service(
    chain: CompiledChain, node: ChainNode, name: str, unsupported: list[str]
) -> tuple[ServiceConfig, tuple[tuple[ChainTarget, int], ...], float | None]:
    resolver = node.resolver
    assert resolver is not None  # only resolver nodes are reached
    where = _key("Chain.Nodes", node.key)
    ordered: dict[str, int] = {}
    for priority, target in enumerate((resolver.target, *resolver.failover)):
        ordered.setdefault(target, priority)
    targets = tuple((chain.targets[t], p) for t, p in ordered.items())
    lb = None
    hash_header = None
    balancer = node.load_balancer
    if balancer is not None:
        at = f"{where}.LoadBalancer"
        lb = _LB_POLICIES[balancer.policy]
        if balancer.policy == "maglev":
            unsupported.append(f"{at}.Policy: 'maglev' (meshlib uses its ring hash: also consistent, another ring)")
        if balancer.ring_hash_config:
            unsupported.append(f"{at}.RingHashConfig: ring sizes (meshlib sizes its own ring)")
        if balancer.choice_count is not None:
            unsupported.append(f"{at}.LeastRequestConfig.ChoiceCount: meshlib's least_request compares 2")
        for index, policy in enumerate(balancer.hash_policies):
            here = f"{at}.HashPolicies[{index}]"
            if policy.field == "header" and policy.field_value and hash_header is None:
                hash_header = _header_name(policy.field_value, f"{here}.FieldValue").lower()
            elif policy.field == "header" and policy.field_value:
                unsupported.append(f"{here}: only the first header hash policy is used")
            else:
                what = "source IP" if policy.source_ip else (policy.field or "(none)")
                unsupported.append(f"{here}: hashing on {what} (meshlib hashes on one request header)")
        if lb != "ring_hash":
            hash_header = None
    timeout = resolver.connect_timeout_s
    if any(t.connect_timeout_s is not None for t, _ in targets):
        timeout = next(t.connect_timeout_s for t, _ in targets if t.connect_timeout_s is not None)
    config = ServiceConfig(
        name=name,
        target=f"consul-chain:///{chain.service_name}/{node.key}",
        lb=lb,
        hash_header=hash_header,
        variable=f"Consul discovery chain {chain.service_name} ({node.key})",
    )
    return config, targets, timeout
