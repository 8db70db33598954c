"""A per-service cap on requests in flight: a bulkhead that refuses at once instead of queueing.

When a service slows down, callers keep arriving while earlier requests are still waiting, and without a cap
each one holds a thread, a task, a socket and memory until the whole process falls over with it. A cap
bounds that: over it, the request fails immediately with :class:`meshlib.OverloadedError` (which the caller
can shed, degrade or retry later), and the rest of the process keeps working. There is deliberately no
queue: a queue in front of an overloaded service only adds latency and memory before the same failure.

Default ``max_inflight=1024``: Envoy's circuit-breaker threshold ``max_requests`` (1024 per cluster) and
``max_pending_requests``, and gRPC's default for A32 ``max_concurrent_requests``.

One object serves the sync and the async client: :meth:`ConcurrencyLimit.try_acquire` never blocks or
awaits, its lock is held for an increment, so it is safe (and cheap) to call from an event loop.
"""

from __future__ import annotations

import threading

__all__ = ["ConcurrencyLimit"]


class ConcurrencyLimit:
    """Counts requests in flight for one service and refuses beyond ``max_inflight``.

    Every successful :meth:`try_acquire` must be paired with exactly one :meth:`release` (in a ``finally``,
    or when a streamed response is closed). Counters: ``inflight`` (now), ``peak`` (highest seen) and
    ``rejected`` (refusals).
    """

    __slots__ = ("_lock", "inflight", "max_inflight", "peak", "rejected")

    def __init__(self, max_inflight: int = 1024) -> None:
        if max_inflight < 1:
            raise ValueError(f"ConcurrencyLimit max_inflight must be >= 1, not {max_inflight!r}")
        self.max_inflight = max_inflight
        self._lock = threading.Lock()
        self.inflight = 0
        self.peak = 0
        self.rejected = 0

    def try_acquire(self) -> bool:
        """Take a slot: ``True`` if the request may proceed, ``False`` (counted) if the service is at its cap."""
        with self._lock:
            if self.inflight >= self.max_inflight:
                self.rejected += 1
                return False
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            return True

    def release(self, rtt: float | None = None) -> None:
        """Give a slot back. Raises :class:`RuntimeError` if none is held (a bug: a double release).

        ``rtt`` (the request's latency) is accepted and ignored, so a service can hold this limit or
        :class:`~meshlib.resilience.adaptive.AdaptiveConcurrencyLimit` and release either the same way.
        """
        with self._lock:
            if self.inflight <= 0:
                raise RuntimeError("ConcurrencyLimit.release() called more often than try_acquire() succeeded")
            self.inflight -= 1

    def __repr__(self) -> str:
        return f"ConcurrencyLimit(max_inflight={self.max_inflight}, inflight={self.inflight})"
