"""TLS identity of routed calls: a backend that is another service is checked against *its own* identity.

A call to ``https://payments/`` that a route sends to ``payments-v2`` keeps ``Host: payments`` (the name the
application called) while TLS checks the ``payments-v2`` certificate (its name as the server name, or the
SPIFFE ID configured for ``payments-v2``). Real TLS servers on loopback, sync and async clients.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib.routing.model import Backend, HostRoutes, RouteTable, Rule
from tests.httplib import httpx
from tests.security.conftest import TLSBackendFactory
from tests.security.pki import CA

TD = "prod.example"


def _routes_to(backend: str) -> RouteTable:
    rule = Rule("payments", 0, backends=(Backend(backend),))
    return RouteTable(services={"PAYMENTS": {None: HostRoutes("payments", ((rule.matches[0], rule),))}})


def _get(mode: str, environ: dict[str, str], table: RouteTable) -> Any:
    if mode == "sync":
        with meshlib.Client(environ=environ) as client:
            client.mesh.install_routes(table)
            return client.get("https://payments/charge")

    async def run() -> Any:
        async with meshlib.AsyncClient(environ=environ) as client:
            client.mesh.install_routes(table)
            return await client.get("https://payments/charge")

    return asyncio.run(run())


def test_routed_backend_is_checked_against_its_own_name_and_gets_the_called_host(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    v2 = tls_backend(ca.issue("payments-v2"))  # its certificate names payments-v2 only
    env = {
        "MESHLIB_SERVICE_PAYMENTS_V2": f"static://{v2.address}",
        "MESHLIB_TLS_CA_FILE": str(ca.write(tmp_path / "ca.pem")),
    }
    response = _get(mode, env, _routes_to("payments-v2"))
    assert response.status_code == 200
    assert response.json()["host"] == "payments"
    assert v2.count == 1


def test_routed_backend_presenting_the_called_services_certificate_is_refused(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    impostor = tls_backend(ca.issue("payments"))  # valid for the called name, not for the backend's
    env = {
        "MESHLIB_SERVICE_PAYMENTS_V2": f"static://{impostor.address}",
        "MESHLIB_TLS_CA_FILE": str(ca.write(tmp_path / "ca.pem")),
    }
    with pytest.raises(httpx.ConnectError, match=r"(?i)hostname mismatch"):
        _get(mode, env, _routes_to("payments-v2"))
    assert impostor.count == 0


def test_routed_backend_spiffe_id_is_its_services(mode: str, tmp_path: Path, tls_backend: TLSBackendFactory) -> None:
    ca = CA("spire", trust_domain=TD)
    v2_id = f"spiffe://{TD}/ns/pay/sa/payments-v2"
    v2 = tls_backend(ca.issue(uris=(v2_id,)))
    bundle = str(ca.write(tmp_path / "bundle.pem"))
    env = {
        "MESHLIB_SERVICE_PAYMENTS_V2": f"static://{v2.address}",
        "MESHLIB_SERVICE_PAYMENTS_V2__TLS_CA_FILE": bundle,
        "MESHLIB_SERVICE_PAYMENTS_V2__TLS_SERVER_ID": v2_id,
    }
    assert _get(mode, env, _routes_to("payments-v2")).status_code == 200
    wrong = {**env, "MESHLIB_SERVICE_PAYMENTS_V2__TLS_SERVER_ID": f"spiffe://{TD}/ns/pay/sa/payments"}
    with pytest.raises(httpx.ConnectError, match=r"expected spiffe://prod\.example/ns/pay/sa/payments, presented"):
        _get(mode, wrong, _routes_to("payments-v2"))
    assert v2.count == 1


def test_mirror_is_checked_against_the_mirror_services_own_name(
    ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    from meshlib.routing.model import Filters, Mirror

    v1 = tls_backend(ca.issue("payments-v1"))
    shadow = tls_backend(ca.issue("payments-shadow"), name="shadow")
    rule = Rule(
        "payments", 0, backends=(Backend("payments-v1"),), filters=Filters(mirrors=(Mirror("payments-shadow"),))
    )
    table = RouteTable(services={"PAYMENTS": {None: HostRoutes("payments", ((rule.matches[0], rule),))}})
    env = {
        "MESHLIB_SERVICE_PAYMENTS_V1": f"static://{v1.address}",
        "MESHLIB_SERVICE_PAYMENTS_SHADOW": f"static://{shadow.address}",
        "MESHLIB_TLS_CA_FILE": str(ca.write(tmp_path / "ca.pem")),
    }
    with meshlib.Client(environ=env) as client:
        client.mesh.install_routes(table)
        assert client.get("https://payments/charge").status_code == 200
        client.mesh._mirror_workers.shutdown(wait=True)
        counts = dict(client.mesh.mirror_counts)
    assert counts == {("payments_shadow", "sent"): 1}
    assert shadow.requests[0].headers["host"] == "payments-shadow"
