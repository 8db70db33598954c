"""Consul's discovery chain steering real clients (issue 14): ``MESHLIB_SERVICE_<NAME>=consul+chain://<name>``
against the Consul double (``tests/servers/consul.py``: ``/v1/discovery-chain``, ``/v1/health/{service,connect}``,
the Connect CA), with real loopback backends registered in it.

What is checked, end to end: a 90/10 splitter lands within 1.5 points; a router sends ``/admin`` to another
service; failover to the second target when the first has no healthy instance, and back; a chain change moves
traffic (one blocking-query round trip: the test waits on the traffic, never on a clock); a chain meshlib cannot
honour is refused whole while the previous one serves; ``ConnectTimeout`` bounds each connect; with
``MESHLIB_CONSUL_SERVICE`` the chain's upstreams are called over mTLS with Consul SPIFFE IDs (``http://``
upgraded), each endpoint checked against its own target's identity, and a leaf rotation under live traffic fails
no request; intentions enforced by ``mesh_hooks`` on a real uvicorn answer 403 before the handler.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

import meshlib
from meshlib.control.consul import source as chain_source
from meshlib.discovery.consul.query import WatchOptions
from meshlib.errors import DiscoveryError
from meshlib.security.consul_ca import ConsulCASource
from meshlib.status import format_status
from meshlib.testing import Backend
from tests.conftest import LogWatch
from tests.httplib import httpx
from tests.servers import consul_chains as chains
from tests.servers.consul import ACLToken, ConsulEmulator, running

pytestmark = pytest.mark.timeout(90)

FAST = WatchOptions(refill=0, backoff_base=0.02, backoff_cap=0.2)


@pytest.fixture(autouse=True)
def fast_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The double answers at once; Consul's pacing (15 s refill, 1 s backoff) is for real agents."""
    monkeypatch.setattr(chain_source, "WATCH_OPTIONS", FAST)


@pytest.fixture
def consul() -> Iterator[ConsulEmulator]:
    with running(jitter=False) as emulator:
        yield emulator


def env(consul: ConsulEmulator, **services: str) -> dict[str, str]:
    found = {"CONSUL_HTTP_ADDR": consul.address}
    for name, target in services.items():
        found[f"MESHLIB_SERVICE_{name.upper()}"] = target
    return found


def register(consul: ConsulEmulator, service: str, backend: Backend, **kwargs: Any) -> str:
    return consul.register(service, backend.port, id=backend.name, address="127.0.0.1", **kwargs)


def hits(client: meshlib.Client, url: str, n: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        response = client.get(url)
        assert response.status_code == 200, response.text
        counts[response.headers["x-backend"]] += 1
    return counts


def until(client: meshlib.Client, url: str, backend: str, limit: int = 5000) -> int:
    """Call until ``backend`` answers (each iteration a real request, so a push in flight lands); the calls made."""
    for made in range(1, limit + 1):
        response = client.get(url)
        if response.headers.get("x-backend") == backend:
            return made
    raise AssertionError(f"{backend} never answered in {limit} calls")


# -- routing ----------------------------------------------------------------------------------------------------


def test_the_default_chain_routes_to_the_service_instances(consul: ConsulEmulator, start_backends: Any) -> None:
    (one,) = start_backends(1, prefix="pay")
    register(consul, "payments", one)
    with meshlib.Client(environ=env(consul, payments="consul+chain://payments")) as client:
        response = client.get("http://payments/charge")
        snapshot = client.mesh_status()
        printed = format_status({"meshlib": "test", "pid": snapshot.pid, "clients": [snapshot.to_dict()]})
    status = snapshot.consul
    assert response.status_code == 200 and response.headers["x-backend"] == "pay0"
    assert status is not None and [s.routed for s in status] == [True]
    assert status[0].backends == {"consul-chain:payments.default.default.dc1": ["payments.default.default.dc1"]}
    assert "Consul discovery chain of payments (consul+chain://payments): routed by the chain" in printed
    paths = {r.path for r in consul.requests}
    assert "/v1/discovery-chain/payments" in paths
    assert "/v1/health/service/payments" in paths  # no Consul identity: plain discovery, not /health/connect


@pytest.mark.one_library  # the shares are drawn by meshlib, whichever HTTP library carries the calls
def test_a_90_10_splitter_lands_within_one_and_a_half_points(consul: ConsulEmulator, start_backends: Any) -> None:
    v1 = start_backends(2, prefix="v1-")
    v2 = start_backends(2, prefix="v2-")
    for backend in v1:
        register(consul, "web", backend, meta={"version": "v1"})
    for backend in v2:
        register(consul, "web", backend, meta={"version": "v2"})
    consul.set_chain("web", chains.split("web", {"v1": 90, "v2": 10}))
    with meshlib.Client(environ=env(consul, web="consul+chain://web")) as client:
        client.mesh.rng = random.Random(14)
        counts = hits(client, "http://web/", 4000)
    to_v2 = sum(n for name, n in counts.items() if name.startswith("v2-"))
    assert abs(to_v2 / 4000 - 0.10) <= 0.015, counts
    assert set(counts) == {"v1-0", "v1-1", "v2-0", "v2-1"}  # each subset's filter selected its own instances


def test_subset_filters_hold_even_when_the_agent_ignores_them(consul: ConsulEmulator, start_backends: Any) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    register(consul, "web", v1, meta={"version": "v1"})
    register(consul, "web", v2, meta={"version": "v2"})
    consul.ignore_filter = True  # the agent answers every instance: meshlib's own bexpr evaluation selects
    consul.set_chain("web", chains.split("web", {"v1": 0, "v2": 100}))
    with meshlib.Client(environ=env(consul, web="consul+chain://web")) as client:
        assert hits(client, "http://web/", 20) == Counter({"v2-0": 20})
    asked = [r for r in consul.requests if r.path == "/v1/health/service/web"]
    assert asked and asked[0].params["filter"] == ["Service.Meta.version == v2"]  # and sent to the agent too


def test_a_router_sends_admin_to_another_service(consul: ConsulEmulator, start_backends: Any) -> None:
    (web,) = start_backends(1, prefix="web")
    (admin,) = start_backends(1, prefix="admin")
    register(consul, "web", web)
    register(consul, "admin", admin)
    consul.set_chain("web", chains.route_prefixes("web", {"/admin": "admin"}))
    with meshlib.Client(environ=env(consul, web="consul+chain://web")) as client:
        assert client.get("http://web/admin/users").headers["x-backend"] == "admin0"
        assert client.get("http://web/orders").headers["x-backend"] == "web0"
    assert admin.requests[0].path == "/admin/users" and admin.requests[0].headers["host"] == "web"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_async_router_and_split(consul: ConsulEmulator, start_backends: Any) -> None:
    (web,) = start_backends(1, prefix="web")
    (admin,) = start_backends(1, prefix="admin")
    register(consul, "web", web)
    register(consul, "admin", admin)
    consul.set_chain("web", chains.route_prefixes("web", {"/admin": "admin"}))
    async with meshlib.AsyncClient(environ=env(consul, web="consul+chain://web")) as client:
        first = await client.get("http://web/admin")
        second = await client.get("http://web/")
    assert (first.headers["x-backend"], second.headers["x-backend"]) == ("admin0", "web0")


def test_failover_to_the_next_target_when_the_first_has_no_healthy_instance_and_back(
    consul: ConsulEmulator, start_backends: Any
) -> None:
    (primary,) = start_backends(1, prefix="east")
    (secondary,) = start_backends(1, prefix="west")
    register(consul, "payments", primary)
    register(consul, "payments-west", secondary)
    consul.set_chain("payments", chains.failover("payments", ["payments-west"]))
    with meshlib.Client(environ=env(consul, payments="consul+chain://payments")) as client:
        assert hits(client, "http://payments/", 20) == Counter({"east0": 20})  # the failover target is idle
        consul.set_status("east0", "critical")
        until(client, "http://payments/", "west0")
        assert hits(client, "http://payments/", 20) == Counter({"west0": 20})
        consul.set_status("east0", "passing")
        until(client, "http://payments/", "east0")
        assert hits(client, "http://payments/", 20) == Counter({"east0": 20})


def test_a_chain_change_moves_traffic_and_a_refused_chain_changes_nothing(
    consul: ConsulEmulator, start_backends: Any, log_event: Any
) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    register(consul, "web", v1, meta={"version": "v1"})
    register(consul, "web", v2, meta={"version": "v2"})
    consul.set_chain("web", chains.split("web", {"v1": 100, "v2": 0}))
    with meshlib.Client(environ=env(consul, web="consul+chain://web")) as client:
        assert hits(client, "http://web/", 10) == Counter({"v1-0": 10})
        consul.set_chain("web", chains.split("web", {"v1": 0, "v2": 100}))
        until(client, "http://web/", "v2-0")
        assert hits(client, "http://web/", 10) == Counter({"v2-0": 10})
        refused = log_event("refused; the chain of X-Consul-Index")
        bad = chains.split("web", {"v1": 100, "v2": 0})
        bad["Targets"]["v1.web.default.default.dc1"]["Subset"]["Filter"] = "Service.Meta.version ~~ v1"
        consul.set_chain("web", bad)
        assert refused.wait(10)
        assert hits(client, "http://web/", 10) == Counter({"v2-0": 10})  # the previous chain still serves
        found = client.mesh_status().consul
    assert found is not None
    status = found[0]
    assert status.error is not None and "Filter" in status.error


def test_a_leg_set_to_zero_lingers_so_flipping_back_needs_no_new_service(
    consul: ConsulEmulator, start_backends: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    register(consul, "web", v1, meta={"version": "v1"})
    register(consul, "web", v2, meta={"version": "v2"})
    key = "CONSUL_CHAIN:V1_WEB_DEFAULT_DEFAULT_DC1"
    consul.set_chain("web", chains.split("web", {"v1": 100, "v2": 0}))
    with meshlib.Client(environ=env(consul, web="consul+chain://web")) as client:
        assert client.get("http://web/").headers["x-backend"] == "v1-0"
        service = client.mesh.services[key]
        consul.set_chain("web", chains.split("web", {"v1": 0, "v2": 100}))
        until(client, "http://web/", "v2-0")
        assert client.mesh.services[key] is service  # not named, still there: it lingers
        consul.set_chain("web", chains.split("web", {"v1": 100, "v2": 0}))
        until(client, "http://web/", "v1-0")
        assert client.mesh.services[key] is service  # flipped back by the route table alone
        monkeypatch.setattr(chain_source, "CHAIN_LINGER", 0.0)  # now: retired by the apply that stops naming it
        consul.set_chain("web", chains.split("web", {"v1": 0, "v2": 100}))
        until(client, "http://web/", "v2-0")
        for _ in range(1000):
            if key not in client.mesh.services:
                break
            client.get("http://web/")
        assert key not in client.mesh.services


def test_a_chain_refused_before_any_fails_calls_at_once_with_the_reason(
    consul: ConsulEmulator, start_backends: Any
) -> None:
    bad = chains.split("web", {"v1": 100})
    bad["StartNode"] = "splitter:nowhere"
    consul.set_chain("web", bad)
    client = meshlib.Client(environ=env(consul, web="consul+chain://web"), timeout=30)
    with client, pytest.raises(DiscoveryError, match="StartNode"):
        client.get("http://web/")


def test_a_refused_token_fails_calls_at_once_and_is_never_shown(caplog: Any) -> None:
    secret = "5e3c1a2b-token-never-shown"
    with (
        running(acl_tokens=[ACLToken(secret, read=frozenset({"other"}))], jitter=False) as consul,
        caplog.at_level(logging.DEBUG, logger="meshlib"),
    ):
        environ = {**env(consul, web="consul+chain://web"), "CONSUL_HTTP_TOKEN": secret}
        with meshlib.Client(environ=environ, timeout=30) as client, pytest.raises(meshlib.MeshError) as caught:
            client.get("http://web/")
    message = str(caught.value)
    assert "403" in message and "CONSUL_HTTP_TOKEN" in message
    assert secret not in message and secret not in caplog.text


def test_bad_targets_are_config_errors_naming_the_variable(consul: ConsulEmulator) -> None:
    for target in ("consul+chain://", "consul+chain://a/b", "consul+chain://web?token=x", "consul+chain://web?dc="):
        with pytest.raises(meshlib.ConfigError, match="MESHLIB_SERVICE_WEB"):
            meshlib.Client(environ=env(consul, web=target))


def test_connect_timeout_bounds_each_connect(consul: ConsulEmulator, start_backends: Any) -> None:
    (one,) = start_backends(1, prefix="pay")
    register(consul, "payments", one)
    consul.set_chain("payments", chains.failover("payments", [], connect_timeout="250ms"))
    seen: list[dict[str, float]] = []

    def pool(endpoint: Any, context: Any) -> Any:
        transport = httpx.HTTPTransport(verify=context)
        handle = transport.handle_request

        def record(request: Any) -> Any:
            seen.append(dict(request.extensions["timeout"]))
            return handle(request)

        transport.handle_request = record  # type: ignore[method-assign]
        return transport

    with meshlib.Client(environ=env(consul, payments="consul+chain://payments"), inner_transport=pool) as client:
        assert client.get("http://payments/", timeout=30).status_code == 200
    assert seen[0]["connect"] == 0.25 and seen[0]["read"] > 0.25  # the resolver's ConnectTimeout, connect only


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX-only")
def test_a_forked_child_routes_by_the_chain_and_follows_its_changes(
    consul: ConsulEmulator, start_backends: Any
) -> None:
    """A client built before fork(): the child routes by the chain with watches of its own (threads do not survive
    a fork; the parent's agent connections are never used), and a chain change reaches it."""
    from tests.test_fork import _both

    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    register(consul, "web", v1, meta={"version": "v1"})
    register(consul, "web", v2, meta={"version": "v2"})
    consul.set_chain("web", chains.split("web", {"v1": 100, "v2": 0}))
    with meshlib.Client(environ=env(consul, web="consul+chain://web")) as client:
        assert client.get("http://web/").headers["x-backend"] == "v1-0"

        before = v1.count

        def work(side: str) -> Any:
            if side == "parent":  # the emulator runs here: change the chain once the child has been served
                assert v1.wait_for(before + 1, 30)
                consul.set_chain("web", chains.split("web", {"v1": 0, "v2": 100}))
                return None
            first = client.get("http://web/").headers["x-backend"]
            return [first, until(client, "http://web/", "v2-0") > 0]

        _, child = _both(work)
        assert child == ["v1-0", True]
        assert until(client, "http://web/", "v2-0") > 0  # the parent's own watches saw the change too


# -- lifecycle: no watch outlives its client ----------------------------------------------------------------------


def _watch_threads() -> set[threading.Thread]:
    """The chain source's threads: the apply thread, each chain's and each target's blocking-query loop."""
    return {t for t in threading.enumerate() if t.name.startswith(("meshlib-consul-chain", "meshlib-consul-target"))}


def _ended(threads: set[threading.Thread]) -> list[str]:
    """Join ``threads`` (one generous bound for all: only "did not hang"); the names of those still running."""
    deadline = time.monotonic() + 15
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(t.name for t in threads if t.is_alive())


def _routed(consul: ConsulEmulator, start_backends: Any) -> dict[str, str]:
    (web,) = start_backends(1, prefix="web")
    (admin,) = start_backends(1, prefix="admin")
    register(consul, "web", web)
    register(consul, "admin", admin)
    consul.set_chain("web", chains.route_prefixes("web", {"/admin": "admin"}))
    return env(consul, web="consul+chain://web")


def test_a_closed_client_has_ended_its_watch_threads(consul: ConsulEmulator, start_backends: Any) -> None:
    before = _watch_threads()
    with meshlib.Client(environ=_routed(consul, start_backends)) as client:
        assert client.get("http://web/admin").headers["x-backend"] == "admin0"
        started = _watch_threads() - before
    assert {t.name for t in started} >= {"meshlib-consul-chain-apply", "meshlib-consul-chain-web"}
    assert [t.name for t in started if t.is_alive()] == []  # close() waited: nothing of it queries or logs now


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_a_closed_async_client_has_ended_its_watch_threads(consul: ConsulEmulator, start_backends: Any) -> None:
    """``aclose()`` ends the chain source too (it once did not: the watches ran on until the garbage collector
    took the client, querying a stopped agent and logging into later tests)."""
    before = _watch_threads()
    async with meshlib.AsyncClient(environ=_routed(consul, start_backends)) as client:
        assert (await client.get("http://web/admin")).headers["x-backend"] == "admin0"
        started = _watch_threads() - before
    assert {t.name for t in started} >= {"meshlib-consul-chain-apply", "meshlib-consul-chain-web"}
    assert [t.name for t in started if t.is_alive()] == []  # ``client`` is still referenced: aclose() ended them


@pytest.mark.parametrize("agent", ["serving", "stopped first"])
def test_a_client_dropped_unclosed_ends_its_watch_threads(
    consul: ConsulEmulator, start_backends: Any, log_event: LogWatch, agent: str
) -> None:
    unreachable = log_event("Consul discovery chain web:")  # the chain watch failing: the source saw the agent go
    before = _watch_threads()
    client = meshlib.Client(environ=_routed(consul, start_backends))
    assert client.get("http://web/admin").headers["x-backend"] == "admin0"
    started = _watch_threads() - before
    assert {t.name for t in started} >= {"meshlib-consul-chain-apply", "meshlib-consul-chain-web"}
    if agent == "stopped first":
        consul.stop()
        assert unreachable.wait(30)  # the loops are backing off, the last chain keeps serving
    del client
    gc.collect()
    assert _ended(started) == []


@pytest.mark.parametrize("agent", ["serving", "stopped first"])
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_an_async_client_dropped_unclosed_ends_its_watch_threads(
    consul: ConsulEmulator, start_backends: Any, log_event: LogWatch, agent: str
) -> None:
    unreachable = log_event("Consul discovery chain web:")
    before = _watch_threads()
    client = meshlib.AsyncClient(environ=_routed(consul, start_backends))
    assert (await client.get("http://web/admin")).headers["x-backend"] == "admin0"
    started = _watch_threads() - before
    assert {t.name for t in started} >= {"meshlib-consul-chain-apply", "meshlib-consul-chain-web"}
    if agent == "stopped first":
        consul.stop()
        assert await anyio.to_thread.run_sync(unreachable.wait, 30)
    del client
    gc.collect()
    assert await anyio.to_thread.run_sync(_ended, started) == []


def test_watches_whose_client_is_gone_end_on_their_own(
    consul: ConsulEmulator, start_backends: Any, log_event: LogWatch
) -> None:
    """The backstop behind the finalizer: a watch that wakes (here, retrying a stopped agent) to find its client's
    mesh collected ends itself and the apply thread, even had the finalizer never reached it (detached here)."""
    unreachable = log_event("Consul discovery chain web:")
    before = _watch_threads()
    client = meshlib.Client(environ=_routed(consul, start_backends))
    assert client.get("http://web/admin").headers["x-backend"] == "admin0"
    started = _watch_threads() - before
    client._mesh.consul._finalizer.detach()
    consul.stop()
    assert unreachable.wait(30)
    del client
    gc.collect()
    assert _ended(started) == []


# -- Connect: mTLS with Consul identities -------------------------------------------------------------------------


class Connect:
    """``payments`` (two instances, Connect Native, serving with payments' leaf) and ``payments-west`` (its
    failover target, serving with payments-west's leaf); the caller is ``billing``."""

    def __init__(self, consul: ConsulEmulator) -> None:
        self.consul = consul
        agent = {"CONSUL_HTTP_ADDR": consul.address}
        self.sources = {
            name: ConsulCASource(name, environ=agent, options=FAST) for name in ("payments", "payments-west")
        }
        self.backends = [
            Backend("east0", ssl_context=self.sources["payments"].server_context()).start(),
            Backend("west0", ssl_context=self.sources["payments-west"].server_context()).start(),
        ]
        register(consul, "payments", self.backends[0], connect_native=True)
        register(consul, "payments-west", self.backends[1], connect_native=True)
        consul.set_chain("payments", chains.failover("payments", ["payments-west"]))
        self.env = {**env(consul, payments="consul+chain://payments"), "MESHLIB_CONSUL_SERVICE": "billing"}

    def close(self) -> None:
        for backend in self.backends:
            backend.stop()
        for source in self.sources.values():
            source.close()


@pytest.fixture
def connect(consul: ConsulEmulator) -> Iterator[Connect]:
    made = Connect(consul)
    yield made
    made.close()


def caller(request: Any) -> str:
    uris = [value for kind, value in (request.peercert or {}).get("subjectAltName", ()) if kind == "URI"]
    return str(uris[0])


def test_upstreams_are_called_over_mtls_with_consul_identities(connect: Connect) -> None:
    consul = connect.consul
    with meshlib.Client(environ=connect.env) as client:
        response = client.get("http://payments/charge")  # upgraded: a Connect upstream is never called in plaintext
        assert response.status_code == 200 and response.headers["x-backend"] == "east0"
        consul.set_status("east0", "critical")
        until(client, "http://payments/", "west0")  # the failover target checked against its own identity
    assert caller(connect.backends[0].requests[0]) == consul.spiffe_id("billing")
    assert caller(connect.backends[1].requests[-1]) == consul.spiffe_id("billing")
    assert "/v1/health/connect/payments" in {r.path for r in consul.requests}


@pytest.mark.anyio
async def test_async_upstreams_over_mtls(connect: Connect) -> None:
    async with meshlib.AsyncClient(environ=connect.env) as client:
        response = await client.get("http://payments/")
    assert response.headers["x-backend"] == "east0"
    assert caller(connect.backends[0].requests[0]) == connect.consul.spiffe_id("billing")


def test_an_upstream_presenting_another_identity_is_refused_before_sending(connect: Connect) -> None:
    consul = connect.consul
    # The primary instance now serves with payments-west's leaf: a valid Consul certificate, the wrong service.
    impostor = Backend("impostor", ssl_context=connect.sources["payments-west"].server_context()).start()
    try:
        consul.deregister("east0")
        register(consul, "payments", impostor, connect_native=True)
        client = meshlib.Client(environ=connect.env)
        with client, meshlib.policy(retries=0), pytest.raises(httpx.ConnectError, match="svc/payments"):
            client.get("http://payments/")
    finally:
        impostor.stop()
    assert impostor.count == 0


def test_leaf_rotation_under_live_traffic_fails_no_request(connect: Connect) -> None:
    consul = connect.consul
    failures: list[BaseException] = []
    served = threading.Event()
    stop = threading.Event()
    with meshlib.Client(environ=connect.env) as client:
        identity = client._pools.consul  # type: ignore[attr-defined]
        assert identity is not None
        before = identity.serial_number

        def traffic() -> None:
            while not stop.is_set():
                try:
                    response = client.get("http://payments/", headers={"connection": "close"})
                    if response.status_code != 200:
                        failures.append(AssertionError(response.status_code))
                except Exception as error:  # counted: the test asserts there were none
                    failures.append(error)
                served.set()

        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for worker in workers:
            worker.start()
        assert served.wait(10)
        consul.rotate_leaf("billing")
        assert identity.wait_for(lambda source: source.serial_number != before, 10)
        served.clear()
        assert served.wait(10)
        connect.backends[0].reset()
        assert served.wait(10)
        while connect.backends[0].count < 5:  # new connections after the rotation present the new leaf
            client.get("http://payments/", headers={"connection": "close"})
        stop.set()
        for worker in workers:
            worker.join(10)
    assert failures == []
    serials = {int(r.peercert["serialNumber"], 16) for r in connect.backends[0].requests if r.peercert}
    assert identity.serial_number in serials


# -- intentions through mesh_hooks -------------------------------------------------------------------------------


def test_mesh_hooks_enforce_intentions_for_meshlib_consul_service(connect: Connect) -> None:
    protocols = pytest.importorskip("meshlib.server.uvicorn", reason="uvicorn is in the dev extra")
    from meshlib.server.middleware import MeshMiddleware, mesh_hooks
    from tests.server.test_middleware import serve_asgi
    from tests.server.test_refusal import asgi_app, ran

    consul = connect.consul
    consul.set_intentions("api", [{"Name": "billing", "Action": "allow"}, {"Name": "*", "Action": "deny"}])
    api = ConsulCASource("api", environ={"CONSUL_HTTP_ADDR": consul.address}, options=FAST)
    intruder = ConsulCASource("intruder", environ={"CONSUL_HTTP_ADDR": consul.address}, options=FAST)
    hooks = mesh_hooks(environ={"CONSUL_HTTP_ADDR": consul.address, "MESHLIB_CONSUL_SERVICE": "api"})
    ran.clear()
    from meshlib.server.consul_intentions import ConsulIntentionsHook

    assert any(isinstance(hook, ConsulIntentionsHook) for hook in hooks)
    try:
        app = MeshMiddleware(asgi_app, hooks=list(hooks))
        tls = {"http": protocols.H11Protocol, "ssl_context_factory": lambda config, default: api.server_context()}
        with serve_asgi(app, **tls) as url:
            port = int(url.rsplit(":", 1)[1])
            consul.register("api", port, id="api0", address="127.0.0.1", connect_native=True)
            consul.set_chain("api", chains.failover("api", []))
            allowed_env = {**env(consul, api="consul+chain://api"), "MESHLIB_CONSUL_SERVICE": "billing"}
            with meshlib.Client(environ=allowed_env) as client:
                allowed = client.get("http://api/orders")
            with httpx.Client(verify=intruder.client_context("api")) as other:
                denied = other.get(url.replace("http://", "https://") + "/orders")
    finally:
        for hook in hooks:
            close = getattr(hook, "close", None)
            if close is not None:
                close()
        api.close()
        intruder.close()
    assert allowed.status_code == 200 and allowed.text == "handled"
    assert denied.status_code == 403
    assert ran == ["/orders"]  # the denied caller never reached the handler
