"""Connect Native certificates from the local Consul agent (issue 14, item 2): :class:`ConsulCASource`.

Two services, ``billing`` (the caller) and ``payments`` (a real TLS backend on loopback that requires a client
certificate), each get their leaf and the CA roots from the Consul double (``tests/servers/consul.py``) over
blocking queries. The caller is a meshlib client whose endpoint pools are made with the source's client
context (``inner_transport=``: what the pool factory will do with ``MESHLIB_CONSUL_SERVICE``); the backend
serves with the source's server context and records each connection's client certificate, which the tests
check is billing's Consul SPIFFE ID. Progress is counted (requests, updates, refusals), never timed.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import meshlib
from meshlib.discovery.consul.query import WatchOptions
from meshlib.errors import ConfigError, ConsulACLError
from meshlib.security.consul_ca import ConsulCASource, ConsulServiceID, from_env
from meshlib.security.identity import find_identity_error
from meshlib.testing import Backend
from tests.httplib import httpx
from tests.servers.consul import ACLToken, ConsulEmulator, running

pytestmark = pytest.mark.timeout(60)

#: Fast backoff for the double (the defaults, 1 s doubling to 60 s, are Consul's guidance for real agents).
FAST = WatchOptions(refill=0, backoff_base=0.02, backoff_cap=0.2)
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
CLOSE = {"connection": "close"}  # every request is a new TLS handshake, so a rotation shows at once


@pytest.fixture
def consul() -> Iterator[ConsulEmulator]:
    with running() as emulator:
        yield emulator


def open_source(consul: ConsulEmulator, service: str, **kwargs: Any) -> ConsulCASource:
    env = {"CONSUL_HTTP_ADDR": consul.address, **kwargs.pop("env", {})}
    return ConsulCASource(service, environ=env, options=kwargs.pop("options", FAST), **kwargs)


def client_uri(peercert: dict[str, Any] | None) -> str | None:
    """The URI SAN of a client certificate as ``getpeercert()`` gives it."""
    uris = [value for kind, value in (peercert or {}).get("subjectAltName", ()) if kind == "URI"]
    return uris[0] if len(uris) == 1 else None


def client_serial(peercert: dict[str, Any] | None) -> int:
    assert peercert is not None
    return int(peercert["serialNumber"], 16)


class Mesh:
    """``payments`` served with its Consul leaf; ``billing``'s source; clients calling payments through it."""

    def __init__(self, consul: ConsulEmulator) -> None:
        self.consul = consul
        self.payments = open_source(consul, "payments")
        self.billing = open_source(consul, "billing")
        self.backend = Backend("payments", ssl_context=self.payments.server_context()).start()
        self.env = {"MESHLIB_SERVICE_PAYMENTS": f"static://{self.backend.address}"}

    def pools(self, upstream: str | ConsulServiceID = "payments", *, asynchronous: bool = False) -> Callable[..., Any]:
        """An ``inner_transport=`` making each endpoint's pool with billing's context for ``upstream``."""
        context = self.billing.client_context(upstream)
        if asynchronous:
            return lambda endpoint, _default: httpx.AsyncHTTPTransport(verify=context)
        return lambda endpoint, _default: httpx.HTTPTransport(verify=context)

    def call(self, mode: str, upstream: str | ConsulServiceID = "payments") -> httpx.Response:
        if mode == "sync":
            with meshlib.Client(environ=self.env, inner_transport=self.pools(upstream)) as client:
                return client.get("https://payments/", headers=CLOSE)

        async def run() -> httpx.Response:
            transport = self.pools(upstream, asynchronous=True)
            async with meshlib.AsyncClient(environ=self.env, inner_transport=transport) as client:
                return await client.get("https://payments/", headers=CLOSE)

        return asyncio.run(run())

    def close(self) -> None:
        self.backend.stop()
        self.payments.close()
        self.billing.close()


@pytest.fixture
def mesh(consul: ConsulEmulator) -> Iterator[Mesh]:
    made = Mesh(consul)
    yield made
    made.close()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- identities -------------------------------------------------------------------------------------------------


def test_consul_service_ids_in_consul_form() -> None:
    plain = ConsulServiceID("web", "default", "dc1")
    assert plain.uri("td.consul") == "spiffe://td.consul/ns/default/dc/dc1/svc/web"
    assert ConsulServiceID("web", "default", "dc1", "default").uri("td.consul") == plain.uri("td.consul")
    partitioned = ConsulServiceID("web", "ns1", "dc2", "ap1")
    assert partitioned.uri("td.consul") == "spiffe://td.consul/ap/ap1/ns/ns1/dc/dc2/svc/web"
    assert ConsulServiceID.parse(partitioned.uri("td.consul")) == ("td.consul", partitioned)
    with pytest.raises(ValueError, match="not a Consul service ID"):
        ConsulServiceID.parse("spiffe://td.consul/ns/default/sa/web")


def test_the_source_has_the_leaf_the_agent_issued(consul: ConsulEmulator) -> None:
    with open_source(consul, "billing") as source:
        assert source.spiffe_id == consul.spiffe_id("billing")
        assert source.serial_number == consul.leaf_for("billing").cert.serial_number
        assert source.trust_domain == consul.trust_domain
        assert source.identity == ConsulServiceID("billing", "default", "dc1")
        assert source.upstream("payments").uri(source.trust_domain) == consul.spiffe_id("payments")
    leaf_queries = [r for r in consul.requests if r.path == "/v1/agent/connect/ca/leaf/billing"]
    assert leaf_queries and not leaf_queries[0].blocking  # the first query is a plain one


def test_mtls_between_consul_identities(mesh: Mesh, mode: str) -> None:
    response = mesh.call(mode)
    assert response.status_code == 200
    (request,) = mesh.backend.requests
    assert client_uri(request.peercert) == mesh.consul.spiffe_id("billing")  # the backend saw billing's leaf
    assert client_serial(request.peercert) == mesh.billing.serial_number


def test_wrong_upstream_spiffe_id_is_refused_before_sending(mesh: Mesh, mode: str) -> None:
    with pytest.raises(httpx.ConnectError) as caught:
        mesh.call(mode, upstream="inventory")  # payments answers, presenting payments' leaf
    error = find_identity_error(caught.value)
    assert error is not None
    assert error.expected == mesh.consul.spiffe_id("inventory")
    assert error.presented == mesh.consul.spiffe_id("payments")
    assert mesh.backend.count == 0  # not one request byte reached it
    other_dc = mesh.billing.upstream("payments", datacenter="dc2")
    with pytest.raises(httpx.ConnectError):
        mesh.call(mode, upstream=other_dc)


# -- rotation ---------------------------------------------------------------------------------------------------


class Traffic:
    """Requests sent without pause from worker threads: client serials the backend saw, and failures."""

    def __init__(self, mesh: Mesh, mode: str, workers: int = 3) -> None:
        self.changed = threading.Condition()
        self.seen: list[int] = []
        self.failures: list[BaseException] = []
        self.done = threading.Event()
        self.mesh = mesh
        if mode == "sync":
            client = meshlib.Client(environ=mesh.env, inner_transport=mesh.pools())
            self.threads = [threading.Thread(target=self._sync, args=(client,)) for _ in range(workers)]
            self._close: Callable[[], None] = client.close
        else:
            self.threads = [threading.Thread(target=asyncio.run, args=(self._async(workers),))]
            self._close = lambda: None
        for thread in self.threads:
            thread.start()

    def _record(self, response: httpx.Response | None, error: BaseException | None = None) -> None:
        with self.changed:
            if error is not None or response is None or response.status_code != 200:
                self.failures.append(error or AssertionError(f"status {response and response.status_code}"))
            else:
                self.seen.append(client_serial(self.mesh.backend.requests[-1].peercert))
            self.changed.notify_all()

    def _sync(self, client: meshlib.Client) -> None:
        while not self.done.is_set():
            try:
                self._record(client.get("https://payments/", headers=CLOSE))
            except BaseException as error:
                self._record(None, error)

    async def _async(self, workers: int) -> None:
        transport = self.mesh.pools(asynchronous=True)
        async with meshlib.AsyncClient(environ=self.mesh.env, inner_transport=transport) as client:

            async def loop() -> None:
                while not self.done.is_set():
                    try:
                        self._record(await client.get("https://payments/", headers=CLOSE))
                    except BaseException as error:
                        self._record(None, error)

            await asyncio.gather(*(loop() for _ in range(workers)))

    def wait_for(self, count: int, serial: int | None = None) -> None:
        """Until ``count`` more answers (with ``serial``: whose requests presented that client leaf)."""
        with self.changed:
            start = len(self.seen)
            ok = self.changed.wait_for(
                lambda: self.failures or len([s for s in self.seen[start:] if serial in (None, s)]) >= count, 30
            )
            assert ok, f"traffic stalled at {len(self.seen)} answers"
            assert self.failures == []

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=30)
        self._close()


def test_leaf_rotation_under_live_traffic_fails_no_request(mesh: Mesh, mode: str) -> None:
    traffic = Traffic(mesh, mode)
    try:
        traffic.wait_for(10, mesh.billing.serial_number)
        for _ in range(2):  # two rotations in a row, of both services' leaves
            server_leaf = mesh.consul.rotate_leaf("payments")
            client_leaf = mesh.consul.rotate_leaf("billing")
            serial = client_leaf.cert.serial_number
            server_serial = server_leaf.cert.serial_number
            assert mesh.payments.wait_for(lambda s, want=server_serial: s.serial_number == want, 30)
            traffic.wait_for(10, serial)  # the backend sees the new client leaf on new handshakes
    finally:
        traffic.stop()
    assert traffic.failures == []
    assert all(client_uri(r.peercert) == mesh.consul.spiffe_id("billing") for r in mesh.backend.requests)


@pytest.mark.parametrize(
    ("not_before", "not_after", "reason"),
    [(NOW - 3 * DAY, NOW - DAY, "expired"), (NOW + DAY, NOW + 3 * DAY, "not valid before")],
    ids=["expired", "not-yet-valid"],
)
def test_an_expired_or_not_yet_valid_leaf_never_becomes_current(
    mesh: Mesh, not_before: datetime.datetime, not_after: datetime.datetime, reason: str, caplog: Any
) -> None:
    serial, refused = mesh.billing.serial_number, mesh.billing.refused
    context = mesh.billing.client_context("payments")
    generation = context.generation
    with caplog.at_level(logging.ERROR, logger="meshlib.security"):
        mesh.consul.rotate_leaf("billing", not_before=not_before, not_after=not_after)
        assert mesh.billing.wait_for(lambda s: s.refused > refused, 30)
    assert mesh.billing.serial_number == serial
    assert context.generation == generation  # nothing was swapped
    assert reason in caplog.text and "keep the previous leaf" in caplog.text
    assert mesh.call("sync").status_code == 200
    assert client_serial(mesh.backend.requests[-1].peercert) == serial  # still the previous, valid leaf
    good = mesh.consul.rotate_leaf("billing")  # the next good leaf is taken
    assert mesh.billing.wait_for(lambda s: s.serial_number == good.cert.serial_number, 30)


def test_a_leaf_for_another_identity_is_refused(mesh: Mesh) -> None:
    serial, refused = mesh.billing.serial_number, mesh.billing.refused
    mesh.consul.rotate_leaf("billing", uri=mesh.consul.spiffe_id("payments"))
    assert mesh.billing.wait_for(lambda s: s.refused > refused, 30)
    assert mesh.billing.serial_number == serial


def test_roots_rotation(mesh: Mesh, mode: str, tmp_path: Any) -> None:
    """A new root is trusted beside the old one, then leaves move to it, then the old root is dropped: no
    request fails, and a leaf of the old root is refused afterwards."""
    old_leaf = mesh.consul.leaf_for("payments")
    contexts = [mesh.payments.server_context(), mesh.billing.client_context("payments")]
    generations = [context.generation for context in contexts]
    mesh.consul.rotate_ca()
    for context, generation in zip(contexts, generations, strict=True):
        assert context.wait_for_generation(generation + 1, 30)  # both sides trust the new root now
    assert mesh.call(mode).status_code == 200  # old leaves, both roots trusted
    server_leaf, client_leaf = mesh.consul.rotate_leaf("payments"), mesh.consul.rotate_leaf("billing")
    assert mesh.payments.wait_for(lambda s: s.serial_number == server_leaf.cert.serial_number, 30)
    assert mesh.billing.wait_for(lambda s: s.serial_number == client_leaf.cert.serial_number, 30)
    assert mesh.call(mode).status_code == 200
    assert client_serial(mesh.backend.requests[-1].peercert) == client_leaf.cert.serial_number
    generations = [context.generation for context in contexts]
    mesh.consul.drop_inactive_roots()
    for context, generation in zip(contexts, generations, strict=True):
        assert context.wait_for_generation(generation + 1, 30)
    assert mesh.call(mode).status_code == 200
    # A payments instance still presenting a leaf of the dropped root is no longer trusted.
    from tests.security.pki import server_context

    stale = Backend("stale", ssl_context=server_context(old_leaf, tmp_path)).start()
    try:
        transport = mesh.pools()
        with (
            meshlib.Client(
                services={"payments": f"static://{stale.address}"}, environ={}, inner_transport=transport
            ) as c,
            pytest.raises(httpx.ConnectError, match="certificate verify failed"),
        ):
            c.get("https://payments/")
    finally:
        stale.stop()


# -- the agent failing ----------------------------------------------------------------------------------------


def test_agent_down_then_back_keeps_the_last_leaf(mesh: Mesh, mode: str, caplog: Any) -> None:
    serial = mesh.billing.serial_number
    errors = mesh.billing.errors
    with caplog.at_level(logging.WARNING, logger="meshlib.security"):
        mesh.consul.stop()
        assert mesh.billing.wait_for(lambda s: s.errors >= errors + 3, 30)  # retrying, with backoff
        assert mesh.call(mode).status_code == 200  # fail-static: the last leaf and roots still serve
        assert mesh.billing.serial_number == serial
        billing = [r.getMessage() for r in caplog.records if mesh.consul.spiffe_id("billing") in r.getMessage()]
        assert len(billing) == 1  # once per outage, not once per retry
        assert "watch failed" in billing[0] and "keep the leaf" in billing[0]
        new = mesh.consul.rotate_leaf("billing")  # the agent renewed the leaf meanwhile
        mesh.consul.start()
        assert mesh.billing.wait_for(lambda s: s.serial_number == new.cert.serial_number, 30)
    assert mesh.call(mode).status_code == 200
    assert client_serial(mesh.backend.requests[-1].peercert) == new.cert.serial_number


SECRET = "b6f1c0e4-very-secret-token"


def test_acl_refusal_at_start_is_clear_and_never_shows_the_token(caplog: Any) -> None:
    with (
        running(acl_tokens=[ACLToken(SECRET, write=frozenset({"other"}))]) as consul,
        caplog.at_level(logging.DEBUG),
        pytest.raises(ConsulACLError) as caught,
    ):
        open_source(consul, "billing", env={"CONSUL_HTTP_TOKEN": SECRET})
    message = str(caught.value)
    assert "403" in message and "CONSUL_HTTP_TOKEN" in message
    assert "service:write on 'billing'" in message
    assert SECRET not in message and SECRET not in caplog.text


def test_acl_refusal_later_keeps_the_last_leaf_and_never_logs_the_token(caplog: Any) -> None:
    with (
        running(acl_tokens=[ACLToken(SECRET, write=frozenset({"billing"}))]) as consul,
        open_source(consul, "billing", env={"CONSUL_HTTP_TOKEN": SECRET}) as source,
    ):
        serial = source.serial_number
        with caplog.at_level(logging.DEBUG):
            del consul.tokens[SECRET]  # the token was deleted: 403 ACL not found
            consul.bump_index()  # wakes the blocked queries (admitted with the token): the next ones are refused
            assert source.wait_for(lambda s: s.errors > 0, 30)
        assert source.serial_number == serial
        assert "ACL not found" in caplog.text and "CONSUL_HTTP_TOKEN" in caplog.text
        assert SECRET not in caplog.text


def test_no_agent_is_a_config_error_naming_the_variable() -> None:
    env = {"MESHLIB_CONSUL_SERVICE": "billing", "CONSUL_HTTP_ADDR": "127.0.0.1:1"}
    with pytest.raises(ConfigError, match=r"MESHLIB_CONSUL_SERVICE.*no leaf certificate and CA roots within"):
        from_env(env, timeout=0.5, options=FAST)
    assert from_env({}) is None
    with pytest.raises(ConfigError, match="MESHLIB_CONSUL_SERVICE"):
        from_env({"MESHLIB_CONSUL_SERVICE": "bill/ing"})


# -- the double -------------------------------------------------------------------------------------------------


def test_double_leaf_and_roots_answer_blocking_queries(consul: ConsulEmulator) -> None:
    with httpx.Client(base_url=consul.url) as client:
        leaf = client.get("/v1/agent/connect/ca/leaf/web")
        roots = client.get("/v1/agent/connect/ca/roots").json()
        assert leaf.json()["ServiceURI"] == consul.spiffe_id("web")
        assert roots["TrustDomain"] == consul.trust_domain and roots["Roots"][0]["Active"] is True
        assert "BEGIN EC PRIVATE KEY" in leaf.json()["PrivateKeyPEM"]
        index = int(leaf.headers["x-consul-index"])
        answers: list[httpx.Response] = []
        blocked = threading.Thread(
            target=lambda: answers.append(
                client.get("/v1/agent/connect/ca/leaf/web", params={"index": index, "wait": "30s"})
            )
        )
        blocked.start()
        consul.wait_for_blocked(1)
        new = consul.rotate_leaf("web")
        blocked.join(30)
        (answer,) = answers
        assert int(answer.headers["x-consul-index"]) > index
        assert "".join(answer.json()["CertPEM"].split()) == "".join(new.cert_pem.decode().split())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_forked_child_watches_with_its_own_threads(consul: ConsulEmulator) -> None:
    with open_source(consul, "billing") as source:
        old = source.serial_number
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the parent's watch threads are gone; resume() starts its own
            code = 1
            try:
                updates = source.updates
                source.resume()
                if source.wait_for(lambda s: s.updates > updates, 20):
                    os.write(ready_w, b"r")
                    code = 0 if source.wait_for(lambda s: s.serial_number != old, 20) else 2
            finally:
                os._exit(code)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"r", "the child did not get its own first answer"
        os.close(ready_r)
        new = consul.rotate_leaf("billing")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0  # the child saw the rotation through its own watches
        assert source.wait_for(lambda s: s.serial_number == new.cert.serial_number, 30)  # and so did the parent
