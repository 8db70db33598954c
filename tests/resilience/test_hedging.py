"""Hedging building blocks: policy validation and layering, the extra-load budget, the latency window,
pushback, and the per-call schedule (gRFC A6 semantics), all on a fake clock."""

from __future__ import annotations

import math
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.errors import ConfigError
from meshlib.resilience import RetryBudget
from meshlib.resilience.hedging import (
    DEFAULT_HEDGE_POLICY,
    DEFAULT_NON_FATAL,
    HedgeBudget,
    HedgeCall,
    HedgeDecision,
    HedgePolicy,
    HedgeSettings,
    LatencyWindow,
    Pushback,
    hedge_from_env,
    hedge_pushback,
    hedgeable,
    parse_hedge_delay,
    resolve_delay,
)

pytestmark = pytest.mark.one_library


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- policy -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 6}, "max_attempts"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"delay": -0.1}, "delay"),
        ({"delay": math.inf}, "delay"),
        ({"percentile": 1.0}, "percentile"),
        ({"percentile": 0}, "percentile"),
        ({"delay": 0.01, "percentile": 0.9}, "percentile"),
        ({"non_fatal": {200}}, "non_fatal"),
        ({"non_fatal": {600}}, "non_fatal"),
        ({"non_fatal": "503"}, "non_fatal"),
        ({"non_idempotent": "yes"}, "non_idempotent"),
    ],
)
def test_policy_refuses_bad_values_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        HedgePolicy(**kwargs)  # type: ignore[arg-type]
    assert caught.value.variable == f"HedgePolicy.{field}"


def test_policy_defaults_are_off_p95_gateway_failures_idempotent_only() -> None:
    resolved = HedgePolicy().resolved()
    assert resolved == DEFAULT_HEDGE_POLICY
    assert not resolved.enabled
    assert resolved.percentile == 0.95 and resolved.delay is None
    assert resolved.non_fatal == frozenset({429, 502, 503, 504}) and resolved.non_idempotent is False


def test_merge_inner_wins_and_delay_and_percentile_override_as_a_pair() -> None:
    service = HedgePolicy(max_attempts=3, percentile=0.99)
    scoped = service.merge(HedgePolicy(delay=0.03))
    assert (scoped.max_attempts, scoped.delay, scoped.percentile) == (3, 0.03, None)
    back = scoped.merge(HedgePolicy(percentile=0.9))
    assert (back.delay, back.percentile) == (None, 0.9)
    untouched = service.merge(HedgePolicy(non_idempotent=True))
    assert (untouched.percentile, untouched.non_idempotent) == (0.99, True)


def test_only_safe_requests_are_hedgeable() -> None:
    on = HedgePolicy(max_attempts=2).resolved()
    assert hedgeable("GET", has_idempotency_key=False, policy=on)
    assert not hedgeable("POST", has_idempotency_key=False, policy=on)
    assert hedgeable("POST", has_idempotency_key=True, policy=on)
    assert hedgeable("patch", has_idempotency_key=False, policy=on.merge(HedgePolicy(non_idempotent=True)))
    assert not hedgeable("GET", has_idempotency_key=False, policy=DEFAULT_HEDGE_POLICY)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_extra_load": 1.0}, "max_extra_load"),
        ({"max_extra_load": -0.01}, "max_extra_load"),
        ({"min_delay": -1}, "min_delay"),
        ({"window": 0.5}, "window"),
        ({"min_samples": 0}, "min_samples"),
    ],
)
def test_settings_refuse_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        HedgeSettings(**kwargs)  # type: ignore[arg-type]
    assert caught.value.variable == f"HedgeSettings.{field}"


# --- environment --------------------------------------------------------------------------------------


def test_env_parses_every_variable() -> None:
    env = {
        "MESHLIB_HEDGE_MAX_ATTEMPTS": "3",
        "MESHLIB_HEDGE_DELAY": "p99.9",
        "MESHLIB_HEDGE_NON_FATAL": "502,503",
        "MESHLIB_HEDGE_NON_IDEMPOTENT": "yes",
        "MESHLIB_HEDGE_MAX_EXTRA_LOAD": "2%",
        "MESHLIB_HEDGE_MIN_DELAY": "2ms",
        "MESHLIB_HEDGE_WINDOW": "60s",
        "MESHLIB_HEDGE_MIN_SAMPLES": "50",
    }
    policy, hedge_settings = hedge_from_env(env)
    assert policy == HedgePolicy(max_attempts=3, percentile=0.999, non_fatal={502, 503}, non_idempotent=True)
    assert hedge_settings == HedgeSettings(max_extra_load=0.02, min_delay=0.002, window=60.0, min_samples=50)


def test_env_unset_inherits_and_service_prefix_is_honoured() -> None:
    policy, hedge_settings = hedge_from_env(
        {"MESHLIB_SERVICE_PAYMENTS__HEDGE_DELAY": "30ms"}, "MESHLIB_SERVICE_PAYMENTS__"
    )
    assert policy == HedgePolicy(delay=0.03)
    assert hedge_settings == HedgeSettings()
    assert hedge_from_env({}) == (HedgePolicy(), HedgeSettings())


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("MAX_ATTEMPTS", "6"),
        ("MAX_ATTEMPTS", "two"),
        ("DELAY", "p100"),
        ("DELAY", "fast"),
        ("DELAY", "-5ms"),
        ("NON_FATAL", "200"),
        ("NON_IDEMPOTENT", "maybe"),
        ("MAX_EXTRA_LOAD", "100%"),
        ("MIN_DELAY", "31s"),
        ("WINDOW", "500ms"),
        ("MIN_SAMPLES", "0"),
    ],
)
def test_env_errors_name_the_variable_and_value(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        hedge_from_env({f"MESHLIB_HEDGE_{name}": raw})
    assert caught.value.variable == f"MESHLIB_HEDGE_{name}"
    assert raw in str(caught.value)


def test_hedge_delay_forms() -> None:
    assert parse_hedge_delay("V", "0") == (0.0, None)
    assert parse_hedge_delay("V", "1.5s") == (1.5, None)
    assert parse_hedge_delay("V", "P95") == (None, 0.95)


# --- budget ---------------------------------------------------------------------------------------------


def test_hedges_never_exceed_the_extra_load_share() -> None:
    clock = FakeClock()
    budget = HedgeBudget(0.05, clock=clock)
    sent = 0
    for _ in range(1000):  # every request wants a hedge: only 5 % get one
        budget.deposit()
        sent += budget.try_acquire(None)
        clock.now += 0.005
    assert sent == 50
    assert budget.sent == 50 and budget.exhausted == 950


def test_no_reserve_so_a_cold_client_does_not_hedge() -> None:
    budget = HedgeBudget(0.05, clock=FakeClock())
    assert not budget.try_acquire(None)
    for _ in range(19):
        budget.deposit()
    assert not budget.try_acquire(None)
    budget.deposit()
    assert budget.try_acquire(None)


def test_a_hedge_also_needs_the_retry_budget() -> None:
    clock = FakeClock()
    budget = HedgeBudget(0.5, clock=clock)
    retry = RetryBudget(min_retries_per_second=0, percent_can_retry=0.2, clock=clock)
    for _ in range(10):
        budget.deposit()
        retry.deposit()
    # The hedge budget has 5 hedges; the retry budget only 2: both are charged, the tighter wins.
    granted = [budget.try_acquire(retry) for _ in range(5)]
    assert granted == [True, True, False, False, False]
    assert retry.withdrawals == 2 and retry.exhausted == 3


def test_zero_extra_load_never_hedges() -> None:
    budget = HedgeBudget(0.0, clock=FakeClock())
    for _ in range(100):
        budget.deposit()
    assert not budget.try_acquire(None) and budget.balance() == 0.0


def test_budget_forgets_old_requests() -> None:
    clock = FakeClock()
    budget = HedgeBudget(0.1, clock=clock)
    for _ in range(100):
        budget.deposit()
    clock.now += 11.0
    assert not budget.try_acquire(None)


# --- latency window ---------------------------------------------------------------------------------------


def test_percentile_of_known_samples_within_bucket_precision() -> None:
    window = LatencyWindow(clock=FakeClock())
    for ms in range(1, 101):  # 1..100 ms
        window.record(ms / 1000)
    p95 = window.percentile(0.95)
    assert p95 is not None and 0.095 <= p95 <= 0.095 * 1.0625
    p50 = window.percentile(0.5)
    assert p50 is not None and 0.050 <= p50 <= 0.050 * 1.0625


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), p=st.sampled_from([0.5, 0.9, 0.95, 0.99]))
def test_percentile_is_never_below_and_at_most_one_bucket_above_the_exact_one(seed: int, p: float) -> None:
    rng = random.Random(seed)
    samples = [rng.lognormvariate(-4.0, 1.0) for _ in range(500)]
    window = LatencyWindow(clock=FakeClock())
    for s in samples:
        window.record(s)
    exact = sorted(samples)[math.ceil(p * len(samples)) - 1]
    got = window.percentile(p)
    assert got is not None
    assert exact - 1e-6 <= got <= exact * 1.0625 + 1e-6


def test_samples_leave_the_window_slice_by_slice() -> None:
    clock = FakeClock(0.0)
    window = LatencyWindow(30.0, clock=clock)
    for _ in range(100):
        window.record(0.010)  # fast, at t=0
    clock.now = 15.0
    for _ in range(100):
        window.record(1.0)  # slow, at t=15
    assert window.count == 200
    assert window.percentile(0.5) == pytest.approx(0.010, rel=0.07)
    clock.now = 30.0  # the t=0 slice has left the window; the t=15 one has not
    p50 = window.percentile(0.5)
    assert window.count == 100
    assert p50 is not None and p50 >= 1.0
    clock.now = 100.0  # everything expired
    assert window.percentile(0.95) is None and window.count == 0


def test_min_samples_gates_the_percentile() -> None:
    window = LatencyWindow(clock=FakeClock())
    for _ in range(99):
        window.record(0.02)
    assert window.percentile(0.95, min_samples=100) is None
    window.record(0.02)  # the cold answer is not cached past the threshold
    assert window.percentile(0.95, min_samples=100) is not None


def test_percentile_is_cached_within_a_slice_and_refreshed_in_the_next() -> None:
    clock = FakeClock(0.0)
    window = LatencyWindow(30.0, clock=clock)
    for _ in range(100):
        window.record(0.010)
    first = window.percentile(0.5)
    for _ in range(1000):
        window.record(0.5)
    assert window.percentile(0.5) == first  # same slice: the cached value (Finagle refreshes every 3 s)
    clock.now = 3.0
    refreshed = window.percentile(0.5)
    assert refreshed is not None and refreshed >= 0.5


def test_out_of_range_latencies_are_clamped() -> None:
    window = LatencyWindow(clock=FakeClock())
    window.record(-1.0)
    window.record(float("nan"))
    window.record(1e9)
    window.record(math.inf)
    assert window.percentile(0.25) == 0.0
    top = window.percentile(1.0 - 1e-9)
    assert top is not None and top >= 30.0


def test_concurrent_records_are_all_counted() -> None:
    window = LatencyWindow(clock=FakeClock())

    def work() -> None:
        for _ in range(2000):
            window.record(0.005)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert window.count == 8000


def test_resolve_delay_fixed_percentile_floor_and_cold() -> None:
    clock = FakeClock()
    window = LatencyWindow(clock=clock)
    conf = HedgeSettings(min_samples=10, min_delay=0.001)
    on = HedgePolicy(max_attempts=2).resolved()
    assert resolve_delay(on, conf, window) is None  # cold: no timed hedge
    assert resolve_delay(on.merge(HedgePolicy(delay=0.02)), conf, window) == 0.02
    for _ in range(10):
        window.record(0.0)
    assert resolve_delay(on, conf, window) == 0.001  # floored at min_delay
    window.invalidate()
    for _ in range(1000):
        window.record(40.0)
    window.invalidate()
    assert resolve_delay(on, conf, window) is None  # p95 beyond 30 s: no hedging, as Finagle


# --- pushback -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {}, Pushback()),
        (503, {}, Pushback()),
        (502, {"retry-after": "5"}, Pushback()),
        (429, {}, Pushback(stop=True)),
        (429, {"retry-after": "0"}, Pushback()),
        (429, {"retry-after": "2"}, Pushback(delay=2.0)),
        (503, {"retry-after": "0.25"}, Pushback(delay=0.25)),
        (503, {"retry-after": "soon"}, Pushback(stop=True)),
        (503, {"retry-after": "301"}, Pushback(stop=True)),
        (500, {"x-meshlib-no-retry": "1"}, Pushback(stop=True)),
    ],
)
def test_pushback_rule(status: int, headers: dict[str, str], expected: Pushback) -> None:
    assert hedge_pushback(status, headers) == expected


def test_pushback_uses_the_injected_retry_after_parser() -> None:
    got = hedge_pushback(503, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, parse_retry_after=lambda _: 1.5)
    assert got == Pushback(delay=1.5)


# --- per-call schedule (A6) --------------------------------------------------------------------------------


def call(max_attempts: int = 3, delay: float | None = 0.1, non_fatal: frozenset[int] = DEFAULT_NON_FATAL) -> HedgeCall:
    return HedgeCall(HedgePolicy(max_attempts=max_attempts, non_fatal=non_fatal).resolved(), delay)


def test_hedges_go_out_every_delay_up_to_max_attempts() -> None:
    c = call(max_attempts=3, delay=0.1)
    c.start(0.0)
    assert not c.due(0.05) and c.next_at() == pytest.approx(0.1)
    assert c.due(0.1)
    c.sent(0.1)
    assert c.next_at() == pytest.approx(0.2)
    c.sent(0.2)
    assert c.next_at() is None and c.in_flight == 3


def test_first_success_wins_whichever_attempt() -> None:
    c = call()
    c.start(0.0)
    c.sent(0.1)
    assert c.on_answer(0.15, 200) is HedgeDecision.ACCEPT


def test_fatal_status_ends_the_call() -> None:
    c = call()
    c.start(0.0)
    c.sent(0.1)
    assert c.on_answer(0.12, 404) is HedgeDecision.FAIL
    assert c.on_answer(0.12, 500) is HedgeDecision.FAIL


def test_non_fatal_sends_the_next_hedge_at_once_then_resumes_the_delay() -> None:
    c = call(max_attempts=3, delay=0.1)
    c.start(0.0)
    assert c.on_answer(0.02, 503) is HedgeDecision.CONTINUE
    assert c.due(0.02)
    c.sent(0.02)
    assert c.next_at() == pytest.approx(0.12)


def test_transport_failure_is_non_fatal() -> None:
    c = call()
    c.start(0.0)
    assert c.on_answer(0.001, None) is HedgeDecision.CONTINUE and c.due(0.001)


def test_all_attempts_failing_exhausts_without_retry() -> None:
    c = call(max_attempts=2, delay=0.1)
    c.start(0.0)
    c.sent(0.1)
    assert c.on_answer(0.2, 502) is HedgeDecision.CONTINUE
    assert c.on_answer(0.3, 504) is HedgeDecision.EXHAUSTED


def test_pushback_stop_ends_hedging_but_not_attempts_in_flight() -> None:
    c = call(max_attempts=3, delay=0.1)
    c.start(0.0)
    c.sent(0.1)
    assert c.on_answer(0.15, 429, Pushback(stop=True)) is HedgeDecision.CONTINUE
    assert c.next_at() is None
    assert c.on_answer(0.3, 200) is HedgeDecision.ACCEPT


def test_pushback_delay_postpones_the_next_hedge() -> None:
    c = call(max_attempts=3, delay=0.1)
    c.start(0.0)
    assert c.on_answer(0.05, 503, Pushback(delay=1.0)) is HedgeDecision.CONTINUE
    assert not c.due(0.5) and c.due(1.05)
    c.sent(1.05)
    assert c.next_at() == pytest.approx(1.15)


def test_a_refused_budget_stops_hedging() -> None:
    c = call()
    c.start(0.0)
    assert c.due(0.1)
    assert c.skip() is HedgeDecision.CONTINUE
    assert c.next_at() is None
    assert c.on_answer(0.3, 503) is HedgeDecision.EXHAUSTED


def test_cold_window_hedges_only_after_a_non_fatal_answer() -> None:
    c = call(delay=None)
    c.start(0.0)
    assert c.next_at() is None
    assert c.on_answer(0.01, 503) is HedgeDecision.CONTINUE and c.due(0.01)
    c.sent(0.01)
    assert c.next_at() is None


def test_zero_delay_sends_every_attempt_at_once() -> None:
    c = call(max_attempts=3, delay=0.0)
    c.start(0.0)
    assert c.due(0.0)
    c.sent(0.0)
    assert c.due(0.0)
    c.sent(0.0)
    assert not c.due(0.0)


def test_disabled_policy_never_hedges() -> None:
    c = HedgeCall(DEFAULT_HEDGE_POLICY, 0.01)
    c.start(0.0)
    assert c.next_at() is None
    assert c.on_answer(0.1, 503) is HedgeDecision.EXHAUSTED
