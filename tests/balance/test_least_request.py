"""least_request: P2C on in-flight requests per weight (Envoy's LEAST_REQUEST with two choices)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from meshlib.balance.base import EndpointStats, Picker
from meshlib.balance.least_request import LeastRequest
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library


def endpoints(weights: Sequence[int]) -> list[EndpointStats]:
    return [EndpointStats(Endpoint(f"10.0.4.{i}", 80, weight=w), clock=lambda: 0.0) for i, w in enumerate(weights)]


def build(stats: Sequence[EndpointStats], seed: int = 0) -> Picker:
    return LeastRequest(rng=random.Random(seed)).build(stats)


def test_busy_endpoint_is_avoided() -> None:
    stats = endpoints([1] * 5)
    for _ in range(3):
        stats[0].begin()
    stats[1].begin()
    picker = build(stats)
    counts = Counter(picker.pick() for _ in range(10_000))
    assert counts[stats[0]] == 0
    # One in flight: it only wins when drawn with the busier one (1 pair in 10).
    assert 800 < counts[stats[1]] < 1200
    assert counts[stats[2]] > 2500


def test_in_flight_is_compared_per_weight() -> None:
    stats = endpoints([1, 4])
    for _ in range(2):
        stats[0].begin()
    for _ in range(4):
        stats[1].begin()  # 4/4 = 1 < 2/1
    picker = build(stats)
    assert all(picker.pick() is stats[1] for _ in range(100))
    stats[1].begin()
    stats[1].begin()
    stats[1].begin()
    stats[1].begin()
    stats[1].begin()  # 9/4 > 2/1
    assert all(picker.pick() is stats[0] for _ in range(100))


def test_in_flight_settles_in_proportion_to_weight() -> None:
    stats = endpoints([1, 2, 5])
    picker = build(stats, seed=3)
    rng = random.Random(4)
    inflight: list[EndpointStats] = []
    for _ in range(20_000):
        chosen = picker.pick()
        assert chosen is not None
        chosen.begin()
        inflight.append(chosen)
        if len(inflight) >= 80:
            done = inflight.pop(rng.randrange(len(inflight)))
            done.end(0.01, 0.0)
    shares = [s.inflight / len(inflight) for s in stats]
    for share, expected in zip(shares, (1 / 8, 2 / 8, 5 / 8), strict=True):
        assert abs(share - expected) < 0.06
