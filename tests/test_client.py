"""meshlib.Client / AsyncClient against real loopback backends: routing, balancing, httpx compatibility."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import trustme

import meshlib
from meshlib.testing import Behavior
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx


def test_mesh_host_is_balanced_and_keeps_logical_host(start_backends: BackendFactory) -> None:
    backends = start_backends(3)
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_LB": "round_robin"}
    with meshlib.Client(environ=env) as client:
        answered: Counter[str] = Counter()
        for _ in range(60):
            response = client.get("http://payments/charge")
            assert response.status_code == 200
            body = response.json()
            assert body["host"] == "payments"  # Host header stays the logical name
            assert str(response.url) == "http://payments/charge"  # caller's URL untouched
            assert response.extensions["meshlib.service"] == "payments"
            answered[response.extensions["meshlib.endpoint"]] += 1
            assert response.extensions["meshlib.endpoint"] == next(
                b.address for b in backends if b.name == body["backend"]
            )
    assert set(answered) == {b.address for b in backends}
    assert sum(b.count for b in backends) == 60


def test_outside_hosts_pass_through_untouched(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ={"MESHLIB_SERVICE_PAYMENTS": static_target([backend])}) as client:
        response = client.get(backend.url + "/plain")
    assert response.status_code == 200
    assert "meshlib.endpoint" not in response.extensions
    assert response.json()["host"] == backend.address


@pytest.mark.parametrize("lb", ["p2c_ewma", "round_robin", "least_request", "random", "ring_hash"])
def test_every_balancer_serves_requests(start_backends: BackendFactory, lb: str) -> None:
    backends = start_backends(3)
    with meshlib.Client(services={"payments": static_target(backends)}, lb=lb) as client:
        for i in range(30):
            response = client.get("http://payments/", headers={"x-meshlib-hash-key": f"user-{i % 3}"})
            assert response.status_code == 200
    assert sum(b.count for b in backends) == 30


def test_ring_hash_sends_one_key_to_one_endpoint(start_backends: BackendFactory) -> None:
    backends = start_backends(4)
    env = {
        "MESHLIB_SERVICE_CART": static_target(backends),
        "MESHLIB_SERVICE_CART__LB": "ring_hash",
        "MESHLIB_SERVICE_CART__HASH_HEADER": "x-user",
    }
    with meshlib.Client(environ=env) as client:
        seen = {
            client.get("http://cart/", headers={"x-user": "alice"}).extensions["meshlib.endpoint"] for _ in range(20)
        }
    assert len(seen) == 1


def test_weights_from_static_target(start_backends: BackendFactory) -> None:
    heavy, light = start_backends(2)
    target = f"static://{heavy.address};weight=9,{light.address};weight=1"
    with meshlib.Client(services={"payments": target}, lb="round_robin") as client:
        for _ in range(100):
            client.get("http://payments/")
    assert (heavy.count, light.count) == (90, 10)


def test_user_transport_is_the_inner_transport() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    with meshlib.Client(
        services={"payments": "static://10.9.9.9:8080"}, transport=httpx.MockTransport(handler)
    ) as client:
        response = client.post("http://payments/charge", json={"amount": 5})
        other = client.get("http://example.test/x")
    assert response.json() == {"ok": True}
    assert other.status_code == 200
    assert str(seen[0].url) == "http://10.9.9.9:8080/charge"
    assert seen[0].headers["host"] == "payments"
    assert seen[0].read() == b'{"amount":5}'
    assert str(seen[1].url) == "http://example.test/x"  # non-mesh: untouched


def test_environment_proxy_does_not_capture_mesh_traffic(
    start_backends: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    (backend,) = start_backends(1)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    with meshlib.Client(services={"payments": static_target([backend])}) as client:
        assert client.get("http://payments/").status_code == 200


def test_https_keeps_logical_name_for_sni_and_verification(start_backends: BackendFactory) -> None:
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("payments").configure_cert(ctx)
    (backend,) = start_backends(1, ssl_context=ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    target = static_target([backend])
    with meshlib.Client(services={"payments": target}, verify=client_ctx) as client:
        response = client.get("https://payments/secure")
        assert response.status_code == 200
        assert response.json()["host"] == "payments"
    # The same endpoint addressed as another logical name fails verification: the name is what is checked.
    with meshlib.Client(services={"billing": target}, verify=client_ctx) as client, pytest.raises(httpx.ConnectError):
        client.get("https://billing/secure")


def test_streaming_response_counts_in_flight_until_closed(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(services={"payments": static_target([backend])}) as client:
        with client.stream("GET", "http://payments/") as response:
            stats = next(iter(client.mesh.services["PAYMENTS"].active.stats.values()))  # type: ignore[union-attr]
            assert stats.inflight == 1
            response.read()
        assert stats.inflight == 0


def test_32_threads_share_one_client(start_backends: BackendFactory) -> None:
    backends = start_backends(3)
    with meshlib.Client(services={"payments": static_target(backends)}) as client:

        def call(i: int) -> str:
            response = client.get(f"http://payments/item/{i}")
            assert response.status_code == 200
            assert response.json()["path"] == f"/item/{i}"
            return str(response.extensions["meshlib.endpoint"])

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, range(640)))
        for stats in client.mesh.services["PAYMENTS"].active.stats.values():  # type: ignore[union-attr]
            assert stats.inflight == 0
    assert len(results) == 640
    assert sum(b.count for b in backends) == 640


@pytest.mark.anyio
async def test_500_tasks_share_one_async_client(start_backends: BackendFactory) -> None:
    backends = start_backends(3)
    async with meshlib.AsyncClient(services={"payments": static_target(backends)}) as client:

        async def call(i: int) -> int:
            response = await client.get(f"http://payments/item/{i}")
            assert response.json()["path"] == f"/item/{i}"
            return response.status_code

        statuses = await asyncio.gather(*(call(i) for i in range(500)))
        for stats in client.mesh.services["PAYMENTS"].active.stats.values():  # type: ignore[union-attr]
            assert stats.inflight == 0
    assert statuses == [200] * 500
    assert sum(b.count for b in backends) == 500


@pytest.mark.anyio
async def test_async_user_transport_and_passthrough() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url} host={request.headers['host']}")
        return httpx.Response(204)

    async with meshlib.AsyncClient(
        services={"payments": "static://10.9.9.9:8080"}, transport=httpx.MockTransport(handler)
    ) as client:
        await client.delete("http://payments/x")
        await client.get("http://other.test/")
    assert seen == ["http://10.9.9.9:8080/x host=payments", "http://other.test/ host=other.test"]


def test_close_leaks_no_threads_or_connections(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    before = set(threading.enumerate())
    client = meshlib.Client(services={"payments": static_target(backends)})
    for _ in range(10):
        client.get("http://payments/")
    client.close()
    for backend in backends:
        assert backend.wait_idle(timeout=5.0)
    assert set(threading.enumerate()) - before == set()


def test_closed_client_refuses_requests(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    client = meshlib.Client(services={"payments": static_target([backend])})
    client.close()
    with pytest.raises(RuntimeError):
        client.get("http://payments/")


def test_server_errors_are_returned_not_raised(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(status=503))
    with meshlib.Client(services={"payments": static_target([backend])}) as client:
        assert client.get("http://payments/").status_code == 503


@pytest.mark.anyio
async def test_async_close_closes_every_endpoint_connection(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    client = meshlib.AsyncClient(environ={"MESHLIB_SERVICE_PAYMENTS": static_target(backends)})
    await asyncio.gather(*(client.get("http://payments/") for _ in range(20)))
    await client.aclose()  # (refresh tasks stopping on close: tests/discovery/test_client_dns.py)
    for backend in backends:
        assert await asyncio.to_thread(backend.wait_idle, 5.0)  # every pooled connection was closed
