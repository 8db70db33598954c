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
framework's router, so the route template is not known.

**One SERVER span per request** (``MESHLIB_SERVER_TELEMETRY``, default ``auto``). Frameworks now trace on
their own -- FastAPI's native telemetry, Starlette's ``OpenTelemetryMiddleware``, the contrib
``opentelemetry-instrumentation-asgi``/``-fastapi``/``-wsgi`` middleware -- and all of them run *outside* the
application's own middleware. So when the hooks run and a recording SERVER span is already current, the
framework owns the request: ``auto`` creates no second span and attaches no extracted context over it (the
deadline and identity hooks add their ``meshlib.*`` attributes to the framework's span instead), and skips
``http.server.*`` metrics when the framework records them for this request (FastAPI native with its metrics
on, any ``opentelemetry.instrumentation.*`` middleware; Starlette's records none). ``on`` always makes
meshlib's own span and metrics (the behaviour before; duplicates are then possible); ``off`` never does
(the extracted context is still attached when no framework span is current, so the trace is not broken).

**Bounded extraction.** Inbound headers come from anyone. Before a propagator sees them, ``traceparent``
(512 characters, as the OpenTelemetry API), ``tracestate`` (W3C Trace Context: 32 list-members; 512
characters, the length the spec asks every vendor to propagate), ``baggage`` (W3C Baggage: 8192 bytes, 180
list-members of at most 4096 bytes, each well-formed) and any other header a propagator asks for (8192) are
checked whole; one over a limit is dropped entirely -- never cut in the middle of a member -- and reported in
at most one ``meshlib.server`` warning a minute per middleware, giving the header's name and size, never
its value. The OpenTelemetry API would otherwise log an oversized ``baggage`` header's whole value, each
request (a 1 MB header, 1 MB of log).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from meshlib._config.env import server_telemetry_from_env
from meshlib.telemetry.metrics import (
    ServerMetrics,
    global_meter_provider_set,
    process_server_sinks,
    server_metrics_for,
)
from meshlib.telemetry.tracing import TracerSource, method_attributes

if TYPE_CHECKING:
    from meshlib.server.middleware import InboundRequest

__all__ = [
    "BAGGAGE_MAX_BYTES",
    "BAGGAGE_MAX_MEMBERS",
    "BAGGAGE_MAX_MEMBER_BYTES",
    "HEADER_MAX_LENGTH",
    "TRACEPARENT_MAX_LENGTH",
    "TRACESTATE_MAX_LENGTH",
    "TRACESTATE_MAX_MEMBERS",
    "ServerMetricsHook",
    "ServerSinks",
    "ServerTraceHook",
    "framework_records_metrics",
    "annotate_server_span",
    "current_server_span",
    "header_problem",
]

logger = logging.getLogger("meshlib.server")

#: ``traceparent``: version 00 is 55 characters; the OpenTelemetry API refuses more than 512 (future versions).
TRACEPARENT_MAX_LENGTH = 512
#: ``tracestate``: W3C Trace Context allows at most 32 list-members; vendors must propagate at least 512
#: characters, and meshlib takes no more.
TRACESTATE_MAX_LENGTH = 512
TRACESTATE_MAX_MEMBERS = 32
#: ``baggage``: the W3C Baggage limits the OpenTelemetry API applies (header bytes, list-members, member bytes).
BAGGAGE_MAX_BYTES = 8192
BAGGAGE_MAX_MEMBERS = 180
BAGGAGE_MAX_MEMBER_BYTES = 4096
#: Any other header a configured propagator reads (B3, Jaeger, X-Ray...).
HEADER_MAX_LENGTH = 8192
#: Dropped headers are reported at most once per this many seconds (per middleware).
REPORT_INTERVAL = 60.0

# W3C Baggage list-member: key OWS "=" OWS value *(OWS ";" OWS property); key and property keys are RFC 9110
# tokens; values are baggage-octets (percent-encoding included). Whitespace only around "=" and ";", between
# disjoint character classes, so matching is linear.
_OWS = r"[ \t]*"
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_BAGGAGE_VALUE = r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_BAGGAGE_MEMBER = re.compile(
    rf"{_TOKEN}{_OWS}={_OWS}{_BAGGAGE_VALUE}(?:{_OWS};{_OWS}{_TOKEN}(?:{_OWS}={_OWS}{_BAGGAGE_VALUE})?)*"
)


def header_problem(name: str, value: str) -> str | None:
    """Why inbound header ``name`` (lower case) must not reach a propagator, or ``None`` when it may.

    The reason gives sizes and limits only, never the value (it came from the client).
    """
    size = len(value)  # header values are latin-1 strings (ASGI bytes decoded, PEP 3333): one char per byte
    if name == "baggage":
        if size > BAGGAGE_MAX_BYTES:
            return f"{size} bytes, more than {BAGGAGE_MAX_BYTES}"
        members = 0
        for raw in value.split(","):
            member = raw.strip(" \t")
            if not member:
                continue
            members += 1
            if members > BAGGAGE_MAX_MEMBERS:
                return f"more than {BAGGAGE_MAX_MEMBERS} list-members"
            if len(member) > BAGGAGE_MAX_MEMBER_BYTES:
                return f"a list-member of {len(member)} bytes, more than {BAGGAGE_MAX_MEMBER_BYTES}"
            if _BAGGAGE_MEMBER.fullmatch(member) is None:
                return f"list-member {members} is malformed"
        return None
    if name == "tracestate":
        if size > TRACESTATE_MAX_LENGTH:
            return f"{size} characters, more than {TRACESTATE_MAX_LENGTH}"
        if value.count(",") >= TRACESTATE_MAX_MEMBERS:
            members = sum(1 for member in value.split(",") if member.strip(" \t"))
            if members > TRACESTATE_MAX_MEMBERS:
                return f"{members} list-members, more than {TRACESTATE_MAX_MEMBERS}"
        return None
    limit = TRACEPARENT_MAX_LENGTH if name == "traceparent" else HEADER_MAX_LENGTH
    if size > limit:
        return f"{size} characters, more than {limit}"
    return None


class _DropReport:
    """At most one warning per :data:`REPORT_INTERVAL` about dropped headers, counting the ones not reported."""

    __slots__ = ("_last", "_lock", "_unreported")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None
        self._unreported = 0

    def dropped(self, name: str, problem: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < REPORT_INTERVAL:
                self._unreported += 1
                return
            self._last = now
            unreported, self._unreported = self._unreported, 0
        logger.warning(
            "inbound %s header ignored: %s (reported at most once a minute; %d more dropped since the last report)",
            name,
            problem,
            unreported,
        )


class _RequestGetter(Getter["InboundRequest"]):
    """Reads propagation headers from an inbound request, whatever its protocol, within the limits above."""

    __slots__ = ("_report",)

    def __init__(self, report: _DropReport) -> None:
        self._report = report

    def get(self, carrier: InboundRequest, key: str) -> list[str] | None:
        value = carrier.header(key)
        if value is None:
            return None
        problem = header_problem(key.lower(), value)
        if problem is not None:
            self._report.dropped(key.lower(), problem)
            return None
        return [value]

    def keys(self, carrier: InboundRequest) -> list[str]:
        return carrier.header_names()


def current_server_span() -> trace.Span | None:
    """The recording SERVER span of the request being handled (the framework's or meshlib's), else ``None``.

    Frameworks and instrumentations trace outside the application's middleware, so a SERVER span current when
    the inbound hooks start is this request's (the contrib instrumentations' rule too: a current span means
    someone outside already traces). Spans without a ``kind`` (not the SDK's) are not taken for one.
    """
    span = trace.get_current_span()
    if span.is_recording() and getattr(span, "kind", None) is SpanKind.SERVER:
        return span
    return None


def framework_records_metrics(request: InboundRequest, span: trace.Span | None) -> bool:
    """Whether the framework records ``http.server.*`` metrics for this request itself.

    * a SERVER span of an ``opentelemetry.instrumentation.*`` scope: the contrib middleware (ASGI, WSGI,
      FastAPI, Starlette, Flask, Django) always records its server duration histogram;
    * FastAPI's native telemetry (``scope["fastapi.telemetry"]``, set while it handles the request) records
      them for HTTP requests unless its ``telemetry={"metrics": False}`` or it has no meter provider;
    * anything else (Starlette's ``OpenTelemetryMiddleware``, a custom span): no.
    """
    if span is not None:
        scope_name = getattr(getattr(span, "instrumentation_scope", None), "name", None) or ""
        if scope_name.startswith("opentelemetry.instrumentation."):
            return True
    scope = getattr(request, "scope", None)
    if isinstance(scope, Mapping) and scope.get("fastapi.telemetry") is not None:
        return _fastapi_records_metrics(scope)
    return False


def _fastapi_records_metrics(scope: Mapping[str, Any]) -> bool:
    """FastAPI's native metrics for this request: its config (``app._telemetry``) and meter provider."""
    if scope.get("type") != "http":
        return False  # FastAPI measures HTTP requests only
    config = getattr(scope.get("app"), "_telemetry", None)
    if not isinstance(config, Mapping):
        return True  # its default is on: rather no meshlib duplicate than a duplicate stream
    if not config.get("metrics", True):
        return False
    provider = config.get("meter_provider")
    if provider is None:
        if not global_meter_provider_set():
            return False
        provider = metrics.get_meter_provider()
    return not isinstance(provider, metrics.NoOpMeterProvider)


def annotate_server_span(key: str, value: str | float) -> None:
    """Set ``key`` on the request's SERVER span (:func:`current_server_span`), if there is one recording."""
    span = current_server_span()
    if span is not None:
        span.set_attribute(key, value)


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
    one the hook only propagates). ``mode``: ``auto``, ``on`` or ``off`` (default: ``MESHLIB_SERVER_TELEMETRY``,
    else ``auto``; see the module docstring): in ``auto`` and ``off`` a framework's SERVER span, current when
    the hook runs, is left as the request's span.
    """

    __slots__ = ("_getter", "_mode", "_traces")

    def __init__(self, tracer_provider: trace.TracerProvider | None = None, *, mode: str | None = None) -> None:
        self._traces = TracerSource(tracer_provider)
        self._mode = server_telemetry_from_env(mode)
        self._getter = _RequestGetter(_DropReport())

    def __call__(self, request: InboundRequest) -> AbstractContextManager[object] | None:
        if self._mode != "on" and current_server_span() is not None:
            return None  # the framework traces this request (and extracted the context itself)
        parent = propagate.extract(request, getter=self._getter)
        tracer = self._traces.tracer() if self._mode != "off" else None
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


class ServerSinks:
    """Where an inbound hook records: the instruments of ``meter_provider`` (default: the global provider, once
    the application sets one) plus the process's extra sinks (the admin endpoint's ``/metrics``, while one runs).

    :meth:`current` is a couple of attribute reads on the request path; the global provider's instruments are
    looked up until one is set, then kept.
    """

    __slots__ = ("_explicit", "_own")

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self._explicit = meter_provider is not None and type(meter_provider).__name__ != "_ProxyMeterProvider"
        sink = server_metrics_for(meter_provider) if self._explicit else None
        self._own: tuple[ServerMetrics, ...] = () if sink is None else (sink,)

    def current(self) -> tuple[ServerMetrics, ...]:
        """Every sink a measurement taken now goes to (possibly none)."""
        own = self._own
        if not own and not self._explicit and global_meter_provider_set():
            sink = server_metrics_for(None)
            self._own = own = () if sink is None else (sink,)
        extra = process_server_sinks()
        return (own + extra if extra else own) if own else extra


class ServerMetricsHook:
    """Inbound hook: ``http.server.request.duration`` and ``http.server.active_requests``.

    ``meter_provider``: where measurements go (default: the global provider, once the application sets it).
    The admin endpoint's ``/metrics``, while one runs in the process, gets them as well; with neither, the
    hook does nothing. ``mode`` as for :class:`ServerTraceHook`: in ``auto`` the hook records nothing for a
    request the framework measures itself (:func:`framework_records_metrics`).
    """

    __slots__ = ("_mode", "_sinks")

    def __init__(self, meter_provider: metrics.MeterProvider | None = None, *, mode: str | None = None) -> None:
        self._mode = server_telemetry_from_env(mode)
        self._sinks = ServerSinks(meter_provider)

    def __call__(self, request: InboundRequest) -> AbstractContextManager[object] | None:
        if self._mode == "off":
            return None
        if self._mode == "auto" and framework_records_metrics(request, current_server_span()):
            return None  # the framework measures this request: one duration stream, not two
        sinks = self._sinks.current()
        if not sinks:
            return None
        method = method_attributes(request.method.upper())[1]
        return _Measured(sinks, request, {"http.request.method": method, "url.scheme": request.scheme})
