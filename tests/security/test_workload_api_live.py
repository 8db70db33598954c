"""Issue 12: "SVID rotation through the Workload API server under live traffic with 0 failed requests".

A real uvicorn server serves over mTLS with ``WorkloadAPISource.server_context()`` (uvicorn's
``ssl_context_factory``, as docs/security.md shows); a meshlib client (sync, or async)
finds its SVID through ``SPIFFE_ENDPOINT_SOCKET`` and sends requests without pause while the Workload API
doubles rotate both SVIDs, or move both workloads to a new CA with an overlap of old and new. Every response
says which client certificate the server saw (uvicorn's h11 protocol, subclassed only to read the peer
certificate at connection time); the client reads the server's certificate from the open connection. Every
request closes its connection, so each is a new handshake. Progress is counted, never timed.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("spiffe")
uvicorn = pytest.importorskip("uvicorn")

from cryptography import x509  # noqa: E402
from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

import meshlib  # noqa: E402
from meshlib.security.workload_api import WorkloadAPISource  # noqa: E402
from tests.security.pki import CA  # noqa: E402
from tests.security.test_workload_api import BACKEND_ID, FRONTEND_ID, issue  # noqa: E402
from tests.server.test_middleware import _Server  # noqa: E402
from tests.servers.workload_api import SVID, WorkloadAPIServer  # noqa: E402

pytestmark = pytest.mark.timeout(90)

#: Requests to see before a rotation, and after it with the new certificates on both sides.
BATCH = 10


def _serial(der: bytes | None) -> int:
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


class _PeerRecordingProtocol(H11Protocol):
    """uvicorn's h11 protocol, noting each connection's client certificate serial (by client address)."""

    peers: dict[tuple[str, int], int]

    def connection_made(self, transport: Any) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        host, port = transport.get_extra_info("peername")[:2]
        self.peers[(host, port)] = _serial(ssl_object.getpeercert(binary_form=True))
        super().connection_made(transport)


def _app(peers: dict[tuple[str, int], int]) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        client_serial = peers.pop(tuple(scope["client"]))
        body = str(client_serial).encode()
        headers = [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class Uvicorn:
    """uvicorn on a loopback port, TLS from ``source.server_context()`` through ``ssl_context_factory``."""

    def __init__(self, source: WorkloadAPISource) -> None:
        peers: dict[tuple[str, int], int] = {}
        protocol = type("Protocol", (_PeerRecordingProtocol,), {"peers": peers})
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            _app(peers),
            http=protocol,
            log_level="warning",
            lifespan="on",
            ssl_context_factory=lambda config, default: source.server_context(),
        )
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        assert self.server.ready.wait(15) and self.server.started, "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


class Traffic:
    """Counts of answers (client serial seen by the server, server serial seen by the client) and failures."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.seen: list[tuple[int, int]] = []
        self.failures: list[BaseException] = []
        self.done = threading.Event()

    def record(self, client_serial: int, server_serial: int) -> None:
        with self.changed:
            self.seen.append((client_serial, server_serial))
            self.changed.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.changed:
            self.failures.append(error)
            self.changed.notify_all()

    def wait_for(self, count: int, want: tuple[int, int] | None = None) -> None:
        """Until ``count`` more answers arrive (with ``want``: answers showing both of these serials)."""
        with self.changed:
            start = len(self.seen)

            def enough() -> bool:
                fresh = self.seen[start:]
                matching = fresh if want is None else [seen for seen in fresh if seen == want]
                return len(matching) >= count or bool(self.failures)

            assert self.changed.wait_for(enough, 30), f"traffic stalled at {len(self.seen)} answers"
            assert self.failures == []


Started = tuple[Callable[[], None], Any]  # (stop, the client)


def _sync_traffic(env: dict[str, str], traffic: Traffic, workers: int = 3) -> Started:
    client = meshlib.Client(environ=env)

    def loop() -> None:
        while not traffic.done.is_set():
            try:
                with client.stream("GET", "https://backend/") as response:
                    tls = response.extensions["network_stream"].get_extra_info("ssl_object")
                    server_serial = _serial(tls.getpeercert(True))
                    assert response.status_code == 200, response.status_code
                    traffic.record(int(response.read()), server_serial)
            except BaseException as error:
                traffic.fail(error)

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for thread in threads:
        thread.start()

    def stop() -> None:
        traffic.done.set()
        for thread in threads:
            thread.join(timeout=30)
        client.close()

    return stop, client


def _async_traffic(env: dict[str, str], traffic: Traffic, workers: int = 3) -> Started:
    client = meshlib.AsyncClient(environ=env)  # built here: its source is opened at construction, outside a loop

    async def loop(client: Any) -> None:
        while not traffic.done.is_set():
            try:
                async with client.stream("GET", "https://backend/") as response:
                    tls = response.extensions["network_stream"].get_extra_info("ssl_object")
                    server_serial = _serial(tls.getpeercert(True))
                    assert response.status_code == 200, response.status_code
                    traffic.record(int(await response.aread()), server_serial)
            except BaseException as error:
                traffic.fail(error)

    async def main() -> None:
        async with client:
            await asyncio.gather(*(loop(client) for _ in range(workers)))

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()

    def stop() -> None:
        traffic.done.set()
        thread.join(timeout=30)

    return stop, client


class Workloads:
    """Both agents, the backend's source and its uvicorn, and the frontend client's environment."""

    def __init__(self, directory: Path) -> None:
        self.ca = CA("example.org CA", trust_domain="example.org")
        self.backend_svid, self.frontend_svid = issue(self.ca, BACKEND_ID), issue(self.ca, FRONTEND_ID)
        self.backend_agent = WorkloadAPIServer(directory / "b.sock", [self.backend_svid]).start()
        self.frontend_agent = WorkloadAPIServer(directory / "f.sock", [self.frontend_svid]).start()
        self.backend_source = WorkloadAPISource(self.backend_agent.endpoint)
        self.server = Uvicorn(self.backend_source)
        self.env = {
            "SPIFFE_ENDPOINT_SOCKET": self.frontend_agent.endpoint,
            "MESHLIB_SERVICE_BACKEND": f"static://127.0.0.1:{self.server.port}",
            "MESHLIB_TLS_SERVER_ID": BACKEND_ID,
        }

    def push(self, backend: SVID, frontend: SVID) -> None:
        self.backend_agent.push([backend])
        self.frontend_agent.push([frontend])

    def close(self) -> None:
        self.server.stop()
        self.backend_source.close()
        self.backend_agent.stop()
        self.frontend_agent.stop()


@pytest.fixture
def workloads() -> Iterator[Workloads]:
    directory = Path(tempfile.mkdtemp(prefix="wl-"))
    made = Workloads(directory)
    yield made
    made.close()
    shutil.rmtree(directory, ignore_errors=True)


def _serials(backend: SVID, frontend: SVID) -> tuple[int, int]:
    """(client serial the server sees, server serial the client sees) once both use these SVIDs."""
    return frontend.leaf.cert.serial_number, backend.leaf.cert.serial_number


STARTERS: dict[str, Callable[[dict[str, str], Traffic], Started]] = {"sync": _sync_traffic, "async": _async_traffic}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_svid_rotation_under_live_traffic(workloads: Workloads, mode: str) -> None:
    traffic = Traffic()
    stop, _ = STARTERS[mode](workloads.env, traffic)
    try:
        traffic.wait_for(BATCH, _serials(workloads.backend_svid, workloads.frontend_svid))
        for _ in range(2):  # two rotations in a row
            backend, frontend = issue(workloads.ca, BACKEND_ID), issue(workloads.ca, FRONTEND_ID)
            workloads.push(backend, frontend)
            traffic.wait_for(BATCH, _serials(backend, frontend))  # new handshakes present the new SVIDs
    finally:
        stop()
    assert traffic.failures == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_trust_bundle_rotation_with_overlap_under_live_traffic(workloads: Workloads, mode: str) -> None:
    """New CA: trusted beside the old one, then new SVIDs from it, then the old CA dropped; no request fails."""
    new_ca = CA("example.org CA 2", trust_domain="example.org")
    both = (workloads.ca, new_ca)
    server_context = workloads.backend_source.server_context()
    traffic = Traffic()
    stop, client = STARTERS[mode](workloads.env, traffic)
    client_context = client.tls_contexts["BACKEND"]
    try:
        traffic.wait_for(BATCH)
        generations = server_context.generation, client_context.generation
        workloads.push(  # 1. both CAs trusted, the old SVIDs still in use
            SVID(BACKEND_ID, workloads.backend_svid.leaf, both), SVID(FRONTEND_ID, workloads.frontend_svid.leaf, both)
        )
        # Both sides trust the new CA before either presents an SVID from it (what an overlap is for).
        assert server_context.wait_for_generation(generations[0] + 1, 30)
        assert client_context.wait_for_generation(generations[1] + 1, 30)
        traffic.wait_for(BATCH)
        backend = SVID(BACKEND_ID, new_ca.issue(uris=(BACKEND_ID,)), both)  # 2. new SVIDs, from the new CA
        frontend = SVID(FRONTEND_ID, new_ca.issue(uris=(FRONTEND_ID,)), both)
        workloads.push(backend, frontend)
        traffic.wait_for(BATCH, _serials(backend, frontend))
        generation = server_context.generation
        workloads.push(SVID(BACKEND_ID, backend.leaf, (new_ca,)), SVID(FRONTEND_ID, frontend.leaf, (new_ca,)))
        assert server_context.wait_for_generation(generation + 1, 30)  # 3. the old CA is gone
        traffic.wait_for(BATCH, _serials(backend, frontend))
    finally:
        stop()
    assert traffic.failures == []
