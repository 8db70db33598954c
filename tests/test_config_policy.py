"""Policy and resilience settings from MESHLIB_* variables: mesh-wide, per service, and their errors."""

from __future__ import annotations

import logging
import math

import pytest

import meshlib
from meshlib.config import SERVICE_SETTINGS, MeshConfig, ResilienceSettings, ServiceConfig
from meshlib.policy import DEFAULT_POLICY, Policy
from meshlib.resilience.hedging import DEFAULT_HEDGE_POLICY

SVC = {"MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.5:8080", "MESHLIB_SERVICE_USERS": "static://10.0.0.6:8080"}


def test_defaults_without_environment() -> None:
    config = MeshConfig.from_env({})
    assert config.policy == DEFAULT_POLICY
    assert config.resilience == ResilienceSettings()
    assert config.policy_for("ANYTHING") is config.policy
    assert config.resilience_for("ANYTHING") is config.resilience
    r = config.resilience
    assert (r.retry_budget_fraction, r.retry_budget_min_per_second, r.retry_budget_ttl) == (0.2, 10, 10.0)
    assert (r.breaker_failures, r.breaker_reset) == (5, 10.0)
    assert (r.outlier_failures, r.outlier_base_ejection, r.outlier_max_ejection, r.outlier_max_percent) == (
        5,
        30.0,
        300.0,
        10.0,
    )
    assert r.max_inflight == 1024


def test_mesh_wide_policy_variables() -> None:
    config = MeshConfig.from_env(
        {
            "MESHLIB_TIMEOUT": "2.5s",
            "MESHLIB_PER_TRY_TIMEOUT": "500ms",
            "MESHLIB_RETRIES": "3",
            "MESHLIB_RETRY_ON": "503, 504,429",
            "MESHLIB_RETRY_NON_IDEMPOTENT": "Yes",
            "MESHLIB_RETRY_BACKOFF_BASE": "10ms",
            "MESHLIB_RETRY_BACKOFF_CAP": "1s",
            "MESHLIB_RETRY_AFTER_CAP": "60",
        }
    )
    assert config.policy == Policy(
        timeout=2.5,
        deadline=math.inf,
        per_try_timeout=0.5,
        retries=3,
        retry_on=frozenset({429, 503, 504}),
        retry_non_idempotent=True,
        backoff_base=0.01,
        backoff_cap=1.0,
        retry_after_cap=60.0,
        hedge=DEFAULT_HEDGE_POLICY,
    )


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False)])
def test_booleans(raw: str, value: bool) -> None:
    assert MeshConfig.from_env({"MESHLIB_RETRY_NON_IDEMPOTENT": raw}).policy.retry_non_idempotent is value


def test_retry_on_none_disables_status_retries() -> None:
    assert MeshConfig.from_env({"MESHLIB_RETRY_ON": "none"}).policy.retry_on == frozenset()


def test_mesh_wide_resilience_variables() -> None:
    config = MeshConfig.from_env(
        {
            "MESHLIB_RETRY_BUDGET_PERCENT": "25%",
            "MESHLIB_RETRY_BUDGET_MIN_PER_SECOND": "0",
            "MESHLIB_RETRY_BUDGET_TTL": "30s",
            "MESHLIB_BREAKER_FAILURES": "7",
            "MESHLIB_BREAKER_RESET": "1m",
            "MESHLIB_OUTLIER_FAILURES": "3",
            "MESHLIB_OUTLIER_BASE_EJECTION": "10s",
            "MESHLIB_OUTLIER_MAX_EJECTION": "2m",
            "MESHLIB_OUTLIER_MAX_PERCENT": "50%",
            "MESHLIB_MAX_INFLIGHT": "64",
        }
    )
    assert config.resilience == ResilienceSettings(
        retry_budget_fraction=0.25,
        retry_budget_min_per_second=0,
        retry_budget_ttl=30.0,
        breaker_failures=7,
        breaker_reset=60.0,
        outlier_failures=3,
        outlier_base_ejection=10.0,
        outlier_max_ejection=120.0,
        outlier_max_percent=50.0,
        max_inflight=64,
    )
    assert MeshConfig.from_env({"MESHLIB_RETRY_BUDGET_PERCENT": "0.1"}).resilience.retry_budget_fraction == 0.1


def test_per_service_settings_override_the_mesh_wide_ones() -> None:
    config = MeshConfig.from_env(
        {
            **SVC,
            "MESHLIB_TIMEOUT": "5s",
            "MESHLIB_RETRIES": "2",
            "MESHLIB_MAX_INFLIGHT": "100",
            "MESHLIB_SERVICE_PAYMENTS__RETRIES": "0",
            "MESHLIB_SERVICE_PAYMENTS__RETRY_NON_IDEMPOTENT": "false",
            "MESHLIB_SERVICE_PAYMENTS__MAX_INFLIGHT": "8",
            "MESHLIB_SERVICE_PAYMENTS__BREAKER_FAILURES": "2",
            "MESHLIB_SERVICE_USERS__LB": "random",
        }
    )
    payments = config.policy_for("PAYMENTS")
    assert payments.complete
    assert (payments.timeout, payments.retries) == (5.0, 0)  # timeout inherited, retries overridden
    assert config.policy_for("USERS") is config.policy  # no per-service policy: the mesh one, same object
    assert config.resilience_for("PAYMENTS") == ResilienceSettings(max_inflight=8, breaker_failures=2)
    assert config.resilience_for("USERS").max_inflight == 100
    svc = config.service("payments")
    assert svc is not None and svc.policy == Policy(retries=0, retry_non_idempotent=False)
    users = config.service("users")
    assert users is not None and users.lb == "random" and users.policy is None and users.resilience is None


def test_every_policy_and_resilience_suffix_works_per_service() -> None:
    samples = {
        "TIMEOUT": "1s",
        "PER_TRY_TIMEOUT": "1s",
        "RETRIES": "1",
        "RETRY_ON": "503",
        "RETRY_NON_IDEMPOTENT": "no",
        "RETRY_BACKOFF_BASE": "1ms",
        "RETRY_BACKOFF_CAP": "1s",
        "RETRY_AFTER_CAP": "1s",
        "RETRY_BUDGET_PERCENT": "0.5",
        "RETRY_BUDGET_MIN_PER_SECOND": "1",
        "RETRY_BUDGET_TTL": "5s",
        "BREAKER_FAILURES": "1",
        "BREAKER_RESET": "1s",
        "OUTLIER_FAILURES": "1",
        "OUTLIER_BASE_EJECTION": "1s",
        "OUTLIER_MAX_EJECTION": "40s",
        "OUTLIER_MAX_PERCENT": "1",
        "MAX_INFLIGHT": "1",
        "ADAPTIVE_CONCURRENCY": "yes",
        "ADAPTIVE_INITIAL_LIMIT": "7",
        "ADAPTIVE_MIN_LIMIT": "2",
        "ADAPTIVE_MAX_LIMIT": "9",
        "ADAPTIVE_WINDOW": "250ms",
        "ADAPTIVE_WINDOW_SAMPLES": "4",
        "OUTLIER_INTERVAL": "2s",
        "OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT": "50",
        "OUTLIER_SUCCESS_RATE_MINIMUM_HOSTS": "3",
        "OUTLIER_SUCCESS_RATE_REQUEST_VOLUME": "7",
        "OUTLIER_SUCCESS_RATE_STDEV_FACTOR": "1000",
        "OUTLIER_FAILURE_PERCENTAGE_ENFORCEMENT_PERCENT": "100",
        "OUTLIER_FAILURE_PERCENTAGE_THRESHOLD": "40",
        "OUTLIER_FAILURE_PERCENTAGE_MINIMUM_HOSTS": "2",
        "OUTLIER_FAILURE_PERCENTAGE_REQUEST_VOLUME": "9",
        "MAX_CONNECTION_AGE": "5m",
        "MAX_CONNECTION_AGE_JITTER": "20%",
        "SLOW_START_WINDOW": "30s",
        "SLOW_START_AGGRESSION": "2",
        "SLOW_START_MIN_WEIGHT_PERCENT": "25",
        "HEDGE_MAX_ATTEMPTS": "3",
        "HEDGE_DELAY": "p99",
        "HEDGE_NON_FATAL": "503",
        "HEDGE_NON_IDEMPOTENT": "yes",
        "HEDGE_MAX_EXTRA_LOAD": "10%",
        "HEDGE_MIN_DELAY": "2ms",
        "HEDGE_WINDOW": "10s",
        "HEDGE_MIN_SAMPLES": "5",
    }
    tls = {suffix for suffix in SERVICE_SETTINGS if suffix.startswith("TLS_")}  # tests/security covers these
    zone = {suffix for suffix in SERVICE_SETTINGS if suffix.startswith("ZONE_")}  # tests/test_config_zone.py
    assert set(samples) | {"LB", "HASH_HEADER"} | tls | zone == set(SERVICE_SETTINGS)
    for suffix, raw in samples.items():
        env = {**SVC, f"MESHLIB_SERVICE_PAYMENTS__{suffix}": raw, f"MESHLIB_{suffix}": raw}
        config = MeshConfig.from_env(env)
        # the same raw value set per service or mesh-wide gives the same answer
        assert config.policy_for("PAYMENTS") == config.policy, suffix
        assert config.resilience_for("PAYMENTS") == config.resilience, suffix


def test_services_argument_keeps_per_service_environment_settings() -> None:
    config = MeshConfig.from_env(
        {**SVC, "MESHLIB_SERVICE_PAYMENTS__RETRIES": "4", "MESHLIB_SERVICE_PAYMENTS__MAX_INFLIGHT": "3"},
        services={"payments": "static://10.0.0.9:9090"},
    )
    assert config.policy_for("PAYMENTS").retries == 4
    assert config.resilience_for("PAYMENTS").max_inflight == 3
    svc = config.service("payments")
    assert svc is not None and svc.target == "static://10.0.0.9:9090"


def test_policy_argument_and_service_config_objects() -> None:
    config = MeshConfig.from_env(
        {"MESHLIB_TIMEOUT": "3s", "MESHLIB_RETRIES": "2"},
        policy=Policy(retries=0),
        services={
            "orders": ServiceConfig(
                name="orders",
                target="static://10.0.0.7:80",
                policy=Policy(timeout=1),
                resilience=ResilienceSettings(max_inflight=5),
            )
        },
    )
    assert (config.policy.timeout, config.policy.retries) == (3.0, 0)
    assert (config.policy_for("ORDERS").timeout, config.policy_for("ORDERS").retries) == (1.0, 0)
    assert config.resilience_for("ORDERS").max_inflight == 5


def test_incomplete_policy_given_to_meshconfig_is_resolved() -> None:
    assert MeshConfig(policy=Policy(retries=4)).policy == DEFAULT_POLICY.merge(Policy(retries=4))


def test_policy_variables_are_known(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="meshlib.config"):
        MeshConfig.from_env({"MESHLIB_TIMEOUT": "1s", "MESHLIB_MAX_INFLIGHT": "5", "MESHLIB_RETRYS": "1"})
    assert "ignoring unknown environment variable MESHLIB_RETRYS" in caplog.text
    assert "variable MESHLIB_TIMEOUT " not in caplog.text


def test_empty_values_are_unset() -> None:
    assert MeshConfig.from_env({"MESHLIB_TIMEOUT": " ", "MESHLIB_MAX_INFLIGHT": ""}).policy == DEFAULT_POLICY


@pytest.mark.parametrize(
    ("env", "variable", "expected"),
    [
        ({"MESHLIB_TIMEOUT": "soon"}, "MESHLIB_TIMEOUT", "a duration"),
        ({"MESHLIB_TIMEOUT": "0"}, "MESHLIB_TIMEOUT", "greater than zero"),
        ({"MESHLIB_PER_TRY_TIMEOUT": "-1s"}, "MESHLIB_PER_TRY_TIMEOUT", "a duration"),
        ({"MESHLIB_RETRIES": "11"}, "MESHLIB_RETRIES", "from 0 to 10"),
        ({"MESHLIB_RETRIES": "two"}, "MESHLIB_RETRIES", "whole number"),
        ({"MESHLIB_RETRY_ON": "503,abc"}, "MESHLIB_RETRY_ON", "HTTP status codes"),
        ({"MESHLIB_RETRY_ON": "503,"}, "MESHLIB_RETRY_ON", "HTTP status codes"),
        ({"MESHLIB_RETRY_ON": "600"}, "MESHLIB_RETRY_ON", "HTTP status codes"),
        ({"MESHLIB_RETRY_NON_IDEMPOTENT": "maybe"}, "MESHLIB_RETRY_NON_IDEMPOTENT", "true/false"),
        ({"MESHLIB_RETRY_BACKOFF_CAP": "10ms"}, "MESHLIB_RETRY_BACKOFF_CAP", "no shorter than the backoff base"),
        ({"MESHLIB_RETRY_BACKOFF_BASE": "1s"}, "MESHLIB_RETRY_BACKOFF_BASE", "no longer than the backoff cap"),
        (
            {"MESHLIB_RETRY_BACKOFF_BASE": "1s", "MESHLIB_RETRY_BACKOFF_CAP": "500ms"},
            "MESHLIB_RETRY_BACKOFF_CAP",
            "backoff_base",
        ),
        ({"MESHLIB_RETRY_AFTER_CAP": "forever"}, "MESHLIB_RETRY_AFTER_CAP", "a duration"),
        ({"MESHLIB_RETRY_BUDGET_PERCENT": "20"}, "MESHLIB_RETRY_BUDGET_PERCENT", "fraction from 0 to 1"),
        ({"MESHLIB_RETRY_BUDGET_PERCENT": "150%"}, "MESHLIB_RETRY_BUDGET_PERCENT", "fraction from 0 to 1"),
        ({"MESHLIB_RETRY_BUDGET_PERCENT": "lots"}, "MESHLIB_RETRY_BUDGET_PERCENT", "fraction from 0 to 1"),
        ({"MESHLIB_RETRY_BUDGET_MIN_PER_SECOND": "1.5"}, "MESHLIB_RETRY_BUDGET_MIN_PER_SECOND", "whole number"),
        ({"MESHLIB_RETRY_BUDGET_TTL": "2m"}, "MESHLIB_RETRY_BUDGET_TTL", "from 1s to 60s"),
        ({"MESHLIB_BREAKER_FAILURES": "0"}, "MESHLIB_BREAKER_FAILURES", "integer >= 1"),
        ({"MESHLIB_BREAKER_RESET": "0"}, "MESHLIB_BREAKER_RESET", "greater than zero"),
        ({"MESHLIB_OUTLIER_FAILURES": "-2"}, "MESHLIB_OUTLIER_FAILURES", "whole number"),
        ({"MESHLIB_OUTLIER_MAX_EJECTION": "10s"}, "MESHLIB_OUTLIER_MAX_EJECTION", "outlier_base_ejection"),
        ({"MESHLIB_OUTLIER_BASE_EJECTION": "10m"}, "MESHLIB_OUTLIER_BASE_EJECTION", "no longer than the maximum"),
        ({"MESHLIB_OUTLIER_MAX_PERCENT": "101"}, "MESHLIB_OUTLIER_MAX_PERCENT", "percentage from 0 to 100"),
        ({"MESHLIB_MAX_INFLIGHT": "0"}, "MESHLIB_MAX_INFLIGHT", "integer >= 1"),
        ({**SVC, "MESHLIB_SERVICE_PAYMENTS__RETRIES": "99"}, "MESHLIB_SERVICE_PAYMENTS__RETRIES", "from 0 to 10"),
        ({**SVC, "MESHLIB_SERVICE_PAYMENTS__TIMEOUT": "x"}, "MESHLIB_SERVICE_PAYMENTS__TIMEOUT", "a duration"),
        (
            {**SVC, "MESHLIB_SERVICE_PAYMENTS__MAX_INFLIGHT": "0"},
            "MESHLIB_SERVICE_PAYMENTS__MAX_INFLIGHT",
            "integer >= 1",
        ),
        (
            {**SVC, "MESHLIB_RETRY_BACKOFF_CAP": "1s", "MESHLIB_SERVICE_PAYMENTS__RETRY_BACKOFF_BASE": "2s"},
            "MESHLIB_SERVICE_PAYMENTS__RETRY_BACKOFF_BASE",
            "no longer than the backoff cap",
        ),
        (
            {**SVC, "MESHLIB_SERVICE_PAYMENTS__OUTLIER_BASE_EJECTION": "1h"},
            "MESHLIB_SERVICE_PAYMENTS__OUTLIER_BASE_EJECTION",
            "no longer than the maximum",
        ),
        ({"MESHLIB_SERVICE_GHOST__RETRIES": "1"}, "MESHLIB_SERVICE_GHOST__RETRIES", "declared by"),
    ],
)
def test_bad_values_name_variable_value_and_expectation(env: dict[str, str], variable: str, expected: str) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        MeshConfig.from_env(env)
    assert info.value.variable == variable
    assert variable in str(info.value)
    assert expected in str(info.value)
    assert repr(env[variable]) in str(info.value)


def test_bad_policy_variable_fails_at_client_construction() -> None:
    with pytest.raises(meshlib.ConfigError, match="MESHLIB_RETRIES='-1'"):
        meshlib.Client(environ={"MESHLIB_RETRIES": "-1"})


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"retry_budget_fraction": 2.0}, "retry_budget_fraction"),
        ({"retry_budget_ttl": 0.5}, "retry_budget_ttl"),
        ({"breaker_failures": 0}, "breaker_failures"),
        ({"max_inflight": 1.5}, "max_inflight"),
        ({"outlier_base_ejection": 400.0}, "outlier_max_ejection"),
        ({"outlier_max_percent": -1}, "outlier_max_percent"),
        ({"breaker_reset": math.inf}, "breaker_reset"),
    ],
)
def test_resilience_settings_validate_in_code(fields: dict[str, object], field: str) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        ResilienceSettings(**fields)  # type: ignore[arg-type]
    assert info.value.variable == f"ResilienceSettings.{field}"
