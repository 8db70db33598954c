"""``weighted_round_robin``: gRFC A58's client-side weighted round robin, weights from ORCA load reports.

Each endpoint's servers report their load in the ``endpoint-load-metrics`` response header
(:mod:`meshlib.balance.orca`, gRFC A51); an attempt's lease hands each report to the endpoint's
:meth:`~meshlib.balance.base.EndpointStats.record_report`. A58's weight is the endpoint's capacity estimate::

    weight = qps / (utilization + eps / qps * error_utilization_penalty)

with ``utilization`` the report's ``application_utilization`` if set, else its ``cpu_utilization``. A weight is
used only after the endpoint has reported continuously for ``blackout_period`` (10 s) and until no report came
for ``weight_expiration_period`` (3 min); after an expiry the blackout applies again. Endpoints without a usable
weight get the mean of the others'. With fewer than two usable weights A58 falls back to equal weights; here
the endpoints' static discovery weights are used then (equal unless SRV, Consul or EDS set them), so without
reports this is ``round_robin``. Static weights play no part once reports are used (as in A58).

The scheduler is A58's earliest deadline first (EDF): each endpoint is a job whose period is ``1/weight``, its
first deadline random in ``[0, period]``, and each pick takes the earliest deadline and adds its period. gRPC
runs the EDF queue under a mutex per pick; here the picker runs it ahead, off the request path, for
:data:`ROUNDS` picks per endpoint, and a pick walks that precomputed cycle with an atomic counter (as
:mod:`~meshlib.balance.round_robin` does). Every ``weight_update_period`` (1 s, at least 0.1 s as A58 caps it)
the first pick to notice rebuilds the cycle from the latest reports, without blocking other picks (they use
the previous cycle meanwhile), and swaps it in with one reference assignment. Time is the injected clock.

Source: https://github.com/grpc/proposal/blob/master/A58-client-side-weighted-round-robin-lb-policy.md
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import threading
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass

from meshlib.balance.base import Balancer, BalancerOptions, Clock, EndpointStats, Picker
from meshlib.discovery.base import Endpoint

__all__ = ["ROUNDS", "WeightedRoundRobin", "WeightedRoundRobinPicker", "WrrSettings", "a58_weight", "edf_cycle"]

#: Precomputed picks per endpoint in one cycle (the cycle is 256 to 4096 picks long).
ROUNDS = 64
MIN_CYCLE = 256
MAX_CYCLE = 4096
#: A58: "Values less than 100ms are capped at 100ms".
MIN_UPDATE_PERIOD = 0.1
#: Schedule slots a pick may skip over excluded endpoints before scanning for one that is not.
SKIP_TRIES = 16


@dataclass(frozen=True, slots=True)
class WrrSettings:
    """A58's ``WeightedRoundRobinLbConfig`` (per-call reports only: ``enable_oob_load_report`` does not apply).

    Defaults are A58's. ``weight_update_period`` below 0.1 s is raised to 0.1 s, as A58 caps it.
    """

    blackout_period: float = 10.0
    weight_expiration_period: float = 180.0
    weight_update_period: float = 1.0
    error_utilization_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "blackout_period",
            "weight_expiration_period",
            "weight_update_period",
            "error_utilization_penalty",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"WrrSettings.{name}={value!r} is invalid: expected a finite number >= 0")
        if self.weight_expiration_period <= 0:
            raise ValueError(
                f"WrrSettings.weight_expiration_period={self.weight_expiration_period!r} is invalid: expected > 0"
            )
        if self.weight_update_period < MIN_UPDATE_PERIOD:
            object.__setattr__(self, "weight_update_period", MIN_UPDATE_PERIOD)


def a58_weight(qps: float, eps: float, utilization: float, penalty: float) -> float:
    """A58's ``UpdateWeight``: ``qps / (utilization + eps/qps * penalty)``; 0 when qps or utilization is 0."""
    if utilization <= 0.0 or qps <= 0.0:
        return 0.0
    return qps / (utilization + eps / qps * penalty)


def endpoint_weight(stats: EndpointStats, now: float, settings: WrrSettings) -> float:
    """A58's ``GetWeight`` for one endpoint at ``now``: 0 while blacked out, expired or never reported.

    An expired weight resets the endpoint's ``weight_since`` (A58's ``non_empty_since``), so the blackout
    applies again when reports resume.
    """
    report = stats.weight_report
    if report is None:
        return 0.0
    if now - stats.weight_report_time >= settings.weight_expiration_period:
        stats.weight_since = math.inf
        return 0.0
    blackout = settings.blackout_period
    if blackout > 0 and now - stats.weight_since < blackout:
        return 0.0
    return a58_weight(report.rps_fractional, report.eps, report.load_utilization, settings.error_utilization_penalty)


def effective_weights(weights: Sequence[float], static: Sequence[float] | None = None) -> list[float]:
    """A58's scheduler input: zero weights become the mean of the positive ones. With fewer than two positive
    weights A58 makes every weight equal (round robin); here they are the ``static`` discovery weights if given
    (SRV, Consul, EDS: what ``round_robin`` honours), else equal."""
    positive = [w for w in weights if w > 0.0]
    if len(positive) < 2:
        return [float(w) for w in static] if static is not None else [1.0] * len(weights)
    mean = math.fsum(positive) / len(positive)
    return [w if w > 0.0 else mean for w in weights]


def edf_cycle(weights: Sequence[float], length: int, rng: random.Random) -> list[int]:
    """``length`` picks of A58's EDF scheduler over positive ``weights``: indices into ``weights``.

    Each job's period is ``1/weight`` and its first deadline random in ``[0, period]`` (A58: "to avoid
    synchronization" between clients); ties go to the lower index.
    """
    heap = []
    for i, w in enumerate(weights):
        period = 1.0 / w
        heap.append((rng.random() * period, i, period))
    heapq.heapify(heap)
    order: list[int] = []
    append = order.append
    for _ in range(length):
        deadline, i, period = heap[0]
        append(i)
        heapq.heapreplace(heap, (deadline + period, i, period))
    return order


class _Cycle:
    """One precomputed EDF cycle and its counter: swapped as a whole, so a pick never sees half of one."""

    __slots__ = ("counter", "length", "schedule", "weights")

    def __init__(self, schedule: list[EndpointStats], weights: tuple[float, ...], start: int) -> None:
        self.schedule = schedule
        self.length = len(schedule)
        self.weights = weights
        self.counter = itertools.count(start)


class WeightedRoundRobinPicker(Picker):
    """Walks the current EDF cycle; rebuilds it from the endpoints' reports every ``weight_update_period``."""

    __slots__ = ("_clock", "_cycle", "_next_update", "_rng", "_settings", "_stats", "_update_lock")

    def __init__(self, endpoints: Sequence[EndpointStats], settings: WrrSettings, clock: Clock, rng: random.Random):
        self._stats = tuple(endpoints)
        self._settings = settings
        self._clock = clock
        self._rng = rng
        self._update_lock = threading.Lock()
        now = clock()
        self._cycle = self._build(now)
        self._next_update = now + settings.weight_update_period

    @property
    def weights(self) -> tuple[float, ...]:
        """The weights of the current cycle, one per endpoint in the order given (after A58's mean fill)."""
        return self._cycle.weights

    def endpoint_weights(self) -> dict[Endpoint, float]:
        """Each endpoint's weight in the current cycle (for status views: ``mesh_status()``, ``meshlib status``)."""
        return {s.endpoint: w for s, w in zip(self._stats, self._cycle.weights, strict=True)}

    def refresh(self, now: float) -> None:
        """Rebuild the cycle from the latest reports (what the periodic update does; a driver's timer may call it)."""
        self._cycle = self._build(now)
        self._next_update = now + self._settings.weight_update_period

    def _build(self, now: float) -> _Cycle:
        stats = self._stats
        weights = tuple(
            effective_weights(
                [endpoint_weight(s, now, self._settings) for s in stats], [max(s.endpoint.weight, 1) for s in stats]
            )
        )
        if not stats:
            return _Cycle([], weights, 0)
        length = min(MAX_CYCLE, max(MIN_CYCLE, ROUNDS * len(stats)))
        order = edf_cycle(weights, length, self._rng)
        return _Cycle([stats[i] for i in order], weights, self._rng.randrange(length))

    def _maybe_refresh(self, now: float) -> None:
        lock = self._update_lock
        if lock.acquire(blocking=False):  # one pick rebuilds; the others keep the current cycle meanwhile
            try:
                if now >= self._next_update:
                    self.refresh(now)
            finally:
                lock.release()

    def pick(self, *, key: bytes | None = None, exclude: Container[Endpoint] = ()) -> EndpointStats | None:
        """The next endpoint of the cycle not in ``exclude`` (``key`` is ignored)."""
        if self._clock() >= self._next_update:
            self._maybe_refresh(self._clock())
        cycle = self._cycle
        length = cycle.length
        if length == 0:
            return None
        schedule = cycle.schedule
        counter = cycle.counter
        chosen = schedule[next(counter) % length]
        if not exclude or chosen.endpoint not in exclude:
            return chosen
        for _ in range(min(SKIP_TRIES, length - 1)):
            chosen = schedule[next(counter) % length]
            if chosen.endpoint not in exclude:
                return chosen
        stats = self._stats
        start = self._rng.randrange(len(stats))
        for i in range(len(stats)):
            candidate = stats[(start + i) % len(stats)]
            if candidate.endpoint not in exclude:
                return candidate
        return None


class WeightedRoundRobin(Balancer):
    """``weighted_round_robin`` (gRFC A58): round robin weighted by each endpoint's reported capacity.

    Use it when endpoints differ in capacity and their servers report ORCA load (:mod:`meshlib.server.orca`).
    Without reports it is ``round_robin`` (static discovery weights honoured).
    """

    name = "weighted_round_robin"
    wants_load_reports = True

    def __init__(
        self,
        options: BalancerOptions | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(options, clock=clock, rng=rng)
        settings = self.options.wrr
        if settings is None:
            from meshlib._config.env import wrr_settings_from_env

            settings = wrr_settings_from_env()
        self.settings = settings

    def build(self, endpoints: Sequence[EndpointStats]) -> Picker:
        """A picker whose first cycle already uses the reports the endpoints' stats hold."""
        return WeightedRoundRobinPicker(endpoints, self.settings, self.clock, self.rng)
