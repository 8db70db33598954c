"""Hedging's telemetry: each hedge is an attempt span with ``meshlib.hedge=true``; metrics count hedges."""

from __future__ import annotations

from opentelemetry.trace import SpanKind

import meshlib
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target
from tests.telemetry.conftest import Metrics, Traces

STALL = Behavior(delay=60.0)
HEDGING = {"HEDGE_MAX_ATTEMPTS": "2", "HEDGE_DELAY": "50ms", "HEDGE_MAX_EXTRA_LOAD": "0.99"}


def _env(backends: list[Backend], **settings: str) -> dict[str, str]:
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_LB": "round_robin"}
    env.update({f"MESHLIB_{key}": value for key, value in settings.items()})
    return env


def test_spans_show_each_hedge_as_an_attempt_and_metrics_count_hedges(
    start_backends: BackendFactory, traces: Traces, metrics: Metrics
) -> None:
    fast, slow = start_backends(2)
    with meshlib.Client(
        environ=_env([fast, slow], **HEDGING), tracer_provider=traces.provider, meter_provider=metrics.provider
    ) as client:
        for _ in range(3):
            client.get("http://payments/warm")
        slow.behavior = STALL
        won = None
        for _ in range(4):
            traces.clear()
            response = client.get("http://payments/charge")
            if response.extensions["meshlib.attempts"] == 2 and response.extensions["meshlib.endpoint"] == fast.address:
                won = response
                break
        assert won is not None, "round robin sent no original to the stalled endpoint"
        spans = traces.spans("meshlib")
        (call,) = [s for s in spans if s.kind is SpanKind.CLIENT]
        attempts = sorted((s for s in spans if s.kind is SpanKind.INTERNAL), key=lambda s: s.start_time or 0)
        assert len(attempts) == 2
        original, hedge = (dict(s.attributes or {}) for s in attempts)
        assert "meshlib.hedge" not in original and original["meshlib.outcome"] == "cancelled"
        assert original["network.peer.port"] == slow.port
        assert hedge["meshlib.hedge"] is True and hedge["meshlib.outcome"] == "success"
        assert hedge["network.peer.port"] == fast.port
        assert call.attributes is not None and call.attributes["network.peer.port"] == fast.port
        assert metrics.value("meshlib.client.hedges.sent", **{"server.address": "payments"}) >= 1
        assert metrics.value("meshlib.client.hedges.won", **{"server.address": "payments"}) >= 1
        assert metrics.value("meshlib.client.hedges.cancelled", **{"server.address": "payments"}) >= 1
