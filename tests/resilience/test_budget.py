"""The retry budget: Finagle's arithmetic, the reserve floor, and expiry on a fake clock."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.resilience import RetryBudget

pytestmark = pytest.mark.one_library


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain(budget: RetryBudget, limit: int = 100_000) -> int:
    n = 0
    while n < limit and budget.try_withdraw():
        n += 1
    return n


def test_without_a_floor_retries_are_at_most_twenty_percent_of_requests() -> None:
    budget = RetryBudget(min_retries_per_second=0, clock=FakeClock())
    for _ in range(1000):
        budget.deposit()
    assert budget.balance() == 200.0
    assert drain(budget) == 200
    assert budget.exhausted == 1
    assert budget.withdrawals == 200
    assert budget.deposits == 1000


def test_the_floor_gives_ten_retries_a_second_over_the_ttl_with_no_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(clock=clock)
    assert budget.balance() == 100.0  # 10/s x 10 s
    assert drain(budget) == 100
    assert not budget.try_withdraw()


def test_floor_and_percentage_add_up() -> None:
    budget = RetryBudget(clock=FakeClock())
    for _ in range(1000):
        budget.deposit()
    assert drain(budget) == 300


def test_deposits_and_withdrawals_expire_after_the_ttl() -> None:
    clock = FakeClock()
    budget = RetryBudget(min_retries_per_second=0, clock=clock)
    for _ in range(100):
        budget.deposit()
    assert budget.balance() == 20.0
    clock.advance(5.0)
    assert budget.balance() == 20.0  # still inside the window
    clock.advance(5.0)
    assert budget.balance() == 0.0  # 10 s later the deposits are gone
    assert not budget.try_withdraw()


def test_exhausted_reserve_recovers_after_the_ttl() -> None:
    clock = FakeClock()
    budget = RetryBudget(ttl=10.0, min_retries_per_second=1, percent_can_retry=0.0, clock=clock)
    assert drain(budget) == 10
    clock.advance(9.0)
    assert not budget.try_withdraw()  # the withdrawals are still in the window
    clock.advance(1.0)
    assert drain(budget) == 10


def test_window_slides_slice_by_slice() -> None:
    clock = FakeClock(0.0)
    budget = RetryBudget(ttl=10.0, min_retries_per_second=0, clock=clock)
    for second in range(10):  # 10 requests a second for 10 s, in the middle of each second
        clock.now = second + 0.5
        for _ in range(10):
            budget.deposit()
    assert budget.balance() == pytest.approx(20.0)
    clock.now = 10.5  # the first second's deposits have expired
    assert budget.balance() == pytest.approx(18.0)
    clock.now = 1_000.0  # far later: everything expired at once
    assert budget.balance() == 0.0


def test_a_clock_going_backwards_does_not_break_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(min_retries_per_second=0, clock=clock)
    budget.deposit()
    clock.advance(-100.0)
    budget.deposit()
    assert budget.balance() == pytest.approx(0.4)


def test_a_budget_with_neither_floor_nor_percentage_never_retries() -> None:
    budget = RetryBudget(min_retries_per_second=0, percent_can_retry=0.0, clock=FakeClock())
    for _ in range(100):
        budget.deposit()
    assert not budget.try_withdraw()
    assert budget.exhausted == 1


def test_percentages_above_one_allow_several_retries_per_request() -> None:
    budget = RetryBudget(min_retries_per_second=0, percent_can_retry=2.0, clock=FakeClock())
    for _ in range(10):
        budget.deposit()
    assert drain(budget) == 20


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": 0.5},
        {"ttl": 61.0},
        {"min_retries_per_second": -1},
        {"percent_can_retry": -0.1},
        {"percent_can_retry": 1001},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RetryBudget"):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=200)
@given(
    requests=st.integers(min_value=0, max_value=5_000),
    percent=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 3.0]),
    floor=st.integers(min_value=0, max_value=50),
    ttl=st.integers(min_value=1, max_value=60),
)
def test_withdrawals_never_exceed_percentage_plus_reserve(requests: int, percent: float, floor: int, ttl: int) -> None:
    budget = RetryBudget(ttl=float(ttl), min_retries_per_second=floor, percent_can_retry=percent, clock=FakeClock())
    for _ in range(requests):
        budget.deposit()
    allowed = drain(budget, limit=10 * requests + floor * ttl + 10)
    assert allowed <= requests * percent + floor * ttl + 1e-9
    # ... and not stingy either: rounding the cost up to whole tokens loses well under 1 %.
    assert allowed >= (requests * percent) * 0.99 + floor * ttl - 1
    assert budget.balance() < 1.0


def test_concurrent_withdrawals_never_overdraw() -> None:
    budget = RetryBudget(min_retries_per_second=0, clock=FakeClock())
    for _ in range(1000):
        budget.deposit()
    granted: list[int] = []
    start = threading.Barrier(32)

    def worker() -> None:
        start.wait()
        granted.append(sum(budget.try_withdraw() for _ in range(50)))

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 200
    assert budget.exhausted == 32 * 50 - 200
