"""Zone-aware routing end to end: a client in zone ``a`` of three zones of four real loopback backends each.

Healthy, every request stays in zone a; when discovery drops three of zone a's four endpoints (as a Consul
check going critical does), the in-zone share is Envoy's formula, (1/9) / (4/12) = 33.3 %; when zone a is
empty, traffic spills at once with no failure. The shares are meshlib's own draws, so one library suffices.
"""

from __future__ import annotations

import asyncio

import pytest

import meshlib
from meshlib.status import ZoneStatus, format_status
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, LogWatch
from tests.members import Members

pytestmark = pytest.mark.one_library

ZONES = ("a", "b", "c")


def _env(members: Members, zone: str | None) -> dict[str, str]:
    env = {"MESHLIB_SERVICE_PAYMENTS": members.source, "MESHLIB_DNS_TTL_MIN": "50ms", "MESHLIB_LB": "round_robin"}
    if zone is not None:
        env["MESHLIB_ZONE"] = zone
    return env


def _zoned(backends: list[Backend]) -> dict[str, list[Backend]]:
    return {zone: backends[i * 4 : (i + 1) * 4] for i, zone in enumerate(ZONES)}


def _counts(groups: dict[str, list[Backend]]) -> dict[str, int]:
    return {zone: sum(b.count for b in group) for zone, group in groups.items()}


def _reset(backends: list[Backend]) -> None:
    for b in backends:
        b.reset()


def test_in_zone_while_healthy_envoys_share_when_degraded_and_spill_when_empty(
    start_backends: BackendFactory, members: Members, log_event: LogWatch
) -> None:
    backends = start_backends(12)
    zones = _zoned(backends)
    members.set_zones(zones)
    with meshlib.Client(environ=_env(members, "a")) as client:
        for _ in range(400):
            assert client.get("http://payments/").status_code == 200
        assert _counts(zones) == {"a": 400, "b": 0, "c": 0}  # healthy: everything in-zone

        survivor = zones["a"][0]
        applied = log_event("endpoints of service payments changed: 9 now")
        members.set_zones({**zones, "a": [survivor]})  # three of zone a's endpoints leave discovery
        assert applied.wait(10), "the smaller set was never applied"
        _reset(backends)
        for _ in range(3000):
            assert client.get("http://payments/").status_code == 200
        counts = _counts(zones)
        status = client.mesh_status()
        assert status.services[0].zones == ZoneStatus("a", "zone-aware", "residual", in_zone_percent=33.33)
        assert sorted(e.zone or "" for e in status.services[0].endpoints) == ["a"] + ["b"] * 4 + ["c"] * 4
        text = format_status({"meshlib": "x", "pid": 1, "clients": [status.to_dict()]})
        assert "zones: local a, zone-aware residual, 33.3 % in-zone" in text
        # Envoy: upstream share of zone a 1/9 of healthy endpoints, callers' share 4/12 -> 33.33 % stay in-zone,
        # the rest split by residual capacity (b and c alike). 3,000 draws: one standard deviation is 0.9 points.
        assert abs(counts["a"] / 3000 - 1 / 3) < 0.04, counts
        assert abs(counts["b"] - counts["c"]) < 0.08 * 3000, counts

        emptied = log_event("endpoints of service payments changed: 8 now")
        members.set_zones({**zones, "a": []})  # zone a is empty: spill to b and c at once, nothing fails
        assert emptied.wait(10), "the set without zone a was never applied"
        _reset(backends)
        for _ in range(200):
            assert client.get("http://payments/").status_code == 200
        assert _counts(zones)["a"] == 0 and sum(_counts(zones).values()) == 200


def test_without_a_local_zone_traffic_ignores_zones(start_backends: BackendFactory, members: Members) -> None:
    backends = start_backends(12)
    zones = _zoned(backends)
    members.set_zones(zones)
    with meshlib.Client(environ=_env(members, None)) as client:
        for _ in range(120):
            assert client.get("http://payments/").status_code == 200
    assert _counts(zones) == {"a": 40, "b": 40, "c": 40}  # round robin over all twelve


def test_below_the_minimum_cluster_size_routing_is_off(start_backends: BackendFactory, members: Members) -> None:
    backends = start_backends(3)
    zones = {"a": backends[:1], "b": backends[1:2], "c": backends[2:]}
    members.set_zones(zones)
    with meshlib.Client(environ=_env(members, "a")) as client:  # 3 endpoints < Envoy's min_cluster_size 6
        for _ in range(90):
            assert client.get("http://payments/").status_code == 200
    assert _counts(zones) == {"a": 30, "b": 30, "c": 30}


@pytest.mark.anyio
async def test_async_client_stays_in_zone_and_spills(
    start_backends: BackendFactory, members: Members, log_event: LogWatch
) -> None:
    backends = start_backends(12)
    zones = _zoned(backends)
    members.set_zones(zones)
    async with meshlib.AsyncClient(environ=_env(members, "b")) as client:
        for _ in range(200):
            assert (await client.get("http://payments/")).status_code == 200
        assert _counts(zones) == {"a": 0, "b": 200, "c": 0}
        emptied = log_event("endpoints of service payments changed: 8 now")
        members.set_zones({**zones, "b": []})
        assert await asyncio.to_thread(emptied.wait, 10), "the set without zone b was never applied"
        _reset(backends)
        for _ in range(100):
            assert (await client.get("http://payments/")).status_code == 200
    assert _counts(zones)["b"] == 0 and sum(_counts(zones).values()) == 100


def test_endpoints_behind_open_breakers_count_as_unhealthy_in_their_zone(
    start_backends: BackendFactory, members: Members
) -> None:
    backends = start_backends(12)
    zones = _zoned(backends)
    members.set_zones(zones)
    env = {**_env(members, "a"), "MESHLIB_BREAKER_FAILURES": "1", "MESHLIB_BREAKER_RESET": "1h", "MESHLIB_RETRIES": "3"}
    for b in zones["a"][1:]:
        b.behavior = Behavior(status=503)  # each opens its breaker on its first answer (the call is retried)
    with meshlib.Client(environ=env) as client:
        for _ in range(50):
            assert client.get("http://payments/").status_code == 200
        assert [e.breaker for e in client.mesh_status().services[0].endpoints].count("open") == 3
        _reset(backends)
        for _ in range(3000):
            assert client.get("http://payments/").status_code == 200
    counts = _counts(zones)
    assert sum(b.count for b in zones["a"][1:]) == 0  # behind open breakers: never picked
    assert abs(counts["a"] / 3000 - 1 / 3) < 0.04, counts  # one healthy of four: Envoy's 33.3 % in-zone
