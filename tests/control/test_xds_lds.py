"""LDS: client-side Listeners validated as gRPC's proxyless client does (A27, A31, A39); NACKs name the field."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import config_source_pb2, protocol_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import wrappers_pb2
from xds.type.v3 import typed_struct_pb2

from meshlib.control.xds.resources import XdsResourceError, validate_listener
from tests.control.xds_builders import (
    any_of,
    fault,
    hcm_listener,
    http_filter,
    route,
    route_config,
    router_filter,
    seconds,
    virtual_host,
)

pytestmark = pytest.mark.one_library

HCM = "api_listener.api_listener"


def nack(listener: Any) -> XdsResourceError:
    with pytest.raises(XdsResourceError) as caught:
        validate_listener(listener)
    return caught.value


def test_an_rds_listener_names_its_route_configuration() -> None:
    update = validate_listener(hcm_listener(rds="payments-routes"))
    assert (update.name, update.route_config_name, update.inline_route_config) == ("payments", "payments-routes", None)
    assert [(f.name, f.kind) for f in update.http_filters] == [("envoy.filters.http.router", "router")]
    assert update.max_stream_duration_s is None


def test_an_inline_route_configuration_is_validated_as_rds() -> None:
    update = validate_listener(hcm_listener(inline=route_config(virtual_host(route("a")), name="")))
    assert update.route_config_name is None
    assert update.inline_route_config is not None
    assert update.inline_route_config.virtual_hosts[0].routes[0].clusters[0].name == "a"
    bad = route_config(virtual_host(route(action=None, prefix=None, safe_regex={"regex": "("})))
    error = nack(hcm_listener(inline=bad))
    assert error.field_path == f"{HCM}.route_config.virtual_hosts[0].routes[0].match.safe_regex.regex"


def test_the_listeners_max_stream_duration_is_read() -> None:
    options = protocol_pb2.HttpProtocolOptions(max_stream_duration=seconds(1.5))
    assert validate_listener(hcm_listener(common_http_protocol_options=options)).max_stream_duration_s == 1.5


def test_listeners_grpc_refuses_are_nacked() -> None:
    assert nack(listener_pb2.Listener()).field_path == "name"
    assert nack(listener_pb2.Listener(name="payments")).field_path == "api_listener"
    wrong_type = api_listener_pb2.ApiListener(api_listener=any_of(wrappers_pb2.StringValue(value="x")))
    error = nack(listener_pb2.Listener(name="payments", api_listener=wrong_type))
    assert error.field_path == HCM
    assert "HttpConnectionManager" in error.message
    assert nack(hcm_listener(xff_num_trusted_hops=1)).field_path == f"{HCM}.xff_num_trusted_hops"
    assert nack(hcm_listener(rds=None)).field_path == f"{HCM}.route_specifier"
    assert nack(hcm_listener(rds="")).field_path == f"{HCM}.rds.route_config_name"
    scoped = hcm_listener(rds=None, scoped_routes=hcm_pb2.ScopedRoutes(name="s"))
    assert nack(scoped).field_path == f"{HCM}.scoped_routes"


def test_rds_must_come_over_ads() -> None:
    listener = hcm_listener()
    hcm = hcm_pb2.HttpConnectionManager()
    listener.api_listener.api_listener.Unpack(hcm)
    hcm.rds.config_source.CopyFrom(config_source_pb2.ConfigSource(path_config_source={"path": "/etc/routes"}))
    listener.api_listener.api_listener.Pack(hcm)
    assert nack(listener).field_path == f"{HCM}.rds.config_source"
    hcm.rds.config_source.CopyFrom(config_source_pb2.ConfigSource(self=config_source_pb2.SelfConfigSource()))
    listener.api_listener.api_listener.Pack(hcm)
    assert validate_listener(listener).route_config_name == "routes"


# -- HTTP filters (A39) ------------------------------------------------------------------------------------------------


FILTERS = f"{HCM}.http_filters"
UNKNOWN = wrappers_pb2.StringValue(value="some.other.Filter")


def test_the_router_must_be_last() -> None:
    error = nack(hcm_listener(filters=[router_filter(), http_filter("fault", fault())]))
    assert error.field_path == f"{FILTERS}[0]"
    assert "must be last" in error.message
    no_router = nack(hcm_listener(filters=[http_filter("fault", fault())]))
    assert no_router.field_path == f"{FILTERS}[0]"
    assert "not a terminal filter" in no_router.message
    twice = nack(hcm_listener(filters=[router_filter("r1"), router_filter("r2")]))
    assert twice.field_path == f"{FILTERS}[0]"
    assert "must be last" in twice.message


def test_an_empty_chain_is_nacked() -> None:
    assert "empty" in nack(hcm_listener(filters=[])).message
    only_optional = nack(hcm_listener(filters=[http_filter("x", UNKNOWN, optional=True)]))
    assert only_optional.field_path == FILTERS


def test_unknown_required_filters_are_nacked_optional_ones_skipped() -> None:
    error = nack(hcm_listener(filters=[http_filter("authz", UNKNOWN), router_filter()]))
    assert error.field_path == f"{FILTERS}[0].typed_config"
    assert "google.protobuf.StringValue" in error.message
    update = validate_listener(hcm_listener(filters=[http_filter("authz", UNKNOWN, optional=True), router_filter()]))
    assert [f.name for f in update.http_filters] == ["envoy.filters.http.router"]


def test_filter_names_must_be_present_and_unique() -> None:
    assert nack(hcm_listener(filters=[router_filter("")])).field_path == f"{FILTERS}[0].name"
    duplicate = nack(hcm_listener(filters=[http_filter("f", fault()), http_filter("f", fault()), router_filter()]))
    assert duplicate.field_path == f"{FILTERS}[1].name"


def test_a_typed_struct_router_is_accepted() -> None:
    struct = typed_struct_pb2.TypedStruct(type_url="type.googleapis.com/envoy.extensions.filters.http.router.v3.Router")
    router = hcm_pb2.HttpFilter(name="router", typed_config=any_of(struct))
    assert [f.kind for f in validate_listener(hcm_listener(filters=[router])).http_filters] == ["router"]


def test_the_fault_filters_config_is_parsed() -> None:
    config = fault(delay=0.25, delay_percent=50, grpc_abort=8, abort_percent=5, max_active=3)
    update = validate_listener(hcm_listener(filters=[http_filter("fault", config), router_filter()]))
    spec = update.http_filters[0].fault
    assert spec is not None
    assert (spec.delay_s, spec.delay_fraction, spec.abort_status, spec.abort_fraction, spec.max_active) == (
        0.25,
        0.5,
        429,  # RESOURCE_EXHAUSTED, as Envoy answers it over HTTP
        0.05,
        3,
    )


def test_header_driven_faults_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    config = fault()
    config.abort.header_abort.SetInParent()
    config.abort.percentage.numerator = 100
    update = validate_listener(hcm_listener(filters=[http_filter("fault", config), router_filter()]))
    spec = update.http_filters[0].fault
    assert spec is not None and spec.from_headers and spec.fault("fault") is None
    assert "header-driven" in caplog.text


def test_a_fault_filter_whose_config_is_a_typed_struct_is_nacked_as_grpc_go() -> None:
    struct = typed_struct_pb2.TypedStruct(
        type_url="type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
    )
    wrapped = hcm_pb2.HttpFilter(name="fault", typed_config=any_of(struct))
    error = nack(hcm_listener(filters=[wrapped, router_filter()]))
    assert error.field_path == f"{FILTERS}[0].typed_config"
