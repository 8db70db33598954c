"""Smoke run of S10 overload (issue 15) with tiny parameters: it runs and produces its report.

No timing is asserted (figures come from the full run, docs/performance.md); what is asserted is what the
report rests on: the capacity-limited backends serve and drain, every variant gets a row, and only the adaptive
variant refuses calls itself (``OverloadedError``), the fixed one sending everything to the queue.
"""

from __future__ import annotations

import pytest

from benchmarks import s10_overload
from benchmarks.capacity import CapacityProcess
from benchmarks.harness import render_result

# A benchmark smoke test checks the benchmark code, not the HTTP library (the suite covers both): run once.
pytestmark = pytest.mark.one_library


def test_s10_overload_reports_every_variant_and_its_verdicts() -> None:
    params = s10_overload.Params(
        backends=2, slots=2, service_time=0.1, unloaded=1.5, overload=2.0, settle=0.5, repeats=1,
        variants=("fixed", "adaptive"),
    )  # fmt: skip
    result = s10_overload.measure(params)
    rows = {row["variant"]: row for row in result.rows}
    assert set(rows) == {"fixed", "adaptive"}
    assert rows["fixed"]["refused_pct"] == 0.0 and rows["fixed"]["limit"] == 1024
    assert rows["adaptive"]["refused_pct"] > 0.0  # 80/s into 4 slots of 100 ms: more in flight than its limit
    assert rows["adaptive"]["served_rps"] > 0
    report = render_result(result)
    assert report.count("[PASS]") + report.count("[MISS]") == 2, report
    assert "adaptive: goodput / capacity" in report


def test_capacity_backends_serve_count_and_drain() -> None:
    from tests.httplib import httpx

    with CapacityProcess(1, 1, 0.05) as backends, httpx.Client() as client:
        assert backends.capacity == 20.0
        for _ in range(3):
            assert client.get(f"http://{backends.addresses[0]}/").text == "ok"
        stats = backends.stats()
        assert stats["served"] == [3] and stats["pending"] == [0]
