"""``least_request``: power of two choices on in-flight requests per unit of weight.

Envoy's ``LEAST_REQUEST`` policy with its default ``choice_count`` of 2, and Finagle's
``Balancers.p2c()`` (least outstanding): draw two endpoints, send to the one with fewer requests in flight
relative to its weight. It needs no latency history, so it suits services whose requests vary so much in
cost that latency says little about the endpoint, and it is the fallback Linkerd/Finagle name next to
peak EWMA.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from meshlib.balance.base import Balancer, EndpointStats, Picker
from meshlib.balance.random import WeightedSampler
from meshlib.discovery.base import Endpoint

__all__ = ["LeastRequest", "LeastRequestPicker"]


class LeastRequestPicker(Picker):
    """Draws two distinct endpoints (weighted, none excluded) and returns the one with less in flight per weight.

    Compares ``inflight / weight`` exactly (``inflight_a * weight_b`` against ``inflight_b * weight_a``).
    Without the "+1" of peak EWMA, idle endpoints tie, and ties go to the first candidate, itself a weighted
    draw: at low concurrency traffic follows the weights; under load, in-flight counts settle in proportion
    to them.
    """

    __slots__ = ("_sampler", "_stats", "_weights")

    def __init__(self, endpoints: Sequence[EndpointStats], rng: random.Random) -> None:
        self._sampler = WeightedSampler(endpoints, rng)
        self._stats = self._sampler.stats
        self._weights = self._sampler.weights

    def pick(self, *, key: bytes | None = None, exclude: Container[Endpoint] = ()) -> EndpointStats | None:
        """The endpoint with fewer in-flight requests per weight of two drawn (``key`` is ignored)."""
        i, j = self._sampler.pair(exclude)
        if j < 0:
            return None if i < 0 else self._stats[i]
        a = self._stats[i]
        b = self._stats[j]
        weights = self._weights
        return b if b.inflight * weights[i] < a.inflight * weights[j] else a


class LeastRequest(Balancer):
    """``least_request``: P2C on in-flight requests divided by weight (Envoy ``LEAST_REQUEST``, 2 choices)."""

    name = "least_request"

    def build(self, endpoints: Sequence[EndpointStats]) -> Picker:
        """Precompute the weighted sampler for ``endpoints``; in-flight counts are read live at pick time."""
        return LeastRequestPicker(endpoints, self.rng)
