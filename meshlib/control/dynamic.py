"""What every control plane steering a client shares: the placeholder resolver of a service reached through pushed
routes, and the :class:`Latch` calls wait on until the first routes are in.

A service whose target names a control plane (``xds:///payments``, ``consul+chain://payments``) has no endpoints
of its own: calls to it are routed by the tables that control plane installs (``_Mesh.apply_control_plane``) to
services it adds. Until the first table, its :class:`Placeholder` has ``pending`` unset and calls wait on it
(bounded by their deadline); a control plane that says the service cannot be routed sets ``why`` and the latch,
and calls fail at once with that reason.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from meshlib.discovery.base import Resolution
from meshlib.errors import DiscoveryError
from meshlib.routing.model import RouteTable

__all__ = ["DEFAULT_WAIT", "Latch", "Placeholder", "PushedResolver", "merge_tables", "take_batch"]

#: Longest single wait for a push before answering "no change" (the refresh loop asks again at once).
DEFAULT_WAIT = 60.0


class Latch:
    """Set once (the first route table, or a known failure); waited on by calls, blocking or on an event loop."""

    def __init__(self, source: str = "the control plane") -> None:
        #: What is awaited, for error messages.
        self.source = source
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            wake()

    def wait(self, timeout: float | None) -> bool:
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float | None) -> bool:
        """Wait without blocking the event loop or holding a thread (asyncio or trio)."""
        from meshlib._aio import on_trio

        if self._event.is_set():
            return True
        if on_trio():
            import trio

            token = trio.lowlevel.current_trio_token()
            done = trio.Event()

            def wake_trio() -> None:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(done.set)

            if self._add(wake_trio):
                try:
                    with trio.move_on_after(float("inf") if timeout is None else timeout):
                        await done.wait()
                finally:
                    self._forget(wake_trio)
        else:
            import asyncio

            loop = asyncio.get_running_loop()
            fired = asyncio.Event()

            def wake_asyncio() -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                    loop.call_soon_threadsafe(fired.set)

            if self._add(wake_asyncio):
                try:
                    await asyncio.wait_for(fired.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                finally:
                    self._forget(wake_asyncio)
        return self._event.is_set()

    def _add(self, wake: Callable[[], None]) -> bool:
        with self._lock:
            if self._event.is_set():
                return False
            self._wakers.append(wake)
            return True

    def _forget(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if wake in self._wakers:
                self._wakers.remove(wake)


class Placeholder:
    """The resolver of a service routed by a control plane: never asked for endpoints while routed.

    ``pending`` is set when the service's first route table is installed, or when the control plane said it has
    none (``why``); calls wait on it. Asked for endpoints (no table yet, or none any more), it raises the reason
    (``waiting``: what it says before the first answer).
    """

    def __init__(self, service: str, target: str, source: str, waiting: str) -> None:
        self.service = service
        self.target = target
        self.source = source
        self.pending = Latch(source)
        self._waiting = waiting
        #: Why calls cannot be routed (``None``: waiting for the control plane, or routed).
        self.why: str | None = None

    def resolve(self) -> Resolution:
        raise DiscoveryError(self.why or self._waiting, service=self.service, source=self.source)

    async def aresolve(self) -> Resolution:
        return self.resolve()

    def close(self) -> None:
        """Nothing to release: the client's control-plane source holds the watches."""


def merge_tables(tables: Iterable[RouteTable], default_source: str) -> RouteTable:
    """One table of a control plane's services' routes (a host's port-specific routes beside its port-less ones)."""
    services: dict[str, Any] = {}
    versions: list[str] = []
    routes: list[str] = []
    source = ""
    for table in tables:
        for key, by_port in table.services.items():
            services[key] = {**services.get(key, {}), **by_port}
        versions.append(table.version)
        routes.extend(table.routes)
        source = source or table.source
    return RouteTable(services, source or default_source, ";".join(versions), tuple(routes))


class PushedResolver:
    """What a resolver fed by pushes shares: ``resolve`` waits for the next push (the first answer at once when
    one is there) and returns ``Resolution(..., watch=True)``; ``aresolve`` waits on the event loop (asyncio or
    trio) without a thread. Subclasses call :meth:`_pushed` (from any thread) and build the answer in
    :meth:`_answer_locked` (called with the lock held)."""

    def __init__(self, service: str, source: str, *, wait: float = DEFAULT_WAIT) -> None:
        self.service = service
        self.source = source
        self._wait = wait
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._generation = 0
        self._seen = 0
        self._closed = False
        self._wakers: list[Callable[[], None]] = []

    def _pushed(self, update: Callable[[], None] | None = None) -> None:
        """Something changed (``update`` runs under the lock first): wake every waiter."""
        with self._changed:
            if update is not None:
                update()
            self._generation += 1
            wakers, self._wakers = self._wakers, []
            self._changed.notify_all()
        for wake in wakers:
            wake()

    def _wait_for(self) -> float:
        """How long one ``resolve`` may wait for a push."""
        return self._wait

    def _answer_locked(self) -> Resolution:
        raise NotImplementedError

    # -- the Resolver protocol ---------------------------------------------------------------------------------

    def resolve(self) -> Resolution:
        """The endpoints after the next push (the first answer at once when one is there)."""
        with self._changed:
            self._changed.wait_for(lambda: self._closed or self._generation > self._seen, self._wait_for())
            return self._answer_locked()

    async def aresolve(self) -> Resolution:
        """:meth:`resolve` on the event loop: waits for a push without blocking the loop or holding a thread."""
        from meshlib._aio import on_trio

        with self._changed:
            if self._closed or self._generation > self._seen:
                return self._answer_locked()
        if on_trio():
            await self._wait_trio()
        else:
            await self._wait_asyncio()
        with self._changed:
            return self._answer_locked()

    def close(self) -> None:
        """End any wait at once (subclasses release what they watch). Idempotent."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            wakers, self._wakers = self._wakers, []
            self._changed.notify_all()
        self._release()
        for wake in wakers:
            wake()

    def _release(self) -> None:
        """What a subclass lets go of when closed."""

    # -- internals ---------------------------------------------------------------------------------------------

    def _register(self, wake: Callable[[], None]) -> bool:
        """Add ``wake`` to be called on the next push; ``False`` if one already came (or the resolver closed)."""
        with self._changed:
            if self._closed or self._generation > self._seen:
                return False
            self._wakers.append(wake)
            return True

    async def _wait_asyncio(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        pushed = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(pushed.set)

        if self._register(wake):
            try:
                await asyncio.wait_for(pushed.wait(), self._wait_for())
            except asyncio.TimeoutError:  # no push within the wait: answer "no change"
                pass
            finally:
                self._forget(wake)

    async def _wait_trio(self) -> None:
        import trio

        token = trio.lowlevel.current_trio_token()
        pushed = trio.Event()

        def wake() -> None:
            with contextlib.suppress(trio.RunFinishedError):  # the run is over: nobody is waiting any more
                token.run_sync_soon(pushed.set)

        if self._register(wake):
            try:
                with trio.move_on_after(self._wait_for()):
                    await pushed.wait()
            finally:
                self._forget(wake)

    def _forget(self, wake: Any) -> None:
        with self._changed:
            if wake in self._wakers:
                self._wakers.remove(wake)


_Item = TypeVar("_Item")


def take_batch(events: queue.SimpleQueue[_Item | None], first: _Item) -> list[_Item] | None:
    """``first`` and everything already queued behind it, to apply together (one swap for a burst of updates);
    ``None`` when the stop mark (``None``) is among them."""
    batch = [first]
    while True:
        try:
            more = events.get_nowait()
        except queue.Empty:
            return batch
        if more is None:
            return None
        batch.append(more)
