"""``MESHLIB_ROUTES_FILE``, ``MESHLIB_ROUTES_RELOAD_INTERVAL`` and ``MESHLIB_NAMESPACE`` read into MeshConfig."""

from __future__ import annotations

import pytest

import meshlib
from meshlib.config import MeshConfig

pytestmark = pytest.mark.one_library


def test_defaults() -> None:
    config = MeshConfig.from_env({})
    assert (config.routes_file, config.routes_reload_interval, config.namespace) == (None, 1.0, None)


@pytest.mark.parametrize(
    ("env", "attr", "value"),
    [
        ({"MESHLIB_ROUTES_FILE": " /etc/mesh/routes.yaml "}, "routes_file", "/etc/mesh/routes.yaml"),
        ({"MESHLIB_ROUTES_FILE": "routes dir/r.json"}, "routes_file", "routes dir/r.json"),
        ({"MESHLIB_ROUTES_FILE": ""}, "routes_file", None),
        ({"MESHLIB_ROUTES_RELOAD_INTERVAL": "500ms"}, "routes_reload_interval", 0.5),
        ({"MESHLIB_ROUTES_RELOAD_INTERVAL": "1m30s"}, "routes_reload_interval", 90.0),
        ({"MESHLIB_ROUTES_RELOAD_INTERVAL": "0"}, "routes_reload_interval", 0.0),
        ({"MESHLIB_NAMESPACE": "payments-prod"}, "namespace", "payments-prod"),
        ({"MESHLIB_NAMESPACE": " default "}, "namespace", "default"),
        ({"MESHLIB_NAMESPACE": "a" * 63}, "namespace", "a" * 63),
    ],
)
def test_values(env: dict[str, str], attr: str, value: object) -> None:
    assert getattr(MeshConfig.from_env(env), attr) == value


@pytest.mark.parametrize(
    ("env", "variable", "expected"),
    [
        ({"MESHLIB_ROUTES_FILE": "/etc/mesh/\nroutes.yaml"}, "MESHLIB_ROUTES_FILE", "no NUL or other control"),
        ({"MESHLIB_ROUTES_FILE": "/etc/\x00x"}, "MESHLIB_ROUTES_FILE", "a file path"),
        ({"MESHLIB_ROUTES_RELOAD_INTERVAL": "often"}, "MESHLIB_ROUTES_RELOAD_INTERVAL", "a duration"),
        ({"MESHLIB_ROUTES_RELOAD_INTERVAL": "-1s"}, "MESHLIB_ROUTES_RELOAD_INTERVAL", "not a negative duration"),
        ({"MESHLIB_ROUTES_RELOAD_INTERVAL": "1000h"}, "MESHLIB_ROUTES_RELOAD_INTERVAL", "at most 720h"),
        ({"MESHLIB_NAMESPACE": "Payments"}, "MESHLIB_NAMESPACE", "RFC 1123 DNS label"),
        ({"MESHLIB_NAMESPACE": "-payments"}, "MESHLIB_NAMESPACE", "RFC 1123 DNS label"),
        ({"MESHLIB_NAMESPACE": "pay_ments"}, "MESHLIB_NAMESPACE", "RFC 1123 DNS label"),
        ({"MESHLIB_NAMESPACE": "pay.ments"}, "MESHLIB_NAMESPACE", "RFC 1123 DNS label"),
        ({"MESHLIB_NAMESPACE": "a" * 64}, "MESHLIB_NAMESPACE", "at most 63"),
        ({"MESHLIB_MIRROR_CONCURRENCY": "0"}, "MESHLIB_MIRROR_CONCURRENCY", "from 1 to 10,000"),
        ({"MESHLIB_MIRROR_CONCURRENCY": "10001"}, "MESHLIB_MIRROR_CONCURRENCY", "from 1 to 10,000"),
        ({"MESHLIB_MIRROR_CONCURRENCY": "-1"}, "MESHLIB_MIRROR_CONCURRENCY", "whole number"),
    ],
)
def test_bad_values_name_variable_value_and_expectation(env: dict[str, str], variable: str, expected: str) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        MeshConfig.from_env(env)
    assert info.value.variable == variable
    assert f"{variable}=" in str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("routes_file", ""),
        ("routes_file", "a\nb"),
        ("routes_reload_interval", -1.0),
        ("routes_reload_interval", float("nan")),
        ("namespace", "Bad"),
        ("namespace", ""),
        ("mirror_concurrency", 0),
        ("mirror_concurrency", True),
    ],
)
def test_bad_values_in_code_name_the_field(field: str, value: object) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        MeshConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.variable == f"MeshConfig.{field}"


def test_the_new_variables_are_known(caplog: pytest.LogCaptureFixture) -> None:
    MeshConfig.from_env(
        {"MESHLIB_ROUTES_FILE": "/r.yaml", "MESHLIB_ROUTES_RELOAD_INTERVAL": "2s", "MESHLIB_NAMESPACE": "ns"}
    )
    assert "unknown environment variable" not in caplog.text
