"""Consistent hashing: stable keys, minimal movement on membership change, clockwise failover."""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.balance.base import BalancerOptions, EndpointStats
from meshlib.balance.ring_hash import MAX_RING, RingHash, RingHashPicker, key_hash, point_hashes, ring_points
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library

KEYS = [f"user-{i}".encode() for i in range(3000)]


def endpoints(weights: Sequence[int], first: int = 0) -> list[EndpointStats]:
    return [
        EndpointStats(Endpoint(f"10.0.2.{first + i}", 8080, weight=w), clock=lambda: 0.0) for i, w in enumerate(weights)
    ]


def build(stats: Sequence[EndpointStats], seed: int = 0, ring_size: int = 1024) -> RingHashPicker:
    picker = RingHash(BalancerOptions(ring_size=ring_size), rng=random.Random(seed)).build(stats)
    assert isinstance(picker, RingHashPicker)
    return picker


def mapping(picker: RingHashPicker, keys: Sequence[bytes] = KEYS) -> dict[bytes, Endpoint]:
    result = {}
    for key in keys:
        chosen = picker.pick(key=key)
        assert chosen is not None
        result[key] = chosen.endpoint
    return result


def test_same_key_same_endpoint_across_clients() -> None:
    """Another client (other RNG, endpoints listed in another order, fresh stats) maps keys identically."""
    stats = endpoints([1, 1, 2, 1, 3])
    mine = mapping(build(stats, seed=1))
    theirs = mapping(build(list(reversed(endpoints([1, 1, 2, 1, 3]))), seed=2))
    assert mine == theirs
    assert mapping(build(stats, seed=1)) == mine
    assert len(set(mine.values())) == 5


def test_hashes_are_stable_values_not_pythons_hash() -> None:
    assert key_hash(b"user-1") == int.from_bytes(hashlib.blake2b(b"user-1", digest_size=8).digest(), "little")
    shake = hashlib.shake_256(b"10.0.0.1:80").digest(8 * 3)
    assert list(point_hashes("10.0.0.1:80", 3)) == [int.from_bytes(shake[i : i + 8], "little") for i in range(0, 24, 8)]
    assert list(point_hashes("10.0.0.1:80", 5))[:3] == list(point_hashes("10.0.0.1:80", 3))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=12),
    weight=st.integers(min_value=1, max_value=5),
    data=st.data(),
)
def test_removing_an_endpoint_moves_only_its_keys(n: int, weight: int, data: st.DataObject) -> None:
    stats = endpoints([weight] * n)
    gone = data.draw(st.integers(min_value=0, max_value=n - 1))
    before = mapping(build(stats, ring_size=64))
    after = mapping(build([s for i, s in enumerate(stats) if i != gone], ring_size=64))
    for key, endpoint in before.items():
        if endpoint != stats[gone].endpoint:
            assert after[key] == endpoint
        else:
            assert after[key] != endpoint


def test_removing_an_endpoint_with_unequal_weights_keeps_other_keys() -> None:
    stats = endpoints([2, 4, 6, 2, 4])  # gcd stays 2 without the third
    before = mapping(build(stats))
    after = mapping(build([s for s in stats if s is not stats[2]]))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved
    assert all(before[k] == stats[2].endpoint for k in moved)


def test_adding_an_endpoint_moves_only_keys_to_it_and_about_its_share() -> None:
    stats = endpoints([1] * 9)
    newcomer = endpoints([1], first=50)[0]
    before = mapping(build(stats))
    after = mapping(build([*stats, newcomer]))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == newcomer.endpoint for k in moved)
    assert 0.05 < len(moved) / len(KEYS) < 0.15  # its fair share is 1/10


def test_excluding_an_endpoint_acts_like_removing_it() -> None:
    """Failover walks clockwise, so every client sends a tried key to the same second choice."""
    stats = endpoints([1] * 6)
    picker = build(stats)
    without = mapping(build(stats[1:]))
    for key in KEYS:
        chosen = picker.pick(key=key, exclude={stats[0].endpoint})
        assert chosen is not None
        assert chosen.endpoint == without[key]


def test_excluding_all_but_one_and_all() -> None:
    stats = endpoints([1] * 20)
    picker = build(stats)
    exclude = {s.endpoint for s in stats[1:]}
    assert all(picker.pick(key=k, exclude=exclude) is stats[0] for k in KEYS[:100])
    exclude.add(stats[0].endpoint)
    assert picker.pick(key=b"x", exclude=exclude) is None


def test_key_weighting() -> None:
    stats = endpoints([1, 2, 4])
    counts = Counter(mapping(build(stats), [f"k{i}".encode() for i in range(70_000)]).values())
    for s, share in zip(stats, (1 / 7, 2 / 7, 4 / 7), strict=True):
        assert abs(counts[s.endpoint] / 70_000 - share) < 0.03


def test_no_key_is_weighted_random() -> None:
    stats = endpoints([1, 3])
    picker = build(stats, seed=3)
    counts = Counter(picker.pick() for _ in range(20_000))
    assert abs(counts[stats[1]] / 20_000 - 0.75) < 0.02


def test_ring_points() -> None:
    assert ring_points([1, 1, 1], 1024) == [1024, 1024, 1024]
    assert ring_points([10, 20], 100) == [100, 200]  # reduced by the gcd
    assert ring_points([10, 20, 0], 100) == [1000, 2000, 100]  # weight 0 counts as 1
    # Too big: points per weight unit halve until the ring fits, so growth happens in powers of two.
    big = ring_points([1] * 1000, 1024)
    assert big == [256] * 1000
    assert sum(big) <= MAX_RING
    # Even one point per unit is too many: shared out by weight, never below one point.
    huge = ring_points([1] * 100 + [MAX_RING * 4], 1024)
    assert sum(huge) <= MAX_RING + 100
    assert min(huge) == 1


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9])
def test_point_hashes_count(count: int) -> None:
    assert len(point_hashes("a:1", count)) == count


def test_ring_size_and_ipv6() -> None:
    stats = [EndpointStats(Endpoint("::1", 80)), EndpointStats(Endpoint("fe80::2", 80, weight=3))]
    picker = build(stats, ring_size=16)
    assert len(picker) == 16 + 48
    assert {picker.pick(key=k) for k in KEYS} == set(stats)
