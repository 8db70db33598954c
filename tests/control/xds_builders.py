"""Builders of xDS resources (xds-protos messages) for the LDS/RDS validation tests: what a control plane sends."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

__all__ = [
    "any_of",
    "fault",
    "hcm_listener",
    "http_filter",
    "percent",
    "route",
    "route_config",
    "router_filter",
    "seconds",
    "virtual_host",
    "weighted",
]


def any_of(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def seconds(value: float) -> Any:
    whole = int(value)
    return duration_pb2.Duration(seconds=whole, nanos=round((value - whole) * 1e9))


def percent(numerator: int, denominator: int = percent_pb2.FractionalPercent.HUNDRED) -> Any:
    return percent_pb2.FractionalPercent(numerator=numerator, denominator=denominator)


def route(cluster: str | None = "payments", *, prefix: str | None = "/", action: Any = None, **match: Any) -> Any:
    """A route matching ``prefix`` (or the path specifier in ``match``) to ``cluster`` (or ``action``);
    ``typed_per_filter_config`` in ``match`` goes to the route."""
    overrides = match.pop("typed_per_filter_config", None)
    if prefix is not None and not {"path", "safe_regex", "path_separated_prefix"} & match.keys():
        match.setdefault("prefix", prefix)
    built = rc.Route(match=rc.RouteMatch(**match))
    for name, config in (overrides or {}).items():
        built.typed_per_filter_config[name].CopyFrom(config)
    if action is not None:
        built.route.CopyFrom(action)
    elif cluster is not None:
        built.route.CopyFrom(rc.RouteAction(cluster=cluster))
    return built


def weighted(*clusters: tuple[str, int], **fields: Any) -> Any:
    return rc.RouteAction(
        weighted_clusters=rc.WeightedCluster(
            clusters=[
                rc.WeightedCluster.ClusterWeight(name=name, weight=wrappers_pb2.UInt32Value(value=weight))
                for name, weight in clusters
            ]
        ),
        **fields,
    )


def virtual_host(*routes: Any, domains: tuple[str, ...] = ("*",), name: str = "vh", **fields: Any) -> Any:
    return rc.VirtualHost(name=name, domains=list(domains), routes=list(routes), **fields)


def route_config(*hosts: Any, name: str = "routes", **fields: Any) -> Any:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=list(hosts), **fields)


def router_filter(name: str = "envoy.filters.http.router") -> Any:
    return hcm_pb2.HttpFilter(name=name, typed_config=any_of(router_pb2.Router()))


def http_filter(name: str, message: Any, *, optional: bool = False) -> Any:
    return hcm_pb2.HttpFilter(name=name, typed_config=any_of(message), is_optional=optional)


def fault(
    *,
    delay: float | None = None,
    delay_percent: int = 100,
    abort: int | None = None,
    grpc_abort: int | None = None,
    abort_percent: int = 100,
    max_active: int | None = None,
) -> Any:
    config = fault_pb2.HTTPFault()
    if delay is not None:
        config.delay.CopyFrom(
            common_fault_pb2.FaultDelay(fixed_delay=seconds(delay), percentage=percent(delay_percent))
        )
    if abort is not None:
        config.abort.CopyFrom(fault_pb2.FaultAbort(http_status=abort, percentage=percent(abort_percent)))
    if grpc_abort is not None:
        config.abort.CopyFrom(fault_pb2.FaultAbort(grpc_status=grpc_abort, percentage=percent(abort_percent)))
    if max_active is not None:
        config.max_active_faults.value = max_active
    return config


def hcm_listener(
    name: str = "payments",
    *,
    rds: str | None = "routes",
    inline: Any = None,
    filters: list[Any] | None = None,
    **fields: Any,
) -> Any:
    """A client-side Listener: an api_listener holding an HttpConnectionManager (RDS over ADS by default)."""
    hcm = hcm_pb2.HttpConnectionManager(http_filters=filters if filters is not None else [router_filter()], **fields)
    if inline is not None:
        hcm.route_config.CopyFrom(inline)
    elif rds is not None:
        hcm.rds.CopyFrom(
            hcm_pb2.Rds(
                route_config_name=rds,
                config_source=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource()),
            )
        )
    return listener_pb2.Listener(name=name, api_listener=api_listener_pb2.ApiListener(api_listener=any_of(hcm)))
