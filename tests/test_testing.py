"""Tests for meshlib.testing: the loopback HTTP/1.1 backends other tests and the demo rely on.

Synchronisation is by events only (``wait_for``, ``wait_idle``, client timeouts); nothing sleeps and
nothing asserts on elapsed time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import ssl
import sys
import threading
from collections.abc import Iterator

import anyio
import h11
import pytest

from meshlib.testing import Backend, BackendGroup, Behavior, lognormal_delay, start_backends
from tests.httplib import httpx


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def backend() -> Iterator[Backend]:
    with Backend("b1") as b:
        yield b


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def _socket_fds() -> set[str]:
    """Inodes of this process's open sockets (Linux)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def _meshlib_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("meshlib-testing-")]


def _pipelined_exchange(backend: Backend, paths: list[str]) -> list[tuple[int, bytes]]:
    """Send several GETs in one write (pipelining), then parse the responses with an h11 client."""
    payload = b"".join(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for path in paths)
    conn = h11.Connection(h11.CLIENT)
    responses: list[tuple[int, bytes]] = []
    with socket.create_connection((backend.host, backend.port), timeout=10) as sock:
        sock.sendall(payload)
        for path in paths:
            # Walk h11's client state machine through the request we already sent.
            conn.send(h11.Request(method="GET", target=path, headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
            status, body = 0, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            responses.append((status, body))
            conn.start_next_cycle()
    return responses


# ---------------------------------------------------------------------------- basic answers


def test_ok_response_echoes_request(backend: Backend, client: httpx.Client) -> None:
    r = client.get(backend.url + "/hello?x=1", headers={"Host": "payments.mesh", "X-Trace": "abc"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-backend"] == "b1"
    echo = r.json()
    assert echo["backend"] == "b1"
    assert echo["host"] == "payments.mesh"
    assert echo["path"] == "/hello?x=1"
    assert echo["method"] == "GET"
    assert echo["headers"]["x-trace"] == "abc"
    assert backend.count == 1
    (recorded,) = backend.requests
    assert recorded.method == "GET"
    assert recorded.path == "/hello?x=1"
    assert recorded.headers["host"] == "payments.mesh"
    assert ("x-trace", "abc") in recorded.raw_headers
    assert recorded.body == b""
    assert recorded.peercert is None
    assert recorded.behavior == Behavior()
    assert recorded.peer.startswith("127.0.0.1:")


def test_addresses(backend: Backend) -> None:
    assert backend.port > 0
    assert backend.address == f"127.0.0.1:{backend.port}"
    assert backend.url == f"http://127.0.0.1:{backend.port}"
    assert backend.listening and backend.running


def test_custom_body_and_headers(backend: Backend, client: httpx.Client) -> None:
    backend.behavior = Behavior(body=b"plain", headers=(("content-type", "text/plain"), ("x-a", "1")))
    r = client.get(backend.url)
    assert r.content == b"plain"
    assert r.headers["content-type"] == "text/plain"
    assert r.headers["x-a"] == "1"


def test_status_503_with_retry_after(backend: Backend, client: httpx.Client) -> None:
    backend.behavior = Behavior(status=503, headers=(("Retry-After", "7"),))
    r = client.get(backend.url + "/x")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "7"
    assert r.json()["path"] == "/x"
    assert backend.count == 1


def test_204_has_no_body(backend: Backend, client: httpx.Client) -> None:
    backend.behavior = Behavior(status=204)
    r = client.get(backend.url)
    assert r.status_code == 204
    assert r.content == b""
    assert client.get(backend.url).status_code == 204  # the connection stayed usable
    assert backend.connections_total == 1


def test_head(backend: Backend, client: httpx.Client) -> None:
    get_length = int(client.get(backend.url + "/h", headers={"host": "h"}).headers["content-length"])
    r = client.head(backend.url + "/h", headers={"host": "h"})
    assert r.status_code == 200
    assert r.content == b""
    # Same headers as GET; the echo says "HEAD" instead of "GET", one byte longer.
    assert int(r.headers["content-length"]) == get_length + 1
    assert client.get(backend.url).status_code == 200
    assert backend.connections_total == 1
    assert [req.method for req in backend.requests] == ["GET", "HEAD", "GET"]


# ---------------------------------------------------------------------------- delay


def test_delay_answers_after_delay(backend: Backend, client: httpx.Client) -> None:
    backend.behavior = Behavior(delay=0.05)
    assert client.get(backend.url).status_code == 200


def test_delay_longer_than_client_timeout(backend: Backend, client: httpx.Client) -> None:
    backend.behavior = Behavior(delay=60)
    with pytest.raises(httpx.ReadTimeout):
        client.get(backend.url, timeout=httpx.Timeout(10, read=0.2))
    # The request arrived (recorded before the delay) even though no answer came in time ...
    assert backend.wait_for(1)
    assert backend.requests[0].behavior.delay == 60
    # ... and the backend noticed the client hanging up during the delay: no leaked connection.
    assert backend.wait_idle()
    assert backend.connections_open == 0


def test_delay_fn_called_per_request(backend: Backend, client: httpx.Client) -> None:
    calls: list[int] = []

    def fn() -> float:
        calls.append(1)
        return 60.0 if len(calls) == 2 else -1.0  # negative counts as zero

    backend.behavior = Behavior(delay_fn=fn)
    assert client.get(backend.url).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        client.get(backend.url, timeout=httpx.Timeout(10, read=0.2))
    assert len(calls) == 2


def test_lognormal_delay_is_reproducible() -> None:
    a, b = lognormal_delay(0.01, 0.5, seed=3), lognormal_delay(0.01, 0.5, seed=3)
    draws = [a() for _ in range(100)]
    assert draws == [b() for _ in range(100)]
    assert all(d > 0 for d in draws)
    with pytest.raises(ValueError):
        lognormal_delay(0)


def test_stop_during_delay_does_not_wait(backend: Backend) -> None:
    backend.behavior = Behavior(delay=3600)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.get(backend.url, timeout=60)
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    assert backend.wait_for(1)
    backend.stop()  # would hang for an hour (then pytest-timeout) if it waited for the delay
    thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], (httpx.RemoteProtocolError, httpx.ReadError))


# ---------------------------------------------------------------------------- drop, refuse


def test_drop_reads_request_then_closes(backend: Backend, client: httpx.Client) -> None:
    backend.behavior = Behavior(drop=True)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post(backend.url + "/charge", content=b"payload-123")
    assert backend.count == 1
    (recorded,) = backend.requests
    assert recorded.method == "POST"
    assert recorded.path == "/charge"
    assert recorded.body == b"payload-123"
    backend.behavior = Behavior()
    assert client.get(backend.url).status_code == 200


def test_refuse_then_accept(backend: Backend, client: httpx.Client) -> None:
    port = backend.port
    backend.refuse()
    assert not backend.listening
    with pytest.raises(httpx.ConnectError):
        client.get(backend.url)
    assert backend.count == 0
    backend.refuse()  # idempotent
    backend.accept()
    assert backend.port == port
    assert client.get(backend.url).status_code == 200
    backend.accept()  # no-op when listening
    assert backend.count == 1


def test_refuse_closes_pooled_connections(backend: Backend, client: httpx.Client) -> None:
    assert client.get(backend.url).status_code == 200
    assert backend.connections_open == 1
    backend.refuse()
    assert backend.connections_open == 0
    # httpx notices the pooled connection was closed, dials again, and is refused.
    with pytest.raises(httpx.ConnectError):
        client.get(backend.url)


def test_refuse_can_keep_open_connections(backend: Backend, client: httpx.Client) -> None:
    assert client.get(backend.url).status_code == 200
    backend.refuse(close_connections=False)
    assert client.get(backend.url).status_code == 200  # the pooled connection still works
    with httpx.Client() as fresh, pytest.raises(httpx.ConnectError):
        fresh.get(backend.url)
    backend.accept()  # the port can be re-bound while accepted connections on it are open
    with httpx.Client() as fresh:
        assert fresh.get(backend.url).status_code == 200


# ---------------------------------------------------------------------------- HTTP/1.1 mechanics


def test_keep_alive_reuses_one_connection(backend: Backend, client: httpx.Client) -> None:
    assert client.get(backend.url + "/1").status_code == 200
    assert client.post(backend.url + "/2", content=b"x" * 100_000).status_code == 200
    assert backend.connections_total == 1
    first, second = backend.requests
    assert first.connection_id == second.connection_id
    assert len(second.body) == 100_000


def test_connection_close_is_honoured(backend: Backend, client: httpx.Client) -> None:
    r = client.get(backend.url, headers={"connection": "close"})
    assert r.headers["connection"] == "close"
    assert backend.wait_idle()
    assert client.get(backend.url).status_code == 200
    assert backend.connections_total == 2


def test_chunked_post_body_recorded(backend: Backend, client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"hello "
        yield b"chunked "
        yield b"world"

    r = client.post(backend.url + "/upload", content=chunks())
    assert r.status_code == 200
    (recorded,) = backend.requests
    assert recorded.headers["transfer-encoding"] == "chunked"
    assert recorded.body == b"hello chunked world"


def test_pipelined_requests(backend: Backend) -> None:
    responses = _pipelined_exchange(backend, ["/a", "/b"])
    assert [status for status, _ in responses] == [200, 200]
    assert [json.loads(body)["path"] for _, body in responses] == ["/a", "/b"]
    assert [req.path for req in backend.requests] == ["/a", "/b"]
    assert backend.connections_total == 1


def test_expect_100_continue(backend: Backend) -> None:
    with socket.create_connection((backend.host, backend.port), timeout=10) as sock:
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"data")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert backend.requests[0].body == b"data"


def test_malformed_request_gets_400(backend: Backend) -> None:
    with socket.create_connection((backend.host, backend.port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert backend.wait_idle()
    assert backend.count == 0


# ---------------------------------------------------------------------------- observation helpers


def test_reset_and_wait_for(backend: Backend, client: httpx.Client) -> None:
    client.get(backend.url)
    client.get(backend.url)
    assert backend.wait_for(2, timeout=0)
    backend.reset()
    assert backend.count == 0
    assert backend.requests == []
    assert backend.connections_total == 0
    assert backend.connections_open == 1  # resetting counters does not touch connections
    assert not backend.wait_for(1, timeout=0.01)


def test_max_records_bounds_memory_not_count(client: httpx.Client) -> None:
    with Backend("small", max_records=2) as b:
        for i in range(5):
            client.get(f"{b.url}/{i}")
        assert b.count == 5
        assert [r.path for r in b.requests] == ["/3", "/4"]


def test_behavior_validation() -> None:
    with pytest.raises(ValueError):
        Behavior(status=100)
    with pytest.raises(ValueError):
        Behavior(delay=-1)
    with pytest.raises(ValueError):
        Behavior(headers=(("only-name",),))  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Behavior().status = 500  # type: ignore[misc]
    assert dataclasses.replace(Behavior(status=503), delay=1).status == 503
    with pytest.raises(ValueError):
        Backend("bad\nname")


# ---------------------------------------------------------------------------- concurrency


@pytest.mark.anyio
async def test_200_concurrent_async_requests(backend: Backend) -> None:
    statuses: list[int] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        r = await client.get(f"{backend.url}/{i}")
        statuses.append(r.status_code)

    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client, anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, client, i)
    assert statuses == [200] * 200
    assert backend.count == 200
    assert sorted(int(r.path[1:]) for r in backend.requests) == list(range(200))
    assert backend.wait_idle()


# ---------------------------------------------------------------------------- lifecycle


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts sockets via /proc")
def test_stop_leaves_no_thread_and_no_socket() -> None:
    threads_before = _meshlib_threads()
    sockets_before = _socket_fds()
    backend = Backend("leak").start()
    with httpx.Client() as client:
        assert client.get(backend.url).status_code == 200
        assert len(_meshlib_threads()) == len(threads_before) + 1
        backend.stop()
    assert _meshlib_threads() == threads_before
    assert _socket_fds() == sockets_before
    backend.stop()  # idempotent
    with httpx.Client() as client, pytest.raises(httpx.ConnectError):
        client.get(backend.url)


def test_restart_keeps_port(client: httpx.Client) -> None:
    backend = Backend("again").start()
    port = backend.port
    backend.stop()
    with backend:
        assert backend.port == port
        assert client.get(backend.url).status_code == 200
    with pytest.raises(RuntimeError):
        backend.refuse()


def test_start_twice_and_port_in_use(backend: Backend) -> None:
    with pytest.raises(RuntimeError):
        backend.start()
    with pytest.raises(OSError):
        Backend("clash", port=backend.port).start()
    assert _meshlib_threads() == [t for t in threading.enumerate() if t.name == "meshlib-testing-b1"]


def test_start_backends_group(client: httpx.Client) -> None:
    with start_backends(3, behavior=Behavior(status=202)) as group:
        assert isinstance(group, BackendGroup)
        assert [b.name for b in group] == ["backend-0", "backend-1", "backend-2"]
        assert len(set(group.addresses)) == 3
        for url in group.urls:
            assert client.get(url).status_code == 202
        assert group.total_count == 3
        assert group.counts() == {"backend-0": 1, "backend-1": 1, "backend-2": 1}
        group.set_behavior(Behavior(status=500))
        assert client.get(group[1].url).status_code == 500
        group.reset()
        assert group.total_count == 0
    assert not any(b.running for b in group)
    with start_backends(names=["a", "b"]) as named:
        assert [b.name for b in named] == ["a", "b"]
    with pytest.raises(ValueError):
        start_backends(3, names=["a"])


# ---------------------------------------------------------------------------- TLS


def test_tls_with_client_certificate() -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1")
    client_cert = ca.issue_cert("client.mesh")

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_OPTIONAL

    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(client_ctx)
    client_cert.configure_cert(client_ctx)

    anon_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(anon_ctx)

    with Backend("tls", ssl_context=server_ctx) as backend:
        assert backend.url.startswith("https://127.0.0.1:")
        with httpx.Client(verify=client_ctx) as client:
            assert client.get(backend.url + "/secure").json()["path"] == "/secure"
        with httpx.Client(verify=anon_ctx) as client:
            assert client.get(backend.url).status_code == 200
        with_cert, without_cert = backend.requests
        assert with_cert.peercert is not None
        assert ("DNS", "client.mesh") in with_cert.peercert["subjectAltName"]
        assert without_cert.peercert is None
        # A client that does not trust the CA fails the handshake; the backend survives it.
        with httpx.Client() as untrusting, pytest.raises(httpx.ConnectError):
            untrusting.get(backend.url)
        assert backend.wait_idle()
        assert backend.count == 2
