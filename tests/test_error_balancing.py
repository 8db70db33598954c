"""Fast errors do not attract traffic: one of three real backends answers instant 404s (p2c_ewma, the default).

Before, each instant 404 lowered that endpoint's latency estimate and it won most comparisons (about 2/3 of
600 requests). A 4xx still counts neither against the endpoint's breaker nor its outlier detection.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

import meshlib
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target

REQUESTS = 600


def _env(backends: list[Backend]) -> dict[str, str]:
    return {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_LB": "p2c_ewma"}


def _seed(client: meshlib.Client | meshlib.AsyncClient) -> Any:
    """The service, its balancer's random draws seeded (before the first request builds its picker)."""
    service = client.mesh.services["PAYMENTS"]
    service.balancer.rng = random.Random(20240610)
    return service


def _check(backends: list[Backend], statuses: Counter[int], service: Any) -> None:
    broken = backends[0]
    assert statuses == Counter({200: REQUESTS - broken.count, 404: broken.count})
    assert broken.count <= REQUESTS // 3  # at most its fair share (it had about half before)
    assert service.breakers == {}  # 4xx never count against an endpoint: no breaker was even made
    assert not service.detector.ejected()


def test_an_endpoint_answering_instant_404s_gets_at_most_its_share(start_backends: BackendFactory) -> None:
    backends = start_backends(3)
    backends[0].behavior = Behavior(status=404, body=b"")
    statuses: Counter[int] = Counter()
    with meshlib.Client(environ=_env(backends)) as client:
        service = _seed(client)
        for _ in range(REQUESTS):
            statuses[client.get("http://payments/charge").status_code] += 1
    _check(backends, statuses, service)


@pytest.mark.anyio
async def test_async_an_endpoint_answering_instant_404s_gets_at_most_its_share(start_backends: BackendFactory) -> None:
    backends = start_backends(3)
    backends[0].behavior = Behavior(status=404, body=b"")
    statuses: Counter[int] = Counter()
    async with meshlib.AsyncClient(environ=_env(backends)) as client:
        service = _seed(client)
        for _ in range(REQUESTS):
            statuses[(await client.get("http://payments/charge")).status_code] += 1
    _check(backends, statuses, service)
