"""``ring_hash``: consistent hashing on a Ketama-style ring, for affinity (caches, sticky sessions).

Every endpoint owns points on a 64-bit ring, taken from the SHAKE-256 stream of its ``"host:port"`` (point
``i`` is bytes ``8i..8i+8``, little-endian; an extendable-output hash gives all of an endpoint's points in one
call, five times faster than one BLAKE2b per ``"host:port-i"``). A request's key is hashed onto the ring
with BLAKE2b and goes to the owner of the first point clockwise (Karger et al. 1997; Ketama; Envoy
``RING_HASH``). Both hashes are stable across processes and machines (never Python's salted ``hash()``),
so every client of a service sends a key to the same endpoint.

How many points: an endpoint of weight ``w`` gets ``options.ring_size * w / g`` points, ``g`` being the
gcd of the set's weights. The count depends on the endpoint's own (reduced) weight, not on how many other
endpoints there are, so when an endpoint leaves only the keys it owned move, and when one joins only the
keys it takes move (the Ketama property). Envoy instead spreads a *total* ring of at least 1024 points
over the set, so every membership change also reshuffles some keys between endpoints that stayed. With
equal weights and the default 1024 points each, an endpoint's share is within a few percent of fair.

The ring never exceeds :data:`MAX_RING` points (2^18: 3 MB, built in about 0.1 s). A larger set halves the
points per weight unit as often as needed, so keys between surviving endpoints only move when the set
crosses a power of two; if even one point per weight unit is too many, points are shared out in proportion
to weight and stability becomes approximate, as with Envoy's.

A key whose owner is excluded (already tried, ejected, breaker open) walks clockwise to the next point of
an endpoint that is not, so every client fails over the same key to the same second choice. Without a key,
the pick is weighted random.
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
from array import array
from bisect import bisect_left
from collections.abc import Container, Sequence

from meshlib.balance.base import Balancer, EndpointStats, Picker
from meshlib.balance.random import WeightedSampler
from meshlib.discovery.base import Endpoint

__all__ = ["MAX_RING", "RingHash", "RingHashPicker", "key_hash", "point_hashes", "ring_points"]

#: Most points a ring holds (two arrays: 8-byte hash, 4-byte owner, per point).
MAX_RING = 1 << 18

_BIG_ENDIAN = sys.byteorder == "big"
_RANK_BITS = 32


def key_hash(key: bytes) -> int:
    """Where ``key`` lands on the ring: the first 64 bits of its BLAKE2b digest, little-endian."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def point_hashes(address: str, count: int) -> array[int]:
    """The first ``count`` ring points of the endpoint at ``address`` (``host:port``).

    The SHAKE-256 output of ``address`` read as little-endian 64-bit words, so the points for a smaller
    count are a prefix of those for a larger one.
    """
    points = array("Q")
    points.frombytes(hashlib.shake_256(address.encode()).digest(8 * count))
    if _BIG_ENDIAN:
        points.byteswap()
    return points


def ring_points(weights: Sequence[int], ring_size: int, max_ring: int = MAX_RING) -> list[int]:
    """How many ring points each endpoint gets: ``ring_size * w / gcd``, halved until the ring fits.

    Past ``max_ring`` points even at one point per weight unit, counts become ``max_ring * w / sum(w)``.
    """
    if not weights:
        return []
    ws = [max(w, 1) for w in weights]
    g = math.gcd(*ws)
    units = [w // g for w in ws]
    unit_total = sum(units)
    per = max(ring_size, 1)
    while per > 1 and per * unit_total > max_ring:
        per //= 2
    if per * unit_total <= max_ring:
        return [per * u for u in units]
    return [max(1, (max_ring * u) // unit_total) for u in units]


class RingHashPicker(Picker):
    """A sorted ring of 64-bit points with their owners; a pick is one hash and one ``bisect``."""

    __slots__ = ("_hashes", "_owners", "_sampler", "_size", "_stats")

    def __init__(self, endpoints: Sequence[EndpointStats], ring_size: int, rng: random.Random) -> None:
        self._sampler = WeightedSampler(endpoints, rng)
        stats = self._sampler.stats
        self._stats = stats
        addresses = [s.endpoint.address for s in stats]
        # Ties between equal points (vanishingly rare with 64 bits) break on the address, never on the order
        # discovery listed the endpoints in, so all clients build the same ring.
        by_address = sorted(range(len(stats)), key=addresses.__getitem__)
        counts = ring_points(self._sampler.weights, ring_size)
        packed: list[int] = []
        for rank, index in enumerate(by_address):
            packed.extend((h << _RANK_BITS) | rank for h in point_hashes(addresses[index], counts[index]))
        packed.sort()
        mask = (1 << _RANK_BITS) - 1
        self._hashes = array("Q", [p >> _RANK_BITS for p in packed])
        self._owners = array("I", [by_address[p & mask] for p in packed])
        self._size = len(packed)

    def __len__(self) -> int:
        """Number of points on the ring."""
        return self._size

    def pick(self, *, key: bytes | None = None, exclude: Container[Endpoint] = ()) -> EndpointStats | None:
        """The owner of the first point clockwise of ``key``'s hash that is not excluded.

        With ``key=None``, a weighted random endpoint not in ``exclude``. ``None`` if all are excluded.
        """
        if key is None or self._size == 0:
            i = self._sampler.sample(exclude)
            return None if i < 0 else self._stats[i]
        pos = bisect_left(self._hashes, key_hash(key))
        if pos == self._size:
            pos = 0
        chosen = self._stats[self._owners[pos]]
        if not exclude or chosen.endpoint not in exclude:
            return chosen
        return self._walk(pos, exclude)

    def _walk(self, pos: int, exclude: Container[Endpoint]) -> EndpointStats | None:
        """Clockwise from ``pos`` to the first point of an endpoint not excluded; checks each endpoint once."""
        owners = self._owners
        stats = self._stats
        size = self._size
        n = len(stats)
        seen = {owners[pos]}
        for step in range(1, size):
            owner = owners[(pos + step) % size]
            if owner in seen:
                continue
            chosen = stats[owner]
            if chosen.endpoint not in exclude:
                return chosen
            seen.add(owner)
            if len(seen) == n:
                return None
        return None


class RingHash(Balancer):
    """``ring_hash``: consistent hashing of the request key (Ketama ring; Envoy ``RING_HASH``).

    ``options.ring_size`` is the number of points per endpoint of the smallest weight unit (default 1024,
    the figure Envoy uses as its minimum ring size); see the module docstring for why per endpoint.
    """

    name = "ring_hash"

    def build(self, endpoints: Sequence[EndpointStats]) -> Picker:
        """Hash every endpoint's points and sort them into the ring."""
        return RingHashPicker(endpoints, self.options.ring_size, self.rng)
