"""The connection slots of one endpoint pool, for ``AsyncClient``: a FIFO queue whose waits end at a deadline.

Calls beyond a pool's ``max_connections`` wait here, where the call's deadline reaches them, rather than inside
the HTTP core's pool (see :meth:`meshlib._amesh.AsyncMeshTransport._send`). A slot is handed straight to the
oldest waiter when released, so a caller never loses its turn to a newcomer.

Why not ``anyio.Semaphore`` under ``anyio.move_on_after``: a cancel scope per wait made ``meshlib.httpx2`` 20 %
slower at 128 concurrent requests on 100 connections (S7: 0.75-0.79x raw httpx2, against 0.95-1.0x without the
queue). Under asyncio a wait here is one future and one timer handle; under trio (where the request path is not
the hot path it is on asyncio) it is an ``anyio.Event`` under a cancel scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque

import anyio

from meshlib import _aio


class _Future:
    """A waiter on asyncio: its future resolves ``True`` when handed a slot, ``False`` when its time ran out."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future = future

    def grant(self) -> bool:
        if self.future.done():
            return False
        self.future.set_result(True)
        return True


class _Event:
    """A waiter on trio (or any anyio backend): an event, and whether it was handed a slot before it left."""

    __slots__ = ("event", "gone", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False
        self.gone = False

    def grant(self) -> bool:
        if self.gone:
            return False
        self.granted = True
        self.event.set()
        return True


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


class Slots:
    """``size`` connection slots: :meth:`try_take` without waiting, :meth:`take` waiting up to a time limit.

    Used from one event loop's thread only (every lease of an ``AsyncClient`` is released there).
    """

    __slots__ = ("_waiters", "free", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._waiters: deque[_Future | _Event] = deque()

    def try_take(self) -> bool:
        """Take a free slot now; ``False`` if none is free."""
        if self.free > 0:
            self.free -= 1
            return True
        return False

    def release(self) -> None:
        """Give a slot back: to the oldest waiter still waiting, else to the free count."""
        waiters = self._waiters
        while waiters:
            if waiters.popleft().grant():
                return
        self.free += 1

    async def take(self, timeout: float) -> bool:
        """Wait for a slot, at most ``timeout`` seconds; ``False`` if none came free in time."""
        if self.try_take():
            return True
        if timeout <= 0:
            return False
        if _aio.on_trio():
            return await self._take_anyio(timeout)
        loop = asyncio.get_running_loop()
        waiter = _Future(loop.create_future())
        self._waiters.append(waiter)
        timer = loop.call_later(timeout, _expire, waiter.future) if math.isfinite(timeout) else None
        try:
            granted = await waiter.future
        except BaseException:  # cancelled while waiting: a slot handed over meanwhile goes to the next waiter
            future = waiter.future
            if future.done() and not future.cancelled() and future.result():
                self.release()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not granted:
            self._forget(waiter)
        return granted

    async def _take_anyio(self, timeout: float) -> bool:
        waiter = _Event()
        self._waiters.append(waiter)
        try:
            with anyio.move_on_after(timeout):
                await waiter.event.wait()
        except BaseException:
            waiter.gone = True
            if waiter.granted:
                self.release()
            raise
        waiter.gone = True
        if not waiter.granted:
            self._forget(waiter)
        return waiter.granted

    def _forget(self, waiter: _Future | _Event) -> None:
        with contextlib.suppress(ValueError):  # already taken off by a release that found it gone
            self._waiters.remove(waiter)
