"""What discovery answers mean over time: when to ask again, what to serve, when to give up.

One :class:`DiscoveryCache` per service holds the last good endpoint set as an immutable
:class:`Snapshot`. It does no I/O: the refresh loops in :mod:`meshlib.discovery.refresh` (a thread for
``Client``, a task for ``AsyncClient``) call the resolver and report here, and the request path only reads
``snapshot``. The rules, shared by every discovery source:

* an answer is cached for its TTL clamped to ``[ttl_min, ttl_max]`` and refreshed in the background;
* a failure (timeout, NXDOMAIN, server down) or an *empty* answer after a good one keeps the last good set
  serving ("fail static", as Envoy and Linkerd do), logged once per outage and counted, and is retried with
  a backoff from 0.5 s up to ``ttl_min``;
* after ``max_stale`` seconds without a good answer the set is dropped, and calls fail with
  :class:`~meshlib.errors.NoEndpointsError` saying why;
* an empty *first* answer is a :class:`~meshlib.errors.NoEndpointsError` naming the service and source.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshlib.discovery.base import Endpoint, Resolution
from meshlib.errors import NoEndpointsError

logger = logging.getLogger("meshlib.discovery")

#: First retry delay after a discovery failure; doubles up to ``ttl_min``.
FAILURE_BACKOFF_START = 0.5


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An endpoint set as discovery last gave it; replaced whole, never mutated."""

    endpoints: tuple[Endpoint, ...]
    fetched_at: float
    version: int


class DiscoveryCache:
    """Discovery state of one service: the last good snapshot, failure bookkeeping, the refresh schedule."""

    def __init__(
        self,
        service: str,
        source: str,
        *,
        ttl_min: float,
        ttl_max: float,
        max_stale: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.source = source
        self.ttl_min = ttl_min
        self.ttl_max = ttl_max
        self.max_stale = max_stale
        self._clock = clock
        self.snapshot: Snapshot | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        #: Counters for status and metrics: answers applied, failures seen, endpoint-set changes.
        self.refreshes = 0
        self.failures = 0
        self.changes = 0

    def on_answer(self, resolution: Resolution) -> tuple[bool, float | None]:
        """Apply an answer; returns (endpoint set changed, seconds until the next refresh or None)."""
        now = self._clock()
        if not resolution.endpoints:
            return False, self.on_failure("discovery answered with no endpoints")
        previous = self.snapshot
        changed = previous is None or frozenset(previous.endpoints) != frozenset(resolution.endpoints)
        # Keep the old snapshot's tuple when nothing changed, so consumers can compare by identity.
        endpoints = resolution.endpoints if changed or previous is None else previous.endpoints
        version = (previous.version + 1) if previous and changed else (previous.version if previous else 1)
        self.snapshot = Snapshot(endpoints=endpoints, fetched_at=now, version=version)
        self.refreshes += 1
        if self.consecutive_failures:
            logger.info(
                "discovery recovered for service %s (%s) after %d failures",
                self.service,
                self.source,
                self.consecutive_failures,
            )
        self.consecutive_failures = 0
        self.last_error = None
        if changed:
            self.changes += 1  # logged by whoever applies the new set, once it serves traffic
        if resolution.watch:
            return changed, 0.0
        if resolution.ttl is None:
            return changed, None
        return changed, min(max(resolution.ttl, self.ttl_min), self.ttl_max)

    def on_failure(self, reason: str) -> float:
        """Record a failed or empty refresh; returns the delay before trying again."""
        now = self._clock()
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = reason
        snap = self.snapshot
        if snap is not None and now - snap.fetched_at > self.max_stale:
            logger.error(
                "discovery for service %s (%s) failed for longer than max staleness %.0fs; dropping %d endpoints: %s",
                self.service,
                self.source,
                self.max_stale,
                len(snap.endpoints),
                reason,
            )
            self.snapshot = None
        elif self.consecutive_failures == 1:
            logger.warning(
                "discovery failed for service %s (%s); %s: %s",
                self.service,
                self.source,
                f"keeping the last good set of {len(snap.endpoints)} endpoints" if snap else "no endpoints yet",
                reason,
            )
        else:
            logger.debug("discovery still failing for service %s: %s", self.service, reason)
        backoff: float = FAILURE_BACKOFF_START * 2.0 ** (self.consecutive_failures - 1)
        return min(backoff, max(self.ttl_min, FAILURE_BACKOFF_START))

    def usable(self) -> Snapshot:
        """The snapshot to serve from, or a :class:`NoEndpointsError` saying why there is none."""
        snap = self.snapshot
        if snap is not None:
            if self.consecutive_failures and self._clock() - snap.fetched_at > self.max_stale:
                raise NoEndpointsError(
                    self.service,
                    self.source,
                    f"last good answer is older than the maximum staleness ({self.max_stale:.0f}s): {self.last_error}",
                )
            return snap
        raise NoEndpointsError(self.service, self.source, self.last_error or "discovery has not answered yet")

    def age(self) -> float | None:
        """Seconds since the last good answer, for status pages."""
        snap = self.snapshot
        return None if snap is None else self._clock() - snap.fetched_at
