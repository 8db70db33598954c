"""The mesh transports: route -> endpoints -> pick -> send -> observe, for sync and async httpx.

Only wiring lives here; every decision is made by objects shared with the other transport (see docs/design.md):
:class:`~meshlib.service.Service` (snapshot, picker, stats), the discovery cache and the balancers. The two
classes differ only in how they do I/O: a thread and blocking calls for :class:`MeshTransport`, a task and
``await`` for :class:`AsyncMeshTransport`.

The request that reaches an endpoint is a new ``httpx.Request`` whose URL names the endpoint's address, while
the ``Host`` header (and, for https, the TLS server name via httpcore's ``sni_hostname`` extension, so the
certificate is checked against the logical name) stay the logical service name. The caller's request is not
modified, so ``response.url`` and redirects keep the logical URL.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Generic, TypeVar

import httpx

from meshlib import pushback
from meshlib.balance.base import EndpointStats
from meshlib.call import Call, RetrySignal
from meshlib.config import MeshConfig, service_key
from meshlib.discovery import build_resolver
from meshlib.discovery.base import DiscoverySettings, Endpoint
from meshlib.discovery.refresh import RefreshTask, RefreshThread, arefresh_once, refresh_once
from meshlib.resilience.retry import RetryLoops
from meshlib.service import Active, Address, Service
from meshlib.telemetry.client import ClientTelemetry
from meshlib.telemetry.tracing import asend_suppressed, send_suppressed

logger = logging.getLogger("meshlib")

T = TypeVar("T")

_ROUTE_CACHE_SIZE = 1024
#: Endpoint sets at least this large are applied off the event loop (AsyncMeshTransport._publish).
_APPLY_IN_THREAD = 500


def _for_service(new_transport: Callable[[Endpoint, str], T], key: str, endpoint: Endpoint) -> T:
    """The transport factory as one service sees it: the service key is bound (its TLS settings depend on it)."""
    return new_transport(endpoint, key)


class _Router(Generic[T]):
    """Host -> Service lookup, shared by both transports; caches host normalisation for hot hosts."""

    def __init__(self, config: MeshConfig, new_transport: Callable[[Endpoint, str], T]) -> None:
        settings = DiscoverySettings(
            dns_servers=config.dns_servers, dns_timeout=config.dns_timeout, environ=config.environ
        )
        self.config = config
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


class _TrackedStream(httpx.SyncByteStream):
    """Keeps the request counted as in flight until its response body is closed, then records it."""

    def __init__(self, inner: httpx.SyncByteStream, done: Callable[[], None]) -> None:
        self._inner = inner
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class _AsyncTrackedStream(httpx.AsyncByteStream):
    """Async twin of :class:`_TrackedStream`."""

    def __init__(self, inner: httpx.AsyncByteStream, done: Callable[[], None]) -> None:
        self._inner = inner
        self._done: Callable[[], None] | None = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done()


class MeshTransport(httpx.BaseTransport):
    """The sync mesh transport: ``meshlib.Client`` sends every mesh request through it.

    ``new_transport(endpoint, service_key)`` makes the pooled inner transport of one endpoint (called once per
    endpoint, on the slow path); ``owns_transports=False`` when it returns a transport the caller owns (a user's
    ``transport=``), which is then never closed here. ``passthrough`` serves hosts outside the mesh when
    the transport is used on its own (``meshlib.Client`` routes those itself).
    """

    def __init__(
        self,
        config: MeshConfig,
        new_transport: Callable[[Endpoint, str], httpx.BaseTransport],
        *,
        owns_transports: bool = True,
        passthrough: httpx.BaseTransport | None = None,
        telemetry: ClientTelemetry | None = None,
    ) -> None:
        self.config = config
        self._router: _Router[httpx.BaseTransport] = _Router(config, new_transport)
        self.telemetry = telemetry if telemetry is not None else ClientTelemetry()
        self.telemetry.bind(self)
        self._owns = owns_transports
        self._passthrough = passthrough
        self._refreshers: dict[str, RefreshThread] = {}
        self._retries = RetryLoops()
        self._start_lock = threading.Lock()
        self._started: set[str] = set()
        self._closed = False

    @property
    def services(self) -> dict[str, Service[httpx.BaseTransport]]:
        """The mesh services by normalised name (read-only use: status, tests)."""
        return self._router.services

    def routes(self, host: str) -> bool:
        """Whether ``host`` is a mesh service."""
        return self._router.route(host) is not None

    def _activate(self, service: Service[httpx.BaseTransport]) -> Active[httpx.BaseTransport]:
        """First use of a service: resolve on this thread (once), then refresh in the background."""
        with self._start_lock:
            if self._closed:
                raise RuntimeError("cannot send a request through a closed meshlib client")
            if service.name not in self._started:
                _, delay = refresh_once(service.resolver, service.cache)
                if service.cache.snapshot is not None:
                    self._close_all(service.apply(service.cache.snapshot))
                self._started.add(service.name)
                if delay is not None:
                    thread = RefreshThread(service.resolver, service.cache, lambda s: self._publish(service, s), delay)
                    self._refreshers[service.name] = thread
                    thread.start()
        return service.current()

    def _publish(self, service: Service[httpx.BaseTransport], snapshot: object) -> None:
        if service.cache.snapshot is not None:
            self._close_all(service.apply(service.cache.snapshot))

    def _close_all(self, transports: list[httpx.BaseTransport]) -> None:
        if not self._owns:
            return
        for transport in transports:
            try:
                transport.close()
            except Exception:
                logger.exception("closing an endpoint transport failed")

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to one endpoint of its service (or pass it through if not a mesh host)."""
        service = self._router.route(request.url.host)
        if service is None:
            if self._passthrough is None:
                self._passthrough = httpx.HTTPTransport()
            return self._passthrough.handle_request(request)
        call: Call[httpx.BaseTransport] = Call(service, request, self.telemetry)
        try:
            active = service.active
            if active is None:
                active = self._activate(service)  # first use: waits (once) for discovery's first answer
            elif service.cache.consecutive_failures:
                active = service.current()  # discovery failing: still usable unless too stale
            call.admit()
            try:
                response = self._attempt(call, active)  # the fast path: no retry machinery at all
            except RetrySignal as first:
                response = self._retry(call, first)
        except BaseException as exc:
            call.release()
            call.finish(None, exc)
            raise
        call.finish(response)
        return response

    def _retry(self, call: Call[httpx.BaseTransport], first: RetrySignal) -> httpx.Response:
        """The attempts after a first one that asked for a retry: tenacity's loop, budget and deadline."""
        pending = [first]
        service = call.service

        def attempt() -> httpx.Response:
            if pending:
                raise pending.pop()  # tenacity's attempt 1 is the failure we already have
            return self._attempt(call, service.current())

        try:
            return self._retries.sync(call.policy)(attempt)
        except RetrySignal as last:
            return _give_up(call, last)

    def _attempt(self, call: Call[httpx.BaseTransport], active: Active[httpx.BaseTransport]) -> httpx.Response:
        """One attempt: pick, send, observe. Raises :class:`RetrySignal` when a retry is wanted."""
        stats, transport, outgoing = call.prepare(active)
        endpoint = stats.endpoint
        address: Address = (endpoint.host, endpoint.port)
        stats.begin()
        start = time.monotonic()
        try:
            # When meshlib traces the call, httpx instrumentation must not add a span of its own.
            response = transport.handle_request(outgoing) if call.span is None else send_suppressed(transport, outgoing)
        except Exception as exc:
            now = time.monotonic()
            stats.end(now - start, now, failed=True)
            self._after(call.service, stats)
            raised = call.errored(address, exc)
            if raised is exc:
                raise
            raise raised from exc
        except BaseException:  # interrupted: no verdict on the endpoint
            now = time.monotonic()
            stats.end(now - start, now, failed=True)
            self._after(call.service, stats)
            call.abandon(address)
            raise
        rtt = time.monotonic() - start
        failed, signal = call.answered(address, response)
        if signal is not None:
            stats.end(rtt, start + rtt, failed=failed)
            self._after(call.service, stats)
            raise signal
        service = call.service

        def done() -> None:
            stats.end(rtt, start + rtt, failed=failed)
            call.release()
            if service.retiring:
                self._after(service, stats)

        _track(response, done)
        call.mark(response, endpoint.address)
        return response

    def _after(self, service: Service[httpx.BaseTransport], stats: EndpointStats) -> None:
        idle = service.release(stats)
        if idle is not None:
            self._close_all([idle])

    def close(self) -> None:
        """Stop discovery refreshes and close every endpoint transport this mesh created."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
        self.telemetry.unbind(self)
        for thread in self._refreshers.values():
            thread.stop()
        self._refreshers.clear()
        for service in self._router.services.values():
            self._close_all(service.all_transports())
            service.resolver.close()
        if self._passthrough is not None:
            self._passthrough.close()


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """The async mesh transport: ``meshlib.AsyncClient`` sends every mesh request through it.

    Same contract as :class:`MeshTransport`. Discovery refreshes run as tasks on the loop that first used
    each service; the first request for a service awaits its first answer, concurrent first requests share
    that one query.
    """

    def __init__(
        self,
        config: MeshConfig,
        new_transport: Callable[[Endpoint, str], httpx.AsyncBaseTransport],
        *,
        owns_transports: bool = True,
        passthrough: httpx.AsyncBaseTransport | None = None,
        telemetry: ClientTelemetry | None = None,
    ) -> None:
        self.config = config
        self._router: _Router[httpx.AsyncBaseTransport] = _Router(config, new_transport)
        self.telemetry = telemetry if telemetry is not None else ClientTelemetry()
        self.telemetry.bind(self)
        self._owns = owns_transports
        self._passthrough = passthrough
        self._refreshers: dict[str, RefreshTask] = {}
        self._retries = RetryLoops()
        # Created lazily inside the loop: an AsyncClient is often built before any loop runs.
        self._first: dict[str, asyncio.Event] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def services(self) -> dict[str, Service[httpx.AsyncBaseTransport]]:
        """The mesh services by normalised name (read-only use: status, tests)."""
        return self._router.services

    def routes(self, host: str) -> bool:
        """Whether ``host`` is a mesh service."""
        return self._router.route(host) is not None

    async def _activate(self, service: Service[httpx.AsyncBaseTransport]) -> Active[httpx.AsyncBaseTransport]:
        if self._closed:
            raise RuntimeError("cannot send a request through a closed meshlib client")
        first = self._first.get(service.name)
        if first is None:
            first = self._first[service.name] = asyncio.Event()
            try:
                _, delay = await arefresh_once(service.resolver, service.cache)
                if service.cache.snapshot is not None:
                    await self._aclose_all(service.apply(service.cache.snapshot))
                if delay is not None and not self._closed:
                    task = RefreshTask(service.resolver, service.cache, lambda s: self._publish(service), delay)
                    self._refreshers[service.name] = task
                    task.start()
            except BaseException:
                # Cancelled (or failed) before an answer: let the next request try again.
                del self._first[service.name]
                first.set()
                raise
            first.set()
        else:
            await first.wait()
        return service.current()

    async def _publish(self, service: Service[httpx.AsyncBaseTransport]) -> None:
        snapshot = service.cache.snapshot
        if snapshot is None:
            return
        if len(snapshot.endpoints) >= _APPLY_IN_THREAD:
            # Building the view of a large set (stats, pools, pickers) is milliseconds of pure Python: do it in
            # a worker thread so the event loop keeps running (the GIL is handed back every few ms) instead of
            # stalling every request for the whole build. Service.apply is thread-safe and swaps atomically.
            retired = await asyncio.to_thread(service.apply, snapshot)
        else:
            retired = service.apply(snapshot)
        await self._aclose_all(retired)

    async def _aclose_all(self, transports: list[httpx.AsyncBaseTransport]) -> None:
        if not self._owns:
            return
        for transport in transports:
            try:
                await transport.aclose()
            except Exception:
                logger.exception("closing an endpoint transport failed")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` to one endpoint of its service (or pass it through if not a mesh host)."""
        service = self._router.route(request.url.host)
        if service is None:
            if self._passthrough is None:
                self._passthrough = httpx.AsyncHTTPTransport()
            return await self._passthrough.handle_async_request(request)
        call: Call[httpx.AsyncBaseTransport] = Call(service, request, self.telemetry)
        try:
            active = service.active
            if active is None:
                active = await self._activate(service)
            elif service.cache.consecutive_failures:
                active = service.current()
            call.admit()
            try:
                response = await self._attempt(call, active)
            except RetrySignal as first:
                response = await self._retry(call, first)
        except BaseException as exc:
            call.release()
            call.finish(None, exc)
            raise
        call.finish(response)
        return response

    async def _retry(self, call: Call[httpx.AsyncBaseTransport], first: RetrySignal) -> httpx.Response:
        """The attempts after a first one that asked for a retry: tenacity's loop, budget and deadline."""
        pending = [first]
        service = call.service

        async def attempt() -> httpx.Response:
            if pending:
                raise pending.pop()
            return await self._attempt(call, service.current())

        try:
            return await self._retries.asynchronous(call.policy)(attempt)
        except RetrySignal as last:
            return _give_up(call, last)

    async def _attempt(
        self, call: Call[httpx.AsyncBaseTransport], active: Active[httpx.AsyncBaseTransport]
    ) -> httpx.Response:
        """One attempt: pick, send, observe. Raises :class:`RetrySignal` when a retry is wanted."""
        stats, transport, outgoing = call.prepare(active)
        endpoint = stats.endpoint
        address: Address = (endpoint.host, endpoint.port)
        stats.begin()
        start = time.monotonic()
        try:
            if call.span is None:
                response = await transport.handle_async_request(outgoing)
            else:  # meshlib traces this call: keep httpx instrumentation from adding its own span
                response = await asend_suppressed(transport, outgoing)
        except Exception as exc:
            now = time.monotonic()
            stats.end(now - start, now, failed=True)
            await self._after(call.service, stats)
            raised = call.errored(address, exc)
            if raised is exc:
                raise
            raise raised from exc
        except BaseException:  # cancelled: no verdict on the endpoint
            now = time.monotonic()
            stats.end(now - start, now, failed=True)
            call.abandon(address)
            if call.service.retiring:
                idle = call.service.release(stats)
                if idle is not None and self._owns:
                    self._close_later(idle)
            raise
        rtt = time.monotonic() - start
        failed, signal = call.answered(address, response)
        if signal is not None:
            stats.end(rtt, start + rtt, failed=failed)
            await self._after(call.service, stats)
            raise signal
        service = call.service

        def done() -> None:
            stats.end(rtt, start + rtt, failed=failed)
            call.release()
            if service.retiring:
                idle = service.release(stats)
                if idle is not None and self._owns:
                    self._close_later(idle)

        _track(response, done)
        call.mark(response, endpoint.address)
        return response

    def _close_later(self, transport: httpx.AsyncBaseTransport) -> None:
        """Close a retired endpoint transport from a sync callback (a stream's close) on the running loop."""
        task = asyncio.get_running_loop().create_task(transport.aclose())
        self._closing.add(task)  # keep a reference until done, as asyncio's docs require
        task.add_done_callback(self._closing.discard)

    async def _after(self, service: Service[httpx.AsyncBaseTransport], stats: EndpointStats) -> None:
        idle = service.release(stats)
        if idle is not None:
            await self._aclose_all([idle])

    async def aclose(self) -> None:
        """Stop discovery tasks and close every endpoint transport this mesh created."""
        if self._closed:
            return
        self._closed = True
        self.telemetry.unbind(self)
        for task in self._refreshers.values():
            await task.stop()
        self._refreshers.clear()
        for service in self._router.services.values():
            await self._aclose_all(service.all_transports())
            service.resolver.close()
        if self._passthrough is not None:
            await self._passthrough.aclose()


def _give_up(call: Call[T], last: RetrySignal) -> httpx.Response:
    """No more retries: the last response goes to the caller as it is, or the last error, made clear."""
    pushback.note_exhausted()  # the caller's caller must not retry this again (meshlib.pushback)
    response = last.response
    if response is not None:
        _track(response, call.release)
        call.mark(response, call.tried[-1])
        return response
    error = last.error
    assert error is not None
    final = call.failure(error, last.classification)
    raise final from (error if final is not error else error.__cause__)


def _track(response: httpx.Response, done: Callable[[], None]) -> None:
    """Run ``done`` when the response body is closed, or now if it already is.

    A response built with its content in memory (``httpx.MockTransport``, respx) arrives already read and
    closed, and httpx never closes its stream again: waiting for that would leak in-flight counts.
    """
    if response.is_closed:
        done()
    elif isinstance(response.stream, httpx.SyncByteStream):
        response.stream = _TrackedStream(response.stream, done)
    elif isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _AsyncTrackedStream(response.stream, done)
    else:  # an inner transport returned something that is no stream: nothing will close it
        done()
