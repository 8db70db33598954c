"""The per-service in-flight cap: refuses at once beyond the limit, no queue, threads and tasks alike."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshlib.resilience import ConcurrencyLimit

pytestmark = pytest.mark.one_library


def test_default_is_1024() -> None:
    assert ConcurrencyLimit().max_inflight == 1024


def test_refuses_beyond_the_cap_and_recovers_on_release() -> None:
    limit = ConcurrencyLimit(2)
    assert limit.try_acquire()
    assert limit.try_acquire()
    assert not limit.try_acquire()
    assert limit.rejected == 1
    assert limit.inflight == 2
    limit.release()
    assert limit.try_acquire()
    assert limit.peak == 2


def test_double_release_is_a_bug() -> None:
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    limit.release()
    with pytest.raises(RuntimeError, match="release"):
        limit.release()


def test_invalid_cap() -> None:
    with pytest.raises(ValueError, match="max_inflight"):
        ConcurrencyLimit(0)


def test_threads_never_exceed_the_cap() -> None:
    limit = ConcurrencyLimit(8)
    start = threading.Barrier(32)
    tried = threading.Barrier(33)  # the 32 workers and this test
    held = threading.Event()
    granted: list[int] = []

    def worker() -> None:
        start.wait()
        n = sum(limit.try_acquire() for _ in range(10))
        granted.append(n)
        tried.wait(timeout=30)
        held.wait(timeout=30)
        for _ in range(n):
            limit.release()

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    tried.wait(timeout=30)  # every worker has tried; none has released yet
    assert sum(granted) == 8
    assert limit.rejected == 320 - 8
    held.set()
    for t in threads:
        t.join(timeout=30)
    assert limit.inflight == 0
    assert limit.peak == 8


@pytest.mark.anyio
async def test_tasks_share_the_same_limit() -> None:
    limit = ConcurrencyLimit(10)
    gate = asyncio.Event()
    admitted = 0

    async def request() -> bool:
        nonlocal admitted
        if not limit.try_acquire():
            return False
        admitted += 1
        try:
            await gate.wait()
        finally:
            limit.release()
        return True

    tasks = [asyncio.ensure_future(request()) for _ in range(500)]
    await asyncio.sleep(0)  # let every task reach the limit
    assert admitted == 10
    gate.set()
    results = await asyncio.gather(*tasks)
    assert results.count(True) == 10
    assert limit.inflight == 0
    assert limit.rejected == 490
