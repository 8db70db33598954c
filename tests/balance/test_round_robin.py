"""Weighted round robin: exact shares over one cycle, interleaving, exclusion and threads."""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from collections.abc import Sequence
from itertools import groupby

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.balance.base import EndpointStats
from meshlib.balance.round_robin import MAX_SCHEDULE, RoundRobin, RoundRobinPicker, smooth_schedule
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library


def endpoints(weights: Sequence[int]) -> list[EndpointStats]:
    return [EndpointStats(Endpoint(f"10.0.1.{i}", 80, weight=w), clock=lambda: 0.0) for i, w in enumerate(weights)]


def build(weights: Sequence[int], seed: int = 0) -> tuple[list[EndpointStats], RoundRobinPicker]:
    stats = endpoints(weights)
    picker = RoundRobin(rng=random.Random(seed)).build(stats)
    assert isinstance(picker, RoundRobinPicker)
    return stats, picker


@settings(max_examples=100, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=10),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_one_cycle_is_exactly_proportional(weights: list[int], seed: int) -> None:
    stats, picker = build(weights, seed)
    effective = [max(w, 1) for w in weights]
    g = math.gcd(*effective)
    cycle = sum(effective) // g
    assert len(picker.schedule) == cycle
    # Any window of one cycle, wherever the random start put the picker, has each endpoint w/g times.
    for _ in range(3):
        counts = Counter(picker.pick() for _ in range(cycle))
        assert [counts[s] for s in stats] == [w // g for w in effective]


def test_schedule_is_interleaved() -> None:
    assert smooth_schedule([5, 1, 1]) == [0, 0, 0, 1, 2, 0, 0]
    assert smooth_schedule([2, 2, 2]) == [0, 1, 2]  # reduced by the gcd
    order = smooth_schedule([3, 3, 1])
    assert max(len(list(run)) for _, run in groupby(order)) == 1


def test_schedule_runs_are_short_for_skewed_weights() -> None:
    order = smooth_schedule([9, 1])
    longest = max(len(list(run)) for _, run in groupby(order + order))  # across the cycle's wrap too
    assert longest <= 9
    assert Counter(order) == {0: 9, 1: 1}


def test_long_schedules_are_capped_and_keep_every_endpoint() -> None:
    weights = [65_535, 1, 40_000, 7]
    order = smooth_schedule(weights)
    assert len(order) <= MAX_SCHEDULE + len(weights)
    counts = Counter(order)
    assert set(counts) == {0, 1, 2, 3}
    assert abs(counts[0] / counts[2] - 65_535 / 40_000) < 0.01


def test_schedule_for_many_equal_endpoints_is_just_the_list() -> None:
    assert smooth_schedule([1] * 20_000) == list(range(20_000))


def test_excluded_endpoint_does_not_double_its_neighbour() -> None:
    """Skipped turns are consumed, so survivors keep their relative shares instead of inheriting turns."""
    stats, picker = build([2, 1, 1], seed=4)
    exclude = {stats[1].endpoint}
    counts = Counter(picker.pick(exclude=exclude) for _ in range(3000))
    assert counts[stats[1]] == 0
    assert abs(counts[stats[0]] - 2000) <= 2
    assert abs(counts[stats[2]] - 1000) <= 2


def test_random_start_differs_between_pickers() -> None:
    firsts = {build([1] * 10, seed=seed)[1].pick() for seed in range(40)}
    assert len(firsts) > 3


def test_threads_share_the_cycle_exactly() -> None:
    """``next()`` on the shared counter is atomic, so concurrent picks still split cycles exactly."""
    stats, picker = build([3, 1, 2])
    per_thread, threads = 600, 16  # 9600 picks = 1600 cycles of 6
    results: list[Counter[EndpointStats | None]] = []
    barrier = threading.Barrier(threads)

    def worker() -> None:
        barrier.wait()
        results.append(Counter(picker.pick() for _ in range(per_thread)))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    total = sum(results, Counter())
    assert [total[s] for s in stats] == [4800, 1600, 3200]
