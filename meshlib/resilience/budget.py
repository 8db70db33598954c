"""A retry budget: retries allowed as a fraction of recent requests, plus a small steady floor.

Why budgets and not max retries?
--------------------------------
The usual knob, "retry up to N times", has two problems (tower's ``retry::budget`` module explains them well).
N is a guess: big enough to ride out a blip, small enough not to hurt when things really break, and no value
is both. Worse, a per-request maximum multiplies load exactly when the service is failing: with N=3 a total
outage turns every request into four, the extra load keeps the service down, and if the callers' callers
retry as well the factors compound into a self-inflicted denial of service (a *retry storm*).

A budget bounds retries by what the client is doing as a whole: every request *deposits*, every retry
*withdraws*, and a retry that finds the budget empty is simply not made (the last failure is returned).
When a few requests fail, there is plenty of credit and each is retried; when everything fails, retries
add at most ``percent_can_retry`` extra load (20 %), not 300 %. The attempt cap and the deadline still
apply on top.

Defaults and semantics are Finagle's ``RetryBudget()`` (``com.twitter.finagle.service.RetryBudget``): a
10 s TTL, retries worth 20 % of the requests deposited in that window, plus a reserve of 10 retries per
second so a client that has just started, or sends little traffic, can still retry. Linkerd's
ServiceProfile ``retryBudget`` (``retryRatio: 0.2, minRetriesPerSecond: 10, ttl: 10s``) and tower's
``TpsBudget`` use the same numbers and the same algorithm. The budget is shared by everything that calls
one service through one client (sync and async alike, retries and hedges alike).

Implementation, as Finagle's ``TokenRetryBudget`` over a leaky ``TokenBucket``: integer tokens in a windowed
adder of 10 time slices covering ``ttl``. A deposit adds 1000 tokens to the current slice; a retry costs
``1000 / percent_can_retry`` tokens (5000 at 20 %; rounded up where Finagle truncates, so the percentage is
never exceeded), taken from the current slice too, so a withdrawal is forgotten together with the deposits of
its time. The reserve, ``min_retries_per_second x ttl`` retries' worth of tokens, is added to the balance and
never stored, so it grants that many retries per ``ttl`` on its own. Deposits and withdrawals expire 9-10 s
after they were made (slice granularity).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

__all__ = ["RetryBudget"]

#: Finagle's ``TokenRetryBudget.ScaleFactor``: tokens per deposit, so fractional percentages stay integers.
_SCALE = 1000
_SLICES = 10


class RetryBudget:
    """Finagle-style retry budget (see the module docstring for the why and the sources).

    ``deposit()`` once per logical request (not per attempt); ``try_withdraw()`` before each retry, which is
    made only if it returns ``True``. ``ttl`` must be within 1-60 s and ``percent_can_retry`` within 0-1000
    (0.2 is 20 %; 2.0 lets every request retry twice), as Finagle and tower require. A budget with neither
    a floor nor a percentage never allows a retry.

    Thread-safe: one short lock guards a few integer operations; no I/O, no sleeping. ``clock`` is injected
    for deterministic tests. Counters: ``deposits``, ``withdrawals`` (retries allowed) and ``exhausted``
    (retries refused because the budget was empty).
    """

    __slots__ = (
        "_clock",
        "_current",
        "_deposit",
        "_lock",
        "_reserve",
        "_slice_width",
        "_slices",
        "_total",
        "_withdrawal",
        "deposits",
        "exhausted",
        "min_retries_per_second",
        "percent_can_retry",
        "ttl",
        "withdrawals",
    )

    def __init__(
        self,
        ttl: float = 10.0,
        min_retries_per_second: int = 10,
        percent_can_retry: float = 0.2,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1.0 <= ttl <= 60.0:
            raise ValueError(f"RetryBudget ttl must be within 1-60 seconds, not {ttl!r}")
        if min_retries_per_second < 0:
            raise ValueError(f"RetryBudget min_retries_per_second must be >= 0, not {min_retries_per_second!r}")
        if not 0.0 <= percent_can_retry <= _SCALE:
            raise ValueError(f"RetryBudget percent_can_retry must be within 0-{_SCALE}, not {percent_can_retry!r}")
        self.ttl = ttl
        self.min_retries_per_second = min_retries_per_second
        self.percent_can_retry = percent_can_retry
        # As Finagle: with no percentage, deposits earn nothing and a retry costs 1 token of the reserve.
        if percent_can_retry == 0.0:
            self._deposit = 0
            self._withdrawal = 1
        else:
            self._deposit = _SCALE
            # Finagle truncates the cost, which can grant slightly more than the percentage (333 for 3.0);
            # rounding up (after dropping float noise: 1000 / 0.1 is 10000.000000000002) never does.
            self._withdrawal = max(1, math.ceil(round(_SCALE / percent_can_retry, 6)))
        self._reserve = int(min_retries_per_second * ttl) * self._withdrawal
        self._clock = clock
        self._lock = threading.Lock()
        self._slice_width = ttl / _SLICES
        self._slices = [0] * _SLICES
        self._total = 0  # sum of _slices, kept up to date
        self._current = int(clock() // self._slice_width)
        self.deposits = 0
        self.withdrawals = 0
        self.exhausted = 0

    def _advance(self) -> int:
        """Expire slices older than ``ttl``; return the index of the current slice. Call with the lock held."""
        now_slice = int(self._clock() // self._slice_width)
        current = self._current
        if now_slice <= current:  # the common case; a clock that went backwards keeps the current slice
            return current % _SLICES
        slices = self._slices
        if now_slice - current >= _SLICES:
            slices[:] = [0] * _SLICES
            self._total = 0
        else:
            total = self._total
            for i in range(current + 1, now_slice + 1):
                idx = i % _SLICES
                total -= slices[idx]
                slices[idx] = 0
            self._total = total
        self._current = now_slice
        return now_slice % _SLICES

    def deposit(self) -> None:
        """Credit one request (call once per logical request, before or after its first attempt)."""
        with self._lock:
            idx = self._advance()
            self._slices[idx] += self._deposit
            self._total += self._deposit
            self.deposits += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget: ``True`` if the retry may be made, ``False`` (and counted) if not."""
        with self._lock:
            idx = self._advance()
            if self._total + self._reserve < self._withdrawal:
                self.exhausted += 1
                return False
            self._slices[idx] -= self._withdrawal
            self._total -= self._withdrawal
            self.withdrawals += 1
            return True

    def balance(self) -> float:
        """How many retries the budget would allow right now (may be fractional)."""
        with self._lock:
            self._advance()
            return (self._total + self._reserve) / self._withdrawal

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ttl={self.ttl}, min_retries_per_second={self.min_retries_per_second}, "
            f"percent_can_retry={self.percent_can_retry}, balance={self.balance():.1f})"
        )
