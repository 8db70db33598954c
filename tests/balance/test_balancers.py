"""Properties every balancer shares: never an excluded endpoint, ``None`` only when all are, weights honoured."""

from __future__ import annotations

import math
import random
import threading
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.balance import BALANCERS, make_balancer
from meshlib.balance.base import EndpointStats
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library

NAMES = sorted(BALANCERS)


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def endpoints(weights: Sequence[int], clock: FakeClock) -> list[EndpointStats]:
    return [EndpointStats(Endpoint(f"10.0.0.{i}", 8080, weight=w), clock=clock) for i, w in enumerate(weights)]


def chi_square(counts: Sequence[int], expected: Sequence[float]) -> float:
    return sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))


def chi_square_bound(categories: int) -> float:
    """Generous: about mean + 6 standard deviations of the chi-square law, far past p = 0.001."""
    df = categories - 1
    return df + 6 * math.sqrt(2 * df) + 10


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=12),
    excluded=st.sets(st.integers(min_value=0, max_value=11)),
    seed=st.integers(min_value=0, max_value=2**32),
    keys=st.lists(st.one_of(st.none(), st.binary(max_size=16)), min_size=1, max_size=30),
)
def test_never_picks_excluded_and_none_only_when_all_excluded(
    name: str, weights: list[int], excluded: set[int], seed: int, keys: list[bytes | None]
) -> None:
    clock = FakeClock()
    stats = endpoints(weights, clock)
    picker = make_balancer(name, clock=clock, rng=random.Random(seed)).build(stats)
    exclude = {stats[i].endpoint for i in excluded if i < len(stats)}
    allowed = [s for s in stats if s.endpoint not in exclude]
    for key in keys:
        chosen = picker.pick(key=key, exclude=exclude)
        if allowed:
            assert chosen is not None
            assert chosen in allowed
        else:
            assert chosen is None


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("container", [set, frozenset, tuple, list, dict.fromkeys])
def test_any_container_works_as_exclude(name: str, container: type) -> None:
    clock = FakeClock()
    stats = endpoints([1, 2, 3], clock)
    picker = make_balancer(name, clock=clock, rng=random.Random(3)).build(stats)
    exclude = container([stats[0].endpoint, stats[2].endpoint])
    for i in range(200):
        assert picker.pick(key=str(i).encode(), exclude=exclude) is stats[1]
    assert picker.pick(key=b"k", exclude=container(s.endpoint for s in stats)) is None


@pytest.mark.parametrize("name", NAMES)
def test_single_endpoint(name: str) -> None:
    clock = FakeClock()
    [only] = stats = endpoints([3], clock)
    picker = make_balancer(name, clock=clock, rng=random.Random(1)).build(stats)
    assert picker.pick() is only
    assert picker.pick(key=b"x") is only
    assert picker.pick(exclude={Endpoint("10.0.0.9", 1)}) is only
    assert picker.pick(key=b"x", exclude={only.endpoint}) is None


@pytest.mark.parametrize("name", NAMES)
def test_excluding_almost_everything_still_finds_the_survivor(name: str) -> None:
    """Random sampling keeps hitting excluded endpoints: the linear fallback must find the one left."""
    clock = FakeClock()
    stats = endpoints([1] * 500 + [1000], clock)
    picker = make_balancer(name, clock=clock, rng=random.Random(5)).build(stats)
    survivor = stats[123]
    exclude = {s.endpoint for s in stats if s is not survivor}
    for i in range(50):
        assert picker.pick(key=str(i).encode(), exclude=exclude) is survivor


@pytest.mark.parametrize("name", ["random", "least_request", "ring_hash", "round_robin"])
def test_weights_honoured_when_idle(name: str) -> None:
    """Weighted random draws, least_request's ties, the ring's points and the schedule all follow weight."""
    clock = FakeClock()
    weights = [1, 2, 3, 4, 0]  # weight 0 counts as 1 (RFC 2782: a small chance, not none)
    stats = endpoints(weights, clock)
    picker = make_balancer(name, clock=clock, rng=random.Random(11)).build(stats)
    n = 50_000
    key = (lambda i: str(i).encode()) if name == "ring_hash" else (lambda i: None)
    counts = Counter(picker.pick(key=key(i)) for i in range(n))
    effective = [max(w, 1) for w in weights]
    expected = [n * w / sum(effective) for w in effective]
    observed = [counts[s] for s in stats]
    if name == "ring_hash":
        # The ring's arcs are not exactly proportional to points; allow a few percent each way.
        for o, e in zip(observed, expected, strict=True):
            assert abs(o - e) / e < 0.12
    else:
        assert chi_square(observed, expected) < chi_square_bound(len(weights))


@pytest.mark.parametrize("name", NAMES)
def test_weights_honoured_among_survivors(name: str) -> None:
    clock = FakeClock()
    stats = endpoints([1, 2, 3, 4], clock)
    picker = make_balancer(name, clock=clock, rng=random.Random(13)).build(stats)
    exclude = {stats[3].endpoint}
    n = 30_000
    counts = Counter(picker.pick(exclude=exclude) for _ in range(n))
    assert counts[stats[3]] == 0
    if name == "p2c_ewma":
        # Idle loads differ only by weight, so the heavier of two candidates always wins.
        assert counts[stats[2]] > counts[stats[1]] > counts[stats[0]]
    else:
        expected = [n * w / 6 for w in (1, 2, 3)]
        assert chi_square([counts[s] for s in stats[:3]], expected) < chi_square_bound(3)


@pytest.mark.parametrize("name", NAMES)
def test_equal_weights_spread_evenly(name: str) -> None:
    clock = FakeClock()
    stats = endpoints([5] * 8, clock)
    picker = make_balancer(name, clock=clock, rng=random.Random(17)).build(stats)
    n = 40_000
    counts = Counter(picker.pick(key=None) for _ in range(n))
    assert chi_square([counts[s] for s in stats], [n / 8] * 8) < chi_square_bound(8)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_picks(name: str) -> None:
    """Randomness comes only from the injected RNG, so tests and simulations are reproducible."""

    def run() -> list[str | None]:
        clock = FakeClock()
        stats = endpoints([1, 3, 2, 5], clock)
        picker = make_balancer(name, clock=clock, rng=random.Random(99)).build(stats)
        picks = (picker.pick(exclude={stats[1].endpoint}) for _ in range(200))
        return [p.endpoint.host if p else None for p in picks]

    assert run() == run()


@pytest.mark.parametrize("name", NAMES)
def test_empty_set_picks_nothing(name: str) -> None:
    picker = make_balancer(name, rng=random.Random(0)).build([])
    assert picker.pick() is None
    assert picker.pick(key=b"k") is None


@pytest.mark.parametrize("name", NAMES)
def test_concurrent_picks(name: str) -> None:
    """Pickers are shared by every request thread and take no lock."""
    clock = FakeClock()
    stats = endpoints([1, 2, 3, 1, 5, 2, 1, 1], clock)
    picker = make_balancer(name, clock=clock, rng=random.Random(21)).build(stats)
    exclude = {stats[0].endpoint, stats[4].endpoint}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(seed: int) -> None:
        barrier.wait()
        try:
            for i in range(2000):
                chosen = picker.pick(key=f"{seed}-{i}".encode(), exclude=exclude)
                assert chosen is not None
                assert chosen.endpoint not in exclude
                chosen.begin()
                chosen.end(0.01, clock())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert errors == []
    assert all(s.inflight == 0 for s in stats)
