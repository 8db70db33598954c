"""End to end: three real backends of capacity 1x, 2x and 4x report it in ``endpoint-load-metrics`` (same QPS,
utilization 0.8, 0.4, 0.2); a ``meshlib.Client`` with ``MESHLIB_LB=weighted_round_robin`` reads the reports
through the attempt's lease and, once the blackout is over, sends traffic in the capacity ratio. The balancer's
clock is injected (a fake one the test advances), so the blackout and the weight updates need no waiting."""

from __future__ import annotations

import random

import pytest

import meshlib
from meshlib.balance.base import EndpointStats
from meshlib.balance.wrr import WeightedRoundRobin
from meshlib.status import format_status
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target

#: Backends' reports: the same QPS, utilization inversely proportional to capacity (1x, 2x, 4x).
REPORTS = (
    "TEXT rps_fractional:100,application_utilization:0.8",
    'JSON {"rps_fractional": 100, "application_utilization": 0.4}',
    "BIN MQAAAAAAAFlASZqZmZmZmck/",  # rps_fractional 100, application_utilization 0.2
)
REQUESTS = 700


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def _backends(start_backends: BackendFactory) -> list[Backend]:
    backends = start_backends(3)
    for backend, value in zip(backends, REPORTS, strict=True):
        backend.behavior = Behavior(headers=(("endpoint-load-metrics", value),))
    return backends


def _prepare(client: meshlib.Client | meshlib.AsyncClient, clock: FakeClock) -> WeightedRoundRobin:
    balancer = client.mesh.services["PAYMENTS"].balancer  # before the first request builds its picker
    assert isinstance(balancer, WeightedRoundRobin)
    balancer.clock = clock
    balancer.rng = random.Random(58)
    return balancer


def _counts(backends: list[Backend]) -> list[int]:
    return [b.count for b in backends]


def _check_shares(before: list[int], after: list[int]) -> None:
    got = [(a - b) / REQUESTS for a, b in zip(after, before, strict=True)]
    assert got == [pytest.approx(1 / 7, abs=0.03), pytest.approx(2 / 7, abs=0.03), pytest.approx(4 / 7, abs=0.03)]


def _reported(client: meshlib.Client | meshlib.AsyncClient) -> list[EndpointStats]:
    stats = client.mesh.services["PAYMENTS"].active.stats
    return sorted(stats.values(), key=lambda s: s.endpoint.port)


def test_traffic_follows_reported_capacity(start_backends: BackendFactory) -> None:
    backends = _backends(start_backends)
    clock = FakeClock()
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_LB": "weighted_round_robin"}
    with meshlib.Client(environ=env) as client:
        _prepare(client, clock)
        for _ in range(30):  # blacked out (10 s): round robin while reports arrive
            client.get("http://payments/charge")
        assert _counts(backends) == [10, 10, 10]
        assert all(s.load_report is not None for s in _reported(client))
        clock.now += 5
        for _ in range(30):
            client.get("http://payments/charge")
        assert _counts(backends) == [20, 20, 20]  # still in the blackout
        clock.now += 6  # reported continuously for 11 s: the weights are used from the next update
        before = _counts(backends)
        for _ in range(REQUESTS):
            assert client.get("http://payments/charge").status_code == 200
        _check_shares(before, _counts(backends))
        # mesh_status() and `meshlib status` show each endpoint's weight and last report (A58: qps / utilization)
        by_port = {e.port: e for e in client.mesh_status().services[0].endpoints}
        endpoints = [by_port[b.port] for b in backends]
        assert [e.effective_weight for e in endpoints] == [pytest.approx(125.0), 250.0, 500.0]
        assert [e.load_report for e in endpoints] == [
            {"rps_fractional": 100.0, "application_utilization": 0.8},
            {"rps_fractional": 100.0, "application_utilization": 0.4},
            {"rps_fractional": 100.0, "application_utilization": 0.2},
        ]
        text = format_status({"meshlib": "x", "pid": 1, "clients": [client.mesh_status().to_dict()]})
        assert "util 0.8 qps 100" in text and "util 0.2 qps 100" in text


@pytest.mark.anyio
async def test_async_traffic_follows_reported_capacity(start_backends: BackendFactory) -> None:
    backends = _backends(start_backends)
    clock = FakeClock()
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_LB": "weighted_round_robin"}
    async with meshlib.AsyncClient(environ=env) as client:
        _prepare(client, clock)
        for _ in range(30):
            await client.get("http://payments/charge")
        clock.now += 11
        for _ in range(3):  # one more report from each inside the window, then the weights are used
            await client.get("http://payments/charge")
        clock.now += 1
        before = _counts(backends)
        for _ in range(REQUESTS):
            assert (await client.get("http://payments/charge")).status_code == 200
        _check_shares(before, _counts(backends))


def test_other_balancers_never_read_reports(start_backends: BackendFactory) -> None:
    backends = _backends(start_backends)
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_LB": "round_robin"}
    with meshlib.Client(environ=env) as client:
        for _ in range(6):
            assert client.get("http://payments/charge").status_code == 200
        assert all(s.load_report is None and s.invalid_reports == 0 for s in _reported(client))
