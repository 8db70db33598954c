"""Zone-aware routing (Envoy's plan) and priority failover across zones: pure plans and pickers over real stats.

Shares are counted over seeded draws (no clock, no sleeping); the expected figures are Envoy's integer formula
(``load_balancer_impl.cc``) worked by hand in each test.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from meshlib.balance.base import EndpointStats, Picker
from meshlib.balance.locality import (
    ANY,
    FailoverPicker,
    ZoneAwarePicker,
    failover_tiers,
    plan_zones,
    priority_loads,
)
from meshlib.balance.p2c import P2CPeakEwma
from meshlib.balance.round_robin import RoundRobin
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library

THREE_BY_FOUR = {"a": 4, "b": 4, "c": 4}


# --- the plan ----------------------------------------------------------------------------------------------------


def test_all_healthy_even_spread_routes_everything_in_zone() -> None:
    plan = plan_zones("a", THREE_BY_FOUR, THREE_BY_FOUR)
    assert plan.state == "direct" and plan.local_share == 1.0 and plan.zones == ("a", "b", "c")
    rng = random.Random(1)
    assert {plan.choose(rng) for _ in range(1000)} == {0}


def test_one_healthy_of_four_in_zone_gives_envoys_share_and_residual_split() -> None:
    # upstream: a=1/9 -> 1111, b=c=4/9 -> 4444; callers a=b=c=1/3 -> 3333.
    # local_percent_to_route = 1111 * 10000 // 3333 = 3333; residual b = c = 4444 - 3333 = 1111.
    plan = plan_zones("a", {"a": 1, "b": 4, "c": 4}, THREE_BY_FOUR)
    assert plan.state == "residual"
    assert plan.local_percent == 3333
    assert plan.residual == (0, 1111, 1111)
    rng = random.Random(7)
    counts = Counter(plan.choose(rng) for _ in range(30_000))
    assert counts[0] / 30_000 == pytest.approx(1 / 3, abs=0.01)
    assert counts[1] == pytest.approx(counts[2], rel=0.05)
    assert ANY not in counts


def test_uneven_callers_and_upstream_follow_envoys_worked_example() -> None:
    # The comment in regenerateLocalityRoutingStructures: local 40/40/20 %, upstream 25/50/25 %.
    plan = plan_zones("a", {"a": 25, "b": 50, "c": 25}, {"a": 40, "b": 40, "c": 20})
    assert plan.local_percent == 2500 * 10000 // 4000 == 6250
    assert plan.residual == (0, 1000, 500)  # b has 10 points spare, c 5
    rng = random.Random(3)
    counts = Counter(plan.choose(rng) for _ in range(40_000))
    assert counts[0] / 40_000 == pytest.approx(0.625, abs=0.01)
    assert counts[1] / (counts[1] + counts[2]) == pytest.approx(2 / 3, abs=0.02)


def test_local_zone_with_more_than_its_caller_share_is_direct() -> None:
    plan = plan_zones("a", {"a": 6, "b": 2}, {"a": 1, "b": 1})
    assert plan.state == "direct"


def test_empty_local_zone_spills_at_once() -> None:
    plan = plan_zones("a", {"a": 0, "b": 4, "c": 4}, THREE_BY_FOUR)
    assert plan.state == "off" and "no healthy endpoint in the local zone" in plan.reason
    assert plan.choose(random.Random(0)) == ANY


@pytest.mark.parametrize(
    ("local", "healthy", "callers", "kwargs", "why"),
    [
        (None, THREE_BY_FOUR, THREE_BY_FOUR, {}, "MESHLIB_ZONE is unset"),
        ("a", THREE_BY_FOUR, THREE_BY_FOUR, {"panic": True}, "panic"),
        ("a", {"a": 12}, {"a": 12}, {}, "fewer than two zones"),
        ("a", {"a": 2, "b": 3}, {"a": 2, "b": 3}, {}, "fewer than the minimum cluster size 6"),
        ("a", {"a": 1, "b": 1}, {"a": 1, "b": 1}, {"min_cluster_size": 3}, "minimum cluster size 3"),
        ("a", {"a": 4, "b": 4}, {"b": 8}, {}, "no caller in the local zone"),
        ("z", {"a": 4, "b": 4}, {"a": 4, "b": 4}, {}, "no healthy endpoint in the local zone 'z'"),
    ],
)
def test_routing_is_off_and_says_why(
    local: str | None, healthy: dict[str | None, int], callers: dict[str | None, int], kwargs: dict, why: str
) -> None:
    plan = plan_zones(local, healthy, callers, **kwargs)
    assert plan.state == "off" and why in plan.reason


def test_min_cluster_size_counts_healthy_endpoints_only() -> None:
    assert plan_zones("a", {"a": 3, "b": 3}, {"a": 3, "b": 3}).state == "direct"
    assert plan_zones("a", {"a": 3, "b": 2}, {"a": 3, "b": 3}).state == "off"
    assert plan_zones("a", {"a": 1, "b": 1}, {"a": 1, "b": 1}, min_cluster_size=0).state == "direct"


def test_no_zone_endpoints_are_a_group_never_local() -> None:
    plan = plan_zones("a", {"a": 1, None: 8}, {"a": 3, None: 6})
    assert plan.zones == ("a", None)
    # upstream a = 1111, callers a = 3333 -> 3333 in-zone; the rest to "no zone"
    assert plan.state == "residual" and plan.local_percent == 3333 and plan.residual == (0, 8888 - 6666)
    # with no local zone set, endpoints without a zone are not "local" either
    assert plan_zones(None, {None: 8}, {None: 8}).state == "off"


def test_a_zone_without_callers_has_all_its_share_as_residual() -> None:
    plan = plan_zones("a", {"a": 2, "b": 4, "c": 4}, {"a": 5, "b": 5})
    # upstream a=2000 b=4000 c=4000; callers a=5000 b=5000 -> 40 % in-zone, all residual in c
    assert plan.local_percent == 4000 and plan.residual == (0, 0, 4000)


# --- failover priority loads --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("healthy", "total", "loads"),
    [
        ([4, 8], [4, 8], (100, 0)),  # healthy: all in P0
        ([3, 8], [4, 8], (100, 0)),  # 75 % x 1.4 = 105 -> capped at 100
        ([2, 8], [4, 8], (70, 30)),  # 50 % x 1.4 = 70
        ([1, 8], [4, 8], (35, 65)),  # 25 % x 1.4 = 35
        ([0, 8], [4, 8], (0, 100)),
        ([1, 1, 8], [4, 4, 8], (35, 35, 30)),  # ordered failover: P1 before P2
        ([1, 1], [4, 4], (50, 50)),  # total health 70 < 100: normalized, 35/70 each
        ([0, 0], [4, 12], (25, 75)),  # total panic: by endpoint count, as recalculateLoadInTotalPanic
    ],
)
def test_priority_loads_follow_envoys_overprovisioning(healthy: list[int], total: list[int], loads: tuple) -> None:
    assert priority_loads(healthy, total) == loads
    assert sum(loads) == 100


def test_failover_tiers_local_then_order_then_rest() -> None:
    zones = {"a", "b", "c", "d", None}
    assert failover_tiers("a", zones) == (("a",), ("b", "c", "d", None))
    assert failover_tiers("a", zones, ["c", "x", "b"]) == (("a",), ("c",), ("b",), ("d", None))
    assert failover_tiers("z", {"b"}) == (("b",),)


# --- pickers over real EndpointStats -----------------------------------------------------------------------------


def cluster(spec: dict[str | None, int]) -> list[EndpointStats]:
    stats: list[EndpointStats] = []
    for n, (zone, count) in enumerate(spec.items()):
        stats.extend(EndpointStats(Endpoint(f"10.{n}.0.{i}", 80, zone=zone)) for i in range(count))
    return stats


def p2c(seed: int = 0) -> P2CPeakEwma:
    return P2CPeakEwma(rng=random.Random(seed), clock=lambda: 1000.0)


def zone_counts(picker: Picker, n: int, **kwargs: object) -> Counter[str | None]:
    counts: Counter[str | None] = Counter()
    for _ in range(n):
        chosen = picker.pick(**kwargs)  # type: ignore[arg-type]
        assert chosen is not None
        counts[chosen.endpoint.zone] += 1
    return counts


def addresses(stats: Sequence[EndpointStats]) -> frozenset[tuple[str, int]]:
    return frozenset((s.endpoint.host, s.endpoint.port) for s in stats)


class Excluding:
    def __init__(self, stats: Sequence[EndpointStats]) -> None:
        self.endpoints = {s.endpoint for s in stats}

    def __contains__(self, endpoint: object) -> bool:
        return endpoint in self.endpoints


def test_picker_keeps_everything_in_zone_while_it_is_healthy() -> None:
    stats = cluster({"a": 4, "b": 4, "c": 4})
    picker = ZoneAwarePicker(stats, p2c().build, local_zone="a", rng=random.Random(1))
    assert zone_counts(picker, 2000) == {"a": 2000}


def test_picker_with_three_of_four_local_endpoints_ejected() -> None:
    stats = cluster({"a": 4, "b": 4, "c": 4})
    picker = ZoneAwarePicker(stats, p2c().build, local_zone="a", rng=random.Random(2))
    ejected = stats[1:4]
    counts = zone_counts(picker, 30_000, exclude=Excluding(ejected), unhealthy=addresses(ejected))
    assert counts["a"] / 30_000 == pytest.approx(1 / 3, abs=0.01)  # Envoy: (1/9) / (4/12)
    assert counts["b"] == pytest.approx(counts["c"], rel=0.05)
    assert picker.plan(addresses(ejected)).local_percent == 3333


def test_picker_spills_at_once_when_the_local_zone_is_empty() -> None:
    stats = cluster({"a": 4, "b": 4, "c": 4})
    picker = ZoneAwarePicker(stats, p2c().build, local_zone="a", rng=random.Random(3))
    local = stats[:4]
    counts = zone_counts(picker, 1000, exclude=Excluding(local), unhealthy=addresses(local))
    assert counts["a"] == 0 and counts["b"] + counts["c"] == 1000 and min(counts["b"], counts["c"]) > 400


def test_picker_falls_back_when_the_chosen_zone_is_all_excluded_by_the_call() -> None:
    # Healthy everywhere (plan: all in zone a), but this call has tried every zone-a endpoint (retries).
    stats = cluster({"a": 4, "b": 4, "c": 4})
    picker = ZoneAwarePicker(stats, RoundRobin(rng=random.Random(0)).build, local_zone="a", rng=random.Random(4))
    counts = zone_counts(picker, 600, exclude=Excluding(stats[:4]))
    assert counts["a"] == 0 and counts["b"] + counts["c"] == 600
    assert picker.pick(exclude=Excluding(stats)) is None


def test_picker_yields_to_panic_and_to_small_clusters() -> None:
    stats = cluster({"a": 4, "b": 4, "c": 4})
    picker = ZoneAwarePicker(stats, p2c().build, local_zone="a", rng=random.Random(5))
    counts = zone_counts(picker, 3000, panic=True)
    assert all(counts[z] > 800 for z in "abc")
    small = cluster({"a": 2, "b": 3})
    picker = ZoneAwarePicker(small, p2c().build, local_zone="a", rng=random.Random(5))
    assert picker.plan().state == "off"
    assert zone_counts(picker, 1000)["b"] > 400
    picker = ZoneAwarePicker(small, p2c().build, local_zone="a", rng=random.Random(5), min_cluster_size=5)
    assert zone_counts(picker, 500) == {"a": 500}


def test_picker_default_callers_are_the_total_endpoints_per_zone() -> None:
    stats = cluster({"a": 2, "b": 6})
    picker = ZoneAwarePicker(stats, p2c().build, local_zone="a", rng=random.Random(6))
    assert picker.callers == {"a": 2, "b": 6}
    assert picker.plan().state == "direct"
    explicit = ZoneAwarePicker(stats, p2c().build, local_zone="a", rng=random.Random(6), callers={"a": 1, "b": 1})
    # upstream a = 2500, callers a = 5000 -> half in-zone
    assert explicit.plan().local_percent == 5000
    assert zone_counts(explicit, 20_000)["a"] / 20_000 == pytest.approx(0.5, abs=0.015)


def test_picker_never_treats_no_zone_endpoints_as_local() -> None:
    stats = cluster({None: 6, "a": 6})
    picker = ZoneAwarePicker(stats, p2c().build, local_zone="a", rng=random.Random(8))
    assert zone_counts(picker, 1000) == {"a": 1000}
    unset = ZoneAwarePicker(stats, p2c().build, local_zone=None, rng=random.Random(8))
    counts = zone_counts(unset, 2000)
    assert counts[None] > 800 and counts["a"] > 800


def test_picker_replans_when_health_changes_and_caches_otherwise() -> None:
    stats = cluster({"a": 4, "b": 4, "c": 4})
    picker = ZoneAwarePicker(stats, p2c().build, local_zone="a", rng=random.Random(9))
    ejected = addresses(stats[1:4])
    first = picker.plan(ejected)
    assert picker.plan(frozenset(ejected)) is first  # an equal set: the cached plan
    assert picker.plan().state == "direct"  # health back: replanned


def test_failover_picker_keeps_local_then_spills_by_priority_load() -> None:
    stats = cluster({"a": 4, "b": 4, "c": 4})
    picker = FailoverPicker(stats, p2c().build, local_zone="a", rng=random.Random(10), order=["c"])
    assert picker.tiers == (("a",), ("c",), ("b",))
    assert zone_counts(picker, 1000) == {"a": 1000}
    # 2 of 4 in a healthy: 70 % a, 30 % c, nothing to b
    ejected = stats[2:4]
    counts = zone_counts(picker, 20_000, exclude=Excluding(ejected), unhealthy=addresses(ejected))
    assert counts["a"] / 20_000 == pytest.approx(0.70, abs=0.015)
    assert counts["b"] == 0
    assert picker.plan(addresses(ejected)).loads == (70, 30, 0)


def test_failover_picker_passes_to_the_next_level_when_one_is_all_excluded() -> None:
    stats = cluster({"a": 4, "b": 4, "c": 4})
    picker = FailoverPicker(stats, p2c().build, local_zone="a", rng=random.Random(11), order=["c"])
    counts = zone_counts(picker, 500, exclude=Excluding(stats[:4]))  # tried (not unhealthy): plan stays 100/0/0
    assert counts == {"c": 500}
    counts = zone_counts(picker, 500, panic=True)
    assert all(counts[z] > 100 for z in "abc")


def test_static_zones_drive_the_picker() -> None:
    from meshlib.discovery import Target
    from meshlib.discovery.static import FORM, parse_static

    rest = ",".join(f"10.0.0.{i}:80;zone={'ab'[i % 2]}" for i in range(8)) + ",10.0.1.1:80"
    target = Target("payments", f"static://{rest}", "static", rest, "MESHLIB_SERVICE_PAYMENTS", FORM)
    stats = [EndpointStats(e) for e in parse_static(target)]
    picker = ZoneAwarePicker(stats, p2c().build, local_zone="b", rng=random.Random(12))
    assert picker.plan().zones == ("b", "a", None)
    assert zone_counts(picker, 500) == {"b": 500}
