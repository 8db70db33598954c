"""Consul intentions enforced inbound: a real uvicorn with mTLS (callers present Consul SPIFFE IDs), the Consul
emulator answering authorize and the intentions match endpoint, and ConsulIntentionsHook in MeshMiddleware /
WSGIMeshMiddleware. The handler records each path it ran for, so "denied before the app" is observable."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshlib.discovery.consul.agent import ConsulAgent
from meshlib.security.consul_intentions import ConsulCaller, IntentionsAuthorizer, parse_intentions
from meshlib.server.consul_intentions import ConsulIntentionsHook
from meshlib.server.middleware import MeshMiddleware, PeerIdentityHook, WSGIMeshMiddleware
from tests.httplib import httpx
from tests.security.pki import CA
from tests.server.test_middleware import serve_asgi, serve_wsgi
from tests.server.test_refusal import asgi_app, ran, wsgi_app
from tests.servers.consul import ConsulEmulator

protocols = pytest.importorskip("meshlib.server.uvicorn", reason="uvicorn is in the dev extra")

pytestmark = pytest.mark.timeout(60)

TD = "11111111-2222-3333-4444-555555555555.consul"
WEB = f"spiffe://{TD}/ns/default/dc/dc1/svc/web"
ADMIN = f"spiffe://{TD}/ns/default/dc/dc1/svc/admin"
BATCH = f"spiffe://{TD}/ns/default/dc/dc1/svc/batch"
AUTHORIZE = "/v1/agent/connect/authorize"


class Pki:
    """The Consul CA stand-in: a server leaf for 127.0.0.1 and client leaves with Consul service SPIFFE IDs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = CA("Consul CA", trust_domain=TD)
        self.ca_file = self.ca.write(directory / "ca.pem")
        self.server_files = self.ca.issue("127.0.0.1", common_name="api").write(directory, "server")
        self.clients = {
            uri: self.ca.issue(uris=(uri,), common_name=uri.rsplit("/", 1)[1]).write(directory, uri.rsplit("/")[-1])
            for uri in (WEB, ADMIN, BATCH)
        }

    def uvicorn(self) -> dict[str, Any]:
        cert, key = self.server_files
        return {
            "http": protocols.H11Protocol,
            "ssl_certfile": str(cert),
            "ssl_keyfile": str(key),
            "ssl_ca_certs": str(self.ca_file),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
        }

    def client(self, uri: str, url: str) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(*self.clients[uri])
        return httpx.Client(base_url=url.replace("http://", "https://"), verify=context)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("consul-intentions"))


@pytest.fixture
def consul() -> Iterator[ConsulEmulator]:
    emulator = ConsulEmulator(jitter=False).start()
    yield emulator
    emulator.stop()


def agent(consul: ConsulEmulator) -> ConsulAgent:
    return ConsulAgent.from_env({"CONSUL_HTTP_ADDR": consul.address})


def authorizes(consul: ConsulEmulator) -> int:
    return sum(1 for request in consul.requests if request.path == AUTHORIZE)


L4 = [{"Name": "web", "Action": "allow"}, {"Name": "*", "Action": "deny"}]


def test_allowed_caller_passes_denied_gets_403_and_the_handler_never_runs(pki: Pki, consul: ConsulEmulator) -> None:
    ran.clear()
    consul.set_intentions("api", L4)
    hook = ConsulIntentionsHook(IntentionsAuthorizer("api", agent(consul)))
    try:
        with (
            serve_asgi(MeshMiddleware(asgi_app, hooks=[hook]), **pki.uvicorn()) as url,
            pki.client(WEB, url) as web,
            pki.client(ADMIN, url) as admin,
        ):
            allowed = web.get("/orders")
            denied = admin.get("/orders")
    finally:
        hook.close()
    assert allowed.status_code == 200 and allowed.text == "handled"
    assert denied.status_code == 403 and denied.text == "RBAC: access denied\n"
    assert ran == ["/orders"]  # the denied caller never reached the handler
    bodies = [r for r in consul.requests if r.path == AUTHORIZE]
    assert len(bodies) == 2  # one authorize per caller, with the caller's SPIFFE ID (checked by the emulator)


def test_cache_hit_avoids_agent_calls_and_a_change_invalidates(pki: Pki, consul: ConsulEmulator) -> None:
    ran.clear()
    consul.set_intentions("api", L4)
    authorizer = IntentionsAuthorizer("api", agent(consul))
    hook = ConsulIntentionsHook(authorizer)
    try:
        with serve_asgi(MeshMiddleware(asgi_app, hooks=[hook]), **pki.uvicorn()) as url, pki.client(WEB, url) as web:
            assert [web.get(f"/r{i}").status_code for i in range(5)] == [200] * 5
            assert authorizes(consul) == 1  # four cache hits: no agent call
            generation = authorizer.generation
            consul.wait_for_blocked()  # the watch is parked on the current index
            consul.set_intentions("api", [{"Name": "web", "Action": "deny"}])
            # the documented bound: one blocking-query round trip
            assert authorizer.wait_until(lambda a: a.generation > generation)
            assert web.get("/after").status_code == 403
            assert authorizes(consul) == 2  # the change dropped the cached decision
    finally:
        hook.close()
    assert ran == [f"/r{i}" for i in range(5)]


def test_l7_path_and_method_permissions(pki: Pki, consul: ConsulEmulator) -> None:
    ran.clear()
    consul.set_intentions(
        "api",
        [
            {
                "Name": "web",
                "Permissions": [
                    {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                    {"Action": "allow", "HTTP": {"PathRegex": "/orders/[0-9]+", "Methods": ["GET"]}},
                    {"Action": "allow", "HTTP": {"PathExact": "/health"}},
                    {"Action": "allow", "HTTP": {"Header": [{"Name": "X-Debug", "Exact": "yes"}]}},
                ],
            },
            {"Name": "batch", "Action": "allow"},
        ],
    )
    hook = ConsulIntentionsHook(IntentionsAuthorizer("api", agent(consul), protocol="http"))
    try:
        with (
            serve_asgi(MeshMiddleware(asgi_app, hooks=[hook]), **pki.uvicorn()) as url,
            pki.client(WEB, url) as web,
            pki.client(BATCH, url) as batch,
            pki.client(ADMIN, url) as admin,
        ):
            statuses = {
                "GET /orders/12": web.get("/orders/12").status_code,
                "POST /orders/12": web.post("/orders/12").status_code,
                "GET /orders/x": web.get("/orders/x").status_code,
                "GET /health": web.get("/health").status_code,
                "GET /admin/x": web.get("/admin/x", headers={"x-debug": "yes"}).status_code,
                "GET /other+debug": web.get("/other", headers={"x-debug": "yes"}).status_code,
                "batch /admin/x": batch.get("/admin/x").status_code,
                "admin (no intention)": admin.get("/orders/12").status_code,
            }
    finally:
        hook.close()
    assert statuses == {
        "GET /orders/12": 200,
        "POST /orders/12": 403,  # method not allowed by the permission, no other matches: default deny
        "GET /orders/x": 403,  # the regex matches the whole path only
        "GET /health": 200,
        "GET /admin/x": 403,  # first matching permission wins: the deny before the header allow
        "GET /other+debug": 200,
        "batch /admin/x": 200,  # an L4 intention: every path
        "admin (no intention)": 200,  # no intention matches: authorize's default (ACLs off: allow)
    }
    assert ran == ["/orders/12", "/health", "/other", "/admin/x", "/orders/12"]


def test_agent_down_keeps_decisions_for_the_bound_then_fails_closed(consul: ConsulEmulator) -> None:
    """WSGI (the sync path), identity from a resolver; a fake clock moves past ``stale_for``."""
    ran.clear()
    consul.set_intentions("api", L4)
    now = [1000.0]
    authorizer = IntentionsAuthorizer("api", agent(consul), stale_for=30.0, clock=lambda: now[0])
    hook = ConsulIntentionsHook(authorizer)
    identity = PeerIdentityHook(resolve=lambda request: request.header("x-test-peer"))
    app = WSGIMeshMiddleware(wsgi_app, peer_identity=identity, hooks=[hook])
    try:
        with serve_wsgi(app) as url, httpx.Client(base_url=url) as client:
            assert client.get("/before", headers={"x-test-peer": WEB}).status_code == 200
            consul.stop()
            assert authorizer.wait_until(lambda a: not a.healthy)
            now[0] += 29.0  # within the bound: the cached decision stands, nothing asks the agent
            assert client.get("/kept", headers={"x-test-peer": WEB}).status_code == 200
            # an unseen caller needs the agent, which does not answer: denied
            assert client.get("/new", headers={"x-test-peer": BATCH}).status_code == 403
            now[0] += 2.0  # past the bound: fail closed
            assert client.get("/closed", headers={"x-test-peer": WEB}).status_code == 403
            consul.start()  # back on the same port: the watch recovers, decisions are fresh again
            assert authorizer.wait_until(lambda a: a.healthy, timeout=30)
            assert client.get("/recovered", headers={"x-test-peer": WEB}).status_code == 200
    finally:
        hook.close()
    assert ran == ["/before", "/kept", "/recovered"]


def test_no_identity_and_foreign_identities_are_denied(consul: ConsulEmulator) -> None:
    authorizer = IntentionsAuthorizer("api", agent(consul)).start()
    try:
        assert not authorizer.decide(None).allowed
        assert not authorizer.decide("spiffe://cluster.local/ns/default/sa/web").allowed  # not a Consul service
        assert authorizes(consul) == 0
    finally:
        authorizer.close()
    assert ConsulCaller.parse(f"spiffe://{TD}/ap/part1/ns/ns1/dc/dc2/svc/web") == ConsulCaller(
        f"spiffe://{TD}/ap/part1/ns/ns1/dc/dc2/svc/web", "web", "ns1", "part1", "dc2"
    )


def test_the_cache_is_bounded(consul: ConsulEmulator) -> None:
    authorizer = IntentionsAuthorizer("api", agent(consul), cache_size=2).start()
    try:
        assert authorizer.ready()
        for uri in (WEB, ADMIN, BATCH, WEB):
            assert authorizer.decide(uri).allowed  # ACLs off, no intention: allowed by default
        assert authorizes(consul) == 4  # WEB was evicted by the third caller and asked again
    finally:
        authorizer.close()


def test_unenforceable_intentions_are_refused_not_ignored() -> None:
    from meshlib.security.consul_intentions import IntentionsError

    jwt = (
        b'{"api": [{"SourceName": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathExact": "/"}, "JWT": {}}]}]}'
    )
    with pytest.raises(IntentionsError, match="JWT"):
        parse_intentions(jwt, service="api", source="test")
    bad_regex = b'{"api": [{"SourceName": "web", "Permissions": [{"Action": "allow", "HTTP": {"PathRegex": "("}}]}]}'
    with pytest.raises(IntentionsError, match="PathRegex"):
        parse_intentions(bad_regex, service="api", source="test")
