"""Per-endpoint circuit breaker: transitions, one probe at a time, and no lock held across the request."""

from __future__ import annotations

import logging
import random
import threading

import pybreaker
import pytest

from meshlib.resilience import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN, EndpointBreaker

pytestmark = pytest.mark.one_library


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock, **kwargs: object) -> tuple[EndpointBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []

    def listener(breaker: EndpointBreaker, old: str, new: str) -> None:
        changes.append((old, new))

    options: dict[str, object] = {"jitter": 0.0, "clock": clock, "listeners": [listener]}
    options.update(kwargs)
    return EndpointBreaker("payments/10.0.0.1:80", **options), changes  # type: ignore[arg-type]


def trip(breaker: EndpointBreaker) -> None:
    for _ in range(breaker.fail_max):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == STATE_OPEN


def test_opens_after_five_consecutive_failures() -> None:
    breaker, changes = make(FakeClock())
    for _ in range(4):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == STATE_CLOSED
    assert breaker.failures == 4
    breaker.record_failure()
    assert breaker.state == STATE_OPEN
    assert breaker.trips == 1
    assert changes == [(STATE_CLOSED, STATE_OPEN)]
    # pybreaker holds the state and sees the same thing.
    assert breaker.circuit.current_state == pybreaker.STATE_OPEN


def test_a_success_resets_the_streak() -> None:
    breaker, _ = make(FakeClock())
    for _ in range(10):
        for _ in range(4):
            breaker.record_failure()
        breaker.record_success()
    assert breaker.state == STATE_CLOSED
    assert breaker.failures == 0


def test_open_rejects_until_the_penalty_has_passed() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, reset_timeout=1.0)
    trip(breaker)
    assert not breaker.allow()
    assert not breaker.available()
    clock.advance(0.999)
    assert not breaker.allow()
    clock.advance(0.001)
    assert breaker.available()
    assert breaker.state == STATE_OPEN  # available() does not take the probe
    assert breaker.allow()
    assert breaker.state == STATE_HALF_OPEN


def test_probe_success_closes() -> None:
    clock = FakeClock()
    breaker, changes = make(clock)
    trip(breaker)
    clock.advance(1.0)
    assert breaker.allow()
    assert not breaker.allow()  # one probe at a time
    breaker.record_success()
    assert breaker.state == STATE_CLOSED
    assert breaker.failures == 0
    assert breaker.allow()
    assert changes == [(STATE_CLOSED, STATE_OPEN), (STATE_OPEN, STATE_HALF_OPEN), (STATE_HALF_OPEN, STATE_CLOSED)]
    assert breaker.circuit.current_state == pybreaker.STATE_CLOSED


def test_probe_failure_reopens_with_a_doubled_penalty_up_to_the_cap() -> None:
    clock = FakeClock()
    breaker, changes = make(clock, reset_timeout=1.0, max_reset_timeout=4.0)
    trip(breaker)
    penalties = []
    for _ in range(5):
        waited = 0.0
        while not breaker.allow():
            clock.advance(0.5)
            waited += 0.5
        penalties.append(waited)
        breaker.record_failure()  # the probe fails
        assert breaker.state == STATE_OPEN
    assert penalties == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert breaker.trips == 6
    assert changes[-2:] == [(STATE_OPEN, STATE_HALF_OPEN), (STATE_HALF_OPEN, STATE_OPEN)]
    # A successful probe resets the backoff.
    clock.advance(4.0)
    assert breaker.allow()
    breaker.record_success()
    trip(breaker)
    clock.advance(1.0)
    assert breaker.allow()


def test_jitter_stretches_the_penalty_by_at_most_half() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, jitter=0.5, rng=random.Random(7))
    trip(breaker)
    clock.advance(0.999)
    assert not breaker.allow()
    clock.advance(0.5)
    assert breaker.allow()


def test_results_while_open_are_ignored() -> None:
    clock = FakeClock()
    breaker, _ = make(clock)
    trip(breaker)
    breaker.record_success()  # a request admitted before the trip
    assert breaker.state == STATE_OPEN
    breaker.record_failure()
    assert breaker.trips == 1


def test_release_frees_the_probe_slot() -> None:
    clock = FakeClock()
    breaker, _ = make(clock)
    trip(breaker)
    clock.advance(1.0)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release()  # the probe was cancelled before it got a verdict
    assert breaker.state == STATE_HALF_OPEN
    assert breaker.allow()


def test_a_probe_that_never_reports_back_is_given_up_eventually() -> None:
    clock = FakeClock()
    breaker, _ = make(clock, max_reset_timeout=60.0)
    trip(breaker)
    clock.advance(1.0)
    assert breaker.allow()
    clock.advance(59.0)
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()


def test_closed_allow_takes_no_lock() -> None:
    breaker, _ = make(FakeClock())
    with breaker._lock:  # even with the lock held elsewhere, a closed breaker answers at once
        assert breaker.allow()
        breaker.record_success()


def test_state_changes_are_logged_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    breaker, _ = make(clock)
    with caplog.at_level(logging.INFO, logger="meshlib.resilience"):
        trip(breaker)
        clock.advance(1.0)
        breaker.allow()
        breaker.record_success()
    lines = [r for r in caplog.records if r.name == "meshlib.resilience"]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO, logging.INFO]
    assert "payments/10.0.0.1:80" in lines[0].getMessage()
    assert "closed -> open" in lines[0].getMessage()
    assert "half-open -> closed" in lines[2].getMessage()


def test_listeners_run_outside_the_lock_and_may_call_back() -> None:
    clock = FakeClock()
    seen: list[bool] = []

    def listener(breaker: EndpointBreaker, old: str, new: str) -> None:
        seen.append(breaker._lock.locked())
        breaker.available()  # would deadlock if called under the breaker's lock
        breaker.allow()

    breaker = EndpointBreaker("x", jitter=0.0, clock=clock, listeners=[listener])
    trip(breaker)
    assert seen == [False]


def test_a_failing_listener_does_not_break_the_breaker(caplog: pytest.LogCaptureFixture) -> None:
    def listener(breaker: EndpointBreaker, old: str, new: str) -> None:
        raise RuntimeError("boom")

    breaker = EndpointBreaker("x", jitter=0.0, clock=FakeClock(), listeners=[listener])
    with caplog.at_level(logging.ERROR, logger="meshlib.resilience"):
        trip(breaker)
    assert "listener" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [{"fail_max": 0}, {"reset_timeout": 0.0}, {"reset_timeout": 10.0, "max_reset_timeout": 5.0}, {"jitter": -1}],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="EndpointBreaker"):
        EndpointBreaker("x", **kwargs)  # type: ignore[arg-type]


# -- concurrency -------------------------------------------------------------------------------------------


def run_threads(n: int, target: object) -> None:
    threads = [threading.Thread(target=target) for _ in range(n)]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()


def test_half_open_lets_exactly_one_probe_through_under_32_threads() -> None:
    for _ in range(20):  # repeat: a race that only sometimes loses would show up
        clock = FakeClock()
        breaker, changes = make(clock)
        trip(breaker)
        clock.advance(1.0)
        start = threading.Barrier(32)
        answers: list[bool] = []

        def worker(
            breaker: EndpointBreaker = breaker, start: threading.Barrier = start, answers: list[bool] = answers
        ) -> None:
            start.wait()
            answers.extend(breaker.allow() for _ in range(10))

        run_threads(32, worker)
        assert answers.count(True) == 1
        assert len(answers) == 320
        assert breaker.state == STATE_HALF_OPEN
        assert changes.count((STATE_OPEN, STATE_HALF_OPEN)) == 1


def test_concurrent_failures_trip_exactly_once() -> None:
    breaker, changes = make(FakeClock())
    start = threading.Barrier(32)

    def worker() -> None:
        start.wait()
        for _ in range(20):
            if breaker.allow():
                breaker.record_failure()

    run_threads(32, worker)
    assert breaker.state == STATE_OPEN
    assert breaker.trips == 1
    assert changes == [(STATE_CLOSED, STATE_OPEN)]


def test_no_lock_is_held_while_a_request_is_in_flight() -> None:
    """A thread parked between allow() and record_*() (its "I/O") blocks nobody else's allow()."""
    clock = FakeClock()
    breaker, _ = make(clock)
    in_io = threading.Event()
    finish_io = threading.Event()

    def slow_request() -> None:
        assert breaker.allow()
        in_io.set()
        assert finish_io.wait(timeout=30)  # the "I/O": held open until the test says so
        breaker.record_success()

    def other_requests(results: list[bool]) -> None:
        for _ in range(100):
            results.append(breaker.allow())
            breaker.record_failure()
            breaker.record_success()

    # Closed: the slow request does not serialise the others.
    slow = threading.Thread(target=slow_request)
    slow.start()
    assert in_io.wait(timeout=30)
    results: list[bool] = []
    others = threading.Thread(target=other_requests, args=(results,))
    others.start()
    others.join(timeout=30)
    assert not others.is_alive(), "allow()/record_*() blocked behind a request in flight"
    assert results == [True] * 100
    assert slow.is_alive()  # still "in I/O"
    finish_io.set()
    slow.join(timeout=30)

    # Half-open with the probe in flight: the others are refused at once, not made to wait.
    trip(breaker)
    clock.advance(1.0)
    in_io.clear()
    finish_io.clear()
    probe = threading.Thread(target=slow_request)
    probe.start()
    assert in_io.wait(timeout=30)
    refused: list[bool] = []
    others = threading.Thread(target=lambda: refused.extend(breaker.allow() for _ in range(100)))
    others.start()
    others.join(timeout=30)
    assert not others.is_alive()
    assert refused == [False] * 100
    finish_io.set()
    probe.join(timeout=30)
    assert breaker.state == STATE_CLOSED
