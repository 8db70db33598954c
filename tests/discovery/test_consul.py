"""``consul://`` discovery against the Consul API emulator (``tests/servers/consul.py``) on loopback.

The clients (sync and async) run with ``MESHLIB_SERVICE_PAYMENTS=consul://payments`` and ``CONSUL_HTTP_ADDR``
pointing at the emulator; backends are real loopback servers on 127.0.0.x. Every wait is on an event: the
emulator's request counter and "a query is blocked" condition say when the client has applied an answer
(the refresh loop sends its next query only after publishing the previous answer), so nothing sleeps.

The watch loop's pacing (rate limit, backoff) is tested on :class:`BlockingQuery` with a fake clock; the
client tests register ``consul://`` with the limit off (``FAST``) so successive changes are not 15 s apart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx  # what meshlib's Consul agent client uses, whichever library the mesh clients are on
import pytest

import meshlib
from meshlib.discovery import DiscoverySettings, Target, build_resolver, register_scheme
from meshlib.discovery import consul as consul_module
from meshlib.discovery import refresh as refresh_module
from meshlib.discovery.base import Resolution
from meshlib.discovery.consul import (
    FORM,
    BlockingQuery,
    ConsulAgent,
    ConsulQuery,
    ConsulResolver,
    Reply,
    TokenBucket,
    WatchOptions,
)
from meshlib.errors import ConsulACLError
from tests.conftest import BackendFactory, LogWatch
from tests.httplib import httpx as client_httpx
from tests.servers.consul import ConsulEmulator

#: The loop without its rate limit and with millisecond backoffs: client tests drive several changes in a row.
FAST = WatchOptions(refill=0.0, backoff_base=0.01, backoff_cap=0.05)
SECRET = "3f0c1c6e-5e2a-4c9b-9d4e-secret-token"


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture
def consul() -> Iterator[ConsulEmulator]:
    with ConsulEmulator(jitter=False) as emulator:
        yield emulator


@pytest.fixture(autouse=True)
def consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CONSUL_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("CONSUL_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def short_join(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RefreshThread.stop()`` closes the resolver before joining, which ends a blocking query at once; a
    short join keeps these tests fast should that ever regress (the dedicated test below then fails)."""
    monkeypatch.setattr(refresh_module, "JOIN_TIMEOUT", 0.05)


@pytest.fixture
def fast_watch() -> Iterator[None]:
    """``consul://`` built with :data:`FAST` options for the duration of the test."""
    register_scheme("consul", functools.partial(consul_module.from_target, options=FAST), form=FORM, replace=True)
    yield
    register_scheme("consul", consul_module.from_target, form=FORM, replace=True)


def client_env(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, target: str = "consul://payments"
) -> dict[str, str]:
    """The client's environment; CONSUL_HTTP_ADDR is also set in os.environ, wherever the resolver reads it."""
    monkeypatch.setenv("CONSUL_HTTP_ADDR", consul.address)
    return {
        "MESHLIB_SERVICE_PAYMENTS": target,
        "MESHLIB_LB": "round_robin",
        "MESHLIB_DNS_TTL_MIN": "100ms",  # failure backoff of the refresh loop: 0.5 s at most
        "CONSUL_HTTP_ADDR": consul.address,
    }


def resolver_for(
    consul: ConsulEmulator | None, target: str = "consul://payments", options: WatchOptions = FAST, **env: str
) -> ConsulResolver:
    """A resolver built as the client builds it, with the environment given here."""
    environ = {"CONSUL_HTTP_ADDR": consul.address} if consul is not None else {}
    environ.update(env)
    target_obj = Target("payments", target, "consul", target.partition("://")[2], "MESHLIB_SERVICE_PAYMENTS", FORM)
    return consul_module.from_target(target_obj, DiscoverySettings(environ=environ), options=options)


def endpoint_of(response: httpx.Response) -> str:
    return str(response.extensions["meshlib.endpoint"])


@pytest.fixture
def discovery_failed(log_event: LogWatch) -> threading.Event:
    return log_event("discovery failed for service payments")


# --- the clients follow Consul -------------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_watch")
def test_first_query_is_plain_then_blocking(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, start_backends: BackendFactory
) -> None:
    (a,) = start_backends(1, host="127.0.0.2")
    consul.register("payments", a.port, id="a", address="127.0.0.2")
    with meshlib.Client(environ=client_env(consul, monkeypatch)) as client:
        assert endpoint_of(client.get("http://payments/")) == a.address
        consul.wait_for_blocked()
        first, second = consul.health_queries()[:2]
        index = consul.index
    # The first request does not wait for a blocking query; the background loop then blocks on the index.
    assert first.index is None and "wait" not in first.params
    assert second.index == index and second.params["wait"] == ["300000ms"]
    for query in (first, second):
        assert query.path == "/v1/health/service/payments"
        assert query.params["passing"] == ["true"] and "stale" in query.params


@pytest.mark.usefixtures("fast_watch")
def test_registration_change_moves_traffic_within_one_blocking_round_trip(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, start_backends: BackendFactory
) -> None:
    (old,) = start_backends(1, host="127.0.0.2", prefix="old")
    (new,) = start_backends(1, host="127.0.0.3", prefix="new")
    consul.register("payments", old.port, id="payments-1", address="127.0.0.2")
    with meshlib.Client(environ=client_env(consul, monkeypatch)) as client:
        assert {endpoint_of(client.get("http://payments/")) for _ in range(3)} == {old.address}
        consul.wait_for_blocked()
        asked = consul.count
        # One write: the instance re-registers at another address.
        consul.register("payments", new.port, id="payments-1", address="127.0.0.3")
        consul.wait_for_requests(asked + 1)  # the loop is back: the blocked query's answer has been applied
        # The query in flight delivered the change: the next one already blocks on the index of the change.
        assert consul.health_queries()[asked].index == consul.index
        answered = {endpoint_of(client.get("http://payments/")) for _ in range(5)}
    assert answered == {new.address}
    assert old.count == 3 and new.count == 5


@pytest.mark.anyio
@pytest.mark.usefixtures("fast_watch")
async def test_async_registration_change_moves_traffic(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, start_backends: BackendFactory
) -> None:
    (old,) = start_backends(1, host="127.0.0.2", prefix="old")
    (new,) = start_backends(1, host="127.0.0.3", prefix="new")
    consul.register("payments", old.port, id="payments-1", address="127.0.0.2")
    async with meshlib.AsyncClient(environ=client_env(consul, monkeypatch)) as client:
        assert endpoint_of(await client.get("http://payments/")) == old.address
        await anyio.to_thread.run_sync(consul.wait_for_blocked)
        asked = consul.count
        consul.register("payments", new.port, id="payments-1", address="127.0.0.3")
        await anyio.to_thread.run_sync(consul.wait_for_requests, asked + 1)
        assert consul.health_queries()[asked].index == consul.index
        assert endpoint_of(await client.get("http://payments/")) == new.address


@pytest.mark.usefixtures("fast_watch")
def test_consul_servers_down_keep_serving_then_recover(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, start_backends: BackendFactory
) -> None:
    (a,) = start_backends(1, host="127.0.0.2")
    consul.register("payments", a.port, id="a", address="127.0.0.2")
    with meshlib.Client(environ=client_env(consul, monkeypatch)) as client:
        assert client.get("http://payments/").status_code == 200
        consul.wait_for_blocked()
        asked = consul.count
        consul.fail(500, "No cluster leader")  # the blocked query fails too, as its RPC would
        consul.wait_for_requests(asked + 1)  # the loop retried: the failure has been recorded
        service = client.mesh.services["PAYMENTS"]
        assert service.cache.consecutive_failures >= 1
        assert "No cluster leader" in (service.cache.last_error or "")
        statuses = [client.get("http://payments/").status_code for _ in range(5)]
        consul.recover()
        consul.wait_for_blocked()  # a plain query succeeded, and the loop blocks again
        assert service.cache.consecutive_failures == 0
    assert statuses == [200] * 5


@pytest.mark.usefixtures("fast_watch")
def test_consul_agent_down_keeps_serving_then_recovers(
    consul: ConsulEmulator,
    monkeypatch: pytest.MonkeyPatch,
    start_backends: BackendFactory,
    discovery_failed: threading.Event,
) -> None:
    (a,) = start_backends(1, host="127.0.0.2")
    consul.register("payments", a.port, id="a", address="127.0.0.2")
    with meshlib.Client(environ=client_env(consul, monkeypatch)) as client:
        assert client.get("http://payments/").status_code == 200
        consul.wait_for_blocked()
        consul.stop()  # the blocked query's connection drops; new ones are refused
        assert discovery_failed.wait(10), "the refresh loop never noticed Consul was gone"
        statuses = [client.get("http://payments/").status_code for _ in range(5)]
        consul.start()  # same port, same catalog
        consul.wait_for_blocked()
        assert client.mesh.services["PAYMENTS"].cache.consecutive_failures == 0
    assert statuses == [200] * 5


def test_bad_token_is_a_clear_error_without_the_token(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    consul.add_token("the-right-one", read=["payments"])
    consul.register("payments", 8080, id="a", address="127.0.0.2")
    env = {**client_env(consul, monkeypatch), "CONSUL_HTTP_TOKEN": SECRET}  # read from Client(environ=...)
    with (
        meshlib.Client(environ=env) as client,
        pytest.raises(meshlib.NoEndpointsError) as info,
    ):
        client.get("http://payments/")
    message = str(info.value)
    assert "Consul rejected the ACL token from CONSUL_HTTP_TOKEN" in message
    assert "ACL not found" in message and "'payments'" in message
    for text in (message, repr(info.value), caplog.text):
        assert SECRET not in text
    (query,) = consul.health_queries()[:1]
    assert query.token == SECRET and query.header_token and "token" not in query.params


def test_acl_errors_from_the_resolver(consul: ConsulEmulator) -> None:
    consul.add_token("reader", read=["other"])
    consul.register("payments", 8080, id="a")
    unknown = resolver_for(consul, CONSUL_HTTP_TOKEN=SECRET)
    with pytest.raises(ConsulACLError) as rejected:
        unknown.resolve()
    assert isinstance(rejected.value, meshlib.DiscoveryError)
    assert "403 ACL not found" in str(rejected.value) and SECRET not in str(rejected.value)
    # A valid token without service:read: Consul filters instead of refusing; still a clear error.
    limited = resolver_for(consul, CONSUL_HTTP_TOKEN="reader")
    with pytest.raises(ConsulACLError, match=r"lacks node:read/service:read .*X-Consul-Results-Filtered-By-ACLs"):
        limited.resolve()
    for resolver in (unknown, limited):
        assert SECRET not in repr(resolver) and SECRET not in repr(resolver.agent)
        resolver.close()


def test_token_file_is_read_and_wins(consul: ConsulEmulator, tmp_path: Path) -> None:
    consul.add_token("from-file", read=None)
    consul.register("payments", 8080, id="a")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    resolver = resolver_for(consul, CONSUL_HTTP_TOKEN="ignored", CONSUL_HTTP_TOKEN_FILE=str(token_file))
    assert len(resolver.resolve().endpoints) == 1
    assert consul.requests[-1].token == "from-file"
    resolver.close()


@pytest.mark.usefixtures("fast_watch")
def test_index_going_backwards_resets_and_still_sees_changes(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, start_backends: BackendFactory
) -> None:
    (old,) = start_backends(1, host="127.0.0.2", prefix="old")
    (new,) = start_backends(1, host="127.0.0.3", prefix="new")
    consul.register("payments", old.port, id="payments-1", address="127.0.0.2")
    with meshlib.Client(environ=client_env(consul, monkeypatch)) as client:
        assert endpoint_of(client.get("http://payments/")) == old.address
        consul.wait_for_blocked()
        high = consul.index
        asked = consul.count
        consul.restore_snapshot(3)  # the blocked query answers at once, with index 3 < high
        consul.wait_for_requests(asked + 1)
        assert consul.health_queries()[asked].index is None  # reset: a plain query restarts the loop
        consul.wait_for_blocked()
        assert consul.health_queries()[-1].index == 3
        resolver = client.mesh.services["PAYMENTS"].resolver
        assert isinstance(resolver, ConsulResolver) and resolver.watch.resets == 1
        # A change at index 4 (< high): a loop still blocking on `high` would never see it.
        asked = consul.count
        consul.register("payments", new.port, id="payments-1", address="127.0.0.3")
        assert consul.index < high
        consul.wait_for_requests(asked + 1)
        assert endpoint_of(client.get("http://payments/")) == new.address


@pytest.mark.usefixtures("fast_watch")
def test_unrelated_churn_does_not_rebuild_the_endpoint_set(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, start_backends: BackendFactory
) -> None:
    (a,) = start_backends(1, host="127.0.0.2")
    consul.register("payments", a.port, id="a", address="127.0.0.2")
    with meshlib.Client(environ=client_env(consul, monkeypatch)) as client:
        client.get("http://payments/")
        consul.wait_for_blocked()
        service = client.mesh.services["PAYMENTS"]
        active, snapshot = service.active, service.cache.snapshot
        resolver = service.resolver
        assert isinstance(resolver, ConsulResolver)
        answer = resolver.watch.answer
        asked = consul.count
        consul.bump_index(5)  # another service changed: the index moves, our instances do not
        consul.wait_for_requests(asked + 1)
        assert consul.health_queries()[asked].index == consul.index
        assert resolver.watch.unchanged == 1 and resolver.watch.answer is answer
        assert service.active is active
        assert service.cache.snapshot is not None and snapshot is not None
        assert service.cache.snapshot.version == snapshot.version
        assert service.cache.snapshot.endpoints is snapshot.endpoints


@pytest.mark.usefixtures("fast_watch")
def test_warning_instances_get_their_warning_weight(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, start_backends: BackendFactory
) -> None:
    (a,) = start_backends(1, host="127.0.0.2")
    (b,) = start_backends(1, host="127.0.0.3")
    consul.register("payments", a.port, id="a", address="127.0.0.2", weights=(10, 3))
    consul.register("payments", b.port, id="b", address="127.0.0.3", weights=(10, 0))
    consul.set_status("a", "warning")
    env = client_env(consul, monkeypatch, "consul://payments?passing=false")
    with meshlib.Client(environ=env) as client:
        client.get("http://payments/")
        service = client.mesh.services["PAYMENTS"]
        assert service.active is not None
        weights = {s.endpoint.address: s.endpoint.weight for s in service.active.stats.values()}
        assert weights == {a.address: 3, b.address: 10}
        consul.wait_for_blocked()
        asked = consul.count
        consul.set_status("b", "warning")  # Weights.Warning = 0: removed, as Consul's DNS does
        consul.wait_for_requests(asked + 1)
        assert service.active is not None
        assert {s.endpoint.address for s in service.active.stats.values()} == {a.address}
        assert {endpoint_of(client.get("http://payments/")) for _ in range(4)} == {a.address}


def test_passing_filter(consul: ConsulEmulator) -> None:
    consul.register("payments", 8001, id="ok", address="127.0.0.11")
    consul.register("payments", 8002, id="warn", address="127.0.0.12", weights=(5, 2))
    consul.register("payments", 8003, id="down", address="127.0.0.13")
    consul.register("payments", 8004, id="maint", address="127.0.0.14")
    consul.register("payments", 8005, id="lost", address="127.0.0.15", node="node2")
    consul.register("payments", 8006, id="unchecked", address="127.0.0.16", status=None)
    consul.set_status("warn", "warning")
    consul.set_status("down", "critical")
    consul.maintenance("maint", reason="upgrade")
    consul.set_node_health("node2", "critical")
    healthy = resolver_for(consul)
    assert [(e.host, e.weight) for e in healthy.resolve().endpoints] == [("127.0.0.11", 1), ("127.0.0.16", 1)]
    relaxed = resolver_for(consul, "consul://payments?passing=false")
    found = [(e.host, e.weight) for e in relaxed.resolve().endpoints]
    assert found == [("127.0.0.11", 1), ("127.0.0.12", 2), ("127.0.0.16", 1)]
    assert "passing" not in consul.requests[-1].params
    healthy.close()
    relaxed.close()


def test_tag_and_filter_and_dc_are_passed_to_consul(consul: ConsulEmulator) -> None:
    consul.datacenters.add("dc2")
    consul.register("payments", 8001, id="a", address="127.0.0.11", tags=["primary", "v2"], meta={"az": "a"})
    consul.register("payments", 8002, id="b", address="127.0.0.12", tags=["primary"], meta={"az": "b"})
    consul.register("payments", 8003, id="c", address="127.0.0.13", tags=["primary", "v2"], datacenter="dc2")
    tagged = resolver_for(consul, "consul://payments?tag=primary&tag=v2")
    (endpoint,) = tagged.resolve().endpoints
    assert endpoint.host == "127.0.0.11" and endpoint.tags == ("primary", "v2") and dict(endpoint.meta) == {"az": "a"}
    assert consul.requests[-1].params["tag"] == ["primary", "v2"]
    filtered = resolver_for(consul, "consul://payments?filter=Service.Meta.az%20%3D%3D%20%22b%22&near=_agent")
    assert [e.host for e in filtered.resolve().endpoints] == ["127.0.0.12"]
    assert consul.requests[-1].params["filter"] == ['Service.Meta.az == "b"']
    assert consul.requests[-1].params["near"] == ["_agent"]
    other_dc = resolver_for(consul, "consul://payments?dc=dc2&stale=false")
    (remote,) = other_dc.resolve().endpoints
    assert remote.host == "127.0.0.13" and remote.zone is None  # a datacenter is not a zone
    assert consul.requests[-1].params["dc"] == ["dc2"] and "stale" not in consul.requests[-1].params
    nowhere = resolver_for(consul, "consul://payments?dc=mars")
    with pytest.raises(meshlib.DiscoveryError, match="No path to datacenter"):
        nowhere.resolve()
    for resolver in (tagged, filtered, other_dc, nowhere):
        resolver.close()


def test_unknown_service_and_404_are_empty_answers(consul: ConsulEmulator) -> None:
    resolver = resolver_for(consul, "consul://nothing-here")
    assert resolver.resolve().endpoints == ()
    consul.fail(404, "Not found", times=1)
    assert resolver.resolve().endpoints == ()
    assert resolver.watch.failures == 0 and resolver.watch.index == 0  # nothing to block on: next is plain
    resolver.close()


def test_429_and_503_back_off_then_recover(consul: ConsulEmulator) -> None:
    consul.register("payments", 8080, id="a")
    resolver = resolver_for(consul)
    consul.fail(429, "rate limit exceeded", times=1)
    consul.fail(503, "", times=1)
    with pytest.raises(meshlib.DiscoveryError, match=r"429.*rate limit exceeded.*backing off"):
        resolver.resolve()
    assert resolver.watch.failures == 1 and resolver.watch.pause() > 0
    with pytest.raises(meshlib.DiscoveryError, match="unavailable"):
        resolver.resolve()
    assert resolver.watch.failures == 2
    assert len(resolver.resolve().endpoints) == 1
    assert resolver.watch.failures == 0
    # After errors the next query was a plain one, so the recovery was seen at once.
    assert consul.requests[-1].index is None
    resolver.close()


def test_unreachable_agent_is_a_discovery_error_without_secrets() -> None:
    with ConsulEmulator() as gone:
        address = gone.address
    resolver = resolver_for(None, CONSUL_HTTP_ADDR=address, CONSUL_HTTP_TOKEN=SECRET, CONSUL_HTTP_AUTH=f"me:{SECRET}x")
    with pytest.raises(meshlib.DiscoveryError) as info:
        resolver.resolve()
    assert f"Consul agent at http://{address} unreachable" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(resolver.agent)
    resolver.close()


# --- closing -------------------------------------------------------------------------------------------------


def test_close_interrupts_a_blocking_query_from_another_thread(consul: ConsulEmulator) -> None:
    consul.register("payments", 8080, id="a")
    resolver = resolver_for(consul)
    first = resolver.resolve()
    results: list[Resolution] = []
    worker = threading.Thread(target=lambda: results.append(resolver.resolve()))
    worker.start()
    consul.wait_for_blocked()
    resolver.close()
    worker.join(10)
    assert not worker.is_alive(), "close() did not end the blocking query"
    assert results == [first]  # an interrupted resolve returns the last answer: nothing changed
    resolver.close()  # idempotent
    with pytest.raises(meshlib.DiscoveryError, match="closed"):
        resolver.resolve()  # a loop that was not stopped backs off instead of spinning


def test_close_interrupts_a_rate_limit_pause(consul: ConsulEmulator) -> None:
    consul.register("payments", 8080, id="a")
    resolver = resolver_for(consul, options=WatchOptions(burst=1, refill=3600.0))
    resolver.resolve()  # the only token: the next resolve must wait an hour
    worker = threading.Thread(target=resolver.resolve)
    worker.start()
    resolver.close()
    worker.join(10)
    assert not worker.is_alive()


@pytest.mark.anyio
async def test_async_close_and_cancel_end_a_blocking_query(consul: ConsulEmulator) -> None:
    consul.register("payments", 8080, id="a")
    resolver = resolver_for(consul)
    first = await resolver.aresolve()
    task = asyncio.ensure_future(resolver.aresolve())
    await anyio.to_thread.run_sync(consul.wait_for_blocked)
    resolver.close()
    with anyio.fail_after(10):
        assert await task is first
    other = resolver_for(consul)
    await other.aresolve()
    task = asyncio.ensure_future(other.aresolve())
    await anyio.to_thread.run_sync(consul.wait_for_blocked)
    task.cancel()
    with pytest.raises(asyncio.CancelledError), anyio.fail_after(10):
        await task
    other.close()


@pytest.mark.usefixtures("fast_watch")
def test_client_close_stops_the_refresh_thread_during_a_blocking_query(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refresh_module, "JOIN_TIMEOUT", 0.5)  # the unwired case gives up quickly
    consul.register("payments", 8080, id="a", address="127.0.0.2")
    client = meshlib.Client(environ=client_env(consul, monkeypatch))
    try:
        with pytest.raises(client_httpx.HTTPError):
            client.get("http://payments/")  # nothing listens on 8080 of 127.0.0.2: only discovery matters
        consul.wait_for_blocked()
        refresher = client.mesh._refreshers[client.mesh.services["PAYMENTS"]]
        refresher.stop()
        alive = refresher._thread.is_alive()
    finally:
        client.close()
    assert not alive, "the refresh thread is still blocked in a 5-minute Consul query"


@pytest.mark.anyio
@pytest.mark.usefixtures("fast_watch")
async def test_async_client_close_during_a_blocking_query(
    consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch, start_backends: BackendFactory
) -> None:
    (a,) = start_backends(1, host="127.0.0.2")
    consul.register("payments", a.port, id="a", address="127.0.0.2")
    client = meshlib.AsyncClient(environ=client_env(consul, monkeypatch))
    assert (await client.get("http://payments/")).status_code == 200
    await anyio.to_thread.run_sync(consul.wait_for_blocked)
    resolver = client.mesh.services["PAYMENTS"].resolver
    with anyio.fail_after(10):
        await client.aclose()
    assert isinstance(resolver, ConsulResolver) and resolver._closed.is_set()


# --- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "ssl_flag", "base_url"),
    [
        ("", None, "http://127.0.0.1:8500"),
        ("10.0.0.5:8500", None, "http://10.0.0.5:8500"),
        ("10.0.0.5:8501", "true", "https://10.0.0.5:8501"),
        ("http://consul.internal", None, "http://consul.internal:80"),
        ("http://consul.internal:8501", "1", "https://consul.internal:8501"),  # never back to http
        ("https://consul.internal/proxy/consul/", None, "https://consul.internal:443/proxy/consul"),
        ("[::1]:8500", None, "http://[::1]:8500"),
    ],
)
def test_consul_http_addr_forms(addr: str, ssl_flag: str | None, base_url: str) -> None:
    environ = {"CONSUL_HTTP_ADDR": addr}
    if ssl_flag is not None:
        environ["CONSUL_HTTP_SSL"] = ssl_flag
    agent = ConsulAgent.from_env(environ)
    assert agent.base_url == base_url and agent.uds is None
    assert (agent.tls is not None) == base_url.startswith("https")


def test_unix_socket_agent(tmp_path: Path) -> None:
    path = str(tmp_path / "consul.sock")
    with ConsulEmulator(unix_socket=path, jitter=False) as consul:
        consul.register("payments", 8080, id="a", address="127.0.0.2")
        resolver = resolver_for(None, CONSUL_HTTP_ADDR=f"unix://{path}")
        assert resolver.agent.uds == path
        assert [e.address for e in resolver.resolve().endpoints] == ["127.0.0.2:8080"]
        resolver.close()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONSUL_HTTP_ADDR", "nonsense"),
        ("CONSUL_HTTP_ADDR", "consul:0"),
        ("CONSUL_HTTP_ADDR", "consul:99999"),
        ("CONSUL_HTTP_ADDR", "consul:port"),
        ("CONSUL_HTTP_ADDR", "ftp://consul:21"),
        ("CONSUL_HTTP_ADDR", "unix://"),
        ("CONSUL_HTTP_ADDR", "consul:8500/v1"),
        ("CONSUL_HTTP_ADDR", "[::1:8500"),
        ("CONSUL_HTTP_SSL", "perhaps"),
        ("CONSUL_HTTP_SSL_VERIFY", "maybe"),
    ],
)
def test_bad_consul_variables_fail_at_client_construction(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(meshlib.ConfigError) as info:
        meshlib.Client(environ={"MESHLIB_SERVICE_PAYMENTS": "consul://payments", variable: value})
    assert info.value.variable == variable and info.value.value == value


def test_tls_files_are_checked_at_construction(tmp_path: Path) -> None:
    https = {"CONSUL_HTTP_ADDR": "https://consul:8501"}
    with pytest.raises(meshlib.ConfigError) as info:
        ConsulAgent.from_env({**https, "CONSUL_CACERT": str(tmp_path / "missing.pem")})
    assert info.value.variable == "CONSUL_CACERT"
    with pytest.raises(meshlib.ConfigError, match="CONSUL_CLIENT_KEY") as info:
        ConsulAgent.from_env({**https, "CONSUL_CLIENT_CERT": str(tmp_path / "cert.pem")})
    assert info.value.variable == "CONSUL_CLIENT_CERT"
    with pytest.raises(meshlib.ConfigError) as info:
        ConsulAgent.from_env({**https, "CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "no-token")})
    assert info.value.variable == "CONSUL_HTTP_TOKEN_FILE"


@pytest.mark.parametrize(
    ("target", "complaint"),
    [
        ("consul://", "a Consul service name"),
        ("consul://consul.internal:8500/payments", "CONSUL_HTTP_ADDR"),
        ("consul://payments?colour=blue", "unknown: colour"),
        ("consul://payments?dc=a&dc=b", "'dc' given once"),
        ("consul://payments?wait=11m", "10m"),
        ("consul://payments?wait=soon", "duration"),
        ("consul://payments?passing=maybe", "passing=true or passing=false"),
        ("consul://payments?stale=true&consistent=true", "not both"),
        ("consul://payments?tag=", "non-empty value for each tag"),
    ],
)
def test_bad_targets_are_refused(target: str, complaint: str) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        build_resolver("payments", target, DiscoverySettings(environ={}), variable="MESHLIB_SERVICE_PAYMENTS")
    assert info.value.variable == "MESHLIB_SERVICE_PAYMENTS"
    assert complaint in info.value.expected


def test_a_token_in_the_target_is_refused_without_echoing_it() -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        build_resolver(
            "payments", f"consul://payments?token={SECRET}", DiscoverySettings(environ={}), variable="MESHLIB_X"
        )
    assert SECRET not in str(info.value) and "CONSUL_HTTP_TOKEN" in str(info.value)


def test_target_options_and_environment(consul: ConsulEmulator) -> None:
    resolver = build_resolver(
        "payments",
        "consul://payments?tag=a&wait=30s&consistent=true&ns=team",
        DiscoverySettings(environ={"CONSUL_HTTP_ADDR": consul.address, "CONSUL_PARTITION": "p1"}),
        variable="MESHLIB_SERVICE_PAYMENTS",
    )
    assert isinstance(resolver, ConsulResolver)
    assert resolver.query == ConsulQuery("payments", tags=("a",), wait=30.0, stale=False, consistent=True, ns="team")
    resolver.resolve()
    params = consul.requests[-1].params
    assert params["consistent"] == [""] and params["ns"] == ["team"] and params["partition"] == ["p1"]
    resolver.close()


def test_settings_environ_wins_over_os_environ(consul: ConsulEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")  # nothing there
    consul.register("payments", 8080, id="a")
    settings = DiscoverySettings(environ={"CONSUL_HTTP_ADDR": consul.address, "CONSUL_HTTP_TOKEN": SECRET})
    resolver = build_resolver("payments", "consul://payments", settings, variable="X")
    assert len(resolver.resolve().endpoints) == 1
    assert SECRET not in repr(settings)
    resolver.close()


# --- TLS to the agent ----------------------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, object]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("consul.test")  # not 127.0.0.1: only CONSUL_TLS_SERVER_NAME makes it match
    client = ca.issue_cert("meshlib-client")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "client_cert", "client_key")}
    ca.cert_pem.write_to_path(paths["ca"])
    client.cert_chain_pems[0].write_to_path(paths["client_cert"])
    client.private_key_pem.write_to_path(paths["client_key"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mTLS: the agent's verify_incoming
    return {"context": context, **{name: str(path) for name, path in paths.items()}}


def test_https_agent_with_ca_client_cert_and_server_name(tls_files: dict[str, object]) -> None:
    context = tls_files["context"]
    assert isinstance(context, ssl.SSLContext)
    with ConsulEmulator(ssl_context=context, jitter=False) as consul:
        consul.register("payments", 8080, id="a", address="127.0.0.2")
        env = {
            "CONSUL_HTTP_ADDR": f"https://{consul.address}",
            "CONSUL_CACERT": str(tls_files["ca"]),
            "CONSUL_CLIENT_CERT": str(tls_files["client_cert"]),
            "CONSUL_CLIENT_KEY": str(tls_files["client_key"]),
        }
        named = resolver_for(None, **env, CONSUL_TLS_SERVER_NAME="consul.test")
        assert len(named.resolve().endpoints) == 1
        mismatch = resolver_for(None, **env)  # the certificate does not name 127.0.0.1
        with pytest.raises(meshlib.DiscoveryError, match="unreachable"):
            mismatch.resolve()
        no_client_cert = resolver_for(
            None,
            CONSUL_HTTP_ADDR=f"https://{consul.address}",
            CONSUL_CACERT=str(tls_files["ca"]),
            CONSUL_TLS_SERVER_NAME="consul.test",
        )
        with pytest.raises(meshlib.DiscoveryError):
            no_client_cert.resolve()
        for resolver in (named, mismatch, no_client_cert):
            resolver.close()


def test_ssl_verify_false_skips_verification_and_warns(
    tls_files: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    context = tls_files["context"]
    assert isinstance(context, ssl.SSLContext)
    context.verify_mode = ssl.CERT_NONE
    with ConsulEmulator(ssl_context=context, jitter=False) as consul:
        consul.register("payments", 8080, id="a")
        unverified = resolver_for(
            None, CONSUL_HTTP_ADDR=consul.address, CONSUL_HTTP_SSL="true", CONSUL_HTTP_SSL_VERIFY="false"
        )
        assert len(unverified.resolve().endpoints) == 1
        unverified.close()
    assert "NOT verified" in caplog.text


# --- the loop's rules, on a fake clock -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch(clock: FakeClock, **options: object) -> BlockingQuery:
    agent = ConsulAgent.from_env({})
    return BlockingQuery(ConsulQuery("payments"), agent, WatchOptions(clock=clock, **options))  # type: ignore[arg-type]


BODY = b'[{"Node": {"Address": "10.0.0.1"}, "Service": {"Port": 80}, "Checks": []}]'
OTHER = b'[{"Node": {"Address": "10.0.0.2"}, "Service": {"Port": 80}, "Checks": []}]'


def ok(index: int | str | None, body: bytes = BODY) -> Reply:
    headers = {} if index is None else {"x-consul-index": str(index)}
    return Reply(200, headers, body)


def test_token_bucket_burst_then_one_per_refill() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2, 15.0, clock)
    delays = []
    for _ in range(5):
        delay = bucket.delay()
        delays.append(delay)
        clock.now += delay
        bucket.take()
    assert delays == [0.0, 0.0, 15.0, 15.0, 15.0]
    clock.now += 60
    assert bucket.delay() == 0.0  # refilled, never above the burst
    bucket.take()
    bucket.take()
    assert bucket.delay() == 15.0


def test_constant_churn_degrades_to_one_query_per_15_seconds() -> None:
    clock = FakeClock()
    loop = watch(clock)
    pauses = []
    for index in range(10, 16):
        pause = loop.pause()
        pauses.append(pause)
        clock.now += pause
        loop.next_request()
        loop.on_reply(ok(index, BODY if index % 2 else OTHER))  # every answer differs: churn
    assert pauses == [0.0, 0.0, 15.0, 15.0, 15.0, 15.0]


def test_blocking_parameters_and_read_timeout() -> None:
    loop = watch(FakeClock())
    first = loop.next_request()
    assert not first.blocking and first.timeout.read == 10.0
    loop.on_reply(ok(42))
    second = loop.next_request()
    assert second.blocking and ("index", "42") in second.params and ("wait", "300000ms") in second.params
    assert second.timeout.read is not None and second.timeout.read > 300 + 300 / 16


def test_index_rules() -> None:
    loop = watch(FakeClock(), refill=0.0)
    loop.on_reply(ok(100))
    assert loop.index == 100
    loop.on_reply(ok(5))  # backwards: restart with a plain query
    assert loop.index == 0 and loop.resets == 1 and not loop.next_request().blocking
    loop.on_reply(ok(0))  # a Consul bug: index 0 would make every query return at once
    assert loop.index == 1 and loop.next_request().blocking
    loop.on_reply(ok(None))  # no header at all: nothing to block on
    assert loop.index == 0
    loop.on_reply(ok("garbage"))
    assert loop.index == 0


def test_same_payload_returns_the_same_answer_object() -> None:
    loop = watch(FakeClock(), refill=0.0)
    first = loop.on_reply(ok(10))
    assert loop.on_reply(ok(11)) is first and loop.unchanged == 1
    changed = loop.on_reply(ok(12, OTHER))
    assert changed is not first and changed.watch and changed.ttl is None
    meta = b'[{"Node": {"Address": "10.0.0.2"}, "Service": {"Port": 80, "Meta": {"v": "2"}}, "Checks": []}]'
    assert loop.on_reply(ok(13, meta)) is not changed  # metadata counts as a change


def test_errors_back_off_exponentially_with_jitter_capped() -> None:
    clock = FakeClock()
    full = watch(clock, refill=0.0, random=lambda: 1.0)
    pauses = []
    for _ in range(8):
        with pytest.raises(meshlib.DiscoveryError):
            full.on_reply(Reply(503, {}, b"No cluster leader"))
        pauses.append(full.pause())
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert not full.next_request().blocking  # after an error: a plain query
    half = watch(clock, refill=0.0, random=lambda: 0.0)
    with pytest.raises(meshlib.DiscoveryError):
        half.on_reply(Reply(error=httpx.ConnectError("refused")))
    assert half.pause() == 0.5
    clock.now += 0.5
    assert half.pause() == 0.0
    half.on_reply(ok(7))
    assert half.failures == 0 and half.pause() == 0.0


def test_unreadable_body_is_an_error() -> None:
    loop = watch(FakeClock())
    with pytest.raises(meshlib.DiscoveryError, match="unreadable body"):
        loop.on_reply(Reply(200, {"x-consul-index": "3"}, b"<html>proxy error</html>"))


def test_no_known_leader_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    loop = watch(FakeClock(), refill=0.0)
    for index in (1, 2):
        loop.on_reply(Reply(200, {"x-consul-index": str(index), "x-consul-knownleader": "false"}, BODY))
    assert loop.known_leader is False
    assert caplog.text.count("without a known leader") == 1


def test_watch_options_are_validated() -> None:
    with pytest.raises(ValueError, match="burst"):
        WatchOptions(burst=0)
    with pytest.raises(ValueError, match="backoff_cap"):
        WatchOptions(backoff_base=10.0, backoff_cap=1.0)
    with pytest.raises(ValueError, match="refill"):
        WatchOptions(refill=-1.0)


def test_scheme_is_registered() -> None:
    from meshlib.discovery import SCHEMES

    assert SCHEMES["consul"] == FORM


def test_zone_from_locality_then_node_meta_then_service_meta(consul: ConsulEmulator) -> None:
    """Endpoint.zone for zone-aware routing: Service.Locality.Zone (1.17+), else the ``zone`` metadata key."""
    consul.register("payments", 8001, id="a", address="127.0.0.11", locality={"Region": "r1", "Zone": "z-loc"})
    consul.register(
        "payments", 8002, id="b", address="127.0.0.12", node="n2", node_address="127.0.0.2", node_meta={"zone": "zn"}
    )
    consul.register("payments", 8003, id="c", address="127.0.0.13", meta={"zone": "z-svc"})
    consul.register(
        "payments", 8004, id="d", address="127.0.0.14", node="n4", node_address="127.0.0.4", node_meta={"zone": "z4"},
        meta={"zone": "ignored"}, locality={"Region": "r1", "Zone": ""},
    )  # fmt: skip
    consul.register("payments", 8005, id="e", address="127.0.0.15", meta={"az": "z-az"})
    resolver = resolver_for(consul)
    zones = {e.port: e.zone for e in resolver.resolve().endpoints}
    assert zones == {8001: "z-loc", 8002: "zn", 8003: "z-svc", 8004: "z4", 8005: None}
    custom = resolver_for(consul, MESHLIB_CONSUL_ZONE_KEY="az")
    zones = {e.port: e.zone for e in custom.resolve().endpoints}
    assert zones == {8001: "z-loc", 8002: None, 8003: None, 8004: None, 8005: "z-az"}
    resolver.close()
    custom.close()


def test_a_bad_zone_key_fails_at_construction(consul: ConsulEmulator) -> None:
    with pytest.raises(meshlib.ConfigError) as caught:
        resolver_for(consul, MESHLIB_CONSUL_ZONE_KEY="topology.kubernetes.io/zone")
    assert caught.value.variable == "MESHLIB_CONSUL_ZONE_KEY" and "Consul metadata key" in caught.value.expected
