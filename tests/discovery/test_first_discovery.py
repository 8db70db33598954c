"""A service's first discovery answer: each call waits for it no longer than its own deadline (issue 10, item 3).

The first query runs in the service's refresh loop (a thread for ``Client``, a task for ``AsyncClient``);
callers wait on an event with their remaining deadline. Against a Consul agent that accepts queries and
answers none (the emulator's ``hold``) and a DNS server that never answers (a bound UDP socket):

* the first call fails with ``DeadlineExceeded`` saying discovery did not answer, and the query goes on:
  its answer serves later calls, and no second query is started meanwhile;
* another service of the same client is served while that query hangs, and a caller waiting for the hung
  service gets the answer once it arrives.

Async tests run under asyncio and trio. No timing assertions: a wait that is not bounded by the deadline
hangs, and pytest-timeout fails the test.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import anyio
import anyio.to_thread
import pytest

import meshlib
from meshlib.discovery import refresh as refresh_module
from meshlib.testing import Backend
from tests.anyio_backends import asyncio_and_trio  # noqa: F401 (the anyio_backend fixture)
from tests.conftest import BackendFactory, LogWatch, static_target
from tests.httplib import httpx
from tests.servers.consul import ConsulEmulator

pytestmark = pytest.mark.timeout(60)

HUNG = "discovery of service 'payments' did not answer within the deadline"


@pytest.fixture
def consul() -> Iterator[ConsulEmulator]:
    with ConsulEmulator(jitter=False) as emulator:
        yield emulator
        emulator.release()


@pytest.fixture(autouse=True)
def short_join(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresh thread blocked in a DNS query is left behind (daemon) on close after this long."""
    monkeypatch.setattr(refresh_module, "JOIN_TIMEOUT", 0.05)


@pytest.fixture
def silent_dns() -> Iterator[str]:
    """``ip:port`` of a DNS "server" that receives queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _env(consul: ConsulEmulator, users: Backend, timeout: str = "300ms") -> dict[str, str]:
    """``payments`` on Consul with a short deadline; ``users`` a static service of the same client."""
    return {
        "MESHLIB_SERVICE_PAYMENTS": "consul://payments",
        "MESHLIB_SERVICE_PAYMENTS__TIMEOUT": timeout,
        "MESHLIB_SERVICE_USERS": static_target([users]),
        "CONSUL_HTTP_ADDR": consul.address,
    }


def _hung(consul: ConsulEmulator, start_backends: BackendFactory) -> tuple[Backend, Backend]:
    """A payments instance registered in a Consul that holds every query, and a users backend."""
    payments, users = start_backends(2)
    consul.register("payments", payments.port, id="p", address=payments.host)
    consul.hold()
    return payments, users


def _check_deadline_error(exc: BaseException) -> None:
    assert isinstance(exc, meshlib.DeadlineExceeded) and isinstance(exc, httpx.TimeoutException)
    assert HUNG in str(exc) and "consul://payments" in str(exc)


# --- Client ---------------------------------------------------------------------------------------------------


def test_first_call_gives_up_at_its_deadline_and_the_query_serves_later_calls(
    consul: ConsulEmulator, start_backends: BackendFactory, log_event: LogWatch
) -> None:
    payments, users = _hung(consul, start_backends)
    applied = log_event("endpoints of service payments changed")
    with meshlib.Client(environ=_env(consul, users)) as client:
        with pytest.raises(meshlib.DeadlineExceeded) as first:
            client.get("http://payments/")
        _check_deadline_error(first.value)
        with pytest.raises(meshlib.DeadlineExceeded):  # still hung: the next call waits for the same query
            client.get("http://payments/")
        assert consul.count == 1
        assert client.get("http://users/").status_code == 200  # another service is served meanwhile
        consul.release()
        assert applied.wait(10)
        response = client.get("http://payments/")
        assert response.status_code == 200 and response.extensions["meshlib.endpoint"] == payments.address
        assert consul.health_queries()[0].index is None  # served by the first (plain) query, let go on


def test_another_service_is_served_while_a_caller_waits_for_a_hung_first_query(
    consul: ConsulEmulator, start_backends: BackendFactory
) -> None:
    payments, users = _hung(consul, start_backends)
    results: list[object] = []
    with meshlib.Client(environ=_env(consul, users, timeout="30s")) as client:

        def waiting_caller() -> None:
            try:
                results.append(client.get("http://payments/").extensions["meshlib.endpoint"])
            except Exception as exc:  # reported by the assertion below
                results.append(exc)

        caller = threading.Thread(target=waiting_caller)
        caller.start()
        consul.wait_for_requests(1)  # payments' first query is in flight, held
        assert client.get("http://users/").status_code == 200
        assert not results  # the payments caller is still waiting
        consul.release()
        caller.join(30)
    assert results == [payments.address]


def test_a_silent_dns_server_fails_the_first_call_at_its_deadline(silent_dns: str) -> None:
    env = {
        "MESHLIB_SERVICE_PAYMENTS": "dns://payments.internal:80",
        "MESHLIB_DNS_SERVERS": silent_dns,
        "MESHLIB_DNS_TIMEOUT": "5s",
        "MESHLIB_TIMEOUT": "300ms",
    }
    with meshlib.Client(environ=env) as client, pytest.raises(meshlib.DeadlineExceeded) as info:
        client.get("http://payments/")
    assert isinstance(info.value, httpx.TimeoutException)
    assert HUNG in str(info.value) and "dns://payments.internal:80" in str(info.value)


def test_closing_the_client_wakes_a_caller_waiting_for_a_first_answer(
    consul: ConsulEmulator, start_backends: BackendFactory
) -> None:
    _, users = _hung(consul, start_backends)
    errors: list[BaseException] = []
    client = meshlib.Client(environ=_env(consul, users, timeout="30s"))

    def waiting_caller() -> None:
        try:
            client.get("http://payments/")
        except BaseException as exc:
            errors.append(exc)

    caller = threading.Thread(target=waiting_caller)
    caller.start()
    consul.wait_for_requests(1)
    client.close()
    caller.join(30)
    assert not caller.is_alive()
    assert len(errors) == 1 and "closed" in str(errors[0])


# --- AsyncClient (asyncio and trio) ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_first_call_gives_up_at_its_deadline_and_the_query_serves_later_calls(
    consul: ConsulEmulator, start_backends: BackendFactory, log_event: LogWatch
) -> None:
    payments, users = _hung(consul, start_backends)
    applied = log_event("endpoints of service payments changed")
    async with meshlib.AsyncClient(environ=_env(consul, users)) as client:
        with pytest.raises(meshlib.DeadlineExceeded) as first:
            await client.get("http://payments/")
        _check_deadline_error(first.value)
        with pytest.raises(meshlib.DeadlineExceeded):
            await client.get("http://payments/")
        assert consul.count == 1
        assert (await client.get("http://users/")).status_code == 200
        consul.release()
        assert await anyio.to_thread.run_sync(applied.wait, 10)
        response = await client.get("http://payments/")
        assert response.status_code == 200 and response.extensions["meshlib.endpoint"] == payments.address
        assert consul.health_queries()[0].index is None


@pytest.mark.anyio
async def test_async_another_service_is_served_while_a_caller_waits_for_a_hung_first_query(
    consul: ConsulEmulator, start_backends: BackendFactory
) -> None:
    payments, users = _hung(consul, start_backends)
    results: list[str] = []
    async with meshlib.AsyncClient(environ=_env(consul, users, timeout="30s")) as client:

        async def waiting_caller() -> None:
            results.append((await client.get("http://payments/")).extensions["meshlib.endpoint"])

        async with anyio.create_task_group() as group:
            group.start_soon(waiting_caller)
            await anyio.to_thread.run_sync(consul.wait_for_requests, 1)
            assert (await client.get("http://users/")).status_code == 200
            assert not results
            consul.release()
    assert results == [payments.address]


@pytest.mark.anyio
async def test_async_a_silent_dns_server_fails_the_first_call_at_its_deadline(silent_dns: str) -> None:
    env = {
        "MESHLIB_SERVICE_PAYMENTS": "dns://payments.internal:80",
        "MESHLIB_DNS_SERVERS": silent_dns,
        "MESHLIB_DNS_TIMEOUT": "5s",
        "MESHLIB_TIMEOUT": "300ms",
    }
    async with meshlib.AsyncClient(environ=env) as client:
        with pytest.raises(meshlib.DeadlineExceeded) as info:
            await client.get("http://payments/")
    assert isinstance(info.value, httpx.TimeoutException)
    assert HUNG in str(info.value) and "dns://payments.internal:80" in str(info.value)


@pytest.mark.anyio
async def test_async_a_cancelled_first_caller_leaves_the_query_to_the_next(
    consul: ConsulEmulator, start_backends: BackendFactory
) -> None:
    payments, users = _hung(consul, start_backends)
    async with meshlib.AsyncClient(environ=_env(consul, users, timeout="30s")) as client:
        async with anyio.create_task_group() as group:
            group.start_soon(client.get, "http://payments/")
            await anyio.to_thread.run_sync(consul.wait_for_requests, 1)
            group.cancel_scope.cancel()  # the first caller is cancelled while it waits
        consul.release()
        response = await client.get("http://payments/")
        assert response.extensions["meshlib.endpoint"] == payments.address
        assert consul.health_queries()[0].index is None  # the cancelled caller's query answered this one
