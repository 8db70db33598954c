"""``weighted_round_robin`` (gRFC A58) with an injected clock: weights, blackout, expiration, the EDF cycle."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Sequence

import pytest

import meshlib
from meshlib._config.env import wrr_settings_from_env
from meshlib.balance import BALANCERS, BalancerOptions, EndpointStats, make_balancer
from meshlib.balance.orca import LoadReport
from meshlib.balance.wrr import (
    WeightedRoundRobin,
    WeightedRoundRobinPicker,
    WrrSettings,
    a58_weight,
    edf_cycle,
    effective_weights,
)
from meshlib.discovery.base import Endpoint
from meshlib.errors import ConfigError

pytestmark = pytest.mark.one_library


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(n: int) -> list[EndpointStats]:
    return [EndpointStats(Endpoint("10.0.0.1", 8000 + i)) for i in range(n)]


def report(qps: float, utilization: float, eps: float = 0.0, cpu: float = 0.0) -> LoadReport:
    return LoadReport(rps_fractional=qps, application_utilization=utilization, eps=eps, cpu_utilization=cpu)


def shares(picker: WeightedRoundRobinPicker, stats: Sequence[EndpointStats], picks: int) -> list[float]:
    counts = Counter(picker.pick() for _ in range(picks))
    return [counts[s] / picks for s in stats]


def balancer(clock: FakeClock, **settings: float) -> WeightedRoundRobin:
    options = BalancerOptions(wrr=WrrSettings(**settings))
    made = make_balancer("weighted_round_robin", options, clock=clock, rng=random.Random(7))
    assert isinstance(made, WeightedRoundRobin)
    return made


def test_registered_and_wants_load_reports() -> None:
    assert BALANCERS["weighted_round_robin"] is WeightedRoundRobin
    assert WeightedRoundRobin.wants_load_reports
    assert not BALANCERS["p2c_ewma"].wants_load_reports  # other balancers: the lease never parses the header


def test_a58_weight_formula() -> None:
    assert a58_weight(qps=100, eps=0, utilization=0.5, penalty=1.0) == 200.0
    assert a58_weight(qps=100, eps=10, utilization=0.5, penalty=1.0) == pytest.approx(100 / 0.6)
    assert a58_weight(qps=100, eps=10, utilization=0.5, penalty=0.0) == 200.0
    assert a58_weight(qps=0, eps=0, utilization=0.5, penalty=1.0) == 0.0
    assert a58_weight(qps=100, eps=0, utilization=0.0, penalty=1.0) == 0.0


def test_application_utilization_preferred_over_cpu() -> None:
    assert report(100, 0.5, cpu=0.9).load_utilization == 0.5
    assert LoadReport(rps_fractional=100, cpu_utilization=0.9).load_utilization == 0.9


def test_mean_fill_and_round_robin_below_two_weights() -> None:
    assert effective_weights([2.0, 0.0, 4.0]) == [2.0, 3.0, 4.0]
    assert effective_weights([5.0, 0.0, 0.0]) == [1.0, 1.0, 1.0]
    assert effective_weights([0.0, 0.0]) == [1.0, 1.0]


def test_edf_cycle_shares_follow_weights() -> None:
    order = edf_cycle([1.0, 2.0, 4.0], 700, random.Random(1))
    counts = Counter(order)
    assert [counts[i] for i in range(3)] == [
        pytest.approx(100, abs=1),
        pytest.approx(200, abs=1),
        pytest.approx(400, abs=1),
    ]
    # interleaved, not in runs: the heaviest never takes more than ceil(4/1)+1 in a row
    longest = max(len(run) for run in "".join(str(i) for i in order).replace("0", " ").replace("1", " ").split())
    assert longest <= 2


def test_shares_follow_capacity_1x_2x_4x_after_blackout() -> None:
    clock = FakeClock()
    wrr = balancer(clock)
    stats = endpoints(3)
    # same QPS seen by each, utilization 4x, 2x, 1x: capacities 1 : 2 : 4
    for s, utilization in zip(stats, (0.8, 0.4, 0.2), strict=True):
        s.record_report(report(100, utilization), clock.now)
    picker = wrr.build(stats)
    assert isinstance(picker, WeightedRoundRobinPicker)
    assert picker.weights == (1.0, 1.0, 1.0)  # blacked out: round robin
    assert shares(picker, stats, 300) == [pytest.approx(1 / 3, abs=0.01)] * 3

    clock.now += 10.0  # blackout_period (10 s) has passed, reports kept coming
    for s, utilization in zip(stats, (0.8, 0.4, 0.2), strict=True):
        s.record_report(report(100, utilization), clock.now)
    got = shares(picker, stats, 7000)
    assert got == [pytest.approx(1 / 7, abs=0.02), pytest.approx(2 / 7, abs=0.02), pytest.approx(4 / 7, abs=0.02)]
    assert picker.weights == (pytest.approx(125), pytest.approx(250), pytest.approx(500))
    assert picker.endpoint_weights()[stats[2].endpoint] == pytest.approx(500)
    assert stats[2].load_report is not None
    assert stats[2].load_report.to_dict() == {"application_utilization": 0.2, "rps_fractional": 100.0}


def test_weights_change_only_every_update_period() -> None:
    clock = FakeClock()
    wrr = balancer(clock, blackout_period=0)
    stats = endpoints(2)
    picker = wrr.build(stats)
    for s in stats:
        s.record_report(report(100, 0.5), clock.now)
    clock.now += 0.5
    picker.pick()
    assert picker.weights == (1.0, 1.0)  # the next update is due at 1 s
    clock.now += 0.5
    picker.pick()
    assert picker.weights == (200.0, 200.0)


def test_expired_weight_falls_back_and_blackout_applies_again() -> None:
    clock = FakeClock()
    wrr = balancer(clock, blackout_period=10, weight_expiration_period=180)
    stats = endpoints(3)
    for s, utilization in zip(stats, (0.8, 0.4, 0.2), strict=True):
        s.record_report(report(100, utilization), clock.now)
    clock.now += 10
    for s, utilization in zip(stats, (0.8, 0.4, 0.2), strict=True):
        s.record_report(report(100, utilization), clock.now)
    picker = wrr.build(stats)
    assert picker.weights == (125.0, 250.0, 500.0)

    clock.now += 100  # endpoint 2 keeps reporting, the others go quiet
    stats[2].record_report(report(100, 0.2), clock.now)
    clock.now += 80  # 180 s since endpoints 0 and 1 reported: expired
    picker.refresh(clock.now)
    assert picker.weights == (1.0, 1.0, 1.0)  # fewer than two usable weights: round robin
    assert stats[0].weight_since == float("inf")

    stats[0].record_report(report(100, 0.8), clock.now)  # reports resume: blackout again from now
    picker.refresh(clock.now + 5)
    assert picker.weights == (1.0, 1.0, 1.0)
    stats[0].record_report(report(100, 0.8), clock.now + 10)
    picker.refresh(clock.now + 10)
    assert picker.weights == (125.0, pytest.approx(312.5), 500.0)  # endpoint 1 (expired) gets the mean


def test_zero_reports_do_not_count_and_errors_are_penalised() -> None:
    clock = FakeClock()
    wrr = balancer(clock, blackout_period=0)
    stats = endpoints(2)
    stats[0].record_report(report(100, 0.5, eps=50), clock.now)
    stats[1].record_report(report(100, 0.5), clock.now)
    stats[1].record_report(report(0, 0.5), clock.now)  # qps 0: kept for status, ignored for the weight (A58)
    assert stats[1].load_report == report(0, 0.5)
    picker = wrr.build(stats)
    assert picker.weights == (100.0, 200.0)  # 100 / (0.5 + 50/100 * 1.0)


def test_excluded_endpoints_are_skipped() -> None:
    clock = FakeClock()
    wrr = balancer(clock, blackout_period=0)
    stats = endpoints(3)
    for s, utilization in zip(stats, (0.8, 0.4, 0.2), strict=True):
        s.record_report(report(100, utilization), clock.now)
    picker = wrr.build(stats)
    excluded = {stats[2].endpoint}
    picked = Counter(picker.pick(exclude=excluded) for _ in range(300))
    assert stats[2] not in picked
    assert picked[stats[1]] > picked[stats[0]]
    assert picker.pick(exclude={s.endpoint for s in stats}) is None
    assert wrr.build([]).pick() is None


def test_concurrent_picks_during_refresh_never_fail() -> None:
    clock = FakeClock()
    wrr = balancer(clock, blackout_period=0)
    stats = endpoints(4)
    picker = wrr.build(stats)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for i in range(2000):
                if i % 100 == 0:
                    clock.now += 1.0
                    for s in stats:
                        s.record_report(report(100, 0.1 + 0.1 * (i % 7)), clock.now)
                assert picker.pick() in stats
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []


def test_settings_from_env_and_bad_values() -> None:
    assert wrr_settings_from_env({}) == WrrSettings()
    got = wrr_settings_from_env(
        {
            "MESHLIB_WRR_BLACKOUT_PERIOD": "0",
            "MESHLIB_WRR_WEIGHT_EXPIRATION_PERIOD": "5m",
            "MESHLIB_WRR_WEIGHT_UPDATE_PERIOD": "10ms",
            "MESHLIB_WRR_ERROR_UTILIZATION_PENALTY": "0.5",
        }
    )
    assert got == WrrSettings(0.0, 300.0, 0.1, 0.5)  # the update period is capped at 100 ms (A58)
    with pytest.raises(ConfigError, match="MESHLIB_WRR_ERROR_UTILIZATION_PENALTY='-1'"):
        wrr_settings_from_env({"MESHLIB_WRR_ERROR_UTILIZATION_PENALTY": "-1"})
    with pytest.raises(ConfigError, match="MESHLIB_WRR_ERROR_UTILIZATION_PENALTY='nan'"):
        wrr_settings_from_env({"MESHLIB_WRR_ERROR_UTILIZATION_PENALTY": "nan"})
    with pytest.raises(ConfigError, match="MESHLIB_WRR_WEIGHT_EXPIRATION_PERIOD"):
        wrr_settings_from_env({"MESHLIB_WRR_WEIGHT_EXPIRATION_PERIOD": "0"})
    with pytest.raises(ValueError, match="blackout_period"):
        WrrSettings(blackout_period=-1)


def test_a_client_reads_the_wrr_settings_from_its_own_environment() -> None:
    env = {
        "MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:9",
        "MESHLIB_LB": "weighted_round_robin",
        "MESHLIB_WRR_BLACKOUT_PERIOD": "0",
        "MESHLIB_WRR_ERROR_UTILIZATION_PENALTY": "0.25",
    }
    with meshlib.Client(environ=env) as client:
        service = client.mesh.services["PAYMENTS"]
        assert isinstance(service.balancer, WeightedRoundRobin)
        assert service.balancer.settings == WrrSettings(blackout_period=0.0, error_utilization_penalty=0.25)
    with pytest.raises(ConfigError, match="MESHLIB_WRR_WEIGHT_UPDATE_PERIOD='soon'"):
        meshlib.Client(environ={**env, "MESHLIB_WRR_WEIGHT_UPDATE_PERIOD": "soon"})  # at construction
