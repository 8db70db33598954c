"""The clients on DNS discovery against a real dnsmasq: traffic follows record changes, failures keep the last set."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

import meshlib
from meshlib.testing import Backend
from tests.conftest import BackendFactory, LogWatch
from tests.discovery.conftest import require_dnsmasq
from tests.httplib import httpx
from tests.servers.dnsmasq import Dnsmasq, SrvRecord

SRV_NAME = "_http._tcp.users.internal"


@pytest.fixture
def dns() -> Iterator[Dnsmasq]:
    """dnsmasq with short TTLs (1 s), so record changes reach clients quickly."""
    with Dnsmasq(hosts={}, ttl=1, domains=("internal",), binary=require_dnsmasq()) as server:
        yield server


def _env(dns: Dnsmasq, target: str) -> dict[str, str]:
    host, port = dns.server
    return {
        "MESHLIB_SERVICE_USERS": target,
        "MESHLIB_DNS_SERVERS": f"{host}:{port}",
        "MESHLIB_DNS_TTL_MIN": "100ms",
        "MESHLIB_DNS_TIMEOUT": "500ms",
        "MESHLIB_LB": "round_robin",
    }


def _point_srv(dns: Dnsmasq, backends: list[Backend]) -> None:
    hosts = {f"web{i}.users.internal": [b.host] for i, b in enumerate(backends)}
    srv = [SrvRecord(SRV_NAME, f"web{i}.users.internal", b.port, weight=10) for i, b in enumerate(backends)]
    dns.set_records(hosts=hosts, srv=srv, ttl=1)


@pytest.fixture
def endpoints_changed(log_event: LogWatch) -> threading.Event:
    return log_event("endpoints of service users changed")


def test_srv_change_moves_traffic_after_ttl(
    dns: Dnsmasq, start_backends: BackendFactory, endpoints_changed: threading.Event
) -> None:
    old, new = start_backends(2)
    _point_srv(dns, [old])
    with meshlib.Client(environ=_env(dns, f"dns+srv://{SRV_NAME}")) as client:
        for _ in range(5):
            assert client.get("http://users/").extensions["meshlib.endpoint"] == old.address
        endpoints_changed.clear()  # the first answer logs a change too
        _point_srv(dns, [new])
        assert endpoints_changed.wait(10), "the background refresh never applied the new records"
        answered = {client.get("http://users/").extensions["meshlib.endpoint"] for _ in range(10)}
    assert answered == {new.address}
    assert old.count == 5 and new.count == 10
    assert old.wait_idle(5)  # the departed endpoint's pool was closed


@pytest.mark.anyio
async def test_async_srv_change_moves_traffic(
    dns: Dnsmasq, start_backends: BackendFactory, endpoints_changed: threading.Event
) -> None:
    old, new = start_backends(2)
    _point_srv(dns, [old])
    async with meshlib.AsyncClient(environ=_env(dns, f"dns+srv://{SRV_NAME}")) as client:
        assert (await client.get("http://users/")).extensions["meshlib.endpoint"] == old.address
        endpoints_changed.clear()
        _point_srv(dns, [new])
        import anyio

        with anyio.fail_after(10):
            while not endpoints_changed.is_set():
                await anyio.sleep(0.02)  # yield to the refresh task; the event says when it has applied
        assert (await client.get("http://users/")).extensions["meshlib.endpoint"] == new.address


def test_a_records_on_one_port(dns: Dnsmasq, start_backends: BackendFactory) -> None:
    (first,) = start_backends(1, host="127.0.0.2")
    second = Backend("second", host="127.0.0.3", port=first.port).start()
    try:
        dns.set_records(hosts={"users.internal": ["127.0.0.2", "127.0.0.3"]}, ttl=30)
        with meshlib.Client(environ=_env(dns, f"dns://users.internal:{first.port}")) as client:
            answered = {client.get("http://users/").extensions["meshlib.endpoint"] for _ in range(10)}
        assert answered == {first.address, second.address}
    finally:
        second.stop()


def test_dns_down_keeps_last_good_set(dns: Dnsmasq, start_backends: BackendFactory, log_event: LogWatch) -> None:
    backends = start_backends(2)
    _point_srv(dns, backends)
    failed = log_event("discovery failed for service users")
    with meshlib.Client(environ=_env(dns, f"dns+srv://{SRV_NAME}")) as client:
        assert client.get("http://users/").status_code == 200
        dns.stop()
        assert failed.wait(10), "the refresh never noticed the DNS server was gone"
        service = client.mesh.services["USERS"]
        assert service.cache.consecutive_failures >= 1
        statuses = [client.get("http://users/").status_code for _ in range(10)]
    assert statuses == [200] * 10


def test_nxdomain_first_answer_is_a_clear_error(dns: Dnsmasq) -> None:
    with meshlib.Client(environ=_env(dns, "dns+srv://_http._tcp.missing.internal")) as client:
        with pytest.raises(meshlib.NoEndpointsError) as info:
            client.get("http://users/")
        # A later call fails fast with the same reason (no request-path query while the refresher retries).
        with pytest.raises(meshlib.NoEndpointsError):
            client.get("http://users/")
    message = str(info.value)
    assert "'users'" in message and "dns+srv://_http._tcp.missing.internal" in message
    assert isinstance(info.value, httpx.TransportError)


def test_empty_first_answer_is_a_clear_error(dns: Dnsmasq) -> None:
    # The name exists (it has an A record) but has no SRV records: an empty answer, not NXDOMAIN.
    dns.set_records(hosts={"users.internal": ["127.0.0.1"]}, ttl=30)
    with (
        meshlib.Client(environ=_env(dns, f"dns+srv://{SRV_NAME}")) as client,
        pytest.raises(meshlib.NoEndpointsError) as info,
    ):
        client.get("http://users/")
    assert "'users'" in str(info.value) and SRV_NAME in str(info.value)


@pytest.mark.anyio
async def test_async_close_stops_the_refresh_task(dns: Dnsmasq, start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    _point_srv(dns, backends)
    client = meshlib.AsyncClient(environ=_env(dns, f"dns+srv://{SRV_NAME}"))
    assert (await client.get("http://users/")).status_code == 200
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "meshlib-discovery-users" in names  # refreshing in the background...
    await client.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("meshlib-")]  # ...until closed
    for backend in backends:
        assert await asyncio.to_thread(backend.wait_idle, 5.0)
