"""Zone-aware routing settings: MESHLIB_ZONE*, mesh-wide and per service, with errors naming the variable."""

from __future__ import annotations

import logging

import pytest

from meshlib._config.env import zone_settings_from_env
from meshlib._config.model import ZoneSettings
from meshlib.config import MeshConfig
from meshlib.errors import ConfigError

pytestmark = pytest.mark.one_library


def test_defaults_are_off() -> None:
    settings = zone_settings_from_env({})
    assert settings == ZoneSettings(zone=None, min_cluster_size=6, failover=False, failover_order=())
    assert not settings.enabled


def test_mesh_wide_and_per_service_settings() -> None:
    env = {
        "MESHLIB_ZONE": " us-east-1a ",
        "MESHLIB_ZONE_MIN_CLUSTER_SIZE": "10",
        "MESHLIB_ZONE_FAILOVER": "us-east-1c, us-east-1b",
        "MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.1:80",
        "MESHLIB_SERVICE_PAYMENTS__ZONE_MIN_CLUSTER_SIZE": "3",
        "MESHLIB_SERVICE_PAYMENTS__ZONE_FAILOVER": "off",
    }
    mesh = zone_settings_from_env(env)
    assert mesh == ZoneSettings("us-east-1a", 10, True, ("us-east-1c", "us-east-1b"))
    assert zone_settings_from_env(env, "PAYMENTS") == ZoneSettings("us-east-1a", 3, False, ())
    assert zone_settings_from_env({**env, "MESHLIB_ZONE_FAILOVER": "1"}).failover_order == ()
    MeshConfig.from_env(env)  # accepted at construction, with the per-service suffixes


@pytest.mark.parametrize(
    ("variable", "raw", "expected"),
    [
        ("MESHLIB_ZONE", "us east", "a zone name"),
        ("MESHLIB_ZONE_MIN_CLUSTER_SIZE", "-1", "a whole number"),
        ("MESHLIB_ZONE_MIN_CLUSTER_SIZE", "2000000", "0 to 1,000,000"),
        ("MESHLIB_ZONE_FAILOVER", "b,,c", "distinct zone names"),
        ("MESHLIB_ZONE_FAILOVER", "b,b", "distinct zone names"),
        ("MESHLIB_SERVICE_PAYMENTS__ZONE_FAILOVER", "maybe?", "0/off, 1/on"),
    ],
)
def test_bad_values_fail_at_construction_naming_the_variable(variable: str, raw: str, expected: str) -> None:
    env = {"MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.1:80", variable: raw}
    with pytest.raises(ConfigError) as caught:
        MeshConfig.from_env(env)
    assert caught.value.variable == variable and caught.value.value == raw and expected in caught.value.expected


def test_zone_variables_are_known(caplog: pytest.LogCaptureFixture) -> None:
    env = {"MESHLIB_ZONE": "a", "MESHLIB_ZONE_FAILOVER": "1", "MESHLIB_ZONE_MIN_CLUSTER_SIZE": "6"}
    env["MESHLIB_CONSUL_ZONE_KEY"] = "az"
    with caplog.at_level(logging.WARNING, logger="meshlib.config"):
        MeshConfig.from_env(env)
    assert "unknown environment variable" not in caplog.text
