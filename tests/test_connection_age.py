"""Maximum connection age (issue 16, item 3): old pooled connections retire when idle, never mid-request.

Real loopback backends, real httpx/httpx2 pools. Two ways to make a connection old without waiting: an injected
clock (:class:`ConnectionAge` on a transport the test builds, moved past the age between requests), and, through
``meshlib.Client``/``AsyncClient``, an age of one microsecond with no jitter, so that any reuse of a connection
comes after its age (a request and its answer take far longer than that). Everything is asserted by counts: which
connection (the backend's serial number) carried each request, how many the backend saw close.
"""

from __future__ import annotations

import pytest

import meshlib
from meshlib._connection_age import ConnectionAge, install
from meshlib.testing import Backend, Behavior
from tests.anyio_backends import asyncio_and_trio  # noqa: F401 (the anyio_backend fixture: asyncio and trio)
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx

pytestmark = pytest.mark.timeout(60)

#: A body much larger than one socket read, so a connection closed under it would fail the read.
BIG = 2_000_000
#: Through a client: every reuse is after the age (1 us), no jitter.
ALWAYS_OLD = {"MESHLIB_MAX_CONNECTION_AGE": "1us", "MESHLIB_MAX_CONNECTION_AGE_JITTER": "0"}


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _aged(clock: Clock, max_age: float = 10.0) -> ConnectionAge:
    return ConnectionAge(max_age, jitter=0.0, clock=clock)


def _ids(backend: Backend) -> list[int]:
    return [request.connection_id for request in backend.requests]


# --------------------------------------------------------------------------- the pool hook, injected clock


def test_after_the_age_the_next_request_goes_on_a_new_connection(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    clock = Clock()
    age = _aged(clock)
    transport = httpx.HTTPTransport()
    assert install(transport, age)
    with httpx.Client(transport=transport) as client:
        assert client.get(backend.url).status_code == 200
        clock.now += 9.0  # younger than 10 s: reused
        assert client.get(backend.url).status_code == 200
        clock.now += 1.5  # now older: retired before reuse
        assert client.get(backend.url).status_code == 200
        assert _ids(backend) == [1, 1, 2]
        assert backend.wait_closed(1), "the old connection was not closed"
        assert age.retired == 1


def test_a_streamed_response_in_flight_when_the_age_passes_is_read_to_the_end(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(body=b"x" * BIG))
    clock = Clock()
    age = _aged(clock)
    transport = httpx.HTTPTransport()
    install(transport, age)
    with httpx.Client(transport=transport) as client:
        with client.stream("GET", backend.url) as response:
            clock.now += 60.0  # the age passes while the body is still arriving
            other = client.get(backend.url)  # a new request meanwhile: a new connection (the old one is busy)
            assert len(other.content) == BIG
            assert backend.connections_closed == 0 and age.retired == 0  # the busy one was not touched
            body = b"".join(response.iter_bytes())
        assert len(body) == BIG  # read to the end, no error
        assert backend.wait_closed(1), "the old connection was not retired once its response was closed"
        assert age.retired == 1
        assert client.get(backend.url).status_code == 200
    assert _ids(backend) == [1, 2, 2]


def test_without_an_age_the_connection_is_reused(start_backends: BackendFactory) -> None:
    """The control: the same requests on a transport without the hook share one connection."""
    (backend,) = start_backends(1)
    transport = httpx.HTTPTransport()
    assert not install(transport, None)
    with httpx.Client(transport=transport) as client:
        for _ in range(3):
            client.get(backend.url)
    assert _ids(backend) == [1, 1, 1]


@pytest.mark.anyio
async def test_async_retires_after_the_age_and_never_mid_stream(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(body=b"x" * BIG))
    clock = Clock()
    age = _aged(clock)
    transport = httpx.AsyncHTTPTransport()
    assert install(transport, age)
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(backend.url)).status_code == 200
        async with client.stream("GET", backend.url) as response:  # reuses connection 1
            clock.now += 60.0  # the age passes while the body is still arriving
            other = await client.get(backend.url)  # a new request meanwhile: a new connection (1 is busy)
            assert len(other.content) == BIG
            assert backend.connections_closed == 0 and age.retired == 0  # the busy one was not touched
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        assert len(body) == BIG  # read to the end, no error
        assert backend.wait_closed(1), "the old connection was not retired once its response was closed"
        assert (await client.get(backend.url)).status_code == 200
    assert _ids(backend) == [1, 1, 2, 2]
    assert age.retired == 1


# --------------------------------------------------------------------------- through meshlib clients


def _mesh_env(backend: Backend, **extra: str) -> dict[str, str]:
    return {"MESHLIB_SERVICE_SVC": static_target([backend]), **extra}


def test_client_retires_connections_by_max_connection_age(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(body=b"x" * BIG))
    with meshlib.Client(environ=_mesh_env(backend, **ALWAYS_OLD)) as client:
        assert len(client.get("http://svc/").content) == BIG
        with client.stream("GET", "http://svc/") as response:  # connection 1 is old: a new one
            assert sum(len(chunk) for chunk in response.iter_bytes()) == BIG
        assert backend.wait_closed(2)
        assert len(client.get("http://svc/").content) == BIG
    assert _ids(backend) == [1, 2, 3]


def test_client_without_max_connection_age_reuses(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    with meshlib.Client(environ=_mesh_env(backend)) as client:
        for _ in range(3):
            client.get("http://svc/")
        assert backend.connections_closed == 0  # (the client's close ends the connection: asserted before it)
    assert _ids(backend) == [1, 1, 1]


def test_the_age_is_per_service(start_backends: BackendFactory) -> None:
    aged, kept = start_backends(2)
    env = {
        "MESHLIB_SERVICE_AGED": static_target([aged]),
        "MESHLIB_SERVICE_AGED__MAX_CONNECTION_AGE": "1us",
        "MESHLIB_SERVICE_AGED__MAX_CONNECTION_AGE_JITTER": "0%",
        "MESHLIB_SERVICE_KEPT": static_target([kept]),
    }
    with meshlib.Client(environ=env) as client:
        for _ in range(3):
            client.get("http://aged/")
            client.get("http://kept/")
    assert _ids(aged) == [1, 2, 3]
    assert _ids(kept) == [1, 1, 1]


@pytest.mark.anyio
async def test_async_client_retires_connections(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(body=b"x" * BIG))
    async with meshlib.AsyncClient(environ=_mesh_env(backend, **ALWAYS_OLD)) as client:
        assert len((await client.get("http://svc/")).content) == BIG
        async with client.stream("GET", "http://svc/") as response:
            assert sum([len(chunk) async for chunk in response.aiter_bytes()]) == BIG
        assert backend.wait_closed(2)
        assert len((await client.get("http://svc/")).content) == BIG
    assert _ids(backend) == [1, 2, 3]


def test_an_old_connection_takes_no_new_request_or_stream(start_backends: BackendFactory) -> None:
    """What HTTP/2 relies on (the Backend speaks HTTP/1.1): past its age a connection is not *available* for a new
    request or stream, so the pool opens another; it is *expired* (closed by the pool) only once idle."""
    (backend,) = start_backends(1, behavior=Behavior(body=b"x" * BIG))
    clock = Clock()
    transport = httpx.HTTPTransport()
    install(transport, _aged(clock))
    with httpx.Client(transport=transport) as client:
        client.get(backend.url)
        (connection,) = transport._pool.connections  # the pool's own view: the idle connection, young
        assert connection.is_available() and not connection.has_expired()
        with client.stream("GET", backend.url) as response:
            clock.now += 60.0
            assert not connection.has_expired()  # busy: never expired
            response.read()
        assert connection.is_closed()  # retired by the pool as its response was closed
        client.get(backend.url)
        (young,) = transport._pool.connections
        clock.now += 60.0
        assert not young.is_available()  # idle but old: no new request (an HTTP/2 stream) goes on it
        assert young.has_expired() and not young.is_closed()  # closed at the pool's next pass, before any reuse
