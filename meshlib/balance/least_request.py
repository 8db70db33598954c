"""``least_request``: power of two choices on in-flight requests per unit of weight.

Envoy's ``LEAST_REQUEST`` policy with its default ``choice_count`` of 2, and Finagle's
``Balancers.p2c()`` (least outstanding): draw two endpoints, send to the one with fewer requests in flight
relative to its weight. It needs no latency history, so it suits services whose requests vary so much in
cost that latency says little about the endpoint, and it is the fallback Linkerd/Finagle name next to
peak EWMA.
"""

from __future__ import annotations

import random
import time
from collections.abc import Container, Sequence

from meshlib.balance.base import Balancer, Clock, EndpointStats, Picker
from meshlib.balance.random import WeightedSampler
from meshlib.balance.slow_start import Ramp, SlowStart
from meshlib.discovery.base import Endpoint

__all__ = ["LeastRequest", "LeastRequestPicker"]


class LeastRequestPicker(Picker):
    """Draws two distinct endpoints (weighted, none excluded) and returns the one with less in flight per weight.

    Compares ``inflight / weight`` exactly (``inflight_a * weight_b`` against ``inflight_b * weight_a``).
    Without the "+1" of peak EWMA, idle endpoints tie, and ties go to the first candidate, itself a weighted
    draw: at low concurrency traffic follows the weights; under load, in-flight counts settle in proportion
    to them.

    With ``slow_start``, an endpoint in its window counts with weight ``weight x factor`` in both the draw
    (:meth:`~meshlib.balance.slow_start.Ramp.thin`) and the comparison, as Envoy scales its weight.
    """

    __slots__ = ("_ramp", "_sampler", "_stats", "_weights")

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
        self._weights = self._sampler.weights
        self._ramp = None if slow_start is None else Ramp.build(slow_start, self._stats, clock)

    def pick(self, *, key: bytes | None = None, exclude: Container[Endpoint] = ()) -> EndpointStats | None:
        """The endpoint with fewer in-flight requests per weight of two drawn (``key`` is ignored)."""
        ramp = self._ramp
        if ramp is not None:
            now = ramp.clock()
            if now < ramp.until:
                return self._pick_ramping(ramp, now, exclude)
            self._ramp = None  # every endpoint is warm: the plain path from now on
        i, j = self._sampler.pair(exclude)
        if j < 0:
            return None if i < 0 else self._stats[i]
        a = self._stats[i]
        b = self._stats[j]
        weights = self._weights
        return b if b.inflight * weights[i] < a.inflight * weights[j] else a

    def _pick_ramping(self, ramp: Ramp, now: float, exclude: Container[Endpoint]) -> EndpointStats | None:
        """:meth:`pick` while some endpoint is in its slow-start window: weights scaled by their factors."""
        stats = self._stats
        i, j = ramp.pair(self._sampler, now, exclude)
        if i < 0:
            return None
        a = stats[i]
        if j < 0:
            return a
        b = stats[j]
        weights = self._weights
        fa, fb = ramp.factor(a, now), ramp.factor(b, now)
        return b if b.inflight * weights[i] * fa < a.inflight * weights[j] * fb else a


class LeastRequest(Balancer):
    """``least_request``: P2C on in-flight requests divided by weight (Envoy ``LEAST_REQUEST``, 2 choices)."""

    name = "least_request"

    def build(self, endpoints: Sequence[EndpointStats]) -> Picker:
        """Precompute the weighted sampler for ``endpoints``; in-flight counts are read live at pick time."""
        return LeastRequestPicker(endpoints, self.rng, clock=self.clock, slow_start=self.options.slow_start)
