"""xDS HTTP filters (gRFC A39) meshlib's client knows: the router and the fault filter (gRFC A33).

A filter's ``typed_config`` is identified by its type URL (unwrapped from ``xds.type.v3.TypedStruct`` /
``udpa.type.v1.TypedStruct`` first, as grpc-go ``unmarshal_lds.go`` ``unwrapHTTPFilterConfig`` does). An unknown
type is skipped when the filter (or override) is optional and NACKed otherwise; a known type whose config does
not parse is NACKed. The fault filter's config becomes a :class:`FaultSpec`, which becomes meshlib's
:class:`~meshlib.routing.model.Fault` once the filter's name is known.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.type.v3 import percent_pb2
from udpa.type.v1 import typed_struct_pb2 as udpa_typed_struct_pb2
from xds.type.v3 import typed_struct_pb2

from meshlib.control.xds.resources.errors import XdsResourceError, shown
from meshlib.routing.model import Fault

__all__ = [
    "FAULT_TYPE",
    "ROUTER_TYPE",
    "FaultSpec",
    "duration_s",
    "fraction",
    "http_status_for_grpc",
    "parse_filter_overrides",
    "type_name",
]

logger = logging.getLogger("meshlib")

ROUTER_TYPE = router_pb2.Router.DESCRIPTOR.full_name
FAULT_TYPE = fault_pb2.HTTPFault.DESCRIPTOR.full_name
_FILTER_CONFIG = route_components_pb2.FilterConfig.DESCRIPTOR.full_name
_TYPED_STRUCTS = (
    typed_struct_pb2.TypedStruct.DESCRIPTOR.full_name,
    udpa_typed_struct_pb2.TypedStruct.DESCRIPTOR.full_name,
)

#: gRPC status code -> the HTTP status Envoy answers with (``Grpc::Utility::grpcToHttpStatus``): what an abort
#: configured as ``grpc_status`` becomes for a plain-HTTP call. Codes above 16 are UNKNOWN (grpc-go
#: ``sanitizeGRPCCode``), hence 500.
_GRPC_TO_HTTP = {
    0: 200,
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}

_DENOMINATORS = {
    percent_pb2.FractionalPercent.HUNDRED: 100,
    percent_pb2.FractionalPercent.TEN_THOUSAND: 10_000,
    percent_pb2.FractionalPercent.MILLION: 1_000_000,
}


def http_status_for_grpc(code: int) -> int:
    """The HTTP status for gRPC status ``code`` (Envoy's mapping; unknown codes: 500)."""
    return _GRPC_TO_HTTP.get(code, 500)


def type_name(type_url: str) -> str:
    """The message name of an ``Any`` type URL (the part after the last ``/``)."""
    return type_url.rsplit("/", 1)[-1]


def duration_s(duration: Any) -> float:
    """A ``google.protobuf.Duration`` in seconds."""
    return float(duration.seconds) + float(duration.nanos) / 1e9


def fraction(percent: Any) -> float:
    """A ``FractionalPercent`` as a fraction in 0..1 (a numerator above the denominator means all)."""
    denominator = _DENOMINATORS.get(percent.denominator, 100)
    return min(1.0, float(percent.numerator) / denominator)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One parsed ``envoy.extensions.filters.http.fault.v3.HTTPFault`` (gRFC A33).

    ``delay_s`` / ``abort_status`` are ``None`` when not set (or set from headers, which meshlib does not read:
    ``from_headers`` says so); an ``http_status`` outside 200..599 sets no abort (grpc-go ignores it); a
    ``grpc_status`` is answered with the HTTP status Envoy maps it to.
    """

    delay_s: float | None = None
    delay_fraction: float = 0.0
    abort_status: int | None = None
    abort_fraction: float = 0.0
    max_active: int | None = None
    from_headers: bool = False

    def fault(self, name: str) -> Fault | None:
        """meshlib's :class:`Fault` for the fault filter ``name``; ``None`` when it injects nothing."""
        if (self.delay_s is None or self.delay_fraction <= 0) and (
            self.abort_status is None or self.abort_fraction <= 0
        ):
            return None
        return Fault(name, self.delay_s, self.delay_fraction, self.abort_status, self.abort_fraction, self.max_active)


def parse_fault(config: Any, where: str) -> FaultSpec:
    """An ``Any`` holding an ``HTTPFault`` as a :class:`FaultSpec` (grpc-go ``httpfilter/fault`` ``parseConfig``)."""
    if type_name(config.type_url) != FAULT_TYPE:  # a TypedStruct: grpc-go's fault filter refuses it too
        raise XdsResourceError(
            where, f"the fault filter's config must be an {FAULT_TYPE}, not {shown(config.type_url)}"
        )
    message = fault_pb2.HTTPFault()
    if not config.Unpack(message):
        raise XdsResourceError(where, f"the {FAULT_TYPE} config does not parse")
    delay_s = None
    delay_fraction = 0.0
    abort_status = None
    abort_fraction = 0.0
    from_headers = False
    if message.HasField("delay"):
        delay = message.delay
        delay_fraction = fraction(delay.percentage) if delay.HasField("percentage") else 0.0
        if delay.HasField("fixed_delay"):
            seconds = duration_s(delay.fixed_delay)
            delay_s = seconds if seconds > 0 else None
        elif delay.HasField("header_delay"):
            from_headers = True
    if message.HasField("abort"):
        abort = message.abort
        abort_fraction = fraction(abort.percentage) if abort.HasField("percentage") else 0.0
        kind = abort.WhichOneof("error_type")
        if kind == "http_status":
            abort_status = abort.http_status if 200 <= abort.http_status < 600 else None
        elif kind == "grpc_status":
            abort_status = http_status_for_grpc(abort.grpc_status)
        elif kind == "header_abort":
            from_headers = True
    max_active = message.max_active_faults.value if message.HasField("max_active_faults") else None
    if from_headers:
        logger.warning("xDS fault filter at %s: header-driven delay/abort is not supported by meshlib; ignored", where)
    return FaultSpec(delay_s, delay_fraction, abort_status, abort_fraction, max_active, from_headers)


def unwrap(config: Any) -> str:
    """The filter type an ``Any`` ``typed_config`` names (the inner type of a ``TypedStruct``)."""
    name = type_name(config.type_url)
    if name in _TYPED_STRUCTS:
        struct = typed_struct_pb2.TypedStruct() if name == _TYPED_STRUCTS[0] else udpa_typed_struct_pb2.TypedStruct()
        if not config.Unpack(struct):
            raise XdsResourceError("", f"a {name} that does not parse")
        return type_name(struct.type_url)
    return name


def filter_kind(config: Any, optional: bool, where: str) -> Literal["router", "fault"] | None:
    """Which filter ``config`` configures; ``None`` for an unknown type in an optional filter (skipped)."""
    try:
        name = unwrap(config)
    except XdsResourceError as error:
        raise XdsResourceError(where, error.message) from None
    if name == ROUTER_TYPE:
        return "router"
    if name == FAULT_TYPE:
        return "fault"
    if optional:
        return None
    raise XdsResourceError(where, f"no filter implementation for {shown(name)} and the filter is not optional")


def parse_filter_overrides(overrides: Mapping[str, Any], where: str) -> dict[str, FaultSpec]:
    """``typed_per_filter_config`` (virtual host, route or weighted cluster) -> fault overrides by filter name.

    As grpc-go ``processHTTPFilterOverrides``: a ``FilterConfig`` wrapper is unwrapped (its ``is_optional``
    applies); an unknown type is skipped if optional, else NACKed; a router override is NACKed (the router takes
    none); a fault override is parsed whole (it replaces the filter's config, it is not merged with it).
    """
    found: dict[str, FaultSpec] = {}
    for name in sorted(overrides):
        config = overrides[name]
        here = f"{where}[{name!r}]"
        optional = False
        if type_name(config.type_url) == _FILTER_CONFIG:
            wrapper = route_components_pb2.FilterConfig()
            if not config.Unpack(wrapper):
                raise XdsResourceError(here, "a FilterConfig that does not parse")
            config = wrapper.config
            optional = wrapper.is_optional
        kind = filter_kind(config, optional, here)
        if kind == "router":
            raise XdsResourceError(here, "the router filter takes no per-route config override")
        if kind == "fault":
            found[name] = parse_fault(config, here)
    return found
