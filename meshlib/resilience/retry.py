"""The retry loop: tenacity drives it, meshlib's classifier and budget decide it.

Why tenacity only on the retry path: a ``tenacity.Retrying`` call costs about 9 µs even when the first try
succeeds, more than the rest of the mesh decision put together. So the transport makes the first attempt
itself and hands over to tenacity only when that attempt raised a :class:`~meshlib.call.RetrySignal`; the
first failure is replayed as tenacity's attempt 1 (no I/O), so every retry -- including the first -- goes
through the same predicate, wait, stop and hook:

* **retry** (:func:`_budget_allows`): the attempt asked for a retry *and* the service's retry budget has a
  token. An exhausted budget means no retry, counted by the budget and logged (rate-limited), and the last
  answer or error goes back to the caller: not an error of its own.
* **wait** (:class:`_RetryAfterOrBackoff`): the server's ``Retry-After`` when it gave one (jittered up to
  1.5x, as Envoy's rate-limited backoff), else exponential backoff with full jitter (tenacity's
  ``wait_random_exponential``; base 25 ms, cap 250 ms: Envoy's and Linkerd's defaults).
* **stop** (:class:`_AttemptsOrDeadline`): the policy's attempts are used up, or the sleep would end past the
  call's deadline: no attempt ever starts after the deadline.
* **before_sleep**: the retried response is closed first, so its connection goes back to the pool.

Each call gets its own copy of the configured ``Retrying`` (tenacity keeps per-call state on the object,
and concurrent asyncio tasks on one thread would share it otherwise); the configured objects are built
once per policy and reused.
"""

from __future__ import annotations

import random
import time
from typing import Any

import tenacity

from meshlib.call import RetrySignal
from meshlib.policy import Policy

__all__ = ["RetryLoops"]


def _signal(retry_state: tenacity.RetryCallState) -> RetrySignal | None:
    outcome = retry_state.outcome
    if outcome is None or not outcome.failed:
        return None
    exc = outcome.exception()
    return exc if isinstance(exc, RetrySignal) else None


def _budget_allows(retry_state: tenacity.RetryCallState) -> bool:
    signal = _signal(retry_state)
    if signal is None:
        return False
    service = signal.call.service
    if service.budget.try_withdraw():
        return True
    service.log_budget_exhausted()
    return False


class _RetryAfterOrBackoff(tenacity.wait.wait_base):
    """``Retry-After`` when the server gave one, else full-jitter exponential backoff."""

    def __init__(self, base: float, cap: float) -> None:
        self._backoff = tenacity.wait_random_exponential(multiplier=base, max=cap)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        signal = _signal(retry_state)
        if signal is not None and signal.classification.retry_after is not None:
            delay = signal.classification.retry_after
            return delay * random.uniform(1.0, 1.5)
        return float(self._backoff(retry_state))


class _AttemptsOrDeadline(tenacity.stop.stop_base):
    """Stop when the attempts are used up or the next sleep would end past the call's deadline."""

    def __init__(self, max_attempts: int) -> None:
        self._max_attempts = max_attempts

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        if retry_state.attempt_number >= self._max_attempts:
            return True
        signal = _signal(retry_state)
        if signal is None:
            return True
        return time.monotonic() + (retry_state.upcoming_sleep or 0.0) >= signal.call.deadline


def _close_response(retry_state: tenacity.RetryCallState) -> None:
    signal = _signal(retry_state)
    if signal is not None and signal.response is not None:
        signal.response.close()


async def _aclose_response(retry_state: tenacity.RetryCallState) -> None:
    signal = _signal(retry_state)
    if signal is not None and signal.response is not None:
        await signal.response.aclose()


class RetryLoops:
    """Configured ``Retrying`` / ``AsyncRetrying`` objects per policy, built once and copied per call."""

    def __init__(self) -> None:
        self._sync: dict[tuple[int, float, float], tenacity.Retrying] = {}
        self._async: dict[tuple[int, float, float], tenacity.AsyncRetrying] = {}

    @staticmethod
    def _key(policy: Policy) -> tuple[int, float, float]:
        return (policy.max_attempts, policy.backoff_base or 0.025, policy.backoff_cap or 0.25)

    def _options(self, key: tuple[int, float, float]) -> dict[str, Any]:
        attempts, base, cap = key
        return {
            "retry": _budget_allows,
            "wait": _RetryAfterOrBackoff(base, cap),
            "stop": _AttemptsOrDeadline(attempts),
            "reraise": True,
        }

    def sync(self, policy: Policy) -> tenacity.Retrying:
        """A fresh sync retry loop for one call under ``policy``."""
        key = self._key(policy)
        loop = self._sync.get(key)
        if loop is None:
            loop = self._sync[key] = tenacity.Retrying(before_sleep=_close_response, **self._options(key))
        return loop.copy()

    def asynchronous(self, policy: Policy) -> tenacity.AsyncRetrying:
        """A fresh async retry loop for one call under ``policy`` (sleeps with ``asyncio.sleep``)."""
        key = self._key(policy)
        loop = self._async.get(key)
        if loop is None:
            loop = self._async[key] = tenacity.AsyncRetrying(before_sleep=_aclose_response, **self._options(key))
        return loop.copy()
