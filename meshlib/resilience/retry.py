"""The retry rule: one object per call answers "retry after X" or "give up, because Y".

Finagle keeps *which* failures retry (``ResponseClassifier``), *how many* (``RetryBudget``) and *when*
(``Backoff``) apart, and tower's ``retry::Policy`` makes the decision one value. :class:`RetryRule` is that
decision for one call, in one place, read by the call plan (:mod:`meshlib._plan`) after every attempt:

1. **worth it** -- the classifier said :attr:`~meshlib.resilience.classify.Outcome.RETRYABLE` (a 5xx marked
   by pushback as already retried downstream is not: :mod:`meshlib.pushback`);
2. **safe** -- never sent, or idempotent / ``Idempotency-Key`` / ``retry_non_idempotent``, and a body that
   can be sent again (a one-shot stream that was consumed cannot);
3. **allowed** -- attempts left (``max_attempts``), time left before the deadline;
4. **when** -- the server's ``Retry-After`` (jittered up to 1.5x, as Envoy's rate-limited backoff), else
   exponential backoff with full jitter (base 25 ms, cap 250 ms: Envoy's and Linkerd's defaults); a sleep
   that would end past the deadline is no retry: no attempt ever starts after the deadline;
5. **affordable** -- last, the service's retry budget gives a token (an exhausted budget is counted and
   logged, rate-limited); asked last so a retry refused for any other reason costs no token.

Giving up for any reason after a retryable outcome notes the exhaustion for pushback, so the answer this hop
returns upstream says "already retried" and the layers above do not multiply the retries.

Where tenacity still earns its place: its wait strategies (``wait_random_exponential`` is the full-jitter
backoff). Its loop does not: the call plan is a sans-I/O generator driven by a blocking and an awaiting
driver, and tenacity's ``Retrying``/``AsyncRetrying`` loops would need the request path written twice again
(and cost ~9 µs per call even when nothing fails).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from meshlib import pushback
from meshlib._testmode import MODE as _TESTING
from meshlib.policy import Policy
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.classify import Classification, Outcome, resendable

if TYPE_CHECKING:
    import tenacity

__all__ = ["FINAL", "GiveUp", "RetryRule"]


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No further attempt, and why (for the caller's error message and the logs)."""

    reason: str


#: The shared "not worth retrying" answer (the outcome itself was final): no message needed.
FINAL = GiveUp("final")


class RetryRule:
    """The retry decision of one call: attempts, safety, deadline, Retry-After, backoff and budget together."""

    __slots__ = ("_backoff", "_budget", "_exhausted", "deadline", "method", "policy", "replayable", "resend_ok")

    def __init__(
        self,
        policy: Policy,
        deadline: float,
        budget: RetryBudget,
        *,
        method: str,
        replayable: bool,
        has_idempotency_key: bool,
        on_budget_exhausted: Callable[[], None],
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.method = method
        self.replayable = replayable
        #: Whether a request that may have reached the server may be sent again (RFC 9110 9.2.2 or opt-in).
        self.resend_ok = resendable(
            method, retry_non_idempotent=bool(policy.retry_non_idempotent), has_idempotency_key=has_idempotency_key
        )
        self._budget = budget
        self._exhausted = on_budget_exhausted
        self._backoff: tenacity.wait.wait_base | None = None

    def why_not_resent(self, verdict: Classification, attempts: int) -> str | None:
        """Why a retryable failure was not re-sent, for the caller's error (``None``: it was final anyway)."""
        if verdict.outcome is not Outcome.RETRYABLE:
            return None
        if verdict.sent and not self.replayable:
            return "not re-sent: the request body was a one-shot stream that has been consumed"
        if verdict.sent and not self.resend_ok:
            return (
                f"not re-sent: the server may have received it and {self.method} is not idempotent "
                "(send an Idempotency-Key header or use Policy(retry_non_idempotent=True) to allow it)"
            )
        return f"gave up after {attempts} attempt(s)"

    def after(self, verdict: Classification, attempts: int) -> float | GiveUp:
        """After attempt number ``attempts`` ended with ``verdict``: seconds to wait before the next, or why not."""
        if verdict.outcome is not Outcome.RETRYABLE:
            return FINAL
        answer = self._decide(verdict, attempts)
        if isinstance(answer, GiveUp):
            pushback.note_exhausted()  # this hop gave up: the hop above must not retry it again
        return answer

    def _decide(self, verdict: Classification, attempts: int) -> float | GiveUp:
        if verdict.sent and not self.replayable:
            return GiveUp("one-shot body consumed")
        if verdict.sent and not self.resend_ok:
            return GiveUp("not idempotent")
        if _TESTING.enabled:  # meshlib.testing.set_testing: its own attempt count, no wait, no budget
            if attempts >= _TESTING.attempts:
                return GiveUp("attempts used up (testing mode)")
            return GiveUp("deadline") if time.monotonic() >= self.deadline else 0.0
        if attempts >= self.policy.max_attempts:
            return GiveUp("attempts used up")
        now = time.monotonic()
        if now >= self.deadline:
            return GiveUp("deadline")
        delay = self._wait(verdict, attempts)
        if now + delay >= self.deadline:
            return GiveUp("deadline")
        if not self._budget.try_withdraw():
            self._exhausted()
            return GiveUp("retry budget exhausted")
        return delay

    def _wait(self, verdict: Classification, attempts: int) -> float:
        if verdict.retry_after is not None:  # jittered up to 1.5x, never past the policy's cap
            return min(verdict.retry_after * random.uniform(1.0, 1.5), self.policy.retry_after_cap or 300.0)
        import tenacity  # on the first retry only: a process whose calls never fail never loads it

        backoff = self._backoff
        if backoff is None:
            policy = self.policy
            backoff = self._backoff = tenacity.wait_random_exponential(
                multiplier=policy.backoff_base or 0.025, max=policy.backoff_cap or 0.25
            )
        state = tenacity.RetryCallState(
            cast(tenacity.BaseRetrying, None), None, (), {}
        )  # the waits read only attempt_number
        state.attempt_number = attempts
        return float(backoff(state))
