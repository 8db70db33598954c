"""Envoy-style outlier detection: take an endpoint that keeps failing out of rotation for a while.

The breaker (:mod:`meshlib.resilience.breaker`) reacts in about a second and probes quickly; outlier
detection is the slower, coarser judgement on top, as Envoy does it: after ``consecutive_failures``
failures in a row (5xx, connection failures, timeouts: ``Classification.endpoint_failure``), the endpoint
is *ejected*, excluded from balancing for ``base_ejection x times ejected``, capped at ``max_ejection``. A
host that fails again right after coming back stays out longer (30 s, 60 s, 90 s ... 300 s); one that
stays healthy has its multiplier decremented once per ``interval`` until it is forgiven.

Two guards keep detection from making an outage worse:

* **max ejection percent**: an endpoint is ejected only if none is, or fewer than ``max_ejection_percent``
  of the endpoints are (so at least one can always be ejected: with 3 endpoints and 10 %, one);
* **panic** (:meth:`OutlierDetector.panic`): when fewer than ``panic_threshold`` (50 %) of the endpoints
  are healthy (not ejected, breaker not open), health is ignored and traffic spreads over all of them:
  the likelier story is that something is wrong everywhere, and concentrating all load on the few
  "healthy" ones would knock them over too.

Defaults, all Envoy's (``config.cluster.v3.OutlierDetection``, also gRPC's A50 and Istio's):
``consecutive_5xx: 5``, ``base_ejection_time: 30s``, ``max_ejection_time: 300s``,
``max_ejection_percent: 10``, ``interval: 10s`` (here only the multiplier's decay step: ejections happen
inline, as Envoy's consecutive-5xx detector does, and readmission is checked lazily when read); panic at
Envoy's ``healthy_panic_threshold: 50%`` (Finagle's ``PanicMode`` is the same idea).

Pure decision code: no I/O, no timers, injected ``clock``. Thread-safe with one short lock; the reads the
request path makes (:meth:`~OutlierDetector.is_ejected`, :meth:`~OutlierDetector.ejected`) take no lock
while nothing is ejected. Ejections and readmissions are logged on ``meshlib.resilience``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["OutlierDetector"]

logger = logging.getLogger("meshlib.resilience")

K = TypeVar("K", bound=Hashable)

_INF = math.inf


class _Host:
    __slots__ = ("healthy_since", "multiplier", "streak")

    def __init__(self) -> None:
        self.streak = 0  # consecutive failures
        self.multiplier = 0  # Envoy's "number of times ejected", decremented while healthy
        self.healthy_since: float | None = None  # when last readmitted (multiplier decay starts there)


class OutlierDetector(Generic[K]):
    """Consecutive-failure outlier detection over one service's endpoints (keys: ``Endpoint`` or address).

    Call :meth:`set_endpoints` whenever membership changes (removed endpoints are forgotten; results for
    unknown keys are ignored from then on, so a late answer from a removed endpoint changes nothing), and
    :meth:`record` after every attempt. Before :meth:`set_endpoints` is first called, endpoints are learnt
    from :meth:`record`. ``name`` (the service) only labels log lines.

    Counters: ``ejections`` (total), ``readmissions``, ``overflow`` (ejections refused by the percentage cap).
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
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
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
        self.consecutive_failures = consecutive_failures
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejection_percent = max_ejection_percent
        self.interval = interval
        self.panic_threshold = panic_threshold
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._hosts: dict[K, _Host] = {}
        self._membership_known = False
        # Ejected keys -> readmission time. Replaced, never mutated, so unlocked readers see a whole dict.
        self._until: dict[K, float] = {}
        self._snapshot: frozenset[K] = frozenset()
        self._next_expiry = _INF
        # The multiplier stops growing once base x multiplier reaches the cap (Envoy does the same).
        self._max_multiplier = max(1, math.ceil(max_ejection / base_ejection))
        self.ejections = 0
        self.readmissions = 0
        self.overflow = 0

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

        Returns ``True`` when this failure ejected the endpoint.
        """
        host = self._hosts.get(key)
        if not failure and host is not None and host.streak == 0:
            return False  # the common case: a success on a healthy endpoint, no lock
        with self._lock:
            host = self._hosts.get(key)
            if host is None:
                if self._membership_known:
                    return False
                host = self._hosts[key] = _Host()
            if not failure:
                host.streak = 0
                return False
            host.streak += 1
            if host.streak < self.consecutive_failures:
                return False
            now = self._clock()
            readmitted = self._expire(now)
            ejected = len(self._until)
            if key in self._until:
                event = None  # already out (traffic reaches it only in panic mode)
            elif ejected and ejected * 100.0 >= self.max_ejection_percent * len(self._hosts):
                self.overflow += 1  # keep the streak: the next failure tries again once there is room
                event = None
            else:
                event = self._eject(key, host, now)
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

    def _eject(self, key: K, host: _Host, now: float) -> tuple[float, int, int]:
        """Eject ``key`` (lock held); returns (duration, streak, multiplier) for the log line."""
        if host.healthy_since is not None:
            healed = int((now - host.healthy_since) // self.interval)
            host.multiplier = max(0, host.multiplier - healed)
        host.multiplier = min(host.multiplier + 1, self._max_multiplier)
        duration = min(self.base_ejection * host.multiplier, self.max_ejection)
        streak, host.streak, host.healthy_since = host.streak, 0, None
        self._publish({**self._until, key: now + duration})
        self.ejections += 1
        return (duration, streak, host.multiplier)

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

    def panic(self, total: int, healthy: int) -> bool:
        """Envoy's panic mode: ``True`` when fewer than ``panic_threshold`` % of ``total`` endpoints are
        ``healthy``; the caller should then ignore health and balance over every endpoint."""
        return total > 0 and healthy * 100.0 < self.panic_threshold * total

    # -- internals ---------------------------------------------------------------------------------------

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

    def _publish(self, until: dict[K, float]) -> None:
        """Install a new ejected map and its snapshot (lock held)."""
        self._until = until
        self._snapshot = frozenset(until)
        self._next_expiry = min(until.values(), default=_INF)

    def __repr__(self) -> str:
        return f"OutlierDetector({self.name!r}, endpoints={len(self._hosts)}, ejected={len(self._until)})"
