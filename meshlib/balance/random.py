"""Weighted random balancing, and the weighted sampler the other pickers draw candidates with.

Random is the simplest balancer that honours weights and needs no shared state, which makes it a good
baseline and the fallback when nothing is known about the endpoints (Envoy's ``RANDOM`` policy). Its
spread is only statistically even; prefer ``p2c_ewma`` for latency-sensitive traffic.

The module is named after the algorithm (as Envoy and grpc-go name theirs); it never shadows the standard
library's :mod:`random` because imports are absolute.
"""

from __future__ import annotations

import random
import time
from bisect import bisect_right
from collections.abc import Container, Sequence

from meshlib.balance.base import Balancer, Clock, EndpointStats, Picker
from meshlib.balance.slow_start import Ramp, SlowStart
from meshlib.discovery.base import Endpoint

__all__ = ["WeightedRandom", "WeightedRandomPicker", "WeightedSampler", "effective_weight"]

#: How many random draws may land on excluded endpoints before a sampler falls back to one exact pass
#: over the whole set. With half of the endpoints excluded, 8 misses in a row happen 0.4% of the time.
REJECTION_TRIES = 8


def effective_weight(endpoint: Endpoint) -> int:
    """The weight a balancer uses: ``Endpoint.weight``, but at least 1.

    RFC 2782 gives SRV weight 0 "a very small chance of being selected"; treating it as 1 does that next to
    realistic weights and matches :meth:`EndpointStats.load`, which also divides by ``max(weight, 1)``.
    """
    return max(endpoint.weight, 1)


class WeightedSampler:
    """Draws endpoint indices with probability proportional to weight, skipping excluded endpoints.

    Built once per endpoint set. A draw costs one ``rng.random()`` and O(1) work: a multiplication when
    all weights are equal, else a lookup in Walker's alias table (Vose's construction), which beats a
    ``bisect`` over cumulative weights at thousands of endpoints. Drawing a second index distinct from the
    first uses the cumulative weights, with ``i``'s interval cut out, so it is exact without rejection.
    Excluded endpoints are handled by rejection (exact, and cheap while few are excluded) and, after
    :data:`REJECTION_TRIES` misses, by one exact weighted pass over the endpoints that remain.

    Holds no lock: ``random.Random`` methods are atomic under the GIL and everything else is read-only.
    The attributes are public so pickers can inline the no-exclusion fast path.
    """

    __slots__ = ("_cum", "_starts", "alias", "n", "prob", "random", "stats", "total", "uniform", "weights")

    def __init__(self, stats: Sequence[EndpointStats], rng: random.Random) -> None:
        self.stats: tuple[EndpointStats, ...] = tuple(stats)
        #: Effective weights (:func:`effective_weight`), read once at build time.
        self.weights: tuple[int, ...] = tuple(effective_weight(s.endpoint) for s in self.stats)
        self.total = sum(self.weights)
        self.n = len(self.stats)
        self.uniform = len(set(self.weights)) <= 1
        self.random = rng.random
        starts: list[int] = []
        cum: list[float] = []
        if self.uniform:
            # Equal weights (the common case) draw by multiplication alone: no tables to build, so applying
            # a large endpoint set costs only the tuples above.
            self.prob: list[float] = []
            self.alias: list[int] = []
        else:
            acc = 0
            for w in self.weights:
                starts.append(acc)
                acc += w
                cum.append(float(acc))
            if cum:
                # ``random() * total`` may round up to ``total``; an infinite last bound keeps bisect in range.
                cum[-1] = float("inf")
            self.prob, self.alias = _alias_table(self.weights, self.total)
        self._cum = cum
        self._starts = starts

    def __len__(self) -> int:
        """Number of endpoints."""
        return self.n

    def draw(self) -> int:
        """One index, weighted, ignoring exclusions."""
        u = self.random() * self.n
        i = int(u)
        if self.uniform or u - i < self.prob[i]:
            return i
        return self.alias[i]

    def draw_other(self, i: int) -> int:
        """One index other than ``i``, weighted among the rest (exact, no rejection); needs two endpoints."""
        if self.uniform:
            j = int(self.random() * (self.n - 1))
            return j + 1 if j >= i else j
        w = self.weights[i]
        x = self.random() * (self.total - w)
        if x >= self._starts[i]:
            x += w  # jump over i's own interval of the cumulative weights
        return bisect_right(self._cum, x)

    def sample(self, exclude: Container[Endpoint]) -> int:
        """A weighted index whose endpoint is not in ``exclude``; ``-1`` when every endpoint is excluded."""
        if self.n == 0:
            return -1
        i = self.draw()
        if not exclude or self.stats[i].endpoint not in exclude:
            return i
        return self._sample_slow(exclude, -1)

    def sample_other(self, i: int, exclude: Container[Endpoint]) -> int:
        """A weighted index other than ``i`` and not excluded; ``-1`` when there is none."""
        if self.n < 2:
            return -1
        j = self.draw_other(i)
        if not exclude or self.stats[j].endpoint not in exclude:
            return j
        return self._sample_slow(exclude, i)

    def pair(self, exclude: Container[Endpoint]) -> tuple[int, int]:
        """Two distinct weighted indices not in ``exclude``, for power-of-two-choices pickers.

        The first is a weighted draw among the endpoints not excluded, the second a weighted draw among the
        rest. ``(i, -1)`` when only ``i`` is left, ``(-1, -1)`` when none is. One call on the fast path.
        """
        n = self.n
        if n < 2:
            return self.sample(exclude), -1
        r = self.random
        if self.uniform:
            i = int(r() * n)
            j = int(r() * (n - 1))
            if j >= i:
                j += 1
        else:
            prob = self.prob
            u = r() * n
            i = int(u)
            if u - i >= prob[i]:
                i = self.alias[i]
            u = r() * n
            j = int(u)
            if u - j >= prob[j]:
                j = self.alias[j]
            if j == i:
                j = self.draw_other(i)
        if exclude:
            stats = self.stats
            if stats[i].endpoint in exclude:
                i = self._sample_slow(exclude, -1)
                if i < 0:
                    return -1, -1
                j = self.sample_other(i, exclude)
            elif stats[j].endpoint in exclude:
                j = self._sample_slow(exclude, i)
        return i, j

    def _sample_slow(self, exclude: Container[Endpoint], skip: int) -> int:
        stats = self.stats
        draw = self.draw if skip < 0 else lambda: self.draw_other(skip)
        for _ in range(REJECTION_TRIES):
            i = draw()
            if stats[i].endpoint not in exclude:
                return i
        # Most endpoints are excluded: one exact pass over the rest, still weighted.
        allowed: list[int] = []
        cum: list[int] = []
        acc = 0
        weights = self.weights
        for i, s in enumerate(stats):
            if i != skip and s.endpoint not in exclude:
                allowed.append(i)
                acc += weights[i]
                cum.append(acc)
        if not allowed:
            return -1
        k = bisect_right(cum, self.random() * acc)
        return allowed[min(k, len(allowed) - 1)]


def _alias_table(weights: Sequence[int], total: int) -> tuple[list[float], list[int]]:
    """Walker's alias table by Vose's method: column ``i`` keeps ``i`` with ``prob[i]``, else ``alias[i]``."""
    n = len(weights)
    prob = [1.0] * n
    alias = list(range(n))
    if n == 0 or total <= 0:
        return prob, alias
    scaled = [w * n / total for w in weights]
    small = [i for i, p in enumerate(scaled) if p < 1.0]
    large = [i for i, p in enumerate(scaled) if p >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    # Whatever is left is 1.0 up to rounding: keeps itself (prob 1.0, alias to itself).
    return prob, alias


class WeightedRandomPicker(Picker):
    """Picks a random endpoint, with probability proportional to its weight, among those not excluded.

    With ``slow_start``, an endpoint in its window is drawn in proportion to ``weight x factor``
    (:meth:`~meshlib.balance.slow_start.Ramp.thin`); once no endpoint is, picks take the plain path again.
    """

    __slots__ = ("_ramp", "_sampler", "_stats")

    def __init__(
        self,
        endpoints: Sequence[EndpointStats],
        rng: random.Random,
        *,
        clock: Clock = time.monotonic,
        slow_start: SlowStart | None = None,
    ) -> None:
        self._sampler = WeightedSampler(endpoints, rng)
        self._stats = self._sampler.stats
        self._ramp = None if slow_start is None else Ramp.build(slow_start, self._stats, clock)

    def pick(self, *, key: bytes | None = None, exclude: Container[Endpoint] = ()) -> EndpointStats | None:
        """A weighted random endpoint not in ``exclude`` (``key`` is ignored); ``None`` if all are excluded."""
        ramp = self._ramp
        if ramp is not None:
            now = ramp.clock()
            if now < ramp.until:
                sampler = self._sampler
                i = ramp.thin(lambda: sampler.sample(exclude), self._stats, now, sampler.random)
                return None if i < 0 else self._stats[i]
            self._ramp = None  # every endpoint is warm: the plain path from now on
        i = self._sampler.sample(exclude)
        return None if i < 0 else self._stats[i]


class WeightedRandom(Balancer):
    """``random``: weighted random choice (Envoy's ``RANDOM`` load-balancing policy).

    Stateless per request and immune to the herding a shared round-robin position can cause across many
    clients, but it ignores load: use it as a baseline or when endpoints report nothing useful.
    """

    name = "random"

    def build(self, endpoints: Sequence[EndpointStats]) -> Picker:
        """Precompute cumulative weights for ``endpoints`` (and which of them are in their slow-start window)."""
        return WeightedRandomPicker(endpoints, self.rng, clock=self.clock, slow_start=self.options.slow_start)
