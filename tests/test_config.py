"""Configuration from MESHLIB_* variables: parsing, per-service overrides, and errors that say what is wrong."""

from __future__ import annotations

import pytest

import meshlib
from meshlib.config import MeshConfig, parse_duration, service_key


def test_service_variables_and_per_service_settings() -> None:
    config = MeshConfig.from_env(
        {
            "MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.5:8080,10.0.0.6:8080",
            "MESHLIB_SERVICE_USER_API": "dns+srv://_http._tcp.users.internal",
            "MESHLIB_SERVICE_USER_API__LB": "ring_hash",
            "MESHLIB_SERVICE_USER_API__HASH_HEADER": "X-User",
            "MESHLIB_LB": "round_robin",
            "MESHLIB_DNS_SERVERS": "127.0.0.1:5353,[::1]",
            "MESHLIB_DNS_TTL_MIN": "250ms",
        }
    )
    assert config.lb == "round_robin"
    assert config.dns_servers == (("127.0.0.1", 5353), ("::1", 53))
    assert config.ttl_min == 0.25
    users = config.service("user-api")
    assert users is not None and users.lb == "ring_hash" and users.hash_header == "X-User"
    assert config.service("USER.API") is users  # '.' and '-' both map to '_'
    payments = config.service("payments")
    assert payments is not None and payments.lb is None and payments.variable == "MESHLIB_SERVICE_PAYMENTS"
    assert config.service("example.com") is None


def test_arguments_override_environment() -> None:
    config = MeshConfig.from_env(
        {"MESHLIB_LB": "random", "MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.5:8080"},
        lb="least_request",
        services={"payments": "static://10.0.0.9:9090"},
    )
    assert config.lb == "least_request"
    svc = config.service("payments")
    assert svc is not None and svc.target == "static://10.0.0.9:9090"


def test_service_key() -> None:
    assert service_key("user-api.internal") == "USER_API_INTERNAL"


@pytest.mark.parametrize(
    ("raw", "seconds"), [("2", 2.0), ("1.5s", 1.5), ("250ms", 0.25), ("5m", 300.0), ("1h", 3600.0), (".5", 0.5)]
)
def test_durations(raw: str, seconds: float) -> None:
    assert parse_duration("X", raw) == seconds


@pytest.mark.parametrize(
    ("env", "variable", "expected"),
    [
        ({"MESHLIB_LB": "fastest"}, "MESHLIB_LB", "one of p2c_ewma"),
        ({"MESHLIB_DNS_SERVERS": "nonsense"}, "MESHLIB_DNS_SERVERS", "nameserver IP addresses"),
        ({"MESHLIB_DNS_SERVERS": "127.0.0.1:70000"}, "MESHLIB_DNS_SERVERS", "port number from 1 to 65535"),
        ({"MESHLIB_DNS_TIMEOUT": "soon"}, "MESHLIB_DNS_TIMEOUT", "a duration"),
        ({"MESHLIB_DNS_TIMEOUT": "0"}, "MESHLIB_DNS_TIMEOUT", "greater than zero"),
        ({"MESHLIB_DNS_TTL_MIN": "10m", "MESHLIB_DNS_TTL_MAX": "1m"}, "MESHLIB_DNS_TTL_MIN", "no larger than"),
        ({"MESHLIB_HASH_HEADER": "not a header"}, "MESHLIB_HASH_HEADER", "an HTTP header name"),
        ({"MESHLIB_SERVICE_": "static://a:1"}, "MESHLIB_SERVICE_", "service name"),
        ({"MESHLIB_SERVICE_PAYMENTS": "  "}, "MESHLIB_SERVICE_PAYMENTS", "discovery target URI"),
        ({"MESHLIB_SERVICE_PAYMENTS__COLOUR": "red"}, "MESHLIB_SERVICE_PAYMENTS__COLOUR", "per-service setting"),
        ({"MESHLIB_SERVICE_GHOST__LB": "random"}, "MESHLIB_SERVICE_GHOST__LB", "declared by MESHLIB_SERVICE_GHOST"),
        (
            {"MESHLIB_SERVICE_PAYMENTS": "static://a:1", "MESHLIB_SERVICE_PAYMENTS__LB": "fastest"},
            "MESHLIB_SERVICE_PAYMENTS__LB",
            "one of p2c_ewma",
        ),
    ],
)
def test_bad_values_name_variable_value_and_expectation(env: dict[str, str], variable: str, expected: str) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        MeshConfig.from_env(env)
    assert info.value.variable == variable
    assert variable in str(info.value)
    assert expected in str(info.value)
    assert str(info.value.value) in str(info.value)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("gopher://payments", "scheme"),
        ("static://10.0.0.5:70000", "65535"),
        ("static://10.0.0.5", "port"),
        ("dns://payments.internal", "port"),
    ],
)
def test_bad_targets_fail_at_client_construction(target: str, expected: str) -> None:
    env = {"MESHLIB_SERVICE_PAYMENTS": target}
    with pytest.raises(meshlib.ConfigError) as info:
        meshlib.Client(environ=env)
    assert info.value.variable == "MESHLIB_SERVICE_PAYMENTS"
    assert target in str(info.value)
    assert expected in str(info.value)


def test_bad_lb_fails_at_async_client_construction() -> None:
    with pytest.raises(meshlib.ConfigError, match="MESHLIB_LB='fastest'"):
        meshlib.AsyncClient(environ={"MESHLIB_LB": "fastest"})


def test_unknown_variable_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    MeshConfig.from_env({"MESHLIB_LBB": "random"})
    assert "MESHLIB_LBB" in caplog.text


# -- rate-based outlier ejection (issue 15) -------------------------------------------------------------------------


def test_rate_based_outlier_settings_default_to_envoys_and_read_per_service() -> None:
    from meshlib.resilience import FailurePercentageEjection, SuccessRateEjection

    config = MeshConfig.from_env(
        {
            "MESHLIB_OUTLIER_INTERVAL": "2s",
            "MESHLIB_OUTLIER_FAILURE_PERCENTAGE_ENFORCEMENT_PERCENT": "100%",
            "MESHLIB_OUTLIER_FAILURE_PERCENTAGE_THRESHOLD": "40",
            "MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.5:8080",
            "MESHLIB_SERVICE_PAYMENTS__OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT": "0",
            "MESHLIB_SERVICE_PAYMENTS__OUTLIER_FAILURE_PERCENTAGE_REQUEST_VOLUME": "7",
        }
    )
    default = meshlib.ResilienceSettings()
    assert default.outlier_interval == 10.0
    assert default.outlier_success_rate == SuccessRateEjection(1900, 100, 5, 100)  # on, as in Envoy
    assert default.outlier_failure_percentage is None  # off (enforcement 0), as in Envoy
    assert config.resilience.outlier_interval == 2.0
    assert config.resilience.outlier_failure_percentage == FailurePercentageEjection(40, 100, 5, 50)
    payments = config.resilience_for("PAYMENTS")
    assert payments.outlier_success_rate is None
    assert payments.outlier_failure_percentage == FailurePercentageEjection(40, 100, 5, 7)
    assert payments.outlier_interval == 2.0


@pytest.mark.parametrize(
    ("variable", "raw", "expected"),
    [
        ("MESHLIB_OUTLIER_INTERVAL", "0", "greater than zero"),
        ("MESHLIB_OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT", "101", "whole percentage from 0 to 100"),
        ("MESHLIB_OUTLIER_FAILURE_PERCENTAGE_THRESHOLD", "8.5", "whole percentage from 0 to 100"),
        ("MESHLIB_OUTLIER_SUCCESS_RATE_STDEV_FACTOR", "-1", "whole number"),
        ("MESHLIB_OUTLIER_SUCCESS_RATE_MINIMUM_HOSTS", "10000000000", "at most 1,000,000,000"),
        ("MESHLIB_SERVICE_PAYMENTS__OUTLIER_FAILURE_PERCENTAGE_REQUEST_VOLUME", "many", "whole number"),
    ],
)
def test_bad_rate_based_outlier_settings_name_the_variable(variable: str, raw: str, expected: str) -> None:
    with pytest.raises(meshlib.ConfigError) as error:
        MeshConfig.from_env({"MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.5:8080", variable: raw})
    assert error.value.variable == variable
    assert expected in str(error.value)
