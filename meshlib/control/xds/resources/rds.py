"""RDS: a ``RouteConfiguration`` validated as gRPC's proxyless client does, then compiled into a RouteTable.

:func:`validate_route_configuration` is pure: the message in, an immutable :class:`RouteConfigUpdate` out (match
conditions already compiled into meshlib's route model), or :class:`XdsResourceError` (the NACK). The rules are
grpc-go's ``internal/xds/xdsclient/xdsresource/unmarshal_rds.go`` (gRFC A28 matching, A31 timeouts, A33/A39
filter overrides, A44 retries, A42 hash policies); docs/xds.md lists every field as supported, ignored
or NACKed. What gRPC NACKs: a route without ``match`` or path specifier, an unknown path specifier or header
matcher, a bad regex, an empty prefix/suffix/contains string matcher, weighted clusters whose weights sum to 0
or above 2^32-1, ``num_retries`` 0, a non-positive backoff interval, a bad hash-policy regex, a required cluster
specifier plugin (meshlib knows none), an override it cannot parse. What gRPC skips: a route with query
parameter matchers, a route whose action names clusters by request header (``cluster_header``) or an optional
cluster specifier plugin. A route whose action is not ``route`` (``non_forwarding_action``, ``redirect``,
``direct_response``) is kept: the calls it matches fail (gRPC: UNAVAILABLE; meshlib: answered 500
``no-backend``, the answer of a rule that cannot send).

:func:`to_route_table` then picks the virtual host for the channel's authority (A27: exact, then ``*.suffix``,
then ``prefix.*``, then ``*``; the longest domain within a kind) and compiles its routes, in their order (xDS:
the first route that matches wins), into one :class:`~meshlib.routing.model.HostRoutes`. Each cluster is the
meshlib service :func:`cluster_service` names.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meshlib._config.model import service_key
from meshlib.control.xds.resources.errors import XdsResourceError, shown
from meshlib.control.xds.resources.filters import FaultSpec, duration_s, parse_filter_overrides
from meshlib.control.xds.resources.matchers import FRACTION_HEADER, FractionMatch, XdsPathMatch
from meshlib.control.xds.resources.regex import compile_re2
from meshlib.policy import MAX_RETRIES, NO_POLICY, Policy
from meshlib.routing.model import (
    NO_FILTERS,
    Backend,
    EnvoyHeaderMatch,
    Filters,
    HeaderMatch,
    HostRoutes,
    PathMatch,
    RouteMatch,
    RouteTable,
    Rule,
)

__all__ = [
    "CLUSTER_PREFIX",
    "HashPolicy",
    "NoVirtualHostError",
    "RetryConfig",
    "RouteConfigUpdate",
    "RouteUpdate",
    "VirtualHostUpdate",
    "WeightedCluster",
    "cluster_service",
    "find_virtual_host",
    "hash_headers",
    "to_route_table",
    "validate_route_configuration",
]

logger = logging.getLogger("meshlib")

#: A cluster is the meshlib service named ``xds-cluster:<cluster name>``: the prefix keeps clusters apart from
#: services configured by name (an environment variable name cannot hold ``:``), the name is kept whole.
CLUSTER_PREFIX = "xds-cluster:"

#: retry_on tokens -> the HTTP statuses retried. gRPC's own codes (A44) are mapped to the statuses Envoy
#: answers for them (``grpcToHttpStatus``); Envoy's HTTP conditions keep their HTTP meaning.
_RETRY_STATUSES: Mapping[str, frozenset[int]] = {
    "cancelled": frozenset({499}),
    "deadline-exceeded": frozenset({504}),
    "internal": frozenset({500}),
    "resource-exhausted": frozenset({429}),
    "unavailable": frozenset({503}),
    "5xx": frozenset(range(500, 600)),
    "gateway-error": frozenset({502, 503, 504}),
    "retriable-4xx": frozenset({409}),
    "envoy-ratelimited": frozenset({429}),
}
#: Conditions on connection failures: meshlib retries those whenever re-sending is safe, whatever retry_on says.
_RETRY_TRANSPORT = frozenset(
    {"reset", "connect-failure", "refused-stream", "reset-before-request", "http3-post-connect-failure"}
)
_MAX_WEIGHT = 2**32 - 1
_CHANNEL_ID = "io.grpc.channel_id"
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)


# -- the validated resource ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """``retry_policy`` (A44) as meshlib applies it: ``retries`` after the first attempt (0: the policy names
    no condition meshlib knows, so nothing is retried, as gRPC), the statuses retried, and the backoff."""

    retries: int
    statuses: frozenset[int]
    base_interval_s: float = 0.025
    max_interval_s: float = 0.25

    def policy(self) -> Policy:
        """The :class:`~meshlib.policy.Policy` fields this sets."""
        if self.retries == 0:
            return Policy(retries=0)
        return Policy(
            retries=min(self.retries, MAX_RETRIES),
            retry_on=self.statuses,
            backoff_base=self.base_interval_s,
            backoff_cap=max(self.max_interval_s, self.base_interval_s),
        )


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """One ``hash_policy`` entry gRPC honours (A42): a request header (optionally rewritten by a regex) or the
    channel id (``filter_state`` key ``io.grpc.channel_id``); ``terminal`` stops at the first that yields a hash."""

    kind: Literal["header", "channel_id"]
    header: str | None = None
    regex: re.Pattern[str] | None = None
    substitution: str = ""
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    """A cluster of the route's action, its weight and its own fault override (``typed_per_filter_config``)."""

    name: str
    weight: int
    overrides: Mapping[str, FaultSpec] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouteUpdate:
    """One route kept by validation: its compiled match, its action and what the action configures.

    ``action`` is ``route`` (``clusters`` set) or, for a route whose calls fail, what it was instead
    (``non_forwarding_action``, ``redirect``, ``direct_response``...). ``index`` is its position in the virtual
    host's ``routes`` (routes gRPC skips leave gaps).
    """

    index: int
    name: str
    match: RouteMatch
    action: str
    clusters: tuple[WeightedCluster, ...] = ()
    max_stream_duration_s: float | None = None
    retry: RetryConfig | None = None
    hash_policies: tuple[HashPolicy, ...] = ()
    overrides: Mapping[str, FaultSpec] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VirtualHostUpdate:
    """One virtual host: its domains, its routes in order, its retry policy and fault overrides."""

    name: str
    domains: tuple[str, ...]
    routes: tuple[RouteUpdate, ...]
    retry: RetryConfig | None = None
    overrides: Mapping[str, FaultSpec] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouteConfigUpdate:
    """A validated ``RouteConfiguration``."""

    name: str
    virtual_hosts: tuple[VirtualHostUpdate, ...]


class NoVirtualHostError(LookupError):
    """No virtual host of a (valid, ACKed) route configuration matches the channel's authority: gRPC fails
    the channel's calls (UNAVAILABLE) until an update brings one; it is not a reason to NACK."""

    def __init__(self, route_config: str, authority: str) -> None:
        self.route_config = route_config
        self.authority = authority
        super().__init__(f"route configuration {shown(route_config)} has no virtual host for {shown(authority)}")


def cluster_service(cluster: str) -> str:
    """The meshlib service name of xDS cluster ``cluster`` (``xds-cluster:<name>``, see :data:`CLUSTER_PREFIX`)."""
    return CLUSTER_PREFIX + cluster


# -- validation ---------------------------------------------------------------------------------------------------


def validate_route_configuration(config: Any, *, inline: bool = False) -> RouteConfigUpdate:
    """A ``RouteConfiguration`` message as a :class:`RouteConfigUpdate`; :class:`XdsResourceError` if gRPC
    would NACK it. ``inline``: the config sits in a Listener's ``route_config`` (its name may be empty)."""
    if not config.name and not inline:
        raise XdsResourceError("name", "empty resource name")
    optional_plugins: set[str] = set()
    for index, plugin in enumerate(config.cluster_specifier_plugins):
        if not plugin.is_optional:
            name = plugin.extension.name
            raise XdsResourceError(
                f"cluster_specifier_plugins[{index}]",
                f"cluster specifier {shown(name)} of type {shown(plugin.extension.typed_config.type_url)} is not "
                "supported and not optional",
            )
        optional_plugins.add(plugin.extension.name)
    hosts = []
    for index, host in enumerate(config.virtual_hosts):
        where = f"virtual_hosts[{index}]"
        routes = tuple(_routes(host.routes, f"{where}.routes", optional_plugins))
        retry = _retry(host.retry_policy, f"{where}.retry_policy") if host.HasField("retry_policy") else None
        overrides = parse_filter_overrides(host.typed_per_filter_config, f"{where}.typed_per_filter_config")
        hosts.append(VirtualHostUpdate(host.name, tuple(host.domains), routes, retry, overrides))
    return RouteConfigUpdate(config.name, tuple(hosts))


def _routes(routes: Any, where: str, optional_plugins: set[str]) -> list[RouteUpdate]:
    kept: list[RouteUpdate] = []
    for index, route in enumerate(routes):
        here = f"{where}[{index}]"
        if not route.HasField("match"):
            raise XdsResourceError(f"{here}.match", "missing")
        if len(route.match.query_parameters):
            logger.warning("xDS route %s: query parameter matchers: the route is ignored (as gRPC)", here)
            continue
        match = _match(route.match, f"{here}.match")
        action_kind = route.WhichOneof("action")
        overrides = parse_filter_overrides(route.typed_per_filter_config, f"{here}.typed_per_filter_config")
        if action_kind != "route":
            kept.append(RouteUpdate(index, route.name, match, action_kind or "none", overrides=overrides))
            continue
        action = route.route
        at = f"{here}.route"
        hashes = _hash_policies(action.hash_policy, f"{at}.hash_policy")
        specifier = action.WhichOneof("cluster_specifier")
        clusters: tuple[WeightedCluster, ...]
        if specifier == "cluster":
            clusters = (WeightedCluster(action.cluster, 1),)
        elif specifier == "weighted_clusters":
            clusters = _weighted(action.weighted_clusters, f"{at}.weighted_clusters")
        elif specifier == "cluster_specifier_plugin":
            if action.cluster_specifier_plugin not in optional_plugins:
                raise XdsResourceError(
                    f"{at}.cluster_specifier_plugin",
                    f"{shown(action.cluster_specifier_plugin)} is not in the route configuration's plugins",
                )
            logger.warning("xDS route %s: optional, unsupported cluster specifier plugin: ignored", here)
            continue
        else:  # cluster_header, inline plugins: gRPC ignores the route
            logger.warning("xDS route %s: cluster specifier %s is not supported: the route is ignored", here, specifier)
            continue
        duration = None
        if action.HasField("max_stream_duration"):
            limits = action.max_stream_duration
            if limits.HasField("grpc_timeout_header_max"):
                duration = duration_s(limits.grpc_timeout_header_max)
            elif limits.HasField("max_stream_duration"):
                duration = duration_s(limits.max_stream_duration)
        retry = _retry(action.retry_policy, f"{at}.retry_policy") if action.HasField("retry_policy") else None
        kept.append(RouteUpdate(index, route.name, match, "route", clusters, duration, retry, hashes, overrides))
    return kept


def _weighted(weighted: Any, where: str) -> tuple[WeightedCluster, ...]:
    """grpc-go: clusters of weight 0 are dropped; the sum must be > 0 and fit in 32 bits; ``total_weight`` is
    not checked (gRPC stopped validating it; the draw is over the sum of the weights)."""
    clusters = []
    total = 0
    for index, cluster in enumerate(weighted.clusters):
        weight = cluster.weight.value
        if weight == 0:
            continue
        total += weight
        if total > _MAX_WEIGHT:
            raise XdsResourceError(f"{where}.clusters[{index}].weight", "the weights sum to more than 2^32-1")
        overrides = parse_filter_overrides(
            cluster.typed_per_filter_config, f"{where}.clusters[{index}].typed_per_filter_config"
        )
        clusters.append(WeightedCluster(cluster.name, weight, overrides))
    if total == 0:
        raise XdsResourceError(f"{where}.clusters", "no cluster with a weight above 0 (the weights sum to 0)")
    return tuple(clusters)


def _match(match: Any, where: str) -> RouteMatch:
    """``RouteMatch`` -> meshlib's :class:`RouteMatch` (grpc-go ``routesProtoToSlice`` + ``RouteToMatcher``)."""
    ignore_case = match.HasField("case_sensitive") and not match.case_sensitive.value
    specifier = match.WhichOneof("path_specifier")
    path: PathMatch
    if specifier == "prefix":
        prefix = match.prefix
        if not ignore_case and prefix in ("", "/"):
            path = PathMatch("PathPrefix", "/")
        else:
            shown_value = ("(?i)" if ignore_case else "") + re.escape(prefix) + ".*"
            expected = prefix.upper() if ignore_case else prefix
            path = XdsPathMatch("RegularExpression", shown_value, None, True, expected, ignore_case)
    elif specifier == "path":
        if ignore_case:
            value = "(?i)" + re.escape(match.path)
            path = XdsPathMatch("RegularExpression", value, None, False, match.path.upper(), True)
        else:
            path = PathMatch("Exact", match.path)
    elif specifier == "safe_regex":  # case_sensitive does not apply to a regex (grpc-go)
        regex = match.safe_regex.regex
        path = PathMatch("RegularExpression", regex, compile_re2(regex, f"{where}.safe_regex.regex"))
    elif specifier is None:
        raise XdsResourceError(f"{where}.path_specifier", "missing: one of prefix, path, safe_regex")
    else:
        raise XdsResourceError(f"{where}.{specifier}", "unsupported path specifier (prefix, path, safe_regex only)")
    method = None
    headers: list[HeaderMatch] = []
    for index, header in enumerate(match.headers):
        compiled = _header(header, f"{where}.headers[{index}]")
        if (
            compiled.name == ":method"
            and compiled.kind == "Exact"
            and type(compiled) is HeaderMatch
            and method in (None, compiled.value)
        ):
            method = compiled.value  # Istio's method match: the request's method (not a header meshlib sees)
            continue
        headers.append(compiled)
    if match.HasField("runtime_fraction"):
        percent = match.runtime_fraction.default_value
        scale = {0: 10_000, 1: 100, 2: 1}.get(percent.denominator, 10_000)
        per_million = min(1_000_000, percent.numerator * scale)
        description = f"{per_million / 10_000:g}% of requests"
        headers.append(FractionMatch(FRACTION_HEADER, "RegularExpression", description, None, per_million))
    return RouteMatch(path, method, tuple(headers))


def _header(header: Any, where: str) -> HeaderMatch:
    """One ``HeaderMatcher`` (grpc-go ``matcher_header.go``); a plain exact match stays a model ``HeaderMatch``."""
    name = header.name.lower()
    invert = header.invert_match
    kind = header.WhichOneof("header_match_specifier")
    if kind == "present_match":
        presence = header.present_match is not invert
        text = "present" if presence else "absent"
        return EnvoyHeaderMatch(name, "RegularExpression", text, None, None, False, presence)
    if kind == "range_match":
        start, end = header.range_match.start, header.range_match.end

        def in_range(value: str) -> bool:  # Go's strconv.ParseInt(value, 10, 64): no spaces, no "_"
            if _INTEGER.fullmatch(value) is None:
                return False
            number = int(value)
            return -(2**63) <= number < 2**63 and start <= number < end

        text = f"integer in [{start}, {end})"
        return _xds_header(name, text, in_range, invert)
    if kind == "safe_regex_match":
        regex = compile_re2(header.safe_regex_match.regex, f"{where}.safe_regex_match.regex")
        if not invert:
            return HeaderMatch(name, "RegularExpression", header.safe_regex_match.regex, regex)
        return _xds_header(
            name, f"not /{header.safe_regex_match.regex}/", lambda v: regex.fullmatch(v) is not None, True
        )
    if kind == "exact_match":
        value = header.exact_match
        if not invert:
            return HeaderMatch(name, "Exact", value)
        return _xds_header(name, f"not {value!r}", lambda v: v == value, True)
    if kind in ("prefix_match", "suffix_match", "contains_match"):
        text = getattr(header, kind)
        return _string(name, kind.split("_")[0], text, False, invert)
    if kind == "string_match":
        string = header.string_match
        pattern = string.WhichOneof("match_pattern")
        if pattern is None:
            raise XdsResourceError(f"{where}.string_match", "empty string matcher")
        if pattern == "safe_regex":
            regex = compile_re2(string.safe_regex.regex, f"{where}.string_match.safe_regex.regex")
            text = f"/{string.safe_regex.regex}/"
            return _xds_header(name, text, lambda v: regex.fullmatch(v) is not None, invert)
        if pattern not in ("exact", "prefix", "suffix", "contains"):
            raise XdsResourceError(f"{where}.string_match.{pattern}", "unsupported string matcher")
        value = getattr(string, pattern)
        if pattern != "exact" and not value:
            raise XdsResourceError(f"{where}.string_match.{pattern}", f"empty {pattern} is not allowed")
        return _string(name, pattern, value, string.ignore_case, invert)
    raise XdsResourceError(f"{where}.header_match_specifier", "missing or unsupported header matcher")


def _string(name: str, how: str, value: str, ignore_case: bool, invert: bool) -> HeaderMatch:
    """A string matcher (exact, prefix, suffix, contains) with grpc-go's ``ignore_case`` (both sides lower-cased)."""
    if how == "exact" and not ignore_case and not invert:
        return HeaderMatch(name, "Exact", value)
    expected = value.lower() if ignore_case else value

    def test(found: str) -> bool:
        if ignore_case:
            found = found.lower()
        if how == "exact":
            return found == expected
        if how == "prefix":
            return found.startswith(expected)
        if how == "suffix":
            return found.endswith(expected)
        return expected in found

    text = f"{'not ' if invert else ''}{how} {value!r}{' (any case)' if ignore_case else ''}"
    return EnvoyHeaderMatch(name, "RegularExpression", text, None, test, invert)


def _xds_header(name: str, text: str, test: Any, invert: bool) -> EnvoyHeaderMatch:
    return EnvoyHeaderMatch(name, "RegularExpression", text, None, test, invert)


def _retry(policy: Any, where: str) -> RetryConfig:
    """``RetryPolicy`` (A44, grpc-go ``generateRetryConfig``): ``num_retries`` >= 1 (default 1), backoff intervals
    > 0 (default 25 ms, max 10x base); ``retry_on`` mapped to HTTP statuses (docs/xds.md)."""
    statuses: set[int] = set()
    transport = False
    for raw in policy.retry_on.split(","):
        token = raw.strip().lower()
        if token in _RETRY_STATUSES:
            statuses |= _RETRY_STATUSES[token]
        elif token == "retriable-status-codes":
            statuses.update(code for code in policy.retriable_status_codes if 100 <= code <= 599)
        elif token in _RETRY_TRANSPORT:
            transport = True
    retries = 1
    if policy.HasField("num_retries"):
        retries = policy.num_retries.value
        if retries < 1:
            raise XdsResourceError(f"{where}.num_retries", f"{retries}: must be >= 1")
    base = 0.025
    cap = None
    if policy.HasField("retry_back_off"):
        backoff = policy.retry_back_off
        base = duration_s(backoff.base_interval)
        if base <= 0:
            raise XdsResourceError(f"{where}.retry_back_off.base_interval", f"{base:g}s: must be > 0")
        if backoff.HasField("max_interval"):
            cap = duration_s(backoff.max_interval)
            if cap <= 0:
                raise XdsResourceError(f"{where}.retry_back_off.max_interval", f"{cap:g}s: must be > 0")
    if not statuses and not transport:
        return RetryConfig(0, frozenset())
    return RetryConfig(retries, frozenset(statuses), base, 10 * base if cap is None else cap)


def _hash_policies(policies: Any, where: str) -> tuple[HashPolicy, ...]:
    """A42 (grpc-go ``hashPoliciesProtoToSlice``): header (with a regex rewrite) and ``io.grpc.channel_id``
    filter state are kept; other kinds are ignored; a bad rewrite regex is NACKed."""
    kept = []
    for index, policy in enumerate(policies):
        kind = policy.WhichOneof("policy_specifier")
        if kind == "header":
            regex = None
            substitution = ""
            if policy.header.HasField("regex_rewrite"):
                rewrite = policy.header.regex_rewrite
                regex = compile_re2(rewrite.pattern.regex, f"{where}[{index}].header.regex_rewrite.pattern.regex")
                substitution = rewrite.substitution
            kept.append(HashPolicy("header", policy.header.header_name.lower(), regex, substitution, policy.terminal))
        elif kind == "filter_state" and policy.filter_state.key == _CHANNEL_ID:
            kept.append(HashPolicy("channel_id", terminal=policy.terminal))
    return tuple(kept)


# -- translation --------------------------------------------------------------------------------------------------


def _domain_rank(domain: str, host: str) -> tuple[int, int] | None:
    """(kind, length) when ``domain`` matches ``host``; kinds rank exact 4 > suffix 3 > prefix 2 > ``*`` 1.
    An invalid pattern (empty, or a ``*`` inside) never matches (C-core skips it)."""
    domain = domain.lower()
    if domain == "*":
        return (1, 1)
    if not domain or "*" in domain[1:-1]:
        return None
    if domain.startswith("*"):
        return (3, len(domain)) if host.endswith(domain[1:]) and "*" not in domain[1:] else None
    if domain.endswith("*"):
        return (2, len(domain)) if host.startswith(domain[:-1]) else None
    return (4, len(domain)) if domain == host else None


def find_virtual_host(update: RouteConfigUpdate, authority: str) -> VirtualHostUpdate | None:
    """The virtual host for ``authority`` (A27 / grpc-go ``FindBestMatchingVirtualHost``): the most specific
    match kind wins, then the longest domain, then the first host listed. Compared case-insensitively."""
    host = authority.lower()
    best: tuple[int, int] | None = None
    found = None
    for virtual_host in update.virtual_hosts:
        for domain in virtual_host.domains:
            rank = _domain_rank(domain, host)
            if rank is not None and (best is None or rank > best):
                best = rank
                found = virtual_host
    return found


def to_route_table(
    update: RouteConfigUpdate,
    *,
    listener_name: str,
    http_filters: Sequence[Any] = (),
    max_stream_duration_s: float | None = None,
    authority: str | None = None,
    version: str = "",
) -> RouteTable:
    """The :class:`RouteTable` a channel to ``listener_name`` routes on.

    ``authority`` (default ``listener_name``, gRPC's data-plane authority for ``xds:///<name>``) chooses the
    virtual host and is the called host the table is attached to (:func:`meshlib._config.service_key` of it),
    on every port. ``http_filters`` and ``max_stream_duration_s`` come from the Listener
    (:class:`~meshlib.control.xds.resources.lds.ListenerUpdate`). Raises :class:`NoVirtualHostError` when no
    virtual host matches.
    """
    called = authority if authority is not None else listener_name
    host = find_virtual_host(update, called)
    if host is None:
        raise NoVirtualHostError(update.name, called)
    faults = [(f.name, f.fault) for f in http_filters if getattr(f, "kind", None) == "fault"]
    label = f"xds:{listener_name}/{update.name or '(inline)'}/{host.name}"
    entries = []
    for route in host.routes:
        policy = _policy(route, host, max_stream_duration_s)
        if route.action != "route":
            reason = f"the route's action is {route.action}: meshlib (like gRPC) only forwards with a route action"
            backends: tuple[Backend, ...] = (Backend(None, 1, invalid=reason),)
        else:
            backends = tuple(
                Backend(cluster_service(c.name), c.weight, _fault_filters(faults, c, route, host))
                for c in route.clusters
            )
        rule = Rule(label, route.index, (route.match,), NO_FILTERS, backends, policy, route.name or None)
        entries.append((route.match, rule))
    routes = HostRoutes(called, tuple(entries), reads_query=False)
    return RouteTable({service_key(called): {None: routes}}, f"xds:{listener_name}", version, (label,))


def hash_headers(update: RouteConfigUpdate, authority: str) -> dict[str, str]:
    """The request header each cluster's ring hash reads, from the routes of ``authority``'s virtual host: the
    first header ``hash_policy`` (without a ``regex_rewrite``, which meshlib cannot apply) of the first route
    naming the cluster. meshlib's ring hash reads one header per cluster (``ServiceConfig.hash_header``), where
    gRPC hashes per route; a cluster no route hashes for gets none (a random key per call, as gRPC)."""
    host = find_virtual_host(update, authority)
    found: dict[str, str] = {}
    if host is None:
        return found
    for route in host.routes:
        header = next((p.header for p in route.hash_policies if p.kind == "header" and p.regex is None), None)
        if header is None:
            continue
        for cluster in route.clusters:
            found.setdefault(cluster.name, header)
    return found


def _policy(route: RouteUpdate, host: VirtualHostUpdate, hcm_max_stream_duration: float | None) -> Policy:
    """A31: the route's ``max_stream_duration`` else the Listener's (0: no limit); A44: the route's retry
    policy else the virtual host's. Unset: meshlib's own layers decide."""
    duration = route.max_stream_duration_s if route.max_stream_duration_s is not None else hcm_max_stream_duration
    retry = route.retry if route.retry is not None else host.retry
    policy = NO_POLICY if retry is None else retry.policy()
    if duration is not None:
        policy = policy.merge(Policy(timeout=duration if duration > 0 else math.inf))
    return policy


def _fault_filters(
    faults: Sequence[tuple[str, FaultSpec | None]],
    cluster: WeightedCluster,
    route: RouteUpdate,
    host: VirtualHostUpdate,
) -> Filters:
    """A39's override order for each fault filter of the chain: weighted cluster, route, virtual host, then the
    filter's own config. meshlib injects one fault per call: the first filter whose effective config injects."""
    for name, base in faults:
        spec = cluster.overrides.get(name) or route.overrides.get(name) or host.overrides.get(name) or base
        fault = None if spec is None else spec.fault(name)
        if fault is not None:
            return Filters(fault=fault)
    return NO_FILTERS
