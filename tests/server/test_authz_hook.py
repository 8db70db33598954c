"""AuthorizationHook through a real uvicorn and a real WSGI server: denied requests get 403 and never reach the
handler; allowed ones do. The caller's identity comes from a test resolver (the TLS path is covered in
tests/security); the policies are Istio's reference examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshlib.security.authz import parse_policies
from meshlib.server.authz import AuthorizationHook
from meshlib.server.middleware import ASGIInboundMiddleware, PeerIdentityHook, WSGIInboundMiddleware
from tests.httplib import httpx
from tests.server.test_middleware import serve_asgi, serve_wsgi
from tests.server.test_refusal import asgi_app, ran, wsgi_app

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
"""

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
OTHER = "spiffe://cluster.local/ns/default/sa/other"


def hooks(authz: AuthorizationHook) -> tuple[Any, ...]:
    # The test's resolver reads the caller's SPIFFE ID from a header (TLS-verified in production).
    return (PeerIdentityHook(resolve=lambda request: request.header("x-test-peer")), authz)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_policies_allow_the_principal_deny_others_and_deny_admin_paths(kind: str, tmp_path: Path) -> None:
    ran.clear()
    path = tmp_path / "authz.yaml"
    path.write_text(POLICIES)
    authz = AuthorizationHook(file=str(path), reload_interval=0)
    serve = (
        serve_asgi(ASGIInboundMiddleware(asgi_app, hooks=hooks(authz)))
        if kind == "asgi"
        else serve_wsgi(WSGIInboundMiddleware(wsgi_app, hooks=hooks(authz)))
    )
    with serve as url, httpx.Client(base_url=url) as client:
        allowed = client.get("/orders", headers={"x-test-peer": SLEEP})
        other = client.get("/orders", headers={"x-test-peer": OTHER})
        anonymous = client.get("/orders")
        admin = client.get("/admin/users", headers={"x-test-peer": SLEEP})
    assert allowed.status_code == 200
    assert [other.status_code, anonymous.status_code, admin.status_code] == [403, 403, 403]
    assert admin.text == "RBAC: access denied\n"  # Envoy's words; the policy name is not told to the caller
    assert ran == ["/orders"]  # the handler ran for the allowed request only


def test_no_policy_allows_everyone() -> None:
    ran.clear()
    authz = AuthorizationHook(policies=parse_policies("", source="empty"))
    with serve_wsgi(WSGIInboundMiddleware(wsgi_app, hooks=hooks(authz))) as url, httpx.Client(base_url=url) as client:
        assert client.get("/anything").status_code == 200
    assert ran == ["/anything"]
