"""Authorization and rate limits wired into the whole inbound half (MeshMiddleware / WSGIMeshMiddleware), from
``MESHLIB_AUTHZ_FILE`` / ``MESHLIB_RATELIMIT_FILE`` or from code, through real uvicorn and a real WSGI server.

A refused request never reaches the app, still has its SERVER span (with the decision) and its duration, and is
counted by decision and policy (authorization) or by limit (rate limits). Bad settings fail at construction,
naming the variable. The caller's identity comes from a test resolver here (the mTLS path is covered in
tests/server/test_istio_examples.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanKind

import meshlib
from meshlib.security.authz import parse_policies
from meshlib.security.ratelimit import parse_rate_limits
from meshlib.server import MeshMiddleware, PeerIdentityHook, WSGIMeshMiddleware
from meshlib.server.authz import AuthorizationHook
from meshlib.server.middleware import mesh_hooks
from meshlib.server.ratelimit import RateLimitHook
from tests.httplib import httpx
from tests.server.test_middleware import serve_asgi, serve_wsgi
from tests.server.test_refusal import asgi_app, ran, wsgi_app
from tests.telemetry.conftest import Metrics, Traces

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend", "cluster.local/ns/shop/sa/batch"]}}]
"""

LIMITS = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: orders, namespace: shop}
spec:
  targetRef: {group: policy.linkerd.io, kind: Server, name: orders}
  identity: {requestsPerSecond: 1}
"""

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
BATCH = "spiffe://cluster.local/ns/shop/sa/batch"
STRANGER = "spiffe://cluster.local/ns/other/sa/stranger"


def by_header() -> PeerIdentityHook:
    # The test's resolver reads the caller's SPIFFE ID from a header (TLS-verified in production).
    return PeerIdentityHook(resolve=lambda request: request.header("x-test-peer"))


def points(metrics: Metrics, name: str) -> dict[tuple[tuple[str, Any], ...], int]:
    return {tuple(sorted(p.attributes.items())): p.value for p in metrics.points(name)}


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_authz_file_from_the_environment_is_enforced_traced_and_counted(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, traces: Traces, metrics: Metrics
) -> None:
    ran.clear()
    path = tmp_path / "authz.yaml"
    path.write_text(POLICIES)
    monkeypatch.setenv("MESHLIB_AUTHZ_FILE", str(path))
    monkeypatch.setenv("MESHLIB_INBOUND_RELOAD_INTERVAL", "0")
    options: dict[str, Any] = {
        "tracer_provider": traces.provider,
        "meter_provider": metrics.provider,
        "peer_identity": by_header(),
        "server_telemetry": "on",
    }
    served = (
        serve_asgi(MeshMiddleware(asgi_app, **options))
        if kind == "asgi"
        else serve_wsgi(WSGIMeshMiddleware(wsgi_app, **options))
    )
    with served as url, httpx.Client(base_url=url) as client:
        allowed = client.get("/orders", headers={"x-test-peer": FRONTEND})
        denied = client.get("/orders", headers={"x-test-peer": STRANGER})
        anonymous = client.get("/orders")
    assert allowed.status_code == 200
    assert (denied.status_code, anonymous.status_code) == (403, 403)
    assert denied.text == anonymous.text == "RBAC: access denied\n"
    assert ran == ["/orders"]  # the app ran for the allowed caller only

    spans = [s for s in traces.wait_for(3) if s.kind is SpanKind.SERVER]
    decisions = sorted(
        (
            str(s.attributes.get("meshlib.authz.decision")),
            str(s.attributes.get("meshlib.authz.policy")),
            s.attributes.get("http.response.status_code"),
        )
        for s in spans
        if s.attributes is not None
    )
    assert decisions == [("allow", "shop/allow-frontend", 200), ("deny", "None", 403), ("deny", "None", 403)]

    counted = points(metrics, "meshlib.server.authz")
    assert counted == {
        (("meshlib.authz.decision", "allow"), ("meshlib.authz.policy", "shop/allow-frontend")): 1,
        (("meshlib.authz.decision", "deny"),): 2,
    }
    statuses = sorted(
        dict(p.attributes).get("http.response.status_code") for p in metrics.points("http.server.request.duration")
    )
    assert statuses == [200, 403]  # refused requests are measured too (one series each)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_rate_limit_file_from_the_environment_refuses_with_429_and_counts_by_limit(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metrics: Metrics
) -> None:
    ran.clear()
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS)
    monkeypatch.setenv("MESHLIB_RATELIMIT_FILE", str(path))
    options: dict[str, Any] = {"meter_provider": metrics.provider, "peer_identity": by_header()}
    served = (
        serve_asgi(MeshMiddleware(asgi_app, **options))
        if kind == "asgi"
        else serve_wsgi(WSGIMeshMiddleware(wsgi_app, **options))
    )
    with served as url, httpx.Client(base_url=url) as client:
        first = client.get("/orders", headers={"x-test-peer": FRONTEND})
        flood = [client.get("/orders", headers={"x-test-peer": FRONTEND}) for _ in range(5)]
        other = client.get("/orders", headers={"x-test-peer": BATCH})
    assert first.status_code == 200 and other.status_code == 200
    refused = [r for r in flood if r.status_code == 429]
    assert refused, [r.status_code for r in flood]  # 1 rps with a 1 s burst: 6 back-to-back requests exceed it
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert len(ran) == 2 + len(flood) - len(refused)
    assert points(metrics, "meshlib.server.rate_limited") == {(("meshlib.ratelimit", "identity"),): len(refused)}


def test_authorization_runs_before_rate_limits_so_denied_callers_spend_no_budget() -> None:
    ran.clear()
    policies = parse_policies(POLICIES, source="test")
    limits = parse_rate_limits(
        LIMITS.replace("identity: {requestsPerSecond: 1}", "total: {requestsPerSecond: 1}"), source="test"
    )
    app = MeshMiddleware(
        asgi_app, peer_identity=by_header(), authz=policies, rate_limits=limits, server_telemetry="off"
    )
    with serve_asgi(app) as url, httpx.Client(base_url=url) as client:
        denied = [client.get("/orders", headers={"x-test-peer": STRANGER}).status_code for _ in range(5)]
        allowed = client.get("/orders", headers={"x-test-peer": FRONTEND})
    assert denied == [403] * 5  # never 429: the stranger is refused before the limiter counts it
    assert allowed.status_code == 200  # the total limit's budget is still there for an allowed caller
    assert ran == ["/orders"]


def test_mesh_hooks_order_and_explicit_hooks_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHLIB_AUTHZ_FILE", str(tmp_path / "missing.yaml"))  # would fail if it were read
    authz = AuthorizationHook(parse_policies(POLICIES, source="code"))
    limits = RateLimitHook(parse_rate_limits(LIMITS, source="code"))
    hooks = mesh_hooks(authz=authz, rate_limits=limits)
    names = [type(h).__name__ for h in hooks]
    assert names == [
        "ServerTraceHook",
        "ServerMetricsHook",
        "PeerIdentityHook",
        "AuthorizationHook",
        "RateLimitHook",
        "DeadlineHook",
    ]
    assert hooks[3] is authz and hooks[4] is limits
    monkeypatch.delenv("MESHLIB_AUTHZ_FILE")
    assert [type(h).__name__ for h in mesh_hooks()] == [
        "ServerTraceHook",
        "ServerMetricsHook",
        "PeerIdentityHook",
        "DeadlineHook",
    ]


def test_a_missing_authz_file_is_a_config_error_naming_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(meshlib.ConfigError) as caught:
        mesh_hooks(environ={"MESHLIB_AUTHZ_FILE": str(missing)})
    assert "MESHLIB_AUTHZ_FILE" in str(caught.value) and str(missing) in str(caught.value)


def test_an_invalid_authz_file_is_a_config_error_naming_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(POLICIES.replace("action: ALLOW", "action: PERMIT"))
    with pytest.raises(meshlib.ConfigError) as caught:
        mesh_hooks(environ={"MESHLIB_AUTHZ_FILE": str(path)})
    message = str(caught.value)
    assert str(path) in message and "action" in message and "PERMIT" in message


def test_an_invalid_rate_limit_file_and_interval_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(LIMITS.replace("requestsPerSecond: 1", "requestsPerSecond: -3"))
    with pytest.raises(meshlib.ConfigError) as caught:
        mesh_hooks(environ={"MESHLIB_RATELIMIT_FILE": str(path)})
    assert str(path) in str(caught.value) and "-3" in str(caught.value)
    with pytest.raises(meshlib.ConfigError) as bad_interval:
        mesh_hooks(environ={"MESHLIB_INBOUND_RELOAD_INTERVAL": "soon"})
    assert "MESHLIB_INBOUND_RELOAD_INTERVAL" in str(bad_interval.value) and "soon" in str(bad_interval.value)


def test_an_edited_authz_file_takes_effect_and_an_invalid_edit_keeps_the_last_good_policy(tmp_path: Path) -> None:
    ran.clear()
    path = tmp_path / "authz.yaml"
    path.write_text(POLICIES)
    hooks = mesh_hooks(
        peer_identity=by_header(),
        environ={"MESHLIB_AUTHZ_FILE": str(path), "MESHLIB_INBOUND_RELOAD_INTERVAL": "0"},
        server_telemetry="off",
    )
    authz = next(h for h in hooks if isinstance(h, AuthorizationHook))
    assert authz.source is not None
    from meshlib.server.middleware import ASGIInboundMiddleware

    with serve_asgi(ASGIInboundMiddleware(asgi_app, hooks=hooks)) as url, httpx.Client(base_url=url) as client:

        def status(peer: str) -> int:
            return client.get("/orders", headers={"x-test-peer": peer}).status_code

        assert (status(FRONTEND), status(BATCH)) == (200, 200)
        path.write_text(POLICIES.replace(', "cluster.local/ns/shop/sa/batch"', ""))
        assert authz.source.check_now()
        assert (status(FRONTEND), status(BATCH)) == (200, 403)  # batch is no longer allowed
        path.write_text(POLICIES.replace("action: ALLOW", "action: MAYBE"))
        authz.source.check_now()
        assert (status(FRONTEND), status(BATCH)) == (200, 403)  # the invalid version is refused: last good serves
        state = authz.status()
        assert state is not None and state.rejected is not None
    authz.close()


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_repeated_request_headers_are_matched_joined_as_envoy_presents_them(kind: str) -> None:
    ran.clear()
    policies = parse_policies(
        """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tagged}
spec:
  action: ALLOW
  rules:
  - when: [{key: "request.headers[x-tag]", values: ["one,two"]}]
""",
        source="test",
    )
    hooks = mesh_hooks(authz=policies, server_telemetry="off", environ={})
    from meshlib.server.middleware import ASGIInboundMiddleware, WSGIInboundMiddleware

    served = (
        serve_asgi(ASGIInboundMiddleware(asgi_app, hooks=hooks))
        if kind == "asgi"
        else serve_wsgi(WSGIInboundMiddleware(wsgi_app, hooks=hooks))
    )
    with served as url, httpx.Client(base_url=url) as client:
        both = client.get("/x", headers=[("x-tag", "one"), ("x-tag", "two")])
        first_only = client.get("/x", headers={"x-tag": "one"})
    assert (both.status_code, first_only.status_code) == (200, 403)
    assert ran == ["/x"]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_closing_the_middleware_stops_watching_the_policy_files(kind: str, tmp_path: Path) -> None:
    authz_path, limits_path = tmp_path / "authz.yaml", tmp_path / "limits.yaml"
    authz_path.write_text(POLICIES)
    limits_path.write_text(LIMITS)
    environ = {"MESHLIB_AUTHZ_FILE": str(authz_path), "MESHLIB_RATELIMIT_FILE": str(limits_path)}
    middleware = (
        MeshMiddleware(asgi_app, environ=environ) if kind == "asgi" else WSGIMeshMiddleware(wsgi_app, environ=environ)
    )
    sources = [h.source for h in middleware.hooks if isinstance(h, AuthorizationHook | RateLimitHook)]
    assert len(sources) == 2 and all(s is not None and s.watching for s in sources)
    middleware.close()
    assert all(s is not None and not s.watching for s in sources)
