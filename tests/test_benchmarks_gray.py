"""Smoke run of the issue 15 S9 gray-failure benchmark (``s9gray``) with tiny parameters: it runs and reports.

No timing is asserted (the figures come from the full run, docs/performance.md); asserted is what the report rests
on: with success-rate ejection the gray endpoint is ejected, by success rate, and not without it.
"""

from __future__ import annotations

import pytest

# A benchmark smoke test checks the benchmark code, not the HTTP library (the suite covers both): run once.
pytestmark = [pytest.mark.timeout(120), pytest.mark.one_library]


def test_s9gray_ejects_the_gray_endpoint_by_success_rate_only_when_enabled() -> None:
    from benchmarks import s9_gray

    result = s9_gray.measure(rate=200.0, duration=3.0, repeats=1)
    rows = {row["variant"]: row for row in result.rows}
    assert rows["ejection"]["reason"] == "success-rate"
    assert rows["off"]["reason"] == "-"
    assert rows["ejection"]["gray_share_pct"] < rows["off"]["gray_share_pct"]
    assert {check.name for check in result.checks} >= {"ejected within", "caller success with retries"}
