"""Client-side tracing with the OpenTelemetry API: one CLIENT span per logical mesh call, one child per attempt.

What a mesh call looks like in a trace, and why:

* **One CLIENT span per logical call** (``client.get("http://payments/charge")``), following the stable HTTP
  client semantic conventions: named after the method (``GET``; ``HTTP`` for unknown methods), with
  ``http.request.method``, ``server.address`` / ``server.port`` (the *logical* service, as the caller named
  it), ``url.full`` (credentials and signature-like query values redacted), and at the end
  ``http.response.status_code``, ``error.type``, ``network.peer.address`` / ``network.peer.port`` (the
  endpoint that answered) and ``http.request.resend_count`` (attempts - 1, when there were retries).
* **Child spans per attempt only when there was more than one** (``GET attempt``, INTERNAL): attempt number,
  endpoint, outcome and reason (the classifier's token: ``status-503``, ``connect-refused``...). A call that
  succeeds first time -- nearly all of them -- pays for one span, not two. The first attempt's span is
  written after the fact, from timestamps kept while it ran, once a second attempt starts.
* **The context sent to every endpoint is the logical span's.** Each endpoint's SERVER span is then a child
  of the CLIENT span, the pairing service-graph tools (Tempo, Jaeger SPM, the collector's servicegraph
  connector) look for; attempt spans are INTERNAL for the same reason.
* **Headers are injected with the globally configured propagators** (``opentelemetry.propagate.inject``:
  W3C ``traceparent``/``tracestate`` and ``baggage`` by default, B3 or X-Ray when the application installs
  them via ``OTEL_PROPAGATORS``), into the *outgoing endpoint request* only. Requests to hosts outside the
  mesh go through httpx untouched (unless listed in ``MESHLIB_PROPAGATE_TO``, see
  :mod:`meshlib.telemetry.propagation`).

**Without an SDK** (no tracer provider configured, the default), no span is created at all: meshlib only
propagates the context it runs in (say, a trace started by an upstream service and extracted by the inbound
middleware) -- *propagation only*, a dictionary check when there is nothing to propagate.

**With ``opentelemetry-instrumentation-httpx`` enabled**, that instrumentation wraps
``httpx.HTTPTransport.handle_request`` -- the very transports meshlib sends each attempt through -- and would
add a second CLIENT span per attempt and inject its own ``traceparent`` over meshlib's. When meshlib traces
a call itself, it sends each attempt with the instrumentation's documented suppression key
(``_SUPPRESS_HTTP_INSTRUMENTATION_KEY``, what ``suppress_http_instrumentation()`` sets; the wrapper checks
``is_http_instrumentation_enabled()`` first thing), so mesh calls get exactly meshlib's spans and one set of
headers, and every non-mesh request keeps the instrumentation's. When meshlib has no tracer, nothing is
suppressed: the instrumentation traces each attempt as it would for plain httpx, and its ``inject``
replaces (never duplicates) the headers meshlib propagated.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from meshlib.resilience.classify import Classification

__all__ = [
    "INSTRUMENTATION_NAME",
    "AttemptRecord",
    "TracerSource",
    "finish_call_span",
    "inject",
    "method_attributes",
    "redact_url",
    "start_attempt_span",
    "start_call_span",
    "suppressed_context",
]

#: The instrumentation scope name of every span and instrument meshlib creates.
INSTRUMENTATION_NAME = "meshlib"
#: The semantic-conventions version the attribute names follow (the stable HTTP conventions).
SCHEMA_URL = "https://opentelemetry.io/schemas/1.26.0"

#: Methods the HTTP semantic conventions know; anything else is reported as ``_OTHER``.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"})
#: Query parameters whose values the semantic conventions ask to redact from ``url.full`` (signed URLs).
REDACTED_QUERY_KEYS = frozenset({"awsaccesskeyid", "signature", "sig", "x-goog-signature"})
REDACTED = "REDACTED"

SUPPRESS_HTTP_KEY: str | None
try:  # the API keeps the key here; the HTTP instrumentations import it from the API too.
    from opentelemetry.context import _SUPPRESS_HTTP_INSTRUMENTATION_KEY as SUPPRESS_HTTP_KEY
except ImportError:  # pragma: no cover - an API without it: nothing to suppress
    SUPPRESS_HTTP_KEY = None


class TracerSource:
    """Where one client's tracer comes from: an explicit provider, or the global one once the app sets it.

    :meth:`tracer` is called once per request, so it must be cheap: with an explicit provider it returns a
    cached tracer; with the global one it checks whether the application has installed a provider yet (a
    module attribute read -- ``trace.get_tracer_provider()`` would cost 1.4 µs per call in its environment
    lookup) and caches the tracer from then on (the global provider can be set only once). ``None`` means
    "no SDK": propagation only. A ``NoOpTracerProvider``, or an SDK with ``OTEL_SDK_DISABLED``, counts as none.
    """

    __slots__ = ("_resolved", "_tracer")

    def __init__(self, provider: trace.TracerProvider | None = None) -> None:
        self._tracer: trace.Tracer | None = None
        self._resolved = False
        if provider is not None and not isinstance(provider, trace.ProxyTracerProvider):
            self._resolve(provider)
        else:
            # Honour OTEL_PYTHON_TRACER_PROVIDER (the API loads it on first use): once, here, not per request.
            trace.get_tracer_provider()

    def _resolve(self, provider: trace.TracerProvider) -> None:
        self._resolved = True
        if isinstance(provider, trace.NoOpTracerProvider):
            return
        tracer = provider.get_tracer(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)
        if not isinstance(tracer, trace.NoOpTracer):
            self._tracer = tracer

    def tracer(self) -> trace.Tracer | None:
        """The tracer to create spans with, or ``None`` when no tracer provider is configured."""
        if self._resolved:
            return self._tracer
        if _HAS_PRIVATE_GLOBAL and trace._TRACER_PROVIDER is None:  # inlined: this runs on every request
            return None
        if not _global_tracer_provider_set():
            return None
        self._resolve(trace.get_tracer_provider())
        return self._tracer


def _global_tracer_provider_set() -> bool:
    """Whether the application has installed a global tracer provider (cheaply; see :class:`TracerSource`)."""
    if _HAS_PRIVATE_GLOBAL:
        return trace._TRACER_PROVIDER is not None
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # pragma: no cover


_HAS_PRIVATE_GLOBAL = hasattr(trace, "_TRACER_PROVIDER")


def _version() -> str:
    from meshlib import __version__

    return __version__


def method_attributes(method: str) -> tuple[str, str]:
    """(span name, ``http.request.method`` value) for a request method, per the HTTP conventions."""
    if method in KNOWN_METHODS:
        return method, method
    return "HTTP", "_OTHER"


def redact_url(url: Any) -> str:
    """``url.full`` as the conventions want it: no user info, signature-like query values redacted."""
    if not url.userinfo and not url.query:
        return str(url)
    if url.userinfo:
        url = url.copy_with(username=None, password=None)
    if url.query:
        items = url.params.multi_items()
        if any(key.lower() in REDACTED_QUERY_KEYS for key, _ in items):
            params = [(key, REDACTED if key.lower() in REDACTED_QUERY_KEYS else value) for key, value in items]
            url = url.copy_with(params=params)
    return str(url)


def start_call_span(tracer: trace.Tracer, request: Any) -> trace.Span:
    """Start the CLIENT span of one logical mesh call (parented on the caller's current context)."""
    url = request.url
    name, method = method_attributes(request.method)
    port = url.port or (443 if url.scheme == "https" else 80)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "server.address": url.host,
        "server.port": port,
        "url.full": redact_url(url),
    }
    if method == "_OTHER":
        attributes["http.request.method_original"] = request.method
    return tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)


def finish_call_span(
    span: trace.Span,
    *,
    status_code: int | None,
    error_type: str | None,
    description: str | None,
    peer: tuple[str, int] | None,
    attempts: int,
) -> None:
    """Set the outcome attributes of a logical call's span and end it."""
    attributes: dict[str, str | int] = {}
    if status_code is not None:
        attributes["http.response.status_code"] = status_code
    if peer is not None:
        attributes["network.peer.address"] = peer[0]
        attributes["network.peer.port"] = peer[1]
    if attempts > 1:
        attributes["http.request.resend_count"] = attempts - 1
    if error_type is not None:
        attributes["error.type"] = error_type
        span.set_status(Status(StatusCode.ERROR, description))
    span.set_attributes(attributes)
    span.end()


class AttemptRecord:
    """What one attempt did, kept (only while tracing) until it is known whether it gets a span of its own."""

    __slots__ = ("end_ns", "error_type", "hedge", "number", "peer", "start_ns", "verdict")

    def __init__(self, number: int, start_ns: int, peer: tuple[str, int], *, hedge: bool = False) -> None:
        self.number = number
        self.hedge = hedge
        self.start_ns = start_ns
        self.peer = peer
        self.end_ns = 0
        self.verdict: Classification | None = None
        self.error_type: str | None = None

    def finish(self, verdict: Classification | None, error: BaseException | None) -> None:
        """Record the attempt's end: its verdict (``None`` when cancelled) and exception, if any."""
        self.end_ns = time.time_ns()
        self.verdict = verdict
        if error is not None:
            self.error_type = type(error).__qualname__
        elif verdict is not None and verdict.status is not None and verdict.status >= 400:
            self.error_type = str(verdict.status)


def start_attempt_span(
    tracer: trace.Tracer, parent: otel_context.Context, call_name: str, record: AttemptRecord
) -> None:
    """Write the INTERNAL span of one attempt of a retried call, with the timestamps it ran at."""
    verdict = record.verdict
    attributes: dict[str, str | int | bool] = {
        "meshlib.attempt": record.number,
        "http.request.resend_count": record.number - 1,
        "network.peer.address": record.peer[0],
        "network.peer.port": record.peer[1],
        "meshlib.outcome": verdict.outcome.value if verdict is not None else "cancelled",
        "meshlib.reason": verdict.reason if verdict is not None else "cancelled",
    }
    if verdict is not None and verdict.status is not None:
        attributes["http.response.status_code"] = verdict.status
    if record.error_type is not None:
        attributes["error.type"] = record.error_type
    if record.hedge:
        attributes["meshlib.hedge"] = True
    span = tracer.start_span(
        f"{call_name} attempt",
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes=attributes,
        start_time=record.start_ns,
    )
    if verdict is None or verdict.outcome.value != "success":
        span.set_status(Status(StatusCode.ERROR, attributes["meshlib.reason"]))  # type: ignore[arg-type]
    span.end(end_time=record.end_ns or None)


def inject(headers: MutableMapping[str, str], span_context: otel_context.Context | None) -> None:
    """Write the propagation headers of ``span_context`` (a call's span), or of the current context.

    With no span and an empty current context there is nothing to propagate, and no propagator is called:
    the common case of an application without tracing costs one dictionary check. With the default
    propagators (W3C trace context and baggage, unless ``OTEL_PROPAGATORS`` or ``set_global_textmap`` says
    otherwise) ``traceparent`` is formatted here, as ``TraceContextTextMapPropagator`` would, in a third of
    its time; any other propagator set is called as configured.
    """
    if span_context is None:
        span_context = otel_context.get_current()
        if not span_context:
            return
    textmap = propagate.get_global_textmap()
    if textmap is not _default_textmap[0] and not _is_default(textmap):
        textmap.inject(headers, context=span_context)
        return
    parent = trace.get_current_span(span_context).get_span_context()
    if parent.is_valid:
        headers["traceparent"] = f"00-{parent.trace_id:032x}-{parent.span_id:016x}-{parent.trace_flags:02x}"
        if parent.trace_state:
            headers["tracestate"] = parent.trace_state.to_header()
    if baggage.get_all(span_context):
        _BAGGAGE.inject(headers, context=span_context)


_BAGGAGE = W3CBaggagePropagator()
#: The global propagator last found to be the default W3C pair (compared by identity on each call).
_default_textmap: list[object] = [None]


def _is_default(textmap: object) -> bool:
    """Whether ``textmap`` is exactly the API's default: a composite of W3C trace context and W3C baggage."""
    members = getattr(textmap, "_propagators", None)  # CompositePropagator keeps them there
    if not isinstance(textmap, CompositePropagator) or members is None:
        return False
    if [type(member) for member in members] != [TraceContextTextMapPropagator, W3CBaggagePropagator]:
        return False
    _default_textmap[0] = textmap
    return True


def suppressed_context() -> otel_context.Context | None:
    """The current context plus the HTTP-instrumentation suppression key (``None`` if the API lacks it)."""
    if SUPPRESS_HTTP_KEY is None:  # pragma: no cover
        return None
    return otel_context.set_value(SUPPRESS_HTTP_KEY, True)


def send_suppressed(transport: Any, request: Any) -> Any:
    """``transport.handle_request(request)`` with HTTP instrumentations suppressed (meshlib traces it)."""
    token = otel_context.attach(suppressed_context() or otel_context.get_current())
    try:
        return transport.handle_request(request)
    finally:
        otel_context.detach(token)


async def asend_suppressed(transport: Any, request: Any) -> Any:
    """Async twin of :func:`send_suppressed`."""
    token = otel_context.attach(suppressed_context() or otel_context.get_current())
    try:
        return await transport.handle_async_request(request)
    finally:
        otel_context.detach(token)
