"""Hedging building blocks: policy, extra-load budget, latency-percentile delay, per-call schedule, pushback.

Hedging sends a second copy of a slow request to another endpoint and keeps whichever answer comes first
("The Tail at Scale", Dean and Barroso 2013). This module holds the *pure* parts; the call plan
(``meshlib/_plan.py``) drives them (docs/resilience.md, "Hedging"). Sources:

* **gRFC A6** (grpc/proposal ``A6-client-retries.md``, "Hedging Policy", "Pushback", "Summary of Retry and
  Hedging Logic"): the original is sent at once and a hedge every ``hedgingDelay`` until ``maxAttempts``
  (at most 5) are out; the first non-error answer wins and every other attempt is cancelled; a *non-fatal*
  status sends the next hedge at once (later ones resume at the delay); any other status is *fatal*: cancel
  everything and return it; if all attempts fail there is no further retry; pushback "do not retry" stops
  further hedges, pushback "retry in n ms" sends the next hedge after n ms (later ones at n + delay);
  hedges are throttled like retries.
* **Finagle** ``BackupRequestFilter`` (``com.twitter.finagle.client``): the backup is sent at a latency
  percentile from a ``WindowedPercentileHistogram`` (a 30 s window of 3 buckets of 10 s, HdrHistogram with
  3 significant digits, values capped at 2 s), re-read every 3 s and floored at 1 ms; no backup once that
  percentile reaches the cap. A ``RetryBudget`` whose ``percentCanRetry`` is ``maxExtraLoad`` (deposit per
  request, withdraw per backup) caps extra load; a backup also withdraws from the client's retry budget
  (both must allow it).
  Latency is recorded for successes, timeouts and superseded (cancelled) attempts, not for fast failures,
  which would drag the percentile down.

Everything here is thread-safe and allocation-light; clocks are injected so tests need no sleeping.
"""

from __future__ import annotations

import enum
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from meshlib._config.parse import parse_bool, parse_duration, parse_fraction, parse_int, parse_statuses
from meshlib.errors import ConfigError
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.classify import IDEMPOTENT_METHODS

__all__ = [
    "DEFAULT_HEDGE_PERCENTILE",
    "DEFAULT_MAX_EXTRA_LOAD",
    "DEFAULT_NON_FATAL",
    "HEDGE_MAX_ATTEMPTS",
    "NO_HEDGE_POLICY",
    "HedgeBudget",
    "HedgeCall",
    "HedgeDecision",
    "HedgePolicy",
    "HedgeSettings",
    "HedgeState",
    "LatencyWindow",
    "Pushback",
    "hedge_pushback",
    "hedgeable",
    "hedge_from_env",
    "parse_hedge_delay",
    "resolve_delay",
]

#: gRFC A6's client-side cap on ``maxAttempts`` (the original included).
HEDGE_MAX_ATTEMPTS = 5
#: Finagle's ``BackupRequestFilter`` examples and "The Tail at Scale": hedging at p95 costs about 5 % extra.
DEFAULT_MAX_EXTRA_LOAD = 0.05
DEFAULT_HEDGE_PERCENTILE = 0.95
#: Statuses after which another attempt may still succeed (A6's ``nonFatalStatusCodes``): gateway failures
#: (gRPC's UNAVAILABLE maps to 503; 502/504 are a proxy failing to reach or hear from one endpoint) and 429
#: (a per-endpoint limiter said no; whether *more* hedges go out is :func:`hedge_pushback`'s business).
#: 500 is fatal by default, unlike A6's example listing INTERNAL: a 500 is usually the application failing
#: deterministically on this request, and meshlib's retries do not retry it either (``DEFAULT_RETRY_ON``).
#: Every other 4xx/5xx is fatal: the request itself is at fault, another endpoint will say the same.
DEFAULT_NON_FATAL: frozenset[int] = frozenset({429, 502, 503, 504})
#: Finagle's ``MinSendBackupAfterMs``: never hedge sooner than this, even if the percentile is ~0.
DEFAULT_MIN_DELAY = 0.001
#: Finagle's ``WindowedPercentileHistogram`` window (30 s; Finagle cuts it in 3 buckets of 10 s, we in 10 of 3 s,
#: so old samples leave in smaller steps, as in the retry budget).
DEFAULT_WINDOW = 30.0
#: Samples the window must hold before a percentile delay is trusted; until then no hedging (see docs).
DEFAULT_MIN_SAMPLES = 100
#: Highest latency tracked; a percentile at or above it disables hedging, as in Finagle (whose
#: ``DefaultHighestTrackableValue`` is 2 s; we keep 30 s so slow services can hedge too).
MAX_TRACKABLE = 30.0

_SLICES = 10


def _bad(field: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"HedgePolicy.{field}", value, expected)


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """Per-call hedging rules, layered like :class:`meshlib.Policy` (``None`` = not set here, inherit).

    * ``max_attempts`` -- attempts in flight at most, the original included: 1 (default: no hedging) to 5
      (gRFC A6's cap; larger values are refused rather than silently clamped).
    * ``delay`` -- fixed seconds between attempts (A6's ``hedgingDelay``; ``0`` sends every attempt at
      once). ``None`` in a resolved policy: derive it from ``percentile``.
    * ``percentile`` -- latency percentile of the service (0 < p < 1) the delay follows when ``delay`` is
      not set. Default 0.95 (p95).
    * ``non_fatal`` -- statuses after which the call goes on (next hedge at once); any other non-2xx/3xx
      status ends the call. Default {429, 502, 503, 504}.
    * ``non_idempotent`` -- hedge POST/PATCH too (an ``Idempotency-Key`` header does it per request).
      Default False: a hedge is a duplicate request by design.

    ``delay`` and ``percentile`` are alternatives: setting one in a layer clears the other's effect
    (:meth:`merge`), so ``policy(hedge=HedgePolicy(delay=0.03))`` overrides a service's ``p99``.
    """

    max_attempts: int | None = None
    delay: float | None = None
    percentile: float | None = None
    non_fatal: AbstractSet[int] | None = None
    non_idempotent: bool | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        n = self.max_attempts
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= HEDGE_MAX_ATTEMPTS):
            raise _bad("max_attempts", n, f"an integer from 1 (no hedging) to {HEDGE_MAX_ATTEMPTS} (gRFC A6's cap)")
        d = self.delay
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
                raise _bad("delay", d, "a finite number of seconds >= 0")
            put(self, "delay", float(d))
        p = self.percentile
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
                raise _bad("percentile", p, "a fraction strictly between 0 and 1, such as 0.95 for p95")
            if self.delay is not None:
                raise _bad(
                    "percentile", p, "unset when delay is set (a fixed delay and a percentile exclude each other)"
                )
            put(self, "percentile", float(p))
        if self.non_fatal is not None:
            codes = self.non_fatal
            if isinstance(codes, (str, bytes)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 100 <= c <= 599 for c in codes
            ):
                raise _bad("non_fatal", codes, "a set of HTTP status codes (100-599)")
            if any(c < 400 for c in codes):
                raise _bad("non_fatal", codes, "status codes of failures (400-599): 1xx-3xx answers are accepted")
            put(self, "non_fatal", frozenset(codes))
        if self.non_idempotent is not None and not isinstance(self.non_idempotent, bool):
            raise _bad("non_idempotent", self.non_idempotent, "True or False")

    def merge(self, inner: HedgePolicy) -> HedgePolicy:
        """This policy overridden by ``inner``'s set fields; ``delay``/``percentile`` override as a pair."""
        if inner.delay is not None or inner.percentile is not None:
            delay, percentile = inner.delay, inner.percentile
        else:
            delay, percentile = self.delay, self.percentile
        merged = object.__new__(HedgePolicy)  # both sides are valid: skip re-validation
        put = object.__setattr__
        put(merged, "max_attempts", self.max_attempts if inner.max_attempts is None else inner.max_attempts)
        put(merged, "delay", delay)
        put(merged, "percentile", percentile)
        put(merged, "non_fatal", self.non_fatal if inner.non_fatal is None else inner.non_fatal)
        put(merged, "non_idempotent", self.non_idempotent if inner.non_idempotent is None else inner.non_idempotent)
        return merged

    def resolved(self) -> HedgePolicy:
        """Every field set from :data:`DEFAULT_HEDGE_POLICY` (``delay`` stays ``None`` when a percentile rules)."""
        return DEFAULT_HEDGE_POLICY.merge(self)

    @property
    def enabled(self) -> bool:
        """Whether this (resolved) policy hedges at all."""
        return (self.max_attempts or 1) > 1


#: The empty layer.
NO_HEDGE_POLICY = HedgePolicy()
#: Defaults: no hedging; when enabled, at p95, on gateway failures and 429, idempotent requests only.
DEFAULT_HEDGE_POLICY = HedgePolicy(
    max_attempts=1, percentile=DEFAULT_HEDGE_PERCENTILE, non_fatal=DEFAULT_NON_FATAL, non_idempotent=False
)


def hedgeable(method: str, *, has_idempotency_key: bool, policy: HedgePolicy) -> bool:
    """Whether a request may be hedged at all: an enabled policy, and an idempotent method (RFC 9110 9.2.2),
    an ``Idempotency-Key`` header or ``non_idempotent`` opt-in. Decided once per call, before the first send."""
    if not policy.enabled:
        return False
    return bool(policy.non_idempotent) or has_idempotency_key or method.upper() in IDEMPOTENT_METHODS


@dataclass(frozen=True, slots=True)
class HedgeSettings:
    """Per-service hedging state sizes (shared by every call to the service, like the retry budget).

    * ``max_extra_load`` -- hedges may add at most this share of requests (Finagle's ``maxExtraLoad``),
      0 <= x < 1. Default 0.05.
    * ``min_delay`` -- floor of a percentile-derived delay (Finagle's ``minSendBackupAfterMs``). Default 1 ms.
    * ``window`` -- latency window, 10 slices (Finagle: 30 s, in 3 buckets of 10 s). 1-300 s. Default 30 s.
    * ``min_samples`` -- latencies the window needs before a percentile delay is used. Default 100.
    """

    max_extra_load: float = DEFAULT_MAX_EXTRA_LOAD
    min_delay: float = DEFAULT_MIN_DELAY
    window: float = DEFAULT_WINDOW
    min_samples: int = DEFAULT_MIN_SAMPLES

    def __post_init__(self) -> None:
        x = self.max_extra_load
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x < 1.0:
            raise ConfigError("HedgeSettings.max_extra_load", x, "a fraction 0 <= x < 1, such as 0.05 for 5 %")
        m = self.min_delay
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m < MAX_TRACKABLE:
            raise ConfigError("HedgeSettings.min_delay", m, f"seconds, 0 <= x < {MAX_TRACKABLE:g}")
        w = self.window
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 1.0 <= w <= 300.0:
            raise ConfigError("HedgeSettings.window", w, "a duration of 1 s to 300 s")
        s = self.min_samples
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 1_000_000:
            raise ConfigError("HedgeSettings.min_samples", s, "an integer from 1 to 1000000")


# ---------------------------------------------------------------------------------------------------------
# Cost control


class HedgeBudget:
    """Finagle's backup-request budget: hedges are at most ``max_extra_load`` of requests over the last 10 s.

    A :class:`RetryBudget` with ``percent_can_retry=max_extra_load`` and **no** per-second reserve (Finagle
    uses its 10/s default reserve; without one, "never more than 5 %" holds at any traffic level, at the cost
    of no hedging for the first ~20 requests). ``deposit()`` once per logical request of a call that *may*
    hedge; :meth:`try_acquire` before each hedge, with the service's retry budget: the hedge budget first (it
    is the tighter one), then the retry budget. As in Finagle, a hedge token taken when the retry budget then
    refuses is not given back: that errs on the side of fewer hedges.
    """

    __slots__ = ("_budget", "_lock", "exhausted", "max_extra_load", "sent")

    def __init__(self, max_extra_load: float = DEFAULT_MAX_EXTRA_LOAD, *, clock: Callable[[], float] = time.monotonic):
        if isinstance(max_extra_load, bool) or not 0.0 <= max_extra_load < 1.0:
            raise ConfigError("HedgeSettings.max_extra_load", max_extra_load, "a fraction 0 <= x < 1")
        self.max_extra_load = max_extra_load
        # percent_can_retry=0 would make RetryBudget spend its (empty) reserve: with no reserve that is "never".
        self._budget = RetryBudget(ttl=10.0, min_retries_per_second=0, percent_can_retry=max_extra_load, clock=clock)
        self._lock = threading.Lock()  # guards the two counters (hedges are rare: no cost on the plain path)
        self.sent = 0  # hedges allowed
        self.exhausted = 0  # hedges refused by either budget

    def deposit(self) -> None:
        """Credit one logical request (call it once per call that may hedge, before its first hedge)."""
        self._budget.deposit()

    def try_acquire(self, retry_budget: RetryBudget | None) -> bool:
        """Whether one hedge may be sent now: it takes a token from this budget *and* from ``retry_budget``."""
        ok = (
            self.max_extra_load > 0.0
            and self._budget.try_withdraw()
            and (retry_budget is None or retry_budget.try_withdraw())
        )
        with self._lock:
            if ok:
                self.sent += 1
            else:
                self.exhausted += 1
        return ok

    def balance(self) -> float:
        """Hedges the budget would allow right now (ignoring the retry budget)."""
        return self._budget.balance() if self.max_extra_load > 0.0 else 0.0


# ---------------------------------------------------------------------------------------------------------
# Delay estimator

# Log-linear buckets over integer microseconds (HdrHistogram's layout with 16 sub-buckets per power of two,
# so a bucket is at most 1/16 = 6.25 % wide): values below 32 us have their own bucket; above, the top 5 bits
# pick the bucket. 30 s (30e6 us, 25 bits) ends at index 348.
_SUB_BITS = 4
_SUB = 1 << _SUB_BITS  # 16
_MAX_US = int(MAX_TRACKABLE * 1_000_000)


def _bucket(us: int) -> int:
    if us < 2 * _SUB:
        return us
    shift = us.bit_length() - (_SUB_BITS + 1)
    return (shift << _SUB_BITS) + (us >> shift)


def _bucket_upper_us(index: int) -> int:
    """The largest microsecond value of bucket ``index`` (a percentile reports the bucket's upper edge)."""
    if index < 2 * _SUB:
        return index
    shift = (index >> _SUB_BITS) - 1
    mantissa = index - (shift << _SUB_BITS)
    return ((mantissa + 1) << shift) - 1


_BUCKETS = _bucket(_MAX_US) + 1


class LatencyWindow:
    """Sliding-window latency percentiles (Finagle's ``WindowedPercentileHistogram``, without HdrHistogram).

    ``window`` seconds in 10 slices (30 s in 3 s by default). :meth:`record` is a few integer operations under
    a short lock (two list increments; no allocation beyond CPython's own int objects); slices older than the
    window are subtracted from a running total as time moves on, so a percentile is one scan of 349 counts.
    :meth:`percentile` caches its answer per slice (Finagle refreshes every 3 s), so asking on every request
    costs a comparison. Values above 30 s count as 30 s. Thread-safe.
    """

    __slots__ = ("_cache", "_clock", "_current", "_lock", "_slice_width", "_slices", "_total", "count", "window")

    def __init__(self, window: float = DEFAULT_WINDOW, *, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(window, bool) or not 1.0 <= window <= 300.0:
            raise ConfigError("HedgeSettings.window", window, "a duration of 1 s to 300 s")
        self.window = float(window)
        self._clock = clock
        self._lock = threading.Lock()
        self._slice_width = self.window / _SLICES
        self._slices = [[0] * _BUCKETS for _ in range(_SLICES)]
        self._total = [0] * _BUCKETS
        self.count = 0  # samples in the window
        self._current = int(clock() // self._slice_width)
        self._cache: dict[float, tuple[int, int, float | None]] = {}  # percentile -> (slice, count, value)

    def _advance(self) -> int:
        """Drop slices that left the window; return the current slice's index. Lock held."""
        now_slice = int(self._clock() // self._slice_width)
        current = self._current
        if now_slice <= current:
            return current % _SLICES
        total = self._total
        if now_slice - current >= _SLICES:
            for counts in self._slices:
                counts[:] = [0] * _BUCKETS
            total[:] = [0] * _BUCKETS
            self.count = 0
        else:
            for i in range(current + 1, now_slice + 1):
                counts = self._slices[i % _SLICES]
                removed = 0
                for b, c in enumerate(counts):
                    if c:
                        total[b] -= c
                        counts[b] = 0
                        removed += c
                self.count -= removed
        self._current = now_slice
        return now_slice % _SLICES

    def record(self, seconds: float) -> None:
        """Add one latency (seconds; negatives count as 0, above 30 s as 30 s)."""
        # Above the cap (inf included) counts as the cap; NaN and negatives as 0.
        b = _bucket(_MAX_US if seconds >= MAX_TRACKABLE else int(seconds * 1_000_000) if seconds > 0.0 else 0)
        with self._lock:
            idx = self._advance()
            self._slices[idx][b] += 1
            self._total[b] += 1
            self.count += 1

    def percentile(self, p: float, *, min_samples: int = 1) -> float | None:
        """The latency (seconds) below which ``p`` of the window's samples fall, or ``None`` with fewer than
        ``min_samples`` samples. Rounded up to the bucket's upper edge (at most 6.25 % high)."""
        with self._lock:
            self._advance()
            count = self.count
            cached = self._cache.get(p)
            # Warm: one scan per slice (Finagle refreshes every 3 s). Cold: rescan until min_samples is reached.
            if cached is not None and cached[0] == self._current and cached[1] >= min_samples:
                value = cached[2]
            else:
                value = self._scan(p)
                if len(self._cache) >= 16:  # a few percentiles per service in practice; never grow unbounded
                    self._cache.clear()
                self._cache[p] = (self._current, count, value)
        return value if count >= min_samples else None

    def _scan(self, p: float) -> float | None:
        count = self.count
        if count <= 0:
            return None
        rank = max(1, math.ceil(p * count))
        seen = 0
        for b, c in enumerate(self._total):
            seen += c
            if seen >= rank:
                return _bucket_upper_us(b) / 1_000_000
        return MAX_TRACKABLE  # unreachable while the totals are consistent

    def invalidate(self) -> None:
        """Forget cached percentiles (tests; a new sample does not invalidate, as in Finagle's 3 s refresh)."""
        with self._lock:
            self._cache.clear()


# ---------------------------------------------------------------------------------------------------------
# Pushback


@dataclass(frozen=True, slots=True)
class Pushback:
    """What an answer says about *further* hedges (A6 "Pushback"): ``stop``, or wait ``delay`` seconds."""

    stop: bool = False
    delay: float | None = None


NO_PUSHBACK = Pushback()
STOP_HEDGING = Pushback(stop=True)
_DELTA = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?", re.ASCII)


def hedge_pushback(
    status: int,
    headers: Mapping[str, str],
    *,
    retry_after_cap: float = 300.0,
    parse_retry_after: Callable[[str], float | None] | None = None,
) -> Pushback:
    """The HTTP form of A6's ``grpc-retry-pushback-ms`` for hedges (docs/resilience.md, "Hedging"):

    1. ``x-meshlib-no-retry`` on the answer (a downstream layer already retried) -> stop.
    2. 429 or 503 with ``Retry-After``: delta-seconds or an HTTP-date (``parse_retry_after``, default
       delta-seconds only) of ``0`` -> no pushback; ``n`` up to ``retry_after_cap`` -> next hedge no sooner
       than ``n`` s (later ones at ``n + delay``); unparsable, past, or above the cap -> stop (A6: an
       unparsable pushback means "do not retry").
    3. 429 without ``Retry-After`` -> stop: an explicit "slow down" with no time to come back.
    4. Anything else -> no pushback (the status alone decides, :meth:`HedgeCall.on_answer`).

    ``headers`` must be case-insensitive (httpx ``Headers``) or use lower-case keys.
    """
    if headers.get("x-meshlib-no-retry") is not None:
        return STOP_HEDGING
    if status not in (429, 503):
        return NO_PUSHBACK
    raw = headers.get("retry-after")
    if raw is None:
        return STOP_HEDGING if status == 429 else NO_PUSHBACK
    text = raw.strip()
    delay: float | None
    if parse_retry_after is not None:
        delay = parse_retry_after(text)
    else:
        delay = float(text) if _DELTA.fullmatch(text) else None
    if delay is None or not math.isfinite(delay) or delay < 0.0 or delay > retry_after_cap:
        return STOP_HEDGING
    if delay == 0.0:
        return NO_PUSHBACK
    return Pushback(delay=delay)


# ---------------------------------------------------------------------------------------------------------
# Per-call schedule


class HedgeDecision(enum.Enum):
    """What the plan does with an attempt's answer (:meth:`HedgeCall.on_answer`)."""

    ACCEPT = "accept"  # return this answer; cancel every other attempt
    FAIL = "fail"  # fatal: return this answer/error; cancel every other attempt
    CONTINUE = "continue"  # non-fatal: drop it, keep waiting (and maybe hedge at once)
    EXHAUSTED = "exhausted"  # non-fatal, but nothing in flight and nothing more to send: return this one


class HedgeCall:
    """The hedging state of one logical call: when the next attempt is due and what an answer means.

    Pure and single-threaded (one call is driven by one plan). Times are the caller's clock (monotonic
    seconds). The plan: :meth:`start` at the first send; sleep until :meth:`next_at` (or an answer arrives);
    when due, ask the budget and pick an untried endpoint, then :meth:`sent` (or :meth:`skip` if either
    refused); feed every answer to :meth:`on_answer`. ``delay`` is the resolved delay for this call (fixed or
    the window's percentile, taken once at call start); ``None`` means "no hedge unless an answer asks for
    one" (cold window), so only a non-fatal answer starts another attempt.
    """

    __slots__ = ("_delay", "_max_attempts", "_next_at", "_non_fatal", "in_flight", "sent_count", "stopped")

    def __init__(self, policy: HedgePolicy, delay: float | None) -> None:
        self._max_attempts = policy.max_attempts or 1
        self._non_fatal = policy.non_fatal if policy.non_fatal is not None else DEFAULT_NON_FATAL
        self._delay = delay
        self._next_at: float | None = None
        self.in_flight = 0
        self.sent_count = 0
        self.stopped = False  # pushback or a refused budget: no more hedges

    def start(self, now: float) -> None:
        """The original attempt was sent at ``now``."""
        self.sent_count = 1
        self.in_flight = 1
        self._next_at = now + self._delay if self._delay is not None and self._max_attempts > 1 else None

    def next_at(self) -> float | None:
        """When the next hedge is due (``<= now`` means now), or ``None`` if none is planned."""
        if self.stopped or self.sent_count >= self._max_attempts:
            return None
        return self._next_at

    def due(self, now: float) -> bool:
        """Whether a hedge should be sent at ``now``."""
        at = self.next_at()
        return at is not None and now >= at

    def sent(self, now: float) -> None:
        """A hedge went out at ``now``; the next one is due a delay later (A6: resume at ``hedgingDelay``)."""
        self.sent_count += 1
        self.in_flight += 1
        self._next_at = now + self._delay if self._delay is not None else None

    def skip(self) -> HedgeDecision:
        """The due hedge was not sent (budget empty, no untried endpoint): stop hedging this call.

        Stopping rather than retrying later keeps a refused budget from turning into a busy loop; the
        attempts in flight carry on (``CONTINUE``). ``EXHAUSTED`` if none is: the plan returns the last
        non-fatal answer it dropped.
        """
        self.stopped = True
        return HedgeDecision.EXHAUSTED if self.in_flight <= 0 else HedgeDecision.CONTINUE

    def on_answer(self, now: float, status: int | None, pushback: Pushback = NO_PUSHBACK) -> HedgeDecision:
        """An attempt ended: ``status`` of its response, or ``None`` for a transport failure (connect error,
        reset) that :mod:`meshlib.resilience.classify` deems worth another endpoint (a local error such as a
        closed client is the plan's to raise, not to feed here). Cancelled losers are not answers."""
        self.in_flight -= 1
        if status is not None and status < 400:
            return HedgeDecision.ACCEPT
        if status is not None and status not in self._non_fatal:
            return HedgeDecision.FAIL
        # Non-fatal: A6 sends the next hedge at once, unless pushback says otherwise.
        if pushback.stop:
            self.stopped = True
        elif pushback.delay is not None:
            self._next_at = now + pushback.delay
        else:
            self._next_at = now
        if self.in_flight <= 0 and self.next_at() is None:
            return HedgeDecision.EXHAUSTED
        return HedgeDecision.CONTINUE


class HedgeState:
    """One service's hedging state in one client, shared by its calls: the budget, the window, the counters.

    The latency window is made by the first call that hedges with a percentile delay (:meth:`delay_for`); from
    then on every call to the service records its latency (:meth:`record`), so a service that never hedges
    pays nothing. Counters are read by ``mesh_status()`` and the metrics.
    """

    __slots__ = ("_clock", "_lock", "budget", "cancelled", "last_delay", "settings", "window", "won")

    def __init__(self, settings: HedgeSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self.budget = HedgeBudget(settings.max_extra_load, clock=clock)
        #: Latencies of the service's calls, once a call hedged at a percentile; ``None`` until then.
        self.window: LatencyWindow | None = None
        #: The delay the last hedging call used (``None``: no timed hedge, the window was still cold).
        self.last_delay: float | None = None
        self._lock = threading.Lock()
        self.won = 0  # calls whose accepted answer came from a hedge, not the original
        self.cancelled = 0  # attempts cancelled because another one's answer was accepted

    def delay_for(self, policy: HedgePolicy) -> float | None:
        """The delay of one hedging call (:func:`resolve_delay`), starting the window if the policy needs it."""
        window = self.window
        if window is None and policy.delay is None:
            with self._lock:
                window = self.window
                if window is None:
                    window = self.window = LatencyWindow(self.settings.window, clock=self._clock)
        delay = resolve_delay(policy, self.settings, window)
        self.last_delay = delay
        return delay

    def record(self, seconds: float) -> None:
        """One call's latency, if a percentile delay reads them (one attribute test otherwise)."""
        window = self.window
        if window is not None:
            window.record(seconds)

    def count(self, *, won: int = 0, cancelled: int = 0) -> None:
        """Add to the counters (hedged calls only: no cost on the plain path)."""
        with self._lock:
            self.won += won
            self.cancelled += cancelled


def resolve_delay(policy: HedgePolicy, settings: HedgeSettings, window: LatencyWindow | None) -> float | None:
    """The delay for one call: the fixed ``delay``; else the window's percentile floored at ``min_delay``;
    ``None`` (no timed hedge) while the window holds fewer than ``min_samples`` or the percentile reaches 30 s."""
    if policy.delay is not None:
        return policy.delay
    if window is None:
        return None
    p = policy.percentile if policy.percentile is not None else DEFAULT_HEDGE_PERCENTILE
    value = window.percentile(p, min_samples=settings.min_samples)
    if value is None or value >= MAX_TRACKABLE:
        return None
    return max(settings.min_delay, value)


# ---------------------------------------------------------------------------------------------------------
# Environment

_PERCENTILE = re.compile(r"[pP]([0-9]{1,2}(?:\.[0-9]{1,4})?)", re.ASCII)


def parse_hedge_delay(variable: str, raw: str) -> tuple[float | None, float | None]:
    """``30ms`` (fixed delay) or ``p95`` / ``p99.9`` (percentile) -> ``(delay, percentile)``."""
    text = raw.strip()
    match = _PERCENTILE.fullmatch(text)
    if match is not None:
        value = round(float(match.group(1)) / 100.0, 8)  # p99.9 -> 0.999, not 0.9990000000000001
        if not 0.0 < value < 1.0:
            raise ConfigError(variable, raw, "a percentile above p0 and below p100, such as p95 or p99.9")
        return None, value
    try:
        return parse_duration(variable, text, allow_zero=True), None
    except ConfigError:
        raise ConfigError(
            variable, raw, "a duration such as 30ms (0 = all attempts at once) or a percentile such as p95"
        ) from None


def hedge_from_env(
    environ: Mapping[str, str], prefix: str = "MESHLIB_", base: HedgeSettings | None = None
) -> tuple[HedgePolicy, HedgeSettings]:
    """The hedging layer and settings from ``<prefix>HEDGE_*`` (``MESHLIB_`` or ``MESHLIB_SERVICE_<NAME>__``).

    Unset variables leave the policy fields ``None`` (inherit) and the settings at ``base``. Errors name the
    variable and the value.
    """

    def get(name: str) -> tuple[str, str] | None:
        variable = f"{prefix}HEDGE_{name}"
        raw = environ.get(variable)
        return None if raw is None else (variable, raw)

    fields: dict[str, object] = {}
    if (found := get("MAX_ATTEMPTS")) is not None:
        n = parse_int(*found)
        if not 1 <= n <= HEDGE_MAX_ATTEMPTS:
            raise ConfigError(
                found[0], found[1], f"an integer from 1 (no hedging) to {HEDGE_MAX_ATTEMPTS} (gRFC A6's cap)"
            )
        fields["max_attempts"] = n
    if (found := get("DELAY")) is not None:
        fields["delay"], fields["percentile"] = parse_hedge_delay(*found)
    if (found := get("NON_FATAL")) is not None:
        codes = parse_statuses(*found)
        if any(c < 400 for c in codes):
            raise ConfigError(found[0], found[1], "failure statuses (400-599), such as 429,502,503,504, or none")
        fields["non_fatal"] = codes
    if (found := get("NON_IDEMPOTENT")) is not None:
        fields["non_idempotent"] = parse_bool(*found)
    policy = HedgePolicy(**fields)  # type: ignore[arg-type]

    settings = base or HedgeSettings()
    extra, min_delay, window, min_samples = (
        settings.max_extra_load,
        settings.min_delay,
        settings.window,
        settings.min_samples,
    )
    if (found := get("MAX_EXTRA_LOAD")) is not None:
        extra = parse_fraction(*found)
        if not 0.0 <= extra < 1.0:
            raise ConfigError(found[0], found[1], "a fraction 0 <= x < 1 (0.05) or a percentage below 100% (5%)")
    if (found := get("MIN_DELAY")) is not None:
        min_delay = parse_duration(*found, allow_zero=True)
        if min_delay >= MAX_TRACKABLE:
            raise ConfigError(found[0], found[1], f"a duration below {MAX_TRACKABLE:g}s")
    if (found := get("WINDOW")) is not None:
        window = parse_duration(*found)
        if not 1.0 <= window <= 300.0:
            raise ConfigError(found[0], found[1], "a duration of 1s to 300s")
    if (found := get("MIN_SAMPLES")) is not None:
        min_samples = parse_int(*found)
        if not 1 <= min_samples <= 1_000_000:
            raise ConfigError(found[0], found[1], "an integer from 1 to 1000000")
    return policy, HedgeSettings(max_extra_load=extra, min_delay=min_delay, window=window, min_samples=min_samples)
