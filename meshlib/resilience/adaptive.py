"""An adaptive per-service concurrency limit: Netflix's Gradient2, made safe against drift under overload.

The fixed cap of :mod:`meshlib.resilience.limit` needs someone to know how much concurrency a service can take.
This limit finds it from measured latency: while answers come back as fast as the long-term baseline it lets
more requests in flight; when latency rises above the baseline (the service is queueing) it lets fewer. Over
the limit a request is refused at once (counted), exactly like the fixed cap: there is deliberately no queue.

Why Gradient2 and not Envoy's ``adaptive_concurrency`` gradient controller
--------------------------------------------------------------------------
Envoy's controller (``gradient_controller.cc``) compares a percentile of the latencies of each 100 ms window
with a *minRTT* it measures every 60 s (+-15 % jitter) by pinning the concurrency to ``min_concurrency=3``
until 50 requests complete. A server-side filter can afford that pause; a client library cannot: during each
measurement it would refuse nearly every call its application makes, and because a client sees many
endpoints of a service behind one limit, the minimum is the fastest endpoint's, not the service's. It also
needs two timers and a latency histogram per service. Gradient2 (``Gradient2Limit.java``) needs none of this:
each completed request updates two running averages and the limit with a handful of float operations under a
short lock, and it uses an *average* baseline, which its authors chose because a minimum "can result in a bias
towards an impractically low base RTT resulting in excessive load shedding".

The algorithm, per window of samples (Netflix's ``WindowedLimit`` around Gradient2's ``_update``)::

    short = mean latency of the window; inflight = the most in flight during it
    long  = EWMA(short, window=600, warm-up=10)         # the baseline (Gradient2's ExpAvgMeasurement)
    if long / short > 2: long *= 0.9                    # recover fast after a long overload
    if inflight < limit / 2: return                     # app-limited: nothing to learn
    gradient = clamp(long / short, 0.5, 1.0)
    new = limit * gradient + queue_size(limit)          # queue_size = max(4, sqrt(limit))
    limit = clamp(limit * (1 - 0.2) + new * 0.2, min_limit, max_limit)

Two deviations, against drift and against a stale baseline. In Gradient2 the baseline learns from every
window, so under a *sustained* overload it creeps up toward the queueing latency the limit itself allows
(``short = long * L / (L - q)`` at equilibrium), the gradient returns to 1 and the limit climbs until it
reaches its maximum. Here a window in which the limit was *full* (requests in flight reached the limit) does
not update the baseline. The cost is that a service which really became slower (a new release, a slower
dependency) could be held low forever, so when latency stays at least twice the baseline (gradient at its
floor) and the limit cannot fall further for ``relearn_after=5`` windows in a row, the baseline is measured
again from the next ``warmup`` windows. That is Envoy's own remedy (a limit pinned at its minimum for 5
windows triggers a new minRTT measurement), without its pause: the samples are the ones the low limit
already lets through. Known limit: a lasting slowdown of less than 2x that arrives while the limit is full
is not relearned (the limit settles lower than it could be) until load drops below the limit.

The request path: :meth:`AdaptiveConcurrencyLimit.try_acquire` is a compare and an increment;
:meth:`AdaptiveConcurrencyLimit.release` with a latency sample adds a few float operations. Both hold one
:class:`threading.Lock` for that long and never block or await, so one object serves the sync and the async
client. The shape is the fixed limit's (``try_acquire() -> bool``, ``release(rtt=None)``, ``inflight``,
``peak``, ``rejected``, ``max_inflight``), so the service can hold either.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AdaptiveConcurrencyLimit", "AdaptiveLimitStatus", "AdaptiveSettings"]

logger = logging.getLogger("meshlib.resilience.adaptive")


def default_queue_size(limit: int) -> float:
    """Headroom the limit may grow by while latency stays at the baseline: ``max(4, sqrt(limit))``.

    4 is Gradient2's default ``queueSize``; ``sqrt(limit)`` is Envoy's burst headroom. The square root keeps
    the share of queueing allowed small at high limits (10 % at 100) and the growth quick at low ones.
    """
    return max(4.0, math.sqrt(limit))


@dataclass(frozen=True, slots=True)
class AdaptiveSettings:
    """The tunables of :class:`AdaptiveConcurrencyLimit`, with their sources.

    * ``initial_limit=20``: Gradient2's ``initialLimit``.
    * ``min_limit=3``: Envoy's ``min_concurrency`` (the concurrency it measures its minRTT at); Gradient2's
      ``minLimit`` is 20, too high a floor to protect a small service from one client.
    * ``max_limit=1000``: Envoy's ``max_concurrency_limit``; Gradient2's 200 would cap a client below the
      fixed limit it replaces (1024). Pass the service's ``max_inflight`` to keep the fixed cap as ceiling.
    * ``smoothing=0.2``: Gradient2's share of each new estimate taken into the limit.
    * ``long_window=600``, ``warmup=10``: Gradient2's baseline EWMA (factor ``2 / (window + 1)``) and the
      samples averaged plainly before it starts.
    * ``min_gradient=0.5``: Gradient2's and Envoy's floor on one step's gradient (an outlier sample can at most
      halve the estimate before smoothing).
    * ``min_window=0.1``, ``max_window=1.0``, ``window_samples=10``: samples are averaged over a window of
      twice the last window's latency, within [0.1 s, 1 s], and of at least 10 samples, and the limit moves
      once per window. Netflix runs Gradient2 under its ``WindowedLimit`` (window ``2 * RTT`` within
      [1 s, 1 s], ``windowSize`` 10); 0.1 s is Envoy's ``concurrency_update_interval``, so a client follows
      a service within a second. Updating on every sample instead (Gradient2 bare) moves the limit by
      ``0.2 * queue_size`` per answer: it doubles in one round trip and collapses in the next.
    * ``relearn_after=5``: windows in a row with latency at least twice the baseline and a limit that cannot
      fall further, after which the baseline is measured again (Envoy's "5 windows at the minimum").
    * ``queue_size``: see :func:`default_queue_size`.
    """

    initial_limit: int = 20
    min_limit: int = 3
    max_limit: int = 1000
    smoothing: float = 0.2
    long_window: int = 600
    warmup: int = 10
    min_gradient: float = 0.5
    relearn_after: int = 5
    min_window: float = 0.1
    max_window: float = 1.0
    window_samples: int = 10
    queue_size: Callable[[int], float] = default_queue_size

    def __post_init__(self) -> None:
        if self.min_limit < 1:
            raise ValueError(f"AdaptiveSettings min_limit must be >= 1, not {self.min_limit!r}")
        if self.max_limit < self.min_limit:
            raise ValueError(
                f"AdaptiveSettings max_limit must be >= min_limit ({self.min_limit}), not {self.max_limit!r}"
            )
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError(
                f"AdaptiveSettings initial_limit must be between min_limit ({self.min_limit}) and max_limit "
                f"({self.max_limit}), not {self.initial_limit!r}"
            )
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"AdaptiveSettings smoothing must be in (0, 1], not {self.smoothing!r}")
        if self.long_window < 1:
            raise ValueError(f"AdaptiveSettings long_window must be >= 1, not {self.long_window!r}")
        if self.warmup < 1:
            raise ValueError(f"AdaptiveSettings warmup must be >= 1, not {self.warmup!r}")
        if not 0.0 < self.min_window <= self.max_window:
            raise ValueError(
                f"AdaptiveSettings min_window must be > 0 and <= max_window ({self.max_window!r}), "
                f"not {self.min_window!r}"
            )
        if self.window_samples < 1:
            raise ValueError(f"AdaptiveSettings window_samples must be >= 1, not {self.window_samples!r}")
        if self.relearn_after < 1:
            raise ValueError(f"AdaptiveSettings relearn_after must be >= 1, not {self.relearn_after!r}")
        if not 0.0 < self.min_gradient <= 1.0:
            raise ValueError(f"AdaptiveSettings min_gradient must be in (0, 1], not {self.min_gradient!r}")


@dataclass(frozen=True, slots=True)
class AdaptiveLimitStatus:
    """One reading of an :class:`AdaptiveConcurrencyLimit`, for ``mesh_status()``.

    ``limit`` is what :meth:`~AdaptiveConcurrencyLimit.try_acquire` admits (the estimate rounded down),
    ``estimate`` the unrounded value; ``short_rtt_ms``/``long_rtt_ms`` the last window's mean latency and the
    baseline (``None`` before the first window, or while the baseline is measured again); ``gradient`` the
    last step's ``long / short`` (clamped); ``samples`` the latency samples fed, ``windows`` the windows they
    made, ``frozen_samples`` the windows that did not teach the baseline because the limit was full,
    ``relearns`` how often the baseline was measured again; ``last_sample_age_s`` seconds since the last
    sample by the limit's clock.
    """

    limit: int
    estimate: float
    min_limit: int
    max_limit: int
    inflight: int
    peak: int
    rejected: int
    samples: int
    windows: int
    frozen_samples: int
    relearns: int
    short_rtt_ms: float | None
    long_rtt_ms: float | None
    gradient: float
    last_sample_age_s: float | None


class AdaptiveConcurrencyLimit:
    """Counts requests in flight for one service and refuses beyond a limit it learns from latency.

    Every successful :meth:`try_acquire` must be paired with exactly one :meth:`release`. Feed a latency
    sample (seconds) with the release, or earlier with :meth:`observe` (when the permit outlives the answer, as
    it does for a streamed body). ``clock`` (default :func:`time.monotonic`) times the windows and dates the
    samples for the status; the latency itself is measured by the caller.
    """

    __slots__ = (
        "_count",
        "_estimate",
        "_frozen",
        "_gradient",
        "_last_sample",
        "_limit",
        "_lock",
        "_long",
        "_long_factor",
        "_pinned",
        "_relearns",
        "_samples",
        "_short",
        "_window_count",
        "_window_inflight",
        "_window_length",
        "_window_start",
        "_window_sum",
        "_windows",
        "clock",
        "inflight",
        "peak",
        "rejected",
        "settings",
    )

    def __init__(
        self, settings: AdaptiveSettings | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings = settings if settings is not None else AdaptiveSettings()
        self.clock = clock
        self._lock = threading.Lock()
        self._estimate = float(settings.initial_limit)
        self._limit = settings.initial_limit
        self._long = 0.0
        self._long_factor = 2.0 / (settings.long_window + 1)
        self._count = 0  # samples the baseline has averaged (for the warm-up)
        self._short: float | None = None
        self._gradient = 1.0
        self._samples = 0
        self._frozen = 0
        self._pinned = 0  # consecutive samples with the gradient at its floor
        self._relearns = 0
        self._window_count = 0
        self._window_sum = 0.0
        self._window_inflight = 0
        self._window_start = 0.0
        self._window_length = settings.min_window
        self._windows = 0
        self._last_sample: float | None = None
        self.inflight = 0
        self.peak = 0
        self.rejected = 0

    @property
    def max_inflight(self) -> int:
        """The current limit (the fixed limit's attribute name, so error messages and status read either)."""
        return self._limit

    def try_acquire(self) -> bool:
        """Take a slot: ``True`` if the request may proceed, ``False`` (counted) if the limit is reached."""
        with self._lock:
            if self.inflight >= self._limit:
                self.rejected += 1
                return False
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            return True

    def release(self, rtt: float | None = None) -> None:
        """Give a slot back, with the request's latency in seconds if it is a sample worth learning from.

        Pass ``None`` for a request whose latency says nothing about the service's load (cancelled by the
        caller, refused locally, connection refused). Raises :class:`RuntimeError` on a double release.
        """
        with self._lock:
            if self.inflight <= 0:
                raise RuntimeError("AdaptiveConcurrencyLimit.release() called more often than try_acquire() succeeded")
            if rtt is not None:
                self._update(rtt)
            self.inflight -= 1

    def observe(self, rtt: float) -> None:
        """Feed a latency sample (seconds) without releasing a slot (the permit is still held)."""
        with self._lock:
            self._update(rtt)

    def _update(self, rtt: float) -> None:
        """Add one sample to the window (under the lock); when the window is over, take Gradient2's step."""
        if not rtt > 0.0 or math.isinf(rtt):  # 0, negative or NaN: a clock glitch, not a latency
            return
        settings = self.settings
        now = self.clock()
        self._samples += 1
        self._last_sample = now
        inflight = self.inflight  # includes the sample's own request
        if self._window_count == 0:
            self._window_start = now
            self._window_sum = 0.0
            self._window_inflight = 0
        self._window_count += 1
        self._window_sum += rtt
        self._window_inflight = max(self._window_inflight, inflight)
        if self._window_count < settings.window_samples or now - self._window_start < self._window_length:
            return
        short = self._window_sum / self._window_count
        self._window_count = 0
        self._windows += 1
        self._step(short, self._window_inflight)
        # Netflix's WindowedLimit: a window is twice the RTT, within [min_window, max_window].
        self._window_length = min(settings.max_window, max(settings.min_window, 2.0 * short))

    def _step(self, short: float, inflight: int) -> None:
        """Gradient2's ``_update`` for one window: ``short`` its mean latency, ``inflight`` its peak."""
        settings = self.settings
        self._short = short
        estimate = self._estimate
        if self._count < settings.warmup:
            self._count += 1
            self._long += (short - self._long) / self._count
        elif inflight >= self._limit:
            self._frozen += 1  # anti-drift: a full limit's queueing must not become the baseline
        else:
            self._long += (short - self._long) * self._long_factor
        long = self._long
        if long / short > 2.0:  # latency is back to normal after a long overload: let the baseline catch up
            long = self._long = long * 0.9
        if inflight < estimate / 2.0:  # app-limited: the service is not being asked for more
            return
        gradient = self._gradient = max(settings.min_gradient, min(1.0, long / short))
        new = estimate * gradient + settings.queue_size(int(estimate))
        new = estimate * (1.0 - settings.smoothing) + new * settings.smoothing
        new = max(float(settings.min_limit), min(float(settings.max_limit), new))
        if gradient > settings.min_gradient or int(new) < int(estimate):
            self._pinned = 0
        else:  # latency at least twice the baseline, and the limit cannot go lower: is the baseline stale?
            self._pinned += 1
            if self._pinned >= settings.relearn_after:  # measure it again (Envoy's remedy)
                self._pinned = 0
                self._count = 0
                self._long = 0.0
                self._relearns += 1
                logger.debug("adaptive limit: latency %.3f ms stayed twice the baseline: relearning", short * 1e3)
        self._estimate = new
        limit = int(new)
        if limit != self._limit:
            self._limit = limit
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "adaptive limit %d (window rtt %.3f ms, baseline %.3f ms, gradient %.3f)",
                    limit,
                    short * 1000.0,
                    long * 1000.0,
                    gradient,
                )

    def status(self) -> AdaptiveLimitStatus:
        """A consistent reading of the limit, the counters and the estimator (taken under the lock)."""
        with self._lock:
            short, last = self._short, self._last_sample
            return AdaptiveLimitStatus(
                limit=self._limit,
                estimate=round(self._estimate, 3),
                min_limit=self.settings.min_limit,
                max_limit=self.settings.max_limit,
                inflight=self.inflight,
                peak=self.peak,
                rejected=self.rejected,
                samples=self._samples,
                windows=self._windows,
                frozen_samples=self._frozen,
                relearns=self._relearns,
                short_rtt_ms=None if short is None else round(short * 1000.0, 3),
                long_rtt_ms=None if self._count == 0 else round(self._long * 1000.0, 3),
                gradient=round(self._gradient, 4),
                last_sample_age_s=None if last is None else round(self.clock() - last, 3),
            )

    def __repr__(self) -> str:
        return f"AdaptiveConcurrencyLimit(limit={self._limit}, inflight={self.inflight})"
