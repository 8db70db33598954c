"""Istio's AuthorizationPolicy reference examples enforced over real mTLS, on real servers, for meshlib callers.

The servers require TLS and *accept* client certificates (``CERT_OPTIONAL``), so one server serves both the
callers presenting X.509-SVIDs and the one presenting none:

- uvicorn (in a thread) with meshlib's protocol classes (``meshlib.server.uvicorn``: h11 and httptools), which
  give each request the ASGI TLS extension, behind ``ASGIInboundMiddleware(app, hooks=[PeerIdentityHook(),
  AuthorizationHook(...)])``;
- gunicorn (a subprocess, one sync worker, ``--cert-reqs 1``) serving the same handler behind
  ``WSGIInboundMiddleware`` (the peer certificate read from ``environ["gunicorn.socket"]``).

One server per kind for the whole module; each case replaces the policies whole (the hook's ``policies``
attribute, as a file reload does; for gunicorn through a test-only control path in the worker), sends one request
through a fresh or cached ``meshlib.Client`` / ``AsyncClient`` presenting the caller's SVID (``MESHLIB_TLS_*``
settings, or ``TLSSettings`` for one caller), and asserts the status, the body (the handler's view of the peer, or
the refusal's reason) and whether the handler ran.

The policies follow the examples of Istio's AuthorizationPolicy reference
(https://istio.io/latest/docs/reference/config/security/authorization-policy/) with this test's identities.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib.security import TLSSettings
from tests.httplib import httpx
from tests.security.pki import CA, Leaf
from tests.server.istio_apps import CONTROL_CALLS, CONTROL_POLICIES, Protected
from tests.server.test_gunicorn import Gunicorn
from tests.server.test_middleware import serve_asgi

pytest.importorskip("gunicorn", reason="gunicorn is in the dev extra")
uvicorn_protocols = pytest.importorskip("meshlib.server.uvicorn", reason="uvicorn is in the dev extra")

TRUST_DOMAIN = "cluster.local"
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
OTHER = "spiffe://cluster.local/ns/foo/sa/other"
DEV = "spiffe://cluster.local/ns/dev/sa/x"
ANONYMOUS = None  # TLS without a client certificate
CALLERS: dict[str, str | None] = {"sleep": SLEEP, "other": OTHER, "dev": DEV, "anonymous": ANONYMOUS}

KINDS = ["uvicorn-h11", "uvicorn-httptools", "gunicorn"]
PORT = "{port}"  # replaced by the server's port in the policies of the ports cases


def policy(name: str, spec: str) -> str:
    """One AuthorizationPolicy document; ``spec`` in YAML flow style."""
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: foo}}\nspec: {spec}\n---\n"
    )


# The reference's first example: sleep OR namespace foo, to GET /info* OR POST /data.
HTTPBIN = policy(
    "httpbin",
    '{action: ALLOW, rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}},'
    ' {source: {namespaces: ["foo"]}}], to: [{operation: {methods: [GET], paths: ["/info*"]}},'
    ' {operation: {methods: [POST], paths: ["/data"]}}]}]}',
)
DENY_ADMIN = policy("deny-admin", '{action: DENY, rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]}')
DENY_NOT_SLEEP = policy(
    "deny-not-sleep",
    '{action: DENY, rules: [{from: [{source: {notPrincipals: ["cluster.local/ns/default/sa/sleep"]}}]}]}',
)
ALLOW_NOT_OTHER = policy(
    "allow-not-other", '{rules: [{from: [{source: {notPrincipals: ["cluster.local/ns/foo/sa/other"]}}]}]}'
)
WHEN_VERSION = policy("when-version", '{rules: [{when: [{key: "request.headers[X-Version]", values: ["v1*"]}]}]}')
DENY_DEV_POST = policy(
    "deny-dev-post",
    "{action: DENY, rules: [{from: [{source: {namespaces: [dev]}}], to: [{operation: {methods: [POST]}}]}]}",
)
ALLOW_NAMESPACES = policy("allow-default-dev", '{rules: [{from: [{source: {namespaces: ["default", "dev"]}}]}]}')
ALLOW_NOTHING = policy("allow-nothing", "{}")
ALLOW_ALL = policy("allow-all", "{action: ALLOW, rules: [{}]}")
REQUIRE_MTLS = policy("require-mtls", '{action: DENY, rules: [{from: [{source: {notPrincipals: ["*"]}}]}]}')
ALLOW_ANY_PRINCIPAL = policy("any-principal", '{rules: [{from: [{source: {principals: ["*"]}}]}]}')
ALLOW_THIS_PORT = policy("this-port", '{rules: [{to: [{operation: {ports: ["{port}"]}}]}]}')
ALLOW_OTHER_PORT = policy("other-port", '{rules: [{to: [{operation: {ports: ["1"]}}]}]}')
DENY_POST_THIS_PORT = policy(
    "deny-post-port", "{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: [{port}]}}]}]}"
)

NO_MATCH = "denied: no ALLOW policy matched"


def denied_by(name: str) -> str:
    return f"denied by policy foo/{name}"


@dataclass(frozen=True)
class Case:
    id: str
    policies: str
    caller: str
    expect: int
    reason: str = ""  # the deciding policy's reason (the 403 body is "RBAC: access denied")
    method: str = "GET"
    path: str = "/info/headers"
    headers: tuple[tuple[str, str], ...] = ()


CASES = [
    Case("no policy: a caller with an SVID", "", "sleep", 200),
    Case("no policy: no verified identity", "", "anonymous", 200),
    Case("allow by principal", HTTPBIN, "sleep", 200),
    Case("allow by namespace (POST /data)", HTTPBIN, "other", 200, method="POST", path="/data"),
    Case("allow: principal and namespace not listed", HTTPBIN, "dev", 403, NO_MATCH),
    Case("allow: method not listed", HTTPBIN, "sleep", 403, NO_MATCH, method="POST"),
    Case("allow: path not listed", HTTPBIN, "sleep", 403, NO_MATCH, path="/status"),
    Case("allow: no verified identity never matches principals", HTTPBIN, "anonymous", 403, NO_MATCH),
    Case("deny by path", DENY_ADMIN, "sleep", 403, denied_by("deny-admin"), path="/admin/users"),
    Case("deny by path: other paths pass", DENY_ADMIN, "sleep", 200, path="/public"),
    Case(
        "deny by path: no identity denied too", DENY_ADMIN, "anonymous", 403, denied_by("deny-admin"), path="/admin/x"
    ),
    Case("DENY notPrincipals: other denied", DENY_NOT_SLEEP, "other", 403, denied_by("deny-not-sleep")),
    Case("DENY notPrincipals: the principal passes", DENY_NOT_SLEEP, "sleep", 200),
    Case("DENY notPrincipals: no identity denied", DENY_NOT_SLEEP, "anonymous", 403, denied_by("deny-not-sleep")),
    Case("ALLOW notPrincipals: others allowed", ALLOW_NOT_OTHER, "dev", 200),
    Case("ALLOW notPrincipals: the excluded one denied", ALLOW_NOT_OTHER, "other", 403, NO_MATCH),
    Case("ALLOW notPrincipals: no identity denied (fail closed)", ALLOW_NOT_OTHER, "anonymous", 403, NO_MATCH),
    Case("when header matches", WHEN_VERSION, "sleep", 200, headers=(("X-Version", "v1.2"),)),
    Case("when header other value", WHEN_VERSION, "sleep", 403, NO_MATCH, headers=(("X-Version", "v2"),)),
    Case("when header absent", WHEN_VERSION, "sleep", 403, NO_MATCH),
    Case(
        "when header: a rule anyone matches, no identity",
        WHEN_VERSION,
        "anonymous",
        200,
        headers=(("x-version", "v1"),),
    ),
    Case("namespaces: DENY dev POST", DENY_DEV_POST, "dev", 403, denied_by("deny-dev-post"), method="POST"),
    Case("namespaces: DENY dev POST, dev GET passes", DENY_DEV_POST, "dev", 200),
    Case("namespaces: DENY dev POST, other namespace passes", DENY_DEV_POST, "other", 200, method="POST"),
    Case("namespaces: ALLOW default and dev", ALLOW_NAMESPACES, "dev", 200),
    Case("namespaces: ALLOW default and dev, foo denied", ALLOW_NAMESPACES, "other", 403, NO_MATCH),
    Case("namespaces: ALLOW, no identity has no namespace", ALLOW_NAMESPACES, "anonymous", 403, NO_MATCH),
    Case("allow-nothing (spec: {})", ALLOW_NOTHING, "sleep", 403, NO_MATCH),
    Case("allow-nothing, no identity", ALLOW_NOTHING, "anonymous", 403, NO_MATCH),
    Case("allow-all (rules: [{}])", ALLOW_ALL, "other", 200),
    Case("allow-all allows anyone, no identity", ALLOW_ALL, "anonymous", 200),
    Case("DENY beats ALLOW", ALLOW_ALL + DENY_ADMIN, "sleep", 403, denied_by("deny-admin"), path="/admin/x"),
    Case("DENY beats ALLOW: other paths allowed", ALLOW_ALL + DENY_ADMIN, "sleep", 200, path="/x"),
    Case("require mTLS: no identity denied", REQUIRE_MTLS, "anonymous", 403, denied_by("require-mtls")),
    Case("require mTLS: any SVID passes", REQUIRE_MTLS, "dev", 200),
    Case("principals ['*']: any SVID", ALLOW_ANY_PRINCIPAL, "other", 200),
    Case("principals ['*']: no identity denied", ALLOW_ANY_PRINCIPAL, "anonymous", 403, NO_MATCH),
    Case("ports: the port served", ALLOW_THIS_PORT, "sleep", 200),
    Case("ports: another port", ALLOW_OTHER_PORT, "sleep", 403, NO_MATCH),
    Case(
        "ports: DENY POST on the port served",
        DENY_POST_THIS_PORT,
        "sleep",
        403,
        denied_by("deny-post-port"),
        method="POST",
    ),
    Case("ports: DENY POST, GET passes", DENY_POST_THIS_PORT, "sleep", 200),
]


# --- PKI, servers, callers ------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_file: Path
    server: Leaf
    server_files: tuple[Path, Path]
    callers: dict[str, tuple[Path, Path]]  # name -> (cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("istio-pki")
    ca = CA("cluster.local CA", trust_domain=TRUST_DOMAIN)
    server = ca.issue("httpbin", "127.0.0.1", uris=("spiffe://cluster.local/ns/foo/sa/httpbin",), common_name="httpbin")
    callers = {
        name: ca.issue(uris=(spiffe_id,), common_name=name).write(directory, name)
        for name, spiffe_id in CALLERS.items()
        if spiffe_id is not None
    }
    return Pki(ca.write(directory / "ca.pem"), server, server.write(directory, "server"), callers)


@dataclass
class Served:
    """A running server of one kind: its port, how to replace its policies and read its handler's calls."""

    kind: str
    port: int
    set_policies: Callable[[str], None]
    calls: Callable[[], list[str]]


def uvicorn_options(pki: Pki, http: str, cert_reqs: int = ssl.CERT_OPTIONAL) -> dict[str, Any]:
    cert, key = pki.server_files
    protocol = getattr(uvicorn_protocols, http)
    return {
        "http": protocol,
        "ssl_certfile": str(cert),
        "ssl_keyfile": str(key),
        "ssl_ca_certs": str(pki.ca_file),
        "ssl_cert_reqs": cert_reqs,
    }


def control_client(pki: Pki) -> httpx.Client:
    """A plain httpx client for gunicorn's control paths (TLS, no client certificate)."""
    return httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_file)), timeout=10, trust_env=False)


@pytest.fixture(scope="module", params=KINDS)
def served(request: pytest.FixtureRequest, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    kind: str = request.param
    if kind.startswith("uvicorn"):
        http = {"uvicorn-h11": "H11Protocol", "uvicorn-httptools": "HttpToolsProtocol"}[kind]
        if not hasattr(uvicorn_protocols, http):
            pytest.skip(f"{http} needs its library (httptools)")
        app = Protected()
        with serve_asgi(app.asgi, **uvicorn_options(pki, http)) as url:
            yield Served(kind, int(url.rsplit(":", 1)[1]), app.set_policies, lambda: list(app.calls))
        return
    if not hasattr(os, "fork"):
        pytest.skip("gunicorn is POSIX-only")
    cert, key = pki.server_files
    options = ["--workers", "1", "--certfile", str(cert), "--keyfile", str(key)]
    options += ["--ca-certs", str(pki.ca_file), "--cert-reqs", str(int(ssl.CERT_OPTIONAL))]
    server = Gunicorn(
        {}, tmp_path_factory.mktemp("gunicorn") / "log", app="tests.server.istio_apps:wsgi_app", options=options
    )
    try:
        server.wait_ready()
        base = f"https://127.0.0.1:{server.port}"
        with control_client(pki) as control:

            def set_policies(text: str) -> None:
                assert control.post(base + CONTROL_POLICIES, content=text).status_code == 204, server.output()

            def calls() -> list[str]:
                answer: list[str] = control.get(base + CONTROL_CALLS).json()
                return answer

            yield Served(kind, server.port, set_policies, calls)
    finally:
        server.stop()


def caller_client(pki: Pki, port: int, caller: str, *, mode: str) -> Any:
    """A meshlib client for ``https://httpbin``, presenting ``caller``'s SVID (``anonymous``: none).

    The ``dev`` caller is configured with ``TLSSettings``, the others with ``MESHLIB_TLS_*`` settings."""
    environ = {"MESHLIB_SERVICE_HTTPBIN": f"static://127.0.0.1:{port}", "MESHLIB_TLS_CA_FILE": str(pki.ca_file)}
    kwargs: dict[str, Any] = {}
    if caller == "dev":
        cert, key = pki.callers[caller]
        kwargs["tls"] = TLSSettings(ca_file=str(pki.ca_file), cert_file=str(cert), key_file=str(key))
    elif caller != "anonymous":
        cert, key = pki.callers[caller]
        environ |= {"MESHLIB_TLS_CERT_FILE": str(cert), "MESHLIB_TLS_KEY_FILE": str(key)}
    factory = meshlib.Client if mode == "sync" else meshlib.AsyncClient
    return factory(environ=environ, **kwargs)


@pytest.fixture(scope="module")
def sync_clients(pki: Pki, served: Served) -> Iterator[Callable[[str], Any]]:
    """Sync clients of one server, cached per caller (keep-alive connections reused), closed before it stops."""
    cache: dict[str, Any] = {}

    def get(caller: str) -> Any:
        if caller not in cache:
            cache[caller] = caller_client(pki, served.port, caller, mode="sync")
        return cache[caller]

    yield get
    for client in cache.values():
        client.close()


@dataclass
class AsyncCallers:
    """Async clients of one server, cached per caller, on one event loop kept for the server's tests."""

    loop: asyncio.AbstractEventLoop
    clients: dict[str, Any]

    def request(self, caller: str, method: str, url: str, headers: dict[str, str]) -> Any:
        async def call() -> Any:
            return await self.clients[caller].request(method, url, headers=headers)

        return self.loop.run_until_complete(call())


@pytest.fixture(scope="module")
def async_callers(pki: Pki, served: Served) -> Iterator[AsyncCallers]:
    loop = asyncio.new_event_loop()

    async def make() -> dict[str, Any]:  # built inside the loop (anyio wants a running loop for some parts)
        return {caller: caller_client(pki, served.port, caller, mode="async") for caller in CALLERS}

    callers = AsyncCallers(loop, loop.run_until_complete(make()))
    try:
        yield callers
    finally:
        for client in callers.clients.values():
            loop.run_until_complete(client.aclose())
        loop.close()


# --- the table ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_istio_reference_example(
    case: Case, mode: str, served: Served, sync_clients: Callable[[str], Any], async_callers: AsyncCallers
) -> None:
    served.set_policies(case.policies.replace(PORT, str(served.port)))
    url = "https://httpbin" + case.path
    headers = dict(case.headers)
    if mode == "sync":
        response = sync_clients(case.caller).request(case.method, url, headers=headers)
    else:
        response = async_callers.request(case.caller, case.method, url, headers)

    peer = CALLERS[case.caller]
    assert response.status_code == case.expect, response.text
    if case.expect == 200:
        assert response.text == f"ran {peer}\n"  # the handler saw the verified SPIFFE ID (or none)
        assert served.calls() == [f"{case.method} {case.path} {peer}"]
    else:
        assert response.text == "RBAC: access denied\n"  # Envoy's words, whichever policy decided
        assert response.headers["content-type"].startswith("text/plain")
        assert served.calls() == [f"refused: {case.reason}"]  # refused before the application, by that policy
