"""meshlib clients with ``SPIFFE_ENDPOINT_SOCKET``: SVID, key and bundle from the Workload API double, real mTLS.

The frontend is a ``meshlib.Client``/``AsyncClient`` whose environment names the frontend agent's socket and
the backend's SPIFFE ID (``MESHLIB_TLS_SERVER_ID``); the backend is a meshlib.testing Backend serving with
its own source's ``server_context()``. Every wait is on an event (a context generation, an SVID serial, a
log line, the double's stream count), never on time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("spiffe")

import meshlib
from meshlib.security import workload_api
from meshlib.security.workload_api import WorkloadAPISource
from meshlib.testing import Backend, Behavior
from tests.conftest import LogWatch
from tests.httplib import httpx
from tests.security.pki import CA
from tests.security.test_workload_api import BACKEND_ID, FRONTEND_ID, issue, serial
from tests.servers.workload_api import WorkloadAPIServer

pytestmark = pytest.mark.timeout(60)

CLOSE = Behavior(headers=(("connection", "close"),))  # every request on a new connection: a new handshake


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="wl-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class Mesh:
    """The backend (its agent, source and HTTPS Backend) and the frontend's agent; ``env`` for the client."""

    def __init__(self, directory: Path) -> None:
        self.ca = CA("example.org CA", trust_domain="example.org")
        self.frontend_svid = issue(self.ca, FRONTEND_ID)
        self.backend_agent = WorkloadAPIServer(directory / "b.sock", [issue(self.ca, BACKEND_ID)]).start()
        self.agent = WorkloadAPIServer(directory / "f.sock", [self.frontend_svid]).start()
        self.backend_source = WorkloadAPISource(self.backend_agent.endpoint)
        self.backend = Backend("backend", ssl_context=self.backend_source.server_context(), behavior=CLOSE).start()
        self.env = {
            "SPIFFE_ENDPOINT_SOCKET": self.agent.endpoint,
            "MESHLIB_SERVICE_BACKEND": f"static://{self.backend.address}",
            "MESHLIB_TLS_SERVER_ID": BACKEND_ID,
        }

    def last_client_serial(self) -> int:
        return serial(self.backend.requests[-1].peercert)

    def close(self) -> None:
        self.backend.stop()
        self.backend_source.close()
        self.backend_agent.stop()
        self.agent.stop()


@pytest.fixture
def mesh(socket_dir: Path) -> Iterator[Mesh]:
    made = Mesh(socket_dir)
    yield made
    made.close()


def _get(client: Any, url: str = "https://backend/") -> Any:
    if isinstance(client, meshlib.AsyncClient):
        return asyncio.run(_aget(client, url))
    return client.get(url)


async def _aget(client: Any, url: str) -> Any:
    return await client.get(url)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_client_takes_its_svid_from_the_workload_api(mesh: Mesh, mode: str) -> None:
    if mode == "sync":
        with meshlib.Client(environ=mesh.env) as client:
            assert client.get("https://backend/").status_code == 200
            source = client.workload_api
            assert source is not None and client.tls_contexts["BACKEND"] is source.client_context(BACKEND_ID)
    else:

        async def run() -> WorkloadAPISource | None:
            async with meshlib.AsyncClient(environ=mesh.env) as client:
                assert (await client.get("https://backend/")).status_code == 200
                return client.workload_api

        source = asyncio.run(run())
    assert mesh.last_client_serial() == mesh.frontend_svid.leaf.cert.serial_number  # the SVID is the client cert
    assert source is not None and source.closed  # one source per client, closed with it
    assert mesh.agent.wait_for_streams_at_most(0)


def test_the_server_spiffe_id_is_still_required(mesh: Mesh) -> None:
    env = {**mesh.env, "MESHLIB_TLS_SERVER_ID": "spiffe://example.org/ns/default/sa/other"}
    with meshlib.Client(environ=env) as client, pytest.raises(httpx.ConnectError, match="presented spiffe://"):
        client.get("https://backend/")
    assert mesh.backend.requests == []


def test_per_service_server_id_and_services_without_one(mesh: Mesh) -> None:
    """Only services naming a server SPIFFE ID use the Workload API; the others keep the client's verify=."""
    env = {k: v for k, v in mesh.env.items() if k != "MESHLIB_TLS_SERVER_ID"}
    env["MESHLIB_SERVICE_BACKEND__TLS_SERVER_ID"] = BACKEND_ID
    env["MESHLIB_SERVICE_PLAIN"] = f"static://{mesh.backend.address}"
    with meshlib.Client(environ=env) as client:
        assert client.get("https://backend/").status_code == 200
        assert set(client.tls_contexts) == {"BACKEND"}
        with pytest.raises(httpx.ConnectError):  # default trust (certifi) and host name: an SVID does not pass
            client.get("https://plain/")
    assert len(mesh.backend.requests) == 1


def test_socket_without_a_server_id_opens_no_source(mesh: Mesh, log_event: LogWatch) -> None:
    said = log_event("no mesh service names a server SPIFFE ID")
    env = {k: v for k, v in mesh.env.items() if k != "MESHLIB_TLS_SERVER_ID"}
    with meshlib.Client(environ=env) as client:
        assert client.workload_api is None
    assert said.is_set()
    with meshlib.Client(environ={"MESHLIB_SERVICE_BACKEND": mesh.env["MESHLIB_SERVICE_BACKEND"]}) as client:
        assert client.workload_api is None


@pytest.mark.parametrize(
    "variable", ["MESHLIB_TLS_CA_FILE", "MESHLIB_TLS_CERT_FILE", "MESHLIB_SERVICE_BACKEND__TLS_CA_FILE"]
)
def test_tls_files_and_the_workload_api_is_a_config_error(mesh: Mesh, tmp_path: Path, variable: str) -> None:
    path = tmp_path / "files.pem"
    path.write_bytes(mesh.ca.cert_pem + mesh.frontend_svid.leaf.chain_pem + mesh.frontend_svid.leaf.key_pem)
    env = {**mesh.env, variable: str(path)}
    with pytest.raises(meshlib.ConfigError) as caught:
        meshlib.Client(environ=env)
    message = str(caught.value)
    assert variable in message and str(path) in message
    assert f"SPIFFE_ENDPOINT_SOCKET={mesh.agent.endpoint}" in message and "MESHLIB_TLS_SERVER_ID" in message


def test_socket_missing_is_a_config_error_at_construction(mesh: Mesh, socket_dir: Path) -> None:
    endpoint = f"unix://{socket_dir}/absent.sock"
    for client_class in (meshlib.Client, meshlib.AsyncClient):
        with pytest.raises(meshlib.ConfigError, match="SPIFFE_ENDPOINT_SOCKET") as caught:
            client_class(environ={**mesh.env, "SPIFFE_ENDPOINT_SOCKET": endpoint})
        assert endpoint in str(caught.value) and "Workload API socket" in str(caught.value)


def test_no_svid_within_the_bound_is_a_config_error(
    mesh: Mesh, socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workload_api, "DEFAULT_TIMEOUT", 0.3)
    with WorkloadAPIServer(socket_dir / "unregistered.sock", []) as agent:  # SPIRE before registration
        with pytest.raises(meshlib.ConfigError) as caught:
            meshlib.Client(environ={**mesh.env, "SPIFFE_ENDPOINT_SOCKET": agent.endpoint})
        assert agent.wait_for_streams_at_most(0)  # the failed client's source is closed, not left retrying
    message = str(caught.value)
    assert "SPIFFE_ENDPOINT_SOCKET" in message and agent.endpoint in message
    assert "no X.509-SVID within 0.3 s" in message and "PERMISSION_DENIED" in message


def test_extra_missing_names_the_install_command(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name == "spiffe" or name.startswith("spiffe.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "spiffe", None)  # how Python marks a module that cannot be imported
    with pytest.raises(meshlib.ConfigError, match=r"SPIFFE_ENDPOINT_SOCKET.*pip install 'meshlib\[spiffe\]'"):
        meshlib.AsyncClient(environ=mesh.env)


def test_a_client_dropped_unclosed_ends_its_stream(mesh: Mesh) -> None:
    client = meshlib.Client(environ=mesh.env)
    source = client.workload_api
    assert source is not None and mesh.agent.wait_for_streams(1)
    del client
    gc.collect()
    assert source.closed
    assert mesh.agent.wait_for_streams_at_most(0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_agent_restart_reconnects_and_keeps_the_last_svid_meanwhile(mesh: Mesh, log_event: LogWatch, mode: str) -> None:
    """The agent goes away: new connections keep the last SVID (fail-static); back, its new SVID is used."""
    broke, back = log_event("stream broke"), log_event("stream reconnected")
    client: Any = meshlib.Client(environ=mesh.env) if mode == "sync" else meshlib.AsyncClient(environ=mesh.env)
    try:
        source = client.workload_api
        assert _get(client).status_code == 200
        mesh.agent.stop()
        assert broke.wait(30)
        assert _get(client).status_code == 200  # a new handshake, with the last SVID
        assert mesh.last_client_serial() == mesh.frontend_svid.leaf.cert.serial_number
        renewed = issue(mesh.ca, FRONTEND_ID)
        mesh.agent.push([renewed])  # what the agent will serve when it is back
        mesh.agent.start()
        assert source.wait_for_svid(renewed.leaf.cert.serial_number, 30)
        assert back.wait(30)
        assert _get(client).status_code == 200
        assert mesh.last_client_serial() == renewed.leaf.cert.serial_number
        assert source.stream_errors >= 1
    finally:
        if mode == "sync":
            client.close()
        else:
            asyncio.run(client.aclose())


@pytest.mark.skipif(
    not os.environ.get("MESHLIB_TEST_GRPC_FORK"),
    reason="a forked child opening a gRPC stream crashes or hangs inside grpcio about once in 100-300 forks "
    "(gRPC's fork support is best effort: docs/security.md, fork()); run with MESHLIB_TEST_GRPC_FORK=1",
)
def test_a_forked_child_opens_its_own_stream(mesh: Mesh) -> None:
    """The child must not use the parent's gRPC stream: it opens its own and gets rotations through it."""
    from tests.test_fork import _both

    renewed = issue(mesh.ca, FRONTEND_ID)
    with meshlib.Client(environ=mesh.env) as client:
        assert client.get("https://backend/warm").status_code == 200
        source = client.workload_api
        assert source is not None and mesh.agent.wait_for_streams(1)

        def work(side: str) -> int:
            if side == "child":
                assert client.get("https://backend/child-before").status_code == 200  # last SVID; resumes
                assert source.wait_for_svid(renewed.leaf.cert.serial_number, 30)  # through the child's stream
                return int(client.get("https://backend/child-after").status_code)
            assert mesh.agent.wait_for_streams(2, 30)  # the child's own stream, beside the parent's
            mesh.agent.push([renewed])
            assert source.wait_for_svid(renewed.leaf.cert.serial_number, 30)
            return 0

        _, status = _both(work)
        assert status == 200
        assert client.get("https://backend/parent-after").status_code == 200  # the parent's stream still works
    by_path = {request.path: serial(request.peercert) for request in mesh.backend.requests}
    assert by_path["/child-before"] == mesh.frontend_svid.leaf.cert.serial_number
    assert by_path["/child-after"] == renewed.leaf.cert.serial_number
    assert by_path["/parent-after"] == renewed.leaf.cert.serial_number
    assert source.closed and mesh.agent.wait_for_streams_at_most(0)


def test_fork_hook_leaves_the_parents_stream_alone(mesh: Mesh) -> None:
    """In the child, closing the client must not cancel the parent's stream (shared file descriptors)."""
    from tests.test_fork import _both

    with meshlib.Client(environ=mesh.env) as client:
        assert mesh.agent.wait_for_streams(1)

        def work(side: str) -> int:
            if side == "child":
                client.close()  # never resumed here: the parent's client and stream are not touched
                return os.getpid()
            return 0

        _both(work)
        renewed = issue(mesh.ca, FRONTEND_ID)
        mesh.agent.push([renewed])
        source = client.workload_api
        assert source is not None and source.wait_for_svid(renewed.leaf.cert.serial_number, 30)
