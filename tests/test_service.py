"""Service.apply and transport_for: sets applied by difference; pools made on first use, closed when unused."""

from __future__ import annotations

from typing import Any

import pytest

from meshlib._service import Service
from meshlib.balance.base import EndpointStats
from meshlib.config import MeshConfig
from meshlib.discovery.base import Endpoint, Resolution
from meshlib.discovery.cache import Snapshot

pytestmark = pytest.mark.one_library


class _Transport:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint


class _Resolver:
    source = "test://"

    def resolve(self) -> Resolution:
        raise NotImplementedError

    async def aresolve(self) -> Resolution:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _service() -> tuple[Service[Any], list[_Transport]]:
    config = MeshConfig.from_env({"MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:1"})
    made: list[_Transport] = []

    def new_transport(endpoint: Endpoint) -> _Transport:
        made.append(_Transport(endpoint))
        return made[-1]

    svc = config.service("payments")
    assert svc is not None
    return Service(svc, config, _Resolver(), new_transport), made


def _apply(service: Service[Any], version: int, *endpoints: Endpoint) -> list[Any]:
    return service.apply(Snapshot(endpoints, 0.0, version))


def _stats(service: Service[Any], host: str) -> EndpointStats:
    assert service.active is not None
    return service.active.stats[(host, 80)]


A, B, C = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)


def test_pools_are_made_on_first_use_once() -> None:
    service, made = _service()
    _apply(service, 1, A, B, C)
    assert made == []  # applying a set opens nothing
    first = service.transport_for(_stats(service, "10.0.0.1"))
    assert service.transport_for(_stats(service, "10.0.0.1")) is first
    assert made == [first]


def test_stays_keep_stats_and_pool_leavers_close_joiners_start_fresh() -> None:
    service, made = _service()
    _apply(service, 1, A, B)
    a_stats = _stats(service, "10.0.0.1")
    a_pool = service.transport_for(a_stats)
    b_pool = service.transport_for(_stats(service, "10.0.0.2"))
    closed = _apply(service, 2, A, C)
    assert closed == [b_pool]  # B left with nothing in flight: close its pool now
    assert _stats(service, "10.0.0.1") is a_stats and service.transport_for(a_stats) is a_pool
    assert set(service.active.stats) == {("10.0.0.1", 80), ("10.0.0.3", 80)}  # type: ignore[union-attr]
    assert len(made) == 2  # C has no pool until it is used


def test_unused_endpoint_leaving_closes_nothing() -> None:
    service, made = _service()
    _apply(service, 1, A, B)
    assert _apply(service, 2, A) == []
    assert made == []


def test_weight_change_updates_the_endpoint_in_place() -> None:
    service, made = _service()
    _apply(service, 1, A, B)
    pool = service.transport_for(_stats(service, "10.0.0.1"))
    assert _apply(service, 2, Endpoint("10.0.0.1", 80, weight=5), B) == []
    assert _stats(service, "10.0.0.1").endpoint.weight == 5
    assert service.transport_for(_stats(service, "10.0.0.1")) is pool  # no new pool for a weight change
    assert len(made) == 1


def test_endpoint_leaving_with_requests_in_flight_retires_then_returns() -> None:
    service, made = _service()
    _apply(service, 1, A, B)
    b_stats = _stats(service, "10.0.0.2")
    b_pool = service.transport_for(b_stats)
    b_stats.begin()
    assert _apply(service, 2, A) == []  # in flight: retired, not closed
    assert ("10.0.0.2", 80) in service.retiring
    _apply(service, 3, A, B)  # back before its request ended: same stats and pool
    assert _stats(service, "10.0.0.2") is b_stats
    assert service.transport_for(b_stats) is b_pool
    assert service.retiring == {}
    assert len(made) == 1


def test_pool_made_after_its_endpoint_left_is_closed_when_its_request_ends() -> None:
    service, _ = _service()
    _apply(service, 1, A, B)
    b_stats = _stats(service, "10.0.0.2")  # picked...
    _apply(service, 2, A)  # ...then B leaves before its pool exists
    pool = service.transport_for(b_stats)  # the attempt still gets one
    b_stats.begin()
    b_stats.end(0.001, 1.0)
    assert service.retire(b_stats) is pool  # and it is handed back for closing once the request is over
    assert service.retiring == {}


def test_duplicate_listing_does_not_drop_the_live_endpoint() -> None:
    service, _ = _service()
    _apply(service, 1, A, Endpoint("10.0.0.1", 80, weight=3), B)
    _apply(service, 2, A, B)  # the duplicate entry went away; A itself stays
    assert service.active is not None
    assert set(service.active.stats) == {("10.0.0.1", 80), ("10.0.0.2", 80)}


def test_closing_returns_every_pool_once() -> None:
    service, _ = _service()
    _apply(service, 1, A, B)
    pools = {service.transport_for(_stats(service, "10.0.0.1")), service.transport_for(_stats(service, "10.0.0.2"))}
    assert set(service.take_pools()) == pools
    assert service.take_pools() == []
