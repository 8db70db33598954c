"""The awaiting driver of the call plan: ``meshlib.AsyncClient`` sends every mesh request through it.

Its own module so that a process using only the sync clients never imports asyncio (``meshlib._mesh`` holds
what both drivers share and the blocking driver). It runs under asyncio and under trio: sleeping, events,
timeouts and threads through anyio, background tasks the running library's own way (:mod:`meshlib._aio`).
A plain send (the common case) awaits the pool and nothing else.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from meshlib import _aio
from meshlib._bounded import DEADLINE
from meshlib._mesh import _APPLY_IN_THREAD, _Mesh, _no_first_answer, _no_routes, _until_deadline
from meshlib._plan import _DEFAULT_PORTS, Attempt, Call, Cancel, Plan, Send, Sleep, Start, Step, WaitFirst
from meshlib._service import Active, Service
from meshlib._slots import Slots
from meshlib._testmode import MODE as _TESTING
from meshlib.discovery.refresh import RefreshTask
from meshlib.errors import MeshError
from meshlib.policy import reset_scope
from meshlib.telemetry.tracing import asend_suppressed

logger = logging.getLogger("meshlib")

__all__ = ["AsyncMeshTransport"]


#: Calls in flight per endpoint pool before meshlib queues them, as a multiple of the pool's connections. Up to
#: this many wait inside the HTTP core's pool, which hands a connection straight to a waiting request (its wait
#: is bounded by the deadline too: the pool timeout and every socket operation are); beyond it they queue in
#: meshlib. At exactly the pool's size (factor 1), S7 at 128 concurrent requests on 100 connections lost
#: 10-25 % of meshlib.httpx2's throughput to the extra hand-off; the queue is for the thousands, whose
#: bookkeeping in the HTTP core's pool starves the event loop.
QUEUE_FACTOR = 2


class AsyncMeshTransport(_Mesh[Any]):
    """The awaiting driver: ``meshlib.AsyncClient`` sends every mesh request through it.

    Same contract as :class:`MeshTransport`. Each service's discovery runs as a background task on the loop
    that first used it (its first query at once); a call waits for the first answer no longer than its
    deadline, and concurrent first calls share that one query. An ``AsyncClient`` is used from one event
    loop (asyncio or trio), as its connection pools are.
    """

    _refreshers: dict[Any, RefreshTask]

    #: Connections per endpoint pool (its ``max_connections``) when meshlib made the pools; ``None``: no slots.
    #: Set by the client after construction; kept across a fork (``_driver_state`` runs again in the child).
    connections: int | None = None

    def _driver_state(self) -> None:
        self._refreshers = {}
        # Created lazily inside the loop: an AsyncClient is often built before any loop runs.
        self._first: dict[Any, anyio.Event] = {}
        self._closing: set[_aio.Task] = set()
        #: Endpoint pool -> its slots (:meth:`_take_slot`).
        self._gates: weakref.WeakKeyDictionary[Any, Slots] = weakref.WeakKeyDictionary()
        #: Mirrored requests in flight (kept referenced until done, as asyncio requires).
        self._mirror_tasks: set[_aio.Task] = set()

    async def _activate(self, service: Service[Any], call: Call[Any]) -> Active[Any]:
        """First use of a service: start its refresh task (once), whose first query this call waits for.

        Bounded by the call's deadline as in the blocking driver; a caller cancelled while waiting leaves
        the query running for the next one.
        """
        self._check_open()
        first = self._first.get(service)
        if first is None:
            first = self._first[service] = anyio.Event()
            # Weakly tied to this mesh: a client dropped unclosed is collected and its task ends.
            task = RefreshTask(
                service.resolver, service.cache, self, lambda mesh, _: mesh._publish(service), 0.0, first=first
            )
            self._refreshers[service] = task
            task.start()
        if not first.is_set():
            remaining = call.remaining()
            with anyio.move_on_after(remaining if math.isfinite(remaining) else None):
                await first.wait()
            if not first.is_set():
                raise call.deadline_exceeded(_no_first_answer(service))
        self._check_open()
        return service.current()

    async def _publish(self, service: Service[Any]) -> None:
        snapshot = service.cache.snapshot
        if snapshot is None or self._closed:
            return
        if len(snapshot.endpoints) >= _APPLY_IN_THREAD:
            # Building the view of a large set (stats, pools, pickers) is milliseconds of pure Python: do it in
            # a worker thread so the event loop keeps running (the GIL is handed back every few ms) instead of
            # stalling every request for the whole build. Service.apply is thread-safe and swaps atomically.
            retired = await anyio.to_thread.run_sync(service.apply, snapshot)
        else:
            retired = service.apply(snapshot)
        self._watch_outliers(service)
        await self._aclose_pools(retired)

    async def _aclose_pools(self, transports: list[Any]) -> None:
        if not self._owns:
            return
        for transport in transports:
            try:
                await transport.aclose()
            except Exception:
                logger.exception("closing an endpoint transport failed")

    def _pool_idle(self, transport: Any) -> None:
        """Close a retired endpoint's pool from a sync callback (a stream's close) on the running loop."""
        if self._owns:
            self._later(transport.aclose, "closing an endpoint transport")

    def _later(self, close: Any, what: str) -> None:
        """Run ``close()`` (a coroutine function) in the background; the task is kept until it is done."""
        try:
            task = _aio.spawn(close, name=f"meshlib: {what}")
        except RuntimeError:  # trio.run is ending: no task may start, and its sockets are going anyway
            logger.debug("%s skipped: the event loop is shutting down", what)
            return
        self._closing.add(task)  # keep a reference until done, as asyncio's docs require
        task.add_done_callback(self._closing.discard)

    async def handle_async_request(self, request: Any) -> Any:
        """Send ``request`` to one endpoint of its service (or pass it through if not a mesh host)."""
        target = self._router.route(request.url.host)
        if target is not None and target.pending is not None and not target.pending.is_set():
            target = await self._await_routes(target, request)
        service = None if target is None else target.service
        routed = None
        if target is not None and target.routes is not None:
            service, routed, answer = self._route(target, request)
            if answer is not None:
                await anyio.lowlevel.checkpoint()  # answered without I/O: still a point where others run
                return answer  # answered by the routes themselves (404, redirect, 500)
        if service is None:
            if self._passthrough is None:
                self._passthrough = self.lib.AsyncHTTPTransport()
            return await self._passthrough.handle_async_request(request)
        call = self._call(service, request, routed)
        try:
            active = service.active
            if active is None or _TESTING.enabled or service.cache.consecutive_failures:
                active = await self._view(service, call)
        except BaseException as exc:
            if routed is not None:
                routed.end()
            self._failed(call, exc)
            if isinstance(exc, MeshError):  # refused before any I/O (no endpoints, discovery failing): yield once,
                await anyio.lowlevel.checkpoint()  # so a caller retrying in a loop cannot starve the event loop
            raise
        try:
            response = await self.drive(call, call.plan(active))
        except MeshError as exc:
            self.lib.localize(exc)
            # A refusal (circuit open, overloaded, no endpoints) may be raised without the call ever having
            # waited: yield once, so a caller retrying in a loop cannot starve the event loop.
            await anyio.lowlevel.checkpoint()
            raise
        if routed is not None and routed.choice.mirrors and call.attempts:  # a server answered (no fault abort)
            self._mirror(call)
        return response

    async def _await_routes(self, target: Any, request: Any) -> Any:
        """:meth:`_Mesh._await_routes` on the event loop (no thread held while waiting)."""
        remaining = _until_deadline(self.config, target, request)
        deadline = time.monotonic() + remaining
        found = target
        while found is not None and found.pending is not None and not found.pending.is_set():
            left = deadline - time.monotonic()
            if not await found.pending.wait_async(max(left, 0.0) if math.isfinite(left) else None):
                raise self.lib.localize(_no_routes(found, request))
            found = self._router.route(request.url.host)
        return found

    async def _view(self, service: Service[Any], call: Call[Any]) -> Active[Any]:
        """The endpoints a call picks from: the active view, after discovery's first answer on first use."""
        active = service.active
        if _TESTING.enabled:  # meshlib.testing.set_testing: no discovery, one stand-in endpoint
            url = call.request.url
            return service.stand_in(url.port or _DEFAULT_PORTS.get(url.scheme, 80))
        if active is None:
            return await self._activate(service, call)
        if service.cache.consecutive_failures:
            return service.current()
        return active

    def _mirror(self, call: Call[Any]) -> None:
        """Send the call's mirrored copies as background tasks; their answers are discarded."""
        for service, request in self._mirrors_due(call):
            try:
                task = _aio.spawn(self._send_mirror, service, request, name="meshlib mirror")
            except RuntimeError:  # the event loop is shutting down
                self._mirror_gate.release()
                self._count_mirror(service.name, "dropped")
                continue
            self._mirror_tasks.add(task)
            task.add_done_callback(self._mirror_tasks.discard)

    async def _send_mirror(self, service: Service[Any], request: Any) -> None:
        """One mirrored copy: a call of its own (no retry), answer read and dropped; failures only counted."""
        outcome = "failed"
        reset_scope()  # the caller's policy scope and deadline do not follow the mirror (it outlives the call)
        try:
            call = Call(self.lib, service, request, self.home)
            response = await self.drive(call, call.plan(await self._view(service, call)))
            try:
                async for _ in response.aiter_raw():
                    pass
            finally:
                await response.aclose()
            outcome = "sent"
        except Exception as exc:
            logger.debug("mirrored request to service %s failed: %r", service.name, exc)
        finally:
            self._mirror_gate.release()
            self._count_mirror(service.name, outcome)

    async def drive(self, call: Call[Any], plan: Plan) -> Any:
        """Run ``plan`` to its end, awaiting each step's I/O; its response (or its error)."""
        outcome: Attempt | None = None
        started: list[Attempt] = []
        while True:
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                return done.value
            try:
                outcome = await self._do(call, step, started)
            except BaseException as exc:  # cancelled: the plan lets go, then re-raises
                for attempt in started:  # attempts still in flight are cancelled with the call
                    if attempt.task is not None and not attempt.task.done():
                        attempt.task.cancel()
                        attempt.task.add_done_callback(lambda _, a=attempt: self._close_answer_later(a))
                plan.throw(exc)
                raise  # pragma: no cover - a plan always re-raises what it is thrown

    def _close_answer_later(self, attempt: Attempt) -> None:
        if attempt.response is not None:
            self._later(attempt.response.aclose, "closing an abandoned attempt's response")

    async def _do(self, call: Call[Any], step: Step, started: list[Attempt]) -> Attempt | None:
        if isinstance(step, Send):
            await self._send(call, step.attempt)
            return step.attempt
        if isinstance(step, Sleep):
            await anyio.sleep(step.seconds)
        elif isinstance(step, Start):
            step.attempt.task = _aio.spawn(self._send, call, step.attempt, name="meshlib attempt")
            started.append(step.attempt)
        elif isinstance(step, WaitFirst):
            tasks = {a.task: a for a in step.attempts}
            done = await _aio.wait_first(tasks, step.timeout)
            return next((tasks[t] for t in tasks if t in done), None)
        elif isinstance(step, Cancel):
            attempt = step.attempt
            task = attempt.task
            try:
                if task is not None and not task.done():
                    task.cancel()
                    await _aio.wait_done(task)  # its transport unwinds; the caller's own cancel still reaches us
                if attempt.response is not None:
                    await attempt.response.aclose()
            finally:
                attempt.lease.release()
        return None

    async def _send(self, call: Call[Any], attempt: Attempt) -> None:
        """One attempt's I/O: its outcome is left on the attempt for the plan.

        With meshlib's own pools, an attempt first takes one of its endpoint's slots (``QUEUE_FACTOR`` times the
        pool's ``max_connections``), waiting no longer than its deadline. Calls beyond that queue here, where the
        deadline reaches them, rather than inside the HTTP core's pool, whose bookkeeping for thousands of
        waiters starves the event loop (1,000 calls on a hung endpoint took 31-53 s to end for a 2 s deadline).
        """
        token = DEADLINE.set(attempt.deadline)  # every socket operation of the attempt ends by then (_bounded)
        try:
            if self.connections is not None and not await self._take_slot(attempt):
                return
            if call.trace is None or call.trace.span is None:
                attempt.response = await attempt.transport.handle_async_request(attempt.request)
            else:  # meshlib traces this call: keep HTTP instrumentation from adding a span of its own
                attempt.response = await asend_suppressed(attempt.transport, attempt.request)
        except Exception as exc:
            attempt.error = exc
        finally:
            DEADLINE.reset(token)

    async def _take_slot(self, attempt: Attempt) -> bool:
        """Hold one of the endpoint's connection slots on the attempt's lease; ``False``: none before the deadline."""
        transport = attempt.transport
        gate = self._gates.get(transport)
        if gate is None:
            gate = self._gates.setdefault(transport, Slots(QUEUE_FACTOR * (self.connections or 1)))
        if not gate.try_take():  # the common case takes a free slot without yielding
            deadline = attempt.deadline
            if not await gate.take(math.inf if deadline is None else deadline - time.monotonic()):
                attempt.error = self.lib.module.PoolTimeout(
                    f"no connection to {attempt.lease.address[0]}:{attempt.lease.address[1]} came free before the "
                    f"deadline ({gate.size} in use)",
                    request=attempt.request,
                )
                return False
        attempt.lease.gate = gate
        return True

    async def aclose(self) -> None:
        """Stop discovery tasks and close every endpoint transport this mesh created."""
        if self._closed:
            return
        self._closed = True
        self.home.closed = True  # no attempt starts now; pools in use are closed by their last lease
        self._finalizer.detach()
        self.telemetry.unbind(self)
        if self.routes_source is not None:
            self.routes_source.stop()  # the poll thread: joined promptly (it only waits on an event)
        for source in (self.xds, self.consul):  # the ADS streams, Consul's chain and target watches
            if source is not None:
                await anyio.to_thread.run_sync(source.close)  # joins their threads: off the event loop
        self.outlier_sweep.stop()  # joined promptly: its thread only waits on an event and does arithmetic
        for task in self._refreshers.values():
            await task.stop()
        self._refreshers.clear()
        for first in self._first.values():  # calls still waiting for a first answer: closed, they fail now
            first.set()
        self.home.settle()
        for service in self.services.values():
            await self._aclose_pools(service.take_pools())
            service.resolver.close()
        if self._passthrough is not None:
            await self._passthrough.aclose()
