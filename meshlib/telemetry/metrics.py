"""Metrics with the OpenTelemetry metrics API: the golden signals per service and endpoint, and the mesh's own.

Two kinds of instruments, chosen by what they cost on the request path:

* **One synchronous instrument per logical call**: ``http.client.request.duration`` (histogram, seconds, the
  semantic conventions' bucket boundaries given as ``explicit_bucket_boundaries_advisory``). Its count *is*
  the request count, and its attributes carry the outcome (``meshlib.outcome``), the error
  (``error.type``), the status code and the endpoint that answered, so request rate, errors and latency
  come from one measurement: an SDK histogram record costs several microseconds, a second instrument would
  double that for no new information.
* **Everything else is observed at collection time** from counters the mesh keeps anyway (the concurrency
  limit, endpoint stats, retry budget, breakers, outlier detector, discovery cache): in-flight requests
  (``http.client.active_requests``, an asynchronous UpDownCounter), attempts, retries, budget exhaustion,
  breaker openings, ejections, discovery refreshes and failures, endpoints per service. They cost nothing
  per request.

Instruments are created **once per meter provider**, not per client and never per request: an SDK returns
the first instrument for a repeated name and ignores the new callbacks, so several clients share one set
of instruments, and the observable callbacks walk every live client registered with it (weak references:
a client that is closed or collected drops out). Across clients, counters and in-flight counts add up;
endpoint counts and discovery age report the widest view. Names, units and attributes are documented in
``docs/observability.md``.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from opentelemetry import metrics
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, MeterProvider, Observation

from meshlib.resilience.breaker import STATE_OPEN
from meshlib.status import EndpointStatus, ServiceStatus
from meshlib.telemetry.tracing import INSTRUMENTATION_NAME, SCHEMA_URL, _version

__all__ = [
    "DURATION_BUCKETS",
    "MeshMetrics",
    "MetricSource",
    "ServerMetrics",
    "add_process_server_sink",
    "client_metrics_for",
    "global_meter_provider_set",
    "process_server_sinks",
    "remove_process_server_sink",
    "server_metrics_for",
]

#: The HTTP semantic conventions' advisory boundaries for ``http.{client,server}.request.duration`` (seconds).
DURATION_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

#: Bound on the per-client cache of attribute dictionaries (services x methods x statuses x endpoints).
_ATTRIBUTE_CACHE_SIZE = 4096

Attributes = dict[str, str | int | bool]
_Key = tuple[tuple[str, str | int | bool], ...]


class _Viewed(Protocol):
    def view(self) -> ServiceStatus: ...


class MetricSource(Protocol):
    """What observable instruments read: a mesh's services (``MeshTransport.services``), through their views."""

    @property
    def services(self) -> Mapping[str, _Viewed]: ...


def global_meter_provider_set() -> bool:
    """Whether the application has installed a global meter provider (a module attribute read)."""
    if _HAS_PRIVATE_GLOBAL:
        return metrics._internal._METER_PROVIDER is not None
    return type(metrics.get_meter_provider()).__name__ != "_ProxyMeterProvider"  # pragma: no cover


_HAS_PRIVATE_GLOBAL = hasattr(metrics, "_internal") and hasattr(metrics._internal, "_METER_PROVIDER")
#: Whether ``Histogram.record`` accepts ``context=`` (API >= 1.28): exemplars that point at the call's trace.
_RECORD_TAKES_CONTEXT = "context" in inspect.signature(Histogram.record).parameters


def _meter(provider: MeterProvider) -> Meter:
    return provider.get_meter(INSTRUMENTATION_NAME, _version(), schema_url=SCHEMA_URL)


class MeshMetrics:
    """meshlib's client instruments on one meter provider, shared by every client that reports to it.

    ``sources`` are the mesh transports the observable instruments read (weakly held).
    """

    def __init__(self, meter: Meter, sources: weakref.WeakSet[Any] | None = None) -> None:
        self.sources: weakref.WeakSet[Any] = sources if sources is not None else weakref.WeakSet()
        self._attributes: dict[tuple[object, ...], Attributes] = {}
        self.duration = meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of logical HTTP client calls through the mesh, all attempts and backoff included.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.faults = meter.create_counter(
            "meshlib.client.route.faults",
            unit="{fault}",
            description="Faults injected by route fault filters, by rule, filter and kind (delay, abort, "
            "skipped-max-active).",
        )
        self.mirrors = meter.create_counter(
            "meshlib.client.route.mirrors",
            unit="{request}",
            description="Mirrored requests by mirror service and outcome (sent, failed, dropped, skipped-streaming, "
            "skipped-unsafe).",
        )
        observed: tuple[tuple[str, str, str, Callable[[CallbackOptions], Iterable[Observation]]], ...] = (
            (
                "http.client.active_requests",
                "{request}",
                "Mesh calls in flight per service (until the response body is closed).",
                self._active_requests,
            ),
            (
                "meshlib.client.endpoint.active_requests",
                "{request}",
                "Attempts in flight per endpoint.",
                self._inflight,
            ),
        )
        for name, unit, description, callback in observed:
            meter.create_observable_up_down_counter(name, [callback], unit=unit, description=description)
        counted: tuple[tuple[str, str, str, Callable[[CallbackOptions], Iterable[Observation]]], ...] = (
            (
                "meshlib.client.attempts",
                "{attempt}",
                "Attempts sent per endpoint (first tries and retries).",
                self._attempts,
            ),
            (
                "meshlib.client.attempt.failures",
                "{attempt}",
                "Attempts per endpoint that failed (5xx, connection errors, timeouts).",
                self._attempt_failures,
            ),
            ("meshlib.client.retries", "{retry}", "Retries the retry budget allowed, per service.", self._retries),
            (
                "meshlib.client.retry_budget.exhausted",
                "{retry}",
                "Retries refused because the service's retry budget was empty.",
                self._budget_exhausted,
            ),
            (
                "meshlib.client.overloaded",
                "{request}",
                "Calls refused at the service's in-flight limit (MESHLIB_MAX_INFLIGHT, or the adaptive limit).",
                self._overloaded,
            ),
            (
                "meshlib.client.breaker.opens",
                "{transition}",
                "Circuit breaker transitions to open, per endpoint.",
                self._breaker_opens,
            ),
            (
                "meshlib.client.ejections",
                "{ejection}",
                "Outlier-detection ejections, per service and reason (consecutive, success-rate, failure-percentage).",
                self._ejections,
            ),
            (
                "meshlib.client.hedges.sent",
                "{hedge}",
                "Hedges sent (copies after the first), per service.",
                self._hedges,
            ),
            (
                "meshlib.client.hedges.won",
                "{hedge}",
                "Hedged calls whose accepted answer came from a hedge, per service.",
                self._hedges_won,
            ),
            (
                "meshlib.client.hedges.cancelled",
                "{attempt}",
                "Attempts of hedged calls cancelled because another attempt's answer was accepted, per service.",
                self._hedges_cancelled,
            ),
            (
                "meshlib.client.hedges.budget_exhausted",
                "{hedge}",
                "Hedges not sent because the hedge budget (max extra load) or the retry budget was empty.",
                self._hedges_exhausted,
            ),
            (
                "meshlib.client.discovery.refreshes",
                "{refresh}",
                "Discovery answers applied, per service.",
                self._discovery_refreshes,
            ),
            (
                "meshlib.client.discovery.failures",
                "{failure}",
                "Failed (or empty) discovery refreshes, per service.",
                self._discovery_failures,
            ),
        )
        for name, unit, description, callback in counted:
            meter.create_observable_counter(name, [callback], unit=unit, description=description)
        meter.create_observable_gauge(
            "meshlib.client.endpoints",
            [self._endpoints],
            unit="{endpoint}",
            description="Endpoints per service, by state: available, ejected (outlier detection), open (breaker).",
        )
        meter.create_observable_gauge(
            "meshlib.client.discovery.age",
            [self._discovery_age],
            unit="s",
            description="Seconds since the service's discovery source last answered.",
        )

    # -- the request path ------------------------------------------------------------------------------------

    def record_call(
        self,
        seconds: float,
        *,
        host: str,
        port: int,
        method: str,
        status: int | None,
        error_type: str | None,
        peer: tuple[str, int] | None,
        outcome: str,
        context: Context | None = None,
        route: str | None = None,
    ) -> None:
        """Record one logical call's duration with its attributes (dictionaries cached per combination).

        ``context`` (the call's span, when traced) lets an SDK with exemplars link the point to the trace;
        ``route`` is the matched route rule's label (low cardinality: bounded by the route table).
        """
        key = (host, port, method, status, error_type, peer, outcome, route)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {"http.request.method": method, "server.address": host, "server.port": port}
            if status is not None:
                attributes["http.response.status_code"] = status
            if error_type is not None:
                attributes["error.type"] = error_type
            if peer is not None:
                attributes["network.peer.address"] = peer[0]
                attributes["network.peer.port"] = peer[1]
            attributes["meshlib.outcome"] = outcome
            if route is not None:
                attributes["meshlib.route"] = route
            if len(self._attributes) >= _ATTRIBUTE_CACHE_SIZE:
                self._attributes.clear()
            self._attributes[key] = attributes
        if context is not None and _RECORD_TAKES_CONTEXT:
            self.duration.record(seconds, attributes, context=context)
        else:
            self.duration.record(seconds, attributes)

    # -- collection time -------------------------------------------------------------------------------------

    def _views(self) -> list[ServiceStatus]:
        """Every observed service's read model (``Service.view``), taken now."""
        return [service.view() for source in list(self.sources) for service in list(source.services.values())]

    @staticmethod
    def _emit(values: dict[_Key, float]) -> list[Observation]:
        return [Observation(value, dict(key)) for key, value in values.items()]

    def _per_service(
        self, value: Callable[[ServiceStatus], float], combine: Callable[[float, float], float]
    ) -> list[Observation]:
        values: dict[_Key, float] = {}
        for view in self._views():
            key: _Key = (("server.address", view.name),)
            found = value(view)
            values[key] = combine(values[key], found) if key in values else found
        return self._emit(values)

    def _per_endpoint(self, value: Callable[[EndpointStatus], float]) -> list[Observation]:
        values: dict[_Key, float] = {}
        for view in self._views():
            for endpoint in view.endpoints:
                key: _Key = (
                    ("server.address", view.name),
                    ("network.peer.address", endpoint.host),
                    ("network.peer.port", endpoint.port),
                )
                values[key] = values.get(key, 0) + value(endpoint)
        return self._emit(values)

    def _active_requests(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.budget.inflight, _add)

    def _inflight(self, options: CallbackOptions) -> list[Observation]:
        return self._per_endpoint(lambda e: e.inflight)

    def _attempts(self, options: CallbackOptions) -> list[Observation]:
        return self._per_endpoint(lambda e: e.requests)

    def _attempt_failures(self, options: CallbackOptions) -> list[Observation]:
        return self._per_endpoint(lambda e: e.failures)

    def _breaker_opens(self, options: CallbackOptions) -> list[Observation]:
        return self._per_endpoint(lambda e: e.breaker_opens)

    def _retries(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.budget.retries, _add)

    def _budget_exhausted(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.budget.exhausted, _add)

    def _overloaded(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.budget.overloaded, _add)

    def _ejections(self, options: CallbackOptions) -> list[Observation]:
        """Per service and ``meshlib.ejection.reason`` (the detector: ``consecutive``, ``success-rate``,
        ``failure-percentage``); summed over the reason it is the service's total."""
        values: dict[_Key, float] = {}
        for view in self._views():
            for reason, count in view.ejections_by_reason.items():
                key: _Key = (("server.address", view.name), ("meshlib.ejection.reason", reason))
                values[key] = values.get(key, 0) + count
        return self._emit(values)

    def _hedges(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.hedge.sent, _add)

    def _hedges_won(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.hedge.won, _add)

    def _hedges_cancelled(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.hedge.cancelled, _add)

    def _hedges_exhausted(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.hedge.budget_exhausted, _add)

    def _discovery_refreshes(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.discovery.refreshes, _add)

    def _discovery_failures(self, options: CallbackOptions) -> list[Observation]:
        return self._per_service(lambda v: v.discovery.failures, _add)

    def _discovery_age(self, options: CallbackOptions) -> list[Observation]:
        values: dict[_Key, float] = {}
        for view in self._views():
            age = view.discovery.age_s
            if age is not None:
                key: _Key = (("server.address", view.name),)
                values[key] = max(values.get(key, 0.0), age)
        return self._emit(values)

    def _endpoints(self, options: CallbackOptions) -> list[Observation]:
        values: dict[_Key, float] = {}
        for view in self._views():
            for state, count in endpoint_states(view).items():
                key: _Key = (("server.address", view.name), ("meshlib.endpoint.state", state))
                values[key] = max(values.get(key, 0), count)
        return self._emit(values)


def _add(a: float, b: float) -> float:
    return a + b


def endpoint_states(view: ServiceStatus) -> dict[str, int]:
    """How many endpoints of a service (its view) are available, ejected, or behind an open breaker."""
    counts = {"available": 0, "ejected": 0, "open": 0}
    for endpoint in view.endpoints:
        if endpoint.breaker == STATE_OPEN:
            counts["open"] += 1
        elif endpoint.ejected:
            counts["ejected"] += 1
        else:
            counts["available"] += 1
    return counts


class ServerMetrics:
    """The inbound middleware's instruments on one meter provider: server-side golden signals."""

    def __init__(self, meter: Meter) -> None:
        self.duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP server requests handled behind meshlib's inbound middleware.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.active = meter.create_up_down_counter(
            "http.server.active_requests", unit="{request}", description="HTTP server requests in progress."
        )
        self.authz = meter.create_counter(
            "meshlib.server.authz",
            unit="{request}",
            description="Inbound requests decided by authorization policies, by decision and deciding policy.",
        )
        self.rate_limited = meter.create_counter(
            "meshlib.server.rate_limited",
            unit="{request}",
            description="Inbound requests refused with 429 by a local rate limit, by the limit that refused them.",
        )


M = TypeVar("M")


class _PerProvider(Generic[M]):
    """One ``M`` (a set of instruments) per meter provider: explicit providers weakly, the global one once set."""

    def __init__(self, factory: Callable[[Meter], M]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._by_provider: weakref.WeakKeyDictionary[MeterProvider, M] = weakref.WeakKeyDictionary()
        self._global: M | None = None

    def get(self, provider: MeterProvider | None) -> M | None:
        """The instruments for ``provider`` (``None``: the global provider), or ``None`` if it is a no-op."""
        if provider is None or type(provider).__name__ == "_ProxyMeterProvider":
            if not global_meter_provider_set():
                return None
            with self._lock:
                if self._global is None:
                    real = metrics.get_meter_provider()
                    if isinstance(real, metrics.NoOpMeterProvider):
                        return None
                    self._global = self._factory(_meter(real))
                return self._global
        if isinstance(provider, metrics.NoOpMeterProvider):
            return None
        with self._lock:
            found = self._by_provider.get(provider)
            if found is None:
                found = self._by_provider[provider] = self._factory(_meter(provider))
            return found


#: Mesh transports that report to the global meter provider (read by its instruments once it exists).
GLOBAL_SOURCES: weakref.WeakSet[Any] = weakref.WeakSet()

_client_metrics: _PerProvider[MeshMetrics] = _PerProvider(MeshMetrics)
_global_client_metrics: _PerProvider[MeshMetrics] = _PerProvider(lambda meter: MeshMetrics(meter, GLOBAL_SOURCES))
_server_metrics: _PerProvider[ServerMetrics] = _PerProvider(ServerMetrics)


def client_metrics_for(provider: MeterProvider | None) -> MeshMetrics | None:
    """The shared client instruments of ``provider`` (``None``: the global one, once set; else ``None``)."""
    if provider is None or type(provider).__name__ == "_ProxyMeterProvider":
        return _global_client_metrics.get(None)
    return _client_metrics.get(provider)


def server_metrics_for(provider: MeterProvider | None) -> ServerMetrics | None:
    """The shared server instruments of ``provider`` (``None``: the global one, once set; else ``None``)."""
    return _server_metrics.get(provider)


class _ProcessServerSinks:
    """Server instruments every inbound metrics hook of this process records to besides its own provider's:
    the admin endpoint's (its ``/metrics``), while one runs. ``sinks`` is replaced, never mutated, so the
    request path reads it without a lock."""

    __slots__ = ("_lock", "sinks")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sinks: tuple[ServerMetrics, ...] = ()

    def add(self, sink: ServerMetrics) -> None:
        with self._lock:
            if sink not in self.sinks:
                self.sinks = (*self.sinks, sink)

    def remove(self, sink: ServerMetrics) -> None:
        with self._lock:
            self.sinks = tuple(found for found in self.sinks if found is not sink)


_PROCESS_SERVER_SINKS = _ProcessServerSinks()


def add_process_server_sink(sink: ServerMetrics) -> None:
    """Make every :class:`~meshlib.telemetry.inbound.ServerMetricsHook` in this process also record to ``sink``
    (the admin endpoint does, so its ``/metrics`` shows the inbound requests too)."""
    _PROCESS_SERVER_SINKS.add(sink)


def remove_process_server_sink(sink: ServerMetrics) -> None:
    """Stop recording to ``sink`` (requests in progress finish with the sinks they started with)."""
    _PROCESS_SERVER_SINKS.remove(sink)


def process_server_sinks() -> tuple[ServerMetrics, ...]:
    """The server instruments every inbound hook records to besides its own (a lock-free read)."""
    return _PROCESS_SERVER_SINKS.sinks
