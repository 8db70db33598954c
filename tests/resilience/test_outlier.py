"""Envoy-style outlier detection on a fake clock: ejection, backoff, the percentage cap, readmission, panic."""

from __future__ import annotations

import logging
import threading

import pytest

from meshlib.resilience import OutlierDetector

pytestmark = pytest.mark.one_library


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def detector(clock: FakeClock, keys: list[str], **kwargs: float) -> OutlierDetector[str]:
    d: OutlierDetector[str] = OutlierDetector(clock=clock, **kwargs)  # type: ignore[arg-type]
    d.set_endpoints(keys)
    return d


def fail(d: OutlierDetector[str], key: str, times: int = 5) -> bool:
    return any([d.record(key, failure=True) for _ in range(times)])


KEYS = ["a", "b", "c"]


def test_five_consecutive_failures_eject() -> None:
    d = detector(FakeClock(), KEYS)
    for _ in range(4):
        assert not d.record("a", failure=True)
    assert not d.is_ejected("a")
    assert d.record("a", failure=True)
    assert d.is_ejected("a")
    assert d.ejected() == frozenset({"a"})
    assert d.ejections == 1


def test_a_success_resets_the_streak() -> None:
    d = detector(FakeClock(), KEYS)
    for _ in range(10):
        fail(d, "a", 4)
        d.record("a", failure=False)
    assert not d.is_ejected("a")
    assert d.ejections == 0


def test_readmitted_after_the_ejection_time() -> None:
    clock = FakeClock()
    d = detector(clock, KEYS)
    fail(d, "a")
    clock.advance(29.9)
    assert d.is_ejected("a")
    assert d.ejected() == {"a"}
    clock.advance(0.1)
    assert not d.is_ejected("a")
    assert d.ejected() == frozenset()
    assert d.readmissions == 1


def test_ejected_snapshot_expires_without_an_is_ejected_call() -> None:
    clock = FakeClock()
    d = detector(clock, KEYS)
    fail(d, "a")
    snapshot = d.ejected()
    assert d.ejected() is snapshot  # cached until something changes
    clock.advance(30.0)
    assert d.ejected() == frozenset()


def test_re_ejection_lasts_longer_each_time_up_to_the_cap() -> None:
    clock = FakeClock()
    d = detector(clock, KEYS, max_ejection=90.0)
    durations = []
    for _ in range(5):
        assert fail(d, "a")
        start = clock.now
        while d.is_ejected("a"):
            clock.advance(1.0)
        durations.append(clock.now - start)
    assert durations == [30.0, 60.0, 90.0, 90.0, 90.0]


def test_the_multiplier_decays_while_the_endpoint_stays_healthy() -> None:
    clock = FakeClock()
    d = detector(clock, KEYS)
    fail(d, "a")
    clock.advance(30.0)
    assert not d.is_ejected("a")
    clock.advance(25.0)  # two full 10 s intervals healthy: multiplier 1 -> 0, so the next ejection is 30 s again
    fail(d, "a")
    clock.advance(29.0)
    assert d.is_ejected("a")
    clock.advance(1.0)
    assert not d.is_ejected("a")
    fail(d, "a")  # straight after readmission: doubled
    clock.advance(59.0)
    assert d.is_ejected("a")


def test_max_ejection_percent_is_respected_but_one_can_always_be_ejected() -> None:
    d = detector(FakeClock(), KEYS)
    assert fail(d, "a")
    assert not fail(d, "b")  # 1 of 3 already out: 33 % >= 10 %
    assert d.ejected() == {"a"}
    assert d.overflow >= 1


def test_max_ejection_percent_with_many_endpoints() -> None:
    keys = [f"e{i}" for i in range(20)]
    d = detector(FakeClock(), keys)
    for key in keys:
        fail(d, key)
    assert len(d.ejected()) == 2  # 10 % of 20
    d2 = detector(FakeClock(), keys, max_ejection_percent=50.0)
    for key in keys:
        fail(d2, key)
    assert len(d2.ejected()) == 10


def test_a_refused_ejection_happens_once_there_is_room() -> None:
    clock = FakeClock()
    d = detector(clock, KEYS)
    fail(d, "a")
    fail(d, "b")
    assert not d.is_ejected("b")
    clock.advance(30.0)  # "a" comes back
    assert d.record("b", failure=True)  # b's streak was kept: its next failure ejects it
    assert d.ejected() == {"b"}


def test_membership_changes() -> None:
    clock = FakeClock()
    d = detector(clock, KEYS)
    fail(d, "a")
    d.set_endpoints(["b", "c", "d"])  # "a" removed: forgotten
    assert d.ejected() == frozenset()
    assert not d.is_ejected("a")
    assert not fail(d, "a")  # a late answer from a removed endpoint changes nothing
    assert d.ejected() == frozenset()
    fail(d, "d", 4)
    d.set_endpoints(["b", "c", "d"])  # unchanged endpoints keep their history
    assert d.record("d", failure=True)


def test_endpoints_are_learnt_from_results_until_membership_is_given() -> None:
    d: OutlierDetector[str] = OutlierDetector(clock=FakeClock())
    d.record("x", failure=False)
    d.record("y", failure=False)
    assert fail(d, "x")
    assert d.ejected() == {"x"}


def test_panic_threshold() -> None:
    d: OutlierDetector[str] = OutlierDetector()
    assert not d.panic(3, 2)
    assert not d.panic(2, 1)  # exactly 50 % healthy is not panic
    assert d.panic(3, 1)
    assert d.panic(1, 0)
    assert not d.panic(0, 0)
    assert OutlierDetector[str](panic_threshold=0.0).panic(10, 0) is False


def test_ejections_and_readmissions_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    d = detector(clock, KEYS, name="payments")  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="meshlib.resilience"):
        fail(d, "a")
        clock.advance(30.0)
        d.ejected()
    messages = [r.getMessage() for r in caplog.records if r.name == "meshlib.resilience"]
    assert len(messages) == 2
    assert "payments" in messages[0]
    assert "ejected a for 30 s" in messages[0]
    assert "readmitted a" in messages[1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"consecutive_failures": 0},
        {"base_ejection": 0.0},
        {"base_ejection": 60.0, "max_ejection": 30.0},
        {"max_ejection_percent": 101.0},
        {"interval": 0.0},
        {"panic_threshold": -1.0},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        OutlierDetector(**kwargs)  # type: ignore[arg-type]


def test_concurrent_failures_never_exceed_the_cap() -> None:
    keys = [f"e{i}" for i in range(30)]
    d = detector(FakeClock(), keys)
    start = threading.Barrier(30)

    def worker(key: str) -> None:
        start.wait()
        for _ in range(10):
            d.record(key, failure=True)
            d.is_ejected(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(d.ejected()) == 3
    assert d.ejections == 3
