"""The split of the settings into ``meshlib._config`` (parse, model, env) and what must hold across it."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest

import meshlib
import meshlib._config
import meshlib.config
from meshlib._config import env, model, parse
from meshlib.config import MeshConfig, ResilienceSettings
from meshlib.policy import Policy
from meshlib.security.tls import TLSSettings

pytestmark = pytest.mark.one_library

#: Every public name ``meshlib/config.py`` defined before the split; other code imports them from there.
CONFIG_NAMES = {
    "ENV_PREFIX",
    "INNER_TRANSPORTS",
    "KNOWN",
    "LB_NAMES",
    "MeshConfig",
    "ResilienceSettings",
    "SERVICE_PREFIX",
    "SERVICE_SETTINGS",
    "SERVICE_SETTING_SEPARATOR",
    "ServiceConfig",
    "logger",
    "parse_admin_addr",
    "parse_duration",
    "parse_inner_transport",
    "parse_port",
    "service_key",
}

SETTINGS_CLASSES: tuple[type[Any], ...] = (MeshConfig, model.ServiceConfig, ResilienceSettings, Policy, TLSSettings)
ENV_TABLES = (env._GLOBALS, env._POLICY_SETTINGS, env._RESILIENCE_SETTINGS, env._TLS_SETTINGS)


def test_meshlib_config_still_exports_every_name_as_the_same_object() -> None:
    assert set(meshlib.config.__all__) == CONFIG_NAMES
    for name in CONFIG_NAMES:
        assert getattr(meshlib.config, name) is getattr(meshlib._config, name), name
    assert meshlib.MeshConfig is meshlib.config.MeshConfig is model.MeshConfig
    assert meshlib.ResilienceSettings is model.ResilienceSettings


def test_unknown_variable_warnings_keep_their_logger_name() -> None:
    assert meshlib.config.logger.name == "meshlib.config"


def _module_imports(module: object) -> set[str]:
    """Modules a module imports at its top level (imports inside functions are not import-time edges)."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text())  # type: ignore[arg-type]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_layers_import_one_way_parse_model_env() -> None:
    """parse <- model <- env, and none of them imports meshlib.config: no import cycle inside the package."""
    assert not {name for name in _module_imports(parse) if name.startswith("meshlib._config")}
    assert {name for name in _module_imports(model) if name.startswith("meshlib._config")} == {"meshlib._config.parse"}
    assert {name for name in _module_imports(env) if name.startswith("meshlib._config")} == {
        "meshlib._config.model",
        "meshlib._config.parse",
    }
    for module in (parse, model, env):
        assert "meshlib.config" not in _module_imports(module)
        assert "meshlib" not in _module_imports(module)


def test_no_percent_attribute_holds_a_fraction() -> None:
    """A ``*_percent`` setting is 0-100 (``10`` = 10 %); a share from 0 to 1 is named ``*_fraction``."""
    percent_fields = []
    for cls in SETTINGS_CLASSES:
        for item in dataclasses.fields(cls):
            fifty: dict[str, Any] = {item.name: 50.0}
            if item.name.endswith("_percent"):
                percent_fields.append((cls, item.name))
                cls(**fifty)  # a fraction would refuse anything above 1
            if item.name.endswith("_fraction"):
                with pytest.raises(meshlib.ConfigError):
                    cls(**fifty)
    assert (ResilienceSettings, "outlier_max_percent") in percent_fields
    for table in ENV_TABLES:
        for suffix, (attr, parser) in table.items():
            if attr.endswith("_percent"):
                assert parser(suffix, "20%") == parser(suffix, "20") == 20.0, suffix
            if attr.endswith("_fraction"):
                assert parser(suffix, "20%") == parser(suffix, "0.2") == 0.2, suffix
    assert "retry_budget_percent" not in {item.name for item in dataclasses.fields(ResilienceSettings)}


def test_the_retry_budget_variable_keeps_its_name_and_sets_the_fraction() -> None:
    assert env._RESILIENCE_SETTINGS["RETRY_BUDGET_PERCENT"] == ("retry_budget_fraction", parse.parse_fraction)
    assert "MESHLIB_RETRY_BUDGET_PERCENT" in meshlib.config.KNOWN
    assert "MESHLIB_SERVICE_PAYMENTS__RETRY_BUDGET_PERCENT" not in meshlib.config.KNOWN  # per service: by suffix
    assert meshlib.config.SERVICE_SETTINGS["RETRY_BUDGET_PERCENT"] == "resilience"
    config = MeshConfig.from_env(
        {
            "MESHLIB_RETRY_BUDGET_PERCENT": "30%",
            "MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.5:8080",
            "MESHLIB_SERVICE_PAYMENTS__RETRY_BUDGET_PERCENT": "0.05",
        }
    )
    assert config.resilience.retry_budget_fraction == pytest.approx(0.3)
    assert config.resilience_for("PAYMENTS").retry_budget_fraction == 0.05


def test_from_env_builds_the_class_it_is_called_on() -> None:
    assert type(MeshConfig.from_env({})) is MeshConfig
    assert env.mesh_config_from_env(MeshConfig, {}) == MeshConfig.from_env({})
