"""Inbound middleware on real servers: a request's deadline header becomes the handler's deadline scope.

ASGI: a Starlette app served by uvicorn on a loopback port; WSGI: wsgiref on a loopback port. The handlers
report ``current_deadline() - time.monotonic()``; we assert it is positive and no more than the budget the
header carried (never on elapsed time).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import uvicorn
from opentelemetry import baggage, trace
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshlib.policy import current_deadline, current_policy
from meshlib.server import (
    ASGIInboundMiddleware,
    DeadlineHook,
    DeadlineMiddleware,
    InboundRequest,
    MeshMiddleware,
    WSGIDeadlineMiddleware,
    WSGIInboundMiddleware,
    WSGIMeshMiddleware,
)
from meshlib.telemetry.inbound import header_problem
from tests.httplib import httpx


def remaining() -> float | None:
    deadline = current_deadline()
    return None if deadline is None else deadline - time.monotonic()


# --- ASGI: Starlette + uvicorn --------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn.Server that signals an event once started (or failed to), instead of being polled."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


@contextmanager
def serve_asgi(app: Any, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a loopback port; ``options`` go to ``uvicorn.Config``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(timeout=15), "uvicorn did not start"
        assert server.started, "uvicorn failed to start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


async def async_endpoint(request: Request) -> JSONResponse:
    await asyncio.sleep(0)
    return JSONResponse({"remaining": remaining(), "retries": current_policy().retries})


def sync_endpoint(request: Request) -> JSONResponse:  # Starlette runs it in a thread pool (context copied)
    return JSONResponse({"remaining": remaining()})


@pytest.fixture(scope="module")
def asgi_url() -> Iterator[str]:
    app = Starlette(
        routes=[Route("/async", async_endpoint), Route("/sync", sync_endpoint)],
        middleware=[Middleware(DeadlineMiddleware)],
    )
    with serve_asgi(app) as url:
        yield url


@pytest.mark.parametrize("path", ["/async", "/sync"])
@pytest.mark.parametrize(
    ("header", "value", "budget"),
    [
        ("grpc-timeout", "5S", 5.0),
        ("grpc-timeout", "750m", 0.75),
        ("x-envoy-upstream-rq-timeout-ms", "2000", 2.0),
        ("x-envoy-expected-rq-timeout-ms", "3000", 3.0),
    ],
)
def test_asgi_handler_sees_a_deadline_within_the_incoming_budget(
    asgi_url: str, path: str, header: str, value: str, budget: float
) -> None:
    response = httpx.get(asgi_url + path, headers={header: value}, timeout=10)
    assert response.status_code == 200
    left = response.json()["remaining"]
    assert left is not None
    assert 0 < left <= budget


def test_asgi_smallest_header_wins(asgi_url: str) -> None:
    headers = {"grpc-timeout": "20S", "x-envoy-expected-rq-timeout-ms": "4000"}
    left = httpx.get(asgi_url + "/async", headers=headers, timeout=10).json()["remaining"]
    assert 0 < left <= 4.0


@pytest.mark.parametrize("headers", [{}, {"grpc-timeout": "soon"}, {"x-envoy-upstream-rq-timeout-ms": "0"}])
def test_asgi_without_usable_header_sets_no_deadline(asgi_url: str, headers: dict[str, str]) -> None:
    body = httpx.get(asgi_url + "/async", headers=headers, timeout=10).json()
    assert body == {"remaining": None, "retries": None}


def test_asgi_scope_does_not_leak_between_requests(asgi_url: str) -> None:
    with httpx.Client(timeout=10) as client:  # one keep-alive connection: same server task/connection
        assert client.get(asgi_url + "/async", headers={"grpc-timeout": "1S"}).json()["remaining"] <= 1.0
        assert client.get(asgi_url + "/async").json()["remaining"] is None


# --- WSGI: wsgiref --------------------------------------------------------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)  # bound and listening
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=15)
        server.server_close()


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    left = remaining()
    if environ["PATH_INFO"] == "/stream":  # the body is produced after the app returned: still in scope

        def body() -> Iterator[bytes]:
            yield b"x"
            later = remaining()
            yield b"none" if later is None else repr(later).encode()

        start_response("200 OK", [("content-type", "text/plain")])
        return body()
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"none" if left is None else repr(left).encode()]


@pytest.fixture(scope="module")
def wsgi_url() -> Iterator[str]:
    with serve_wsgi(WSGIDeadlineMiddleware(wsgi_app)) as url:
        yield url


def _left(text: str) -> float | None:
    text = text.removeprefix("x")
    return None if text == "none" else float(text)


@pytest.mark.parametrize("path", ["/", "/stream"])
def test_wsgi_handler_sees_a_deadline_within_the_incoming_budget(wsgi_url: str, path: str) -> None:
    response = httpx.get(wsgi_url + path, headers={"grpc-timeout": "2500m"}, timeout=10)
    assert response.status_code == 200
    left = _left(response.text)
    assert left is not None
    assert 0 < left <= 2.5


def test_wsgi_scope_does_not_leak_into_the_next_request_on_the_same_thread(wsgi_url: str) -> None:
    # wsgiref serves every request on its one server thread: the second must not inherit the first's scope
    assert _left(httpx.get(wsgi_url, headers={"grpc-timeout": "1S"}, timeout=10).text) is not None
    assert _left(httpx.get(wsgi_url, timeout=10).text) is None
    assert _left(httpx.get(wsgi_url, headers={"grpc-timeout": "garbage"}, timeout=10).text) is None


# --- hooks: the extension point later tracing/metrics use -----------------------------------------------------


class Recorder:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def __call__(self, request: InboundRequest) -> AbstractContextManager[object]:
        return self._scope(request)

    @contextmanager
    def _scope(self, request: InboundRequest) -> Iterator[None]:
        self.log.append(f"{self.name} enter {request.method} {request.path} {request.header('X-Tag')}")
        try:
            yield
        except Exception as error:
            self.log.append(f"{self.name} error {error}")
            raise
        self.log.append(f"{self.name} exit")


@pytest.mark.anyio
async def test_asgi_hooks_run_in_order_and_see_errors() -> None:
    log: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        log.append(f"app {remaining() is not None}")
        if scope.get("path") == "/fail":
            raise RuntimeError("boom")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        pass

    wrapped = DeadlineMiddleware(app, hooks=[Recorder("a", log), Recorder("b", log)])
    scope = {"type": "http", "method": "GET", "path": "/ok", "headers": [(b"grpc-timeout", b"1S"), (b"x-tag", b"t")]}
    await wrapped(scope, receive, send)
    assert log == ["a enter GET /ok t", "b enter GET /ok t", "app True", "b exit", "a exit"]
    log.clear()
    with pytest.raises(RuntimeError):
        await wrapped({**scope, "path": "/fail"}, receive, send)
    assert log == ["a enter GET /fail t", "b enter GET /fail t", "app True", "b error boom", "a error boom"]
    log.clear()
    await wrapped({"type": "lifespan"}, receive, send)  # not an HTTP request: no hooks
    assert log == ["app False"]
    assert current_deadline() is None


def test_wsgi_hooks_exit_when_the_body_is_closed() -> None:
    log: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        def body() -> Iterator[bytes]:
            log.append("body")
            yield b"ok"

        start_response("200 OK", [])
        return body()

    wrapped = WSGIInboundMiddleware(app, hooks=[Recorder("a", log)])
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/p", "HTTP_X_TAG": "w"}
    body = wrapped(environ, lambda status, headers: None)
    assert log == ["a enter POST /p w"]
    assert list(body) == [b"ok"]
    assert log == ["a enter POST /p w", "body"]
    body.close()  # type: ignore[attr-defined]
    assert log == ["a enter POST /p w", "body", "a exit"]


def test_wsgi_hooks_see_app_errors() -> None:
    log: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise ValueError("bad")

    wrapped = WSGIInboundMiddleware(app, hooks=[Recorder("a", log)])
    with pytest.raises(ValueError):
        wrapped({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda status, headers: None)
    assert log == ["a enter GET / None", "a error bad"]


def test_deadline_hook_header_allowlist() -> None:
    hook = DeadlineHook(headers=["grpc-timeout"])

    class Req:
        method = "GET"
        path = "/"

        def header(self, name: str) -> str | None:
            return {"grpc-timeout": "9S", "x-envoy-upstream-rq-timeout-ms": "10"}.get(name)

    scope = hook(Req())
    assert scope is not None
    with scope:
        left = remaining()
        assert left is not None and 0.01 < left <= 9.0  # the untrusted 10 ms header was ignored
    with pytest.raises(ValueError, match="no deadline decoder"):
        DeadlineHook(headers=["x-deadline"])


def test_no_hooks_is_a_passthrough() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return [b"same"]

    assert WSGIInboundMiddleware(app)({}, lambda status, headers: None) == [b"same"]
    assert isinstance(ASGIInboundMiddleware(app).hooks, tuple)  # type: ignore[arg-type]


# --- oversized propagation and deadline headers (issue 10, item 17) --------------------------------------------

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT = f"00-{TRACE_ID:032x}-b7ad6b7169203331-01"
HUGE_BAGGAGE = "user=alice," + ",".join(f"k{i}={'v' * 100}" for i in range(10_000))  # ~1 MB, well-formed


def _context_report() -> dict[str, Any]:
    return {
        "baggage": dict(baggage.get_all()),
        "trace_id": trace.get_current_span().get_span_context().trace_id,
        "tracestate": trace.get_current_span().get_span_context().trace_state.to_header(),
        "remaining": remaining(),
    }


async def report_endpoint(request: Request) -> JSONResponse:
    return JSONResponse(_context_report())


def _logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(("meshlib", "opentelemetry"))]


def test_a_1mb_baggage_header_is_dropped_with_one_short_log_line(caplog: pytest.LogCaptureFixture) -> None:
    assert len(HUGE_BAGGAGE) > 1_000_000
    caplog.set_level(logging.DEBUG, logger="meshlib")
    caplog.set_level(logging.DEBUG, logger="opentelemetry")
    app = Starlette(routes=[Route("/", report_endpoint)], middleware=[Middleware(MeshMiddleware)])
    headers = {
        "traceparent": PARENT,
        "baggage": HUGE_BAGGAGE,
        "x-envoy-upstream-rq-timeout-ms": "7" * 1_000_000,  # ignored unread; the sane header still counts
        "grpc-timeout": "5S",
    }
    with serve_asgi(app, h11_max_incomplete_event_size=4 * 1024 * 1024) as url, httpx.Client(timeout=30) as client:
        bodies = [client.get(url + "/", headers=headers).json() for _ in range(3)]
    for body in bodies:
        assert body["baggage"] == {}  # nothing of it reached the handler
        assert body["trace_id"] == TRACE_ID  # the trace context, within limits, still did
        assert 0 < body["remaining"] <= 5.0
    records = _logged(caplog)
    assert sum(len(r.getMessage()) for r in records) < 2048
    warnings = [r.getMessage() for r in records if r.name == "meshlib.server"]
    assert len(warnings) == 1  # rate-limited: three drops, one line
    assert "baggage" in warnings[0] and "8192" in warnings[0] and "vvvv" not in warnings[0]


def test_over_limit_tracestate_is_dropped_and_the_trace_kept(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="opentelemetry")
    app = Starlette(routes=[Route("/", report_endpoint)], middleware=[Middleware(MeshMiddleware)])
    too_many = ",".join(f"v{i}=x" for i in range(33))
    good_baggage = "user=alice;ttl=5, tenant=acme%20corp"
    with serve_asgi(app) as url, httpx.Client(timeout=10) as client:
        dropped = client.get(url, headers={"traceparent": PARENT, "tracestate": too_many}).json()
        kept = client.get(url, headers={"traceparent": PARENT, "tracestate": "a=1,b=2", "baggage": good_baggage})
    assert dropped["trace_id"] == TRACE_ID and dropped["tracestate"] == ""
    assert kept.json()["tracestate"] == "a=1,b=2"
    assert kept.json()["baggage"]["tenant"] == "acme corp"
    assert not [r for r in _logged(caplog) if r.name.startswith("opentelemetry")]


def test_wsgi_drops_an_oversized_baggage_header(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="opentelemetry")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps(_context_report()).encode()]

    big = ",".join(f"k{i}={'v' * 50}" for i in range(1000))  # 56 KB: under wsgiref's 64 KB line limit
    with serve_wsgi(WSGIMeshMiddleware(app)) as url:
        body = httpx.get(url, headers={"traceparent": PARENT, "baggage": big}, timeout=10).json()
    assert body["baggage"] == {} and body["trace_id"] == TRACE_ID
    assert sum(len(r.getMessage()) for r in _logged(caplog)) < 2048  # the API alone would log all 56 KB


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("baggage", "user=alice;ttl=5;flag, tenant = acme%20corp,,", None),
        ("baggage", "k=" + "v" * 8191, "8193 bytes, more than 8192"),
        ("baggage", ",".join(f"k{i}=v" for i in range(181)), "more than 180 list-members"),
        ("baggage", "k=" + "v" * 4095 + ",a=b", "a list-member of 4097 bytes, more than 4096"),
        ("baggage", "user=alice,not-a-member", "list-member 2 is malformed"),
        ("baggage", "user=al ice", "list-member 1 is malformed"),
        ("baggage", "us\xe9r=x", "list-member 1 is malformed"),
        ("tracestate", ",".join(f"v{i}=x" for i in range(32)), None),
        ("tracestate", ",".join(f"v{i}=x" for i in range(33)), "33 list-members, more than 32"),
        ("tracestate", "a=" + "x" * 511, "513 characters, more than 512"),
        ("traceparent", PARENT, None),
        ("traceparent", "0" * 513, "513 characters, more than 512"),
        ("x-b3-traceid", "f" * 8193, "8193 characters, more than 8192"),
    ],
)
def test_header_limits(name: str, value: str, problem: str | None) -> None:
    assert header_problem(name, value) == problem
