"""P2C peak EWMA: slow and busy endpoints lose traffic, idle time forgives, weights hold under load."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from meshlib.balance.base import EndpointStats, Picker
from meshlib.balance.p2c import P2CPeakEwma
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def endpoints(weights: Sequence[int], clock: FakeClock) -> list[EndpointStats]:
    return [EndpointStats(Endpoint(f"10.0.3.{i}", 80, weight=w), clock=clock) for i, w in enumerate(weights)]


def build(stats: Sequence[EndpointStats], clock: FakeClock, seed: int = 0) -> Picker:
    return P2CPeakEwma(clock=clock, rng=random.Random(seed)).build(stats)


def simulate(
    picker: Picker,
    clock: FakeClock,
    rtt: dict[EndpointStats, float],
    *,
    requests: int,
    concurrency: int,
    seed: int = 0,
    step: float = 0.001,
) -> Counter[EndpointStats]:
    """Closed loop: keep ``concurrency`` requests in flight; a random one finishes per new request."""
    rng = random.Random(seed)
    inflight: list[EndpointStats] = []
    counts: Counter[EndpointStats] = Counter()
    for _ in range(requests):
        chosen = picker.pick()
        assert chosen is not None
        chosen.begin()
        inflight.append(chosen)
        counts[chosen] += 1
        if len(inflight) >= concurrency:
            k = rng.randrange(len(inflight))
            inflight[k], inflight[-1] = inflight[-1], inflight[k]
            done = inflight.pop()
            done.end(rtt[done], clock.t)
        clock.t += step
    return counts


def test_one_slow_response_drains_an_endpoint() -> None:
    clock = FakeClock()
    stats = endpoints([1, 1, 1, 1], clock)
    for s in stats:
        s.begin()
        s.end(0.010, clock.t)
    slow = stats[2]
    slow.begin()
    slow.end(2.0, clock.t)  # peak EWMA: a latency above the estimate replaces it at once
    picker = build(stats, clock)
    counts = Counter(picker.pick() for _ in range(10_000))
    assert counts[slow] == 0  # it can only win against itself, and candidates are distinct
    assert min(counts[s] for s in stats if s is not slow) > 2500


def test_slow_endpoint_gets_much_less_traffic_under_load() -> None:
    clock = FakeClock()
    stats = endpoints([1] * 5, clock)
    rtt = dict.fromkeys(stats, 0.020)
    rtt[stats[0]] = 0.500
    counts = simulate(build(stats, clock), clock, rtt, requests=30_000, concurrency=20)
    fast_mean = sum(counts[s] for s in stats[1:]) / 4
    assert counts[stats[0]] < 0.1 * fast_mean


def test_recovered_endpoint_wins_traffic_back_as_its_estimate_decays() -> None:
    clock = FakeClock()
    stats = endpoints([1] * 3, clock)
    for s in stats:
        s.begin()
        s.end(0.020, clock.t)
    stats[0].begin()
    stats[0].end(1.0, clock.t)
    rtt = dict.fromkeys(stats, 0.020)  # it is fast again, but the balancer does not know yet
    picker = build(stats, clock)
    first = simulate(picker, clock, rtt, requests=5_000, concurrency=4, step=0.001)  # 5 s
    later = simulate(picker, clock, rtt, requests=60_000, concurrency=4, step=0.001, seed=1)  # next 60 s
    assert first[stats[0]] < 50
    assert later[stats[0]] > 60_000 / 3 * 0.6


def test_busy_endpoint_is_avoided() -> None:
    clock = FakeClock()
    stats = endpoints([1] * 4, clock)
    for _ in range(10):
        stats[1].begin()
    picker = build(stats, clock)
    counts = Counter(picker.pick() for _ in range(5000))
    assert counts[stats[1]] == 0


def test_equal_load_spreads_evenly() -> None:
    clock = FakeClock()
    stats = endpoints([1] * 5, clock)
    picker = build(stats, clock, seed=2)
    counts = Counter(picker.pick() for _ in range(50_000))
    assert all(abs(counts[s] - 10_000) < 600 for s in stats)


def test_weights_hold_under_concurrency() -> None:
    """In-flight requests settle where load/weight is equal, so throughput follows weight."""
    clock = FakeClock()
    stats = endpoints([1, 2, 3, 4], clock)
    rtt = dict.fromkeys(stats, 0.030)
    counts = simulate(build(stats, clock), clock, rtt, requests=40_000, concurrency=100)
    total = sum(counts.values())
    for s, share in zip(stats, (0.1, 0.2, 0.3, 0.4), strict=True):
        assert abs(counts[s] / total - share) < 0.025


def test_two_endpoints_one_excluded() -> None:
    clock = FakeClock()
    stats = endpoints([1, 1], clock)
    stats[1].begin()
    stats[1].end(5.0, clock.t)
    picker = build(stats, clock)
    assert {picker.pick(exclude={stats[0].endpoint}) for _ in range(100)} == {stats[1]}
    assert picker.pick(exclude={stats[0].endpoint, stats[1].endpoint}) is None


def test_clock_is_read_per_pick() -> None:
    """The injected clock decides how far estimates have decayed: no hidden ``time.monotonic``."""
    clock = FakeClock()
    stats = endpoints([1, 1], clock)
    stats[0].begin()
    stats[0].end(0.300, clock.t)  # 0.3 s, stamped now
    clock.t += 30.0
    stats[1].begin()
    stats[1].end(0.050, clock.t)  # 0.05 s, stamped 30 s later
    picker = build(stats, clock)
    # Now: stats[0] decayed to 0.3 * e^-3 = 0.015 < 0.05.
    assert picker.pick() is stats[0]
    clock.t -= 29.0  # were it read 29 s earlier: 0.3 * e^-0.1 = 0.27 > 0.05
    assert picker.pick() is stats[1]


def test_instant_errors_do_not_make_an_endpoint_attractive() -> None:
    """An endpoint answering errors 10x faster than the others keeps its estimate: at most its fair share."""
    clock = FakeClock()
    stats = endpoints([1, 1, 1], clock)
    broken = stats[0]
    picker = build(stats, clock, seed=3)
    counts: Counter[EndpointStats] = Counter()
    for _ in range(600):
        chosen = picker.pick()
        assert chosen is not None
        chosen.begin()
        counts[chosen] += 1
        if chosen is broken:
            chosen.end(0.0005, clock.t, failed=False, error=True)  # an instant 404: not a failure, an error
        else:
            chosen.end(0.005, clock.t)
        clock.t += 0.002
    assert counts[broken] <= 600 // 3
    assert broken.failures == 0  # a 4xx does not count against the endpoint


def test_an_error_may_still_raise_the_estimate() -> None:
    clock = FakeClock()
    (stats,) = endpoints([1], clock)
    stats.begin()
    stats.end(0.5, clock.t, error=True)  # a slow error is slow
    assert stats.cost(clock.t) == 0.5
    clock.t += 1.0
    stats.begin()
    stats.end(0.001, clock.t, error=True)  # a fast one does not lower it, and restarts the idle decay
    assert stats.cost(clock.t) == 0.5
