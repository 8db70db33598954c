"""Choosing each endpoint's inner transport: ``MESHLIB_INNER_TRANSPORT=httpx|aiohttp`` and ``inner_transport=``.

Against real loopback backends: the aiohttp transport under concurrency, over TLS (SNI and verification against
the logical service name, with the client's context and with per-service TLS settings), its exception mapping
(only what provably never left is "not sent"); the factory argument's contract (called once per endpoint with
the service's SSL context, its transports closed when their endpoint leaves discovery and when the client closes).
Endpoints leave through a ``members://`` discovery source registered here, refreshed every 50 ms.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme

import meshlib
from meshlib.config import MeshConfig
from meshlib.discovery import DiscoverySettings, Target, register_scheme
from meshlib.discovery.base import Endpoint, Resolution
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target
from tests.httplib import LIBRARY, ONLY_HTTPX, httpx

try:
    import httpx_aiohttp  # noqa: F401

    HAVE_AIOHTTP = True
except ImportError:  # pragma: no cover - the dev extra installs it
    HAVE_AIOHTTP = False

#: Skipped only on a developer machine without the package; in CI (where the dev extra installs it) a missing
#: httpx-aiohttp fails these tests instead of hiding them.
_installed = pytest.mark.skipif(
    not HAVE_AIOHTTP and not os.environ.get("CI"),
    reason="httpx-aiohttp is not installed (pip install -e '.[dev]' or 'meshlib[aiohttp]')",
)


def needs_aiohttp(test: Any) -> Any:
    """httpx-aiohttp installed, and the suite running on httpx (it plugs aiohttp into httpx only)."""
    return ONLY_HTTPX(_installed(test))


AIOHTTP = {"MESHLIB_INNER_TRANSPORT": "aiohttp"}


# --- a discovery source the test changes ---------------------------------------------------------------------


@dataclass
class Members:
    """The endpoint set ``members://<name>`` answers, re-read every refresh (TTL clamped to 50 ms)."""

    endpoints: tuple[Endpoint, ...] = ()
    asked: int = 0
    source: str = "members://test"

    def set(self, backends: list[Backend]) -> None:
        self.endpoints = tuple(Endpoint(b.host, b.port) for b in backends)

    def resolve(self) -> Resolution:
        self.asked += 1
        return Resolution(endpoints=self.endpoints, ttl=0.05)

    async def aresolve(self) -> Resolution:
        return self.resolve()

    def close(self) -> None:
        pass


MEMBERS: dict[str, Members] = {}


def _members(target: Target, settings: DiscoverySettings) -> Members:
    return MEMBERS[target.rest]


register_scheme("members", _members, form="members://<name> (tests)", replace=True)


@pytest.fixture
def members(request: pytest.FixtureRequest) -> Iterator[Members]:
    name = request.node.name
    MEMBERS[name] = found = Members(source=f"members://{name}")
    yield found
    del MEMBERS[name]


def members_env(members: Members, **extra: str) -> dict[str, str]:
    return {"MESHLIB_SERVICE_PAYMENTS": members.source, "MESHLIB_DNS_TTL_MIN": "50ms", **extra}


# --- a counting factory ------------------------------------------------------------------------------------------


@dataclass
class Made:
    endpoint: Endpoint
    context: ssl.SSLContext
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class _CountedAsync(httpx.AsyncHTTPTransport):
    def __init__(self, made: Made) -> None:
        super().__init__(verify=made.context)
        self.made = made

    async def aclose(self) -> None:
        await super().aclose()
        self.made.closed.set()


class _CountedSync(httpx.HTTPTransport):
    def __init__(self, made: Made) -> None:
        super().__init__(verify=made.context)
        self.made = made

    def close(self) -> None:
        super().close()
        self.made.closed.set()


@dataclass
class Factory:
    """``inner_transport=`` that records every call and whether the transport it made was closed."""

    made: list[Made] = field(default_factory=list)

    def async_(self, endpoint: Endpoint, context: ssl.SSLContext) -> httpx.AsyncBaseTransport:
        self.made.append(made := Made(endpoint, context))
        return _CountedAsync(made)

    def sync(self, endpoint: Endpoint, context: ssl.SSLContext) -> httpx.BaseTransport:
        self.made.append(made := Made(endpoint, context))
        return _CountedSync(made)

    def calls(self) -> Counter[str]:
        return Counter(m.endpoint.address for m in self.made)


async def _wait(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), 10)
    except asyncio.TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


# --- TLS material ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


# --- MESHLIB_INNER_TRANSPORT=aiohttp --------------------------------------------------------------------------------


@needs_aiohttp
@pytest.mark.anyio
async def test_aiohttp_serves_200_concurrent_requests_with_logical_host(start_backends: BackendFactory) -> None:
    from meshlib._aiohttp import EndpointAiohttpTransport

    backends = start_backends(3)
    env = {**AIOHTTP, "MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_LB": "round_robin"}
    async with meshlib.AsyncClient(environ=env) as client:

        async def call(i: int) -> tuple[str, str]:
            response = await client.post(f"http://payments/item/{i}", json={"i": i})
            assert response.status_code == 200
            body = response.json()
            assert body["host"] == "payments"  # the logical name, not the endpoint's address
            assert body["path"] == f"/item/{i}"
            assert str(response.url) == f"http://payments/item/{i}"
            return str(response.extensions["meshlib.endpoint"]), body["backend"]

        results = await asyncio.gather(*(call(i) for i in range(200)))
        transports = client.mesh.services["PAYMENTS"].transports
        assert all(isinstance(t, EndpointAiohttpTransport) for t in transports.values())
        assert len(transports) == 3
    by_name = {b.name: b.address for b in backends}
    assert all(endpoint == by_name[name] for endpoint, name in results)  # the extension names who answered
    assert sorted(Counter(endpoint for endpoint, _ in results).values()) == [66, 67, 67]  # round robin
    assert sum(b.count for b in backends) == 200
    for backend in backends:  # aclose closed every endpoint's aiohttp session and its connections
        assert await anyio.to_thread.run_sync(backend.wait_idle)


@needs_aiohttp
@pytest.mark.anyio
async def test_aiohttp_https_verifies_and_sends_sni_for_the_logical_name(
    start_backends: BackendFactory, ca: trustme.CA
) -> None:
    (backend,) = start_backends(1, ssl_context=server_context(ca, "payments"))
    target = static_target([backend])
    async with meshlib.AsyncClient(services={"payments": target}, verify=trusting(ca), environ=AIOHTTP) as client:
        response = await client.get("https://payments/secure")
        assert response.status_code == 200
        assert response.json()["host"] == "payments"
    # The same endpoint named by another service fails verification: the logical name is what is checked.
    async with meshlib.AsyncClient(services={"billing": target}, verify=trusting(ca), environ=AIOHTTP) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("https://billing/secure")


@needs_aiohttp
@pytest.mark.anyio
async def test_aiohttp_uses_the_services_tls_settings(
    start_backends: BackendFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    """A service with MESHLIB_SERVICE_<NAME>__TLS_*: its reloading context (CA file, server name) is the one used."""
    (backend,) = start_backends(1, ssl_context=server_context(ca, "payments.prod.internal"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    env = {
        **AIOHTTP,
        "MESHLIB_SERVICE_PAYMENTS": static_target([backend]),
        "MESHLIB_SERVICE_PAYMENTS__TLS_CA_FILE": str(ca_file),
        "MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_NAME": "payments.prod.internal",
    }
    async with meshlib.AsyncClient(environ=env) as client:  # the client's verify= (system CAs) does not apply
        response = await client.get("https://payments/")
        assert response.status_code == 200
        assert response.json()["host"] == "payments"
        (transport,) = client.mesh.services["PAYMENTS"].transports.values()
        assert transport.ssl_context is client.tls_contexts["PAYMENTS"]  # type: ignore[attr-defined]


@needs_aiohttp
@pytest.mark.anyio
async def test_aiohttp_server_closing_after_a_post_is_not_resent(start_backends: BackendFactory) -> None:
    """httpx-aiohttp maps a server disconnect to ConnectTimeout ("never sent"); meshlib maps it as httpcore does."""
    backends = start_backends(2, behavior=Behavior(drop=True))
    async with meshlib.AsyncClient(services={"payments": static_target(backends)}, environ=AIOHTTP) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("http://payments/charge", content=b"{}")
        assert sum(b.count for b in backends) == 1  # processed once, never re-sent
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("http://payments/")
        assert sum(b.count for b in backends) == 3  # a GET may be retried (once, by default)


@needs_aiohttp
@pytest.mark.anyio
async def test_aiohttp_refused_connection_is_retried_even_for_post(start_backends: BackendFactory) -> None:
    live, dead = start_backends(2)
    dead.refuse()
    env = {**AIOHTTP, "MESHLIB_SERVICE_PAYMENTS": static_target([live, dead]), "MESHLIB_LB": "round_robin"}
    async with meshlib.AsyncClient(environ=env) as client:
        for _ in range(4):
            assert (await client.post("http://payments/", content=b"x")).status_code == 200
    assert live.count == 4


@needs_aiohttp
@pytest.mark.anyio
async def test_aiohttp_endpoint_leaving_closes_its_connections(
    start_backends: BackendFactory, members: Members
) -> None:
    stays, leaves = start_backends(2)
    members.set([stays, leaves])
    async with meshlib.AsyncClient(environ=members_env(members, **AIOHTTP, MESHLIB_LB="round_robin")) as client:
        for _ in range(4):
            assert (await client.get("http://payments/")).status_code == 200
        assert leaves.connections_open == 1 and stays.connections_open == 1  # kept alive in each pool
        members.set([stays])
        assert await anyio.to_thread.run_sync(leaves.wait_idle, 10.0), "the departed endpoint's pool stayed open"
        assert stays.connections_open == 1
        for _ in range(3):
            assert (await client.get("http://payments/")).extensions["meshlib.endpoint"] == stays.address


@pytest.mark.skipif(LIBRARY != "httpx2", reason="about httpx2 clients")
def test_httpx2_clients_refuse_aiohttp_naming_the_library() -> None:
    with pytest.raises(meshlib.ConfigError, match=r"MESHLIB_INNER_TRANSPORT='aiohttp'.*not httpx2.*meshlib\.httpx\."):
        meshlib.AsyncClient(services={"payments": "static://127.0.0.1:1"}, environ=AIOHTTP)


def test_sync_client_refuses_aiohttp() -> None:
    with pytest.raises(meshlib.ConfigError, match=r"MESHLIB_INNER_TRANSPORT='aiohttp'.*AsyncClient") as info:
        meshlib.Client(environ={**AIOHTTP, "MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:1"})
    assert info.value.variable == "MESHLIB_INNER_TRANSPORT"
    with pytest.raises(meshlib.ConfigError, match=r"inner_transport \(argument\)"):
        meshlib.Client(services={"payments": "static://127.0.0.1:1"}, environ={}, inner_transport="aiohttp")  # type: ignore[arg-type]


def test_a_sync_client_overrides_a_process_wide_aiohttp_setting(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    env = {**AIOHTTP, "MESHLIB_SERVICE_PAYMENTS": static_target([backend])}
    with meshlib.Client(environ=env, inner_transport="httpx") as client:
        assert client.get("http://payments/").status_code == 200


@pytest.mark.anyio
@ONLY_HTTPX
async def test_aiohttp_without_httpx_aiohttp_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx_aiohttp", None)  # import fails as if it were not installed
    monkeypatch.delitem(sys.modules, "meshlib._aiohttp", raising=False)
    with pytest.raises(meshlib.ConfigError, match=r"pip install 'meshlib\[aiohttp\]'"):
        meshlib.AsyncClient(environ={**AIOHTTP, "MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:1"})


@pytest.mark.parametrize("value", ["aiohttp2", "requests", "http"])
def test_unknown_inner_transport_is_a_config_error(value: str) -> None:
    with pytest.raises(meshlib.ConfigError, match=r"MESHLIB_INNER_TRANSPORT.*one of httpx, aiohttp"):
        MeshConfig.from_env({"MESHLIB_INNER_TRANSPORT": value})
    with pytest.raises(meshlib.ConfigError, match=r"inner_transport \(argument\)"):
        meshlib.AsyncClient(environ={}, inner_transport=value)  # type: ignore[arg-type]


def test_inner_transport_variable_is_read() -> None:
    assert MeshConfig.from_env({}).inner_transport == "httpx"
    assert MeshConfig.from_env({"MESHLIB_INNER_TRANSPORT": " AIOHTTP "}).inner_transport == "aiohttp"
    with pytest.raises(meshlib.ConfigError, match=r"MeshConfig\.inner_transport"):
        MeshConfig(inner_transport="curl")


@pytest.mark.anyio
async def test_transport_and_inner_transport_are_exclusive() -> None:
    mock = httpx.MockTransport(lambda request: httpx.Response(204))
    with pytest.raises(TypeError, match="not both"):
        meshlib.AsyncClient(environ={}, transport=mock, inner_transport=Factory().async_)
    # transport= is the shared form for tests: it wins over MESHLIB_INNER_TRANSPORT.
    async with meshlib.AsyncClient(
        environ={**AIOHTTP, "MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.1:80"}, transport=mock
    ) as client:
        assert (await client.get("http://payments/")).status_code == 204


# --- inner_transport=<factory> ---------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_factory_is_called_once_per_endpoint_and_closed_when_it_leaves(
    start_backends: BackendFactory, members: Members
) -> None:
    backends = start_backends(3)
    members.set(backends)
    factory = Factory()
    verify = ssl.create_default_context()
    async with meshlib.AsyncClient(
        environ=members_env(members, MESHLIB_LB="round_robin"), inner_transport=factory.async_, verify=verify
    ) as client:
        results = await asyncio.gather(*(client.get(f"http://payments/{i}") for i in range(60)))
        assert all(r.status_code == 200 and r.json()["host"] == "payments" for r in results)
        assert factory.calls() == {b.address: 1 for b in backends}
        assert all(m.context is verify for m in factory.made)  # the client's verify= context, shared
        gone = next(m for m in factory.made if m.endpoint.address == backends[2].address)
        members.set(backends[:2])
        await _wait(gone.closed, "the departed endpoint's transport to close")
        assert [m for m in factory.made if m.closed.is_set()] == [gone]
        for _ in range(6):
            assert (await client.get("http://payments/")).extensions["meshlib.endpoint"] != backends[2].address
        asked = members.asked
        members.set(backends)  # it comes back: a new transport, made once
        while members.asked < asked + 2:
            await asyncio.sleep(0.02)
        for _ in range(6):
            assert (await client.get("http://payments/")).status_code == 200
        assert factory.calls()[backends[2].address] == 2
    assert len(factory.made) == 4
    assert all(m.closed.is_set() for m in factory.made)  # aclose closed every transport it made


@pytest.mark.anyio
async def test_factory_gets_the_services_tls_context(
    start_backends: BackendFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    (backend,) = start_backends(1, ssl_context=server_context(ca, "payments"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target([backend]), "MESHLIB_SERVICE_PAYMENTS__TLS_CA_FILE": str(ca_file)}
    factory = Factory()
    async with meshlib.AsyncClient(environ=env, inner_transport=factory.async_) as client:
        response = await client.get("https://payments/")
        assert response.status_code == 200
        (made,) = factory.made
        assert made.context is client.tls_contexts["PAYMENTS"]


def test_sync_factory_is_called_once_per_endpoint_and_closed_with_the_client(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    factory = Factory()
    with meshlib.Client(services={"payments": static_target(backends)}, environ={}, inner_transport=factory.sync) as c:
        for _ in range(10):
            assert c.get("http://payments/").json()["host"] == "payments"
        assert factory.calls() == {b.address: 1 for b in backends}
        assert not any(m.closed.is_set() for m in factory.made)
    assert all(m.closed.is_set() for m in factory.made)


def test_factory_of_the_wrong_kind_is_a_type_error(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    factory = Factory()
    with (
        meshlib.Client(
            services={"payments": static_target([backend])},
            environ={},
            inner_transport=factory.async_,  # type: ignore[arg-type]
        ) as client,
        pytest.raises(TypeError, match=rf"inner_transport= returned _CountedAsync.*{LIBRARY}\.BaseTransport"),
    ):
        client.get("http://payments/")
