"""Routes in telemetry and status: the matched rule on the CLIENT span and the duration metric, faults and mirrors
counted, the table's version in ``mesh_status()``. Real backends on loopback, the OpenTelemetry SDK in memory."""

from __future__ import annotations

import pytest

import meshlib
from meshlib.routing.model import Backend, Fault, Filters, Mirror, PathMatch, RouteMatch, Rule
from meshlib.status import format_status
from tests.conftest import BackendFactory, static_target
from tests.routing.test_routed_calls import table
from tests.telemetry.conftest import Metrics, Traces

pytestmark = pytest.mark.timeout(60)


def _env(primary: list[object], other: list[object]) -> dict[str, str]:
    return {
        "MESHLIB_SERVICE_PAYMENTS_V1": static_target(primary),  # type: ignore[arg-type]
        "MESHLIB_SERVICE_PAYMENTS_SHADOW": static_target(other),  # type: ignore[arg-type]
    }


def test_routed_span_names_route_rule_backend_and_path_match(start_backends: BackendFactory, traces: Traces) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, prefix="shadow-")
    rule = Rule(
        "payments-canary",
        1,
        matches=(RouteMatch(PathMatch("PathPrefix", "/charge")),),
        backends=(Backend("payments-v1"),),
    )
    with meshlib.Client(environ=_env([v1], [shadow]), tracer_provider=traces.provider) as client:
        client.mesh.install_routes(table("payments", rule))
        client.get("http://payments/charge/7")
        client.get("http://payments/other")  # no rule: a 404 of the routes' own, still one CLIENT span
    routed, missed = traces.wait_for(2)
    assert routed.attributes is not None and missed.attributes is not None
    assert routed.attributes["http.route"] == "/charge"
    assert routed.attributes["meshlib.route"] == "payments-canary"
    assert routed.attributes["meshlib.route.rule"] == 1
    assert routed.attributes["meshlib.backend"] == "payments-v1"
    assert missed.attributes["meshlib.local"] == "no-route"
    assert missed.attributes["http.response.status_code"] == 404


def test_duration_metric_carries_the_rule_label_and_faults_and_mirrors_are_counted(
    start_backends: BackendFactory, metrics: Metrics
) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, prefix="shadow-")
    rule = Rule(
        "payments-canary",
        0,
        backends=(Backend("payments-v1"),),
        filters=Filters(
            fault=Fault("outage", abort_status=503, abort_fraction=1.0), mirrors=(Mirror("payments-shadow"),)
        ),
    )
    plain = Rule("payments-canary", 1, matches=(RouteMatch(method="PUT"),), backends=(Backend("payments-v1"),))
    with meshlib.Client(environ=_env([v1], [shadow]), meter_provider=metrics.provider) as client:
        client.mesh.install_routes(table("payments", plain, rule))
        assert client.get("http://payments/").status_code == 503  # aborted: never sent, so never mirrored
        client.put("http://payments/", content=b"x")
        assert metrics.value("meshlib.client.route.faults", **{"meshlib.fault.kind": "abort"}) == 1
        assert metrics.value("http.client.request.duration", **{"meshlib.route": "payments-canary#0"}) == 1
        assert metrics.value("http.client.request.duration", **{"meshlib.route": "payments-canary#1"}) == 1
        assert metrics.value("meshlib.client.route.mirrors") == 0
    assert shadow.count == 0


def test_mesh_status_shows_the_table_and_what_its_filters_did(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, prefix="shadow-")
    rule = Rule(
        "payments-canary",
        0,
        backends=(Backend("payments-v1"),),
        filters=Filters(mirrors=(Mirror("payments-shadow"),)),
    )
    with meshlib.Client(environ=_env([v1], [shadow])) as client:
        assert client.mesh_status().routes is None  # no routes: no routes section
        routed = table("payments", rule)
        client.mesh.install_routes(routed)
        client.get("http://payments/")
        client.mesh._mirror_workers.shutdown(wait=True)
        status = client.mesh_status()
    assert status.routes is not None
    assert status.routes.source == "test"
    assert status.routes.version == "1"
    assert status.routes.mirrors == {"payments_shadow/sent": 1}
    text = format_status({"meshlib": "x", "pid": 1, "clients": [status.to_dict()]})
    assert "routes: test version 1" in text
