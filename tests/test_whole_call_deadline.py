"""The deadline bounds the whole call: headers, body and streamed bodies, whatever the peer keeps sending.

A hostile peer (tests/servers/hostile.py) keeps each response arriving a little at a time, each piece well within
the per-read timeout, forever. Without the deadline inside the connection (meshlib/_bounded.py) every one of these
calls would last until the peer stops: pytest-timeout would fail the test. With it, the call ends with
``DeadlineExceeded`` and the client lets go of the connection (the peer sees it hang up).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from meshlib.testing import Behavior
from tests.anyio_backends import asyncio_and_trio  # noqa: F401 (async tests run under asyncio and trio)
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx
from tests.servers.hostile import Hostile

pytestmark = pytest.mark.timeout(60)

DEADLINE = 0.5
ANSWERING = ("headers", "continue", "chunked", "body")


@pytest.fixture(params=ANSWERING)
def hostile(request: pytest.FixtureRequest) -> Iterator[Hostile]:
    with Hostile(request.param) as server:
        yield server


@pytest.fixture(params=("chunked", "body"))
def streaming(request: pytest.FixtureRequest) -> Iterator[Hostile]:
    """The modes where a response reaches the application, whose body never ends."""
    with Hostile(request.param) as server:
        yield server


def _client(server: Hostile) -> Any:
    return meshlib.Client(services={"svc": f"static://{server.address}"}, environ={})


def _aclient(server: Hostile) -> Any:
    return meshlib.AsyncClient(services={"svc": f"static://{server.address}"}, environ={})


def _is_deadline(exc: BaseException) -> None:
    assert isinstance(exc, meshlib.DeadlineExceeded), repr(exc)
    assert isinstance(exc, httpx.TimeoutException), "the library's flavour, so `except httpx.TimeoutException` works"
    assert "svc" in str(exc)


def test_get_ends_at_the_deadline_whatever_the_peer_keeps_sending(hostile: Hostile) -> None:
    with (
        _client(hostile) as client,
        meshlib.policy(timeout=DEADLINE, retries=0),
        pytest.raises(meshlib.DeadlineExceeded) as info,
    ):
        client.get("http://svc/")
    _is_deadline(info.value)
    assert hostile.hung_up.wait(10), "the client kept the connection after giving up"


def test_streamed_body_ends_at_the_deadline_while_the_application_reads_it(streaming: Hostile) -> None:
    hostile = streaming
    read = 0
    with _client(hostile) as client:
        with meshlib.policy(timeout=DEADLINE, retries=0), client.stream("GET", "http://svc/") as response:
            assert response.status_code == 200
            with pytest.raises(meshlib.DeadlineExceeded) as info:
                for chunk in response.iter_bytes():
                    read += len(chunk)
        (service,) = client.mesh_status().services
        assert [e.inflight for e in service.endpoints] == [0], "the attempt's lease was given back"
    _is_deadline(info.value)
    assert read > 0, "the body did arrive, a little at a time, until the deadline"
    assert "body" in str(info.value)
    assert hostile.hung_up.wait(10)


@pytest.mark.anyio
async def test_async_get_ends_at_the_deadline_whatever_the_peer_keeps_sending(hostile: Hostile) -> None:
    async with _aclient(hostile) as client:
        with meshlib.policy(timeout=DEADLINE, retries=0), pytest.raises(meshlib.DeadlineExceeded) as info:
            await client.get("http://svc/")
    _is_deadline(info.value)
    assert hostile.hung_up.wait(10)


@pytest.mark.anyio
async def test_async_streamed_body_ends_at_the_deadline(streaming: Hostile) -> None:
    hostile = streaming
    read = 0
    async with _aclient(hostile) as client:
        with meshlib.policy(timeout=DEADLINE, retries=0):
            async with client.stream("GET", "http://svc/") as response:
                with pytest.raises(meshlib.DeadlineExceeded) as info:
                    async for chunk in response.aiter_bytes():
                        read += len(chunk)
    _is_deadline(info.value)
    assert read > 0
    assert hostile.hung_up.wait(10)


def test_per_try_timeout_bounds_each_attempt_and_the_call_retries_within_its_deadline() -> None:
    # A GET with a per-try timeout: each attempt on the trickling peer ends at its per-try bound and is retried
    # (idempotent): all four attempts reached the server, and the last one's timeout is what the caller gets.
    with (
        Hostile("headers") as server,
        _client(server) as client,
        meshlib.policy(timeout=30.0, per_try_timeout=0.3, retries=3),
        pytest.raises(httpx.TimeoutException) as info,
    ):
        client.get("http://svc/")
    assert server.requests == 4
    assert "gave up after 4 attempt(s)" in str(info.value)


def test_post_is_not_resent_when_its_attempt_is_cut_at_the_per_try_bound() -> None:
    with (
        Hostile("headers") as server,
        _client(server) as client,
        meshlib.policy(timeout=30.0, per_try_timeout=0.3, retries=3),
        pytest.raises(httpx.TimeoutException),
    ):
        client.post("http://svc/", content=b"charge")
    assert server.requests == 1, "a POST that may have reached the server was sent again"


def test_a_body_read_within_the_deadline_is_untouched(start_backends: BackendFactory) -> None:
    # The bound changes nothing for an answer that completes in time: a 1 MB body arrives whole.
    (backend,) = start_backends(1, behavior=Behavior(body=b"x" * 1_000_000))
    with meshlib.Client(services={"svc": static_target([backend])}, environ={}) as client:
        with meshlib.policy(timeout=5):
            assert len(client.get("http://svc/").content) == 1_000_000
        with client.stream("GET", "http://svc/") as response:
            assert sum(len(c) for c in response.iter_bytes()) == 1_000_000


def test_silent_peer_is_cut_at_the_deadline_too() -> None:
    with Hostile("silent") as server, _client(server) as client:
        with meshlib.policy(timeout=DEADLINE, retries=0), pytest.raises(meshlib.DeadlineExceeded):
            client.get("http://svc/")
        assert server.hung_up.wait(10)


@pytest.mark.anyio
async def test_calls_beyond_the_pool_queue_in_meshlib_and_all_end_at_their_deadline() -> None:
    # 100 calls, 10 connections, a peer that never answers. Twice the pool's size (20) go into the HTTP core's
    # pool; the 80 others wait for a slot in meshlib (where the deadline reaches them and the event loop stays
    # free), not inside the HTTP core's pool (whose bookkeeping for 1,000 waiters starved the loop for a minute:
    # benchmarks/queued.py). Every call ends with DeadlineExceeded.
    import anyio

    errors: list[BaseException] = []
    with Hostile("silent") as server:
        async with meshlib.AsyncClient(
            services={"svc": f"static://{server.address}"}, environ={}, limits=httpx.Limits(max_connections=10)
        ) as client:

            async def call() -> None:
                try:
                    await client.get("http://svc/")
                except Exception as exc:
                    errors.append(exc)

            with meshlib.policy(timeout=2.0, retries=0):
                async with anyio.create_task_group() as group:
                    for _ in range(100):
                        group.start_soon(call)
                    assert await anyio.to_thread.run_sync(server.wait_for, 10)
                    (slots,) = client.mesh._gates.values()
                    assert (slots.size, slots.free, len(slots._waiters)) == (20, 0, 80)
            (service,) = client.mesh_status().services
            assert [e.inflight for e in service.endpoints] == [0]
    assert len(errors) == 100
    assert all(isinstance(e, meshlib.DeadlineExceeded) for e in errors), {type(e).__name__ for e in errors}
    # Each was sent and timed out reading, waited in a pool, or got a slot too late to connect (or, connected, to
    # finish writing the request: seen once on httpx2 under trio) in the time left.
    causes = {"PoolTimeout", "ConnectTimeout", "WriteTimeout", "ReadTimeout"}
    assert {type(e.__cause__).__name__ for e in errors} <= causes
