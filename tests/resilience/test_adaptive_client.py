"""The adaptive concurrency limit wired into Client and AsyncClient, against real loopback backends.

The backends' latency is changed with ``Behavior(delay=...)``; the limit's clock is injected (advanced by the
test between rounds) so that each round of requests is one window of the limit, whatever the machine's speed.
A round opens exactly as many streamed requests as the limit admits (so the limit is full: it learns), then
closes them, which releases their slots with their latency. Assertions are on the limit's state, the errors and
``mesh_status()``, never on the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import meshlib
from meshlib.resilience.adaptive import AdaptiveConcurrencyLimit
from meshlib.resilience.limit import ConcurrencyLimit
from meshlib.status import format_status
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx

FAST = Behavior(delay=0.03)
SLOW = Behavior(delay=0.3)  # 10x: the gradient is at its floor (0.5) whatever the machine adds
#: Small bounds, so a few rounds move the limit visibly; 2 samples make a window once the clock has moved.
ADAPTIVE = {
    "MESHLIB_ADAPTIVE_CONCURRENCY": "1",
    "MESHLIB_ADAPTIVE_INITIAL_LIMIT": "4",
    "MESHLIB_ADAPTIVE_MIN_LIMIT": "2",
    "MESHLIB_ADAPTIVE_WINDOW_SAMPLES": "2",
    "MESHLIB_RETRIES": "0",
}
#: Rounds of flat latency: more than the baseline's warm-up (10 windows), so the slow rounds that follow are
#: judged against a baseline learnt at the fast latency.
FLAT_ROUNDS = 12
SLOW_ROUNDS = 4


class StepClock:
    """The limit's clock: stands still within a round, jumps past any window length between rounds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += 10.0


def _env(backends: list[Backend], **extra: str) -> dict[str, str]:
    return {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), **extra}


def _service(client: meshlib.Client | meshlib.AsyncClient) -> Any:
    return client.mesh.services["PAYMENTS"]


def _adaptive(client: meshlib.Client | meshlib.AsyncClient) -> AdaptiveConcurrencyLimit:
    limit = _service(client).limit
    assert isinstance(limit, AdaptiveConcurrencyLimit)
    return limit


def _round(client: meshlib.Client, pool: ThreadPoolExecutor) -> None:
    """One window: as many streamed requests in flight at once as the limit admits, then all closed."""
    count = _adaptive(client).max_inflight
    with contextlib.ExitStack() as stack:

        def open_one() -> Any:
            response = client.send(client.build_request("GET", "http://payments/"), stream=True)
            assert response.status_code == 200
            return response

        for response in pool.map(lambda _: open_one(), range(count)):
            stack.callback(response.close)
    assert _adaptive(client).inflight == 0  # every slot came back when its body closed


async def _around(client: meshlib.AsyncClient) -> None:
    count = _adaptive(client).max_inflight
    responses = await asyncio.gather(
        *(client.send(client.build_request("GET", "http://payments/"), stream=True) for _ in range(count))
    )
    assert [r.status_code for r in responses] == [200] * count
    for response in responses:
        await response.aclose()
    assert _adaptive(client).inflight == 0


# --- the limit follows latency --------------------------------------------------------------------------------------


def test_limit_rises_while_latency_is_flat_and_falls_when_it_rises(start_backends: BackendFactory) -> None:
    backend, other = start_backends(2, behavior=FAST)
    clock = StepClock()
    with meshlib.Client(environ=_env([backend, other], **ADAPTIVE)) as client, ThreadPoolExecutor(64) as pool:
        limit = _adaptive(client)
        limit.clock = clock
        for _ in range(FLAT_ROUNDS):
            _round(client, pool)
            clock.tick()
        risen = limit.status()
        assert risen.limit >= 4 + 4, risen  # +0.8 per window at flat latency: learnt from the answers' RTT
        backend.behavior = other.behavior = SLOW
        for _ in range(SLOW_ROUNDS):
            _round(client, pool)
            clock.tick()
        fallen = limit.status()
        # The estimate falls each slow window (the whole limit may not yet have crossed an integer: at a limit of
        # about 10, Gradient2's headroom of 4 slows the fall to ~0.3 per window).
        assert fallen.estimate < risen.estimate and fallen.limit <= risen.limit, (risen, fallen)
        assert fallen.gradient < 1.0, fallen
        status = client.mesh_status().services[0]
        assert status.adaptive is not None and status.adaptive.limit == fallen.limit
        assert status.budget.max_inflight == fallen.limit  # the budget line shows the current limit too


@pytest.mark.anyio
async def test_async_limit_rises_while_latency_is_flat_and_falls_when_it_rises(
    start_backends: BackendFactory,
) -> None:
    backend, other = start_backends(2, behavior=FAST)
    clock = StepClock()
    async with meshlib.AsyncClient(
        environ=_env([backend, other], **ADAPTIVE), limits=httpx.Limits(max_connections=200)
    ) as client:
        limit = _adaptive(client)
        limit.clock = clock
        for _ in range(FLAT_ROUNDS):
            await _around(client)
            clock.tick()
        risen = limit.status()
        assert risen.limit >= 4 + 4, risen
        backend.behavior = other.behavior = SLOW
        for _ in range(SLOW_ROUNDS):
            await _around(client)
            clock.tick()
        fallen = limit.status()
        assert fallen.estimate < risen.estimate and fallen.limit <= risen.limit, (risen, fallen)
        assert fallen.gradient < 1.0, fallen
        assert client.mesh_status().services[0].adaptive == limit.status()


# --- refusals ---------------------------------------------------------------------------------------------------


PINNED = {**ADAPTIVE, "MESHLIB_ADAPTIVE_INITIAL_LIMIT": "2", "MESHLIB_ADAPTIVE_MAX_LIMIT": "2"}


def _check_refused(client: meshlib.Client | meshlib.AsyncClient, error: BaseException) -> None:
    assert isinstance(error, meshlib.OverloadedError) and isinstance(error, httpx.PoolTimeout)
    message = str(error)
    assert "adaptive concurrency limit" in message and "2 requests already in flight" in message, message
    status = client.mesh_status()
    (service,) = status.services
    assert service.budget.overloaded == 1 and service.adaptive is not None
    assert service.adaptive.rejected == 1 and service.adaptive.limit == 2
    printed = format_status({"meshlib": "test", "pid": status.pid, "clients": [status.to_dict()]})
    assert "1 overloaded" in printed and "adaptive concurrency: limit 2 (2-2)" in printed, printed


def test_over_the_adaptive_limit_is_an_immediate_overloaded_error_counted_in_status(
    start_backends: BackendFactory,
) -> None:
    (backend,) = start_backends(1, behavior=Behavior(delay=0.5))
    with meshlib.Client(environ=_env([backend], **PINNED)) as client:
        with (
            client.stream("GET", "http://payments/"),
            client.stream("GET", "http://payments/"),
            pytest.raises(meshlib.OverloadedError) as info,
        ):
            client.get("http://payments/")
        assert backend.count == 2  # refused before any byte left: no queue
        _check_refused(client, info.value)


@pytest.mark.anyio
async def test_async_over_the_adaptive_limit_is_an_immediate_overloaded_error_counted_in_status(
    start_backends: BackendFactory,
) -> None:
    (backend,) = start_backends(1, behavior=Behavior(delay=0.5))
    async with meshlib.AsyncClient(environ=_env([backend], **PINNED)) as client:
        async with client.stream("GET", "http://payments/"), client.stream("GET", "http://payments/"):
            with pytest.raises(meshlib.OverloadedError) as info:
                await client.get("http://payments/")
        assert backend.count == 2
        _check_refused(client, info.value)


# --- which outcomes teach the limit -------------------------------------------------------------------------------


def test_a_timeout_is_a_sample_a_refused_connection_is_not(start_backends: BackendFactory) -> None:
    slow, down = start_backends(2, behavior=Behavior(delay=5.0))
    down.refuse()
    env = {**ADAPTIVE, "MESHLIB_TIMEOUT": "500ms"}  # a loaded machine still connects in time
    with meshlib.Client(environ=_env([slow], **env)) as client, pytest.raises(meshlib.DeadlineExceeded):
        client.get("http://payments/")
    assert _adaptive(client).status().samples == 1 and _adaptive(client).inflight == 0
    with meshlib.Client(environ=_env([down], **env)) as client, pytest.raises(httpx.ConnectError):
        client.get("http://payments/")
    assert _adaptive(client).status().samples == 0 and _adaptive(client).inflight == 0


@pytest.mark.anyio
async def test_async_a_cancelled_call_is_no_sample(start_backends: BackendFactory) -> None:
    (slow,) = start_backends(1, behavior=Behavior(delay=5.0))
    async with meshlib.AsyncClient(environ=_env([slow], **ADAPTIVE)) as client:
        task = asyncio.ensure_future(client.get("http://payments/"))
        assert await asyncio.to_thread(slow.wait_for, 1, 10.0)  # the request reached the backend
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        limit = _adaptive(client)
        assert limit.status().samples == 0 and limit.inflight == 0


# --- off by default ---------------------------------------------------------------------------------------------


def test_fixed_limit_by_default_and_adaptive_per_service(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    env = {
        "MESHLIB_SERVICE_PAYMENTS": static_target([backend]),
        "MESHLIB_SERVICE_LEDGER": static_target([backend]),
        "MESHLIB_SERVICE_LEDGER__ADAPTIVE_CONCURRENCY": "true",
        "MESHLIB_MAX_INFLIGHT": "50",
    }
    with meshlib.Client(environ=env) as client:
        assert client.get("http://payments/").status_code == 200
        assert client.get("http://ledger/").status_code == 200
        fixed, adaptive = client.mesh.services["PAYMENTS"].limit, client.mesh.services["LEDGER"].limit
        assert type(fixed) is ConcurrencyLimit and fixed.max_inflight == 50
        assert isinstance(adaptive, AdaptiveConcurrencyLimit)
        assert adaptive.status().max_limit == 50  # the fixed limit is the adaptive one's ceiling
        assert adaptive.status().samples == 1  # its call's latency was fed
        by_name = {s.name: s for s in client.mesh_status().services}
        assert by_name["payments"].adaptive is None and by_name["payments"].budget.max_inflight == 50
        assert by_name["ledger"].adaptive is not None
