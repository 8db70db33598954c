"""S1b: what tracing and metrics cost per request, as a ratio of on to off, measured in one run.

``python -m benchmarks.telemetry_cost [--requests N] [--repeats R]`` (about 30 s with the defaults).

Four ways to send the same GET through ``meshlib.Client``, interleaved, each repeated ``R`` times (the
best repeat is reported), in two settings:

* **loopback**: a real HTTP/1.1 request to a local :class:`meshlib.testing.Backend` (it runs on its own
  thread; only the *calling* thread's CPU is counted, with ``time.thread_time``), so the ratio is what an
  application sees;
* **in-process**: ``httpx.MockTransport`` as the inner transport, no I/O at all, so the difference between
  variants is meshlib's telemetry code and the SDK alone, without network noise.

Variants:

* ``off`` -- no tracer or meter provider configured (the OpenTelemetry API is a no-op): what every meshlib
  user pays. Compared with raw httpx in the same run, for scale.
* ``propagate`` -- still no SDK, but the request runs inside an extracted remote context with baggage (what
  the inbound middleware leaves for a handler): meshlib injects ``traceparent`` and ``baggage``.
* ``on`` -- an SDK ``TracerProvider`` (AlwaysOn sampling, ``BatchSpanProcessor`` to an exporter that drops
  spans) and an SDK ``MeterProvider`` (in-memory reader: collection is not on the request path): one CLIENT
  span and one histogram record per request.
* ``sdk-floor`` -- ``off`` plus what the SDK itself costs for that: the benchmark starts and ends one span
  with the same attributes and records one histogram point with the same attributes, in the same loop. The
  SDK's cost in a real request loop (cold caches, more garbage) is about twice what a tight ``timeit`` loop
  suggests, so it is measured here, not quoted; ``on - sdk-floor`` is meshlib's own share.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import httpx
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import meshlib
from meshlib.telemetry.metrics import DURATION_BUCKETS
from meshlib.testing import Backend

VARIANTS = ("raw", "off", "propagate", "on", "sdk-floor")


class _Drop(SpanExporter):
    """An exporter that accepts and forgets: the export itself is not what is measured."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _remote_context() -> context.Context:
    parent = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1))
    return baggage.set_baggage("tenant", "acme", trace.set_span_in_context(NonRecordingSpan(parent)))


def _senders(
    url: str, transport: httpx.BaseTransport | None, tracer_provider: TracerProvider, meter_provider: MeterProvider
) -> tuple[dict[str, Callable[[], None]], list[httpx.Client]]:
    """One ``send()`` per variant, each with its own client."""
    target = url.removeprefix("http://").rstrip("/")
    extra = {} if transport is None else {"transport": transport}
    raw = httpx.Client(trust_env=False, **extra)  # type: ignore[arg-type]
    off = meshlib.Client(services={"bench": f"static://{target}"}, environ={}, **extra)  # type: ignore[arg-type]
    on = meshlib.Client(
        services={"bench": f"static://{target}"},
        environ={},
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        **extra,  # type: ignore[arg-type]
    )
    floor = _sdk_floor(tracer_provider, meter_provider)

    def send_raw() -> None:
        raw.get(url)

    def send_off() -> None:
        off.get("http://bench/")

    def send_on() -> None:
        on.get("http://bench/")

    def send_floor() -> None:
        off.get("http://bench/")
        floor()

    senders = {"raw": send_raw, "off": send_off, "propagate": send_off, "on": send_on, "sdk-floor": send_floor}
    return senders, [raw, off, on]


def _measure(senders: dict[str, Callable[[], None]], requests: int, repeats: int) -> dict[str, float]:
    """Calling-thread CPU microseconds per request of each variant: the best of interleaved repeats.

    The minimum, not the median: other processes on the machine only ever add to a repeat's time (cache and
    core contention), so the fastest repeat is the closest to each variant's own cost.

    ``propagate`` runs its loop inside the remote context (attached once, outside the timing).
    """
    remote = _remote_context()
    for send in senders.values():  # warm up: connections, discovery, caches
        for _ in range(min(200, requests)):
            send()
    samples: dict[str, list[float]] = {name: [] for name in senders}
    for _ in range(repeats):
        for name, send in senders.items():
            token = context.attach(remote) if name == "propagate" else None
            start = time.thread_time()
            for _ in range(requests):
                send()
            samples[name].append((time.thread_time() - start) / requests * 1e6)
            if token is not None:
                context.detach(token)
    return {name: min(values) for name, values in samples.items()}


def _sdk_floor(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> Callable[[], None]:
    """What the SDK alone does for one traced, measured request: a span like meshlib's, one histogram point."""
    tracer = tracer_provider.get_tracer("floor")
    histogram = meter_provider.get_meter("floor").create_histogram(
        "floor.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
    )
    start = {"http.request.method": "GET", "server.address": "bench", "server.port": 80, "url.full": "http://bench/"}
    end = {"http.response.status_code": 200, "network.peer.address": "127.0.0.1", "network.peer.port": 8080}
    metric = {**end, "http.request.method": "GET", "server.address": "bench", "server.port": 80}

    def floor() -> None:
        span = tracer.start_span("GET", kind=trace.SpanKind.CLIENT, attributes=start)
        span.set_attributes(end)
        span.end()
        histogram.record(0.001, metric, context=trace.set_span_in_context(span))  # with an exemplar, as meshlib

    return floor


def _report(title: str, results: dict[str, float]) -> None:
    off = results["off"]
    print(f"\n{title}: calling-thread CPU per request (best of interleaved repeats)")
    for name in VARIANTS:
        value = results[name]
        note = "" if name in ("raw", "off") else f"   {value - off:+6.1f} us vs off   ratio {value / off:.3f}"
        print(f"  {name:<10} {value:8.1f} us{note}")
    print(f"  mesh (off) vs raw httpx: {off - results['raw']:+.1f} us, ratio {off / results['raw']:.3f}")
    print(f"  meshlib's own share of 'on' (on - sdk-floor): {results['on'] - results['sdk-floor']:+.1f} us")


def main(argv: list[str] | None = None) -> int:
    """Run both settings and print the ratios."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.telemetry_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests per variant per repeat (loopback)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved repeats (the best is reported)")
    args = parser.parse_args(argv)

    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(_Drop()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    began = time.monotonic()
    with Backend("bench") as backend:
        senders, clients = _senders(backend.url + "/", None, tracer_provider, meter_provider)
        try:
            loopback = _measure(senders, args.requests, args.repeats)
        finally:
            for client in clients:
                client.close()
    mock = httpx.MockTransport(lambda request: httpx.Response(200, content=b"ok"))
    senders, clients = _senders("http://127.0.0.1:9/", mock, tracer_provider, meter_provider)
    try:
        in_process = _measure(senders, args.requests * 4, args.repeats)
    finally:
        for client in clients:
            client.close()
    tracer_provider.shutdown()
    meter_provider.shutdown()

    _report("loopback (meshlib.testing.Backend)", loopback)
    _report("in-process (httpx.MockTransport, no I/O)", in_process)
    print(f"\npropagation only: {in_process['propagate'] - in_process['off']:+.1f} us per request (target <= 2 us)")
    print(f"\nRESULT tracing+metrics on/off per-request cost ratio (loopback): {loopback['on'] / loopback['off']:.3f}")
    print(f"(took {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
