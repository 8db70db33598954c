"""The telemetry settings: ``MESHLIB_ADMIN_ADDR`` (loopback only) and ``MESHLIB_PROPAGATE_TO``."""

from __future__ import annotations

import pytest

import meshlib
from meshlib.config import MeshConfig
from meshlib.telemetry.propagation import PropagationRule

pytestmark = pytest.mark.one_library


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:9901", ("127.0.0.1", 9901)),
        ("127.0.0.2:9901", ("127.0.0.2", 9901)),
        ("[::1]:9901", ("::1", 9901)),
        ("localhost:9901", ("127.0.0.1", 9901)),
        (" 127.0.0.1:0 ", ("127.0.0.1", 0)),
    ],
)
def test_admin_addr_accepts_loopback(raw: str, expected: tuple[str, int]) -> None:
    assert MeshConfig.from_env({"MESHLIB_ADMIN_ADDR": raw}).admin_addr == expected


@pytest.mark.parametrize(
    "raw",
    [
        "0.0.0.0:9901",
        "[::]:9901",
        "192.168.1.5:9901",
        "[::ffff:10.0.0.1]:1",
        "example.com:9901",
        "127.0.0.1",
        "127.0.0.1:99999",
        "::1:9901",
        "[::1]9901",
        "127.0.0.1:http",
    ],
)
def test_admin_addr_refuses_anything_else(raw: str) -> None:
    with pytest.raises(meshlib.ConfigError, match="loopback") as error:
        MeshConfig.from_env({"MESHLIB_ADMIN_ADDR": raw})
    assert error.value.variable == "MESHLIB_ADMIN_ADDR"


def test_no_admin_and_no_propagation_by_default() -> None:
    config = MeshConfig.from_env({})
    assert config.admin_addr is None
    assert config.propagate_to == ()


def test_propagate_to_hosts_and_domains() -> None:
    config = MeshConfig.from_env({"MESHLIB_PROPAGATE_TO": "Gateway.Corp.Example, .internal ,10.0.0.7,[::1]"})
    assert config.propagate_to == ("gateway.corp.example", ".internal", "10.0.0.7", "::1")
    rule = PropagationRule(config.propagate_to)
    assert rule.matches("gateway.corp.example") and rule.matches("GATEWAY.corp.example.")
    assert rule.matches("internal") and rule.matches("billing.internal") and rule.matches("a.b.internal")
    assert rule.matches("10.0.0.7") and rule.matches("::1")
    assert not rule.matches("corp.example") and not rule.matches("notinternal") and not rule.matches("10.0.0.8")
    assert not PropagationRule(())


@pytest.mark.parametrize("raw", ["a,,b", "*", "http://x", "host name", "a/b"])
def test_propagate_to_refuses_what_is_not_a_host(raw: str) -> None:
    with pytest.raises(meshlib.ConfigError, match="MESHLIB_PROPAGATE_TO"):
        MeshConfig.from_env({"MESHLIB_PROPAGATE_TO": raw})
