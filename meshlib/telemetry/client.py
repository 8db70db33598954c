"""The telemetry of one client: which tracer and meters it reports to, and what a call reports when.

:class:`ClientTelemetry` is built once per ``meshlib.Client`` / ``AsyncClient`` (``tracer_provider=`` and
``meter_provider=`` arguments, else the global providers, picked up as soon as the application installs
them) and handed to its mesh. It is an *observer* of the call plan (:mod:`meshlib._plan`): the plan tells it
that a call started (:meth:`ClientTelemetry.call_started`), and gets back a :class:`CallTrace` to which it
reports the call's events (attempt started, attempt finished, call finished). Telemetry keeps its own state
there; nothing writes into the call. With nothing to record (no tracer, no meter) ``call_started`` returns
``None`` and the call reports nothing, so a client in an application without an OpenTelemetry SDK pays one
method call per request.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context

from meshlib.resilience.classify import Outcome, classify_exception
from meshlib.telemetry.metrics import GLOBAL_SOURCES, MeshMetrics, client_metrics_for, global_meter_provider_set
from meshlib.telemetry.tracing import (
    AttemptRecord,
    TracerSource,
    finish_call_span,
    method_attributes,
    start_attempt_span,
    start_call_span,
)

if TYPE_CHECKING:
    from meshlib.resilience.classify import Classification
    from meshlib.routing.decision import Routed
    from meshlib.routing.model import Rule

__all__ = ["CallTrace", "ClientTelemetry"]


class ClientTelemetry:
    """Where one client's spans and measurements go, and the hooks a call reports through.

    ``tracer_provider`` / ``meter_provider``: explicit providers (tests, applications with several), or
    ``None`` for the global ones. Metric *sinks* are the instrument sets measurements are recorded to: the
    meter provider's, plus the admin endpoint's when it serves ``/metrics`` (:meth:`add_sink`).
    """

    __slots__ = ("_global_pending", "_sinks", "_sources", "traces")

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.traces = TracerSource(tracer_provider)
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()
        sinks: list[MeshMetrics] = []
        self._global_pending = meter_provider is None or type(meter_provider).__name__ == "_ProxyMeterProvider"
        if self._global_pending:
            metrics.get_meter_provider()  # honour OTEL_PYTHON_METER_PROVIDER once, here
        else:
            found = client_metrics_for(meter_provider)
            if found is not None:
                sinks.append(found)
        self._sinks: tuple[MeshMetrics, ...] = tuple(sinks)

    # -- registration ----------------------------------------------------------------------------------------

    def bind(self, source: Any) -> None:
        """Let the observable instruments read ``source`` (a mesh transport), weakly, until :meth:`unbind`."""
        self._sources.add(source)
        if self._global_pending:
            GLOBAL_SOURCES.add(source)
        for sink in self._sinks:
            sink.sources.add(source)

    def unbind(self, source: Any) -> None:
        """Stop reporting ``source`` (its client closed)."""
        GLOBAL_SOURCES.discard(source)
        for sink in self._sinks:
            sink.sources.discard(source)
        self._sources.discard(source)

    def add_sink(self, sink: MeshMetrics) -> None:
        """Also record to ``sink`` (the admin endpoint's Prometheus instruments), and let it read our sources."""
        if sink not in self._sinks:
            self._sinks = (*self._sinks, sink)
            for source in list(self._sources):
                sink.sources.add(source)

    def remove_sink(self, sink: MeshMetrics) -> None:
        """Stop recording to ``sink``."""
        self._sinks = tuple(s for s in self._sinks if s is not sink)
        for source in list(self._sources):
            sink.sources.discard(source)

    def sinks(self) -> tuple[MeshMetrics, ...]:
        """The instrument sets to record to now (empty without a meter provider)."""
        if self._global_pending and global_meter_provider_set():
            self._global_pending = False
            found = client_metrics_for(None)
            if found is not None:
                self._sinks = (found, *self._sinks)
        return self._sinks

    # -- the events of a call ---------------------------------------------------------------------------------

    def fault(self, rule: str, name: str, kind: str) -> None:
        """A route's fault filter acted on a call: ``delay``, ``abort`` or ``skipped-max-active``."""
        for sink in self._sinks if not self._global_pending else self.sinks():
            sink.faults.add(1, {"meshlib.route": rule, "meshlib.fault": name, "meshlib.fault.kind": kind})

    def mirror(self, service: str, outcome: str) -> None:
        """A mirrored copy of a call ended (or was not sent): ``outcome`` says how."""
        for sink in self._sinks if not self._global_pending else self.sinks():
            sink.mirrors.add(1, {"meshlib.service": service, "meshlib.outcome": outcome})

    def call_started(self, request: Any) -> CallTrace | None:
        """A mesh call begins: its :class:`CallTrace` (span and measurement), or ``None`` with nothing to record."""
        tracer = self.traces.tracer()
        sinks = self._sinks if not self._global_pending else self.sinks()
        if tracer is None and not sinks:
            return None
        return CallTrace(self, tracer, sinks, request)


class CallTrace:
    """What telemetry keeps about one call, fed by the call plan's events; the plan only reads :attr:`context`.

    * ``attempt_started``/``attempt_finished`` -- keep an attempt's timestamps and verdict (tracing on), and
      write the previous attempt's span when a retry begins;
    * ``call_finished`` -- end the span with the outcome, and record ``http.client.request.duration``.
    """

    __slots__ = (
        "_method",
        "_record",
        "_request",
        "_route",
        "_running",
        "_sinks",
        "_started",
        "_tracer",
        "context",
        "span",
    )

    def __init__(
        self, owner: ClientTelemetry, tracer: trace.Tracer | None, sinks: tuple[MeshMetrics, ...], request: Any
    ) -> None:
        self._started = time.monotonic()
        self._request = request
        self._method = request.method
        self._tracer = tracer
        self._sinks = sinks
        self._record: AttemptRecord | None = None
        self._running: list[AttemptRecord] | None = None
        self._route: str | None = None
        self.span: trace.Span | None = None
        #: The context injected into each attempt's headers: the call span's, while tracing.
        self.context: Context | None = None
        if tracer is not None:
            self.span = start_call_span(tracer, request)
            self.context = trace.set_span_in_context(self.span)

    def routed(self, routed: Routed) -> None:
        """The call was routed: the rule (span and metric label), its path match, the backend, any fault."""
        rule = routed.rule
        self._route = rule.label
        span = self.span
        if span is None:
            return
        path = routed.match.path
        attributes: dict[str, str | int | float] = {
            "http.route": path.value,
            "meshlib.route": rule.route,
            "meshlib.route.rule": rule.name if rule.name else rule.index,
            "meshlib.backend": routed.backend.service or "",
        }
        if routed.delay_s is not None:
            attributes["meshlib.fault.delay_s"] = routed.delay_s
        if routed.abort_status is not None:
            attributes["meshlib.fault.abort"] = routed.abort_status
        span.set_attributes(attributes)

    def answered_locally(self, rule: Rule | None, why: str) -> None:
        """The routes answered the call themselves (``no-route``, ``redirect``, ``no-backend``)."""
        if rule is not None:
            self._route = rule.label
        span = self.span
        if span is None:
            return
        attributes: dict[str, str | int] = {"meshlib.local": why}
        if rule is not None:
            attributes["meshlib.route"] = rule.route
            attributes["meshlib.route.rule"] = rule.name if rule.name else rule.index
        span.set_attributes(attributes)

    def attempt_started(self, number: int, peer: tuple[str, int], *, hedge: bool = False) -> None:
        """(Tracing on.) A new attempt: write the previous one's span if it has ended, keep this one's timestamps.

        Hedged attempts overlap: one still running when the next starts is kept (:attr:`_running`) and its span
        written when the call ends.
        """
        if self.span is None:
            return
        previous = self._record
        if previous is not None:
            if previous.end_ns:
                self._attempt_span(previous)
            else:
                self._running = [*(self._running or ()), previous]
        self._record = AttemptRecord(number, time.time_ns(), peer, hedge=hedge)

    def attempt_finished(self, verdict: Classification | None, error: BaseException | None, number: int = 0) -> None:
        """Attempt ``number`` (default: the latest) ended: its verdict (``None``: cancelled) and exception."""
        record = self._record
        if record is not None and number and record.number != number:
            record = next((r for r in self._running or () if r.number == number), None)
        if record is not None:
            record.finish(verdict, error)

    def _attempt_span(self, record: AttemptRecord) -> None:
        if self._tracer is not None and self.context is not None:
            start_attempt_span(self._tracer, self.context, method_attributes(self._method)[0], record)

    def call_finished(
        self,
        response: Any,
        error: BaseException | None,
        *,
        attempts: int,
        peer: tuple[str, int] | None,
        verdict: Classification | None,
    ) -> None:
        """End the span and record the duration: the response headers arrived, or the call failed."""
        status = response.status_code if response is not None else None
        description: str | None = None
        if error is not None:
            error_type: str | None = type(error).__qualname__
            outcome = "failure"
            description = classify_exception(error).reason
        else:
            outcome = "success" if verdict is None or verdict.outcome is Outcome.SUCCESS else "failure"
            error_type = str(status) if status is not None and status >= 400 else None
            if error_type is not None and verdict is not None:
                description = verdict.reason
        span = self.span
        if span is not None:
            record = self._record
            if record is not None and attempts > 1:
                self._attempt_span(record)
            self._record = None
            running, self._running = self._running, None
            for earlier in running or ():  # hedged attempts that overlapped a later one
                self._attempt_span(earlier)
            finish_call_span(
                span,
                status_code=status,
                error_type=error_type,
                description=description,
                peer=peer,
                attempts=attempts,
            )
        if self._sinks:
            seconds = time.monotonic() - self._started
            url = self._request.url
            port = url.port or (443 if url.scheme == "https" else 80)
            method = method_attributes(self._method)[1]
            for sink in self._sinks:
                sink.record_call(
                    seconds,
                    host=url.host,
                    port=port,
                    method=method,
                    status=status,
                    error_type=error_type,
                    peer=peer,
                    outcome=outcome,
                    context=self.context,
                    route=self._route,
                )
