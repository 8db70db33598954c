"""LDS: a client-side ``Listener`` validated as gRPC's proxyless client does (gRFC A27, A31, A39).

:func:`validate_listener` is pure: a ``envoy.config.listener.v3.Listener`` in, an immutable
:class:`ListenerUpdate` out, or :class:`XdsResourceError` (the NACK). The rules are grpc-go's
``internal/xds/xdsclient/xdsresource/unmarshal_lds.go`` (``processClientSideListener``, ``processHTTPFilters``):

* ``api_listener.api_listener`` must be an ``HttpConnectionManager``; ``xff_num_trusted_hops`` must be 0 and
  ``original_ip_detection_extensions`` empty;
* the route config comes inline (``route_config``, validated as RDS is) or by name (``rds``: non-empty
  ``route_config_name``, ``config_source`` ``ads`` or ``self``); ``scoped_routes`` or none is refused;
* ``http_filters`` (A39): each with a non-empty, unique name; an unknown type is skipped when ``is_optional``
  and refused otherwise; what remains must be non-empty and end with the router, the only terminal filter;
  the fault filter's ``HTTPFault`` (A33) is parsed here;
* ``common_http_protocol_options.max_stream_duration`` (A31) is the default call timeout of every route.

A Listener without ``api_listener`` is a server-side listener: meshlib's xDS client only takes client ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from meshlib.control.xds.resources.errors import XdsResourceError, shown
from meshlib.control.xds.resources.filters import FaultSpec, duration_s, filter_kind, parse_fault, type_name
from meshlib.control.xds.resources.rds import RouteConfigUpdate, validate_route_configuration

__all__ = ["HttpFilter", "ListenerUpdate", "validate_listener"]

_HCM = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


@dataclass(frozen=True, slots=True)
class HttpFilter:
    """One HTTP filter meshlib runs, in chain order: ``router`` (always last) or ``fault`` with its config."""

    name: str
    kind: str
    fault: FaultSpec | None = None


@dataclass(frozen=True, slots=True)
class ListenerUpdate:
    """A validated client-side Listener.

    Exactly one of ``route_config_name`` (subscribe to it over RDS) and ``inline_route_config`` is set.
    ``max_stream_duration_s``: ``common_http_protocol_options.max_stream_duration`` in seconds, ``None`` when
    unset; ``0.0`` means no limit (A31).
    """

    name: str
    http_filters: tuple[HttpFilter, ...]
    route_config_name: str | None = None
    inline_route_config: RouteConfigUpdate | None = None
    max_stream_duration_s: float | None = None


def validate_listener(listener: Any) -> ListenerUpdate:
    """A ``Listener`` message as a :class:`ListenerUpdate`; :class:`XdsResourceError` if gRPC would NACK it."""
    if not listener.name:
        raise XdsResourceError("name", "empty resource name")
    if not listener.HasField("api_listener"):
        raise XdsResourceError("api_listener", "missing: meshlib takes client-side (API) listeners only")
    config = listener.api_listener.api_listener
    where = "api_listener.api_listener"
    if type_name(config.type_url) != _HCM:
        raise XdsResourceError(where, f"expected an {_HCM}, got {shown(config.type_url)}")
    hcm = hcm_pb2.HttpConnectionManager()
    if not config.Unpack(hcm):
        raise XdsResourceError(where, f"the {_HCM} does not parse")
    if hcm.xff_num_trusted_hops != 0:
        raise XdsResourceError(f"{where}.xff_num_trusted_hops", f"{hcm.xff_num_trusted_hops}: must be unset or 0")
    if len(hcm.original_ip_detection_extensions):
        raise XdsResourceError(f"{where}.original_ip_detection_extensions", "must be empty")
    specifier = hcm.WhichOneof("route_specifier")
    route_config_name = None
    inline = None
    if specifier == "rds":
        source = hcm.rds.config_source
        if not (source.HasField("ads") or source.HasField("self")):
            raise XdsResourceError(f"{where}.rds.config_source", "must be ads or self (meshlib uses one ADS stream)")
        if not hcm.rds.route_config_name:
            raise XdsResourceError(f"{where}.rds.route_config_name", "empty")
        route_config_name = hcm.rds.route_config_name
    elif specifier == "route_config":
        try:
            inline = validate_route_configuration(hcm.route_config, inline=True)
        except XdsResourceError as error:
            raise XdsResourceError(f"{where}.route_config.{error.field_path}", error.message) from None
    elif specifier is None:
        raise XdsResourceError(f"{where}.route_specifier", "missing: neither rds nor route_config")
    else:
        raise XdsResourceError(f"{where}.{specifier}", "unsupported route specifier (only rds and route_config)")
    max_stream_duration = None
    options = hcm.common_http_protocol_options
    if hcm.HasField("common_http_protocol_options") and options.HasField("max_stream_duration"):
        max_stream_duration = duration_s(options.max_stream_duration)
    filters = _http_filters(hcm.http_filters, f"{where}.http_filters")
    return ListenerUpdate(listener.name, filters, route_config_name, inline, max_stream_duration)


def _http_filters(filters: Any, where: str) -> tuple[HttpFilter, ...]:
    """A39's filter chain rules (grpc-go ``processHTTPFilters``, client side)."""
    kept: list[tuple[int, HttpFilter]] = []
    seen: set[str] = set()
    for index, http_filter in enumerate(filters):
        here = f"{where}[{index}]"
        name = http_filter.name
        if not name:
            raise XdsResourceError(f"{here}.name", "empty")
        if name in seen:
            raise XdsResourceError(f"{here}.name", f"duplicate filter name {shown(name)}")
        seen.add(name)
        kind = filter_kind(http_filter.typed_config, http_filter.is_optional, f"{here}.typed_config")
        if kind is None:
            continue
        fault = parse_fault(http_filter.typed_config, f"{here}.typed_config") if kind == "fault" else None
        kept.append((index, HttpFilter(name, kind, fault)))
    if not kept:
        raise XdsResourceError(where, "empty: the chain must end with the router filter")
    for index, http_filter in kept[:-1]:
        if http_filter.kind == "router":
            raise XdsResourceError(
                f"{where}[{index}]", f"the router {shown(http_filter.name)} is terminal: it must be last"
            )
    index, last = kept[-1]
    if last.kind != "router":
        raise XdsResourceError(
            f"{where}[{index}]", f"{shown(last.name)} is not a terminal filter: the router must be last"
        )
    return tuple(http_filter for _, http_filter in kept)
