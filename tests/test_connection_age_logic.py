"""Maximum connection age: the jitter of each connection's lifetime, and its settings (pure logic, no sockets)."""

from __future__ import annotations

import random

import pytest

from meshlib import ConfigError
from meshlib._config import MeshConfig
from meshlib._connection_age import DEFAULT_JITTER, ConnectionAge

pytestmark = pytest.mark.one_library


def test_jitter_keeps_each_lifetime_within_bounds_and_spreads_them() -> None:
    age = ConnectionAge(300.0, rng=random.Random(7))
    assert age.jitter == DEFAULT_JITTER == 0.1  # gRFC A9: +/-10 %
    lifetimes = [age.lifetime() for _ in range(2000)]
    assert all(270.0 <= life <= 330.0 for life in lifetimes)
    assert min(lifetimes) < 280.0 and max(lifetimes) > 320.0  # spread over the whole range, not bunched
    assert sum(life < 300.0 for life in lifetimes) > 800  # both sides of the age
    assert sum(life > 300.0 for life in lifetimes) > 800


def test_no_jitter_is_the_age_itself() -> None:
    assert {ConnectionAge(60.0, 0.0).lifetime() for _ in range(10)} == {60.0}


@pytest.mark.parametrize(("max_age", "jitter"), [(0, 0.1), (-1, 0.1), (float("inf"), 0.1), (10, -0.1), (10, 0.6)])
def test_bad_values_are_refused(max_age: float, jitter: float) -> None:
    with pytest.raises(ValueError, match=r"max_age|jitter"):
        ConnectionAge(max_age, jitter)


def test_off_by_default() -> None:
    config = MeshConfig.from_env({"MESHLIB_SERVICE_SVC": "static://127.0.0.1:1"})
    assert config.resilience.max_connection_age == 0.0
    assert config.resilience.max_connection_age_jitter == 0.1
    assert config.resilience_for("SVC").connection_age() is None


def test_settings_mesh_wide_and_per_service() -> None:
    config = MeshConfig.from_env(
        {
            "MESHLIB_MAX_CONNECTION_AGE": "5m",
            "MESHLIB_MAX_CONNECTION_AGE_JITTER": "20%",
            "MESHLIB_SERVICE_A": "static://127.0.0.1:1",
            "MESHLIB_SERVICE_B": "static://127.0.0.1:2",
            "MESHLIB_SERVICE_B__MAX_CONNECTION_AGE": "0",
            "MESHLIB_SERVICE_C": "static://127.0.0.1:3",
            "MESHLIB_SERVICE_C__MAX_CONNECTION_AGE_JITTER": "0.05",
        }
    )
    a = config.resilience_for("A").connection_age()
    assert a is not None and (a.max_age, a.jitter) == (300.0, 0.2)
    assert config.resilience_for("B").connection_age() is None  # a service turns it off
    c = config.resilience_for("C").connection_age()
    assert c is not None and (c.max_age, c.jitter) == (300.0, 0.05)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("MESHLIB_MAX_CONNECTION_AGE", "soon"),
        ("MESHLIB_MAX_CONNECTION_AGE", "-5m"),
        ("MESHLIB_MAX_CONNECTION_AGE_JITTER", "60%"),
        ("MESHLIB_MAX_CONNECTION_AGE_JITTER", "lots"),
        ("MESHLIB_SERVICE_SVC__MAX_CONNECTION_AGE_JITTER", "0.9"),
    ],
)
def test_bad_settings_name_the_variable(variable: str, raw: str) -> None:
    env = {"MESHLIB_SERVICE_SVC": "static://127.0.0.1:1", variable: raw}
    with pytest.raises(ConfigError) as caught:
        MeshConfig.from_env(env)
    assert caught.value.variable == variable
    assert raw in str(caught.value)
