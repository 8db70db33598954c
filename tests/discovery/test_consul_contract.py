"""Contract tests: response bodies copied from Consul's documentation become the endpoints they describe.

The bodies are in ``consul_fixtures/`` (sources in ``SOURCES.md``). Variants change one documented field at a
time to pin each rule of the address / health / weight mapping. The last test keeps the emulator honest: its
answers carry every field of the documented example, with the same JSON types.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from meshlib.discovery.base import Endpoint
from meshlib.discovery.consul import aggregate_status, endpoints_from_health
from tests.httplib import httpx
from tests.servers.consul import ConsulEmulator

FIXTURES = Path(__file__).parent / "consul_fixtures"


def load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((FIXTURES / name).read_text())
    return data


def documented() -> list[dict[str, Any]]:
    """The ``/v1/health/service/:service`` sample of the current docs (health.mdx)."""
    return load("health_service.json")


def test_current_documented_example() -> None:
    (endpoint,) = endpoints_from_health(documented())
    assert endpoint == Endpoint("10.1.10.12", 8000, weight=10, zone=None, tags=("primary",))  # Datacenter: not a zone
    assert dict(endpoint.meta) == {"redis_version": "4.0"}


def test_consul_1_0_example_without_weights() -> None:
    (endpoint,) = endpoints_from_health(load("health_service_v1.json"))
    # No Weights: Consul's defaults (Passing 1). A check with "ServiceTags": null is fine.
    assert endpoint == Endpoint("10.1.10.12", 8000, weight=1, zone=None, tags=("primary",))
    assert dict(endpoint.meta) == {}


def test_consul_0_6_example_with_null_tags_and_no_datacenter() -> None:
    (endpoint,) = endpoints_from_health(load("health_service_v0.json"))
    assert endpoint == Endpoint("10.1.10.12", 8000, weight=1, zone=None, tags=())


def test_zone_is_service_locality_else_node_then_service_metadata() -> None:
    # Consul 1.17+ puts the agent's locality on each service: "Locality": {"Region": ..., "Zone": ...}.
    body = documented()
    body[0]["Service"]["Locality"] = {"Region": "us-west-1", "Zone": "us-west-1a"}
    body[0]["Node"]["Meta"]["zone"] = "from-node"
    assert endpoints_from_health(body)[0].zone == "us-west-1a"
    del body[0]["Service"]["Locality"]
    body[0]["Service"]["Meta"]["zone"] = "from-service"
    assert endpoints_from_health(body)[0].zone == "from-node"
    del body[0]["Node"]["Meta"]["zone"]
    assert endpoints_from_health(body)[0].zone == "from-service"
    assert endpoints_from_health(body, zone_key="az")[0].zone is None


def test_empty_service_address_falls_back_to_the_node_address() -> None:
    body = documented()
    body[0]["Service"]["Address"] = ""
    body[0]["Node"]["Address"] = "10.1.10.99"
    (endpoint,) = endpoints_from_health(body)
    assert endpoint.host == "10.1.10.99"


def test_missing_service_address_falls_back_to_the_node_address() -> None:
    body = documented()
    del body[0]["Service"]["Address"]
    (endpoint,) = endpoints_from_health(body)
    assert endpoint.host == "10.1.10.12"


@pytest.mark.parametrize(
    ("status", "passing_only", "weight"),
    [
        ("warning", True, None),  # ?passing: a warning instance is not healthy enough
        ("warning", False, 1),  # Weights.Warning
        ("critical", False, None),
        ("maintenance", False, None),
        ("unknown-status", False, None),  # unknown counts as critical
    ],
)
def test_service_check_status(status: str, passing_only: bool, weight: int | None) -> None:
    body = documented()
    body[0]["Checks"][0]["Status"] = status
    found = endpoints_from_health(body, passing_only=passing_only)
    assert [e.weight for e in found] == ([] if weight is None else [weight])


def test_node_check_counts_too() -> None:
    body = documented()
    body[0]["Checks"][1]["Status"] = "critical"  # serfHealth: the node's agent is gone
    assert endpoints_from_health(body, passing_only=False) == ()


def test_maintenance_mode_check_excludes_the_instance() -> None:
    body = documented()
    body[0]["Checks"].append(
        {"Node": "foobar", "CheckID": "_service_maintenance:redis", "Status": "critical", "ServiceID": "redis"}
    )
    assert endpoints_from_health(body, passing_only=False) == ()
    assert aggregate_status(body[0]["Checks"]) == "maintenance"


def test_warning_weight_zero_removes_the_instance() -> None:
    body = documented()
    body[0]["Checks"][0]["Status"] = "warning"
    body[0]["Service"]["Weights"] = {"Passing": 10, "Warning": 0}
    assert endpoints_from_health(body, passing_only=False) == ()


def test_instances_without_checks_are_passing() -> None:
    body = documented()
    body[0]["Checks"] = []
    assert len(endpoints_from_health(body)) == 1


def test_required_tags_are_checked_client_side_too() -> None:
    body = documented()
    assert endpoints_from_health(body, tags=["primary"])
    assert endpoints_from_health(body, tags=["primary", "v2"]) == ()


def test_unknown_fields_are_ignored() -> None:
    body = documented()
    body[0]["Service"].update(
        {"Kind": "", "Proxy": {"Mode": ""}, "Connect": {}, "CreateIndex": 7, "ModifyIndex": 9, "Locality": None}
    )
    body[0]["Node"]["PeerName"] = ""
    body[0]["SomethingNew"] = {"x": [1, 2]}
    assert endpoints_from_health(body) == endpoints_from_health(documented())


def test_unusable_entries_are_skipped_not_fatal() -> None:
    body = documented()
    no_port = copy.deepcopy(body[0])
    no_port["Service"]["Port"] = 0
    body.extend([no_port, "not an object", {"Node": {}, "Checks": []}])
    assert len(endpoints_from_health(body)) == 1


def test_a_body_that_is_not_an_array_is_refused() -> None:
    with pytest.raises(ValueError, match="JSON array"):
        endpoints_from_health({"Node": {}})


def _shape(value: Any) -> Any:
    """The JSON types of a value, recursively for objects (lists by their first item)."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


def _covers(documented: Any, actual: Any, where: str = "$") -> list[str]:
    """Where ``actual`` lacks a documented field or has another JSON type (Enterprise-only fields aside)."""
    problems: list[str] = []
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return [f"{where}: expected an object"]
        for key, item in documented.items():
            if key == "Namespace":  # Consul Enterprise only
                continue
            if key not in actual:
                problems.append(f"{where}.{key}: missing")
            else:
                problems.extend(_covers(item, actual[key], f"{where}.{key}"))
    elif isinstance(documented, list):
        if documented and actual:
            problems.extend(_covers(documented[0], actual[0], f"{where}[0]"))
    elif documented != actual:
        problems.append(f"{where}: {actual} instead of {documented}")
    return problems


def test_the_emulator_answers_in_the_documented_shape() -> None:
    with ConsulEmulator(jitter=False) as consul:
        consul.register(
            "redis",
            8000,
            id="redis",
            address="10.1.10.12",
            tags=["primary"],
            meta={"redis_version": "4.0"},
            weights=(10, 1),
            node="foobar",
            node_address="10.1.10.12",
            node_meta={"instance_type": "t2.medium"},
        )
        response = httpx.get(f"{consul.url}/v1/health/service/redis")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["x-consul-index"]) >= 1
    assert response.headers["x-consul-knownleader"] == "true"
    answer = response.json()
    expected = copy.deepcopy(documented())
    # Tagged service addresses are optional in a registration; the emulator does not invent them.
    del expected[0]["Service"]["TaggedAddresses"]
    assert _covers(_shape(expected), _shape(answer)) == []
    assert endpoints_from_health(answer) == endpoints_from_health(documented())
