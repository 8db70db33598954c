"""Fixtures for telemetry tests: SDK providers with in-memory exporters, passed explicitly to each client.

Nothing here touches the global tracer or meter provider: it can be set only once per process, so tests
that relied on it would depend on their order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


class _Ended(SpanProcessor):
    """Notifies waiters each time a span ends (servers end theirs after the response has gone out)."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.count = 0

    def on_end(self, span: ReadableSpan) -> None:
        with self.condition:
            self.count += 1
            self.condition.notify_all()


@dataclass
class Traces:
    provider: TracerProvider
    exporter: InMemorySpanExporter
    ended: _Ended

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReadableSpan]:
        """The finished spans once at least ``count`` have ended (a server span may end after its response)."""
        with self.ended.condition:
            assert self.ended.condition.wait_for(lambda: self.ended.count >= count, timeout), "spans missing"
        return self.spans()

    def spans(self, scope: str | None = None) -> list[ReadableSpan]:
        """Finished spans, in the order they ended; only those of instrumentation scope ``scope`` if given."""
        found = list(self.exporter.get_finished_spans())
        if scope is not None:
            found = [s for s in found if s.instrumentation_scope is not None and s.instrumentation_scope.name == scope]
        return found

    def clear(self) -> None:
        with self.ended.condition:
            self.exporter.clear()
            self.ended.count = 0


@pytest.fixture
def traces() -> Iterator[Traces]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ended = _Ended()
    provider.add_span_processor(ended)  # after the exporter's: a span is exported when waiters wake
    yield Traces(provider, exporter, ended)
    provider.shutdown()


@dataclass
class Metrics:
    provider: MeterProvider
    reader: InMemoryMetricReader

    def points(self, name: str) -> list[Any]:
        """Every data point of metric ``name`` in a fresh collection (an empty list if it has none)."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def value(self, name: str, **attributes: Any) -> float:
        """Sum of the values (or histogram counts) of ``name``'s points whose attributes include ``attributes``."""
        total = 0.0
        for point in self.points(name):
            if all(point.attributes.get(key) == value for key, value in attributes.items()):
                total += point.count if hasattr(point, "bucket_counts") else point.value
        return total


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield Metrics(provider, reader)
    provider.shutdown()


def traceparent(trace_id: int, span_id: int) -> str:
    """The ``00-<trace id>-<parent id>`` part of a W3C ``traceparent`` (the flags vary: sampled, random)."""
    return f"00-{trace_id:032x}-{span_id:016x}"


def ids(header: str) -> str:
    """A received ``traceparent`` without its flags, to compare with :func:`traceparent`."""
    return header.rsplit("-", 1)[0]
