"""The server half of ORCA: a real uvicorn and a real WSGI server add ``endpoint-load-metrics`` to each answer, in
the format asked for, with what the application set and the QPS/EPS the middleware measured (injected clock)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

from meshlib.balance.orca import LoadReport, ReportFormat, parse_load_report
from meshlib.server.orca import ASGILoadReportMiddleware, LoadReporter, WSGILoadReportMiddleware
from tests.httplib import httpx
from tests.server.test_middleware import serve_asgi, serve_wsgi


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/raise":
        raise RuntimeError("handler failed")
    status = 500 if scope["path"] == "/fail" else 200
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/raise":
        raise RuntimeError("handler failed")
    start_response(
        "500 Internal Server Error" if environ["PATH_INFO"] == "/fail" else "200 OK", [("content-type", "text/plain")]
    )
    return [b"ok"]


def serve(kind: str, reporter: LoadReporter, **options: Any) -> Any:
    if kind == "asgi":
        return serve_asgi(ASGILoadReportMiddleware(asgi_app, reporter, **options))
    return serve_wsgi(WSGILoadReportMiddleware(wsgi_app, reporter, **options))


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_reports_set_values_and_measured_rates_in_each_format(kind: str) -> None:
    clock = FakeClock()
    reporter = LoadReporter(window=10.0, clock=clock)
    reporter.set_application_utilization(0.5)
    reporter.set_cpu_utilization(0.75)
    reporter.set_named_metric("queue", 3)
    with serve(kind, reporter) as url, httpx.Client(base_url=url) as client:
        for _ in range(7):
            assert client.get("/ok").status_code == 200
        for _ in range(2):
            assert client.get("/fail").status_code == 500
        with pytest.raises(Exception):  # noqa: B017 - uvicorn answers 500 or drops; wsgiref 500
            answer = client.get("/raise")
            answer.raise_for_status()
        clock.now = 9.5  # 10 requests (3 of them errors) so far, 9.5 s since the reporter started
        texts = client.get("/ok")
        as_json = client.get("/ok", headers={"endpoint-load-metrics-format": "json"})
        as_bin = client.get("/ok", headers={"endpoint-load-metrics-format": "BIN"})
    assert texts.headers["endpoint-load-metrics"].startswith("TEXT ")
    assert as_json.headers["endpoint-load-metrics"].startswith("JSON ")
    assert as_bin.headers["endpoint-load-metrics"].startswith("BIN ")
    first = parse_load_report(texts.headers["endpoint-load-metrics"])
    assert first == LoadReport(
        cpu_utilization=0.75,
        application_utilization=0.5,
        rps_fractional=11 / 9.5,  # each answer counts itself
        eps=3 / 9.5,
        named_metrics={"queue": 3},
    )
    assert parse_load_report(as_json.headers["endpoint-load-metrics"]).rps_fractional == pytest.approx(12 / 9.5)
    assert parse_load_report(as_bin.headers["endpoint-load-metrics"]).rps_fractional == pytest.approx(13 / 9.5)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_only_when_asked_and_set_rates_override(kind: str) -> None:
    reporter = LoadReporter(clock=FakeClock())
    reporter.set_qps(100)
    reporter.set_eps(0)
    with (
        serve(kind, reporter, only_when_asked=True, default_format=ReportFormat.JSON) as url,
        httpx.Client(base_url=url) as client,
    ):
        plain = client.get("/ok")
        asked = client.get("/ok", headers={"endpoint-load-metrics-format": "unknown"})
    assert "endpoint-load-metrics" not in plain.headers
    value = asked.headers["endpoint-load-metrics"]
    assert value.startswith("JSON ")  # an unknown format gets the default
    assert parse_load_report(value) == LoadReport(rps_fractional=100)


def test_rates_window_slides_and_bad_values_are_refused() -> None:
    clock = FakeClock()
    reporter = LoadReporter(window=10.0, clock=clock)
    for _ in range(20):
        reporter.record()
    clock.now = 1.0
    assert reporter.rates() == (20.0, 0.0)  # over the one second since start
    clock.now = 10.5
    reporter.record(error=True)
    assert reporter.rates() == (pytest.approx(0.1), pytest.approx(0.1))  # the first second has left the window
    with pytest.raises(ValueError, match=r"mem_utilization=1\.5 is invalid: expected \[0, 1\]"):
        reporter.set_mem_utilization(1.5)
    with pytest.raises(ValueError, match="cpu_utilization=nan"):
        reporter.set_cpu_utilization(float("nan"))
    with pytest.raises(ValueError, match="named metric name 'a b'"):
        reporter.set_named_metric("a b", 1)
    with pytest.raises(ValueError, match="window"):
        LoadReporter(window=0)
    reporter.set_cpu_utilization(0.5)
    reporter.set_cpu_utilization(None)
    assert reporter.report().cpu_utilization == 0.0


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_the_mesh_middleware_reports_load_when_given_a_reporter(kind: str) -> None:
    from meshlib.server import MeshMiddleware, WSGIMeshMiddleware

    reporter = LoadReporter(window=10.0, clock=FakeClock())
    reporter.set_application_utilization(0.25)
    app = MeshMiddleware(asgi_app, load_reporter=reporter, environ={}) if kind == "asgi" else None
    server = (
        serve_asgi(app)
        if app is not None
        else serve_wsgi(WSGIMeshMiddleware(wsgi_app, load_reporter=reporter, environ={}))
    )
    with server as url, httpx.Client(base_url=url) as client:
        answer = client.get("/ok")
    report = parse_load_report(answer.headers["endpoint-load-metrics"])
    assert report is not None and report.application_utilization == 0.25


def test_the_mesh_middleware_adds_no_report_without_a_reporter() -> None:
    from meshlib.server import MeshMiddleware

    with serve_asgi(MeshMiddleware(asgi_app, environ={})) as url, httpx.Client(base_url=url) as client:
        assert "endpoint-load-metrics" not in client.get("/ok").headers
