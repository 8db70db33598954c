"""Telemetry: tracing and metrics with the OpenTelemetry API (the SDK stays the application's choice).

* :mod:`meshlib.telemetry.tracing` -- the CLIENT span of each mesh call, attempt spans, propagation;
* :mod:`meshlib.telemetry.metrics` -- ``http.client.request.duration`` and the ``meshlib.client.*`` instruments;
* :mod:`meshlib.telemetry.client` -- :class:`ClientTelemetry`, what one client reports to;
* :mod:`meshlib.telemetry.inbound` -- server span and server metrics hooks for the inbound middleware;
* :mod:`meshlib.telemetry.propagation` -- ``MESHLIB_PROPAGATE_TO``: mesh headers for chosen outside hosts.

``docs/observability.md`` lists every span attribute and instrument.
"""

from __future__ import annotations

from meshlib.telemetry.client import ClientTelemetry
from meshlib.telemetry.metrics import DURATION_BUCKETS, MeshMetrics, ServerMetrics
from meshlib.telemetry.tracing import INSTRUMENTATION_NAME

__all__ = ["DURATION_BUCKETS", "INSTRUMENTATION_NAME", "ClientTelemetry", "MeshMetrics", "ServerMetrics"]
