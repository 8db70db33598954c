"""Slow start end to end: a client whose endpoint set grows sends the newcomer a ramped share, on real loopback
backends. The window is an hour, so the whole test runs at the 10 % floor: asserted by counts, not durations."""

from __future__ import annotations

import asyncio

import pytest

import meshlib
from meshlib.testing import Backend
from tests.conftest import BackendFactory, LogWatch
from tests.members import Members


def _env(members: Members, window: str) -> dict[str, str]:
    return {
        "MESHLIB_SERVICE_PAYMENTS": members.source,
        "MESHLIB_DNS_TTL_MIN": "50ms",
        "MESHLIB_LB": "round_robin",
        "MESHLIB_SLOW_START_WINDOW": window,
    }


def _check_ramped(first: list[Backend], new: Backend, requests: int) -> None:
    # Steady, the newcomer would get a third (round robin is exact); at 10 % of its weight, 0.1 / 2.1 of it.
    assert new.count < requests // 6, [b.count for b in (*first, new)]
    assert all(b.count > requests * 4 // 10 for b in first), [b.count for b in (*first, new)]


@pytest.mark.parametrize("window", ["1h", "0"])
def test_sync_client_ramps_an_endpoint_that_joins(
    start_backends: BackendFactory, members: Members, log_event: LogWatch, window: str
) -> None:
    *first, new = start_backends(3)
    members.set(first)
    with meshlib.Client(environ=_env(members, window)) as client:
        for _ in range(100):
            assert client.get("http://payments/").status_code == 200
        assert [b.count for b in first] == [50, 50]  # present at start: not slowed
        joined = log_event(f"added {new.address}")
        members.set([*first, new])
        assert joined.wait(10), "the new endpoint was never applied"
        for b in first:
            b.reset()
        for _ in range(420):
            assert client.get("http://payments/").status_code == 200
        ramping = {
            e.port: (e.effective_weight, e.slow_start_factor) for e in client.mesh_status().services[0].endpoints
        }
        if window == "1h":  # the newcomer is at the 10 % floor of its weight, the others at their full weight
            assert ramping == {new.port: (0.1, 0.1), **{b.port: (1.0, None) for b in first}}
        else:
            assert all(ramp == (1.0, None) for ramp in ramping.values())
    if window == "0":  # slow start off: the newcomer's full third at once
        assert new.count == 140
    else:
        _check_ramped(first, new, 420)


@pytest.mark.anyio
async def test_async_client_ramps_an_endpoint_that_joins(
    start_backends: BackendFactory, members: Members, log_event: LogWatch
) -> None:
    *first, new = start_backends(3)
    members.set(first)
    async with meshlib.AsyncClient(environ=_env(members, "1h")) as client:
        for _ in range(100):
            assert (await client.get("http://payments/")).status_code == 200
        assert [b.count for b in first] == [50, 50]
        joined = log_event(f"added {new.address}")
        members.set([*first, new])
        assert await asyncio.to_thread(joined.wait, 10), "the new endpoint was never applied"
        for b in first:
            b.reset()
        for _ in range(420):
            assert (await client.get("http://payments/")).status_code == 200
    _check_ramped(first, new, 420)
