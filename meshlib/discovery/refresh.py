"""Background refresh of one service's endpoints: a thread for ``Client``, a task for ``AsyncClient``.

Both loops are the same few lines around :class:`~meshlib.discovery.cache.DiscoveryCache`: wait until the
cached answer is due, ask the resolver, report the answer or the failure, publish a changed set. The
loop also makes the *first* query of its service, at once: it sets its ``first`` event when that query has
been answered and applied, or has failed, or the loop ended without an answer, so callers wait for the first
answer on the event, each no longer than its own deadline, and the query goes on (serving later calls) after
a caller has given up. The request path never waits for them once a first answer exists.

The task runs under asyncio and under trio (:mod:`meshlib._aio`; sleeping and threads through anyio).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from meshlib.discovery.base import Resolver
from meshlib.discovery.cache import DiscoveryCache, Snapshot
from meshlib.errors import DiscoveryError

if TYPE_CHECKING:
    import anyio

    from meshlib._aio import Task

# anyio and the event loop helpers are imported inside the async functions below (they only run on an event
# loop, so they are loaded by then): a sync Client does not import them for discovery, nor does
# ``import meshlib``.

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
    """Ask the resolver from the event loop and report to the cache: (changed, next delay).

    A cancellation (asyncio's ``CancelledError``, trio's ``Cancelled``: both ``BaseException``) goes through.
    """
    try:
        answer = await resolver.aresolve()
    except Exception as exc:
        return False, cache.on_failure(_describe(exc))
    if len(answer.endpoints) >= COMPARE_IN_THREAD:
        import anyio.to_thread

        # Comparing thousands of endpoints with the last answer takes milliseconds of Python: off the loop.
        return await anyio.to_thread.run_sync(cache.on_answer, answer)
    return cache.on_answer(answer)


class RefreshThread:
    """Keeps one service's cache fresh from a daemon thread until ``stop()``, or until its owner is garbage.

    The thread holds its ``owner`` (the mesh, which keeps the client's state) by weak reference only, and
    calls ``publish(owner, snapshot)`` with it dereferenced for that call alone: a client dropped without
    ``close()`` can then be collected, and the thread ends at its next wake-up (the mesh's finalizer calls
    :meth:`halt` to wake it at once). ``publish`` must not itself refer to the owner.

    ``first_delay`` 0 makes the first query at once; ``first`` is set once that query is answered and
    published, or failed, or the loop ended before it could answer.
    """

    def __init__(
        self,
        resolver: Resolver,
        cache: DiscoveryCache,
        owner: object,
        publish: Callable[[Any, Snapshot], None],
        first_delay: float,
        *,
        first: threading.Event | None = None,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._owner = weakref.ref(owner)
        self._publish = publish
        self._delay: float | None = first_delay
        self._first = first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"meshlib-discovery-{cache.service}", daemon=True)

    def start(self) -> None:
        """Start the loop (once)."""
        self._thread.start()

    def _run(self) -> None:
        try:
            while self._delay is not None and not self._stop.wait(self._delay):
                if not self._refresh():
                    return
                if self._first is not None:
                    self._first.set()  # the first answer (or failure) is in: callers waiting for it go on
        finally:
            if self._first is not None:
                self._first.set()

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
    """Keeps one service's cache fresh from a background task until ``stop()``, or until its owner is garbage.

    Like :class:`RefreshThread`, it holds its ``owner`` weakly (a running task is referenced by its loop, so a
    strong reference would keep a dropped client, and the task, alive for as long as the loop runs) and calls
    ``publish(owner, snapshot)``; :meth:`halt` cancels it from any thread. A task of the running library:
    an asyncio task, or a trio system task (:mod:`meshlib._aio`). ``first_delay`` and ``first`` as for
    :class:`RefreshThread` (``first`` an ``anyio.Event``).
    """

    def __init__(
        self,
        resolver: Resolver,
        cache: DiscoveryCache,
        owner: object,
        publish: Callable[[Any, Snapshot], Awaitable[None]],
        first_delay: float,
        *,
        first: anyio.Event | None = None,
    ) -> None:
        self._resolver = resolver
        self._cache = cache
        self._owner = weakref.ref(owner)
        self._publish = publish
        self._first_delay = first_delay
        self._first = first
        self._task: Task | None = None

    def start(self) -> None:
        """Start the loop on the running event loop (once)."""
        from meshlib._aio import spawn

        if self._task is None:
            self._task = spawn(self._run, name=f"meshlib-discovery-{self._cache.service}")

    async def _run(self) -> None:
        import anyio

        try:
            delay: float | None = self._first_delay
            while delay is not None and self._owner() is not None:
                await anyio.sleep(delay)
                if self._owner() is None:
                    return
                changed, delay = await arefresh_once(self._resolver, self._cache)
                if changed and self._cache.snapshot is not None and not await self._apply(self._cache.snapshot):
                    return
                if self._first is not None:
                    self._first.set()  # the first answer (or failure) is in: callers waiting for it go on
        finally:
            if self._first is not None:
                self._first.set()

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
        from meshlib._aio import cancel_threadsafe

        task = self._task
        if task is not None and not task.done():
            cancel_threadsafe(task)

    async def stop(self) -> None:
        """Cancel the loop and wait until it has ended."""
        from meshlib._aio import stop

        task, self._task = self._task, None
        if task is not None:
            await stop(task)
