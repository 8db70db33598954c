"""Smoke run of the issue 13 benchmark (X1, push to traffic) with tiny parameters: it runs and reports.

No timing is asserted (the figure comes from the full run, docs/performance.md); asserted is what the report rests
on: every push moved the traffic and no request failed.
"""

from __future__ import annotations

import pytest

# A benchmark smoke test checks the benchmark code, not the HTTP library (the suite covers both): run once.
pytestmark = pytest.mark.one_library

pytest.importorskip("grpc")


def test_x1_push_moves_traffic_on_every_push_and_fails_no_request() -> None:
    from benchmarks import x1_push

    result = x1_push.measure(2, 100.0)
    rows = {row["from set() returning to"]: row for row in result.rows}
    assert rows["first"]["pushes"] == rows["all"]["pushes"] == rows["swap"]["pushes"] == 2
    failed = next(c for c in result.checks if c.name == "failed requests")
    assert failed.value == 0
