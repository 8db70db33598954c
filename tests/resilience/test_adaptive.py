"""The adaptive concurrency limit (Gradient2) against a simulated service, with injected time and latency.

The simulated service has ``capacity`` workers: a request that arrives with ``n`` requests on the service
(itself included) takes ``base * max(1, n / capacity)`` -- flat up to the capacity, then growing with the
queue, as a service's latency does. ``clients`` callers keep calling it (a closed loop offering more
concurrency than the service has); a refused caller tries again half of ``base`` later. The limit oscillates
(Gradient2 probes up by its queue size and backs off when latency rises), so the checks read its range
over the last part of a run, not one value. Time is a number
the simulation advances: nothing sleeps and nothing depends on the machine's speed.
"""

from __future__ import annotations

import heapq
import itertools
import threading

import pytest

from meshlib.resilience.adaptive import AdaptiveConcurrencyLimit, AdaptiveSettings, default_queue_size
from meshlib.resilience.limit import ConcurrencyLimit

pytestmark = pytest.mark.one_library

BASE = 0.010  # seconds: the service's latency below its capacity


class Simulation:
    """A closed loop of ``clients`` callers, one :class:`AdaptiveConcurrencyLimit`, one service."""

    def __init__(self, limit: AdaptiveConcurrencyLimit, *, clients: int, capacity: int) -> None:
        self.limit = limit
        self.capacity = capacity
        self.now = 0.0
        self.on_service = 0
        self.completed = 0
        self.latencies: list[float] = []
        self.limits: list[int] = []  # the limit after each completion of the last run
        self._seq = itertools.count()
        self._events: list[tuple[float, int, float | None]] = []  # (time, tiebreak, latency or None: a retry)
        for _ in range(clients):
            self._push(0.0, None)

    def clock(self) -> float:
        return self.now

    def _push(self, when: float, latency: float | None) -> None:
        heapq.heappush(self._events, (when, next(self._seq), latency))

    def _call(self) -> None:
        if not self.limit.try_acquire():
            self._push(self.now + BASE / 2, None)
            return
        self.on_service += 1
        latency = BASE * max(1.0, self.on_service / self.capacity)
        self._push(self.now + latency, latency)

    def run(self, completions: int) -> None:
        """Advance until ``completions`` more requests have completed."""
        target = self.completed + completions
        self.latencies = []
        self.limits = []
        while self.completed < target:
            self.now, _, latency = heapq.heappop(self._events)
            if latency is not None:
                self.on_service -= 1
                self.completed += 1
                self.latencies.append(latency)
                self.limit.release(latency)
                self.limits.append(self.limit.max_inflight)
            self._call()


def simulate(settings: AdaptiveSettings | None = None, *, clients: int = 120, capacity: int = 50) -> Simulation:
    box: list[Simulation] = []
    limit = AdaptiveConcurrencyLimit(settings, clock=lambda: box[0].now)
    sim = Simulation(limit, clients=clients, capacity=capacity)
    box.append(sim)
    return sim


def test_the_limit_rises_to_the_capacity_where_latency_starts_growing_and_no_further() -> None:
    sim = simulate()
    assert sim.limit.max_inflight == 20  # Gradient2's initial limit, below the capacity of 50
    sim.run(20_000)
    # Up to the capacity (where latency starts growing) plus a little queueing headroom, not to max_limit.
    assert min(sim.limits[-2000:]) >= 50 and max(sim.limits[-2000:]) <= 70, sim.limit.status()
    assert max(sim.latencies[-2000:]) <= 1.5 * BASE  # what callers get: at most 50 % over the unloaded latency
    assert sim.limit.rejected > 0  # 120 callers, about 58 slots: the rest were refused at once


def test_sustained_overload_does_not_drift_up_to_the_maximum() -> None:
    """Gradient2's baseline would learn the queueing the limit allows and the limit would creep up."""
    sim = simulate()
    sim.run(100_000)
    status = sim.limit.status()
    assert max(sim.limits[-20_000:]) <= 70, status
    assert status.frozen_samples > 0
    assert status.long_rtt_ms is not None and status.long_rtt_ms <= 1.1 * BASE * 1000


def test_the_limit_falls_when_latency_rises_never_below_the_minimum_and_recovers() -> None:
    sim = simulate(AdaptiveSettings(min_limit=10))
    sim.run(20_000)
    assert min(sim.limits[-2000:]) >= 50

    sim.capacity = 15  # the service degrades: latency now grows past 15 in flight
    sim.run(20_000)
    assert min(sim.limits[-2000:]) >= 15 and max(sim.limits[-2000:]) <= 25, sim.limit.status()
    assert max(sim.latencies[-2000:]) <= 2 * BASE

    sim.capacity = 1  # nearly dead: every request beyond the first queues
    sim.run(3_000)
    assert min(sim.limits) == 10  # down to the floor, never below it

    sim.capacity = 50  # healthy again
    sim.run(20_000)
    assert min(sim.limits[-2000:]) >= 45, sim.limit.status()


def test_a_service_that_got_slower_for_good_is_relearned() -> None:
    """A permanent latency change (a slower release) must not hold the limit at its floor forever."""
    global BASE
    old = BASE
    sim = simulate()
    sim.run(20_000)
    try:
        BASE = old * 3  # every request now takes three times as long, at any concurrency
        sim.run(40_000)
    finally:
        BASE = old
    status = sim.limit.status()
    assert status.relearns >= 1
    assert min(sim.limits[-2000:]) >= 45, status
    assert status.long_rtt_ms is not None and status.long_rtt_ms >= 2.5 * old * 1000


def test_an_app_limited_caller_does_not_grow_the_limit() -> None:
    """Five callers never use half of 20 slots: nothing to learn about the service's capacity."""
    sim = simulate(clients=5)
    sim.run(5_000)
    assert sim.limit.max_inflight == 20
    assert sim.limit.rejected == 0


def test_refusals_are_immediate_counted_and_in_the_status() -> None:
    now = [100.0]
    limit = AdaptiveConcurrencyLimit(AdaptiveSettings(initial_limit=2, min_limit=2, max_limit=2), clock=lambda: now[0])
    assert limit.try_acquire() and limit.try_acquire()
    assert not limit.try_acquire()
    assert not limit.try_acquire()
    limit.release(0.010)
    now[0] += 1.5
    status = limit.status()
    assert (status.limit, status.inflight, status.peak, status.rejected) == (2, 1, 2, 2)
    assert status.samples == 1 and status.windows == 0  # a window needs 10 samples and 100 ms
    assert status.last_sample_age_s == 1.5
    assert limit.try_acquire()  # the released slot is free again


def test_a_release_without_a_sample_teaches_nothing_and_bad_samples_are_ignored() -> None:
    limit = AdaptiveConcurrencyLimit()
    for rtt in (None, 0.0, -1.0, float("nan"), float("inf")):
        assert limit.try_acquire()
        limit.release(rtt)
    status = limit.status()
    assert (status.samples, status.short_rtt_ms, status.long_rtt_ms, status.inflight) == (0, None, None, 0)
    with pytest.raises(RuntimeError, match="release"):
        limit.release()


def test_observe_feeds_a_sample_while_the_permit_is_held() -> None:
    limit = AdaptiveConcurrencyLimit()
    assert limit.try_acquire()
    limit.observe(0.02)
    assert limit.status().samples == 1 and limit.inflight == 1
    limit.release()
    assert limit.status().samples == 1 and limit.inflight == 0


def test_concurrent_acquire_and_release_keep_the_inflight_count_exact() -> None:
    limit = AdaptiveConcurrencyLimit(AdaptiveSettings(initial_limit=40, min_limit=40, max_limit=40))
    threads, rounds, hold = 8, 2_000, 4
    held_all = threading.Barrier(threads + 1)
    go_on = threading.Event()
    admitted = [0] * threads
    refused = [0] * threads

    def worker(index: int) -> None:
        for i in range(rounds):  # churn: acquire and release as fast as possible, with samples
            if limit.try_acquire():
                admitted[index] += 1
                limit.release(0.001 * (1 + i % 3))
            else:
                refused[index] += 1
        for _ in range(hold):  # then hold a few, so the count can be checked at rest
            assert limit.try_acquire()
        held_all.wait(timeout=30)
        go_on.wait(timeout=30)
        for _ in range(hold):
            limit.release(0.001)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    held_all.wait(timeout=30)
    assert limit.inflight == threads * hold
    go_on.set()
    for thread in workers:
        thread.join(timeout=30)
    assert limit.inflight == 0
    assert limit.peak <= 40
    assert limit.rejected == sum(refused)
    assert limit.status().samples == sum(admitted) + threads * hold


def test_fixed_and_adaptive_limits_release_the_same_way() -> None:
    for limit in (ConcurrencyLimit(1), AdaptiveConcurrencyLimit()):
        assert limit.try_acquire()
        limit.release(0.01)
        assert limit.inflight == 0 and limit.max_inflight >= 1


def test_the_default_queue_size_is_gradient2s_4_then_envoys_sqrt() -> None:
    assert default_queue_size(4) == 4.0
    assert default_queue_size(100) == 10.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_limit": 0}, "min_limit must be >= 1, not 0"),
        ({"min_limit": 10, "max_limit": 5, "initial_limit": 5}, r"max_limit must be >= min_limit \(10\), not 5"),
        ({"initial_limit": 2000}, "initial_limit must be between min_limit"),
        ({"smoothing": 0.0}, r"smoothing must be in \(0, 1\], not 0.0"),
        ({"long_window": 0}, "long_window must be >= 1"),
        ({"warmup": 0}, "warmup must be >= 1"),
        ({"min_gradient": 1.5}, "min_gradient must be in"),
        ({"relearn_after": 0}, "relearn_after must be >= 1"),
        ({"min_window": 2.0}, r"min_window must be > 0 and <= max_window \(1.0\), not 2.0"),
        ({"window_samples": 0}, "window_samples must be >= 1"),
    ],
)
def test_bad_settings_name_the_setting_and_the_value(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveSettings(**kwargs)  # type: ignore[arg-type]
