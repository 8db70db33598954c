"""``MESHLIB_SLOW_START_*``, mesh-wide and per service: parsed into ResilienceSettings, bad values named."""

from __future__ import annotations

import pytest

from meshlib._config.model import ResilienceSettings
from meshlib.balance.slow_start import SlowStart
from meshlib.config import MeshConfig
from meshlib.errors import ConfigError

pytestmark = pytest.mark.one_library


def test_defaults_are_off_linear_and_ten_percent() -> None:
    assert MeshConfig.from_env({}).resilience.slow_start == SlowStart(0.0, 1.0, 10.0)


def test_mesh_wide_and_per_service() -> None:
    config = MeshConfig.from_env(
        {
            "MESHLIB_SLOW_START_WINDOW": "30s",
            "MESHLIB_SLOW_START_MIN_WEIGHT_PERCENT": "20%",
            "MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:1",
            "MESHLIB_SERVICE_PAYMENTS__SLOW_START_AGGRESSION": "2.5",
            "MESHLIB_SERVICE_PAYMENTS__SLOW_START_WINDOW": "2m",
        }
    )
    assert config.resilience.slow_start == SlowStart(30.0, 1.0, 20.0)
    payments = config.service("payments")
    assert payments is not None and payments.resilience is not None
    assert payments.resilience.slow_start == SlowStart(120.0, 2.5, 20.0)


@pytest.mark.parametrize(
    ("variable", "raw", "expected"),
    [
        ("MESHLIB_SLOW_START_WINDOW", "soon", "a duration"),
        ("MESHLIB_SLOW_START_WINDOW", "-1s", "not a negative duration"),
        ("MESHLIB_SLOW_START_AGGRESSION", "0", "greater than 0"),
        ("MESHLIB_SLOW_START_AGGRESSION", "fast", "greater than 0"),
        ("MESHLIB_SLOW_START_AGGRESSION", "-1", "greater than 0"),
        ("MESHLIB_SLOW_START_MIN_WEIGHT_PERCENT", "101", "from 0 to 100"),
        ("MESHLIB_SERVICE_PAYMENTS__SLOW_START_AGGRESSION", "0", "greater than 0"),
    ],
)
def test_bad_values_name_the_variable_and_the_value(variable: str, raw: str, expected: str) -> None:
    env = {"MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:1", variable: raw}
    with pytest.raises(ConfigError) as info:
        MeshConfig.from_env(env)
    assert info.value.variable == variable
    assert raw in str(info.value) and expected in str(info.value)


def test_settings_object_names_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        ResilienceSettings(slow_start_aggression=0.0)
    assert info.value.variable == "ResilienceSettings.slow_start_aggression"
