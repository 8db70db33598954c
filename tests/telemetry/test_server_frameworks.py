"""One SERVER span and one duration stream per request, whoever else traces (issue 10, item 19).

Real apps on uvicorn with in-memory SDK exporters: FastAPI with its native telemetry, Starlette with its
``OpenTelemetryMiddleware``, a Starlette app under the contrib ``opentelemetry-instrumentation-asgi``
middleware, and a plain Starlette app -- each with :class:`MeshMiddleware` inside. An outermost wrapper
counts finished requests, so every span and measurement of a request exists when the test looks (no sleeps).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware as ContribOpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.opentelemetry import OpenTelemetryMiddleware as StarletteOpenTelemetryMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshlib.errors import ConfigError
from meshlib.policy import current_deadline
from meshlib.server import DEADLINE_ATTRIBUTE, PEER_IDENTITY_ATTRIBUTE, MeshMiddleware, PeerIdentityHook
from tests.httplib import httpx
from tests.server.test_middleware import serve_asgi
from tests.telemetry.conftest import Metrics, Traces

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_ID = 0x00F067AA0BA902B7
HEADERS = {"traceparent": f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01", "grpc-timeout": "5S"}
CALLER = "spiffe://example.org/ns/shop/sa/front"
DURATIONS = ("http.server.request.duration", "http.server.duration")  # stable, and the contrib's default


class Finished:
    """Outermost ASGI wrapper: counts HTTP requests whose whole middleware stack has returned."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.count = 0
        self.condition = threading.Condition()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                with self.condition:
                    self.count += 1
                    self.condition.notify_all()

    def wait_for(self, count: int) -> None:
        with self.condition:
            assert self.condition.wait_for(lambda: self.count >= count, timeout=15), "requests not finished"


def handler_view() -> dict[str, Any]:
    """What the handler runs in: its trace and its deadline."""
    deadline = current_deadline()
    return {"trace_id": trace.get_current_span().get_span_context().trace_id, "deadline": deadline is not None}


async def item(request: Request) -> JSONResponse:
    return JSONResponse(handler_view())


def mesh(traces: Traces, metrics: Metrics, **options: Any) -> dict[str, Any]:
    """MeshMiddleware's options: the test providers, and a caller identity so its attribute can be checked."""
    return {
        "tracer_provider": traces.provider,
        "meter_provider": metrics.provider,
        "peer_identity": PeerIdentityHook(resolve=lambda request: CALLER),
        **options,
    }


def fastapi_app(traces: Traces, metrics: Metrics, **telemetry: Any) -> FastAPI:
    app = FastAPI(
        telemetry={
            "tracer_provider": traces.provider,
            "meter_provider": metrics.provider,
            "logs": False,
            "operation_spans": False,
            **telemetry,
        }
    )

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, Any]:
        return handler_view()

    return app


def run(app: Any, requests: int = 2) -> list[dict[str, Any]]:
    """Serve ``app`` on uvicorn, send ``requests`` requests with a traceparent and a deadline, await them all."""
    finished = Finished(app)
    with serve_asgi(finished) as url, httpx.Client(timeout=10) as client:
        bodies = []
        for _ in range(requests):
            response = client.get(url + "/items/7", headers=HEADERS)
            assert response.status_code == 200
            bodies.append(response.json())
        finished.wait_for(requests)
    return bodies


def server_spans(traces: Traces) -> list[ReadableSpan]:
    return [span for span in traces.spans() if span.kind is SpanKind.SERVER]


def duration_streams(metrics: Metrics) -> list[tuple[str, str, int]]:
    """(instrumentation scope, metric, count) of every server-duration data point collected."""
    data = metrics.reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name in DURATIONS:
                    found.extend((scope.scope.name, metric.name, point.count) for point in metric.data.data_points)
    return found


def assert_one_enriched_server_span_per_request(traces: Traces, scope: str, requests: int = 2) -> None:
    spans = server_spans(traces)
    assert len(spans) == requests
    for span in spans:
        assert span.instrumentation_scope is not None and span.instrumentation_scope.name == scope
        assert span.context.trace_id == TRACE_ID and span.parent is not None and span.parent.span_id == PARENT_ID
        assert span.attributes is not None
        assert span.attributes[DEADLINE_ATTRIBUTE] == 5.0
        assert span.attributes[PEER_IDENTITY_ATTRIBUTE] == CALLER


def test_fastapi_native_telemetry_keeps_the_only_span_and_duration(traces: Traces, metrics: Metrics) -> None:
    app = fastapi_app(traces, metrics)
    app.add_middleware(MeshMiddleware, **mesh(traces, metrics))
    bodies = run(app)
    assert bodies == [{"trace_id": TRACE_ID, "deadline": True}] * 2
    assert_one_enriched_server_span_per_request(traces, "fastapi")
    assert {span.attributes["http.route"] for span in server_spans(traces) if span.attributes} == {"/items/{item_id}"}
    assert duration_streams(metrics) == [("fastapi", "http.server.request.duration", 2)]


def test_fastapi_tracing_off_metrics_on_gets_meshlib_span_and_fastapi_duration(
    traces: Traces, metrics: Metrics
) -> None:
    app = fastapi_app(traces, metrics, tracing=False)
    app.add_middleware(MeshMiddleware, **mesh(traces, metrics))
    run(app)
    assert_one_enriched_server_span_per_request(traces, "meshlib")
    assert duration_streams(metrics) == [("fastapi", "http.server.request.duration", 2)]


def test_starlette_opentelemetry_middleware_keeps_its_span_meshlib_measures(traces: Traces, metrics: Metrics) -> None:
    app = Starlette(
        routes=[Route("/items/{item_id}", item)],
        middleware=[
            Middleware(StarletteOpenTelemetryMiddleware, tracer_provider=traces.provider),
            Middleware(MeshMiddleware, **mesh(traces, metrics)),
        ],
    )
    bodies = run(app)
    assert bodies == [{"trace_id": TRACE_ID, "deadline": True}] * 2
    assert_one_enriched_server_span_per_request(traces, "starlette")
    assert duration_streams(metrics) == [("meshlib", "http.server.request.duration", 2)]  # Starlette records none


def test_contrib_asgi_instrumentation_keeps_its_span_and_duration(traces: Traces, metrics: Metrics) -> None:
    inner = Starlette(
        routes=[Route("/items/{item_id}", item)], middleware=[Middleware(MeshMiddleware, **mesh(traces, metrics))]
    )
    app = ContribOpenTelemetryMiddleware(inner, tracer_provider=traces.provider, meter_provider=metrics.provider)
    bodies = run(app)
    assert bodies == [{"trace_id": TRACE_ID, "deadline": True}] * 2
    assert_one_enriched_server_span_per_request(traces, "opentelemetry.instrumentation.asgi")
    streams = duration_streams(metrics)
    assert len(streams) == 1 and streams[0][0] == "opentelemetry.instrumentation.asgi" and streams[0][2] == 2


def test_plain_starlette_gets_meshlib_span_and_duration(traces: Traces, metrics: Metrics) -> None:
    app = Starlette(
        routes=[Route("/items/{item_id}", item)], middleware=[Middleware(MeshMiddleware, **mesh(traces, metrics))]
    )
    bodies = run(app)
    assert bodies == [{"trace_id": TRACE_ID, "deadline": True}] * 2
    assert_one_enriched_server_span_per_request(traces, "meshlib")
    assert duration_streams(metrics) == [("meshlib", "http.server.request.duration", 2)]


def test_on_always_adds_meshlib_telemetry(traces: Traces, metrics: Metrics) -> None:
    app = fastapi_app(traces, metrics)
    app.add_middleware(MeshMiddleware, **mesh(traces, metrics, server_telemetry="on"))
    run(app, requests=1)
    assert sorted(s.instrumentation_scope.name for s in server_spans(traces) if s.instrumentation_scope) == [
        "fastapi",
        "meshlib",
    ]
    assert sorted(scope for scope, _, _ in duration_streams(metrics)) == ["fastapi", "meshlib"]


def test_off_from_the_environment_only_propagates(
    traces: Traces, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHLIB_SERVER_TELEMETRY", "OFF")
    app = Starlette(
        routes=[Route("/items/{item_id}", item)], middleware=[Middleware(MeshMiddleware, **mesh(traces, metrics))]
    )
    bodies = run(app, requests=1)
    assert bodies == [{"trace_id": TRACE_ID, "deadline": True}]  # the caller's trace still reaches the handler
    assert server_spans(traces) == [] and duration_streams(metrics) == []


def test_a_bad_mode_is_a_config_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLIB_SERVER_TELEMETRY", "both")
    with pytest.raises(ConfigError, match=r"MESHLIB_SERVER_TELEMETRY='both'.*auto, on, off"):
        MeshMiddleware(Starlette())
    monkeypatch.delenv("MESHLIB_SERVER_TELEMETRY")
    with pytest.raises(ConfigError, match=r"server_telemetry \(argument\)='yes'"):
        MeshMiddleware(Starlette(), server_telemetry="yes")


@pytest.fixture
def meshlib_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger="meshlib.server"):
        yield caplog


def test_wrapping_a_tracing_app_from_outside_is_reported(
    traces: Traces, metrics: Metrics, meshlib_warnings: pytest.LogCaptureFixture
) -> None:
    MeshMiddleware(fastapi_app(traces, metrics))
    MeshMiddleware(StarletteOpenTelemetryMiddleware(Starlette()))
    MeshMiddleware(fastapi_app(traces, metrics, tracing=False))  # nothing underneath traces: no warning
    MeshMiddleware(Starlette())
    messages = [record.getMessage() for record in meshlib_warnings.records]
    assert len(messages) == 2
    assert "fastapi.applications.FastAPI" in messages[0] and "app.add_middleware(MeshMiddleware)" in messages[0]
    assert "starlette.middleware.opentelemetry.OpenTelemetryMiddleware" in messages[1]
