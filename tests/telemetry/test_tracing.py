"""Client tracing end to end: real loopback backends record the headers meshlib sent; the SDK's in-memory
exporter records the spans. Spans follow the stable HTTP client conventions; the backend sees the call's span.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.propagators.textmap import Setter, TextMapPropagator, default_setter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

import meshlib
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target
from tests.httplib import LIBRARY, httpx
from tests.telemetry.conftest import Traces, ids, traceparent

MESH_HEADERS = ("traceparent", "tracestate", "baggage", "grpc-timeout")


def _env(backends: list[Backend], **settings: str) -> dict[str, str]:
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends)}
    env.update({f"MESHLIB_{key}": value for key, value in settings.items()})
    return env


def test_call_span_follows_the_http_client_conventions(start_backends: BackendFactory, traces: Traces) -> None:
    (backend,) = start_backends(1)
    tracer = traces.provider.get_tracer("test")
    with (
        meshlib.Client(environ=_env([backend]), tracer_provider=traces.provider) as client,
        tracer.start_as_current_span("handler") as parent,
    ):
        response = client.get("http://user:pw@payments/charge?order=7&sig=s3cret")
    assert response.status_code == 200
    (span,) = traces.spans("meshlib")
    assert span.kind is SpanKind.CLIENT
    assert span.name == "GET"
    assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id
    attributes = dict(span.attributes or {})
    assert attributes == {
        "http.request.method": "GET",
        "server.address": "payments",
        "server.port": 80,
        "url.full": "http://payments/charge?order=7&sig=REDACTED",
        "http.response.status_code": 200,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": backend.port,
    }
    assert span.status.status_code is StatusCode.UNSET
    # The endpoint received the call's span as its parent: its server span joins the same trace.
    (received,) = backend.requests
    assert ids(received.headers["traceparent"]) == traceparent(span.context.trace_id, span.context.span_id)


@pytest.mark.anyio
async def test_async_client_traces_the_same_way(start_backends: BackendFactory, traces: Traces) -> None:
    (backend,) = start_backends(1)
    async with meshlib.AsyncClient(environ=_env([backend]), tracer_provider=traces.provider) as client:
        response = await client.post("http://payments/charge", content=b"{}")
    assert response.status_code == 200
    (span,) = traces.spans("meshlib")
    assert span.name == "POST"
    assert span.parent is None  # no current span: the call starts the trace
    assert span.attributes is not None and span.attributes["network.peer.port"] == backend.port
    (received,) = backend.requests
    assert ids(received.headers["traceparent"]) == traceparent(span.context.trace_id, span.context.span_id)


def test_a_retried_call_has_one_span_per_attempt(start_backends: BackendFactory, traces: Traces) -> None:
    first, second = start_backends(2)
    env = _env([first, second], LB="round_robin", RETRIES="1")
    with meshlib.Client(environ=env, tracer_provider=traces.provider) as client:
        client.get("http://payments/warm-up")  # round robin: the next call starts on the other endpoint
        failing, healthy = (second, first) if first.count == 1 else (first, second)
        failing.behavior = Behavior(status=503)
        traces.clear()
        failing.reset()
        healthy.reset()
        response = client.get("http://payments/charge")
    assert response.status_code == 200
    assert response.extensions["meshlib.attempts"] == 2
    spans = traces.spans("meshlib")
    (call,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    attempts = sorted((s for s in spans if s.kind is SpanKind.INTERNAL), key=lambda s: s.start_time or 0)
    assert [s.name for s in attempts] == ["GET attempt", "GET attempt"]
    assert all(s.parent is not None and s.parent.span_id == call.context.span_id for s in attempts)
    one, two = (dict(s.attributes or {}) for s in attempts)
    assert one["meshlib.attempt"] == 1 and one["http.request.resend_count"] == 0
    assert one["network.peer.port"] == failing.port
    assert one["http.response.status_code"] == 503 and one["error.type"] == "503"
    assert one["meshlib.outcome"] == "retryable" and one["meshlib.reason"] == "status-503"
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert two["meshlib.attempt"] == 2 and two["http.request.resend_count"] == 1
    assert two["network.peer.port"] == healthy.port and two["meshlib.outcome"] == "success"
    assert "error.type" not in two
    assert (attempts[0].end_time or 0) <= (attempts[1].start_time or 0)
    assert call.attributes is not None
    assert call.attributes["http.request.resend_count"] == 1
    assert call.attributes["network.peer.port"] == healthy.port  # the endpoint that answered
    assert call.status.status_code is StatusCode.UNSET
    # Both endpoints received the logical span's context: one trace, the CLIENT span their parent.
    expected = traceparent(call.context.trace_id, call.context.span_id)
    assert [ids(r.headers["traceparent"]) for r in failing.requests + healthy.requests] == [expected, expected]


def test_a_call_that_fails_is_an_error_span(start_backends: BackendFactory, traces: Traces) -> None:
    (backend,) = start_backends(1)
    backend.refuse()
    with (
        meshlib.Client(environ=_env([backend], RETRIES="1"), tracer_provider=traces.provider) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get("http://payments/charge")
    spans = traces.spans("meshlib")
    (call,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert call.status.status_code is StatusCode.ERROR
    assert call.status.description == "connect-refused"
    assert call.attributes is not None and call.attributes["error.type"] == "ConnectError"
    assert "http.response.status_code" not in call.attributes
    assert len([s for s in spans if s.kind is SpanKind.INTERNAL]) == 2  # tried twice (same endpoint)


def test_a_final_error_status_is_an_error_span(start_backends: BackendFactory, traces: Traces) -> None:
    (backend,) = start_backends(1, Behavior(status=404))
    with meshlib.Client(environ=_env([backend]), tracer_provider=traces.provider) as client:
        assert client.get("http://payments/missing").status_code == 404
    (call,) = traces.spans("meshlib")
    assert call.status.status_code is StatusCode.ERROR  # client spans: 4xx are errors (HTTP conventions)
    assert call.attributes is not None and call.attributes["error.type"] == "404"


# --- propagation, and what never leaves the mesh ----------------------------------------------------------


@pytest.fixture
def remote_parent() -> Iterator[SpanContext]:
    """A current context as the inbound middleware leaves it: a remote parent span, plus baggage."""
    parent = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    ctx = baggage.set_baggage("tenant", "acme", trace.set_span_in_context(NonRecordingSpan(parent)))
    token = context.attach(ctx)
    yield parent
    context.detach(token)


def test_without_an_sdk_meshlib_only_propagates(start_backends: BackendFactory, remote_parent: SpanContext) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ=_env([backend]), tracer_provider=trace.NoOpTracerProvider()) as client:
        client.get("http://payments/charge")
    (received,) = backend.requests
    assert ids(received.headers["traceparent"]) == traceparent(remote_parent.trace_id, remote_parent.span_id)
    assert received.headers["baggage"] == "tenant=acme"


def test_nothing_to_propagate_sends_no_trace_headers(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ=_env([backend]), tracer_provider=trace.NoOpTracerProvider()) as client:
        client.get("http://payments/charge")
    (received,) = backend.requests
    assert "traceparent" not in received.headers and "baggage" not in received.headers


def test_no_mesh_headers_to_hosts_outside_the_mesh(
    start_backends: BackendFactory, traces: Traces, remote_parent: SpanContext
) -> None:
    mesh_backend, outside = start_backends(2)
    with (
        meshlib.Client(environ=_env([mesh_backend]), tracer_provider=traces.provider) as client,
        meshlib.policy(deadline=3.0),
    ):
        client.get("http://payments/charge")
        client.get(outside.url + "/elsewhere")  # a host that is not a mesh service
    (inside,) = mesh_backend.requests
    assert all(name in inside.headers for name in ("traceparent", "baggage", "grpc-timeout"))
    (sent_outside,) = outside.requests
    assert not [name for name in MESH_HEADERS if name in sent_outside.headers]
    assert len(traces.spans("meshlib")) == 1  # no span either: outside calls are plain httpx


@pytest.mark.anyio
async def test_propagate_to_lets_listed_outside_hosts_receive_mesh_headers(
    start_backends: BackendFactory, remote_parent: SpanContext
) -> None:
    listed, other = start_backends(2)
    env = {"MESHLIB_PROPAGATE_TO": "127.0.0.1"}
    async with meshlib.AsyncClient(environ=env, tracer_provider=trace.NoOpTracerProvider()) as client:
        with meshlib.policy(deadline=2.0):
            await client.get(listed.url + "/a")
        await client.get(other.url.replace("127.0.0.1", "localhost") + "/b")  # not listed
    (received,) = listed.requests
    assert ids(received.headers["traceparent"]) == traceparent(remote_parent.trace_id, remote_parent.span_id)
    assert received.headers["baggage"] == "tenant=acme"
    assert received.headers["grpc-timeout"].endswith(("m", "u", "n"))
    (unlisted,) = other.requests
    assert not [name for name in MESH_HEADERS if name in unlisted.headers]


def test_a_listed_hosts_redirect_does_not_carry_mesh_headers_on(
    start_backends: BackendFactory, remote_parent: SpanContext
) -> None:
    (elsewhere,) = start_backends(1, prefix="elsewhere")
    target = elsewhere.url.replace("127.0.0.1", "localhost") + "/landed"  # not listed
    (listed,) = start_backends(1, behavior=Behavior(status=302, body=b"", headers=(("location", target),)))
    env = {"MESHLIB_PROPAGATE_TO": "127.0.0.1"}
    with meshlib.Client(environ=env, follow_redirects=True) as client, meshlib.policy(deadline=2.0):
        request = client.build_request("GET", listed.url + "/go")
        assert client.send(request).status_code == 200
    (first,) = listed.requests
    assert all(name in first.headers for name in ("traceparent", "grpc-timeout"))  # the listed host gets them
    (landed,) = elsewhere.requests
    assert not [name for name in MESH_HEADERS if name in landed.headers]  # the redirect target does not
    assert not [name for name in MESH_HEADERS if name in request.headers]  # nor was the caller's request changed


# --- with opentelemetry-instrumentation-httpx enabled ---------------------------------------------------------


@pytest.fixture
def httpx_instrumented(traces: Traces) -> Iterator[None]:
    """The httpx instrumentation, enabled globally for one test (it patches httpx's transport classes)."""
    if LIBRARY != "httpx":
        pytest.skip("opentelemetry-instrumentation-httpx instruments httpx only")
    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=traces.provider)
    try:
        yield
    finally:
        instrumentor.uninstrument()


INSTRUMENTATION = "opentelemetry.instrumentation.httpx"


def _url(span: ReadableSpan) -> str:
    """The URL an httpx-instrumentation span records (old or new semantic conventions)."""
    attributes = span.attributes or {}
    return str(attributes.get("url.full") or attributes.get("http.url"))


def _trace_headers(backend: Backend) -> list[str]:
    return [ids(value) for request in backend.requests for name, value in request.raw_headers if name == "traceparent"]


def test_with_httpx_instrumentation_mesh_calls_get_only_meshlib_spans(
    start_backends: BackendFactory, traces: Traces, httpx_instrumented: None
) -> None:
    mesh_backend, outside = start_backends(2)
    with meshlib.Client(environ=_env([mesh_backend]), tracer_provider=traces.provider) as client:
        client.get("http://payments/charge")
        assert traces.spans(INSTRUMENTATION) == []  # suppressed for the mesh call...
        client.get(outside.url + "/elsewhere")
    (mesh_span,) = traces.spans("meshlib")
    (outside_span,) = traces.spans(INSTRUMENTATION)  # ...but still on for everything else
    assert f":{outside.port}/" in _url(outside_span)
    # One traceparent, meshlib's: nothing injected twice.
    assert _trace_headers(mesh_backend) == [traceparent(mesh_span.context.trace_id, mesh_span.context.span_id)]
    assert _trace_headers(outside) == [traceparent(outside_span.context.trace_id, outside_span.context.span_id)]


@pytest.mark.anyio
async def test_with_httpx_instrumentation_async_retries_get_only_meshlib_spans(
    start_backends: BackendFactory, traces: Traces, httpx_instrumented: None
) -> None:
    backend = start_backends(1, Behavior(status=503))[0]
    env = _env([backend], RETRIES="1")
    async with meshlib.AsyncClient(environ=env, tracer_provider=traces.provider) as client:
        assert (await client.get("http://payments/charge")).status_code == 503
    assert traces.spans(INSTRUMENTATION) == []
    spans = traces.spans("meshlib")
    assert sorted(s.kind.name for s in spans) == ["CLIENT", "INTERNAL", "INTERNAL"]
    (call,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    expected = traceparent(call.context.trace_id, call.context.span_id)
    assert _trace_headers(backend) == [expected, expected]


def test_with_httpx_instrumentation_and_meshlib_tracing_off_the_instrumentation_traces_attempts(
    start_backends: BackendFactory, traces: Traces, httpx_instrumented: None
) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ=_env([backend]), tracer_provider=trace.NoOpTracerProvider()) as client:
        client.get("http://payments/charge")
    assert traces.spans("meshlib") == []
    (attempt,) = traces.spans(INSTRUMENTATION)  # the instrumentation sees the endpoint request
    assert attempt.kind is SpanKind.CLIENT
    assert f":{backend.port}/" in _url(attempt)  # the endpoint's address, not the logical name
    assert _trace_headers(backend) == [traceparent(attempt.context.trace_id, attempt.context.span_id)]


class _TestPropagator(TextMapPropagator):
    """A propagator of its own format, as B3 or X-Ray would be: proves the global setting is honoured."""

    def inject(self, carrier: Any, context: Context | None = None, setter: Setter[Any] = default_setter) -> None:
        span = trace.get_current_span(context).get_span_context()
        setter.set(carrier, "x-test-trace", f"{span.trace_id:032x}:{span.span_id:016x}")

    def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
        return context or Context()

    @property
    def fields(self) -> set[str]:
        return {"x-test-trace"}


@pytest.fixture
def test_propagator() -> Iterator[None]:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(_TestPropagator())
    try:
        yield
    finally:
        propagate.set_global_textmap(previous)


def test_the_globally_configured_propagators_are_used(
    start_backends: BackendFactory, traces: Traces, test_propagator: None
) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ=_env([backend]), tracer_provider=traces.provider) as client:
        client.get("http://payments/charge")
    (span,) = traces.spans("meshlib")
    (received,) = backend.requests
    assert received.headers["x-test-trace"] == f"{span.context.trace_id:032x}:{span.context.span_id:016x}"
    assert "traceparent" not in received.headers  # W3C is not forced on a mesh that chose otherwise
