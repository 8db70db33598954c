"""Background refresh of one service's endpoints: a thread for ``Client``, a task for ``AsyncClient``.

Both loops are the same few lines around :class:`~meshlib.discovery.cache.DiscoveryCache`: wait until the
cached answer is due, ask the resolver, report the answer or the failure, publish a changed set. The
request path never waits for them once a first answer exists.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from meshlib.discovery.base import Resolver
from meshlib.discovery.cache import DiscoveryCache, Snapshot
from meshlib.errors import DiscoveryError

if TYPE_CHECKING:
    import asyncio

# asyncio is imported inside the async functions below (they only run on an event loop, so it is loaded
# by then): a sync Client does not import it for discovery, nor does ``import meshlib``.

logger = logging.getLogger("meshlib.discovery")

#: Answers at least this large are compared with the last one in a worker thread (the async loop keeps running).
COMPARE_IN_THREAD = 500

#: How long ``close()`` waits for a refresh thread blocked in a query before leaving it (daemon) behind.
JOIN_TIMEOUT = 5.0


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DiscoveryError) else f"{type(exc).__name__}: {exc}"


def refresh_once(resolver: Resolver, cache: DiscoveryCache) -> tuple[bool, float | None]:
    """Ask the resolver synchronously and report to the cache: (changed, next delay)."""
    try:
        answer = resolver.resolve()
    except Exception as exc:  # any failure of a source keeps the last good set; logged by the cache
        return False, cache.on_failure(_describe(exc))
    return cache.on_answer(answer)


async def arefresh_once(resolver: Resolver, cache: DiscoveryCache) -> tuple[bool, float | None]:
    """Ask the resolver from the event loop and report to the cache: (changed, next delay)."""
    import asyncio

    try:
        answer = await resolver.aresolve()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        return False, cache.on_failure(_describe(exc))
    if len(answer.endpoints) >= COMPARE_IN_THREAD:
        # Comparing thousands of endpoints with the last answer takes milliseconds of Python: off the loop.
        return await asyncio.to_thread(cache.on_answer, answer)
    return cache.on_answer(answer)


class RefreshThread:
    """Keeps one service's cache fresh from a daemon thread until ``stop()``, or until its owner is garbage.

    The thread holds its ``owner`` (the mesh, which keeps the client's state) by weak reference only, and
    calls ``publish(owner, snapshot)`` with it dereferenced for that call alone: a client dropped without
    ``close()`` can then be collected, and the thread ends at its next wake-up (the mesh's finalizer calls
    :meth:`halt` to wake it at once). ``publish`` must not itself refer to the owner.
    """

    def __init__(
        self,
        resolver: Resolver,
        cache: DiscoveryCache,
        owner: object,
        publish: Callable[[Any, Snapshot], None],
        first_delay: float,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._owner = weakref.ref(owner)
        self._publish = publish
        self._delay: float | None = first_delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"meshlib-discovery-{cache.service}", daemon=True)

    def start(self) -> None:
        """Start the loop (once)."""
        self._thread.start()

    def _run(self) -> None:
        while self._delay is not None and not self._stop.wait(self._delay):
            if not self._refresh():
                return

    def _refresh(self) -> bool:
        """One refresh; ``False`` when the owner is gone. (Its own frame: no reference to the owner survives it.)"""
        if self._owner() is None:
            return False
        changed, self._delay = refresh_once(self._resolver, self._cache)
        snapshot = self._cache.snapshot
        if changed and snapshot is not None:
            owner = self._owner()
            if owner is None:
                return False
            try:
                self._publish(owner, snapshot)
            except Exception:
                logger.exception("applying new endpoints of service %s failed", self._cache.service)
        return True

    def halt(self) -> None:
        """Ask the loop to end without waiting for it (safe from a finalizer, on any thread)."""
        self._stop.set()
        # Interrupts a query in flight (a Consul blocking query may otherwise wait minutes); idempotent.
        self._resolver.close()

    def stop(self) -> None:
        """Ask the loop to end and wait for it (bounded: a query in flight may take its timeout)."""
        self.halt()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)


class RefreshTask:
    """Keeps one service's cache fresh from an asyncio task until ``stop()``, or until its owner is garbage.

    Like :class:`RefreshThread`, it holds its ``owner`` weakly (a running task is referenced by its loop, so a
    strong reference would keep a dropped client, and the task, alive for as long as the loop runs) and calls
    ``publish(owner, snapshot)``; :meth:`halt` cancels it from any thread.
    """

    def __init__(
        self,
        resolver: Resolver,
        cache: DiscoveryCache,
        owner: object,
        publish: Callable[[Any, Snapshot], Awaitable[None]],
        first_delay: float,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._owner = weakref.ref(owner)
        self._publish = publish
        self._first_delay = first_delay
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop on the running event loop (once)."""
        import asyncio

        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"meshlib-discovery-{self._cache.service}"
            )

    async def _run(self) -> None:
        import asyncio

        delay: float | None = self._first_delay
        while delay is not None and self._owner() is not None:
            await asyncio.sleep(delay)
            if self._owner() is None:
                return
            changed, delay = await arefresh_once(self._resolver, self._cache)
            if changed and self._cache.snapshot is not None and not await self._apply(self._cache.snapshot):
                return

    async def _apply(self, snapshot: Snapshot) -> bool:
        """Publish ``snapshot``; ``False`` when the owner is gone. (Its own frame, as in RefreshThread.)"""
        owner = self._owner()
        if owner is None:
            return False
        try:
            await self._publish(owner, snapshot)
        except Exception:
            logger.exception("applying new endpoints of service %s failed", self._cache.service)
        return True

    def halt(self) -> None:
        """Cancel the task from any thread, without waiting (for a finalizer); a closed loop is left alone."""
        task = self._task
        if task is None or task.done():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the task will never run again anyway
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def stop(self) -> None:
        """Cancel the loop and wait until it has ended."""
        import asyncio

        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        if task.get_loop() is asyncio.get_running_loop():
            try:
                await task
            except asyncio.CancelledError:
                # Our own cancellation of the task; re-raise only if *we* are being cancelled.
                current = asyncio.current_task()
                cancelling = getattr(current, "cancelling", None)  # Python >= 3.11
                if cancelling is not None and cancelling():
                    raise
