"""Smoke run of the slow-start benchmark (``slowstart``) with tiny parameters: it runs, and every balancer's
newcomer share ramps without exceeding its steady share (the checks the report rests on)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.one_library, pytest.mark.timeout(60)]


def test_slowstart_benchmark_ramps_every_balancer() -> None:
    from benchmarks import slow_start

    result = slow_start.measure(picks=1500, step=0.1)
    assert len(result.checks) == 5
    assert all(check.passed for check in result.checks), [(c.name, c.note) for c in result.checks]
    assert len(result.series["fraction"]) == len(result.series["random"])
