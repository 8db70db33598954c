"""The event loop as ``AsyncClient`` uses it: the same few operations under asyncio and under trio.

anyio (which httpx already depends on) covers what is neutral: sleeping, events, timeouts, threads, and the
awaiting driver and the discovery loops use it for those. What anyio does not give a library is a task that
outlives the call that starts it: its tasks live in a task group, and an ``AsyncClient`` built without
``async with`` has no scope to hold one. meshlib needs such tasks for the refresh loop of each service,
for hedged or mirrored attempts in flight together, and for closing a pool from a synchronous callback.
So :func:`spawn` starts them the native way of the running library:

* **asyncio**: a plain :class:`asyncio.Task` (what the driver always used, so asyncio pays nothing extra);
  the owner keeps a reference, as asyncio requires;
* **trio**: a *system task* (``trio.lowlevel.spawn_system_task``) run inside a cancel scope, behind a
  :class:`TrioTask` handle with the three methods of :class:`asyncio.Task` the drivers use (``done``,
  ``cancel``, ``add_done_callback``). Trio cancels system tasks when ``trio.run``'s main task returns,
  as asyncio drops pending tasks when its loop closes. An exception escaping a system task would end the
  whole ``trio.run``, so the handle logs and absorbs an ``Exception`` (the refresh loops and attempts
  already catch their own errors; this is a last line).

The running library is asked with sniffio (what httpcore, anyio and dnspython ask), only on the slow steps
(starting or waiting for tasks), never on a plain send.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any, Protocol

import sniffio

logger = logging.getLogger("meshlib")

__all__ = ["Task", "TrioTask", "cancel_threadsafe", "on_trio", "spawn", "stop", "wait_done", "wait_first"]


class Task(Protocol):
    """What the drivers use of a background task: :class:`asyncio.Task`, or :class:`TrioTask` under trio."""

    def done(self) -> bool: ...

    def cancel(self) -> Any: ...

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


def on_trio() -> bool:
    """Whether the running async library is trio (else asyncio).

    In an asyncio callback (``call_soon``, a task's done callback) sniffio finds no library: that is asyncio.
    """
    try:
        return sniffio.current_async_library() == "trio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


class TrioTask:
    """A trio system task with an :class:`asyncio.Task`-like handle: ``done``, ``cancel``, callbacks, ``wait``.

    ``cancel`` cancels the task's own scope (the task unwinds at its next checkpoint); done callbacks run
    synchronously, in the task, when it ends (however it ends), each given this handle.
    """

    __slots__ = ("_callbacks", "_done", "_scope", "_token", "name")

    def __init__(self, fn: Callable[..., Coroutine[Any, Any, object]], args: tuple[Any, ...], name: str) -> None:
        import trio

        self.name = name
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._callbacks: list[Callable[[Any], object]] = []
        self._token = trio.lowlevel.current_trio_token()  # for cancel_threadsafe
        # The caller's context variables (meshlib.policy scopes, the OpenTelemetry context), as asyncio copies
        # them into a task; a system task would otherwise start from trio.run's.
        trio.lowlevel.spawn_system_task(self._run, fn, args, name=name, context=contextvars.copy_context())

    async def _run(self, fn: Callable[..., Coroutine[Any, Any, object]], args: tuple[Any, ...]) -> None:
        try:
            with self._scope:
                await fn(*args)
        except Exception:
            logger.exception("meshlib background task %s failed", self.name)
        finally:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    logger.exception("a done callback of meshlib background task %s failed", self.name)

    def done(self) -> bool:
        """Whether the task has ended."""
        return self._done.is_set()

    def cancelled(self) -> bool:
        """Whether the task has ended because :meth:`cancel` stopped it."""
        return self._done.is_set() and self._scope.cancelled_caught

    def cancel(self) -> bool:
        """Ask the task to stop (it ends at its next checkpoint); ``False`` if it had already ended."""
        if self._done.is_set():
            return False
        self._scope.cancel()
        return True

    def cancel_threadsafe(self) -> None:
        """:meth:`cancel` from any thread, without waiting; nothing once ``trio.run`` has finished."""
        import trio

        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self.cancel)

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None:
        """Call ``fn(self)`` when the task ends (now, if it has)."""
        if self._done.is_set():
            fn(self)
        else:
            self._callbacks.append(fn)

    def remove_done_callback(self, fn: Callable[[Any], object], /) -> None:
        """Forget a callback added with :meth:`add_done_callback` (no error if it is not there)."""
        if fn in self._callbacks:
            self._callbacks.remove(fn)

    async def wait(self) -> None:
        """Until the task has ended."""
        await self._done.wait()


def spawn(fn: Callable[..., Coroutine[Any, Any, object]], *args: Any, name: str) -> Task:
    """Start ``fn(*args)`` in the background on the running loop; the caller keeps the returned handle.

    Under trio, ``RuntimeError`` once ``trio.run`` is ending (its system nursery takes no new task).
    """
    if on_trio():
        return TrioTask(fn, args, name)
    import asyncio

    return asyncio.get_running_loop().create_task(fn(*args), name=name)


def cancel_threadsafe(task: Task) -> None:
    """Cancel ``task`` from any thread without waiting (a finalizer); a closed loop or ended run is left alone."""
    if isinstance(task, TrioTask):
        task.cancel_threadsafe()
        return
    loop: Any = getattr(task, "get_loop", None)
    if loop is not None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the task will never run again anyway
            loop().call_soon_threadsafe(task.cancel)


async def wait_first(tasks: Collection[Task], timeout: float | None) -> set[Task]:
    """Until one of ``tasks`` has ended or ``timeout`` seconds passed: the tasks that have ended."""
    if not on_trio():
        import asyncio

        futures: Any = tasks  # asyncio.Task objects under asyncio
        done, _ = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return set(done)
    import trio

    handles = [t for t in tasks if isinstance(t, TrioTask)]
    done = {t for t in handles if t.done()}
    if done:
        await trio.lowlevel.checkpoint()
        return set(done)
    wake = trio.Event()

    def woken(_: object) -> None:
        wake.set()

    for task in handles:
        task.add_done_callback(woken)
    try:
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            await wake.wait()
    finally:
        for task in handles:
            task.remove_done_callback(woken)
    return {t for t in handles if t.done()}


async def wait_done(task: Task) -> None:
    """Until ``task`` has ended (not shielded: the caller's own cancellation still reaches it)."""
    if isinstance(task, TrioTask):
        await task.wait()
        return
    import asyncio

    future: Any = task  # an asyncio.Task under asyncio
    await asyncio.wait([future])


async def stop(task: Task) -> None:
    """Cancel ``task`` and wait until it has ended; re-raises only a cancellation of the caller itself.

    A task of another event loop (an ``AsyncClient`` closed from a loop other than the one that used it) is
    cancelled without waiting: it cannot be awaited from here.
    """
    if task.done():
        return
    task.cancel()
    if isinstance(task, TrioTask):
        if on_trio():
            await task.wait()
        return
    import asyncio

    if on_trio():
        return
    assert isinstance(task, asyncio.Task)
    if task.get_loop() is not asyncio.get_running_loop():
        return
    try:
        await task
    except asyncio.CancelledError:
        # Our own cancellation of the task; re-raise only if *we* are being cancelled.
        current = asyncio.current_task()
        cancelling = getattr(current, "cancelling", None)  # Python >= 3.11
        if cancelling is not None and cancelling():
            raise
