"""CDS ``slow_start_config`` (Envoy; gRPC ignores it): read from the round robin and least request configs, legacy
and A52 typed, validated with the field path, and applied as the service's ``slow_start_*`` settings."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2

from meshlib._config.model import ResilienceSettings
from meshlib.control.xds.resources.cds import SlowStartConfig, validate_cluster
from meshlib.control.xds.resources.errors import XdsResourceError

pytestmark = pytest.mark.one_library

Cluster = cluster_pb2.Cluster


def eds_cluster() -> Any:
    cluster = Cluster(name="payments", type=Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    return cluster


def fill(config: Any, window: int | None = 30, aggression: float | None = 2.0, percent: float | None = 5.0) -> None:
    if window is not None:
        config.slow_start_window.seconds = window
    if aggression is not None:
        config.aggression.default_value = aggression
        config.aggression.runtime_key = "ignored"
    if percent is not None:
        config.min_weight_percent.value = percent


def test_round_robin_lb_config_maps_and_applies() -> None:
    cluster = eds_cluster()
    cluster.lb_policy = Cluster.ROUND_ROBIN
    fill(cluster.round_robin_lb_config.slow_start_config)
    update = validate_cluster(cluster)
    assert update.slow_start == SlowStartConfig(30.0, 2.0, 5.0)
    settings = update.resilience(ResilienceSettings())
    assert settings.slow_start.window == 30.0
    assert settings.slow_start.aggression == 2.0
    assert settings.slow_start.min_weight_percent == 5.0


def test_least_request_lb_config_defaults_are_envoys() -> None:
    cluster = eds_cluster()
    cluster.lb_policy = Cluster.LEAST_REQUEST
    fill(cluster.least_request_lb_config.slow_start_config, aggression=None, percent=None)
    assert validate_cluster(cluster).slow_start == SlowStartConfig(30.0, 1.0, 10.0)


def test_no_slow_start_config_keeps_the_service_settings() -> None:
    cluster = eds_cluster()
    cluster.lb_policy = Cluster.ROUND_ROBIN
    update = validate_cluster(cluster)
    assert update.slow_start is None
    base = ResilienceSettings(slow_start_window=60.0)
    assert update.resilience(base).slow_start_window == 60.0
    # A least request config under ROUND_ROBIN is not the chosen policy's: not read.
    fill(cluster.least_request_lb_config.slow_start_config)
    assert validate_cluster(cluster).slow_start is None


@pytest.mark.parametrize("message", [round_robin_pb2.RoundRobin, least_request_pb2.LeastRequest])
def test_typed_policy_slow_start_config(message: Any) -> None:
    cluster = eds_cluster()
    typed = message()
    fill(typed.slow_start_config, window=10, aggression=None, percent=20.0)
    entry = cluster.load_balancing_policy.policies.add()
    entry.typed_extension_config.name = "p0"
    entry.typed_extension_config.typed_config.Pack(typed)
    assert validate_cluster(cluster).slow_start == SlowStartConfig(10.0, 1.0, 20.0)


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda c: setattr(c.aggression, "default_value", 0.0), "aggression.default_value"),
        (lambda c: setattr(c.aggression, "default_value", -1.0), "aggression.default_value"),
        (lambda c: setattr(c.min_weight_percent, "value", 150.0), "min_weight_percent.value"),
        (lambda c: setattr(c.slow_start_window, "seconds", -5), "slow_start_window"),
        (lambda c: setattr(c.slow_start_window, "seconds", 40 * 24 * 3600), "slow_start_window"),
    ],
)
def test_invalid_values_are_nacked_with_their_path(mutate: Any, path: str) -> None:
    cluster = eds_cluster()
    cluster.lb_policy = Cluster.ROUND_ROBIN
    config = cluster.round_robin_lb_config.slow_start_config
    fill(config)
    mutate(config)
    with pytest.raises(XdsResourceError) as info:
        validate_cluster(cluster)
    assert info.value.path == f"round_robin_lb_config.slow_start_config.{path}", str(info.value)
