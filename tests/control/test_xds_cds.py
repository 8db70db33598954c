"""CDS validation and mapping (meshlib.control.xds.resources.cds) on xds-protos messages: every NACK rule
asserts the field path it names, every mapping the value it produces (gRFCs A27, A29, A32, A37, A42, A48,
A50, A52, A58; grpc-go xdsresource/unmarshal_cds.go)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.extensions.clusters.aggregate.v3 import cluster_pb2 as aggregate_pb2
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.pick_first.v3 import pick_first_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from xds.type.v3 import typed_struct_pb2

from meshlib._config.model import MAX_COUNT, ResilienceSettings
from meshlib.control.xds.resources.cds import (
    CertificateProviderRef,
    FailurePercentageEjection,
    OutlierSettings,
    RingHashConfig,
    SuccessRateEjection,
    validate_cluster,
)
from meshlib.control.xds.resources.errors import XdsResourceError

pytestmark = pytest.mark.one_library

Cluster = cluster_pb2.Cluster


def eds_cluster(name: str = "payments") -> Any:
    cluster = Cluster(name=name, type=Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    return cluster


def nack(cluster: Any, path: str, **kwargs: Any) -> XdsResourceError:
    with pytest.raises(XdsResourceError) as info:
        validate_cluster(cluster, **kwargs)
    assert info.value.path == path, str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


def policy(*messages: Any) -> Any:
    lbp = cluster_pb2.LoadBalancingPolicy()
    for i, message in enumerate(messages):
        entry = lbp.policies.add()
        entry.typed_extension_config.name = f"p{i}"
        entry.typed_extension_config.typed_config.Pack(message)
    return lbp


def meshlib_policy(name: str) -> Any:
    return typed_struct_pb2.TypedStruct(type_url=f"type.googleapis.com/meshlib.{name}")


# ---- discovery types -------------------------------------------------------------------------------------


def test_eds_cluster_maps_to_its_service_name_and_defaults() -> None:
    update = validate_cluster(eds_cluster())
    assert (update.name, update.kind, update.eds_service_name) == ("payments", "EDS", "payments")
    assert (update.lb, update.lb_source, update.max_requests, update.outlier, update.tls) == (
        "round_robin",
        "ROUND_ROBIN",
        1024,
        None,
        None,
    )
    cluster = eds_cluster()
    cluster.eds_cluster_config.service_name = "payments-eds"
    assert validate_cluster(cluster).eds_service_name == "payments-eds"
    cluster = Cluster(name="c", type=Cluster.EDS)
    cluster.eds_cluster_config.eds_config.self.SetInParent()
    assert validate_cluster(cluster).kind == "EDS"


def test_eds_config_source_must_be_ads_or_self() -> None:
    cluster = Cluster(name="c", type=Cluster.EDS)
    nack(cluster, "eds_cluster_config.eds_config")
    cluster.eds_cluster_config.eds_config.path_config_source.path = "/etc/eds.yaml"
    assert "path_config_source" in str(nack(cluster, "eds_cluster_config.eds_config"))


def test_xdstp_cluster_needs_a_service_name() -> None:
    nack(eds_cluster("xdstp://auth/envoy.config.cluster.v3.Cluster/c"), "eds_cluster_config.service_name")


def test_cluster_without_name_is_nacked() -> None:
    nack(eds_cluster(""), "name")


@pytest.mark.parametrize("kind", [Cluster.STATIC, Cluster.STRICT_DNS, Cluster.ORIGINAL_DST])
def test_static_and_other_types_are_nacked_as_grpc_does(kind: int) -> None:
    error = nack(Cluster(name="c", type=kind), "type")
    assert Cluster.DiscoveryType.Name(kind) in str(error)


def logical_dns(host: str = "payments.example.com", port: int | None = 8443) -> Any:
    cluster = Cluster(name="dns", type=Cluster.LOGICAL_DNS)
    socket = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    socket.address = host
    if port is not None:
        socket.port_value = port
    return cluster


def test_logical_dns_cluster_maps_to_host_and_port() -> None:
    update = validate_cluster(logical_dns())
    assert (update.kind, update.dns_host, update.dns_port) == ("LOGICAL_DNS", "payments.example.com", 8443)


def test_logical_dns_rules() -> None:
    nack(Cluster(name="dns", type=Cluster.LOGICAL_DNS), "load_assignment")
    two_localities = logical_dns()
    two_localities.load_assignment.endpoints.add()
    nack(two_localities, "load_assignment.endpoints")
    two_endpoints = logical_dns()
    two_endpoints.load_assignment.endpoints[0].lb_endpoints.add()
    nack(two_endpoints, "load_assignment.endpoints[0].lb_endpoints")
    socket = "load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address"
    no_socket = logical_dns()
    no_socket.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path = "/tmp/s"
    nack(no_socket, socket)
    nack(logical_dns(host=""), f"{socket}.address")
    nack(logical_dns(port=None), f"{socket}.port_value")
    nack(logical_dns(port=0), f"{socket}.port_value")
    resolver = logical_dns()
    resolver.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.resolver_name = "x"
    nack(resolver, f"{socket}.resolver_name")


def aggregate(*children: str, name: str = "envoy.clusters.aggregate") -> Any:
    cluster = Cluster(name="agg")
    cluster.cluster_type.name = name
    cluster.cluster_type.typed_config.Pack(aggregate_pb2.ClusterConfig(clusters=list(children)))
    return cluster


def test_aggregate_cluster_keeps_the_prioritized_list() -> None:
    update = validate_cluster(aggregate("primary", "secondary", "dns"))
    assert (update.kind, update.aggregate_clusters) == ("AGGREGATE", ("primary", "secondary", "dns"))


def test_aggregate_rules() -> None:
    nack(aggregate(), "cluster_type.typed_config.clusters")
    nack(aggregate("a", ""), "cluster_type.typed_config.clusters[1]")
    nack(aggregate("a", name="envoy.clusters.redis"), "cluster_type.name")
    wrong = aggregate("a")
    wrong.cluster_type.typed_config.Pack(round_robin_pb2.RoundRobin())
    nack(wrong, "cluster_type.typed_config")


def test_lrs_server_self_is_recorded_and_others_nacked() -> None:
    cluster = eds_cluster()
    cluster.lrs_server.self.SetInParent()
    assert validate_cluster(cluster).lrs_server is True
    cluster.lrs_server.ads.SetInParent()
    nack(cluster, "lrs_server")


# ---- balancing -------------------------------------------------------------------------------------------


def test_ring_hash_lb_policy_maps_with_its_ring_sizes() -> None:
    cluster = eds_cluster()
    cluster.lb_policy = Cluster.RING_HASH
    update = validate_cluster(cluster)
    assert (update.lb, update.ring_hash) == ("ring_hash", RingHashConfig(1024, 8 * 1024 * 1024))
    cluster.ring_hash_lb_config.minimum_ring_size.value = 2048
    cluster.ring_hash_lb_config.maximum_ring_size.value = 4096
    assert validate_cluster(cluster).ring_hash == RingHashConfig(2048, 4096)


def test_ring_hash_rules() -> None:
    cluster = eds_cluster()
    cluster.lb_policy = Cluster.RING_HASH
    cluster.ring_hash_lb_config.hash_function = Cluster.RingHashLbConfig.MURMUR_HASH_2
    nack(cluster, "ring_hash_lb_config.hash_function")
    cluster.ring_hash_lb_config.hash_function = Cluster.RingHashLbConfig.XX_HASH
    cluster.ring_hash_lb_config.minimum_ring_size.value = 8 * 1024 * 1024 + 1
    nack(cluster, "ring_hash_lb_config.minimum_ring_size")
    cluster.ring_hash_lb_config.minimum_ring_size.value = 10
    cluster.ring_hash_lb_config.maximum_ring_size.value = 8 * 1024 * 1024 + 1
    nack(cluster, "ring_hash_lb_config.maximum_ring_size")
    cluster.ring_hash_lb_config.maximum_ring_size.value = 5
    nack(cluster, "ring_hash_lb_config.minimum_ring_size")


def test_least_request_choice_count() -> None:
    cluster = eds_cluster()
    cluster.lb_policy = Cluster.LEAST_REQUEST
    assert (validate_cluster(cluster).lb, validate_cluster(cluster).choice_count) == ("least_request", 2)
    cluster.least_request_lb_config.choice_count.value = 50
    assert validate_cluster(cluster).choice_count == 10  # A48: capped at 10
    cluster.least_request_lb_config.choice_count.value = 1
    nack(cluster, "least_request_lb_config.choice_count")


@pytest.mark.parametrize("lb", [Cluster.RANDOM, Cluster.MAGLEV, Cluster.CLUSTER_PROVIDED])
def test_other_lb_policies_are_nacked(lb: int) -> None:
    cluster = eds_cluster()
    cluster.lb_policy = lb
    assert Cluster.LbPolicy.Name(lb) in str(nack(cluster, "lb_policy"))


def test_load_balancing_policy_wins_and_picks_the_first_supported() -> None:
    cluster = eds_cluster()
    cluster.lb_policy = Cluster.RANDOM  # ignored when load_balancing_policy is set (A52)
    cluster.load_balancing_policy.CopyFrom(
        policy(pick_first_pb2.PickFirst(), meshlib_policy("unknown"), round_robin_pb2.RoundRobin())
    )
    update = validate_cluster(cluster)
    assert (update.lb, update.lb_source) == (
        "round_robin",
        "type.googleapis.com/" + round_robin_pb2.RoundRobin.DESCRIPTOR.full_name,
    )


@dataclass
class PolicyCase:
    message: Any
    lb: str
    check: Callable[[Any], bool] = lambda update: True


@pytest.mark.parametrize(
    "case",
    [
        PolicyCase(round_robin_pb2.RoundRobin(), "round_robin"),
        PolicyCase(
            ring_hash_pb2.RingHash(minimum_ring_size={"value": 100}),
            "ring_hash",
            lambda u: u.ring_hash == RingHashConfig(100, 8 * 1024 * 1024),
        ),
        PolicyCase(
            least_request_pb2.LeastRequest(choice_count={"value": 3}), "least_request", lambda u: u.choice_count == 3
        ),
        PolicyCase(
            wrr_locality_pb2.WrrLocality(endpoint_picking_policy=policy(least_request_pb2.LeastRequest())),
            "least_request",
        ),
        PolicyCase(cswrr_pb2.ClientSideWeightedRoundRobin(), "round_robin"),
        PolicyCase(meshlib_policy("p2c_ewma"), "p2c_ewma", lambda u: u.lb_source.endswith("/meshlib.p2c_ewma")),
        PolicyCase(meshlib_policy("random"), "random"),
    ],
    ids=lambda c: type(c.message).__name__ + ":" + c.lb,
)
def test_each_supported_policy_maps(case: PolicyCase) -> None:
    cluster = eds_cluster()
    cluster.load_balancing_policy.CopyFrom(policy(case.message))
    update = validate_cluster(cluster)
    assert update.lb == case.lb
    assert case.check(update)


def test_load_balancing_policy_rules() -> None:
    cluster = eds_cluster()
    cluster.load_balancing_policy.CopyFrom(policy(pick_first_pb2.PickFirst(), meshlib_policy("maglev")))
    nack(cluster, "load_balancing_policy.policies")
    cluster.load_balancing_policy.CopyFrom(
        policy(ring_hash_pb2.RingHash(hash_function=ring_hash_pb2.RingHash.MURMUR_HASH_2))
    )
    nack(cluster, "load_balancing_policy.policies[0].typed_extension_config.typed_config.hash_function")
    cluster.load_balancing_policy.CopyFrom(policy(least_request_pb2.LeastRequest(choice_count={"value": 1})))
    nack(cluster, "load_balancing_policy.policies[0].typed_extension_config.typed_config.choice_count")
    nested: Any = round_robin_pb2.RoundRobin()
    for _ in range(16):
        nested = wrr_locality_pb2.WrrLocality(endpoint_picking_policy=policy(nested))
    cluster.load_balancing_policy.CopyFrom(policy(nested))
    error = nack(
        cluster,
        "load_balancing_policy" + ".policies[0].typed_extension_config.typed_config.endpoint_picking_policy" * 16,
    )
    assert "16 levels" in str(error)


# ---- circuit breaking (A32) ------------------------------------------------------------------------------


def test_max_requests_of_the_default_priority() -> None:
    cluster = eds_cluster()
    high = cluster.circuit_breakers.thresholds.add(priority=base_pb2.HIGH)
    high.max_requests.value = 7
    assert validate_cluster(cluster).max_requests == 1024
    default = cluster.circuit_breakers.thresholds.add(priority=base_pb2.DEFAULT)
    assert validate_cluster(cluster).max_requests == 1024  # DEFAULT threshold without max_requests
    default.max_requests.value = 50
    update = validate_cluster(cluster)
    assert update.max_requests == 50
    assert update.resilience(ResilienceSettings()).max_inflight == 50
    default.max_requests.value = 2**32 - 1
    assert validate_cluster(cluster).resilience(ResilienceSettings()).max_inflight == MAX_COUNT
    default.max_requests.value = 0
    nack(cluster, "circuit_breakers.thresholds[1].max_requests")


# ---- outlier detection (A50) -----------------------------------------------------------------------------


def test_outlier_detection_defaults_are_envoys() -> None:
    cluster = eds_cluster()
    cluster.outlier_detection.SetInParent()
    outlier = validate_cluster(cluster).outlier
    assert outlier == OutlierSettings(10.0, 30.0, 300.0, 10, 5, SuccessRateEjection(), None)
    assert outlier is not None
    assert outlier.apply(ResilienceSettings(outlier_failures=9)) == ResilienceSettings(outlier_failures=5)


def test_outlier_detection_fields_map() -> None:
    cluster = eds_cluster()
    od = cluster.outlier_detection
    od.interval.seconds = 2
    od.base_ejection_time.FromMilliseconds(1500)
    od.max_ejection_time.seconds = 1  # below the base: acts as the base
    od.max_ejection_percent.value = 40
    od.consecutive_5xx.value = 3
    od.enforcing_success_rate.value = 0
    od.enforcing_failure_percentage.value = 50
    od.failure_percentage_threshold.value = 60
    od.failure_percentage_minimum_hosts.value = 2
    od.failure_percentage_request_volume.value = 20
    update = validate_cluster(cluster)
    assert update.outlier == OutlierSettings(2.0, 1.5, 1.5, 40, 3, None, FailurePercentageEjection(60, 50, 2, 20))
    settings = update.resilience(ResilienceSettings())
    assert (settings.outlier_failures, settings.outlier_base_ejection, settings.outlier_max_ejection) == (3, 1.5, 1.5)
    assert settings.outlier_max_percent == 40.0
    # The rate detectors apply too: success rate off (enforcement 0), failure percentage as sent, the interval.
    assert settings.outlier_interval == 2.0
    assert settings.outlier_success_rate is None
    assert settings.outlier_failure_percentage == FailurePercentageEjection(60, 50, 2, 20)
    od.enforcing_success_rate.value = 80
    od.success_rate_stdev_factor.value = 1000
    od.success_rate_minimum_hosts.value = 3
    od.success_rate_request_volume.value = 7
    settings = validate_cluster(cluster).resilience(ResilienceSettings())
    assert settings.outlier_success_rate == SuccessRateEjection(1000, 80, 3, 7)


def test_consecutive_5xx_off() -> None:
    cluster = eds_cluster()
    cluster.outlier_detection.enforcing_consecutive_5xx.value = 0
    outlier = validate_cluster(cluster).outlier
    assert outlier is not None and outlier.consecutive_failures is None
    assert outlier.apply(ResilienceSettings()).outlier_failures == MAX_COUNT
    cluster = eds_cluster()
    cluster.outlier_detection.base_ejection_time.seconds = 0
    cluster.outlier_detection.base_ejection_time.nanos = 0
    outlier = validate_cluster(cluster).outlier
    assert outlier is not None and outlier.consecutive_failures is None
    assert outlier.apply(ResilienceSettings()).outlier_base_ejection == 30.0  # 0 kept out of ResilienceSettings


@pytest.mark.parametrize(
    "field",
    [
        "max_ejection_percent",
        "enforcing_success_rate",
        "failure_percentage_threshold",
        "enforcing_failure_percentage",
        "enforcing_consecutive_5xx",
    ],
)
def test_outlier_percentages_above_100_are_nacked(field: str) -> None:
    cluster = eds_cluster()
    getattr(cluster.outlier_detection, field).value = 101
    nack(cluster, f"outlier_detection.{field}")


@pytest.mark.parametrize("field", ["interval", "base_ejection_time", "max_ejection_time"])
@pytest.mark.parametrize("seconds,nanos", [(-1, 0), (1, -5), (0, 1_000_000_000), (315_576_000_001, 0)])
def test_outlier_durations_must_be_valid_and_not_negative(field: str, seconds: int, nanos: int) -> None:
    cluster = eds_cluster()
    duration = getattr(cluster.outlier_detection, field)
    duration.seconds, duration.nanos = seconds, nanos
    nack(cluster, f"outlier_detection.{field}")


# ---- TLS (A29) -------------------------------------------------------------------------------------------

TLS_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def tls_cluster(context: Any, name: str = "envoy.transport_sockets.tls") -> Any:
    cluster = eds_cluster()
    cluster.transport_socket.name = name
    cluster.transport_socket.typed_config.Pack(context)
    return cluster


def upstream(*sans: Any, identity: str | None = "id", root: str | None = "roots") -> Any:
    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    if identity is not None:
        common.tls_certificate_provider_instance.instance_name = identity
    if root is not None:
        common.validation_context.ca_certificate_provider_instance.instance_name = root
        common.validation_context.ca_certificate_provider_instance.certificate_name = "ROOTCA"
    for san in sans:
        common.validation_context.match_subject_alt_names.append(san)
    return context


P = "transport_socket.typed_config.common_tls_context"
V = f"{P}.validation_context"


def test_tls_maps_providers_and_a_spiffe_id() -> None:
    spiffe = string_pb2.StringMatcher(exact="spiffe://cluster.local/ns/pay/sa/payments")
    tls = validate_cluster(tls_cluster(upstream(spiffe)), certificate_providers={"id", "roots"}).tls
    assert tls is not None
    assert (tls.root, tls.identity) == (CertificateProviderRef("roots", "ROOTCA"), CertificateProviderRef("id"))
    assert (tls.server_id, tls.server_name, tls.use_system_roots) == (
        "spiffe://cluster.local/ns/pay/sa/payments",
        None,
        False,
    )
    assert tls.san_allowed(["spiffe://cluster.local/ns/pay/sa/payments"])
    assert not tls.san_allowed(["spiffe://cluster.local/ns/pay/sa/other"])


@dataclass(frozen=True)
class Files:
    certificate_file: str | None = None
    private_key_file: str | None = None
    ca_certificate_file: str | None = None


def test_tls_settings_from_bootstrap_files() -> None:
    domain = string_pb2.StringMatcher(prefix="spiffe://cluster.local/")
    tls = validate_cluster(tls_cluster(upstream(domain))).tls
    assert tls is not None and tls.server_id == "spiffe://cluster.local"
    providers = {"id": Files("/c.pem", "/k.pem"), "roots": Files(ca_certificate_file="/ca.pem")}
    settings = tls.tls_settings(providers)
    assert (settings.ca_file, settings.cert_file, settings.key_file, settings.server_id) == (
        "/ca.pem",
        "/c.pem",
        "/k.pem",
        "spiffe://cluster.local",
    )
    with pytest.raises(XdsResourceError) as info:
        tls.tls_settings({"id": Files("/c.pem", "/k.pem")})
    assert info.value.path == "validation_context.ca_certificate_provider_instance"
    with pytest.raises(XdsResourceError) as info:
        tls.tls_settings({"id": Files(), "roots": Files(ca_certificate_file="/ca.pem")})
    assert info.value.path == "tls_certificate_provider_instance"


def test_san_matchers_meshlib_cannot_express_refuse_tls_settings() -> None:
    two = (string_pb2.StringMatcher(exact="spiffe://td/a"), string_pb2.StringMatcher(suffix=".example.com"))
    tls = validate_cluster(tls_cluster(upstream(*two))).tls
    assert tls is not None and (tls.server_id, tls.server_name) == (None, None)
    assert tls.san_allowed(["x", "api.example.com"]) and not tls.san_allowed(["spiffe://td/b"])
    with pytest.raises(XdsResourceError) as info:
        tls.tls_settings({"id": Files("/c"), "roots": Files(ca_certificate_file="/ca")})
    assert info.value.path == "validation_context.match_subject_alt_names"
    dns = validate_cluster(tls_cluster(upstream(string_pb2.StringMatcher(exact="payments.internal")))).tls
    assert dns is not None and dns.server_name == "payments.internal"


def test_san_matcher_kinds() -> None:
    regex = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=r"spiffe://td/ns/[a-z]+/sa/pay"))
    contains = string_pb2.StringMatcher(contains="PAY", ignore_case=True)
    tls = validate_cluster(tls_cluster(upstream(regex))).tls
    assert tls is not None and tls.san_allowed(["spiffe://td/ns/x/sa/pay"])
    assert not tls.san_allowed(["spiffe://td/ns/x/sa/pay2"])  # a full match
    tls = validate_cluster(tls_cluster(upstream(contains))).tls
    assert tls is not None and tls.san_allowed(["api.pay.example"])


def test_system_root_certs_and_no_identity() -> None:
    context = upstream(identity=None, root=None)
    context.common_tls_context.validation_context.system_root_certs.SetInParent()
    tls = validate_cluster(tls_cluster(context)).tls
    assert tls is not None and (tls.use_system_roots, tls.root, tls.identity) == (True, None, None)


def test_deprecated_provider_fields_are_read_as_grpc_does() -> None:
    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    common.tls_certificate_certificate_provider_instance.instance_name = "id"
    combined = common.combined_validation_context
    combined.validation_context_certificate_provider_instance.instance_name = "roots"
    combined.default_validation_context.match_subject_alt_names.add(exact="spiffe://td/x")
    tls = validate_cluster(tls_cluster(context)).tls
    assert tls is not None and (tls.root, tls.identity, tls.server_id) == (
        CertificateProviderRef("roots"),
        CertificateProviderRef("id"),
        "spiffe://td/x",
    )


def _with(mutate: Callable[[Any], None]) -> Any:
    context = upstream()
    mutate(context)
    return context


@pytest.mark.parametrize(
    "context,path",
    [
        (upstream(root=None), f"{V}.ca_certificate_provider_instance"),
        (_with(lambda c: c.common_tls_context.tls_params.SetInParent()), f"{P}.tls_params"),
        (
            _with(lambda c: c.common_tls_context.validation_context.verify_certificate_spki.append("x")),
            f"{V}.verify_certificate_spki",
        ),
        (
            _with(lambda c: c.common_tls_context.validation_context.verify_certificate_hash.append("x")),
            f"{V}.verify_certificate_hash",
        ),
        (
            _with(
                lambda c: setattr(
                    c.common_tls_context.validation_context.require_signed_certificate_timestamp, "value", True
                )
            ),
            f"{V}.require_signed_certificate_timestamp",
        ),
        (
            _with(lambda c: c.common_tls_context.validation_context.match_typed_subject_alt_names.add()),
            f"{V}.match_typed_subject_alt_names",
        ),
        (
            _with(lambda c: c.common_tls_context.validation_context.match_subject_alt_names.add(prefix="")),
            f"{V}.match_subject_alt_names[0].prefix",
        ),
        (
            _with(lambda c: c.common_tls_context.validation_context.match_subject_alt_names.add()),
            f"{V}.match_subject_alt_names[0]",
        ),
        (
            _with(
                lambda c: c.common_tls_context.validation_context.match_subject_alt_names.add(safe_regex={"regex": "("})
            ),
            f"{V}.match_subject_alt_names[0].safe_regex.regex",
        ),
        (
            _with(lambda c: c.common_tls_context.validation_context_sds_secret_config.SetInParent()),
            f"{P}.validation_context_sds_secret_config",
        ),
        (_with(lambda c: setattr(c, "sni", "x" * 256)), "transport_socket.typed_config.sni"),
        (upstream(identity=""), f"{P}.tls_certificate_provider_instance.instance_name"),
    ],
)
def test_tls_nack_rules(context: Any, path: str) -> None:
    nack(tls_cluster(context), path)


def test_tls_unsupported_fields_set_explicitly() -> None:
    nack(tls_cluster(tls_pb2.UpstreamTlsContext(sni="x")), f"{P}")  # no common_tls_context
    context = upstream()
    context.common_tls_context.custom_handshaker.name = "h"
    nack(tls_cluster(context), f"{P}.custom_handshaker")
    context = upstream()
    context.common_tls_context.validation_context.crl.filename = "/crl"
    nack(tls_cluster(context), f"{V}.crl")
    context = upstream(identity=None)
    context.common_tls_context.tls_certificates.add().certificate_chain.filename = "/c"
    nack(tls_cluster(context), f"{P}.tls_certificates")


def test_tls_socket_rules() -> None:
    nack(tls_cluster(upstream(), name="envoy.transport_sockets.raw_buffer"), "transport_socket.name")
    nack(tls_cluster(round_robin_pb2.RoundRobin()), "transport_socket.typed_config")
    unknown = tls_cluster(upstream())
    nack(unknown, f"{V}.ca_certificate_provider_instance.instance_name", certificate_providers={"id"})
    nack(unknown, f"{P}.tls_certificate_provider_instance.instance_name", certificate_providers={"roots"})
    matches = eds_cluster()
    matches.transport_socket_matches.add(name="m")
    nack(matches, "transport_socket_matches")


def test_cluster_resilience_keeps_base_without_outlier_detection() -> None:
    base = ResilienceSettings(outlier_failures=7, max_inflight=9)
    assert validate_cluster(eds_cluster()).resilience(base) == ResilienceSettings(outlier_failures=7, max_inflight=1024)


def test_max_connection_duration_is_the_maximum_connection_age() -> None:
    """Envoy's cluster ``max_connection_duration``, typed HTTP protocol options first, else the deprecated field."""
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

    assert validate_cluster(eds_cluster()).resilience(ResilienceSettings()).max_connection_age == 0.0
    deprecated = eds_cluster()
    deprecated.common_http_protocol_options.max_connection_duration.seconds = 300
    settings = validate_cluster(deprecated).resilience(ResilienceSettings(max_connection_age_jitter=0.2))
    assert (settings.max_connection_age, settings.max_connection_age_jitter) == (300.0, 0.2)
    typed = eds_cluster()
    options = http_protocol_options_pb2.HttpProtocolOptions()
    options.common_http_protocol_options.max_connection_duration.FromMilliseconds(90_500)
    options.explicit_http_config.http_protocol_options.SetInParent()
    typed.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(options)
    typed.common_http_protocol_options.max_connection_duration.seconds = 1  # the typed options win
    assert validate_cluster(typed).resilience(ResilienceSettings()).max_connection_age == 90.5
    # A service's own age is kept when the cluster sets none.
    own = ResilienceSettings(max_connection_age=60)
    assert validate_cluster(eds_cluster()).resilience(own).max_connection_age == 60


def test_a_bad_max_connection_duration_is_nacked() -> None:
    cluster = eds_cluster()
    cluster.common_http_protocol_options.max_connection_duration.seconds = -5
    nack(cluster, "common_http_protocol_options.max_connection_duration")
    wrong = eds_cluster()
    wrong.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(base_pb2.Locality(zone="a"))
    nack(wrong, f"typed_extension_protocol_options[{_HTTP_OPTIONS!r}]")


_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
