"""Slow start: ramp a newly joined endpoint's share of traffic up over a window (Envoy's ``slow_start_config``).

A new instance (a scale-up, a restart) often needs warming: JIT, caches, connection pools. Without slow start
it gets its full share at once, and ``p2c_ewma`` even favours it: an endpoint with no history is assumed to
answer in ``default_rtt``, faster than busy peers, so it is flooded. With slow start an endpoint that joined
``elapsed`` seconds ago is balanced with its weight multiplied by (Envoy ``EdfLoadBalancerBase::
applySlowStartFactor``, ``source/extensions/load_balancing_policies/common/load_balancer_impl.cc``)::

    factor = max(min_weight_percent / 100, (max(elapsed, 1 ms) / window) ** (1 / aggression))

while ``elapsed < window``, and 1 afterwards. ``aggression`` 1 ramps linearly; above 1 it ramps faster early,
below 1 slower. ``min_weight_percent`` (default 10 %) is the floor.

Which endpoints: only those that join after a service's first endpoint set is applied (:attr:`EndpointStats.
joined_at`); those present at start are not slowed (Envoy starts the window for them too, but as all are scaled
alike it changes no share). Supported by ``p2c_ewma``, ``least_request``, ``round_robin`` and ``random``;
not by ``ring_hash`` (Envoy: round robin and least request only; a hash ring's owner is not a matter of weight).

How each balancer applies the factor (its effective weight is ``weight x factor``), see :class:`Ramp`:
candidates are drawn by weight and a ramping candidate is kept with probability ``factor`` (else redrawn),
which makes draws proportional to ``weight x factor`` exactly; P2C pickers also compare ``load / factor``.
Both only lower a ramping endpoint's chances, so its share never exceeds what it would get without slow start.

Everything here is pure: time is passed in (``now``) or injected (``clock``), randomness injected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshlib.errors import ConfigError

if TYPE_CHECKING:
    from meshlib.balance.base import Clock, EndpointStats
    from meshlib.balance.random import WeightedSampler
    from meshlib.discovery.base import Endpoint

__all__ = ["MAX_AGGRESSION", "MAX_WINDOW", "THIN_TRIES", "Ramp", "SlowStart", "slow_start_factor", "slow_start_problem"]

#: Longest window accepted: 720 h, meshlib's longest duration setting.
MAX_WINDOW = 30 * 24 * 3600.0
#: Largest aggression accepted (Envoy takes any positive number; beyond this the ramp is a step at the floor).
MAX_AGGRESSION = 1000.0
#: Envoy floors the elapsed time at 1 ms, so a just-joined endpoint's factor is never exactly zero.
MIN_ELAPSED = 0.001
#: Redraws a pick may make over ramping endpoints before it keeps the last draw (still a weighted one).
THIN_TRIES = 32


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def slow_start_problem(window: object, aggression: object, min_weight_percent: object) -> tuple[str, str] | None:
    """``(field, expected)`` for the first invalid setting, or ``None``: shared by :class:`SlowStart` and the
    configuration (``ResilienceSettings``), so both refuse the same values with the same words."""
    if not (_is_number(window) and 0 <= window <= MAX_WINDOW):  # type: ignore[operator]
        return "window", "a duration from 0 (off) to 720h"
    if not (_is_number(aggression) and 0 < aggression <= MAX_AGGRESSION):  # type: ignore[operator]
        return "aggression", f"a number greater than 0 (at most {MAX_AGGRESSION:g}); 1.0 ramps linearly"
    if not (_is_number(min_weight_percent) and 0 <= min_weight_percent <= 100):  # type: ignore[operator]
        return "min_weight_percent", "a percentage from 0 to 100 such as 10 or 10%"
    return None


@dataclass(frozen=True, slots=True)
class SlowStart:
    """Slow-start settings (Envoy ``SlowStartConfig``): ``window`` seconds (0: off), ``aggression`` (1.0),
    ``min_weight_percent`` (10). Invalid values raise :class:`~meshlib.errors.ConfigError` naming the field."""

    window: float = 0.0
    aggression: float = 1.0
    min_weight_percent: float = 10.0

    def __post_init__(self) -> None:
        problem = slow_start_problem(self.window, self.aggression, self.min_weight_percent)
        if problem is not None:
            name, expected = problem
            raise ConfigError(f"SlowStart.{name}", getattr(self, name), expected)

    @property
    def enabled(self) -> bool:
        """Whether new endpoints are ramped at all (a window above zero)."""
        return self.window > 0

    def factor(self, elapsed: float) -> float:
        """The weight multiplier of an endpoint that joined ``elapsed`` seconds ago: in (0, 1]."""
        return slow_start_factor(self, elapsed)


def slow_start_factor(settings: SlowStart, elapsed: float) -> float:
    """Envoy's slow-start factor for an endpoint ``elapsed`` seconds into its window (module docstring).

    1.0 when slow start is off or the window is over; otherwise at least ``min_weight_percent / 100`` and at
    least 1e-9 (a steep ramp may underflow). ``elapsed`` below 1 ms (or negative: a clock read before the join)
    counts as 1 ms.
    """
    window = settings.window
    if window <= 0 or elapsed >= window:
        return 1.0
    time_factor = max(elapsed, MIN_ELAPSED) / window
    aggression = settings.aggression
    ramp = time_factor if aggression == 1.0 else time_factor ** (1.0 / aggression)
    return min(1.0, max(ramp, settings.min_weight_percent / 100.0, 1e-9))


class Ramp:
    """The endpoints of one picker that are still in their slow-start window, and how to thin draws of them.

    Built with the picker (:meth:`build`, ``None`` when no endpoint is ramping, so the picker's request path
    only tests an attribute for ``None``). ``until`` is when the last of them leaves its window: a picker seeing
    ``now >= until`` drops its ramp and is back on its plain path for good. Read-only after construction.
    """

    __slots__ = ("clock", "joined", "settings", "until")

    def __init__(self, settings: SlowStart, joined: Mapping[EndpointStats, float], clock: Clock) -> None:
        self.settings = settings
        #: Ramping endpoint -> when it joined (the picker's clock).
        self.joined = dict(joined)
        self.until = max(joined.values()) + settings.window
        self.clock = clock

    @classmethod
    def build(cls, settings: SlowStart, stats: Sequence[EndpointStats], clock: Clock) -> Ramp | None:
        """The ramp of ``stats`` now, or ``None`` when slow start is off or none of them is in its window."""
        if not settings.enabled:
            return None
        now = clock()
        window = settings.window
        joined = {s: s.joined_at for s in stats if s.joined_at is not None and now - s.joined_at < window}
        return cls(settings, joined, clock) if joined else None

    def factor(self, stats: EndpointStats, now: float) -> float:
        """``stats``' weight multiplier at ``now`` (1.0 unless it is one of the ramping endpoints)."""
        joined = self.joined.get(stats)
        return 1.0 if joined is None else slow_start_factor(self.settings, now - joined)

    def keep(self, stats: EndpointStats, now: float, random: Callable[[], float]) -> bool:
        """Whether a draw of ``stats`` stands: always for a warm endpoint, with probability ``factor`` otherwise."""
        joined = self.joined.get(stats)
        if joined is None:
            return True
        factor = slow_start_factor(self.settings, now - joined)
        return factor >= 1.0 or random() < factor

    def thin(
        self, draw: Callable[[], int], stats: Sequence[EndpointStats], now: float, random: Callable[[], float]
    ) -> int:
        """An index from ``draw`` (weighted; ``-1``: none), redrawn while :meth:`keep` refuses it.

        Rejection sampling: the result is drawn in proportion to ``weight x factor``. After :data:`THIN_TRIES`
        refusals (only when most of the weight is ramping at a low factor) the last draw is kept.
        """
        i = draw()
        for _ in range(THIN_TRIES):
            if i < 0 or self.keep(stats[i], now, random):
                return i
            i = draw()
        return i

    def pair(self, sampler: WeightedSampler, now: float, exclude: Container[Endpoint]) -> tuple[int, int]:
        """Two distinct candidates of a power-of-two-choices pick, each thinned (:meth:`thin`): indexes into
        ``sampler.stats``, ``-1`` for none (``(-1, -1)``: every endpoint is excluded)."""
        stats = sampler.stats
        i = self.thin(lambda: sampler.sample(exclude), stats, now, sampler.random)
        if i < 0:
            return -1, -1
        return i, self.thin(lambda: sampler.sample_other(i, exclude), stats, now, sampler.random)
