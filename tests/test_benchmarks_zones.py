"""Smoke run of the issue 16 S11 zones benchmark (``s11``) with tiny parameters: it runs and reports.

No timing is asserted (the figures come from the full run, docs/performance.md); asserted is what the report rests
on, read from the backends' own counters: with ``MESHLIB_ZONE=a`` zone a gets nearly everything while healthy and
nothing once it is empty, without a failure; without it, zone a gets only part of the traffic.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.one_library, pytest.mark.timeout(120)]


def test_s11_keeps_traffic_in_zone_and_spills_without_failures() -> None:
    from benchmarks import s11_zones

    result = s11_zones.measure(200.0, {"healthy": 0.75, "degraded": 1.0, "empty": 0.75}, repeats=1)
    rows = {row["variant"]: row for row in result.rows}
    zone, control = rows["zone"], rows["control"]
    assert zone["healthy_in_zone_pct"] > 90.0
    assert control["healthy_in_zone_pct"] < 60.0  # zones ignored: about a third
    assert 10.0 < zone["degraded_in_zone_pct"] < 60.0  # Envoy's 33 %, loosely: 300 draws
    assert zone["empty_errors"] == 0 and zone["empty_after_in_zone"] == 0
    assert zone["empty_first_zone"] in ("b", "c")
    assert [check.name for check in result.checks] == [
        "healthy: in-zone share",
        "1 of 4 healthy: in-zone share",
        "empty: failures while spilling",
    ]
