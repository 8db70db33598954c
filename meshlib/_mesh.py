"""The mesh inside a client: host -> service routing, first discovery, and the two drivers of the call plan.

Every decision of a call is made by :meth:`meshlib._plan.Call.plan`, a sans-I/O generator. This module holds
what is left, the I/O, twice and small:

* :class:`MeshTransport` (``meshlib.Client``): the **blocking driver**. ``Send`` calls the endpoint's pool
  on this thread, ``Sleep`` sleeps, ``Start``/``WaitFirst`` use a thread pool made on first use (only plans
  with several attempts in flight need it), ``Cancel`` closes the attempt's response (a blocking attempt
  already on the wire cannot be interrupted: it is released when it returns);
* :class:`~meshlib._amesh.AsyncMeshTransport` (``meshlib.AsyncClient``, in its own module so sync-only
  processes never import asyncio): the **awaiting driver**, under asyncio or trio. ``Send`` awaits the
  pool, ``Start`` makes a task, ``WaitFirst`` waits for the first task to end, ``Cancel`` cancels the task.

Across ``os.fork()`` a client's state is per process: a hook resets every live mesh in the child
(:meth:`_Mesh._after_fork`), so the child never sends on the parent's pooled connections and refreshes
discovery in its own threads. Refreshers hold their mesh weakly, so a client dropped without ``close()`` is
collected and its refreshers end (:meth:`_Mesh._on_collect`).

Both run the same loop (:func:`_drive` / :func:`_adrive`): take a step, do it, send the outcome back; an
interruption (cancellation, ``KeyboardInterrupt``) is thrown into the plan, which releases what it holds.

The request that reaches an endpoint is a new request whose URL names the endpoint's address, while the
``Host`` header (and, for https, the TLS server name via the ``sni_hostname`` extension, so the certificate
is checked against the logical name) stay the logical service name. The caller's request is not modified,
so ``response.url`` and redirects keep the logical URL. Meshlib's errors leave in the client library's
flavour (:meth:`meshlib._http.HttpLib.localize`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from meshlib._bounded import DEADLINE
from meshlib._config import MeshConfig, service_key
from meshlib._http import HttpLib
from meshlib._lease import LeaseHome
from meshlib._plan import _DEFAULT_PORTS, Attempt, Call, Cancel, Plan, Send, Sleep, Start, Step, WaitFirst
from meshlib._service import Active, Service
from meshlib._testmode import MODE as _TESTING
from meshlib.discovery import build_resolver
from meshlib.discovery.base import DiscoverySettings, Endpoint
from meshlib.discovery.refresh import RefreshThread
from meshlib.errors import ClientClosedError, MeshError
from meshlib.telemetry.client import ClientTelemetry
from meshlib.telemetry.tracing import send_suppressed

if TYPE_CHECKING:
    import concurrent.futures

logger = logging.getLogger("meshlib")

T = TypeVar("T")

_ROUTE_CACHE_SIZE = 1024
#: Endpoint sets at least this large are applied off the event loop (AsyncMeshTransport._publish).
_APPLY_IN_THREAD = 500


def _for_service(new_transport: Callable[[Endpoint, str], T], key: str, endpoint: Endpoint) -> T:
    """The pool factory as one service sees it: the service key is bound (its TLS settings depend on it)."""
    return new_transport(endpoint, key)


def _no_first_answer(service: Service[Any]) -> str:
    """Why a call failed while waiting for its service's first discovery answer (a DeadlineExceeded reason)."""
    return (
        f"discovery of service {service.name!r} did not answer within the deadline ({service.resolver.source}); "
        "the query goes on and its answer will serve later calls"
    )


class _Router(Generic[T]):
    """Host -> Service lookup, shared by both drivers; caches host normalisation for hot hosts."""

    def __init__(self, config: MeshConfig, new_transport: Callable[[Endpoint, str], T]) -> None:
        settings = DiscoverySettings(
            dns_servers=config.dns_servers, dns_timeout=config.dns_timeout, environ=config.environ
        )
        self.services: dict[str, Service[T]] = {}
        for key, svc in config.services.items():
            resolver = build_resolver(
                svc.name, svc.target, settings, variable=svc.variable or f"services[{svc.name!r}]"
            )
            self.services[key] = Service(svc, config, resolver, functools.partial(_for_service, new_transport, key))
        self._cache: dict[str, Service[T] | None] = {}

    def route(self, host: str) -> Service[T] | None:
        """The mesh service a request host names, or ``None`` for hosts outside the mesh."""
        try:
            return self._cache[host]
        except KeyError:
            pass
        found = self.services.get(service_key(host)) if self.services else None
        if len(self._cache) >= _ROUTE_CACHE_SIZE:
            self._cache.clear()  # bounded: arbitrary outside hosts must not grow memory
        self._cache[host] = found
        return found


class _Mesh(Generic[T]):
    """What both drivers share: the services, their pools' owner, telemetry, and where leases hand back.

    ``new_transport(endpoint, service_key)`` makes the pooled inner transport of one endpoint (called once per
    endpoint, on the slow path); ``owns_transports=False`` when it returns a transport the caller owns (a user's
    ``transport=``), which is then never closed here. ``passthrough`` serves hosts outside the mesh when the
    transport is used on its own (``meshlib.Client`` routes those itself).
    """

    def __init__(
        self,
        lib: HttpLib,
        config: MeshConfig,
        new_transport: Callable[[Endpoint, str], T],
        *,
        owns_transports: bool = True,
        passthrough: T | None = None,
        telemetry: ClientTelemetry | None = None,
    ) -> None:
        self.lib = lib
        self.config = config
        self._new_transport = new_transport
        self._router: _Router[T] = _Router(config, new_transport)
        self.telemetry = telemetry if telemetry is not None else ClientTelemetry()
        self.telemetry.bind(self)
        self._owns = owns_transports
        self._given_passthrough = self._passthrough = passthrough
        self._closed = False
        #: Why requests are refused after the client closed (or could not be rebuilt after a fork).
        self._closed_reason = "the client is closed"
        self.home = LeaseHome(self._pool_idle)
        self._driver_state()
        self._finalizer = self._on_collect()
        _LIVE.add(self)

    def _driver_state(self) -> None:
        """The driver's own state (threads or tasks, ``_refreshers``), made at construction and again after a fork."""
        self._refreshers: dict[str, Any] = {}

    def _on_collect(self) -> weakref.finalize[[dict[str, Any], list[Service[Any]]], Any]:
        """When the client is garbage-collected unclosed: wake its refreshers to end, interrupt its resolvers.

        The finalizer refers to the refreshers and services, never to the mesh (or it would never run); it
        does not wait for anything, as it may run on any thread the garbage collector happens to run on.
        """
        finalizer = weakref.finalize(self, _halt, self._refreshers, list(self.services.values()))
        finalizer.atexit = False  # at exit daemon threads just stop; nothing to interrupt
        return finalizer

    def _after_fork(self) -> None:
        """In a forked child (the hook below, no other thread running): start over without touching the parent's.

        Every endpoint pool holds connections the parent still uses: closing one here would end the parent's
        connection too (an HTTP/2 GOAWAY, a TLS close_notify), using one interleaves both processes' requests
        on it. So the old services (pools, stats, breakers, resolvers, their locks that another thread may have
        held at the fork) are abandoned, kept referenced in :data:`_ABANDONED` so the garbage collector never
        closes them either, and new ones are built from the same configuration: the child discovers again on
        its first request and refreshes in its own threads (or tasks, on the child's own event loop).
        """
        self._finalizer.detach()
        _ABANDONED.append((self._router, self._refreshers, self._passthrough, self.home))
        # A response read across the fork may still end its lease here: its retired pool is kept, not closed.
        self.home.close_pool = _ABANDONED.append
        self._passthrough = self._given_passthrough
        self.home = LeaseHome(self._pool_idle)
        old = self._router
        try:
            self._router = _Router(self.config, self._new_transport)
        except Exception as exc:  # a resolver factory that fails the second time: refuse clearly, never share
            logger.exception("meshlib client could not be rebuilt after fork() in process %d", os.getpid())
            for service in old.services.values():  # lock-free: only this thread runs in the child
                service.active, service.transports, service.retiring = None, {}, {}
            self._closed = True
            self.home.closed = True
            self._closed_reason = (
                f"it was built before fork() and could not be rebuilt in process {os.getpid()} ({exc!r}): "
                "create the client after the fork"
            )
        self._driver_state()
        self._finalizer = self._on_collect()

    def _pool_idle(self, transport: T) -> None:
        """A retired endpoint's pool has no request left: close it, the driver's way."""
        raise NotImplementedError

    def _call(self, service: Service[T], request: Any) -> Call[T]:
        """A new call (after running releases the garbage collector queued)."""
        self.home.settle()
        return Call(self.lib, service, request, self.home, self.telemetry)

    def _failed(self, call: Call[T], exc: BaseException) -> None:
        """The call failed before its plan ran (first discovery): observers hear of it; the error is localized."""
        call.finished(None, exc)
        if isinstance(exc, MeshError):
            self.lib.localize(exc)

    @property
    def services(self) -> dict[str, Service[T]]:
        """The mesh services by normalised name (read-only use: status, tests)."""
        return self._router.services

    def routes(self, host: str) -> bool:
        """Whether ``host`` is a mesh service."""
        return self._router.route(host) is not None

    def service_for(self, host: str) -> str | None:
        """The name of the mesh service ``host`` names, or ``None`` for hosts outside the mesh."""
        service = self._router.route(host)
        return None if service is None else service.name

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(reason=self._closed_reason)


def _halt(refreshers: dict[str, Any], services: list[Service[Any]]) -> None:
    """The finalizer of a mesh collected unclosed (see :meth:`_Mesh._on_collect`)."""
    for refresher in list(refreshers.values()):
        refresher.halt()
    for service in services:
        try:
            service.resolver.close()
        except Exception:
            logger.exception("closing the resolver of service %s failed", service.name)


#: Every live mesh of this process (both drivers), for the fork hook: weakly, so it keeps no client alive.
_LIVE: weakref.WeakSet[_Mesh[Any]] = weakref.WeakSet()
#: What forked children inherited and must neither use nor close (see :meth:`_Mesh._after_fork`).
_ABANDONED: list[object] = []


def _after_fork_in_child() -> None:
    """``os.register_at_fork(after_in_child=...)``: every live mesh starts over in the child."""
    for mesh in list(_LIVE):
        try:
            mesh._after_fork()
        except Exception:  # never let one mesh stop the others from letting go of the parent's state
            logger.exception("resetting a meshlib client after fork() failed")


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the blocking driver ---------------------------------------------------------------------------------------


class MeshTransport(_Mesh[Any]):
    """The blocking driver: ``meshlib.Client`` sends every mesh request through it (an httpx/httpx2 transport)."""

    _refreshers: dict[str, RefreshThread]

    def _driver_state(self) -> None:
        self._refreshers = {}
        #: Set by each service's refresh thread once its first query has answered (or failed).
        self._first: dict[str, threading.Event] = {}
        # Guards starting a service's refresh thread: held for a dict lookup and a thread start, never for I/O.
        self._start_lock = threading.Lock()
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._workers_lock = threading.Lock()

    def _activate(self, service: Service[Any], call: Call[Any]) -> Active[Any]:
        """First use of a service: start its refresh thread (once), whose first query this call waits for.

        The wait is bounded by the call's deadline (taken before discovery, so waiting counts against it):
        past it, ``DeadlineExceeded``, and the query goes on in the background and serves later calls. Each
        service has its own thread and event, so a hung first query holds up no other service.
        """
        first = self._first.get(service.name)
        if first is None:
            with self._start_lock:
                self._check_open()
                first = self._first.get(service.name)
                if first is None:
                    first = threading.Event()
                    # Weakly tied to this mesh: a client dropped unclosed is collected and its thread ends.
                    thread = RefreshThread(
                        service.resolver,
                        service.cache,
                        self,
                        lambda mesh, _: mesh._publish(service),
                        0.0,
                        first=first,
                    )
                    self._refreshers[service.name] = thread
                    self._first[service.name] = first
                    thread.start()
        if not first.is_set():
            remaining = call.remaining()
            if not first.wait(min(max(remaining, 0.0), threading.TIMEOUT_MAX)):
                raise call.deadline_exceeded(_no_first_answer(service))
        self._check_open()
        return service.current()

    def _publish(self, service: Service[Any]) -> None:
        if service.cache.snapshot is not None and not self._closed:
            self._close_pools(service.apply(service.cache.snapshot))

    def _pool_idle(self, transport: Any) -> None:
        if not self._owns:
            return
        try:
            transport.close()
        except Exception:
            logger.exception("closing an endpoint transport failed")

    def _close_pools(self, transports: list[Any]) -> None:
        for transport in transports:
            self._pool_idle(transport)

    def handle_request(self, request: Any) -> Any:
        """Send ``request`` to one endpoint of its service (or pass it through if not a mesh host)."""
        service = self._router.route(request.url.host)
        if service is None:
            if self._passthrough is None:
                self._passthrough = self.lib.HTTPTransport()
            return self._passthrough.handle_request(request)
        call = self._call(service, request)
        try:
            active = service.active
            if _TESTING.enabled:  # meshlib.testing.set_testing: no discovery, one stand-in endpoint
                active = service.stand_in(request.url.port or _DEFAULT_PORTS.get(request.url.scheme, 80))
            elif active is None:
                active = self._activate(service, call)  # first use: waits for discovery's first answer
            elif service.cache.consecutive_failures:
                active = service.current()  # discovery failing: still usable unless too stale
        except BaseException as exc:
            self._failed(call, exc)
            raise
        try:
            return self.drive(call, call.plan(active))
        except MeshError as exc:
            self.lib.localize(exc)
            raise

    def drive(self, call: Call[Any], plan: Plan) -> Any:
        """Run ``plan`` to its end, doing each step's I/O on this thread; its response (or its error)."""
        outcome: Attempt | None = None
        started: list[Attempt] = []
        while True:
            try:
                step = plan.send(outcome)
            except StopIteration as done:
                return done.value
            try:
                outcome = self._do(call, step, started)
            except BaseException as exc:  # interrupted (KeyboardInterrupt...): the plan lets go, then re-raises
                for attempt in started:  # attempts still on the wire in workers: their answers are closed
                    if attempt.task is not None and not attempt.task.done():
                        attempt.task.add_done_callback(lambda _, a=attempt: self._close_answer(a))
                plan.throw(exc)
                raise  # pragma: no cover - a plan always re-raises what it is thrown

    def _do(self, call: Call[Any], step: Step, started: list[Attempt]) -> Attempt | None:
        if isinstance(step, Send):
            self._send(call, step.attempt)
            return step.attempt
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
        elif isinstance(step, Start):
            step.attempt.task = self._pool().submit(self._send, call, step.attempt)
            started.append(step.attempt)
        elif isinstance(step, WaitFirst):
            from concurrent.futures import FIRST_COMPLETED, wait

            futures = {a.task: a for a in step.attempts}
            done, _ = wait(futures, step.timeout, FIRST_COMPLETED)
            return next((futures[f] for f in futures if f in done), None)
        elif isinstance(step, Cancel):
            attempt = step.attempt
            task = attempt.task
            if task is not None and not task.done():  # on the wire in a worker: let go when it returns
                task.add_done_callback(lambda _: self._discard(attempt))
            else:
                self._discard(attempt)
        return None

    @staticmethod
    def _send(call: Call[Any], attempt: Attempt) -> None:
        """One attempt's I/O: its outcome is left on the attempt for the plan."""
        token = DEADLINE.set(attempt.deadline)  # every socket operation of the attempt ends by then (_bounded)
        try:
            if call.trace is None or call.trace.span is None:
                attempt.response = attempt.transport.handle_request(attempt.request)
            else:  # meshlib traces this call: keep HTTP instrumentation from adding a span of its own
                attempt.response = send_suppressed(attempt.transport, attempt.request)
        except Exception as exc:
            attempt.error = exc
        finally:
            DEADLINE.reset(token)

    @staticmethod
    def _close_answer(attempt: Attempt) -> None:
        if attempt.response is not None:
            attempt.response.close()

    def _discard(self, attempt: Attempt) -> None:
        try:
            self._close_answer(attempt)
        finally:
            attempt.lease.release()

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        workers = self._workers
        if workers is None:
            with self._workers_lock:
                self._check_open()
                workers = self._workers
                if workers is None:
                    from concurrent.futures import ThreadPoolExecutor

                    workers = self._workers = ThreadPoolExecutor(max_workers=32, thread_name_prefix="meshlib-attempt")
        return workers

    def close(self) -> None:
        """Stop discovery refreshes and close every endpoint transport this mesh created."""
        with self._workers_lock, self._start_lock:  # no refresh thread starts after this
            if self._closed:
                return
            self._closed = True
            self.home.closed = True  # no attempt starts now; pools in use are closed by their last lease
        self._finalizer.detach()
        self.telemetry.unbind(self)
        for thread in self._refreshers.values():
            thread.stop()
        self._refreshers.clear()
        for first in self._first.values():  # calls still waiting for a first answer: closed, they fail now
            first.set()
        if self._workers is not None:
            self._workers.shutdown(wait=False)
        self.home.settle()
        for service in self.services.values():
            self._close_pools(service.take_pools())
            service.resolver.close()
        if self._passthrough is not None:
            self._passthrough.close()
