"""Services a control plane adds and removes while the client runs (the xDS path): one swap of the router's
services (and table), so a call sees the old set or the new one; a removed service is no longer routed to."""

from __future__ import annotations

import pytest

import meshlib
from meshlib._config import ServiceConfig, service_key
from meshlib.discovery import build_resolver
from meshlib.discovery.base import DiscoverySettings
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx


def test_a_service_added_at_run_time_is_routed_and_a_removed_one_is_not(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    with meshlib.Client(services={"payments": static_target(backends[:1])}) as client:
        assert client.get("http://payments/").status_code == 200
        router = client.mesh._router
        target = static_target(backends[1:])
        resolver = build_resolver("xds-cluster:ledger", target, DiscoverySettings(), variable="test")
        router.add_services({service_key("ledger"): (ServiceConfig("ledger", target), resolver)})
        answer = client.get("http://ledger/entries")
        assert answer.status_code == 200 and answer.extensions["meshlib.endpoint"] == backends[1].address
        assert client.mesh.services.keys() == {service_key("payments"), service_key("ledger")}

        removed = router.remove_services([service_key("ledger")])
        assert [s.name for s in removed] == ["ledger"]
        with pytest.raises(httpx.ConnectError):  # no longer a mesh host: passed through, and it does not resolve
            client.get("http://ledger/entries")
        assert client.get("http://payments/").status_code == 200  # the others are untouched


def test_adding_a_name_that_exists_keeps_the_existing_service(start_backends: BackendFactory) -> None:
    backends = start_backends(1)
    with meshlib.Client(services={"payments": static_target(backends)}) as client:
        client.get("http://payments/")
        key = service_key("payments")
        before = client.mesh.services[key]
        resolver = build_resolver("payments", "static://127.0.0.1:9", DiscoverySettings(), variable="test")
        client.mesh._router.add_services({key: (ServiceConfig("payments", "static://127.0.0.1:9"), resolver)})
        assert client.mesh.services[key] is before and client.get("http://payments/").status_code == 200
