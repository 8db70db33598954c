"""Retry pushback: in a chain A -> B -> C with C down, only B retries C; A does not retry B's answer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import meshlib
from meshlib.pushback import NO_RETRY_HEADER, begin_inbound, end_inbound, note_exhausted, should_mark
from meshlib.server import DeadlineMiddleware, WSGIDeadlineMiddleware
from meshlib.testing import Behavior
from tests.conftest import BackendFactory, static_target
from tests.server.test_middleware import serve_asgi, serve_wsgi

RETRIES = {"MESHLIB_RETRIES": "3", "MESHLIB_OUTLIER_FAILURES": "1000", "MESHLIB_BREAKER_FAILURES": "1000"}


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1]


def test_asgi_hop_marks_its_5xx_and_the_caller_does_not_retry(start_backends: BackendFactory) -> None:
    (service_c,) = start_backends(1, behavior=Behavior(status=503))

    async def handler(request: Request) -> Response:
        env = {"MESHLIB_SERVICE_C": static_target([service_c]), **RETRIES}
        async with meshlib.AsyncClient(environ=env) as client:
            answer = await client.get("http://c/")
        return Response(status_code=answer.status_code)

    with serve_asgi(DeadlineMiddleware(Starlette(routes=[Route("/", handler)]))) as url:
        env = {"MESHLIB_SERVICE_B": f"static://127.0.0.1:{_port(url)}", **RETRIES}
        with meshlib.Client(environ=env) as client:
            response = client.get("http://b/")
    assert response.status_code == 503
    assert response.headers[NO_RETRY_HEADER] == "1"
    assert response.extensions["meshlib.attempts"] == 1  # A did not retry: B already did
    assert service_c.count == 4  # B's first attempt and its 3 retries, once for A's single request


def test_pushback_propagates_through_every_hop(start_backends: BackendFactory) -> None:
    (service_d,) = start_backends(1, behavior=Behavior(status=503))

    def hop(next_target: str) -> Starlette:
        async def handler(request: Request) -> Response:
            async with meshlib.AsyncClient(environ={"MESHLIB_SERVICE_NEXT": next_target, **RETRIES}) as client:
                answer = await client.get("http://next/")
            return Response(status_code=answer.status_code)

        return Starlette(routes=[Route("/", handler)])

    with (
        serve_asgi(DeadlineMiddleware(hop(static_target([service_d])))) as c_url,
        serve_asgi(DeadlineMiddleware(hop(f"static://127.0.0.1:{_port(c_url)}"))) as b_url,
        meshlib.Client(environ={"MESHLIB_SERVICE_B": f"static://127.0.0.1:{_port(b_url)}", **RETRIES}) as client,
    ):
        response = client.get("http://b/")
    assert response.status_code == 503 and response.headers[NO_RETRY_HEADER] == "1"
    assert response.extensions["meshlib.attempts"] == 1
    assert service_d.count == 4  # only the hop next to the failure (C) retried: 1 + 3, not 4 x 4 x 4


def test_wsgi_hop_marks_its_5xx(start_backends: BackendFactory) -> None:
    (service_c,) = start_backends(1, behavior=Behavior(status=503))
    env_b = {"MESHLIB_SERVICE_C": static_target([service_c]), "MESHLIB_RETRIES": "1"}

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        with meshlib.Client(environ=env_b) as client:
            status = client.get("http://c/").status_code
        start_response(f"{status} Upstream", [("content-type", "text/plain")])
        return [b"upstream failed"]

    with serve_wsgi(WSGIDeadlineMiddleware(app)) as url:
        env = {"MESHLIB_SERVICE_B": f"static://127.0.0.1:{_port(url)}", **RETRIES}
        with meshlib.Client(environ=env) as client:
            response = client.get("http://b/")
    assert response.status_code == 503 and response.headers[NO_RETRY_HEADER] == "1"
    assert response.extensions["meshlib.attempts"] == 1
    assert service_c.count == 2


def test_an_unmarked_5xx_is_still_retried(start_backends: BackendFactory) -> None:
    bad, good = start_backends(2)
    bad.behavior = Behavior(status=503)
    with meshlib.Client(services={"b": static_target([bad, good])}, lb="round_robin") as client:
        assert all(client.get("http://b/").status_code == 200 for _ in range(4))


def test_a_marked_5xx_is_final(start_backends: BackendFactory) -> None:
    marked, good = start_backends(2)
    marked.behavior = Behavior(status=503, headers=((NO_RETRY_HEADER, "1"),))
    with meshlib.Client(services={"b": static_target([marked, good])}, lb="round_robin") as client:
        statuses = [client.get("http://b/").status_code for _ in range(4)]
    assert statuses.count(503) == 2  # round robin: every call that landed on the marked endpoint ended there
    assert marked.count == 2


def test_marks_only_5xx_and_only_inside_an_inbound_request() -> None:
    note_exhausted()  # no inbound request: nothing to record, nothing raised
    state, token = begin_inbound()
    try:
        assert not should_mark(state, 503)
        note_exhausted()
        assert should_mark(state, 503) and should_mark(state, 500)
        assert not should_mark(state, 404) and not should_mark(state, 200)
    finally:
        end_inbound(token)
