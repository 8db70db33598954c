"""Success-rate and failure-percentage ejection through Client and AsyncClient (issue 15, item 2).

Real loopback backends; one of them is a gray failure (``Behavior(fail_fraction=0.3)``: 30 % fast 500s, never
two in a row, so consecutive-failure ejection never fires). Round robin gives every endpoint its share. Time is
a fake clock on the service's detector, and the test calls the client's sweep (``client.mesh.outlier_sweep``)
where its timer would: the sweep finds the service only if the client watched it, and ejects only through the
settings the client read, so each test fails if that wiring is removed. One test lets the real timer thread run.
"""

from __future__ import annotations

import gc
import os
import threading
from typing import Any

import pytest

import meshlib
from meshlib.status import format_status
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, LogWatch, static_target

GRAY = Behavior(fail_fraction=0.3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _env(backends: list[Backend], **extra: str) -> dict[str, str]:
    return {
        "MESHLIB_SERVICE_PAYMENTS": static_target(backends),
        "MESHLIB_LB": "round_robin",
        "MESHLIB_RETRIES": "0",  # every attempt is one request: the counts below are exact
        "MESHLIB_OUTLIER_SUCCESS_RATE_REQUEST_VOLUME": "20",
        **{f"MESHLIB_{key}": value for key, value in extra.items()},
    }


def _faked(client: meshlib.Client | meshlib.AsyncClient) -> FakeClock:
    """Put a fake clock on the service's detector (before its first request, when the sweep starts watching)."""
    clock = FakeClock()
    client.mesh.services["PAYMENTS"].detector.clock = clock
    return clock


def _interval(client: meshlib.Client | meshlib.AsyncClient, clock: FakeClock, seconds: float = 10.0) -> None:
    """The interval ends: move the clock and run the client's sweep, as its timer does."""
    clock.now += seconds
    client.mesh.outlier_sweep.sweep()


def _ejected(client: meshlib.Client | meshlib.AsyncClient) -> dict[str, str | None]:
    (service,) = client.mesh_status().services
    return {e.address: e.ejected_reason for e in service.endpoints if e.ejected}


def _send(client: meshlib.Client, n: int) -> list[int]:
    return [client.get("http://payments/x").status_code for _ in range(n)]


async def _asend(client: meshlib.AsyncClient, n: int) -> list[int]:
    return [(await client.get("http://payments/x")).status_code for _ in range(n)]


# -- success rate ----------------------------------------------------------------------------------------------


def test_gray_endpoint_is_ejected_by_success_rate_then_readmitted(start_backends: BackendFactory) -> None:
    backends = start_backends(6)
    gray = backends[0]
    gray.behavior = GRAY
    with meshlib.Client(environ=_env(backends)) as client:
        clock = _faked(client)
        statuses = _send(client, 6 * 25)  # 25 attempts each: above the request volume of 20
        assert statuses.count(500) == 7  # the gray endpoint's 30 %, never two in a row
        assert _ejected(client) == {}  # nothing before the interval ends
        _interval(client, clock)
        assert _ejected(client) == {gray.address: "success-rate"}
        before = gray.count
        assert _send(client, 50) == [200] * 50  # out of rotation: no request reaches it
        assert gray.count == before
        status = client.mesh_status()
        assert status.services[0].ejections_by_reason == {"consecutive": 0, "success-rate": 1, "failure-percentage": 0}
        table = format_status({"meshlib": "test", "pid": 1, "clients": [status.to_dict()]})  # `meshlib status`
        assert "1 ejection(s) (success-rate 1)" in table
        (row,) = [line for line in table.splitlines() if line.strip().startswith(gray.address)]
        assert row.split()[7] == "success-rate"
        _interval(client, clock, 30.0)  # base ejection time: back in rotation
        assert _ejected(client) == {}
        _send(client, 12)
        assert gray.count > before


@pytest.mark.anyio
async def test_async_gray_endpoint_is_ejected_by_success_rate_then_readmitted(start_backends: BackendFactory) -> None:
    backends = start_backends(6)
    gray = backends[0]
    gray.behavior = GRAY
    async with meshlib.AsyncClient(environ=_env(backends)) as client:
        clock = _faked(client)
        assert (await _asend(client, 6 * 25)).count(500) == 7
        _interval(client, clock)
        assert _ejected(client) == {gray.address: "success-rate"}
        before = gray.count
        assert await _asend(client, 50) == [200] * 50
        assert gray.count == before
        _interval(client, clock, 30.0)
        assert _ejected(client) == {}
        await _asend(client, 12)
        assert gray.count > before


def test_not_ejected_below_the_request_volume(start_backends: BackendFactory) -> None:
    backends = start_backends(6)
    backends[0].behavior = GRAY
    with meshlib.Client(environ=_env(backends)) as client:
        clock = _faked(client)
        _send(client, 6 * 15)  # 15 attempts each, below the request volume of 20
        _interval(client, clock)
        assert _ejected(client) == {}
        assert client.mesh.outlier_sweep.sweeps == 1  # it was swept, and found too little traffic


def test_not_ejected_below_the_minimum_hosts_and_no_timer_runs(start_backends: BackendFactory) -> None:
    backends = start_backends(4)  # fewer than the 5 minimum hosts
    backends[0].behavior = GRAY
    with meshlib.Client(environ=_env(backends)) as client:
        clock = _faked(client)
        _send(client, 4 * 25)
        _interval(client, clock)
        assert _ejected(client) == {}
        assert not client.mesh.outlier_sweep.running  # nothing to sweep: no thread


def test_max_ejection_percent_caps_rate_ejections(start_backends: BackendFactory) -> None:
    backends = start_backends(10)
    for gray in backends[:2]:
        gray.behavior = Behavior(fail_fraction=0.5)
    env = _env(backends, OUTLIER_SUCCESS_RATE_STDEV_FACTOR="1000")  # both grays are below mean - 1 stdev
    with meshlib.Client(environ=env) as client:
        clock = _faked(client)
        _send(client, 10 * 40)
        _interval(client, clock)
        ejected = _ejected(client)
        assert len(ejected) == 1 and set(ejected) < {b.address for b in backends[:2]}  # 10 % of 10: one
        assert client.mesh.services["PAYMENTS"].detector.overflow == 1  # the other was refused by the cap
    env = _env(backends, OUTLIER_SUCCESS_RATE_STDEV_FACTOR="1000", OUTLIER_MAX_PERCENT="20")
    with meshlib.Client(environ=env) as client:  # the cap is what held: at 20 % both go
        clock = _faked(client)
        _send(client, 10 * 40)
        _interval(client, clock)
        assert set(_ejected(client)) == {b.address for b in backends[:2]}


def test_success_rate_off_by_its_enforcement(start_backends: BackendFactory) -> None:
    backends = start_backends(6)
    backends[0].behavior = GRAY
    with meshlib.Client(environ=_env(backends, OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT="0")) as client:
        clock = _faked(client)
        _send(client, 6 * 25)
        _interval(client, clock)
        assert _ejected(client) == {}
        assert not client.mesh.outlier_sweep.running


# -- failure percentage ------------------------------------------------------------------------------------------


FAILURE_PERCENTAGE = {
    "OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT": "0",  # only the failure-percentage detector
    "OUTLIER_FAILURE_PERCENTAGE_ENFORCEMENT_PERCENT": "100",
    "OUTLIER_FAILURE_PERCENTAGE_THRESHOLD": "25",
    "OUTLIER_FAILURE_PERCENTAGE_REQUEST_VOLUME": "20",
}


def test_gray_endpoint_is_ejected_by_failure_percentage_when_enabled(start_backends: BackendFactory) -> None:
    backends = start_backends(6)
    gray = backends[0]
    gray.behavior = GRAY
    with meshlib.Client(environ=_env(backends, **FAILURE_PERCENTAGE)) as client:
        clock = _faked(client)
        _send(client, 6 * 25)
        _interval(client, clock)
        assert _ejected(client) == {gray.address: "failure-percentage"}
    off = {**FAILURE_PERCENTAGE, "OUTLIER_FAILURE_PERCENTAGE_ENFORCEMENT_PERCENT": "0"}  # its default: off
    with meshlib.Client(environ=_env(backends, **off)) as client:
        clock = _faked(client)
        _send(client, 6 * 25)
        _interval(client, clock)
        assert _ejected(client) == {}


@pytest.mark.anyio
async def test_async_gray_endpoint_is_ejected_by_failure_percentage(start_backends: BackendFactory) -> None:
    backends = start_backends(6)
    gray = backends[0]
    gray.behavior = GRAY
    async with meshlib.AsyncClient(environ=_env(backends, **FAILURE_PERCENTAGE)) as client:
        clock = _faked(client)
        await _asend(client, 6 * 25)
        _interval(client, clock)
        assert _ejected(client) == {gray.address: "failure-percentage"}


def test_failure_percentage_below_the_request_volume_ejects_nothing(start_backends: BackendFactory) -> None:
    backends = start_backends(6)
    backends[0].behavior = GRAY
    with meshlib.Client(environ=_env(backends, **FAILURE_PERCENTAGE)) as client:
        clock = _faked(client)
        _send(client, 6 * 15)
        _interval(client, clock)
        assert _ejected(client) == {}


def test_per_service_settings_apply(start_backends: BackendFactory) -> None:
    backends = start_backends(6)
    backends[0].behavior = GRAY
    env = _env(backends, OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT="0")
    env["MESHLIB_SERVICE_PAYMENTS__OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT"] = "100"  # on for this service only
    with meshlib.Client(environ=env) as client:
        clock = _faked(client)
        _send(client, 6 * 25)
        _interval(client, clock)
        assert _ejected(client) == {backends[0].address: "success-rate"}


# -- the timer itself ----------------------------------------------------------------------------------------------


def test_the_timer_thread_sweeps_by_itself(start_backends: BackendFactory, log_event: LogWatch) -> None:
    backends = start_backends(6)
    gray = backends[0]
    gray.behavior = GRAY
    ejected = log_event(f"ejected ('127.0.0.1', {gray.port})")
    env = _env(backends, OUTLIER_INTERVAL="100ms", OUTLIER_SUCCESS_RATE_REQUEST_VOLUME="5")
    with meshlib.Client(environ=env) as client:
        for _ in range(20_000):  # bounded: only "did not hang"
            client.get("http://payments/x")
            if ejected.is_set():
                break
        assert ejected.is_set()
        assert _ejected(client) == {gray.address: "success-rate"}
        thread = client.mesh.outlier_sweep._thread
        assert thread is not None and thread.is_alive()
    thread.join(10)
    assert not thread.is_alive()  # close() ended it


def _sweep_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "meshlib-outlier"}


def test_dropped_clients_end_their_sweep_threads(start_backends: BackendFactory) -> None:
    backends = start_backends(5)
    before = _sweep_threads()
    started: set[threading.Thread] = set()
    for _ in range(5):
        client = meshlib.Client(environ=_env(backends))
        assert client.get("http://payments/x").status_code == 200
        started |= _sweep_threads() - before
    assert len(started) == 5
    del client
    gc.collect()
    for thread in started:
        thread.join(10)  # "did not hang"
    assert [t for t in started if t.is_alive()] == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork() is POSIX-only")
def test_the_child_of_a_fork_sweeps_with_its_own_thread(start_backends: BackendFactory) -> None:
    from tests.test_fork import _both

    backends = start_backends(5)
    with meshlib.Client(environ=_env(backends)) as client:
        assert client.get("http://payments/x").status_code == 200
        assert client.mesh.outlier_sweep.running

        def work(side: str) -> Any:
            if side == "parent":
                return None
            assert not client.mesh.outlier_sweep.running  # no thread survives a fork
            client.get("http://payments/x")  # the child discovers again: its services are watched anew
            return client.mesh.outlier_sweep.running

        _, child = _both(work)
        assert child is True
        assert client.mesh.outlier_sweep.running
