"""EDS validation and mapping (meshlib.control.xds.resources.eds) on xds-protos messages: every NACK rule asserts
the field path it names, every mapping the endpoints it produces (gRFCs A27, A55, A61; grpc-go unmarshal_eds.go)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.type.v3 import percent_pb2

from meshlib.control.xds.resources.eds import DropCategory, flatten_weights, validate_load_assignment
from meshlib.control.xds.resources.errors import XdsResourceError
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library

HS = health_check_pb2.HealthStatus


def assignment(name: str = "payments") -> Any:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name)


def locality(cla: Any, zone: str = "a", *, weight: int | None = 1, priority: int = 0, sub_zone: str = "") -> Any:
    entry = cla.endpoints.add(priority=priority)
    entry.locality.region = "eu"
    entry.locality.zone = zone
    entry.locality.sub_zone = sub_zone
    if weight is not None:
        entry.load_balancing_weight.value = weight
    return entry


def endpoint(entry: Any, ip: str, port: int = 8080, *, weight: int | None = None, health: int = HS.UNKNOWN) -> Any:
    lb = entry.lb_endpoints.add(health_status=health)
    lb.endpoint.address.socket_address.address = ip
    lb.endpoint.address.socket_address.port_value = port
    if weight is not None:
        lb.load_balancing_weight.value = weight
    return lb


def nack(cla: Any, path: str) -> XdsResourceError:
    with pytest.raises(XdsResourceError) as info:
        validate_load_assignment(cla)
    assert info.value.path == path, str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


def shares(endpoints: tuple[Endpoint, ...]) -> dict[str, Fraction]:
    total = sum(e.weight for e in endpoints)
    return {e.address: Fraction(e.weight, total) for e in endpoints}


def test_endpoints_map_with_zone_priority_and_meta() -> None:
    cla = assignment()
    first = locality(cla, "a", sub_zone="rack1")
    endpoint(first, "10.0.0.1")
    lb = endpoint(first, "::1", 9090, health=HS.HEALTHY)
    lb.endpoint.hostname = "pay-1.internal"
    endpoint(locality(cla, "b", priority=1), "10.0.0.2")
    update = validate_load_assignment(cla)
    assert update.cluster_name == "payments"
    assert update.endpoints == (
        Endpoint("10.0.0.1", 8080, weight=1, priority=0, zone="a"),  # the sub-zone stays in meta only
        Endpoint("::1", 9090, weight=1, priority=0, zone="a"),
        Endpoint("10.0.0.2", 8080, weight=1, priority=1, zone="b"),
    )
    assert dict(update.endpoints[1].meta) == {
        "region": "eu",
        "zone": "a",
        "sub_zone": "rack1",
        "hostname": "pay-1.internal",
    }
    assert [(loc.zone, loc.priority, len(loc.endpoints)) for loc in update.localities] == [("a", 0, 2), ("b", 1, 1)]


def test_locality_and_endpoint_weights_fold_into_one_share() -> None:
    cla = assignment()
    a = locality(cla, "a", weight=3)
    endpoint(a, "10.0.0.1", weight=1)
    endpoint(a, "10.0.0.2", weight=2)
    endpoint(locality(cla, "b", weight=1), "10.0.0.3", weight=7)
    endpoint(locality(cla, "c", weight=5, priority=1), "10.0.1.1")
    update = validate_load_assignment(cla)
    p0 = tuple(e for e in update.endpoints if e.priority == 0)
    # gRPC: locality a gets 3/4 (split 1:2 inside), b 1/4.
    assert shares(p0) == {
        "10.0.0.1:8080": Fraction(1, 4),
        "10.0.0.2:8080": Fraction(1, 2),
        "10.0.0.3:8080": Fraction(1, 4),
    }
    assert [e.weight for e in p0] == [1, 2, 1]


def test_unhealthy_and_draining_endpoints_take_no_share() -> None:
    cla = assignment()
    a = locality(cla, "a", weight=1)
    endpoint(a, "10.0.0.1", health=HS.HEALTHY)
    endpoint(a, "10.0.0.2", health=HS.UNHEALTHY)
    endpoint(a, "10.0.0.3", health=HS.DRAINING)
    endpoint(a, "10.0.0.4", health=HS.TIMEOUT)
    endpoint(a, "10.0.0.5", health=HS.DEGRADED)
    b = locality(cla, "b", weight=1)
    endpoint(b, "10.0.0.6", health=HS.UNHEALTHY)  # b has nothing usable: a takes the whole priority
    update = validate_load_assignment(cla)
    assert [e.address for e in update.endpoints] == ["10.0.0.1:8080"]
    assert [e.address for e in update.draining] == ["10.0.0.3:8080"]


def test_localities_without_weight_are_skipped() -> None:
    cla = assignment()
    endpoint(locality(cla, "a", weight=None), "10.0.0.1")
    endpoint(locality(cla, "b", weight=0), "10.0.0.2")
    endpoint(locality(cla, "c", weight=2), "10.0.0.3")
    # a skipped locality's priority does not count: priority 1 alone would be a gap, here it is skipped.
    endpoint(locality(cla, "d", weight=0, priority=1), "10.0.0.4")
    update = validate_load_assignment(cla)
    assert [e.address for e in update.endpoints] == ["10.0.0.3:8080"]


def test_additional_addresses_are_recorded() -> None:
    cla = assignment()
    lb = endpoint(locality(cla), "10.0.0.1")
    extra = lb.endpoint.additional_addresses.add()
    extra.address.socket_address.address = "fd00::1"
    extra.address.socket_address.port_value = 8080
    update = validate_load_assignment(cla)
    assert update.endpoints[0].meta["additional_addresses"] == "[fd00::1]:8080"


def test_drop_overloads_in_per_million() -> None:
    cla = assignment()
    FP = percent_pb2.FractionalPercent
    for category, numerator, denominator in (
        ("lb", 5, FP.HUNDRED),
        ("throttle", 25, FP.TEN_THOUSAND),
        ("x", 7, FP.MILLION),
    ):
        drop = cla.policy.drop_overloads.add(category=category)
        drop.drop_percentage.numerator = numerator
        drop.drop_percentage.denominator = denominator
    cla.policy.drop_overloads.add(category="all").drop_percentage.numerator = 200  # above 100 %: capped
    update = validate_load_assignment(cla)
    assert update.drops == (
        DropCategory("lb", 50_000),
        DropCategory("throttle", 2_500),
        DropCategory("x", 7),
        DropCategory("all", 1_000_000),
    )
    assert update.endpoints == ()


def test_flatten_weights_exact_and_rounded() -> None:
    assert flatten_weights([Fraction(1, 3), Fraction(2, 3)]) == [1, 2]
    assert flatten_weights([Fraction(1, 6), Fraction(1, 4)]) == [2, 3]
    huge = flatten_weights([Fraction(1, 2**40), Fraction(1, 3)])
    assert huge == [1, 1_000_000]


# ---- NACK rules ------------------------------------------------------------------------------------------


def test_empty_cluster_name() -> None:
    nack(assignment(""), "cluster_name")


def test_locality_needs_its_id() -> None:
    cla = assignment()
    cla.endpoints.add().load_balancing_weight.value = 1
    nack(cla, "endpoints[0].locality")


def test_priority_gap() -> None:
    cla = assignment()
    endpoint(locality(cla, "a"), "10.0.0.1")
    endpoint(locality(cla, "b", priority=2), "10.0.0.2")
    assert "priority 1 missing" in str(nack(cla, "endpoints"))
    cla = assignment()
    endpoint(locality(cla, "b", priority=1), "10.0.0.2")
    assert "priority 0 missing" in str(nack(cla, "endpoints"))


def test_duplicate_locality_in_a_priority() -> None:
    cla = assignment()
    locality(cla, "a")
    locality(cla, "a", priority=1)  # another priority: fine
    locality(cla, "a")
    nack(cla, "endpoints[2].locality")


def test_locality_weight_sum_overflow() -> None:
    cla = assignment()
    locality(cla, "a", weight=2**32 - 1)
    locality(cla, "b", weight=1)
    nack(cla, "endpoints[1].load_balancing_weight")


def test_endpoint_weight_rules() -> None:
    cla = assignment()
    endpoint(locality(cla), "10.0.0.1", weight=0)
    nack(cla, "endpoints[0].lb_endpoints[0].load_balancing_weight")
    cla = assignment()
    a = locality(cla)
    endpoint(a, "10.0.0.1", weight=2**32 - 1)
    endpoint(a, "10.0.0.2", weight=1)
    nack(cla, "endpoints[0].lb_endpoints[1].load_balancing_weight")


SOCKET = "endpoints[0].lb_endpoints[0].endpoint.address.socket_address"


def test_address_rules() -> None:
    cla = assignment()
    locality(cla).lb_endpoints.add().endpoint.address.pipe.path = "/tmp/s"
    nack(cla, SOCKET)
    cla = assignment()
    endpoint(locality(cla), "payments.internal")
    nack(cla, f"{SOCKET}.address")
    cla = assignment()
    endpoint(locality(cla), "10.0.0.1").endpoint.address.socket_address.named_port = "http"
    nack(cla, f"{SOCKET}.port_value")
    cla = assignment()
    endpoint(locality(cla), "10.0.0.1", 0)
    nack(cla, f"{SOCKET}.port_value")
    cla = assignment()
    endpoint(locality(cla), "10.0.0.1").endpoint.address.socket_address.resolver_name = "dns"
    nack(cla, f"{SOCKET}.resolver_name")


def test_duplicate_addresses_across_the_resource() -> None:
    cla = assignment()
    endpoint(locality(cla, "a"), "10.0.0.1")
    endpoint(locality(cla, "b", priority=1), "10.0.0.1", health=HS.UNHEALTHY)  # even an unused one
    nack(cla, "endpoints[1].lb_endpoints[0].endpoint.address.socket_address")
    cla = assignment()
    lb = endpoint(locality(cla), "10.0.0.1")
    extra = lb.endpoint.additional_addresses.add()
    extra.address.socket_address.address = "10.0.0.1"
    extra.address.socket_address.port_value = 8080
    nack(cla, "endpoints[0].lb_endpoints[0].endpoint.additional_addresses[0].address.socket_address")


def test_additional_address_needs_a_socket_address() -> None:
    cla = assignment()
    endpoint(locality(cla), "10.0.0.1").endpoint.additional_addresses.add().address.pipe.path = "/s"
    nack(cla, "endpoints[0].lb_endpoints[0].endpoint.additional_addresses[0].address.socket_address")


def test_drop_denominator_must_be_known() -> None:
    cla = assignment()
    cla.policy.drop_overloads.add(category="lb").drop_percentage.denominator = 7
    nack(cla, "policy.drop_overloads[0].drop_percentage.denominator")
