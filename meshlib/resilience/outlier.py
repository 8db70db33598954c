"""Envoy-style outlier detection: take an endpoint that fails more than its peers out of rotation for a while.

The breaker (:mod:`meshlib.resilience.breaker`) reacts in about a second and probes quickly; outlier
detection is the slower, coarser judgement on top, as Envoy does it, with three detectors sharing one
ejection state (the same multiplier, durations, percentage cap and panic rule):

* **consecutive failures** (Envoy ``consecutive_5xx``), inline in :meth:`OutlierDetector.record`: after
  ``consecutive_failures`` failures in a row (5xx, connection failures, timeouts:
  ``Classification.endpoint_failure``) the endpoint is ejected at once;
* **success rate** (Envoy ``success_rate_*``, gRFC A50), once per interval in
  :meth:`OutlierDetector.evaluate`: among the endpoints with at least ``request_volume`` attempts in the
  interval (and at least ``minimum_hosts`` of them), one whose success rate is below
  ``mean - stdev_factor / 1000 x stdev`` (population standard deviation) is ejected with probability
  ``enforcement_percentage`` %;
* **failure percentage** (Envoy ``failure_percentage_*``, gRFC A50), in the same sweep: an endpoint with at
  least ``request_volume`` attempts whose failure percentage is at least ``threshold`` is ejected with
  probability ``enforcement_percentage`` % (default 0: off, as in Envoy).

An ejected endpoint is excluded from balancing for ``base_ejection x times ejected``, capped at
``max_ejection``. A host that fails again right after coming back stays out longer (30 s, 60 s, 90 s ...
300 s); one that stays healthy has its multiplier decremented once per ``interval`` until it is forgiven.

Two guards keep detection from making an outage worse:

* **max ejection percent**: an endpoint is ejected only if none is, or fewer than ``max_ejection_percent``
  of the endpoints are (so at least one can always be ejected: with 3 endpoints and 10 %, one), whichever
  detector asks;
* **panic** (:meth:`OutlierDetector.panic`): when fewer than ``panic_threshold`` (50 %) of the endpoints
  are healthy (not ejected, breaker not open), health is ignored and traffic spreads over all of them:
  the likelier story is that something is wrong everywhere, and concentrating all load on the few
  "healthy" ones would knock them over too.

Defaults are Envoy's (``config.cluster.v3.OutlierDetection``): ``consecutive_5xx: 5`` (also Istio's
``consecutive5xxErrors``; gRPC's A50 deliberately does not implement consecutive ejection),
``base_ejection_time: 30s``, ``max_ejection_time: 300s``, ``max_ejection_percent: 10``, ``interval: 10s``
(also A50's and Istio's), the success-rate and failure-percentage defaults of
:class:`SuccessRateEjection` and :class:`FailurePercentageEjection`; panic at Envoy's
``healthy_panic_threshold: 50%`` (Finagle's ``PanicMode`` is the same idea). docs/resilience.md
("Outlier ejection by success rate and failure percentage") gives the sources and where meshlib departs
from them.

Pure decision code: no I/O, no timers, injected ``clock`` and ``randrange``. Thread-safe: one short lock
for ejection state, and one per endpoint held only for two integer additions while the rate detectors
count. The reads the request path makes (:meth:`~OutlierDetector.is_ejected`,
:meth:`~OutlierDetector.ejected`) take no lock while nothing is ejected. Ejections and readmissions are
logged on ``meshlib.resilience``.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "CONSECUTIVE",
    "EJECTION_REASONS",
    "FAILURE_PERCENTAGE",
    "SUCCESS_RATE",
    "FailurePercentageEjection",
    "OutlierDetector",
    "SuccessRateEjection",
]

logger = logging.getLogger("meshlib.resilience")

K = TypeVar("K", bound=Hashable)

_INF = math.inf

#: Why an endpoint was ejected (shown by ``mesh_status()`` and ``meshlib status``, an attribute of the
#: ``meshlib.client.ejections`` counter): which detector ejected it.
CONSECUTIVE = "consecutive"
SUCCESS_RATE = "success-rate"
FAILURE_PERCENTAGE = "failure-percentage"
EJECTION_REASONS = (CONSECUTIVE, SUCCESS_RATE, FAILURE_PERCENTAGE)


def _check_count(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.{name} must be an integer >= 0, not {value!r}")


def _check_percent(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"{owner}.{name} must be an integer percentage within 0-100, not {value!r}")


@dataclass(frozen=True, slots=True)
class SuccessRateEjection:
    """Success-rate ejection (gRFC A50 ``SuccessRateEjection``; Envoy ``success_rate_*``), Envoy's defaults.

    Each interval, if at least ``minimum_hosts`` endpoints had at least ``request_volume`` attempts, the
    mean and population standard deviation of their success rates (percent) are computed; an endpoint
    among them whose rate is below ``mean - stdev_factor / 1000 x stdev`` is ejected with probability
    ``enforcement_percentage`` %. ``stdev_factor`` is in thousandths as in Envoy (1900 = 1.9).
    """

    stdev_factor: int = 1900
    enforcement_percentage: int = 100
    minimum_hosts: int = 5
    request_volume: int = 100

    def __post_init__(self) -> None:
        _check_count("SuccessRateEjection", "stdev_factor", self.stdev_factor)
        _check_percent("SuccessRateEjection", "enforcement_percentage", self.enforcement_percentage)
        _check_count("SuccessRateEjection", "minimum_hosts", self.minimum_hosts)
        _check_count("SuccessRateEjection", "request_volume", self.request_volume)


@dataclass(frozen=True, slots=True)
class FailurePercentageEjection:
    """Failure-percentage ejection (gRFC A50 ``FailurePercentageEjection``; Envoy ``failure_percentage_*``).

    Each interval, if at least ``minimum_hosts`` endpoints had at least ``request_volume`` attempts, an
    endpoint among them whose failure percentage is ``>= threshold`` (Envoy's comparison) is ejected with
    probability ``enforcement_percentage`` %. The default enforcement is Envoy's ``0``: the detector is
    off unless asked for, because an absolute threshold ejects regardless of how the peers do.
    """

    threshold: int = 85
    enforcement_percentage: int = 0
    minimum_hosts: int = 5
    request_volume: int = 50

    def __post_init__(self) -> None:
        _check_percent("FailurePercentageEjection", "threshold", self.threshold)
        _check_percent("FailurePercentageEjection", "enforcement_percentage", self.enforcement_percentage)
        _check_count("FailurePercentageEjection", "minimum_hosts", self.minimum_hosts)
        _check_count("FailurePercentageEjection", "request_volume", self.request_volume)


class _Host:
    __slots__ = ("counts", "failures", "healthy_since", "multiplier", "streak", "total")

    def __init__(self) -> None:
        self.streak = 0  # consecutive failures
        self.multiplier = 0  # Envoy's "number of times ejected", decremented while healthy
        self.healthy_since: float | None = None  # when last readmitted (multiplier decay starts there)
        # This interval's attempts and failures (A50's active bucket); evaluate() reads and zeroes them,
        # which is the bucket swap. Guarded by ``counts``, held only for the additions.
        self.counts = threading.Lock()
        self.total = 0
        self.failures = 0


class OutlierDetector(Generic[K]):
    """Outlier detection over one service's endpoints (keys: ``Endpoint`` or address).

    Call :meth:`set_endpoints` whenever membership changes (removed endpoints are forgotten; results for
    unknown keys are ignored from then on, so a late answer from a removed endpoint changes nothing), and
    :meth:`record` after every attempt. Before :meth:`set_endpoints` is first called, endpoints are learnt
    from :meth:`record`. ``name`` (the service) only labels log lines.

    Consecutive-failure ejection happens inside :meth:`record`. Success-rate and failure-percentage
    ejection happen in :meth:`evaluate`, which the owner calls every ``interval`` seconds from a timer, off
    the request path (a client runs one timer for all its services: :mod:`meshlib.resilience.sweep`).
    ``success_rate=None`` or ``failure_percentage=None`` (or an enforcement of 0) turns that detector off;
    with both off, :meth:`record` counts nothing beyond the consecutive streak. ``randrange(100)`` draws the enforcement
    chance (an integer in ``[0, 100)``, as A50 says); it is only called for enforcements strictly between
    0 and 100.

    Counters: ``ejections`` (total, all detectors), ``consecutive_ejections``, ``success_rate_ejections``,
    ``failure_percentage_ejections``, ``readmissions``, ``overflow`` (ejections refused by the percentage
    cap), ``unenforced`` (outliers spared by the enforcement draw). After each :meth:`evaluate`,
    ``success_rate_mean`` and ``success_rate_threshold`` hold that sweep's figures (``None`` when it did
    not run), as Envoy reports them.
    """

    def __init__(
        self,
        consecutive_failures: int = 5,
        base_ejection: float = 30.0,
        max_ejection: float = 300.0,
        max_ejection_percent: float = 10.0,
        *,
        interval: float = 10.0,
        panic_threshold: float = 50.0,
        success_rate: SuccessRateEjection | None = SuccessRateEjection(),
        failure_percentage: FailurePercentageEjection | None = FailurePercentageEjection(),
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
        randrange: Callable[[int], int] | None = None,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, not {consecutive_failures!r}")
        if base_ejection <= 0.0 or max_ejection < base_ejection:
            raise ValueError(f"need 0 < base_ejection <= max_ejection, not {base_ejection!r} and {max_ejection!r}")
        if not 0.0 <= max_ejection_percent <= 100.0:
            raise ValueError(f"max_ejection_percent must be within 0-100, not {max_ejection_percent!r}")
        if interval <= 0.0:
            raise ValueError(f"interval must be > 0, not {interval!r}")
        if not 0.0 <= panic_threshold <= 100.0:
            raise ValueError(f"panic_threshold must be within 0-100, not {panic_threshold!r}")
        if success_rate is not None and not isinstance(success_rate, SuccessRateEjection):
            raise TypeError(f"success_rate must be a SuccessRateEjection or None, not {success_rate!r}")
        if failure_percentage is not None and not isinstance(failure_percentage, FailurePercentageEjection):
            raise TypeError(
                f"failure_percentage must be a FailurePercentageEjection or None, not {failure_percentage!r}"
            )
        self.consecutive_failures = consecutive_failures
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejection_percent = max_ejection_percent
        self.interval = interval
        self.panic_threshold = panic_threshold
        # An enforcement of 0 is "off" (A50's xDS mapping does the same), so it costs nothing to count.
        self.success_rate = success_rate if success_rate and success_rate.enforcement_percentage else None
        self.failure_percentage = (
            failure_percentage if failure_percentage and failure_percentage.enforcement_percentage else None
        )
        self._counting = self.success_rate is not None or self.failure_percentage is not None
        self.name = name
        self._clock = clock
        # Per detector, never the module's shared generator: two clients' draws stay independent.
        self._randrange = randrange if randrange is not None else random.Random().randrange
        self._lock = threading.Lock()
        self._hosts: dict[K, _Host] = {}
        self._membership_known = False
        # Ejected keys -> readmission time. Replaced, never mutated, so unlocked readers see a whole dict.
        self._until: dict[K, float] = {}
        self._snapshot: frozenset[K] = frozenset()
        self._next_expiry = _INF
        # The multiplier stops growing once base x multiplier reaches the cap (Envoy does the same).
        self._max_multiplier = max(1, math.ceil(max_ejection / base_ejection))
        # Ejected keys -> the reason (one of EJECTION_REASONS); replaced with _until, never mutated.
        self._why: dict[K, str] = {}
        self.ejections = 0
        self.consecutive_ejections = 0
        self.success_rate_ejections = 0
        self.failure_percentage_ejections = 0
        self.readmissions = 0
        self.overflow = 0
        self.unenforced = 0
        self.success_rate_mean: float | None = None
        self.success_rate_threshold: float | None = None

    # -- membership --------------------------------------------------------------------------------------

    def set_endpoints(self, keys: Iterable[K]) -> None:
        """The service's endpoints changed: track exactly ``keys`` (new ones start healthy)."""
        wanted = set(keys)
        with self._lock:
            self._membership_known = True
            self._hosts = {key: self._hosts.get(key) or _Host() for key in wanted}
            if any(key not in wanted for key in self._until):
                self._publish({key: until for key, until in self._until.items() if key in wanted})

    # -- the request path --------------------------------------------------------------------------------

    def record(self, key: K, failure: bool) -> bool:
        """Count one attempt's result (``failure`` = ``Classification.endpoint_failure``).

        Returns ``True`` when this failure ejected the endpoint (consecutive failures; the rate detectors
        eject in :meth:`evaluate`).
        """
        host = self._hosts.get(key)
        if host is None:
            if self._membership_known:
                return False
            with self._lock:
                host = self._hosts.get(key)
                if host is None:
                    if self._membership_known:
                        return False
                    host = self._hosts[key] = _Host()
        if self._counting:
            with host.counts:  # two additions; never contended by anything slower than another record()
                host.total += 1
                if failure:
                    host.failures += 1
        if not failure and host.streak == 0:
            return False  # the common case: a success on a healthy endpoint, no shared lock
        with self._lock:
            if self._hosts.get(key) is not host:
                return False  # removed (or replaced) meanwhile
            if not failure:
                host.streak = 0
                return False
            host.streak += 1
            if host.streak < self.consecutive_failures:
                return False
            now = self._clock()
            readmitted = self._expire(now)
            if key in self._until:
                event = None  # already out (traffic reaches it only in panic mode)
            elif self._full():
                self.overflow += 1  # keep the streak: the next failure tries again once there is room
                event = None
            else:
                event = self._eject(key, host, now, CONSECUTIVE)
                self.consecutive_ejections += 1
        self._log_readmitted(readmitted)
        if event is None:
            return False
        logger.warning(
            "outlier detection%s: ejected %s for %.0f s after %d consecutive failures (multiplier %d)",
            self._label(),
            key,
            *event,
        )
        return True

    def is_ejected(self, key: K) -> bool:
        """Whether ``key`` is ejected now (readmits it, lazily, once its time has passed)."""
        until = self._until.get(key)
        if until is None:
            return False
        if self._clock() < until:
            return True
        self._readmit_expired()
        return False

    def ejected(self) -> frozenset[K]:
        """The endpoints ejected now: a cached immutable set, rebuilt only when it changes."""
        if not self._until:
            return self._snapshot
        if self._clock() >= self._next_expiry:
            self._readmit_expired()
        return self._snapshot

    def reasons(self) -> dict[K, str]:
        """Why each endpoint ejected now is out: key -> :data:`CONSECUTIVE`, :data:`SUCCESS_RATE` or
        :data:`FAILURE_PERCENTAGE` (readmits lazily first, as :meth:`ejected` does; a copy)."""
        ejected = self.ejected()
        why = self._why
        return {key: why[key] for key in ejected if key in why}

    @property
    def clock(self) -> Callable[[], float]:
        """The clock ejection and readmission times are read from; tests replace it with a fake one."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def panic(self, total: int, healthy: int) -> bool:
        """Envoy's panic mode: ``True`` when fewer than ``panic_threshold`` % of ``total`` endpoints are
        ``healthy``; the caller should then ignore health and balance over every endpoint."""
        return total > 0 and healthy * 100.0 < self.panic_threshold * total

    # -- the interval timer ------------------------------------------------------------------------------

    def evaluate(self) -> frozenset[K]:
        """One interval's sweep (A50's timer, Envoy's ``onIntervalTimer``); returns the endpoints it ejected.

        Call every ``interval`` seconds, per service, from a timer off the request path. It takes each
        endpoint's attempts and failures since the previous sweep (zeroing them: the bucket swap), readmits
        endpoints whose time is up, runs the success-rate and the failure-percentage detectors over the
        endpoints not ejected, then decays the multipliers of those still in rotation. Outliers are taken
        worst first, so when the percentage cap leaves room for fewer than all, the worst go. Cost: O(n log n) in the
        endpoints; nothing on the request path waits for it except a record() on the same endpoint for the
        moment its two counters are read.
        """
        now = self._clock()
        events: list[tuple[K, str, float, int]] = []
        with self._lock:
            readmitted = self._expire(now)
            # (key, host, attempts, success rate %) of the endpoints in rotation that had traffic.
            stats: list[tuple[K, _Host, int, float]] = []
            for key, host in self._hosts.items():
                with host.counts:
                    total, failures = host.total, host.failures
                    host.total = host.failures = 0
                if total and key not in self._until:
                    stats.append((key, host, total, 100.0 * (total - failures) / total))
            self.success_rate_mean = self.success_rate_threshold = None
            if self.success_rate is not None:
                events += self._success_rate(self.success_rate, stats, now)
            if self.failure_percentage is not None:
                events += self._failure_percentage(self.failure_percentage, stats, now)
            for host in self._hosts.values():
                self._heal(host, now)  # after the detectors, as A50's step 5 and Envoy do
        self._log_readmitted(readmitted)
        for key, why, duration, multiplier in events:
            logger.warning(
                "outlier detection%s: ejected %s for %.0f s, %s (multiplier %d)",
                self._label(),
                key,
                duration,
                why,
                multiplier,
            )
        return frozenset(key for key, *_ in events)

    def _success_rate(
        self, config: SuccessRateEjection, stats: list[tuple[K, _Host, int, float]], now: float
    ) -> list[tuple[K, str, float, int]]:
        """Envoy's ``successRateEjectionThreshold`` and A50's success-rate algorithm (lock held)."""
        valid = [entry for entry in stats if entry[2] >= config.request_volume]
        if not valid or len(valid) < config.minimum_hosts:
            return []
        mean = math.fsum(rate for *_, rate in valid) / len(valid)
        stdev = math.sqrt(math.fsum((rate - mean) ** 2 for *_, rate in valid) / len(valid))  # population
        threshold = mean - config.stdev_factor / 1000.0 * stdev
        self.success_rate_mean, self.success_rate_threshold = mean, threshold
        events = []
        for key, host, total, rate in sorted(valid, key=lambda entry: entry[3]):
            if rate >= threshold:
                break  # sorted: no one further is below it
            if self._enforce(config.enforcement_percentage):
                duration, multiplier = self._eject(key, host, now, SUCCESS_RATE, swept=True)[::2]
                self.success_rate_ejections += 1
                why = (
                    f"success rate {rate:.1f} % of {total} attempts below the threshold {threshold:.1f} % "
                    f"(mean {mean:.1f} % of {len(valid)} endpoints)"
                )
                events.append((key, why, duration, multiplier))
        return events

    def _failure_percentage(
        self, config: FailurePercentageEjection, stats: list[tuple[K, _Host, int, float]], now: float
    ) -> list[tuple[K, str, float, int]]:
        """A50's failure-percentage algorithm with Envoy's ``>=`` comparison (lock held)."""
        valid = [entry for entry in stats if entry[2] >= config.request_volume]
        if not valid or len(valid) < config.minimum_hosts:
            return []
        events = []
        for key, host, total, rate in sorted(valid, key=lambda entry: entry[3]):
            failed = 100.0 - rate
            if failed < config.threshold:
                break
            if key in self._until:
                continue  # ejected by success rate in this sweep
            if self._enforce(config.enforcement_percentage):
                duration, multiplier = self._eject(key, host, now, FAILURE_PERCENTAGE, swept=True)[::2]
                self.failure_percentage_ejections += 1
                why = f"{failed:.1f} % of {total} attempts failed (threshold {config.threshold} %)"
                events.append((key, why, duration, multiplier))
        return events

    def _enforce(self, percentage: int) -> bool:
        """The percentage cap, then the enforcement draw, in Envoy's order (lock held)."""
        if self._full():
            self.overflow += 1
            return False
        if percentage < 100 and self._randrange(100) >= percentage:
            self.unenforced += 1
            return False
        return True

    # -- internals ---------------------------------------------------------------------------------------

    def _full(self) -> bool:
        """Whether the percentage cap forbids another ejection (lock held): at least one is always allowed."""
        ejected = len(self._until)
        return ejected > 0 and ejected * 100.0 >= self.max_ejection_percent * len(self._hosts)

    def _heal(self, host: _Host, now: float) -> None:
        """Decrement the multiplier once per whole ``interval`` healthy since readmission (lock held)."""
        if host.healthy_since is None or host.multiplier == 0:
            return
        steps = int((now - host.healthy_since) // self.interval)
        if steps > 0:
            host.multiplier = max(0, host.multiplier - steps)
            host.healthy_since += steps * self.interval

    def _eject(self, key: K, host: _Host, now: float, reason: str, *, swept: bool = False) -> tuple[float, int, int]:
        """Eject ``key`` (lock held); returns (duration, streak, multiplier) for the log line.

        The multiplier first decays by the whole intervals the endpoint spent healthy since readmission; for
        an ejection by :meth:`evaluate` (``swept``) the interval just ending does not count, since it is the
        one that found the endpoint an outlier (Envoy decrements only endpoints not ejected by the sweep).
        """
        self._heal(host, now - self.interval if swept else now)
        host.multiplier = min(host.multiplier + 1, self._max_multiplier)
        duration = min(self.base_ejection * host.multiplier, self.max_ejection)
        streak, host.streak, host.healthy_since = host.streak, 0, None
        self._publish({**self._until, key: now + duration}, {**self._why, key: reason})
        self.ejections += 1
        return (duration, streak, host.multiplier)

    def _readmit_expired(self) -> None:
        with self._lock:
            readmitted = self._expire(self._clock())
        self._log_readmitted(readmitted)

    def _log_readmitted(self, readmitted: list[K]) -> None:
        for key in readmitted:
            logger.info("outlier detection%s: readmitted %s", self._label(), key)

    def _label(self) -> str:
        return f" for {self.name}" if self.name else ""

    def _expire(self, now: float) -> list[K]:
        """Readmit every endpoint whose ejection has run out (lock held)."""
        if now < self._next_expiry:
            return []
        readmitted = [key for key, until in self._until.items() if until <= now]
        if readmitted:
            for key in readmitted:
                host = self._hosts.get(key)
                if host is not None:
                    host.streak = 0
                    host.healthy_since = self._until[key]
            self.readmissions += len(readmitted)
            self._publish({key: until for key, until in self._until.items() if until > now})
        return readmitted

    def _publish(self, until: dict[K, float], why: dict[K, str] | None = None) -> None:
        """Install a new ejected map, its reasons and its snapshot (lock held)."""
        source = self._why if why is None else why
        self._why = {key: source[key] for key in until if key in source}
        self._until = until
        self._snapshot = frozenset(until)
        self._next_expiry = min(until.values(), default=_INF)

    def __repr__(self) -> str:
        return f"OutlierDetector({self.name!r}, endpoints={len(self._hosts)}, ejected={len(self._until)})"
