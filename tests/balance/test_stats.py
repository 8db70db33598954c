"""EndpointStats as the pickers read it: exact counters under threads, peak EWMA with an injected clock."""

from __future__ import annotations

import math
import threading

import pytest

from meshlib.balance.base import DEFAULT_RTT, EndpointStats
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library


def test_begin_end_from_32_threads_leaves_nothing_in_flight() -> None:
    stats = EndpointStats(Endpoint("10.0.5.1", 80), clock=lambda: 0.0)
    threads, rounds = 32, 2000
    barrier = threading.Barrier(threads)
    peak = [0]

    def worker(i: int) -> None:
        barrier.wait()
        for r in range(rounds):
            stats.begin()
            peak[0] = max(peak[0], stats.inflight)
            stats.end(0.001 * (r % 7), float(r), failed=(r + i) % 10 == 0)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert stats.inflight == 0
    assert stats.requests == threads * rounds
    assert stats.failures == threads * rounds // 10
    assert 1 <= peak[0] <= threads


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    now = 100.0
    stats = EndpointStats(Endpoint("10.0.5.2", 80), clock=lambda: now)
    assert stats.cost(now) == DEFAULT_RTT
    stats.begin()
    stats.end(0.5, now)
    assert stats.cost(now) == 0.5  # a peak replaces the estimate at once
    stats.begin()
    stats.end(0.1, now + 10.0)  # lower: blended with weight e^-1 on the old value
    assert stats.cost(now + 10.0) == pytest.approx(0.5 * math.exp(-1) + 0.1 * (1 - math.exp(-1)))
    assert stats.cost(now + 20.0) == pytest.approx(stats.cost(now + 10.0) * math.exp(-1))  # idle: decays


def test_load_is_cost_times_in_flight_plus_one_over_weight() -> None:
    stats = EndpointStats(Endpoint("10.0.5.3", 80, weight=4), clock=lambda: 0.0)
    stats.begin()
    stats.begin()
    assert stats.load(0.0) == pytest.approx(DEFAULT_RTT * 3 / 4)
    assert stats.load(10.0) == pytest.approx(DEFAULT_RTT * math.exp(-1) * 3 / 4)
    stats.endpoint = Endpoint("10.0.5.3", 80, weight=0)  # weight 0 counts as 1
    assert stats.load(0.0) == pytest.approx(DEFAULT_RTT * 3)
