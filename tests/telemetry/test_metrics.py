"""Client metrics end to end: counts equal the requests the test sent, through real loopback backends.

An explicit ``MeterProvider`` with the SDK's ``InMemoryMetricReader`` is passed to each client; collection
reads the synchronous duration histogram and calls the observable instruments' callbacks.
"""

from __future__ import annotations

import logging

import pytest

import meshlib
from meshlib.telemetry.metrics import DURATION_BUCKETS
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx
from tests.telemetry.conftest import Metrics

DURATION = "http.client.request.duration"


def _env(backends: list[Backend], **settings: str) -> dict[str, str]:
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends)}
    env.update({f"MESHLIB_{key}": value for key, value in settings.items()})
    return env


def test_duration_histogram_counts_every_call(start_backends: BackendFactory, metrics: Metrics) -> None:
    backends = start_backends(2)
    with meshlib.Client(environ=_env(backends), meter_provider=metrics.provider) as client:
        for i in range(7):
            assert client.get(f"http://payments/{i}").status_code == 200
        # Observable instruments read the client's live state: collected while it is open.
        assert metrics.value("meshlib.client.attempts") == 7
        assert metrics.value("meshlib.client.retries") == 0
        assert metrics.value("meshlib.client.discovery.refreshes", **{"server.address": "payments"}) == 1
        assert metrics.value("meshlib.client.endpoints", **{"meshlib.endpoint.state": "available"}) == 2
        assert metrics.value("http.client.active_requests") == 0
    points = metrics.points(DURATION)
    assert sum(p.count for p in points) == 7 == sum(b.count for b in backends)
    assert {p.attributes["network.peer.port"] for p in points} <= {b.port for b in backends}
    sample = points[0]
    assert tuple(sample.explicit_bounds) == DURATION_BUCKETS  # the semantic conventions' buckets
    assert {k: v for k, v in sample.attributes.items() if not k.startswith("network.peer")} == {
        "http.request.method": "GET",
        "server.address": "payments",
        "server.port": 80,
        "http.response.status_code": 200,
        "meshlib.outcome": "success",
    }


@pytest.mark.anyio
async def test_async_failures_retries_and_errors(start_backends: BackendFactory, metrics: Metrics) -> None:
    backends = start_backends(2, Behavior(status=503))
    env = _env(backends, RETRIES="1", OUTLIER_FAILURES="100", BREAKER_FAILURES="100")
    async with meshlib.AsyncClient(environ=env, meter_provider=metrics.provider) as client:
        for _ in range(4):
            assert (await client.get("http://payments/charge")).status_code == 503
        assert metrics.value("meshlib.client.attempts") == 8 == sum(b.count for b in backends)
        assert metrics.value("meshlib.client.attempt.failures") == 8
        assert metrics.value("meshlib.client.retries", **{"server.address": "payments"}) == 4
        assert metrics.value("meshlib.client.retry_budget.exhausted") == 0
    assert metrics.value(DURATION) == 4
    assert metrics.value(DURATION, **{"error.type": "503", "meshlib.outcome": "failure"}) == 4


def test_exceptions_are_counted_with_their_type(start_backends: BackendFactory, metrics: Metrics) -> None:
    (backend,) = start_backends(1)
    backend.refuse()
    with meshlib.Client(environ=_env([backend], RETRIES="0"), meter_provider=metrics.provider) as client:
        for _ in range(3):
            with pytest.raises(httpx.ConnectError):
                client.get("http://payments/charge")
    assert metrics.value(DURATION, **{"error.type": "ConnectError", "meshlib.outcome": "failure"}) == 3


def test_budget_breakers_and_ejections_are_counted(start_backends: BackendFactory, metrics: Metrics) -> None:
    backends = start_backends(2, Behavior(status=503))
    env = _env(
        backends,
        RETRIES="1",
        RETRY_BUDGET_PERCENT="0",
        RETRY_BUDGET_MIN_PER_SECOND="0",
        BREAKER_FAILURES="1",
        OUTLIER_FAILURES="1",
        OUTLIER_MAX_PERCENT="100",
    )
    with meshlib.Client(environ=env, meter_provider=metrics.provider) as client:
        first = client.get("http://payments/charge")
        assert first.status_code == 503
        assert first.extensions["meshlib.attempts"] == 1  # the empty budget refused the retry
        assert metrics.value("meshlib.client.retry_budget.exhausted") == 1
        assert metrics.value("meshlib.client.retries") == 0
        assert metrics.value("meshlib.client.breaker.opens") == 1  # one failure opened that endpoint's breaker
        assert metrics.value("meshlib.client.ejections", **{"server.address": "payments"}) == 1
        assert metrics.value("meshlib.client.ejections", **{"meshlib.ejection.reason": "consecutive"}) == 1
        assert metrics.value("meshlib.client.ejections", **{"meshlib.ejection.reason": "success-rate"}) == 0
        assert metrics.value("meshlib.client.endpoints", **{"meshlib.endpoint.state": "open"}) == 1
        (service,) = client.mesh_status().services
    assert [e.breaker for e in service.endpoints].count("open") == 1


def test_discovery_failures_are_counted(start_backends: BackendFactory, metrics: Metrics) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ=_env([backend]), meter_provider=metrics.provider) as client:
        client.get("http://payments/")
        service = client.mesh.services["PAYMENTS"]
        service.cache.on_failure("resolver timed out")  # what the refresh loop reports on a failed refresh
        assert metrics.value("meshlib.client.discovery.failures", **{"server.address": "payments"}) == 1
        assert metrics.value("meshlib.client.discovery.age", **{"server.address": "payments"}) >= 0


def test_in_flight_counts_until_the_body_is_closed(start_backends: BackendFactory, metrics: Metrics) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ=_env([backend]), meter_provider=metrics.provider) as client:
        with client.stream("GET", "http://payments/stream") as response:
            assert response.status_code == 200
            assert metrics.value("http.client.active_requests", **{"server.address": "payments"}) == 1
            assert metrics.value("meshlib.client.endpoint.active_requests", **{"network.peer.port": backend.port}) == 1
            response.read()
        assert metrics.value("http.client.active_requests") == 0
        assert metrics.value("meshlib.client.endpoint.active_requests") == 0


def test_clients_share_instruments_and_add_up(
    start_backends: BackendFactory, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    backends = start_backends(1)
    with caplog.at_level(logging.WARNING):
        one = meshlib.Client(environ=_env(backends), meter_provider=metrics.provider)
        two = meshlib.Client(environ=_env(backends), meter_provider=metrics.provider)
        with one, two:
            one.get("http://payments/a")
            two.get("http://payments/b")
            two.get("http://payments/c")
            assert metrics.value(DURATION) == 3
            assert metrics.value("meshlib.client.attempts") == 3  # both clients' endpoint counters, summed
            assert metrics.value("meshlib.client.endpoints", **{"meshlib.endpoint.state": "available"}) == 1
        assert metrics.value("meshlib.client.attempts") == 0  # closed clients are no longer observed
    assert not [r for r in caplog.records if "already" in r.getMessage() or "conflict" in r.getMessage()]


def test_no_log_line_per_request(start_backends: BackendFactory, caplog: pytest.LogCaptureFixture) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ=_env([backend])) as client:
        client.get("http://payments/first")  # discovery's first answer: a state change, may log
        with caplog.at_level(logging.INFO, logger="meshlib"):
            for _ in range(20):
                client.get("http://payments/again")
    assert [r for r in caplog.records if r.name.startswith("meshlib")] == []
