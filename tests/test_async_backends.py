"""``AsyncClient`` under asyncio and under trio (issue 10, item 21): every test runs on both anyio backends.

Against real loopback backends, a real dnsmasq and the Consul emulator: plain calls, streamed bodies,
retries with their backoff sleep, the call's deadline, discovery refreshes in the background (a system task
under trio), and closing the client while a Consul blocking query is in flight. What is asyncio-only
(``MESHLIB_INNER_TRANSPORT=aiohttp``) is refused under trio with a clear error.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

import meshlib
from meshlib.discovery import register_scheme
from meshlib.discovery.consul import resolver as consul_module
from meshlib.discovery.consul.query import WatchOptions
from meshlib.discovery.consul.resolver import FORM, ConsulResolver
from meshlib.testing import Behavior
from tests.anyio_backends import asyncio_and_trio  # noqa: F401 (the anyio_backend fixture)
from tests.conftest import BackendFactory, static_target
from tests.discovery.conftest import require_dnsmasq
from tests.httplib import LIBRARY, httpx
from tests.servers.consul import ConsulEmulator
from tests.servers.dnsmasq import Dnsmasq

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def consul() -> Iterator[ConsulEmulator]:
    with ConsulEmulator(jitter=False) as emulator:
        yield emulator


@pytest.fixture
def fast_watch() -> Iterator[None]:
    """``consul://`` without its rate limit (successive changes would otherwise be 15 s apart)."""
    options = WatchOptions(refill=0.0, backoff_base=0.01, backoff_cap=0.05)
    register_scheme("consul", functools.partial(consul_module.from_target, options=options), form=FORM, replace=True)
    yield
    register_scheme("consul", consul_module.from_target, form=FORM, replace=True)


@pytest.fixture(autouse=True)
def no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CONSUL_"):
            monkeypatch.delenv(name)


def _idle(client: Any) -> None:
    (service,) = client.mesh_status().services
    assert service.budget.inflight == 0 and all(e.inflight == 0 for e in service.endpoints)


async def test_static_get_and_stream(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    async with meshlib.AsyncClient(services={"users": static_target(backends)}, environ={}) as client:
        response = await client.get("http://users/hello")
        assert response.status_code == 200 and response.json()["host"] == "users"
        async with client.stream("GET", "http://users/stream") as streamed:
            body = b"".join([chunk async for chunk in streamed.aiter_bytes()])
        assert b'"path": "/stream"' in body or b'"path":"/stream"' in body
        _idle(client)
    assert client.is_closed
    with pytest.raises(RuntimeError):
        await client.get("http://users/")


async def test_retries_sleep_their_backoff_and_succeed(start_backends: BackendFactory) -> None:
    (failing,) = start_backends(1, behavior=Behavior(status=503), prefix="failing")
    (healthy,) = start_backends(1, prefix="healthy")
    env = {"MESHLIB_LB": "round_robin", "MESHLIB_RETRY_BACKOFF_BASE": "10ms", "MESHLIB_RETRY_BACKOFF_CAP": "20ms"}
    async with meshlib.AsyncClient(services={"users": static_target([failing, healthy])}, environ=env) as client:
        responses = [await client.get("http://users/") for _ in range(4)]
    assert [r.status_code for r in responses] == [200] * 4
    assert {r.extensions["meshlib.endpoint"] for r in responses} == {healthy.address}
    assert any(r.extensions["meshlib.attempts"] == 2 for r in responses) and failing.count >= 1


async def test_the_deadline_ends_a_slow_call(start_backends: BackendFactory) -> None:
    (slow,) = start_backends(1, behavior=Behavior(delay=30))
    env = {"MESHLIB_TIMEOUT": "200ms", "MESHLIB_RETRIES": "0"}
    async with meshlib.AsyncClient(services={"users": static_target([slow])}, environ=env) as client:
        with pytest.raises(meshlib.DeadlineExceeded) as info:
            await client.get("http://users/")
        assert isinstance(info.value, httpx.TimeoutException)
        _idle(client)


async def test_cancelling_a_call_releases_its_lease(start_backends: BackendFactory) -> None:
    (slow,) = start_backends(1, behavior=Behavior(delay=30))
    async with meshlib.AsyncClient(services={"users": static_target([slow])}, environ={}) as client:
        with anyio.move_on_after(0.2):
            await client.get("http://users/")
        _idle(client)


async def test_dns_discovery(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    with Dnsmasq(
        hosts={"users.internal": [backend.host]}, ttl=1, domains=("internal",), binary=require_dnsmasq()
    ) as dns:
        host, port = dns.server
        env = {
            "MESHLIB_SERVICE_USERS": f"dns://users.internal:{backend.port}",
            "MESHLIB_DNS_SERVERS": f"{host}:{port}",
            "MESHLIB_DNS_TIMEOUT": "2s",
        }
        async with meshlib.AsyncClient(environ=env) as client:
            for _ in range(3):
                response = await client.get("http://users/")
                assert response.extensions["meshlib.endpoint"] == backend.address
    assert backend.count == 3


@pytest.mark.usefixtures("fast_watch")
async def test_consul_discovery_follows_changes_and_close_ends_the_watch(
    consul: ConsulEmulator, start_backends: BackendFactory
) -> None:
    (old,) = start_backends(1, host="127.0.0.2", prefix="old")
    (new,) = start_backends(1, host="127.0.0.3", prefix="new")
    consul.register("payments", old.port, id="payments-1", address="127.0.0.2")
    env = {"MESHLIB_SERVICE_PAYMENTS": "consul://payments", "CONSUL_HTTP_ADDR": consul.address}
    client = meshlib.AsyncClient(environ=env)
    assert (await client.get("http://payments/")).extensions["meshlib.endpoint"] == old.address
    await anyio.to_thread.run_sync(consul.wait_for_blocked)  # the refresh task is parked in a blocking query
    asked = consul.count
    consul.register("payments", new.port, id="payments-1", address="127.0.0.3")
    await anyio.to_thread.run_sync(consul.wait_for_requests, asked + 1)  # the change was delivered...
    await anyio.to_thread.run_sync(consul.wait_for_blocked)  # ...applied, and the loop is parked again
    assert (await client.get("http://payments/")).extensions["meshlib.endpoint"] == new.address
    resolver = client.mesh.services["PAYMENTS"].resolver
    with anyio.fail_after(10):
        await client.aclose()  # cancels the refresh task in its blocking query
    assert isinstance(resolver, ConsulResolver) and resolver._closed.is_set()


@pytest.mark.skipif(LIBRARY != "httpx", reason="httpx-aiohttp plugs into httpx only")
async def test_aiohttp_inner_transport_is_refused_under_trio_only(
    anyio_backend: str, start_backends: BackendFactory
) -> None:
    pytest.importorskip("httpx_aiohttp")
    (backend,) = start_backends(1)
    env = {"MESHLIB_INNER_TRANSPORT": "aiohttp"}
    async with meshlib.AsyncClient(services={"users": static_target([backend])}, environ=env) as client:
        if anyio_backend == "asyncio":
            assert (await client.get("http://users/")).status_code == 200
            return
        with pytest.raises(meshlib.errors.ConfigError, match=r"MESHLIB_INNER_TRANSPORT='aiohttp'.*trio"):
            await client.get("http://users/")
