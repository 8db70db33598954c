"""The retry rule of one call (``meshlib.resilience.retry.RetryRule``): its answers, without a network."""

from __future__ import annotations

import time

import pytest

from meshlib.policy import DEFAULT_POLICY, Policy
from meshlib.resilience import RetryBudget
from meshlib.resilience.classify import classify_response
from meshlib.resilience.retry import FINAL, GiveUp, RetryRule

pytestmark = pytest.mark.one_library


def _rule(policy: Policy, *, method: str = "GET", replayable: bool = True) -> RetryRule:
    exhausted: list[int] = []
    return RetryRule(
        DEFAULT_POLICY.merge(policy),
        time.monotonic() + 60,
        RetryBudget(),
        method=method,
        replayable=replayable,
        has_idempotency_key=False,
        on_budget_exhausted=lambda: exhausted.append(1),
    )


def test_retry_after_is_jittered_but_never_past_the_cap() -> None:
    verdict = classify_response(503, {"retry-after": "1"}, retry_statuses=frozenset({503}), retry_after_cap=1.0)
    assert verdict.retry_after == 1.0
    waits = [_rule(Policy(retry_after_cap=1.0, retries=5)).after(verdict, 1) for _ in range(200)]
    assert all(isinstance(w, float) and 0 < w <= 1.0 for w in waits)


def test_final_outcomes_are_not_retried_and_unsafe_resends_say_why() -> None:
    ok = classify_response(200, {}, retry_statuses=frozenset({503}))
    assert _rule(Policy()).after(ok, 1) is FINAL
    failed = classify_response(503, {}, retry_statuses=frozenset({503}))
    post = _rule(Policy(), method="POST").after(failed, 1)
    assert post == GiveUp("not idempotent")
    assert _rule(Policy(), replayable=False).after(failed, 1) == GiveUp("one-shot body consumed")
    assert _rule(Policy(retries=0)).after(failed, 1) == GiveUp("attempts used up")
