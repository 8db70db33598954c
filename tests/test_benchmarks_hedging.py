"""Smoke run of the issue 15 hedging benchmark (S8) with tiny parameters: it runs and reports every field.

No timing is asserted (the figures come from the full run, docs/performance.md). Asserted is what the report rests
on: every part ran with the requests it scheduled, each row carries its fields, every target has a verdict, and a
POST without opt-in is never sent twice (the backends' own records).
"""

from __future__ import annotations

import math

import pytest

# A benchmark smoke test checks the benchmark code, not the HTTP library (the suite covers both): run once.
pytestmark = [pytest.mark.timeout(90), pytest.mark.one_library]


def test_s8_runs_every_part_and_reports_its_fields() -> None:
    from benchmarks import s8_hedging

    result = s8_hedging.measure(repeats=1, rate=100.0, duration=1.5, warmup=0.5, outage_duration=1.0, post_duration=1.0)
    rows = {row["variant"]: row for row in result.rows}
    assert list(rows) == [*s8_hedging.VARIANTS, *s8_hedging.OUTAGES, *s8_hedging.POSTS]
    for name in s8_hedging.VARIANTS:
        row = rows[name]
        assert row["requests"] == 150
        assert row["backend_requests"] >= row["requests"]  # the backends' own counters: every request arrived
        for key in ("p50_ms", "p99_ms", "p999_ms", "extra_pct", "hedges_sent", "hedges_won", "hangups"):
            assert key in row
        assert not math.isnan(row["p99_ms"]) and row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"]
    for name in s8_hedging.OUTAGES:
        assert rows[name]["requests"] == 100
        assert rows[name]["amplification"] >= 1.0  # every backend 503: each request reached one at least
    post = rows["POST, hedging on, no opt-in"]
    assert post["recorded_ids"] == post["requests"] == 100
    assert post["duplicates"] == 0
    verdicts = {check.name: check.verdict for check in result.checks}
    assert len(verdicts) == 3 * 2 + 2 + 1
    assert set(verdicts.values()) <= {"PASS", "MISS"}
