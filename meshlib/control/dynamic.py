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
import threading
from collections.abc import Callable, Iterable
from typing import Any

from meshlib.discovery.base import Resolution
from meshlib.errors import DiscoveryError
from meshlib.routing.model import RouteTable

__all__ = ["Latch", "Placeholder", "merge_tables"]


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
