"""RateLimitHook through a real uvicorn: a caller over its limit gets 429 with Retry-After while others pass, and a
meshlib client that gets the 429 backs off as told and succeeds. The caller's identity comes from a test resolver."""

from __future__ import annotations

from typing import Any

import meshlib
from meshlib.security.ratelimit import Limit, RateLimits
from meshlib.server.middleware import ASGIInboundMiddleware, PeerIdentityHook
from meshlib.server.ratelimit import RateLimitHook
from tests.httplib import httpx
from tests.server.test_middleware import serve_asgi
from tests.server.test_refusal import asgi_app, ran

FLOODER = "spiffe://cluster.local/ns/default/sa/flooder"
QUIET = "spiffe://cluster.local/ns/default/sa/quiet"


def app(limits: RateLimits) -> Any:
    hooks = (PeerIdentityHook(resolve=lambda request: request.header("x-test-peer")), RateLimitHook(limits))
    return ASGIInboundMiddleware(asgi_app, hooks=hooks)


def test_a_caller_over_its_limit_gets_429_with_retry_after_and_others_pass() -> None:
    ran.clear()
    limits = RateLimits(identity=Limit(0.5, burst=3))  # 3 at once, then one every 2 s, per caller
    with serve_asgi(app(limits)) as url, httpx.Client(base_url=url) as client:
        flood = [client.get("/x", headers={"x-test-peer": FLOODER}) for _ in range(10)]
        quiet = [client.get("/x", headers={"x-test-peer": QUIET}) for _ in range(3)]
    assert [r.status_code for r in flood] == [200] * 3 + [429] * 7
    assert {r.headers["retry-after"] for r in flood[3:]} <= {"1", "2"}
    assert [r.status_code for r in quiet] == [200] * 3
    assert len(ran) == 6  # refused requests never reached the handler


def test_a_meshlib_client_backs_off_on_429_and_succeeds() -> None:
    limits = RateLimits(identity=Limit(2, burst=1))  # one at once, the next after 0.5 s
    with serve_asgi(app(limits)) as url:
        env = {"MESHLIB_SERVICE_LIMITED": "static://" + url.removeprefix("http://"), "MESHLIB_RETRIES": "2"}
        with meshlib.Client(environ=env, headers={"x-test-peer": FLOODER}) as client:
            first = client.get("http://limited/x")
            second = client.get("http://limited/x")  # refused once (429, Retry-After: 1), then admitted
    assert first.status_code == 200
    assert second.status_code == 200
    assert second.extensions["meshlib.attempts"] == 2
