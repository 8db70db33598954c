"""The server half of tracing and metrics: hooks for the inbound middleware (:mod:`meshlib.server.middleware`).

* :class:`ServerTraceHook` extracts the caller's trace context and baggage with the global propagators
  (``opentelemetry.propagate.extract``), opens a SERVER span for the request (stable HTTP server conventions:
  ``http.request.method``, ``url.path``, ``url.scheme``, ``http.response.status_code``, ``error.type``,
  ``network.peer.*``, ``user_agent.original``) and makes it the current span while the app handles the
  request, so the mesh calls the handler makes are its children: one trace across hops. Without a tracer
  provider it still attaches the extracted context (*propagation only*), so a service without an SDK in the
  middle of a chain does not break the trace.
* :class:`ServerMetricsHook` records ``http.server.request.duration`` (histogram, seconds, semconv buckets)
  and ``http.server.active_requests`` (UpDownCounter) per method, scheme, status and error -- to its meter
  provider and, while a client in the same process runs the admin endpoint (``MESHLIB_ADMIN_ADDR``) with the
  Prometheus exporter, to that endpoint's instruments too (:func:`meshlib.telemetry.metrics.process_server_sinks`),
  so its ``/metrics`` shows the server side next to the client side.

A 5xx response or an exception escaping the app marks the span as an error (4xx are the client's errors, not
the server's, as the conventions say). The span is named after the method: the middleware runs before the
framework's router, so the route template is not known (an application that wants ``http.route`` can add it
with its own hook, or use the framework's OpenTelemetry instrumentation *instead of* this hook -- both would
create a SERVER span).
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshlib.telemetry.metrics import (
    ServerMetrics,
    global_meter_provider_set,
    process_server_sinks,
    server_metrics_for,
)
from meshlib.telemetry.tracing import TracerSource, method_attributes

if TYPE_CHECKING:
    from meshlib.server.middleware import InboundRequest

__all__ = ["ServerMetricsHook", "ServerTraceHook"]


class _RequestGetter(Getter["InboundRequest"]):
    """Reads propagation headers from an inbound request, whatever its protocol."""

    def get(self, carrier: InboundRequest, key: str) -> list[str] | None:
        value = carrier.header(key)
        return None if value is None else [value]

    def keys(self, carrier: InboundRequest) -> list[str]:
        return carrier.header_names()


_GETTER = _RequestGetter()


class _Attached(AbstractContextManager[None]):
    """Makes an extracted context current for the request (propagation only: no span)."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: otel_context.Context) -> None:
        self._context = context
        self._token: object = None

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._context)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]


class _ServerSpan(AbstractContextManager[trace.Span]):
    """The SERVER span of one request, current while the app runs; ended with the response status."""

    __slots__ = ("_parent", "_request", "_span", "_token", "_tracer")

    def __init__(self, tracer: trace.Tracer, parent: otel_context.Context, request: InboundRequest) -> None:
        self._tracer = tracer
        self._parent = parent
        self._request = request
        self._span: trace.Span = trace.INVALID_SPAN
        self._token: object = None

    def __enter__(self) -> trace.Span:
        request = self._request
        name, method = method_attributes(request.method.upper())
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "url.path": request.path,
            "url.scheme": request.scheme,
        }
        if method == "_OTHER":
            attributes["http.request.method_original"] = request.method
        peer = request.peer_address()
        if peer is not None:
            attributes["network.peer.address"] = peer[0]
            attributes["network.peer.port"] = peer[1]
            attributes["client.address"] = peer[0]
        agent = request.header("user-agent")
        if agent is not None:
            attributes["user_agent.original"] = agent
        span = self._tracer.start_span(name, context=self._parent, kind=SpanKind.SERVER, attributes=attributes)
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span, self._parent))
        return span

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        span = self._span
        try:
            status = self._request.status
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if exc is not None:
                span.set_attribute("error.type", type(exc).__qualname__)
                span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
            elif status is not None and status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        finally:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            span.end()


class ServerTraceHook:
    """Inbound hook: extract the caller's trace context, open a SERVER span, make it current.

    ``tracer_provider``: where spans go (default: the global provider, once the application sets it; without
    one the hook only propagates).
    """

    __slots__ = ("_traces",)

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._traces = TracerSource(tracer_provider)

    def __call__(self, request: InboundRequest) -> AbstractContextManager[object] | None:
        parent = propagate.extract(request, getter=_GETTER)
        tracer = self._traces.tracer()
        if tracer is None:
            return _Attached(parent) if parent else None
        return _ServerSpan(tracer, parent, request)


class _Measured(AbstractContextManager[None]):
    """Counts a request as active and records its duration when it ends, in every sink it started with."""

    __slots__ = ("_active", "_request", "_sinks", "_start")

    def __init__(self, sinks: tuple[ServerMetrics, ...], request: InboundRequest, active: dict[str, str]) -> None:
        self._sinks = sinks
        self._request = request
        self._active = active
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.monotonic()
        for sink in self._sinks:
            sink.active.add(1, self._active)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        seconds = time.monotonic() - self._start
        for sink in self._sinks:
            sink.active.add(-1, self._active)
        attributes: dict[str, str | int] = dict(self._active)
        status = self._request.status
        if status is not None:
            attributes["http.response.status_code"] = status
        if exc is not None:
            attributes["error.type"] = type(exc).__qualname__
        elif status is not None and status >= 500:
            attributes["error.type"] = str(status)
        for sink in self._sinks:
            sink.duration.record(seconds, attributes)


class ServerMetricsHook:
    """Inbound hook: ``http.server.request.duration`` and ``http.server.active_requests``.

    ``meter_provider``: where measurements go (default: the global provider, once the application sets it).
    The admin endpoint's ``/metrics``, while one runs in the process, gets them as well; with neither, the
    hook does nothing.
    """

    __slots__ = ("_explicit", "_own", "_provider")

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self._provider = meter_provider
        self._explicit = meter_provider is not None and type(meter_provider).__name__ != "_ProxyMeterProvider"
        sink = server_metrics_for(meter_provider) if self._explicit else None
        self._own: tuple[ServerMetrics, ...] = () if sink is None else (sink,)

    def _current(self) -> tuple[ServerMetrics, ...]:
        if not self._own and not self._explicit and global_meter_provider_set():
            sink = server_metrics_for(None)
            self._own = () if sink is None else (sink,)
        return self._own

    def __call__(self, request: InboundRequest) -> AbstractContextManager[object] | None:
        own, extra = self._current(), process_server_sinks()
        sinks = (own + extra if extra else own) if own else extra
        if not sinks:
            return None
        method = method_attributes(request.method.upper())[1]
        return _Measured(sinks, request, {"http.request.method": method, "url.scheme": request.scheme})
