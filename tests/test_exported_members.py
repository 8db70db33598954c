"""``meshlib.__all__`` is the public contract (as in httpx's test_exported_members): exact, importable, documented."""

from __future__ import annotations

import inspect

import meshlib
from tests.httplib import httpx

PUBLIC = {
    "AsyncClient",
    "CircuitOpenError",
    "Client",
    "ConfigError",
    "ConsulACLError",
    "DeadlineExceeded",
    "DiscoveryError",
    "Endpoint",
    "IdentityError",
    "MeshConfig",
    "MeshError",
    "MeshStatus",
    "NoEndpointsError",
    "OverloadedError",
    "Policy",
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
    for name in ("NoEndpointsError", "OverloadedError", "IdentityError"):
        assert issubclass(getattr(meshlib, name), meshlib.MeshError)
