"""``MESHLIB_ADAPTIVE_*``: the adaptive concurrency limit's settings, mesh-wide and per service, and their errors."""

from __future__ import annotations

import logging

import pytest

import meshlib
from meshlib.config import MeshConfig, ResilienceSettings

TARGET = {"MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:1"}


def test_off_by_default_with_bounds_from_the_fixed_limit() -> None:
    config = MeshConfig.from_env({})
    assert config.resilience.adaptive_concurrency is False
    assert config.resilience.adaptive_bounds() == (3, 20, 1024)  # min, initial, max (= MESHLIB_MAX_INFLIGHT)
    # A small fixed limit (MESHLIB_MAX_INFLIGHT, an xDS cluster's max_requests) lowers every bound, set or not.
    assert ResilienceSettings(max_inflight=2).adaptive_bounds() == (2, 2, 2)
    settings = ResilienceSettings(max_inflight=8, adaptive_min_limit=10, adaptive_initial_limit=50)
    assert settings.adaptive_bounds() == (8, 8, 8)


def test_mesh_wide_and_per_service_settings() -> None:
    env = {
        **TARGET,
        "MESHLIB_SERVICE_LEDGER": "static://127.0.0.1:2",
        "MESHLIB_ADAPTIVE_MIN_LIMIT": "5",
        "MESHLIB_ADAPTIVE_WINDOW": "250ms",
        "MESHLIB_SERVICE_PAYMENTS__ADAPTIVE_CONCURRENCY": "yes",
        "MESHLIB_SERVICE_PAYMENTS__ADAPTIVE_INITIAL_LIMIT": "40",
        "MESHLIB_SERVICE_PAYMENTS__ADAPTIVE_MAX_LIMIT": "5000",
        "MESHLIB_SERVICE_PAYMENTS__MAX_INFLIGHT": "100",
        "MESHLIB_SERVICE_PAYMENTS__ADAPTIVE_WINDOW_SAMPLES": "20",
    }
    config = MeshConfig.from_env(env)
    payments = config.services["PAYMENTS"].resilience
    assert payments is not None and payments.adaptive_concurrency
    assert payments.adaptive_window == 0.25 and payments.adaptive_window_samples == 20
    assert payments.adaptive_bounds() == (5, 40, 100)  # a maximum above MAX_INFLIGHT is lowered to it
    assert config.resilience_for("LEDGER").adaptive_concurrency is False


@pytest.mark.parametrize(
    ("env", "variable", "expected"),
    [
        ({"MESHLIB_ADAPTIVE_CONCURRENCY": "maybe"}, "MESHLIB_ADAPTIVE_CONCURRENCY", "a boolean"),
        ({"MESHLIB_ADAPTIVE_MIN_LIMIT": "0"}, "MESHLIB_ADAPTIVE_MIN_LIMIT", "an integer >= 1"),
        ({"MESHLIB_ADAPTIVE_MAX_LIMIT": "-3"}, "MESHLIB_ADAPTIVE_MAX_LIMIT", "a whole number"),
        ({"MESHLIB_ADAPTIVE_WINDOW": "2m"}, "MESHLIB_ADAPTIVE_WINDOW", "from 1ms to 60s"),
        ({"MESHLIB_ADAPTIVE_WINDOW_SAMPLES": "0"}, "MESHLIB_ADAPTIVE_WINDOW_SAMPLES", "from 1 to 10,000"),
        (
            {"MESHLIB_ADAPTIVE_INITIAL_LIMIT": "500", "MESHLIB_ADAPTIVE_MAX_LIMIT": "100"},
            "MESHLIB_ADAPTIVE_INITIAL_LIMIT",
            "to ADAPTIVE_MAX_LIMIT (100)",
        ),
        (
            {"MESHLIB_ADAPTIVE_INITIAL_LIMIT": "2", "MESHLIB_ADAPTIVE_MIN_LIMIT": "5"},
            "MESHLIB_ADAPTIVE_INITIAL_LIMIT",
            "an integer >= 5",
        ),
        (
            {"MESHLIB_ADAPTIVE_MIN_LIMIT": "50", "MESHLIB_ADAPTIVE_MAX_LIMIT": "10"},
            "MESHLIB_ADAPTIVE_MIN_LIMIT",
            "no larger than ADAPTIVE_MAX_LIMIT (10)",
        ),
        (  # the check fails on a mesh-wide setting because of a per-service one: the per-service one is named
            {**TARGET, "MESHLIB_ADAPTIVE_MIN_LIMIT": "10", "MESHLIB_SERVICE_PAYMENTS__ADAPTIVE_MAX_LIMIT": "5"},
            "MESHLIB_SERVICE_PAYMENTS__ADAPTIVE_MAX_LIMIT",
            "MESHLIB_ADAPTIVE_MIN_LIMIT=10",
        ),
    ],
)
def test_bad_values_name_variable_value_and_expectation(env: dict[str, str], variable: str, expected: str) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        meshlib.Client(environ=env)
    assert info.value.variable == variable
    assert info.value.value == next(raw for name, raw in env.items() if name == variable)
    assert expected in str(info.value)


def test_adaptive_variables_are_known(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="meshlib.config"):
        MeshConfig.from_env({"MESHLIB_ADAPTIVE_CONCURRENCY": "1", "MESHLIB_ADAPTIVE_WINDOW_SAMPLES": "5"})
    assert "unknown" not in caplog.text
