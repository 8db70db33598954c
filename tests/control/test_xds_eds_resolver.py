"""EdsResolver: discovery fed by EDS pushes from the xDS double, sync and async (asyncio and trio)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("envoy.service.discovery.v3.ads_pb2_grpc")
from envoy.config.core.v3 import base_pb2  # noqa: E402

from meshlib.control.xds.client import CLUSTER_LOAD_ASSIGNMENT, AdsClient  # noqa: E402
from meshlib.control.xds.eds_resolver import EdsResolver  # noqa: E402
from meshlib.control.xds.types import endpoints_type  # noqa: E402
from meshlib.errors import DiscoveryError  # noqa: E402
from tests.anyio_backends import asyncio_and_trio  # noqa: E402, F401 (the anyio_backend fixture: both loops)
from tests.servers import xds_resources as r  # noqa: E402
from tests.servers.xds import XdsServer  # noqa: E402

pytestmark = pytest.mark.timeout(30)


def assignment(*ports: int) -> Any:
    return r.cluster_load_assignment("payments", [r.locality([r.endpoint("127.0.0.1", p) for p in ports])])


@pytest.fixture
def xds() -> Iterator[tuple[XdsServer, AdsClient]]:
    with XdsServer() as server:
        client = AdsClient(
            server.address,
            lambda: grpc.insecure_channel(server.address),
            base_pb2.Node(id="meshlib-test"),
            {CLUSTER_LOAD_ASSIGNMENT: endpoints_type()},
            backoff=(0.05, 1.6, 0.2, 0.2),
            does_not_exist_timeout=0.3,
        )
        try:
            yield server, client
        finally:
            client.close()


def ports(resolution: Any) -> list[int]:
    return sorted(e.port for e in resolution.endpoints)


def test_first_answer_then_each_push(xds: tuple[XdsServer, AdsClient]) -> None:
    server, client = xds
    server.set(CLUSTER_LOAD_ASSIGNMENT, [assignment(8001, 8002)])
    resolver = EdsResolver(client, "payments", "payments", wait=10)
    try:
        first = resolver.resolve()
        assert ports(first) == [8001, 8002] and first.watch and first.ttl is None
        done: list[Any] = []
        waiter = threading.Thread(target=lambda: done.append(resolver.resolve()))
        waiter.start()  # blocks until the next push
        server.set(CLUSTER_LOAD_ASSIGNMENT, [assignment(8003)])
        waiter.join(10)
        assert ports(done[0]) == [8003]
    finally:
        resolver.close()


def test_locality_zone_becomes_the_endpoint_zone(xds: tuple[XdsServer, AdsClient]) -> None:
    """Zone-aware routing's input from xDS: each EDS locality's ``zone`` (sub-zone and region kept in meta)."""
    server, client = xds
    localities = [
        r.locality([r.endpoint("127.0.0.1", 8001)], region="r1", zone="z-a", sub_zone="rack1"),
        r.locality([r.endpoint("127.0.0.1", 8002)], region="r1", zone="z-b"),
        r.locality([r.endpoint("127.0.0.1", 8003)]),
    ]
    server.set(CLUSTER_LOAD_ASSIGNMENT, [r.cluster_load_assignment("payments", localities)])
    resolver = EdsResolver(client, "payments", "payments", wait=10)
    try:
        endpoints = {e.port: e for e in resolver.resolve().endpoints}
        assert {port: e.zone for port, e in endpoints.items()} == {8001: "z-a", 8002: "z-b", 8003: None}
        assert endpoints[8001].meta["sub_zone"] == "rack1" and endpoints[8001].meta["region"] == "r1"
    finally:
        resolver.close()


def test_no_such_resource_is_a_discovery_error(xds: tuple[XdsServer, AdsClient]) -> None:
    server, client = xds
    server.set(CLUSTER_LOAD_ASSIGNMENT, [assignment(8001)])
    resolver = EdsResolver(client, "ledger", "ledger", wait=10)
    try:
        with pytest.raises(DiscoveryError) as caught:
            resolver.resolve()
        assert "no such ClusterLoadAssignment" in str(caught.value) and caught.value.service == "ledger"
    finally:
        resolver.close()


def test_close_ends_a_wait_at_once(xds: tuple[XdsServer, AdsClient]) -> None:
    server, client = xds
    server.set(CLUSTER_LOAD_ASSIGNMENT, [assignment(8001)])
    resolver = EdsResolver(client, "payments", "payments", wait=30)
    first = resolver.resolve()
    answers: list[object] = []
    waiter = threading.Thread(target=lambda: answers.append(resolver.resolve()))
    waiter.start()
    resolver.close()
    waiter.join(10)
    # Ended at once with the last answer (so a refresh loop sees no change and ends without logging a failure).
    assert not waiter.is_alive() and answers == [first]


@pytest.mark.anyio
async def test_async_waits_for_a_push_without_a_thread(xds: tuple[XdsServer, AdsClient]) -> None:
    import anyio

    server, client = xds
    server.set(CLUSTER_LOAD_ASSIGNMENT, [assignment(8001)])
    resolver = EdsResolver(client, "payments", "payments", wait=10)
    try:
        assert ports(await resolver.aresolve()) == [8001]
        threads = threading.active_count()
        async with anyio.create_task_group() as group:
            results: list[Any] = []

            async def wait() -> None:
                results.append(await resolver.aresolve())

            group.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            assert threading.active_count() == threads  # waiting holds no worker thread
            server.set(CLUSTER_LOAD_ASSIGNMENT, [assignment(8002, 8004)])
        assert ports(results[0]) == [8002, 8004]
    finally:
        resolver.close()
