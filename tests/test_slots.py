"""The connection slots of an endpoint pool (``meshlib/_slots.py``), under asyncio and trio.

What the queue promises: a slot is handed to the oldest waiter, a wait ends at its time limit with ``False``
and leaves no trace, and a waiter cancelled after being handed a slot passes it on (no slot is ever lost).
"""

from __future__ import annotations

import anyio
import pytest

from meshlib._slots import Slots
from tests.anyio_backends import asyncio_and_trio  # noqa: F401 (the anyio_backend fixture)

pytestmark = [pytest.mark.timeout(30), pytest.mark.one_library]


@pytest.mark.anyio
async def test_free_slots_are_taken_without_waiting_and_released_back() -> None:
    slots = Slots(2)
    assert slots.try_take() and slots.try_take()
    assert not slots.try_take()
    slots.release()
    assert slots.free == 1


@pytest.mark.anyio
async def test_a_released_slot_goes_to_the_oldest_waiter() -> None:
    slots = Slots(1)
    assert slots.try_take()
    order: list[int] = []
    queued = [anyio.Event() for _ in range(3)]

    async def wait(n: int) -> None:
        queued[n].set()
        assert await slots.take(10)
        order.append(n)
        slots.release()

    async with anyio.create_task_group() as group:
        for n in range(3):
            group.start_soon(wait, n)
            await queued[n].wait()  # each is waiting before the next starts
        assert not slots.try_take(), "a newcomer must not take a slot the waiters are owed"
        slots.release()
    assert order == [0, 1, 2]
    assert slots.free == 1


@pytest.mark.anyio
async def test_a_wait_ends_at_its_time_limit_and_leaves_no_waiter() -> None:
    slots = Slots(1)
    assert slots.try_take()
    assert not await slots.take(0.05)
    assert not await slots.take(0)
    slots.release()
    assert slots.free == 1, "an expired waiter was handed the slot"


def test_a_waiter_cancelled_after_the_handover_passes_the_slot_on() -> None:
    # asyncio's order, made exact: the slot is handed to the waiter (its future resolved), then the waiter's task
    # is cancelled before it resumes. It must pass the slot on, here back to the free count, never lose it.
    import asyncio

    async def main() -> None:
        slots = Slots(1)
        assert slots.try_take()
        waiter = asyncio.ensure_future(slots.take(10))
        await asyncio.sleep(0)  # it is queued
        slots.release()  # handed over...
        waiter.cancel()  # ...and cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.free == 1, "a slot handed to a cancelled waiter was lost"

    asyncio.run(main())
