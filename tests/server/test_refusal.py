"""A hook that refuses (403, 429) answers in place of the application, through real uvicorn and a real WSGI server.

The hooks entered before the refusing one stay entered and see the status on exit (so a refused request is traced
and counted); the application never runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from meshlib.server.middleware import ASGIInboundMiddleware, InboundRequest, Refusal, WSGIInboundMiddleware
from tests.httplib import httpx
from tests.server.test_middleware import serve_asgi, serve_wsgi


class Recorder:
    """An outer hook: notes each request's final status when it exits."""

    def __init__(self) -> None:
        self.statuses: list[int | None] = []

    def __call__(self, request: InboundRequest) -> Any:
        @contextmanager
        def scope() -> Iterator[None]:
            try:
                yield
            finally:
                self.statuses.append(request.status)

        return scope()


def gate(request: InboundRequest) -> None:
    if request.path.startswith("/denied"):
        raise Refusal(403, "RBAC: access denied (default/deny-admin)")
    if request.path.startswith("/limited"):
        raise Refusal(429, "rate limited (identity)", [("retry-after", "2")])


ran: list[str] = []


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":  # uvicorn runs with lifespan on in these tests
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    ran.append(scope["path"])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"handled"})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    ran.append(environ["PATH_INFO"])
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"handled"]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_refusing_hook_answers_and_the_app_never_runs(kind: str) -> None:
    ran.clear()
    recorder = Recorder()
    hooks = (recorder, gate)
    serve = (
        serve_asgi(ASGIInboundMiddleware(asgi_app, hooks=hooks))
        if kind == "asgi"
        else serve_wsgi(WSGIInboundMiddleware(wsgi_app, hooks=hooks))
    )
    with serve as url, httpx.Client(base_url=url) as client:
        denied = client.get("/denied/x")
        limited = client.get("/limited")
        allowed = client.get("/ok")
    assert (denied.status_code, denied.text) == (403, "RBAC: access denied (default/deny-admin)\n")
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "2")
    assert allowed.text == "handled"
    assert ran == ["/ok"]
    assert recorder.statuses == [403, 429, 200]
