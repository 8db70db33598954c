"""``round_robin``: weighted round robin over a precomputed, interleaved schedule.

Each endpoint appears in one cycle of the schedule as often as its weight (weights reduced by their gcd),
spread out rather than in runs, like nginx's smooth weighted round robin and Envoy's EDF scheduler: with
weights 5:1:1 a cycle reads ``a a a b c a a`` instead of ``a a a a a b c``. The schedule is built once per
endpoint set; a pick is one ``next()`` on an :func:`itertools.count` (atomic under the GIL) and an index.
Each picker starts at a random offset so that many clients built at once do not all hit the same endpoint
first (grpc-go and Envoy randomise the start the same way).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Container, Sequence

from meshlib.balance.base import Balancer, Clock, EndpointStats, Picker
from meshlib.balance.random import WeightedSampler
from meshlib.balance.slow_start import THIN_TRIES, Ramp, SlowStart
from meshlib.discovery.base import Endpoint

__all__ = ["MAX_SCHEDULE", "RoundRobin", "RoundRobinPicker", "smooth_schedule"]

#: Longest schedule built (entries), or the number of endpoints if larger. Weights whose reduced sum is
#: longer are scaled down to fit (each endpoint keeps at least one slot), so shares are then approximate.
MAX_SCHEDULE = 1 << 16

#: Schedule slots a pick may skip over excluded endpoints before drawing a weighted random one instead.
SKIP_TRIES = 16


def smooth_schedule(weights: Sequence[int], max_length: int = MAX_SCHEDULE) -> list[int]:
    """One cycle of interleaved weighted round robin: indices into ``weights``, each ``w/gcd`` times.

    Slot ``k`` of an endpoint of weight ``w`` is due at ``(k + 1/2) / w`` of the cycle (stride scheduling,
    the Sainte-Laguë apportionment), and slots are served in order of due time, ties by index. Sorting
    costs O(L log L) for a cycle of length L, where nginx's smooth WRR loop costs O(L x N).
    """
    if not weights:
        return []
    ws = [max(w, 1) for w in weights]
    g = math.gcd(*ws)
    ws = [w // g for w in ws]
    length = sum(ws)
    limit = max(max_length, len(ws))
    if length > limit:
        ws = [max(1, (w * max_length) // length) for w in ws]
        g = math.gcd(*ws)
        ws = [w // g for w in ws]
    if all(w == 1 for w in ws):
        return list(range(len(ws)))
    slots = [((2 * k + 1) / (2 * w), i) for i, w in enumerate(ws) for k in range(w)]
    slots.sort()
    return [i for _, i in slots]


class RoundRobinPicker(Picker):
    """Walks the precomputed schedule; excluded endpoints are skipped by taking the next position.

    Skipping consumes the counter, so while some endpoints stay excluded the others keep exactly their
    weighted shares (the next endpoint in line does not inherit the excluded one's turns). After
    :data:`SKIP_TRIES` excluded slots in a row, the pick is a weighted random one among those not excluded.

    With ``slow_start``, a slot of an endpoint in its window is served with probability ``factor`` and
    otherwise passed to the next slot, so over a cycle the endpoint gets the share of weight ``weight x factor``
    (Envoy scales the EDF weight instead; the shares are the same, the ramping endpoint's turns are random).
    """

    __slots__ = ("_counter", "_length", "_ramp", "_sampler", "_schedule", "_stats")

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
        order = smooth_schedule(self._sampler.weights)
        self._schedule = [self._stats[i] for i in order]
        self._length = len(order)
        self._counter = itertools.count(rng.randrange(self._length) if self._length else 0)
        self._ramp = None if slow_start is None else Ramp.build(slow_start, self._stats, clock)

    @property
    def schedule(self) -> tuple[EndpointStats, ...]:
        """One cycle of the schedule, from its start (not from the picker's random starting offset)."""
        return tuple(self._schedule)

    def pick(self, *, key: bytes | None = None, exclude: Container[Endpoint] = ()) -> EndpointStats | None:
        """The next endpoint in the schedule that is not in ``exclude`` (``key`` is ignored)."""
        ramp = self._ramp
        if ramp is not None:
            now = ramp.clock()
            if now < ramp.until:
                random = self._sampler.random
                chosen = self._next(exclude)
                for _ in range(THIN_TRIES):
                    if chosen is None or ramp.keep(chosen, now, random):
                        break
                    chosen = self._next(exclude)
                return chosen
            self._ramp = None  # every endpoint is warm: the plain path from now on
        length = self._length  # _next() inlined: the plain path makes no extra call
        if length == 0:
            return None
        chosen = self._schedule[next(self._counter) % length]
        if not exclude or chosen.endpoint not in exclude:
            return chosen
        return self._skip(exclude)

    def _next(self, exclude: Container[Endpoint]) -> EndpointStats | None:
        """The next scheduled endpoint not in ``exclude``."""
        length = self._length
        if length == 0:
            return None
        chosen = self._schedule[next(self._counter) % length]
        if not exclude or chosen.endpoint not in exclude:
            return chosen
        return self._skip(exclude)

    def _skip(self, exclude: Container[Endpoint]) -> EndpointStats | None:
        """After an excluded slot: the next slots, then a weighted random endpoint not in ``exclude``."""
        length = self._length
        for _ in range(min(SKIP_TRIES, length - 1)):
            chosen = self._schedule[next(self._counter) % length]
            if chosen.endpoint not in exclude:
                return chosen
        i = self._sampler.sample(exclude)
        return None if i < 0 else self._stats[i]


class RoundRobin(Balancer):
    """``round_robin``: smooth weighted round robin (nginx/Envoy style), exact shares over each cycle.

    Predictable and load-blind: use it when endpoints are alike and requests cost about the same.
    """

    name = "round_robin"

    def build(self, endpoints: Sequence[EndpointStats]) -> Picker:
        """Precompute the interleaved schedule for ``endpoints`` and a random starting offset."""
        return RoundRobinPicker(endpoints, self.rng, clock=self.clock, slow_start=self.options.slow_start)
