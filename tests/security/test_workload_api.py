"""SVIDs from the SPIFFE Workload API: meshlib's source against the Workload API double, real mTLS on loopback.

Two workloads, each with its own agent socket (as on two nodes): ``backend`` serves with
``WorkloadAPISource.server_context()`` on a meshlib.testing Backend, ``frontend`` calls it through a
meshlib client with ``client_context(<backend's SPIFFE ID>)``. Rotations are pushed by the double and waited
for on the contexts' generation, never on time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("spiffe")

import meshlib
from meshlib.security.workload_api import WorkloadAPISource, from_env
from meshlib.testing import Backend, Behavior
from tests.httplib import httpx
from tests.security.pki import CA, server_context
from tests.servers.workload_api import SVID, WorkloadAPIServer

pytestmark = pytest.mark.timeout(60)

BACKEND_ID = "spiffe://example.org/ns/default/sa/backend"
FRONTEND_ID = "spiffe://example.org/ns/default/sa/frontend"
CLOSE = Behavior(headers=(("connection", "close"),))  # every request on a new connection: a new handshake


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short private directory: Unix socket paths are limited to ~107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="wl-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ca() -> CA:
    return CA("example.org CA", trust_domain="example.org")


def issue(ca: CA, spiffe_id: str) -> SVID:
    return SVID(spiffe_id, ca.issue(uris=(spiffe_id,)), (ca,))


def serial(peercert: dict[str, object] | None) -> int:
    assert peercert is not None
    return int(str(peercert["serialNumber"]), 16)


class Pair:
    """Two agents (backend's, frontend's), two sources, and an HTTPS backend serving with the backend's SVID."""

    def __init__(self, directory: Path, ca: CA) -> None:
        self.ca = ca
        self.backend_svid, self.frontend_svid = issue(ca, BACKEND_ID), issue(ca, FRONTEND_ID)
        self.backend_agent = WorkloadAPIServer(directory / "b.sock", [self.backend_svid]).start()
        self.frontend_agent = WorkloadAPIServer(directory / "f.sock", [self.frontend_svid]).start()
        self.backend_source = WorkloadAPISource(self.backend_agent.endpoint)
        self.frontend_source = WorkloadAPISource(environ={"SPIFFE_ENDPOINT_SOCKET": self.frontend_agent.endpoint})
        self.backend = Backend("backend", ssl_context=self.backend_source.server_context()).start()
        self.env = {"MESHLIB_SERVICE_BACKEND": f"static://{self.backend.address}"}

    def client_context(self, server_id: str = BACKEND_ID) -> meshlib.security.ReloadingContext:
        return self.frontend_source.client_context(server_id)

    def close(self) -> None:
        self.backend.stop()
        self.backend_source.close()
        self.frontend_source.close()
        self.backend_agent.stop()
        self.frontend_agent.stop()


@pytest.fixture
def pair(socket_dir: Path, ca: CA) -> Iterator[Pair]:
    made = Pair(socket_dir, ca)
    yield made
    made.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_initial_svid_mutual_tls(pair: Pair, mode: str) -> None:
    assert pair.frontend_source.spiffe_id == FRONTEND_ID
    assert pair.backend_source.spiffe_id == BACKEND_ID
    context = pair.client_context()
    if mode == "sync":
        with meshlib.Client(environ=pair.env, verify=context) as client:
            response = client.get("https://backend/hello")
    else:

        async def run() -> httpx.Response:
            async with meshlib.AsyncClient(environ=pair.env, verify=context) as client:
                return await client.get("https://backend/hello")

        response = asyncio.run(run())
    assert response.status_code == 200
    (request,) = pair.backend.requests
    assert serial(request.peercert) == pair.frontend_svid.leaf.cert.serial_number  # the SVID is the client cert


def test_client_requires_the_servers_spiffe_id(pair: Pair) -> None:
    context = pair.client_context("spiffe://example.org/ns/default/sa/other")
    with (
        meshlib.Client(environ=pair.env, verify=context) as client,
        pytest.raises(httpx.ConnectError, match=r"presented spiffe://example\.org/ns/default/sa/backend"),
    ):
        client.get("https://backend/hello")
    assert pair.backend.requests == []


def test_server_requires_a_client_svid(pair: Pair) -> None:
    with meshlib.Client(environ=pair.env, verify=False) as client, pytest.raises(httpx.TransportError):
        client.get("https://backend/hello")  # no client certificate: the backend's context refuses the handshake
    assert pair.backend.requests == []


def test_rotation_under_live_traffic_no_failed_request(pair: Pair) -> None:
    """New SVIDs on both sides mid-traffic: every request succeeds, and new handshakes use the new SVIDs."""
    pair.backend.behavior = CLOSE
    client_context, server_context = pair.client_context(), pair.backend_source.server_context()
    failures: list[BaseException] = []
    done = threading.Event()
    sent = [0]

    def traffic() -> None:
        with meshlib.Client(environ=pair.env, verify=client_context) as client:
            while not done.is_set():
                try:
                    response = client.get("https://backend/")
                    assert response.status_code == 200, response.status_code
                except BaseException as error:
                    failures.append(error)
                sent[0] += 1

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        assert pair.backend.wait_for(20, timeout=30)
        new_backend, new_frontend = issue(pair.ca, BACKEND_ID), issue(pair.ca, FRONTEND_ID)
        pair.backend_agent.push([new_backend])
        pair.frontend_agent.push([new_frontend])
        assert server_context.wait_for_generation(2, timeout=30)
        assert client_context.wait_for_generation(2, timeout=30)
        seen = len(pair.backend.requests)
        assert pair.backend.wait_for(seen + 20, timeout=30)
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=30)
    assert failures == []
    assert pair.frontend_source.updates == 2
    last = pair.backend.requests[-1]
    assert serial(last.peercert) == new_frontend.leaf.cert.serial_number  # the client presents the new SVID
    # ... and the backend presents its new one: a fresh handshake sees it.
    host, port = pair.backend.host, pair.backend.port
    with socket.create_connection((host, port)) as raw, client_context.wrap_socket(raw) as tls:
        assert int(str(tls.getpeercert()["serialNumber"]), 16) == new_backend.leaf.cert.serial_number


def test_bundle_rotation_to_a_new_ca(pair: Pair) -> None:
    """A new CA: first added to the bundles, then new SVIDs signed by it, then the old CA removed."""
    new_ca = CA("example.org CA 2", trust_domain="example.org")
    both = (pair.ca, new_ca)
    backend = SVID(BACKEND_ID, pair.backend_svid.leaf, both)
    frontend = SVID(FRONTEND_ID, pair.frontend_svid.leaf, both)
    client_context, server_context = pair.client_context(), pair.backend_source.server_context()
    pair.backend_agent.push([backend])
    pair.frontend_agent.push([frontend])
    assert client_context.wait_for_generation(2, 30) and server_context.wait_for_generation(2, 30)
    pair.backend_agent.push([SVID(BACKEND_ID, new_ca.issue(uris=(BACKEND_ID,)), (new_ca,))])
    pair.frontend_agent.push([SVID(FRONTEND_ID, new_ca.issue(uris=(FRONTEND_ID,)), (new_ca,))])
    assert client_context.wait_for_generation(3, 30) and server_context.wait_for_generation(3, 30)
    pair.backend.behavior = CLOSE
    with meshlib.Client(environ=pair.env, verify=client_context) as client:
        assert client.get("https://backend/").status_code == 200
    # The old CA is gone from the frontend's trust: a server still presenting an old-CA SVID is refused.
    old = Backend("old", ssl_context=_server_with(pair, pair.backend_svid)).start()
    try:
        env = {"MESHLIB_SERVICE_BACKEND": f"static://{old.address}"}
        with meshlib.Client(environ=env, verify=client_context) as client, pytest.raises(httpx.ConnectError):
            client.get("https://backend/")
    finally:
        old.stop()


def _server_with(pair: Pair, svid: SVID) -> ssl.SSLContext:
    """A plain file-loaded server context presenting ``svid`` (a workload that missed the rotation)."""
    directory = Path(tempfile.mkdtemp(prefix="wl-"))
    try:
        return server_context(svid.leaf, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_socket_missing_is_a_config_error(socket_dir: Path) -> None:
    endpoint = f"unix://{socket_dir}/absent.sock"
    with pytest.raises(meshlib.ConfigError, match="SPIFFE_ENDPOINT_SOCKET") as caught:
        from_env({"SPIFFE_ENDPOINT_SOCKET": endpoint})
    assert "absent.sock" in str(caught.value) and "SPIRE agent" in str(caught.value)


def test_nothing_answering_is_a_config_error_within_the_bound(socket_dir: Path) -> None:
    path = socket_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a socket file with nobody listening: an agent that died
    stale.close()
    with pytest.raises(meshlib.ConfigError, match=r"SPIFFE_ENDPOINT_SOCKET.*no X\.509-SVID within 0\.5 s"):
        WorkloadAPISource(environ={"SPIFFE_ENDPOINT_SOCKET": f"unix://{path}"}, timeout=0.5)


def test_no_identity_issued_is_a_config_error(socket_dir: Path) -> None:
    with WorkloadAPIServer(socket_dir / "agent.sock", []) as agent, pytest.raises(meshlib.ConfigError, match="SVID"):
        WorkloadAPISource(agent.endpoint, timeout=0.5)  # SPIRE: PERMISSION_DENIED until the workload is registered


@pytest.mark.parametrize("value", ["tcp://127.0.0.1:8081", "/run/spire/agent.sock", "unix:relative.sock", " "])
def test_malformed_endpoint(value: str) -> None:
    with pytest.raises(meshlib.ConfigError, match=r"SPIFFE_ENDPOINT_SOCKET.*unix:///run/spire/agent\.sock"):
        WorkloadAPISource(environ={"SPIFFE_ENDPOINT_SOCKET": value})


def test_unset_means_no_source() -> None:
    assert from_env({}) is None
    assert from_env({"SPIFFE_ENDPOINT_SOCKET": ""}) is None


def test_extra_missing_names_the_install_command(socket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules is how Python marks a module that cannot be imported: `import spiffe` raises
    # ImportError exactly as it does when the package is not installed.
    for name in [name for name in sys.modules if name == "spiffe" or name.startswith("spiffe.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "spiffe", None)
    with pytest.raises(meshlib.ConfigError, match=r"SPIFFE_ENDPOINT_SOCKET.*pip install 'meshlib\[spiffe\]'"):
        WorkloadAPISource(environ={"SPIFFE_ENDPOINT_SOCKET": f"unix://{socket_dir}/agent.sock"})


def test_without_memfd_the_key_file_is_private_and_removed(
    socket_dir: Path, ca: CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The non-Linux path: a 0700 directory with a 0600 file, removed once the context has loaded it."""
    monkeypatch.delattr(os, "memfd_create")
    scratch = socket_dir / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    modes: list[tuple[int, int]] = []
    real_load = ssl.SSLContext.load_cert_chain

    def spy(self: ssl.SSLContext, certfile: str, *args: object, **kwargs: object) -> None:
        modes.append((os.stat(os.path.dirname(certfile)).st_mode & 0o777, os.stat(certfile).st_mode & 0o777))
        real_load(self, certfile, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", spy)
    with (
        WorkloadAPIServer(socket_dir / "agent.sock", [issue(ca, BACKEND_ID)]) as agent,
        WorkloadAPISource(agent.endpoint) as source,
    ):
        source.server_context()
        source.client_context(BACKEND_ID)
    assert modes == [(0o700, 0o600), (0o700, 0o600)]
    assert list(scratch.iterdir()) == []
