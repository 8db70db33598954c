"""Success-rate and failure-percentage ejection (gRFC A50, Envoy ``success_rate_*`` / ``failure_percentage_*``).

Pure: a fake clock, scripted enforcement draws, and :meth:`OutlierDetector.evaluate` called by hand where the
service's interval timer would call it.
"""

from __future__ import annotations

import math

import pytest

from meshlib.resilience import FailurePercentageEjection, OutlierDetector, SuccessRateEjection

pytestmark = pytest.mark.one_library

NEVER = 10**9  # a consecutive-failure threshold that is never reached, to isolate the rate detectors
TEN = [f"e{i}" for i in range(10)]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Draws:
    """``randrange`` returning scripted values; fails the test if asked for more than it was given."""

    def __init__(self, *values: int) -> None:
        self.values = list(values)
        self.calls: list[int] = []

    def __call__(self, stop: int) -> int:
        self.calls.append(stop)
        assert self.values, "an enforcement draw that should not have happened"
        return self.values.pop(0)


def make(
    clock: FakeClock,
    keys: list[str],
    *,
    consecutive: int = NEVER,
    draws: Draws | None = None,
    success_rate: SuccessRateEjection | None = SuccessRateEjection(),  # noqa: B008
    failure_percentage: FailurePercentageEjection | None = None,
    max_percent: float = 10.0,
) -> OutlierDetector[str]:
    d: OutlierDetector[str] = OutlierDetector(
        consecutive,
        max_ejection_percent=max_percent,
        success_rate=success_rate,
        failure_percentage=failure_percentage,
        clock=clock,
        randrange=draws if draws is not None else Draws(),
    )
    d.set_endpoints(keys)
    return d


def feed(d: OutlierDetector[str], key: str, total: int, failures: int = 0) -> None:
    """``total`` attempts on ``key``, ``failures`` of them failed, spread so no two failures are adjacent when
    they are at most half (3 in 10 stays a gray failure, never a streak)."""
    for i in range(total):
        failed = i * failures // total != (i + 1) * failures // total
        d.record(key, failure=failed)


def interval(d: OutlierDetector[str], clock: FakeClock, rates: dict[str, tuple[int, int]]) -> frozenset[str]:
    """One 10 s interval of traffic (key -> (attempts, failures)), then the timer's sweep."""
    for key, (total, failures) in rates.items():
        feed(d, key, total, failures)
    clock.advance(10.0)
    return d.evaluate()


def test_success_rate_ejects_the_one_gray_endpoint_of_ten() -> None:
    clock = FakeClock()
    d = make(clock, TEN, consecutive=5)  # consecutive ejection on, as in a real service: 30 % never trips it
    for key in TEN[:9]:
        feed(d, key, 200)
    feed(d, "e9", 200, 60)
    assert d.ejected() == frozenset() and d.ejections == 0  # nothing inline
    clock.advance(10.0)
    assert d.evaluate() == frozenset({"e9"})
    assert d.is_ejected("e9") and d.ejected() == frozenset({"e9"})
    assert (d.success_rate_ejections, d.ejections) == (1, 1)
    # Rates 9 x 100 % and 70 %: mean 97, population stdev 9, threshold 97 - 1.9 x 9 = 79.9.
    assert d.success_rate_mean == pytest.approx(97.0)
    assert d.success_rate_threshold == pytest.approx(79.9)


def test_no_ejection_below_minimum_hosts() -> None:
    clock = FakeClock()
    keys = TEN[:5]
    d = make(clock, keys)
    # Four endpoints with volume; the fifth has 99 attempts: 4 < minimum_hosts 5, no sweep at all.
    traffic = {key: (100, 0) for key in keys[:3]} | {"e3": (100, 50), "e4": (99, 0)}
    assert interval(d, clock, traffic) == frozenset()
    assert d.success_rate_threshold is None
    # One more attempt on e4 makes five: the same 50 % endpoint is ejected.
    traffic["e4"] = (100, 0)
    assert interval(d, clock, traffic) == frozenset({"e3"})


def test_no_ejection_below_request_volume() -> None:
    clock = FakeClock()
    keys = TEN[:6]
    d = make(clock, keys)
    traffic = {key: (100, 0) for key in keys[:5]} | {"e5": (99, 99)}
    assert interval(d, clock, traffic) == frozenset()  # e5 fails everything, but 99 < request_volume 100
    assert d.success_rate_mean == pytest.approx(100.0)  # the sweep ran over the other five
    traffic["e5"] = (100, 99)
    assert interval(d, clock, traffic) == frozenset({"e5"})


def test_counts_are_per_interval() -> None:
    """The sweep zeroes the counters (A50's bucket swap): two half intervals never add up to a volume."""
    clock = FakeClock()
    keys = TEN[:5]
    d = make(clock, keys)
    half = {key: (50, 0) for key in keys[:4]} | {"e4": (50, 50)}
    assert interval(d, clock, half) == frozenset()
    assert interval(d, clock, half) == frozenset()


@pytest.mark.parametrize(
    ("stdev_factor", "ejected"),
    [
        (1900, True),  # Envoy's own worked example: threshold 52, 50 < 52 (a sample stdev, 22.36, gives 47.5)
        (2000, False),  # threshold exactly 50.0: the rule is strictly below
        (1999, True),  # threshold 50.02
    ],
)
def test_stdev_rule_on_a_hand_computed_example(stdev_factor: int, ejected: bool) -> None:
    # Success rates 50, 100, 100, 100, 100 (%): mean 90, variance (40^2 + 4 x 10^2) / 5 = 400, stdev 20.
    clock = FakeClock()
    keys = TEN[:5]
    d = make(clock, keys, success_rate=SuccessRateEjection(stdev_factor=stdev_factor), max_percent=100)
    swept = interval(d, clock, {"e0": (100, 50)} | {key: (100, 0) for key in keys[1:]})
    assert d.success_rate_mean == 90.0
    assert d.success_rate_threshold == pytest.approx(90.0 - stdev_factor / 1000 * 20.0)
    assert swept == (frozenset({"e0"}) if ejected else frozenset())


def test_equal_rates_eject_no_one() -> None:
    clock = FakeClock()
    d = make(clock, TEN, max_percent=100)
    assert interval(d, clock, {key: (100, 40) for key in TEN}) == frozenset()  # stdev 0: all at the threshold


def test_failure_percentage_ejects_at_the_threshold() -> None:
    clock = FakeClock()
    keys = TEN[:6]
    fp = FailurePercentageEjection(enforcement_percentage=100)
    d = make(clock, keys, success_rate=None, failure_percentage=fp, max_percent=100)
    traffic = {"e0": (100, 85), "e1": (100, 84), "e2": (50, 50)} | {key: (50, 0) for key in keys[3:]}
    # e0 at 85 % (>= 85, Envoy's comparison) and e2 at 100 % go; e1 at 84 % stays.
    assert interval(d, clock, traffic) == frozenset({"e0", "e2"})
    assert d.failure_percentage_ejections == 2
    assert d.success_rate_threshold is None  # success rate off


def test_failure_percentage_is_absolute_and_needs_minimum_hosts() -> None:
    clock = FakeClock()
    fp = FailurePercentageEjection(enforcement_percentage=100)
    d = make(clock, TEN[:5], success_rate=None, failure_percentage=fp, max_percent=100)
    assert interval(d, clock, {key: (50, 45) for key in TEN[:4]} | {"e4": (49, 49)}) == frozenset()  # 4 hosts
    assert interval(d, clock, {key: (50, 45) for key in TEN[:5]}) == frozenset(TEN[:5])  # everyone at 90 %


def test_failure_percentage_is_off_by_default() -> None:
    clock = FakeClock()
    d: OutlierDetector[str] = OutlierDetector(NEVER, success_rate=None, clock=clock, randrange=Draws())
    d.set_endpoints(TEN[:5])
    assert d.failure_percentage is None  # Envoy's enforcing_failure_percentage: 0
    assert interval(d, clock, {key: (100, 100) for key in TEN[:5]}) == frozenset()


def test_enforcement_percentage_draws() -> None:
    clock = FakeClock()
    keys = TEN[:5]
    traffic = {"e0": (100, 50)} | {key: (100, 0) for key in keys[1:]}
    draws = Draws(50, 49)
    d = make(clock, keys, draws=draws, success_rate=SuccessRateEjection(enforcement_percentage=50))
    assert interval(d, clock, traffic) == frozenset()  # drew 50: not < 50
    assert d.unenforced == 1
    assert interval(d, clock, traffic) == frozenset({"e0"})  # drew 49
    assert draws.calls == [100, 100]  # an integer in [0, 100), as A50 says
    # At 100 % (the default) there is no draw at all: Draws() would fail the test if asked.
    d = make(FakeClock(), keys, draws=Draws())
    assert interval(d, clock, traffic) == frozenset({"e0"})


def test_max_ejection_percent_is_shared_with_consecutive_failures() -> None:
    clock = FakeClock()
    d = make(clock, TEN, consecutive=5)  # 10 % of 10: one endpoint at a time
    for _ in range(5):
        d.record("e0", failure=True)
    assert d.ejected() == frozenset({"e0"})
    # e9 is a success-rate outlier, but the cap is taken by e0's consecutive-failure ejection.
    assert interval(d, clock, {key: (100, 0) for key in TEN[1:9]} | {"e9": (100, 40)}) == frozenset()
    assert d.overflow == 1
    # And the other way round: once e0 is back (30 s) and e9 is ejected by success rate, e5's streak overflows.
    clock.advance(30.0)
    assert interval(d, clock, {key: (100, 0) for key in TEN[:9]} | {"e9": (100, 40)}) == frozenset({"e9"})
    assert not any([d.record("e5", failure=True) for _ in range(5)])
    assert d.ejected() == frozenset({"e9"}) and d.overflow == 2


def test_the_cap_keeps_the_worst() -> None:
    clock = FakeClock()
    d = make(clock, TEN)  # room for one
    traffic = {key: (100, 0) for key in TEN[:7]} | {"e7": (100, 30), "e8": (100, 60), "e9": (100, 45)}
    assert interval(d, clock, traffic) == frozenset({"e8"})


def test_unejection_and_multiplier_growth_and_decay() -> None:
    clock = FakeClock()
    keys = TEN[:5]
    d = make(clock, keys)
    bad = {"e0": (100, 50)} | {key: (100, 0) for key in keys[1:]}
    good = {key: (100, 0) for key in keys}
    assert interval(d, clock, bad) == frozenset({"e0"})  # multiplier 1: 30 s
    clock.advance(29.0)
    assert d.is_ejected("e0")
    clock.advance(1.0)
    assert not d.is_ejected("e0")  # readmitted after base_ejection_time x 1
    assert interval(d, clock, bad) == frozenset({"e0"})  # failed again at once: multiplier 2, 60 s
    clock.advance(59.0)
    assert d.is_ejected("e0")
    clock.advance(1.0)
    assert not d.is_ejected("e0")
    # Two healthy intervals after readmission decay the multiplier 2 -> 0; the next ejection is 30 s again.
    assert interval(d, clock, good) == frozenset()
    assert interval(d, clock, good) == frozenset()
    assert interval(d, clock, bad) == frozenset({"e0"})
    clock.advance(30.0)
    assert not d.is_ejected("e0")
    assert d.readmissions == 3 and d.success_rate_ejections == 3


def test_one_healthy_interval_decays_by_one() -> None:
    clock = FakeClock()
    keys = TEN[:5]
    d = make(clock, keys)
    bad = {"e0": (100, 50)} | {key: (100, 0) for key in keys[1:]}
    good = {key: (100, 0) for key in keys}
    interval(d, clock, bad)
    clock.advance(30.0)
    interval(d, clock, bad)  # multiplier 2
    clock.advance(60.0)
    assert not d.is_ejected("e0")
    assert interval(d, clock, good) == frozenset()  # one interval healthy: multiplier 1
    assert interval(d, clock, bad) == frozenset({"e0"})  # 1 + 1 = 2: 60 s
    clock.advance(30.0)
    assert d.is_ejected("e0")


def test_ejected_endpoints_are_left_out_of_the_statistics() -> None:
    """Panic-mode traffic to an ejected endpoint neither drags the mean down nor gets it ejected twice."""
    clock = FakeClock()
    keys = TEN[:6]
    d = make(clock, keys, max_percent=100)
    bad = {"e0": (100, 100)} | {key: (100, 0) for key in keys[1:]}
    assert interval(d, clock, bad) == frozenset({"e0"})
    assert interval(d, clock, bad) == frozenset()
    assert d.success_rate_mean == 100.0 and d.ejections == 1


def test_removed_endpoints_are_forgotten() -> None:
    clock = FakeClock()
    d = make(clock, TEN[:6])
    feed(d, "e0", 100, 50)
    d.set_endpoints(TEN[1:6])
    d.record("e0", failure=True)  # a late answer
    assert interval(d, clock, {key: (100, 0) for key in TEN[1:6]}) == frozenset()
    assert d.success_rate_mean == 100.0


@pytest.mark.parametrize(
    ("make_config", "message"),
    [
        (lambda: SuccessRateEjection(enforcement_percentage=101), "SuccessRateEjection.enforcement_percentage"),
        (lambda: SuccessRateEjection(stdev_factor=-1), "SuccessRateEjection.stdev_factor"),
        (lambda: FailurePercentageEjection(threshold=101), "FailurePercentageEjection.threshold"),
        (lambda: FailurePercentageEjection(request_volume=1.5), "FailurePercentageEjection.request_volume"),  # type: ignore[arg-type]
    ],
)
def test_bad_settings_name_the_field_and_value(make_config: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        make_config()  # type: ignore[operator]
    assert "not " in str(info.value)


def test_population_stdev_matches_the_definition() -> None:
    """The threshold is mean - factor x population stdev, on a less tidy set of rates."""
    clock = FakeClock()
    rates = {"e0": 7, "e1": 2, "e2": 0, "e3": 11, "e4": 1, "e5": 3}  # failures of 100
    d = make(clock, list(rates), max_percent=100)
    swept = interval(d, clock, {key: (100, failures) for key, failures in rates.items()})
    successes = [100.0 - f for f in rates.values()]
    mean = sum(successes) / len(successes)
    stdev = math.sqrt(sum((s - mean) ** 2 for s in successes) / len(successes))
    assert d.success_rate_threshold == pytest.approx(mean - 1.9 * stdev)
    assert swept == frozenset(k for k, f in rates.items() if 100.0 - f < mean - 1.9 * stdev)
