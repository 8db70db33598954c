"""The inbound half on real servers: a Starlette app on uvicorn and a WSGI app on wsgiref, loopback.

A two-hop chain (test -> meshlib.Client -> uvicorn app -> meshlib.AsyncClient -> wsgiref app) must stay one
trace, each server span the child of its caller's CLIENT span; server metrics count the requests; the
peer's SPIFFE ID reaches the app from an explicit resolver (uvicorn exposes no client certificate), from
the ASGI TLS extension, and from a real mTLS connection on a WSGI server that exports the certificate.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import meshlib
from meshlib.security.identity import SpiffeId
from meshlib.server import (
    PEER_IDENTITY_KEY,
    InboundRequest,
    MeshMiddleware,
    PeerIdentityHook,
    WSGIMeshMiddleware,
    peer_identity,
)
from tests.httplib import httpx
from tests.security.pki import CA, server_context
from tests.server.test_middleware import serve_asgi, serve_wsgi
from tests.telemetry.conftest import Metrics, Traces, ids, traceparent

# --- the two-hop chain ----------------------------------------------------------------------------------------


def back_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """The second hop (WSGI): reports the trace context it runs in."""
    span = trace.get_current_span().get_span_context()
    start_response("200 OK", [("content-type", "application/json")])
    return [json.dumps({"trace_id": span.trace_id, "span_id": span.span_id}).encode()]


def front_app(back_url: str, traces: Traces, metrics: Metrics) -> Starlette:
    """The first hop (ASGI): calls the second through the mesh from an async endpoint."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        target = "static://" + back_url.removeprefix("http://")
        async with meshlib.AsyncClient(services={"back": target}, tracer_provider=traces.provider) as client:
            app.state.client = client
            yield

    async def front(request: Request) -> JSONResponse:
        answer = await request.app.state.client.get("http://back/hello")
        return JSONResponse(answer.json())

    async def fail(request: Request) -> JSONResponse:
        raise RuntimeError("front failed")

    return Starlette(
        routes=[Route("/front", front), Route("/fail", fail)],
        lifespan=lifespan,
        middleware=[_mesh_middleware(traces, metrics)],
    )


def _mesh_middleware(traces: Traces, metrics: Metrics, **options: Any) -> Any:
    from starlette.middleware import Middleware

    return Middleware(MeshMiddleware, tracer_provider=traces.provider, meter_provider=metrics.provider, **options)


@pytest.fixture
def chain(traces: Traces, metrics: Metrics) -> Iterator[str]:
    back = WSGIMeshMiddleware(back_app, tracer_provider=traces.provider, meter_provider=metrics.provider)
    with serve_wsgi(back) as back_url, serve_asgi(front_app(back_url, traces, metrics)) as front_url:
        yield front_url


def test_a_two_hop_chain_is_one_trace(chain: str, traces: Traces, metrics: Metrics) -> None:
    target = "static://" + chain.removeprefix("http://")
    tracer = traces.provider.get_tracer("test")
    with (
        meshlib.Client(services={"front": target}, tracer_provider=traces.provider) as client,
        tracer.start_as_current_span("test") as root,
    ):
        answer = client.get("http://front/front", timeout=10).json()
    spans = traces.wait_for(5)  # test, CLIENT, SERVER(front), CLIENT, SERVER(back)
    assert {s.context.trace_id for s in spans} == {root.get_span_context().trace_id}
    by_id = {s.context.span_id: s for s in spans}
    # Walk up from the innermost server span: SERVER(back) -> CLIENT -> SERVER(front) -> CLIENT -> test.
    back_server = by_id[answer["span_id"]]
    chain_kinds = []
    span = back_server
    while span.parent is not None:
        chain_kinds.append((span.kind, span.name))
        span = by_id[span.parent.span_id]
    assert span.name == "test"
    assert chain_kinds == [
        (SpanKind.SERVER, "GET"),
        (SpanKind.CLIENT, "GET"),
        (SpanKind.SERVER, "GET"),
        (SpanKind.CLIENT, "GET"),
    ]
    front_server = by_id[back_server.parent.span_id if back_server.parent else 0]
    assert front_server.kind is SpanKind.CLIENT and front_server.attributes is not None
    assert front_server.attributes["server.address"] == "back"
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert all(s.attributes is not None and s.attributes["http.response.status_code"] == 200 for s in servers)
    assert {s.attributes["url.path"] for s in servers if s.attributes} == {"/front", "/hello"}
    # Server golden signals: one request per hop, none left in flight.
    assert metrics.value("http.server.request.duration", **{"http.response.status_code": 200}) == 2
    assert metrics.value("http.server.active_requests") == 0
    assert metrics.value("http.client.request.duration") == 0  # the clients had no meter provider here


def test_an_app_error_is_an_error_server_span(chain: str, traces: Traces, metrics: Metrics) -> None:
    response = httpx.get(chain + "/fail", timeout=10)
    assert response.status_code == 500
    (server,) = [s for s in traces.wait_for(1) if s.kind is SpanKind.SERVER]
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None and server.attributes["error.type"] == "RuntimeError"
    assert metrics.value("http.server.request.duration", **{"error.type": "RuntimeError"}) == 1


def test_an_incoming_traceparent_becomes_the_parent(chain: str, traces: Traces) -> None:
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    answer = httpx.get(chain + "/front", headers={"traceparent": incoming}, timeout=10).json()
    assert answer["trace_id"] == 0x0AF7651916CD43DD8448EB211C80319C
    front = [
        s
        for s in traces.wait_for(3)
        if s.kind is SpanKind.SERVER and s.attributes and s.attributes["url.path"] == "/front"
    ]
    assert front[0].parent is not None and front[0].parent.span_id == 0xB7AD6B7169203331


def test_without_a_tracer_the_server_still_propagates() -> None:
    seen: list[str | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        context = trace.get_current_span().get_span_context()
        seen.append(traceparent(context.trace_id, context.span_id) if context.is_valid else None)
        start_response("204 No Content", [])
        return []

    wrapped = WSGIMeshMiddleware(app, tracer_provider=trace.NoOpTracerProvider())
    with serve_wsgi(wrapped) as url:
        incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        httpx.get(url, headers={"traceparent": incoming}, timeout=10)
        httpx.get(url, timeout=10)
    assert seen == [ids(incoming), None]


# --- peer identity --------------------------------------------------------------------------------------------


def _identity_app(traces: Traces, metrics: Metrics, hook: PeerIdentityHook) -> Starlette:
    async def whoami(request: Request) -> JSONResponse:
        found = peer_identity()
        in_scope = request.scope.get(PEER_IDENTITY_KEY)
        return JSONResponse({"peer": str(found) if found else None, "scope": str(in_scope) if in_scope else None})

    return Starlette(
        routes=[Route("/whoami", whoami)], middleware=[_mesh_middleware(traces, metrics, peer_identity=hook)]
    )


def _from_forwarded_certificate(request: InboundRequest) -> str | None:
    """An app behind a TLS-terminating proxy that verifies clients and forwards Envoy's XFCC header."""
    header = request.header("x-forwarded-client-cert")
    if header is None:
        return None
    fields = dict(part.split("=", 1) for part in header.split(";") if "=" in part)
    return fields.get("URI")


def test_peer_identity_from_an_explicit_resolver_on_uvicorn(traces: Traces, metrics: Metrics) -> None:
    app = _identity_app(traces, metrics, PeerIdentityHook(resolve=_from_forwarded_certificate))
    with serve_asgi(app) as url:
        xfcc = "By=spiffe://example.org/ns/pay/sa/api;URI=spiffe://example.org/ns/shop/sa/front"
        known = httpx.get(url + "/whoami", headers={"x-forwarded-client-cert": xfcc}, timeout=10).json()
        anonymous = httpx.get(url + "/whoami", timeout=10).json()
        malformed = httpx.get(url + "/whoami", headers={"x-forwarded-client-cert": "URI=http://x"}, timeout=10)
    assert known == {"peer": "spiffe://example.org/ns/shop/sa/front", "scope": "spiffe://example.org/ns/shop/sa/front"}
    assert anonymous == {"peer": None, "scope": None}
    assert malformed.json() == {"peer": None, "scope": None}


@pytest.mark.anyio
async def test_peer_identity_from_the_asgi_tls_extension() -> None:
    ca = CA("mesh CA", trust_domain="example.org")
    svid = ca.issue(uris=("spiffe://example.org/ns/shop/sa/front",))
    not_an_svid = ca.issue("client.example.org")
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((peer_identity(), scope.get(PEER_IDENTITY_KEY)))

    wrapped = MeshMiddleware(app, tracer_provider=trace.NoOpTracerProvider())

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        pass

    for leaf in (svid, not_an_svid, None):
        chain = [leaf.cert_pem.decode()] if leaf is not None else []
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [],
            "extensions": {"tls": {"client_cert_chain": chain}},
        }
        await wrapped(scope, receive, send)
    expected = SpiffeId.parse("spiffe://example.org/ns/shop/sa/front")
    assert seen == [(expected, expected), (None, None), (None, None)]
    assert peer_identity() is None  # nothing leaks out of the request


class _MutualTLSHandler(WSGIRequestHandler):
    """wsgiref's handler plus what Apache mod_ssl exports with ``SSLOptions +ExportCertData``."""

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        environ["HTTPS"] = "on"
        der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        if der:
            environ["SSL_CLIENT_CERT"] = ssl.DER_cert_to_PEM_cert(der)
        return environ

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_peer_identity_over_mutual_tls_on_a_wsgi_server(tmp_path: Path, traces: Traces) -> None:
    ca = CA("mesh CA", trust_domain="example.org")
    server_leaf = ca.issue("127.0.0.1", uris=("spiffe://example.org/ns/pay/sa/api",))
    client_leaf = ca.issue(uris=("spiffe://example.org/ns/shop/sa/front",))
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append((str(peer_identity()), environ["wsgi.url_scheme"]))
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    wrapped = WSGIMeshMiddleware(app, tracer_provider=traces.provider)
    server: WSGIServer = make_server("127.0.0.1", 0, wrapped, handler_class=_MutualTLSHandler)
    server.socket = server_context(server_leaf, tmp_path, client_ca=ca).wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cert, key = client_leaf.write(tmp_path, "client")
        ca_file = ca.write(tmp_path / "ca.pem")
        client_context = ssl.create_default_context(cafile=str(ca_file))
        client_context.load_cert_chain(cert, key)
        response = httpx.get(f"https://127.0.0.1:{server.server_port}/", verify=client_context, timeout=10)
    finally:
        server.shutdown()
        thread.join(timeout=15)
        server.server_close()
    assert response.status_code == 200
    assert seen == [("spiffe://example.org/ns/shop/sa/front", "https")]
    (span,) = traces.wait_for(1)
    assert span.attributes is not None and span.attributes["url.scheme"] == "https"
