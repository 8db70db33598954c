"""Services a control plane adds and removes while the client runs (the xDS path): one swap of the router's
services (and table), so a call sees the old set or the new one; a removed service is no longer routed to."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import meshlib
from meshlib._config import ServiceConfig, service_key
from meshlib.discovery import build_resolver
from meshlib.discovery.base import DiscoverySettings
from tests.anyio_backends import asyncio_and_trio  # noqa: F401 (the anyio_backend fixture: both loops)
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx


def test_a_service_added_at_run_time_is_routed_and_a_removed_one_is_not(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    with meshlib.Client(services={"payments": static_target(backends[:1])}) as client:
        assert client.get("http://payments/").status_code == 200
        router = client.mesh._router
        target = static_target(backends[1:])
        resolver = build_resolver("xds-cluster:ledger", target, DiscoverySettings(), variable="test")
        router.add_services({service_key("ledger"): (ServiceConfig("ledger", target), resolver)})
        answer = client.get("http://ledger/entries")
        assert answer.status_code == 200 and answer.extensions["meshlib.endpoint"] == backends[1].address
        assert client.mesh.services.keys() == {service_key("payments"), service_key("ledger")}

        removed = router.remove_services([service_key("ledger")])
        assert [s.name for s in removed] == ["ledger"]
        with pytest.raises(httpx.ConnectError):  # no longer a mesh host: passed through, and it does not resolve
            client.get("http://ledger/entries")
        assert client.get("http://payments/").status_code == 200  # the others are untouched


def test_adding_a_name_that_exists_keeps_the_existing_service(start_backends: BackendFactory) -> None:
    backends = start_backends(1)
    with meshlib.Client(services={"payments": static_target(backends)}) as client:
        client.get("http://payments/")
        key = service_key("payments")
        before = client.mesh.services[key]
        resolver = build_resolver("payments", "static://127.0.0.1:9", DiscoverySettings(), variable="test")
        client.mesh._router.add_services({key: (ServiceConfig("payments", "static://127.0.0.1:9"), resolver)})
        assert client.mesh.services[key] is before and client.get("http://payments/").status_code == 200


class Recording:
    """A resolver that notes when it is closed (wrapping a real static resolver)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.source = inner.source
        self.closed = threading.Event()

    def resolve(self) -> Any:
        return self.inner.resolve()

    async def aresolve(self) -> Any:
        return await self.inner.aresolve()

    def close(self) -> None:
        self.closed.set()
        self.inner.close()


def _ledger(backends: list[Any]) -> tuple[str, tuple[ServiceConfig, Recording]]:
    target = static_target(backends)
    resolver = Recording(build_resolver("ledger", target, DiscoverySettings(), variable="test"))
    return service_key("ledger"), (ServiceConfig("ledger", target), resolver)


def test_removing_a_service_lets_a_response_in_flight_finish_then_releases_everything(
    start_backends: BackendFactory,
) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(services={"payments": static_target([backend])}) as client:
        key, (config, resolver) = _ledger([backend])
        client.mesh.add_services({key: (config, resolver)})
        assert client.get("http://ledger/warm").status_code == 200
        service = client.mesh.services[key]
        refresher = client.mesh._refreshers[service]
        with client.stream("GET", "http://ledger/in-flight") as response:
            client.mesh.remove_services([key])  # while the response is being read
            assert resolver.closed.is_set() and service not in client.mesh._refreshers
            assert service.retiring  # the busy pool is retiring, not closed under the response
            assert response.read()  # the body still arrives
        assert service.retiring == {} and service.transports == {}  # closed by the last lease
        refresher._thread.join(5)
        assert not refresher._thread.is_alive()
        assert key not in client.mesh.services


@pytest.mark.anyio
async def test_removing_a_service_from_another_thread_on_an_async_client(start_backends: BackendFactory) -> None:
    import anyio

    (backend,) = start_backends(1)
    async with meshlib.AsyncClient(services={"payments": static_target([backend])}) as client:
        key, (config, resolver) = _ledger([backend])
        client.mesh.add_services({key: (config, resolver)})
        assert (await client.get("http://ledger/warm")).status_code == 200
        task = client.mesh._refreshers[client.mesh.services[key]]._task
        await anyio.to_thread.run_sync(client.mesh.remove_services, [key])  # as the xDS stream thread would
        assert resolver.closed.is_set() and key not in client.mesh.services
        with anyio.fail_after(5):
            while not task.done():  # the cancellation reaches the task on the loop
                await anyio.sleep(0)
        with pytest.raises(httpx.ConnectError):
            await client.get("http://ledger/after")
