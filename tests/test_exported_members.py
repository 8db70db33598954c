"""``meshlib.__all__`` is the public contract (as in httpx's test_exported_members): exact, importable, documented."""

from __future__ import annotations

import inspect

import httpx as httpx_module
import pytest

import meshlib
from tests.httplib import httpx

PUBLIC = {
    "AsyncClient",
    "CircuitOpenError",
    "ClientClosedError",
    "Client",
    "ConfigError",
    "ConsulACLError",
    "DeadlineExceeded",
    "DiscoveryError",
    "Endpoint",
    "Explanation",
    "HedgePolicy",
    "IdentityError",
    "MeshConfig",
    "MeshError",
    "MeshStatus",
    "NoEndpointsError",
    "OverloadedError",
    "Policy",
    "RedirectRefusedError",
    "ResilienceSettings",
    "ServiceConfig",
    "TLSSettings",
    "__version__",
    "current_deadline",
    "find_identity_error",
    "http_library",
    "policy",
}


def test_all_is_the_contract() -> None:
    assert set(meshlib.__all__) == PUBLIC
    assert len(meshlib.__all__) == len(set(meshlib.__all__))


def test_every_public_name_exists_and_is_documented() -> None:
    for name in meshlib.__all__:
        member = getattr(meshlib, name)
        if name != "__version__":
            assert inspect.getdoc(member), f"meshlib.{name} has no docstring"


def test_clients_are_httpx_clients() -> None:
    assert issubclass(meshlib.Client, httpx.Client)
    assert issubclass(meshlib.AsyncClient, httpx.AsyncClient)


def test_errors_are_mesh_errors() -> None:
    for name in ("CircuitOpenError", "ConfigError", "ConsulACLError", "DeadlineExceeded", "DiscoveryError"):
        assert issubclass(getattr(meshlib, name), meshlib.MeshError)
    for name in ("NoEndpointsError", "OverloadedError", "IdentityError", "RedirectRefusedError"):
        assert issubclass(getattr(meshlib, name), meshlib.MeshError)


def test_top_level_clients_follow_the_documented_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLIB_HTTP_LIBRARY", raising=False)
    assert meshlib.http_library() == "httpx"  # the default
    monkeypatch.setenv("MESHLIB_HTTP_LIBRARY", " HTTPX2 ")
    assert meshlib.http_library() == "httpx2"
    monkeypatch.setenv("MESHLIB_HTTP_LIBRARY", "requests")
    with pytest.raises(meshlib.ConfigError, match=r"MESHLIB_HTTP_LIBRARY='requests'.*httpx or httpx2"):
        meshlib.http_library()
    assert issubclass(meshlib.httpx.Client, httpx_module.Client)  # the explicit namespaces, whatever the rule
    assert meshlib.httpx.Client.__init__ is not meshlib.AsyncClient.__init__


def test_the_rule_variable_is_a_known_setting(caplog: pytest.LogCaptureFixture) -> None:
    meshlib.MeshConfig.from_env({"MESHLIB_HTTP_LIBRARY": "httpx2"})
    assert "unknown environment variable" not in caplog.text
