"""Smoke runs of the issue 12 benchmarks with tiny parameters: they run and produce their report.

No timing is asserted (figures come from the full runs, docs/performance.md); what is asserted is behaviour
the reports rest on: Z1 checks before timing that the deny variants answer 403 without running the app and the
others 200 (it raises otherwise), and Z2's flooder is refused with 429s while the well-behaved callers are not.
"""

from __future__ import annotations

import pytest

from benchmarks import z1_denial, z2_flood
from benchmarks.harness import render_result

# A benchmark smoke test checks the benchmark code, not the HTTP library (the suite covers both): run once.
pytestmark = pytest.mark.one_library


def test_z1_denial_reports_every_variant_and_its_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    assert z1_denial.main(["--requests", "20", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for protocol in z1_denial.PROTOCOLS:
        for variant in z1_denial.VARIANTS:
            assert f"{protocol}  " in out and variant in out
        for variant in ("deny (DENY policy)", "deny (no ALLOW matched)", "allow (last ALLOW)"):
            assert any(
                line.lstrip().startswith(("[PASS]", "[MISS]")) and f"{protocol} {variant}: added per request" in line
                for line in out.splitlines()
            ), out
    assert "part: PolicySet.evaluate" in out


def test_z1_denial_checks_the_statuses_it_times() -> None:
    result = z1_denial.measure(10, 1)
    statuses = {(row["protocol"], row["variant"]): row["status"] for row in result.rows}
    assert statuses[("asgi", "deny (DENY policy)")] == statuses[("wsgi", "deny (no ALLOW matched)")] == 403
    assert statuses[("wsgi", "allow (last ALLOW)")] == statuses[("asgi", "baseline")] == 200
    assert len(result.checks) == 6


def test_z2_flood_reports_the_flooder_refused_and_the_others_served() -> None:
    params = z2_flood.Params(
        duration=0.5, callers=2, rate=10, connections=1, pipeline=2, identity_rps=20, total_rps=1000
    )
    result = z2_flood.measure(params)
    rows = {(row["variant"], row["phase"]): row for row in result.rows}
    assert set(rows) == {(v, p) for v in z2_flood.VARIANTS for p in z2_flood.PHASES}
    for variant in z2_flood.VARIANTS:
        flood = rows[(variant, "flood")]
        assert flood["flood_429_pct"] > 0  # the flooder went over its 20/s and was refused
        assert flood["flood_ok_rps"] > 0
        for phase in z2_flood.PHASES:
            assert rows[(variant, phase)]["others_sent"] == 10
            assert rows[(variant, phase)]["others_429"] == 0  # 10/s each, under their own 20/s
    report = render_result(result)
    assert report.count("others' success while one floods") == 2
    assert "[PASS]" in report or "[MISS]" in report


def test_z2_flood_refuses_parameters_that_make_no_run() -> None:
    with pytest.raises(SystemExit):
        z2_flood.main(["--duration", "0.01", "--rate", "1"])
