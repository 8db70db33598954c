"""The live view: ``mesh_status()`` snapshots, the loopback admin endpoint, and ``meshlib status``."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator

import pytest

import meshlib
from meshlib import admin
from meshlib.testing import Backend, Behavior
from meshlib.tools.cli import main
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx


def _env(backends: list[Backend], **settings: str) -> dict[str, str]:
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_SERVICE_LEDGER": static_target(backends)}
    env.update({f"MESHLIB_{key}": value for key, value in settings.items()})
    return env


def _get(address: tuple[str, int], path: str, **headers: str) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10) as plain:
        return plain.get(f"http://{address[0]}:{address[1]}{path}", headers=headers)


@pytest.fixture(autouse=True)
def no_admin_left_behind() -> Iterator[None]:
    yield
    assert admin.running() == {}, "a test left an admin server running"


def test_mesh_status_is_a_json_ready_snapshot(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    backends[1].behavior = Behavior(status=503)
    with meshlib.Client(environ=_env(backends, RETRIES="0")) as client:
        for _ in range(4):
            client.get("http://payments/x")
        status = client.mesh_status()
    assert isinstance(status, meshlib.MeshStatus)
    assert status.client == "sync"
    payload = json.loads(json.dumps(status.to_dict()))  # plain data, all the way down
    ledger, payments = payload["services"]
    assert ledger["name"] == "ledger" and ledger["started"] is False and ledger["endpoints"] == []
    assert payments["started"] is True and payments["balancer"] == "p2c_ewma"
    assert payments["discovery"]["source"].startswith("static://")
    assert payments["discovery"]["refreshes"] == 1 and payments["discovery"]["age_s"] >= 0
    assert payments["budget"]["max_inflight"] == 1024 and payments["budget"]["inflight"] == 0
    endpoints = {e["address"]: e for e in payments["endpoints"]}
    assert set(endpoints) == {b.address for b in backends}
    assert sum(e["requests"] for e in endpoints.values()) == 4
    assert endpoints[backends[1].address]["failures"] == backends[1].count
    assert all(e["latency_ms"] > 0 and e["breaker"] == "closed" and e["ejected"] is False for e in endpoints.values())


@pytest.mark.anyio
async def test_async_mesh_status(start_backends: BackendFactory) -> None:
    async with meshlib.AsyncClient(environ=_env(start_backends(1))) as client:
        await client.get("http://ledger/")
        status = client.mesh_status()
    assert status.client == "async"
    assert [s.started for s in status.services] == [True, False]


@pytest.mark.parametrize("address", ["0.0.0.0:9901", "10.1.2.3:9901", "[::]:9901", "example.com:9901", "9901"])
def test_the_admin_endpoint_is_loopback_only(address: str) -> None:
    with pytest.raises(meshlib.ConfigError, match="MESHLIB_ADMIN_ADDR"):
        meshlib.Client(environ={"MESHLIB_ADMIN_ADDR": address})


def test_admin_endpoint_serves_status_and_metrics(start_backends: BackendFactory) -> None:
    backends = start_backends(1)
    env = _env(backends, ADMIN_ADDR="127.0.0.1:0")
    with meshlib.Client(environ=env) as one, meshlib.Client(environ=env) as two:
        address = one.admin_address
        assert address is not None and address[0] == "127.0.0.1" and address[1] > 0
        assert two.admin_address == address  # one server per address per process, shared
        one.get("http://payments/a")
        two.get("http://payments/b")
        status = _get(address, "/status")
        assert status.status_code == 200 and status.headers["content-type"] == "application/json"
        body = status.json()
        assert body["meshlib"] == meshlib.__version__
        assert len(body["clients"]) == 2
        metrics = _get(address, "/metrics")
        assert metrics.status_code == 200
        assert "http_client_request_duration_seconds_count" in metrics.text
        assert 'server_address="payments"' in metrics.text
        assert "meshlib_client_attempts" in metrics.text
        assert _get(address, "/status", Host="attacker.example").status_code == 403  # DNS rebinding
        assert _get(address, "/nothing").status_code == 404
        one.close()
        assert len(_get(address, "/status").json()["clients"]) == 1  # still served for the other client
    with pytest.raises(httpx.ConnectError):  # the last client closed: the server stopped
        _get(address, "/status")


def test_metrics_without_the_exporter_is_404_with_a_hint(
    start_backends: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin._Prometheus, "create", classmethod(lambda cls: None))
    with meshlib.Client(environ=_env(start_backends(1), ADMIN_ADDR="[::1]:0")) as client:
        address = client.admin_address
        assert address is not None and address[0] == "::1"
        with httpx.Client(trust_env=False, timeout=10) as plain:
            answer = plain.get(f"http://[::1]:{address[1]}/metrics")
    assert answer.status_code == 404
    assert "pip install 'meshlib[prometheus]'" in answer.text


def test_a_busy_admin_port_is_a_warning_not_a_failure(
    start_backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="meshlib.admin"):
            client = meshlib.Client(environ=_env(start_backends(1), ADMIN_ADDR=f"127.0.0.1:{port}"))
        with client:
            assert client.admin_address is None
            assert client.get("http://payments/").status_code == 200
    (record,) = caplog.records
    assert f"127.0.0.1:{port}" in record.getMessage() and "MESHLIB_ADMIN_ADDR" in record.getMessage()


def test_meshlib_status_prints_a_table(start_backends: BackendFactory, capsys: pytest.CaptureFixture[str]) -> None:
    backends = start_backends(2)
    with meshlib.Client(environ=_env(backends, ADMIN_ADDR="127.0.0.1:0")) as client:
        client.get("http://payments/")
        address = client.admin_address
        assert address is not None
        assert main(["status", "--addr", f"127.0.0.1:{address[1]}"]) == 0
        table = capsys.readouterr().out
        assert main(["status", "--addr", f"localhost:{address[1]}", "--json"]) == 0
        raw = json.loads(capsys.readouterr().out)
    assert "client 1 (sync): 2 service(s)" in table
    assert "ENDPOINT" in table and "EWMA ms" in table and "BREAKER" in table
    assert all(b.address in table for b in backends)
    assert "ledger (not used yet)" in table
    assert raw["clients"][0]["client"] == "sync"


def test_meshlib_status_without_an_admin_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        assert main(["status", "--addr", f"127.0.0.1:{port}"]) == 1
    assert "MESHLIB_ADMIN_ADDR" in capsys.readouterr().err
    assert main(["status", "--addr", "192.0.2.1:9901"]) == 2  # loopback only, here too
