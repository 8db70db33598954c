"""Background refresh of one service's endpoints: a thread for ``Client``, a task for ``AsyncClient``.

Both loops are the same few lines around :class:`~meshlib.discovery.cache.DiscoveryCache`: wait until the
cached answer is due, ask the resolver, report the answer or the failure, publish a changed set. The
request path never waits for them once a first answer exists.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

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
    """Keeps one service's cache fresh from a daemon thread until ``stop()``."""

    def __init__(
        self,
        resolver: Resolver,
        cache: DiscoveryCache,
        publish: Callable[[Snapshot], None],
        first_delay: float,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._publish = publish
        self._delay: float | None = first_delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"meshlib-discovery-{cache.service}", daemon=True)

    def start(self) -> None:
        """Start the loop (once)."""
        self._thread.start()

    def _run(self) -> None:
        while self._delay is not None and not self._stop.wait(self._delay):
            changed, self._delay = refresh_once(self._resolver, self._cache)
            if changed and self._cache.snapshot is not None:
                try:
                    self._publish(self._cache.snapshot)
                except Exception:
                    logger.exception("applying new endpoints of service %s failed", self._cache.service)

    def stop(self) -> None:
        """Ask the loop to end and wait for it (bounded: a query in flight may take its timeout)."""
        self._stop.set()
        # Interrupts a query in flight (a Consul blocking query may otherwise wait minutes); idempotent.
        self._resolver.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT)


class RefreshTask:
    """Keeps one service's cache fresh from an asyncio task until ``stop()``."""

    def __init__(
        self,
        resolver: Resolver,
        cache: DiscoveryCache,
        publish: Callable[[Snapshot], Awaitable[None]],
        first_delay: float,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
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
        while delay is not None:
            await asyncio.sleep(delay)
            changed, delay = await arefresh_once(self._resolver, self._cache)
            if changed and self._cache.snapshot is not None:
                try:
                    await self._publish(self._cache.snapshot)
                except Exception:
                    logger.exception("applying new endpoints of service %s failed", self._cache.service)

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
