"""Service.apply: endpoint sets applied by difference keep what stays, close what leaves, build what joins."""

from __future__ import annotations

from typing import Any

from meshlib.config import MeshConfig
from meshlib.discovery.base import Endpoint, Resolution
from meshlib.discovery.cache import Snapshot
from meshlib.service import Service


class _Transport:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.closed = False


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


A, B, C = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)


def test_stays_keep_stats_and_pool_leavers_close_joiners_get_new_ones() -> None:
    service, made = _service()
    assert _apply(service, 1, A, B) == []
    active = service.active
    assert active is not None
    a_stats, a_pool, b_pool = active.stats[("10.0.0.1", 80)], active.transports[("10.0.0.1", 80)], made[1]
    closed = _apply(service, 2, A, C)
    active = service.active
    assert active is not None
    assert closed == [b_pool]  # B left with nothing in flight: close its pool now
    assert active.stats[("10.0.0.1", 80)] is a_stats and active.transports[("10.0.0.1", 80)] is a_pool
    assert set(active.stats) == {("10.0.0.1", 80), ("10.0.0.3", 80)}
    assert len(made) == 3


def test_weight_change_updates_the_endpoint_in_place() -> None:
    service, made = _service()
    _apply(service, 1, A, B)
    heavier = Endpoint("10.0.0.1", 80, weight=5)
    assert _apply(service, 2, heavier, B) == []
    active = service.active
    assert active is not None
    assert active.stats[("10.0.0.1", 80)].endpoint.weight == 5
    assert len(made) == 2  # no new pool for a weight change


def test_endpoint_leaving_with_requests_in_flight_retires_then_returns() -> None:
    service, made = _service()
    _apply(service, 1, A, B)
    active = service.active
    assert active is not None
    b_stats = active.stats[("10.0.0.2", 80)]
    b_stats.begin()
    assert _apply(service, 2, A) == []  # in flight: retired, not closed
    assert ("10.0.0.2", 80) in service.retiring
    _apply(service, 3, A, B)  # back before its request ended: same stats and pool
    active = service.active
    assert active is not None
    assert active.stats[("10.0.0.2", 80)] is b_stats
    assert service.retiring == {}
    assert len(made) == 2


def test_duplicate_listing_does_not_drop_the_live_endpoint() -> None:
    service, _ = _service()
    _apply(service, 1, A, Endpoint("10.0.0.1", 80, weight=3), B)
    _apply(service, 2, A, B)  # the duplicate entry went away; A itself stays
    active = service.active
    assert active is not None
    assert set(active.stats) == {("10.0.0.1", 80), ("10.0.0.2", 80)}
