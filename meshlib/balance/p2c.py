"""``p2c_ewma``, the default balancer: power of two choices over peak-EWMA load.

Why this default: it is what Linkerd (``linkerd2-proxy``) and Finagle (``Balancers.p2cPeakEwma``) ship.
Picking the less loaded of two random endpoints gets most of the benefit of "always pick the least loaded"
(Mitzenmacher, *The Power of Two Choices in Randomized Load Balancing*, 2001) without its herding, where
every client rushes the same momentarily idle endpoint, and a pick costs O(log N) whatever N is.
Peak EWMA (see :meth:`EndpointStats.end`) reacts to one slow response at once and forgives gradually, so a
degraded endpoint is drained within a few requests and probed again as its estimate decays.
"""

from __future__ import annotations

import random
from collections.abc import Container, Sequence

from meshlib.balance.base import Balancer, Clock, EndpointStats, Picker
from meshlib.balance.random import WeightedSampler
from meshlib.balance.slow_start import Ramp, SlowStart
from meshlib.discovery.base import Endpoint

__all__ = ["P2CPeakEwma", "P2CPeakEwmaPicker", "ramped_load"]


class P2CPeakEwmaPicker(Picker):
    """Draws two distinct endpoints (weighted, none excluded) and returns the one with the lower load.

    Load is :meth:`EndpointStats.load`: peak-EWMA latency x (in-flight + 1) / weight, read at ``clock()``.
    Ties go to the first candidate, which is itself a weighted draw.

    With ``slow_start``, an endpoint in its window is drawn as if its weight were ``weight x factor``
    (:meth:`~meshlib.balance.slow_start.Ramp.thin`) and compared with its in-flight count divided by the factor
    (:func:`ramped_load`): a newcomer whose unmeasured latency (``default_rtt``) looks better than its busy
    peers' cannot draw more than its ramp.
    """

    __slots__ = ("_clock", "_ramp", "_sampler", "_stats")

    def __init__(
        self,
        endpoints: Sequence[EndpointStats],
        rng: random.Random,
        clock: Clock,
        *,
        slow_start: SlowStart | None = None,
    ) -> None:
        self._sampler = WeightedSampler(endpoints, rng)
        self._stats = self._sampler.stats
        self._clock = clock
        self._ramp = None if slow_start is None else Ramp.build(slow_start, self._stats, clock)

    def pick(self, *, key: bytes | None = None, exclude: Container[Endpoint] = ()) -> EndpointStats | None:
        """The less loaded of two weighted random endpoints not in ``exclude`` (``key`` is ignored)."""
        ramp = self._ramp
        if ramp is not None:
            now = self._clock()
            if now < ramp.until:
                return self._pick_ramping(ramp, now, exclude)
            self._ramp = None  # every endpoint is warm: the plain path from now on
        i, j = self._sampler.pair(exclude)
        if j < 0:
            return None if i < 0 else self._stats[i]
        a = self._stats[i]
        b = self._stats[j]
        now = self._clock()
        return b if b.load(now) < a.load(now) else a

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
        return b if ramped_load(b, now, ramp.factor(b, now)) < ramped_load(a, now, ramp.factor(a, now)) else a


def ramped_load(stats: EndpointStats, now: float, factor: float) -> float:
    """:meth:`EndpointStats.load` of an endpoint at slow-start ``factor``: latency x (in-flight / factor + 1) / weight.

    Only the in-flight part is divided, so under load a ramping endpoint settles at about ``factor`` times its
    peers' in-flight requests (its share ramps in proportion), while idle it compares on latency alone. Dividing
    the whole load (Finagle's "+1" included) would starve it at the floor: with 20 requests in flight over five
    endpoints, an endpoint at 10 % could never look less loaded than a peer with 4 in flight.
    """
    if factor >= 1.0:
        return stats.load(now)
    weight = stats.endpoint.weight
    return stats.cost(now) * (stats.inflight / factor + 1.0) / (weight if weight > 1 else 1)


class P2CPeakEwma(Balancer):
    """``p2c_ewma``: power of two choices over peak-EWMA load (Linkerd's and Finagle's default).

    Candidates are drawn in proportion to ``Endpoint.weight`` and compared on a load that is itself divided
    by weight, so under concurrency a weight-2 endpoint settles at about twice the in-flight requests of a
    weight-1 one. At very low concurrency the heavier endpoint wins most comparisons, more than its share.
    Decay (10 s) and the unmeasured-endpoint latency (30 ms) live in :class:`EndpointStats`
    (Finagle/Linkerd defaults, :data:`meshlib.balance.base.DEFAULT_DECAY` and ``DEFAULT_RTT``).
    """

    name = "p2c_ewma"

    def build(self, endpoints: Sequence[EndpointStats]) -> Picker:
        """Precompute the weighted sampler for ``endpoints``; load is read live at pick time."""
        return P2CPeakEwmaPicker(endpoints, self.rng, self.clock, slow_start=self.options.slow_start)
