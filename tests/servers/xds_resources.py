"""Typed builders for the xDS resources tests hand to :class:`tests.servers.xds.XdsServer`.

Each returns Envoy's generated v3 message (from ``xds-protos``) shaped the way gRPC's proxyless clients expect
(gRFC A27/A28): a Listener whose ``api_listener`` is an HttpConnectionManager (inline RouteConfiguration or RDS
over ADS) ending in the router filter; RouteConfigurations with virtual hosts and routes (prefix, path or regex
match, header matchers, one cluster or ``weighted_clusters``, optional timeout and header hash policy); EDS
Clusters fed over ADS with round_robin, ring_hash or least_request; ClusterLoadAssignments with localities
(weight, priority) and endpoints (health, weight). Anything else a test needs it sets on the returned message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

HCM = hcm_pb2.HttpConnectionManager
Health = Literal["UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "TIMEOUT", "DEGRADED"]
LbPolicy = Literal["round_robin", "ring_hash", "least_request"]


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def ads() -> config_source_pb2.ConfigSource:
    """``ConfigSource{ads: {}}``: the resource comes over the same ADS stream (what gRPC requires)."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.ApiVersion.V3
    )


def router_filter() -> hcm_pb2.HttpFilter:
    """The terminal HTTP filter every HttpConnectionManager must end with."""
    return hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router()))


def listener(
    name: str,
    *,
    route_config: route_pb2.RouteConfiguration | None = None,
    rds: str | None = None,
    http_filters: Sequence[hcm_pb2.HttpFilter] = (),
) -> listener_pb2.Listener:
    """A client-side Listener (``xds:///name``): an api_listener HttpConnectionManager with the route config inline
    (``route_config``) or from RDS (``rds`` = its name); ``http_filters`` go before the router filter."""
    if (route_config is None) == (rds is None):
        raise ValueError("listener(): give exactly one of route_config= or rds=")
    manager = HCM(http_filters=[*http_filters, router_filter()])
    if route_config is not None:
        manager.route_config.CopyFrom(route_config)
    else:
        manager.rds.CopyFrom(hcm_pb2.Rds(config_source=ads(), route_config_name=rds))
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(manager)))


@dataclass(frozen=True)
class HeaderMatch:
    """A header matcher: exactly one of ``exact``/``prefix``/``suffix``/``regex``/``present``."""

    name: str
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: str | None = None
    present: bool | None = None
    invert: bool = False

    def message(self) -> route_components_pb2.HeaderMatcher:
        matcher = route_components_pb2.HeaderMatcher(name=self.name, invert_match=self.invert)
        if self.present is not None:
            matcher.present_match = self.present
        elif self.exact is not None:
            matcher.string_match.CopyFrom(string_pb2.StringMatcher(exact=self.exact))
        elif self.prefix is not None:
            matcher.string_match.CopyFrom(string_pb2.StringMatcher(prefix=self.prefix))
        elif self.suffix is not None:
            matcher.string_match.CopyFrom(string_pb2.StringMatcher(suffix=self.suffix))
        elif self.regex is not None:
            matcher.string_match.CopyFrom(string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=self.regex)))
        else:
            raise ValueError(f"header match on {self.name!r}: give exact, prefix, suffix, regex or present")
        return matcher


def route(
    *,
    prefix: str | None = None,
    path: str | None = None,
    regex: str | None = None,
    headers: Sequence[HeaderMatch] = (),
    cluster: str | None = None,
    weighted_clusters: Mapping[str, int] | None = None,
    timeout: float | None = None,
    hash_header: str | None = None,
    name: str = "",
) -> route_components_pb2.Route:
    """A route: match on ``prefix`` (default ``""``, everything), ``path`` or ``regex`` plus ``headers``; send to
    ``cluster`` or split over ``weighted_clusters`` (name -> weight, in order); optional ``timeout`` (seconds) and a
    ring-hash ``hash_header``."""
    if sum(x is not None for x in (prefix, path, regex)) > 1:
        raise ValueError("route(): give at most one of prefix=, path=, regex=")
    if (cluster is None) == (weighted_clusters is None):
        raise ValueError("route(): give exactly one of cluster= or weighted_clusters=")
    match = route_components_pb2.RouteMatch(headers=[h.message() for h in headers])
    if path is not None:
        match.path = path
    elif regex is not None:
        match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=regex))
    else:
        match.prefix = prefix or ""
    action = route_components_pb2.RouteAction()
    if cluster is not None:
        action.cluster = cluster
    else:
        assert weighted_clusters is not None
        action.weighted_clusters.CopyFrom(
            route_components_pb2.WeightedCluster(
                clusters=[
                    route_components_pb2.WeightedCluster.ClusterWeight(
                        name=cluster_name, weight=wrappers_pb2.UInt32Value(value=weight)
                    )
                    for cluster_name, weight in weighted_clusters.items()
                ]
            )
        )
    if timeout is not None:
        action.timeout.CopyFrom(duration_pb2.Duration(nanos=int(timeout % 1 * 1e9), seconds=int(timeout)))
    if hash_header is not None:
        action.hash_policy.append(
            route_components_pb2.RouteAction.HashPolicy(
                header=route_components_pb2.RouteAction.HashPolicy.Header(header_name=hash_header)
            )
        )
    return route_components_pb2.Route(name=name, match=match, route=action)


def virtual_host(
    name: str, domains: Sequence[str], routes: Sequence[route_components_pb2.Route]
) -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(name=name, domains=list(domains), routes=list(routes))


def route_configuration(
    name: str, virtual_hosts: Sequence[route_components_pb2.VirtualHost]
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=list(virtual_hosts))


_LB_POLICIES = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "ring_hash": cluster_pb2.Cluster.RING_HASH,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
}


def cluster(
    name: str,
    *,
    lb_policy: LbPolicy = "round_robin",
    eds_service_name: str | None = None,
    ring_size: tuple[int, int] | None = None,
    choice_count: int | None = None,
    max_requests: int | None = None,
) -> cluster_pb2.Cluster:
    """An EDS cluster over ADS (its ClusterLoadAssignment is named ``eds_service_name``, default the cluster's
    name) with ``lb_policy``; ``ring_size`` = (minimum, maximum) for ring_hash, ``choice_count`` for
    least_request, ``max_requests`` as the default-priority circuit-breaker threshold."""
    message = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads(), service_name=eds_service_name or ""),
        lb_policy=_LB_POLICIES[lb_policy],
    )
    if ring_size is not None:
        message.ring_hash_lb_config.minimum_ring_size.value = ring_size[0]
        message.ring_hash_lb_config.maximum_ring_size.value = ring_size[1]
    if choice_count is not None:
        message.least_request_lb_config.choice_count.value = choice_count
    if max_requests is not None:
        threshold = message.circuit_breakers.thresholds.add()
        threshold.max_requests.value = max_requests
    return message


def endpoint(
    host: str, port: int, *, health: Health = "HEALTHY", weight: int | None = None
) -> endpoint_components_pb2.LbEndpoint:
    """One endpoint (``host`` is an IP address) with its health status and optional load-balancing weight."""
    lb_endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))
        ),
        health_status=health_check_pb2.HealthStatus.Value(health),
    )
    if weight is not None:
        lb_endpoint.load_balancing_weight.value = weight
    return lb_endpoint


def locality(
    endpoints: Sequence[endpoint_components_pb2.LbEndpoint],
    *,
    weight: int = 1,
    priority: int = 0,
    region: str = "",
    zone: str = "",
    sub_zone: str = "",
) -> endpoint_components_pb2.LocalityLbEndpoints:
    """A locality's endpoints with its load-balancing weight (gRPC ignores a locality without one) and priority."""
    return endpoint_components_pb2.LocalityLbEndpoints(
        locality=base_pb2.Locality(region=region, zone=zone, sub_zone=sub_zone),
        lb_endpoints=list(endpoints),
        load_balancing_weight=wrappers_pb2.UInt32Value(value=weight),
        priority=priority,
    )


def cluster_load_assignment(
    cluster_name: str, localities: Sequence[endpoint_components_pb2.LocalityLbEndpoints]
) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name, endpoints=list(localities))
