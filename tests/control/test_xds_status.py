"""Introspection of a client steered by xDS: ``mesh_status().xds``, the admin endpoint's ``/status`` and
``meshlib status``, against the control-plane double (``tests/servers/xds.py``) and real loopback backends."""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from meshlib.control.xds.client import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION
from meshlib.status import XdsStatus
from meshlib.testing import Backend, Behavior
from meshlib.tools.cli import main
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx
from tests.servers import xds_resources as r
from tests.servers.xds import XdsServer

pytest.importorskip("grpc")

pytestmark = pytest.mark.timeout(60)

#: Every character a terminal may act on (but the newline ending each line).
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def xds() -> Iterator[XdsServer]:
    with XdsServer() as server:
        yield server


def env(xds: XdsServer, **settings: str) -> dict[str, str]:
    environ = {"GRPC_XDS_BOOTSTRAP_CONFIG": xds.bootstrap_json(), "MESHLIB_SERVICE_PAYMENTS": "xds:///payments"}
    environ.update({f"MESHLIB_{key}": value for key, value in settings.items()})
    return environ


def push(xds: XdsServer, backend: Backend) -> None:
    """Listener ``payments`` -> RouteConfiguration ``payments-routes`` -> cluster ``pay-v1`` -> ``backend``."""
    config = r.route_configuration(
        "payments-routes", [r.virtual_host("vh", ["payments"], [r.route(prefix="/", cluster="pay-v1")])]
    )
    xds.set(
        CLUSTER_LOAD_ASSIGNMENT,
        [r.cluster_load_assignment("pay-v1", [r.locality([r.endpoint("127.0.0.1", backend.port)])])],
    )
    xds.set(CLUSTER, [r.cluster("pay-v1")])
    xds.set(ROUTE_CONFIGURATION, [config])
    xds.set(LISTENER, [r.listener("payments", rds="payments-routes")])


def push_bad_routes(xds: XdsServer) -> str:
    """A RouteConfiguration with a regex that is not one, terminal escapes in its name: NACKed. Its version."""
    bad = r.route(prefix="/", cluster="pay-v1")
    bad.match.safe_regex.regex = "(\x1b]0;pwned\x07"
    bad.match.ClearField("prefix")
    config = r.route_configuration("payments-routes", [r.virtual_host("vh", ["payments"], [bad])])
    mark = xds.mark()
    version = xds.set(ROUTE_CONFIGURATION, [config])
    xds.wait_for_nack(ROUTE_CONFIGURATION, version, after=mark)
    return version


def resources(status: XdsStatus) -> dict[tuple[str, str], Any]:
    (server,) = status.servers
    return {(res.type, res.name): res for res in server.resources}


def test_mesh_status_shows_the_control_plane_each_service_and_each_acked_resource(
    xds: XdsServer, start_backends: BackendFactory
) -> None:
    (backend,) = start_backends(1)
    push(xds, backend)
    with meshlib.Client(environ=env(xds)) as client:
        assert client.get("http://payments/").status_code == 200
        status = client.mesh_status()
    assert status.xds is not None
    (server,) = status.xds.servers
    assert server.server == xds.address and server.connected and server.streams == 1
    assert server.since is not None and server.last_error is None
    found = resources(status.xds)
    assert set(found) == {("LDS", "payments"), ("RDS", "payments-routes"), ("CDS", "pay-v1"), ("EDS", "pay-v1")}
    for (kind, _), resource in found.items():
        url = {"LDS": LISTENER, "RDS": ROUTE_CONFIGURATION, "CDS": CLUSTER, "EDS": CLUSTER_LOAD_ASSIGNMENT}[kind]
        assert resource.type_url == url and resource.status == "ACKED" and resource.error is None
        assert resource.version == xds.version(url) and resource.updated_at is not None
    (service,) = status.xds.services
    assert (service.service, service.target, service.listener, service.route_configuration) == (
        "payments",
        "xds:///payments",
        "payments",
        "payments-routes",
    )
    assert service.routed and service.error is None
    assert status.xds.applied >= 1 and status.xds.waiting_for == []
    payload = json.loads(json.dumps(status.to_dict()))  # plain data all the way down
    assert payload["xds"]["servers"][0]["resources"][0]["status"] == "ACKED"


@pytest.mark.anyio
async def test_async_mesh_status_shows_xds(xds: XdsServer, start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    push(xds, backend)
    async with meshlib.AsyncClient(environ=env(xds)) as client:
        assert (await client.get("http://payments/")).status_code == 200
        status = client.mesh_status()
    assert status.xds is not None and status.xds.services[0].routed
    assert {res.status for res in status.xds.servers[0].resources} == {"ACKED"}


def test_a_client_without_xds_has_no_xds_status(start_backends: BackendFactory) -> None:
    backends = start_backends(1)
    with meshlib.Client(environ={"MESHLIB_SERVICE_PAYMENTS": static_target(backends)}) as client:
        assert client.mesh_status().xds is None
        assert client.mesh_status().to_dict()["xds"] is None


def test_a_nack_shows_the_error_and_the_last_accepted_version(xds: XdsServer, start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    push(xds, backend)
    with meshlib.Client(environ=env(xds)) as client:
        assert client.get("http://payments/").status_code == 200
        accepted = xds.version(ROUTE_CONFIGURATION)
        rejected = push_bad_routes(xds)
        status = client.mesh_status()
        assert client.get("http://payments/").status_code == 200  # the last good routes serve
    assert status.xds is not None
    routes = resources(status.xds)[("RDS", "payments-routes")]
    assert routes.status == "NACKED" and routes.version == accepted != rejected
    assert routes.error is not None and "regex" in routes.error
    assert resources(status.xds)[("LDS", "payments")].status == "ACKED"
    assert status.xds.services[0].routed  # a NACK changes nothing


class _Broke(logging.Handler):
    """Set when the ADS client reports its stream broke (after it recorded the state ``connection()`` reads)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "stream to" in record.getMessage() and "broke" in record.getMessage():
            self.event.set()


def test_a_stopped_control_plane_shows_disconnected_with_the_error(
    xds: XdsServer, start_backends: BackendFactory
) -> None:
    (backend,) = start_backends(1)
    push(xds, backend)
    broke = _Broke()
    xds_logger = logging.getLogger("meshlib.xds")
    xds_logger.addHandler(broke)
    try:
        with meshlib.Client(environ=env(xds)) as client:
            assert client.get("http://payments/").status_code == 200
            xds.stop()
            assert broke.event.wait(30)
            status = client.mesh_status()
            assert client.get("http://payments/").status_code == 200  # fail-static: the routes keep serving
    finally:
        xds_logger.removeHandler(broke)
    assert status.xds is not None
    (server,) = status.xds.servers
    assert not server.connected and server.last_error
    assert {res.status for res in server.resources} == {"ACKED"}  # every accepted resource kept
    assert status.xds.services[0].routed


def _admin_status(address: tuple[str, int]) -> dict[str, Any]:
    with httpx.Client(trust_env=False, timeout=10) as plain:
        answer = plain.get(f"http://127.0.0.1:{address[1]}/status")
    assert answer.status_code == 200
    payload: dict[str, Any] = answer.json()
    return payload


def test_the_admin_status_and_meshlib_status_show_xds(
    xds: XdsServer, start_backends: BackendFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    (backend,) = start_backends(1)
    push(xds, backend)
    with meshlib.Client(environ=env(xds, ADMIN_ADDR="127.0.0.1:0")) as client:
        assert client.get("http://payments/").status_code == 200
        accepted = xds.version(ROUTE_CONFIGURATION)
        push_bad_routes(xds)
        address = client.admin_address
        assert address is not None
        payload = _admin_status(address)
        assert main(["status", "--addr", f"127.0.0.1:{address[1]}"]) == 0
        table = capsys.readouterr().out
    (mine,) = [c for c in payload["clients"] if c["xds"] is not None]
    (server,) = mine["xds"]["servers"]
    assert server["server"] == xds.address and server["connected"] is True
    by_name = {(res["type"], res["name"]): res for res in server["resources"]}
    assert by_name[("RDS", "payments-routes")]["status"] == "NACKED"
    assert by_name[("RDS", "payments-routes")]["version"] == accepted
    assert by_name[("CDS", "pay-v1")]["status"] == "ACKED"
    assert mine["xds"]["services"][0]["routed"] is True
    assert "  xDS: 1/1 service(s) routed" in table
    assert f"control plane {xds.address}: connected since " in table
    lines = table.splitlines()
    (rds,) = [line for line in lines if line.split()[:2] == ["RDS", "payments-routes"]]
    assert rds.split()[2:4] == [accepted, "NACKED"]
    nacked = lines[lines.index(rds) + 1]
    assert "NACKED (the last accepted version keeps serving):" in nacked and "regex" in nacked
    assert "\\x1b]0;pwned\\x07" in nacked and not _CONTROL.search(table)  # the control plane's text, escaped
    for kind, name in (("LDS", "payments"), ("CDS", "pay-v1"), ("EDS", "pay-v1")):
        (line,) = [line for line in lines if line.split()[:2] == [kind, name]]
        assert line.split()[2:4] == [
            xds.version({"LDS": LISTENER, "CDS": CLUSTER, "EDS": CLUSTER_LOAD_ASSIGNMENT}[kind]),
            "ACKED",
        ]
    assert "service payments (xds:///payments): listener payments, route configuration payments-routes: routed" in table


@pytest.fixture
def xds_status(xds: XdsServer, start_backends: BackendFactory) -> dict[str, Any]:
    """A genuine ``/status`` answer of a client steered by xDS, to be served altered by a fake endpoint."""
    (backend,) = start_backends(1)
    push(xds, backend)
    with meshlib.Client(environ=env(xds, ADMIN_ADDR="127.0.0.1:0")) as client:
        assert client.get("http://payments/").status_code == 200
        address = client.admin_address
        assert address is not None
        return _admin_status(address)


def test_meshlib_status_escapes_and_bounds_what_the_control_plane_sent(
    start_backends: BackendFactory, capsys: pytest.CaptureFixture[str], xds_status: dict[str, Any]
) -> None:
    payload = copy.deepcopy(xds_status)
    xds = payload["clients"][0]["xds"]
    server = xds["servers"][0]
    server["server"] = "evil\x1b[2J:1"
    server["connected"] = False
    server["last_error"] = "UNAVAILABLE \x1b]0;pwned\x07" + "x" * 10_000
    resource = server["resources"][0]
    resource.update(name="listener\u202e", version="v\x9b2J", status="NACKED", error="bad\r\x1b[31m" + "y" * 10_000)
    xds["services"][0]["error"] = "no Listener \x1b[1m"
    xds["services"][0]["routed"] = False
    (backend,) = start_backends(1, Behavior(body=json.dumps(payload).encode()))
    assert main(["status", "--addr", backend.address]) == 0
    out = capsys.readouterr().out
    assert not _CONTROL.search(out)
    assert "control plane evil\\x1b[2J:1: NOT CONNECTED" in out and "UNAVAILABLE \\x1b]0;pwned\\x07" in out
    assert "listener\\u202e" in out and "v\\x9b2J" in out and "bad\\x0d\\x1b[31m" in out
    assert "NOT ROUTED: no Listener \\x1b[1m" in out
    assert max(len(line) for line in out.splitlines()) < 600  # the 10,000-character errors were cut


def test_meshlib_status_names_a_bad_xds_field(
    start_backends: BackendFactory, capsys: pytest.CaptureFixture[str], xds_status: dict[str, Any]
) -> None:
    payload = copy.deepcopy(xds_status)
    payload["clients"][0]["xds"]["servers"][0]["resources"][1]["version"] = 7
    (backend,) = start_backends(1, Behavior(body=json.dumps(payload).encode()))
    assert main(["status", "--addr", backend.address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "clients[0].xds.servers[0].resources[1].version is the number 7; expected a string" in err
    payload = copy.deepcopy(xds_status)  # the routes are checked before printing too (not a traceback)
    payload["clients"][0]["routes"]["applied"] = "1"
    backend.behavior = Behavior(body=json.dumps(payload).encode())
    assert main(["status", "--addr", backend.address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clients[0].routes.applied is the string '1'; expected a whole number" in err
