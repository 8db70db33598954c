"""The call plan and its two drivers, against real loopback backends.

* A test-only plan that races two attempts and cancels the loser proves that the plan shape and both drivers
  hold several attempts in flight (what hedging and mirroring build on).
* Every attempt's lease is released exactly once on every path: answer read, answer closed early, error,
  retried answer, cancellation, and a response dropped without closing. Each test reads the public
  ``mesh_status()`` (endpoint in-flight counts and the service's in-flight slots), so removing any one release
  leaves a count above zero and fails it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import meshlib
from meshlib._plan import Attempt, Call, Plan, Start, WaitFirst
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx

SERVICE = "svc"


def _race(call: Call[Any], active: Any, seen: list[Attempt]) -> Plan:
    """Two attempts in flight on two endpoints; the first answer wins, the other is cancelled."""
    call.admit()
    first = call.attempt(active)
    yield Start(first)
    second = call.attempt(active)
    yield Start(second)
    winner = yield WaitFirst([first, second], None)
    assert winner is not None
    loser = second if winner is first else first
    seen.extend([winner, loser])
    yield call.cancel(loser)
    response = call.finish(winner, call.judge(winner))
    call.finished(response, None)
    return response


def _idle(client: Any) -> None:
    """Every lease given back: no endpoint has a request in flight, the service holds no in-flight slot."""
    (service,) = client.mesh_status().services
    assert service.budget.inflight == 0, "the call's in-flight slot was not given back"
    assert [e.inflight for e in service.endpoints] == [0] * len(service.endpoints), "an attempt's lease is held"


def _backends(start_backends: BackendFactory) -> tuple[Backend, Backend]:
    (fast,) = start_backends(1, prefix="fast")
    (slow,) = start_backends(1, behavior=Behavior(delay=0.5), prefix="slow")
    return fast, slow


# --- several attempts in flight -------------------------------------------------------------------------------------


def test_blocking_driver_races_two_attempts_and_cancels_the_loser(start_backends: BackendFactory) -> None:
    fast, slow = _backends(start_backends)
    with meshlib.Client(services={SERVICE: static_target([fast, slow])}, environ={}) as client:
        mesh = client.mesh
        service = mesh.services[SERVICE.upper()]
        call: Call[Any] = Call(mesh.lib, service, client.build_request("GET", f"http://{SERVICE}/race"), mesh.home)
        active = mesh._activate(service, call)
        seen: list[Attempt] = []
        response = mesh.drive(call, _race(call, active, seen))
        assert response.read() and response.json()["backend"] == "fast0"
        response.close()
        winner, loser = seen
        assert {winner.request.url.port, loser.request.url.port} == {fast.port, slow.port}
        # A blocking attempt on the wire is stopped (its socket shut down: the server sees the hang-up) and let go
        # when its worker returns. A callback added after the driver's runs after it, so this event says the
        # driver has released the loser.
        let_go = threading.Event()
        loser.task.add_done_callback(lambda _: let_go.set())
        assert let_go.wait(10)
        assert loser.response is None and loser.error is not None
        # The server saw the loser's connection close (its socket was shut down), and any request of it that the
        # server read, it saw hang up: nothing is left running there.
        assert slow.wait_idle(timeout=10)
        assert slow.hangups == slow.count
        assert loser.lease.released and winner.lease.released
        _idle(client)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_awaiting_driver_races_two_attempts_and_cancels_the_loser(start_backends: BackendFactory) -> None:
    fast, slow = _backends(start_backends)
    async with meshlib.AsyncClient(services={SERVICE: static_target([fast, slow])}, environ={}) as client:
        mesh = client.mesh
        service = mesh.services[SERVICE.upper()]
        call: Call[Any] = Call(mesh.lib, service, client.build_request("GET", f"http://{SERVICE}/race"), mesh.home)
        active = await mesh._activate(service, call)
        seen: list[Attempt] = []
        response = await mesh.drive(call, _race(call, active, seen))
        await response.aread()
        assert response.json()["backend"] == "fast0"
        await response.aclose()
        winner, loser = seen
        assert loser.task.cancelled()  # the loser's request was cancelled in flight, not waited for
        assert loser.response is None and loser.lease.released and winner.lease.released
        _idle(client)


# --- every lease released exactly once ----------------------------------------------------------------------------


def test_lease_released_when_the_body_is_read(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    with meshlib.Client(services={SERVICE: static_target(backends)}, environ={}) as client:
        with client.stream("GET", f"http://{SERVICE}/x") as response:
            (service,) = client.mesh_status().services
            assert service.budget.inflight == 1 and sum(e.inflight for e in service.endpoints) == 1
            response.read()
        _idle(client)


def test_lease_released_when_a_stream_is_closed_unread(start_backends: BackendFactory) -> None:
    backends = start_backends(1, behavior=Behavior(body=b"x" * 200_000))
    with meshlib.Client(services={SERVICE: static_target(backends)}, environ={}) as client:
        with client.stream("GET", f"http://{SERVICE}/big") as response:
            next(response.iter_raw(1024))
        _idle(client)


def test_lease_and_slot_released_on_a_final_error(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(drop=True))
    with meshlib.Client(services={SERVICE: static_target([backend])}, environ={}) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.post(f"http://{SERVICE}/pay", content=b"{}")  # maybe processed, POST: not re-sent
        _idle(client)
        assert backend.count == 1


def test_retried_answers_release_their_lease_before_the_next_attempt(start_backends: BackendFactory) -> None:
    failing = start_backends(1, behavior=Behavior(status=503), prefix="bad")
    healthy = start_backends(1, prefix="good")
    with meshlib.Client(services={SERVICE: static_target(failing + healthy)}, environ={}) as client:
        for _ in range(6):
            assert client.get(f"http://{SERVICE}/x").status_code == 200
        assert failing[0].count >= 1  # some calls tried the failing endpoint first and were retried
        _idle(client)


@pytest.mark.anyio
async def test_cancelled_call_releases_its_lease_and_slot(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(delay=30))
    async with meshlib.AsyncClient(services={SERVICE: static_target([backend])}, environ={}) as client:
        task = asyncio.ensure_future(client.get(f"http://{SERVICE}/slow"))
        while backend.count == 0:  # until the backend has the whole request (it then waits 30 s to answer)
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        _idle(client)


def test_dropped_response_is_released_before_the_next_call(start_backends: BackendFactory) -> None:
    backends = start_backends(1)
    with meshlib.Client(services={SERVICE: static_target(backends)}, environ={}) as client:
        response = client.send(client.build_request("GET", f"http://{SERVICE}/x"), stream=True)
        (service,) = client.mesh_status().services
        assert service.budget.inflight == 1
        del response
        gc.collect()  # the unclosed response is garbage: its lease is queued for release, never lost
        _idle(client)  # mesh_status() (like the next call) runs the queued releases first
        assert client.get(f"http://{SERVICE}/again").status_code == 200
        _idle(client)


# --- the HTTP library ---------------------------------------------------------------------------------------------


def test_a_transport_of_the_other_library_is_refused_clearly() -> None:
    import httpx as real_httpx

    other = pytest.importorskip("httpx2") if httpx is real_httpx else real_httpx
    ours = "httpx" if httpx is real_httpx else "httpx2"
    with pytest.raises(TypeError, match=rf"transport= is a {other.__name__} transport .* meshlib\.{ours}\.Client"):
        meshlib.Client(services={SERVICE: "static://127.0.0.1:1"}, environ={}, transport=other.MockTransport(None))


def test_errors_leave_in_the_clients_library_flavour(start_backends: BackendFactory) -> None:
    with (
        meshlib.Client(services={SERVICE: "static://127.0.0.1:1"}, environ={}) as client,
        pytest.raises(meshlib.MeshError) as info,
    ):
        client.get(f"http://{SERVICE}/x", extensions={"meshlib.policy": meshlib.Policy(deadline=0)})
    assert isinstance(info.value, meshlib.DeadlineExceeded)  # the library-neutral kind
    assert isinstance(info.value, httpx.TimeoutException)  # and the client library's exception
    assert type(info.value).__module__ == f"meshlib.{client.http_library}"


@pytest.mark.parametrize("caller_header", [None, "99S"])
def test_each_attempt_carries_exactly_one_grpc_timeout(
    start_backends: BackendFactory, caller_header: str | None
) -> None:
    (backend,) = start_backends(1)
    headers = {"grpc-timeout": caller_header} if caller_header else {}
    with meshlib.Client(services={SERVICE: static_target([backend])}, environ={"MESHLIB_TIMEOUT": "2s"}) as client:
        request = client.build_request("GET", f"http://{SERVICE}/x", headers=headers)
        assert client.send(request).status_code == 200
        assert request.headers.get("grpc-timeout") == caller_header  # the caller's request is never modified
    (seen,) = backend.requests
    sent = [value for name, value in seen.raw_headers if name == "grpc-timeout"]
    assert len(sent) == 1 and sent[0].endswith("u") and 0 < int(sent[0][:-1]) <= 2_000_000  # the call's budget


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_refused_async_call_still_yields_to_the_event_loop() -> None:
    """An open breaker or a full in-flight limit refuses at once; a caller retrying in a tight loop must not
    starve every other task (found by S7's warm-up, which hung on it)."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    env = {"MESHLIB_MAX_INFLIGHT": "1"}
    async with meshlib.AsyncClient(services={SERVICE: "static://127.0.0.1:1"}, environ=env) as client:
        service = client.mesh.services[SERVICE.upper()]
        await client.mesh._activate(
            service, Call(client.mesh.lib, service, client.build_request("GET", "http://svc/"), client.mesh.home)
        )
        assert service.limit.try_acquire()  # the only slot is taken: every call is refused before any I/O
        async with anyio.create_task_group() as group:
            group.start_soon(ticker)
            for _ in range(20):
                with pytest.raises(meshlib.OverloadedError):
                    await client.get(f"http://{SERVICE}/x")
            group.cancel_scope.cancel()
        service.limit.release()
    assert ticks >= 10  # about one tick per refusal (trio may run the ticker first or not); none if no yield


def test_error_messages_carry_no_credentials_or_query(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(drop=True))
    with (
        meshlib.Client(services={SERVICE: static_target([backend])}, environ={}) as client,
        pytest.raises(httpx.RemoteProtocolError) as info,
    ):
        client.post(f"http://alice:hunter2@{SERVICE}/charge?api_key=SECRET", content=b"{}")
    message = str(info.value)
    assert f"POST http://{SERVICE}/charge?…" in message and "not idempotent" in message
    assert "hunter2" not in message and "SECRET" not in message and "alice" not in message
