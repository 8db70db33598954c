"""Slow start (meshlib.balance.slow_start): Envoy's factor, its validation, and each balancer's ramp of a newly
joined endpoint's share, measured with an injected clock and a seeded RNG (no sleeping, no wall clock)."""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from typing import Any

import pytest

from meshlib._service import Service
from meshlib.balance import make_balancer
from meshlib.balance.base import BalancerOptions, EndpointStats
from meshlib.balance.slow_start import SlowStart, slow_start_factor
from meshlib.config import MeshConfig
from meshlib.discovery.base import Endpoint, Resolution
from meshlib.discovery.cache import Snapshot
from meshlib.errors import ConfigError

pytestmark = pytest.mark.one_library

RAMPED = ["p2c_ewma", "least_request", "round_robin", "random"]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ---- the factor ------------------------------------------------------------------------------------------------


def test_factor_is_envoys_linear_ramp_with_a_floor() -> None:
    ss = SlowStart(window=100.0)
    assert slow_start_factor(ss, 50.0) == pytest.approx(0.5)
    assert slow_start_factor(ss, 90.0) == pytest.approx(0.9)
    assert slow_start_factor(ss, 5.0) == pytest.approx(0.1)  # 0.05 is below the 10 % floor
    assert slow_start_factor(ss, 0.0) == pytest.approx(0.1)
    assert slow_start_factor(ss, -3.0) == pytest.approx(0.1)  # a clock read before the join: the floor
    assert slow_start_factor(ss, 100.0) == 1.0  # the window is over
    assert slow_start_factor(ss, 1e9) == 1.0
    assert ss.factor(50.0) == slow_start_factor(ss, 50.0)


def test_factor_aggression_and_floor() -> None:
    fast = SlowStart(window=100.0, aggression=2.0, min_weight_percent=0)
    assert slow_start_factor(fast, 25.0) == pytest.approx(math.sqrt(0.25))  # (t/w)^(1/aggression)
    slow = SlowStart(window=100.0, aggression=0.5, min_weight_percent=0)
    assert slow_start_factor(slow, 50.0) == pytest.approx(0.25)
    # Without a floor, Envoy's 1 ms minimum elapsed keeps the factor above zero.
    assert slow_start_factor(SlowStart(window=10.0, aggression=0.5, min_weight_percent=0), 0.0) == pytest.approx(1e-8)
    # ...and so does an absolute floor of 1e-9 where a steep ramp would underflow.
    assert slow_start_factor(SlowStart(window=100.0, aggression=0.01, min_weight_percent=0), 1.0) == 1e-9
    assert slow_start_factor(SlowStart(window=100.0, min_weight_percent=60), 30.0) == pytest.approx(0.6)
    assert slow_start_factor(SlowStart(window=100.0, min_weight_percent=100), 1.0) == 1.0


def test_factor_is_one_when_off() -> None:
    off = SlowStart()
    assert not off.enabled
    assert slow_start_factor(off, 0.0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window": -1.0}, "window"),
        ({"window": math.inf}, "window"),
        ({"window": 1e12}, "window"),
        ({"window": True}, "window"),
        ({"aggression": 0.0}, "aggression"),
        ({"aggression": -1.0}, "aggression"),
        ({"aggression": math.nan}, "aggression"),
        ({"min_weight_percent": 101}, "min_weight_percent"),
        ({"min_weight_percent": -0.5}, "min_weight_percent"),
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        SlowStart(**kwargs)
    assert info.value.variable == f"SlowStart.{field}"


# ---- shares per balancer -----------------------------------------------------------------------------------------

WINDOW = 100.0
JOINED = 1000.0


def share_of_new(
    name: str,
    fraction: float,
    *,
    picks: int = 6000,
    concurrency: int = 20,
    seed: int = 7,
    warm_rtt: float | None = None,
    slow_start: bool = True,
) -> float:
    """The new endpoint's share of ``picks`` made ``fraction`` of the way into its window, among 4 warm ones.

    A closed loop keeps ``concurrency`` requests in flight (oldest finishes first, all answering alike), so the
    load-aware balancers see load; the clock stands still at the measured point. ``warm_rtt``: the warm
    endpoints' measured latency (else they too are at ``default_rtt``, 30 ms, like the newcomer).
    """
    clock = FakeClock(JOINED + fraction * WINDOW)
    warm = [EndpointStats(Endpoint(f"10.0.0.{i}", 80), clock=clock) for i in range(4)]
    if warm_rtt is not None:
        for s in warm:
            s.begin()
            s.end(warm_rtt, clock.t)
    new = EndpointStats(Endpoint("10.0.0.9", 80), clock=clock)
    new.joined_at = JOINED
    options = BalancerOptions(slow_start=SlowStart(window=WINDOW if slow_start else 0.0))
    picker = make_balancer(name, options, clock=clock, rng=random.Random(seed)).build([*warm, new])
    flight: deque[EndpointStats] = deque()
    counts: Counter[EndpointStats] = Counter()
    for _ in range(picks):
        if len(flight) >= concurrency:
            flight.popleft().end(0.010, clock.t)
        chosen = picker.pick()
        assert chosen is not None
        chosen.begin()
        flight.append(chosen)
        counts[chosen] += 1
    return counts[new] / picks


@pytest.mark.parametrize("name", RAMPED)
def test_new_endpoint_share_ramps_and_never_exceeds_its_steady_share(name: str) -> None:
    steady = share_of_new(name, 1.0)  # the window is over: no slow start
    assert steady == pytest.approx(0.2, abs=0.03)  # one of five alike endpoints
    ramp = [share_of_new(name, f) for f in (0.1, 0.5, 0.9)]
    assert ramp[0] < ramp[1] < ramp[2], ramp
    assert all(share <= steady + 0.01 for share in ramp), (ramp, steady)
    assert ramp[0] < steady / 2, ramp


@pytest.mark.parametrize("concurrency", [1, 100])
def test_p2c_ramp_holds_at_low_and_high_concurrency(concurrency: int) -> None:
    steady = share_of_new("p2c_ewma", 1.0, concurrency=concurrency)
    ramp = [share_of_new("p2c_ewma", f, concurrency=concurrency) for f in (0.1, 0.5, 0.9)]
    assert 0 < ramp[0] < ramp[1] < ramp[2] <= steady + 0.01, (ramp, steady)


def test_p2c_newcomer_that_looks_fast_is_held_to_its_ramp() -> None:
    # Warm peers measured at 100 ms; the newcomer is assumed to answer in default_rtt (30 ms): p2c_ewma floods it.
    flooded = share_of_new("p2c_ewma", 0.1, warm_rtt=0.1, slow_start=False)
    assert flooded > 0.3
    held = [share_of_new("p2c_ewma", f, warm_rtt=0.1) for f in (0.1, 0.5)]
    assert held[0] < 0.06 < held[1] < flooded, (held, flooded)


@pytest.mark.parametrize("name", RAMPED)
def test_share_is_that_of_weight_times_factor(name: str) -> None:
    # Envoy scales the weight: a share of f / (4 + f) among four warm endpoints of weight 1. For the P2C pickers,
    # under load, this needs the comparison scaled too (drawing less often alone would leave 20 % at f = 0.5).
    for fraction in (0.1, 0.5, 0.9):
        factor = slow_start_factor(SlowStart(window=WINDOW), fraction * WINDOW)
        assert share_of_new(name, fraction) == pytest.approx(factor / (4 + factor), abs=0.015), fraction


@pytest.mark.parametrize("name", RAMPED)
def test_endpoints_without_joined_at_are_not_slowed(name: str) -> None:
    clock = FakeClock()
    stats = [EndpointStats(Endpoint(f"10.0.0.{i}", 80), clock=clock) for i in range(5)]
    options = BalancerOptions(slow_start=SlowStart(window=WINDOW))
    picker = make_balancer(name, options, clock=clock, rng=random.Random(3)).build(stats)
    assert picker._ramp is None  # type: ignore[attr-defined]  # the plain path from the first pick
    counts = Counter(picker.pick() for _ in range(5000))
    assert min(counts[s] for s in stats) > 800


@pytest.mark.parametrize("name", RAMPED)
def test_picker_returns_to_its_plain_path_when_the_window_ends(name: str) -> None:
    clock = FakeClock(JOINED)
    stats = [EndpointStats(Endpoint(f"10.0.0.{i}", 80), clock=clock) for i in range(3)]
    stats[2].joined_at = JOINED
    options = BalancerOptions(slow_start=SlowStart(window=WINDOW))
    picker = make_balancer(name, options, clock=clock, rng=random.Random(3)).build(stats)
    assert picker._ramp is not None  # type: ignore[attr-defined]
    picker.pick()
    assert picker._ramp is not None  # type: ignore[attr-defined]
    clock.t = JOINED + WINDOW
    assert picker.pick() is not None
    assert picker._ramp is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", RAMPED)
def test_ramping_picks_honour_exclusions(name: str) -> None:
    clock = FakeClock(JOINED)
    stats = [EndpointStats(Endpoint(f"10.0.0.{i}", 80), clock=clock) for i in range(3)]
    stats[2].joined_at = JOINED
    picker = make_balancer(
        name, BalancerOptions(slow_start=SlowStart(window=WINDOW)), clock=clock, rng=random.Random(5)
    ).build(stats)
    assert {picker.pick(exclude={stats[0].endpoint, stats[1].endpoint}) for _ in range(50)} == {stats[2]}
    assert picker.pick(exclude={s.endpoint for s in stats}) is None
    assert stats[2] not in {picker.pick(exclude={stats[2].endpoint}) for _ in range(200)}


def test_ring_hash_ignores_slow_start() -> None:
    clock = FakeClock(JOINED)
    stats = [EndpointStats(Endpoint(f"10.0.0.{i}", 80), clock=clock) for i in range(3)]
    stats[2].joined_at = JOINED
    options = BalancerOptions(slow_start=SlowStart(window=WINDOW))
    ramped = make_balancer("ring_hash", options, clock=clock).build(stats)
    plain = make_balancer("ring_hash", clock=clock).build(stats)
    keys = [f"user-{i}".encode() for i in range(300)]
    assert [ramped.pick(key=k) for k in keys] == [plain.pick(key=k) for k in keys]


# ---- which endpoints enter slow start (Service) ----------------------------------------------------------------


class _Resolver:
    source = "test://"

    def resolve(self) -> Resolution:
        raise NotImplementedError

    async def aresolve(self) -> Resolution:
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_only_endpoints_joining_a_live_set_are_ramped() -> None:
    config = MeshConfig.from_env(
        {
            "MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:1",
            "MESHLIB_SERVICE_PAYMENTS__LB": "round_robin",
            "MESHLIB_SERVICE_PAYMENTS__SLOW_START_WINDOW": "1h",  # the whole test is at the 10 % floor
        }
    )
    svc = config.service("payments")
    assert svc is not None
    service: Service[Any] = Service(svc, config, _Resolver(), lambda endpoint: endpoint)
    a, b, c = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)
    service.apply(Snapshot((a, b), 0.0, 1))
    active = service.active
    assert active is not None
    assert all(s.joined_at is None for s in active.stats.values())
    first = Counter(active.pick(None, ()) for _ in range(1000))
    assert sorted(first.values()) == [500, 500]  # present at start: exact round robin, not slowed

    service.apply(Snapshot((a, b, c), 0.0, 2))
    active = service.active
    assert active is not None
    assert active.stats[("10.0.0.3", 80)].joined_at is not None
    assert active.stats[("10.0.0.1", 80)].joined_at is None
    counts = Counter(active.pick(None, ()) for _ in range(2100))
    new = counts[active.stats[("10.0.0.3", 80)]]
    assert new < 250, counts  # 0.1 / 2.1 of 2100 is 100; its steady share would be 700
    assert counts[active.stats[("10.0.0.1", 80)]] > 850
