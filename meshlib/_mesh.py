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
collected and its refreshers end (:meth:`_Mesh._on_collect`). Rate-based outlier ejection is swept by one
timer thread per client (:class:`~meshlib.resilience.sweep.OutlierSweep`), started when a service first needs
it, held the same way, and made anew in a forked child.

Both run the same loop (:func:`_drive` / :func:`_adrive`): take a step, do it, send the outcome back; an
interruption (cancellation, ``KeyboardInterrupt``) is thrown into the plan, which releases what it holds.

The request that reaches an endpoint is a new request whose URL names the endpoint's address, while the
``Host`` header (and, for https, the TLS server name via the ``sni_hostname`` extension, so the certificate
is checked against the logical name) stay the logical service name. The caller's request is not modified,
so ``response.url`` and redirects keep the logical URL. Meshlib's errors leave in the client library's
flavour (:meth:`meshlib._http.HttpLib.localize`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from meshlib._bounded import ABORT, DEADLINE, Abort
from meshlib._config import MeshConfig, ServiceConfig, service_key
from meshlib._http import HttpLib, copy_request
from meshlib._lease import LeaseHome
from meshlib._plan import (
    _DEFAULT_PORTS,
    Attempt,
    Call,
    Cancel,
    Plan,
    Send,
    Sleep,
    Start,
    Step,
    WaitFirst,
    path_and_query,
)
from meshlib._service import Active, Service
from meshlib._testmode import MODE as _TESTING
from meshlib.discovery import CONTROL_PLANE_SCHEMES, build_resolver, scheme_of
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolver
from meshlib.discovery.refresh import RefreshThread
from meshlib.errors import ClientClosedError, DeadlineExceeded, MeshError
from meshlib.policy import POLICY_EXTENSION, Policy, effective
from meshlib.resilience.classify import IDEMPOTENCY_KEY_HEADER, resendable
from meshlib.resilience.hedging import HedgePolicy
from meshlib.resilience.sweep import OutlierSweep
from meshlib.routing.decision import (
    EXT_ROUTE,
    ActiveLimit,
    BackendChoice,
    Routed,
    local_answer,
    no_backend,
    no_route,
)
from meshlib.routing.filters import modify, redirect_location
from meshlib.routing.model import EMPTY_TABLE, HostRoutes, QueryString, RouteTable
from meshlib.status import RejectedRoutes, RoutesStatus
from meshlib.telemetry.client import ClientTelemetry
from meshlib.telemetry.tracing import send_suppressed

if TYPE_CHECKING:
    import concurrent.futures


#: A mirrored copy's hedging: none.
_NO_HEDGE = HedgePolicy(max_attempts=1)
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


class _Target(Generic[T]):
    """What a request host names in the mesh: its configured service and/or the routes attached to it."""

    __slots__ = ("bases", "choices", "key", "name", "pending", "routes", "service")

    def __init__(
        self,
        key: str,
        name: str,
        service: Service[T] | None,
        routes: Mapping[int | None, HostRoutes] | None,
        *,
        bases: dict[int, Policy],
        choices: dict[int, BackendChoice],
    ) -> None:
        self.key = key
        self.name = name
        #: The configured service of this name (``None``: the name only exists as a route parent).
        self.service = service
        #: Its routes by port, from one table (``None``: no route attached: calls go to the service itself).
        self.routes = routes
        #: ``id(rule)`` -> the call policy base of that rule: this service's policy merged with the rule's.
        self.bases = bases
        #: ``id(backend)`` -> what a call routed to that backend needs (valid backends of mesh services only).
        self.choices = choices
        #: A service routed by a control plane whose first routes are still due: calls wait on this latch.
        self.pending: Any = None
        if service is not None and routes is None:
            latch = getattr(service.resolver, "pending", None)
            if latch is not None and not latch.is_set():
                self.pending = latch

    def routes_for(self, port: int) -> HostRoutes | None:
        """The routes that apply to a call on ``port`` (those attached to it, else the port-less ones), or
        ``None``: no route applies and the call goes to the service itself (GAMMA)."""
        by_port = self.routes
        if by_port is None:
            return None
        found = by_port.get(port)
        return by_port.get(None) if found is None else found


class _RouterState(Generic[T]):
    """One route table, the services, and the host lookups made from them: replaced whole, so a lookup never
    mixes two tables or two sets of services."""

    __slots__ = ("cache", "services", "table")

    def __init__(self, table: RouteTable, services: dict[str, Service[T]]) -> None:
        self.table = table
        self.services = services
        self.cache: dict[str, _Target[T] | None] = {}


class _Router(Generic[T]):
    """Host -> services and routes, shared by both drivers; caches lookups of hot hosts per route table."""

    def __init__(
        self, config: MeshConfig, new_transport: Callable[[Endpoint, str], T], table: RouteTable = EMPTY_TABLE
    ) -> None:
        settings = DiscoverySettings(
            dns_servers=config.dns_servers, dns_timeout=config.dns_timeout, environ=config.environ
        )
        self.config = config
        self._new_transport = new_transport
        services: dict[str, Service[T]] = {}
        for key, svc in config.services.items():
            resolver = build_resolver(
                svc.name, svc.target, settings, variable=svc.variable or f"services[{svc.name!r}]"
            )
            services[key] = Service(svc, config, resolver, functools.partial(_for_service, new_transport, key))
        self._state: _RouterState[T] = _RouterState(table, services)
        self._swap = threading.Lock()  # writers only (control-plane threads); lookups read the state lock-free
        #: ``MESHLIB_XDS=all``: on a lookup miss, the latch a call to that host waits on while the control plane
        #: has not said whether it routes it (:meth:`meshlib.control.xds.source.XdsSource.pending_for`).
        self.dynamic: Callable[[str], Any] | None = None

    @property
    def table(self) -> RouteTable:
        """The route table in use."""
        return self._state.table

    @property
    def services(self) -> dict[str, Service[T]]:
        """The services in use, by normalised name (a dict never changed once published: read it freely)."""
        return self._state.services

    def install(self, table: RouteTable) -> None:
        """Route new calls by ``table`` from now on (one assignment: a call sees the old table or the new one)."""
        with self._swap:
            self._state = _RouterState(table, self._state.services)

    def add_services(
        self,
        added: Mapping[str, tuple[ServiceConfig, Resolver]],
        table: RouteTable | None = None,
        replaced: Mapping[str, tuple[ServiceConfig, Resolver]] | None = None,
    ) -> list[Service[T]]:
        """Add services built from ``(config, resolver)`` by normalised name (a control plane's clusters), and
        route by ``table`` if given, in one swap: a lookup sees the old services and table or the new ones. A name
        already present is kept as it is (its pools, stats and breakers live on), unless it is in ``replaced``:
        those are built anew, and the services they replace are returned for the driver to release."""
        old: list[Service[T]] = []
        with self._swap:
            state = self._state
            services = dict(state.services)
            for key, (svc, resolver) in added.items():
                if key not in services:
                    services[key] = Service(
                        svc, self.config, resolver, functools.partial(_for_service, self._new_transport, key)
                    )
            for key, (svc, resolver) in (replaced or {}).items():
                previous = services.get(key)
                if previous is not None:
                    old.append(previous)
                services[key] = Service(
                    svc, self.config, resolver, functools.partial(_for_service, self._new_transport, key)
                )
            self._state = _RouterState(state.table if table is None else table, services)
        return old

    def remove_services(self, keys: Iterable[str]) -> list[Service[T]]:
        """Stop routing to the services named ``keys`` (one swap) and return them, for the driver to close once
        their calls are done. A route still naming one answers 500 (an invalid backend) from now on."""
        with self._swap:
            state = self._state
            services = dict(state.services)
            removed = [services.pop(key) for key in keys if key in services]
            self._state = _RouterState(state.table, services)
        return removed

    def route(self, host: str) -> _Target[T] | None:
        """What ``host`` names in the mesh, or ``None`` for hosts outside it."""
        state = self._state
        cache = state.cache
        try:
            return cache[host]
        except KeyError:
            pass
        key = service_key(host)
        services = state.services
        service = services.get(key) if services else None
        routes = state.table.services.get(key)
        found: _Target[T] | None = None
        if service is not None or routes is not None:
            bases: dict[int, Policy] = {}
            choices: dict[int, BackendChoice] = {}
            if routes is not None:
                own = self.config.policy_for(key)
                for host_routes in routes.values():
                    for _, rule in host_routes.entries:
                        base = bases[id(rule)] = own.merge(rule.policy)
                        for backend in rule.backends:
                            name = backend.service
                            backend_service = None if name is None else services.get(service_key(name))
                            if name is None or backend_service is None:
                                continue  # an invalid backend: its share is answered 500
                            # The TLS name as the route wrote it (env-configured names have "_" for "-").
                            sni = None if service_key(name) == key else name
                            choices[id(backend)] = BackendChoice(rule, backend, backend_service, base, sni)
            called = service.name if service is not None else host.lower()
            found = _Target(key, called, service, routes, bases=bases, choices=choices)
        elif self.dynamic is not None:
            latch = self.dynamic(host)
            if latch is not None:
                found = _Target(key, host.lower(), None, None, bases={}, choices={})
                found.pending = latch
        if found is not None and found.pending is not None:
            return found  # not cached: the answer changes when the control plane's does
        if len(cache) >= _ROUTE_CACHE_SIZE:
            cache.clear()  # bounded: arbitrary outside hosts must not grow memory
        cache[host] = found
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
        register_tls: Callable[[str, Any], None] | None = None,
        connect: Any = None,
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
        #: Where weighted splits, fault and mirror percentages draw from: replace it with a seeded
        #: ``random.Random`` to make them exact in tests (``client.mesh.rng = random.Random(7)``).
        self.rng = random.Random()
        #: Where the route table comes from (a hot-reloaded file: ``meshlib.control.file.FileSource``), for status.
        self.routes_source: Any = None
        self._routes_loaded_at: float | None = None
        self._routing_state()
        self._driver_state()
        #: The route tables of each source: the file's (or the API's), and each control plane's (by name: ``xds``,
        #: ``consul``), which route the hosts they claim.
        self._tables_lock = threading.Lock()
        self._base_table: RouteTable = EMPTY_TABLE
        self._pushed: dict[str, RouteTable] = {}
        self._shadowed: list[str] = []
        #: The xDS control plane steering this client (``xds:`` targets), or ``None``.
        self.xds: Any = None
        #: Consul's discovery chain steering this client (``consul+chain:`` targets), or ``None``.
        self.consul: Any = None
        #: The services whose routes only a control plane gives (a routes file's for them are ignored).
        self._claimed = frozenset(
            key for key, svc in config.services.items() if scheme_of(svc.target) in CONTROL_PLANE_SCHEMES
        )
        if config.xds == "all" or any(scheme_of(svc.target) == "xds" for svc in config.services.values()):
            from meshlib.control.xds.source import source_for

            # Validated before anything starts: a bad bootstrap leaves no thread behind.
            self.xds = source_for(self, config, register_tls)
            if config.xds == "all":
                self._router.dynamic = self.xds.pending_for
        if any(scheme_of(svc.target) == "consul+chain" for svc in config.services.values()):
            from meshlib.control.consul.source import ConsulChainSource

            self.consul = ConsulChainSource(self, config, register_tls, connect=connect)
        if config.routes_file is not None:
            self._watch_routes(config)
        #: Rate-based outlier ejection's interval timer, for every service of this client (its thread starts when
        #: a service first needs it: :meth:`_watch_outliers`).
        self.outlier_sweep = OutlierSweep(self)
        self._finalizer = self._on_collect()
        _LIVE.add(self)
        for source in (self.xds, self.consul):
            if source is not None:
                source.start()

    def _watch_routes(self, config: MeshConfig) -> None:
        """Load ``MESHLIB_ROUTES_FILE`` now (an invalid file is a ``ConfigError`` here) and watch it for changes."""
        from meshlib.control.file import FileSource

        assert config.routes_file is not None
        services = {key: svc.name for key, svc in config.services.items()}
        parse = functools.partial(_parse_routes, services=services, namespace=config.namespace)
        source: FileSource[RouteTable] = FileSource(
            config.routes_file,
            parse,
            _publish_routes,
            owner=self,
            variable="MESHLIB_ROUTES_FILE",
            interval=config.routes_reload_interval,
        )
        table = source.load_first()
        assert source.current is not None  # set by load_first
        _publish_routes(self, table, source.current)
        self.routes_source = source
        source.start()

    def _routing_state(self) -> None:
        """Per-client routing counters (made at construction and again after a fork)."""
        #: Each fault filter's active faults (gRFC A33's ``max_active_faults``), by (name, limit).
        self._fault_slots: dict[tuple[str, int | None], ActiveLimit] = {}
        #: Mirrored requests in flight, at most :attr:`mirror_concurrency` (more are dropped and counted).
        self._mirror_gate = ActiveLimit(self.config.mirror_concurrency)
        #: (mirror service, outcome) -> count: ``sent``, ``failed``, ``dropped`` (concurrency full),
        #: ``skipped-streaming`` (a one-shot body), ``skipped-unsafe`` (a non-idempotent method).
        self.mirror_counts: dict[tuple[str, str], int] = {}
        self._counts_lock = threading.Lock()

    def _driver_state(self) -> None:
        """The driver's own state (threads or tasks, ``_refreshers``), made at construction and again after a fork."""
        self._refreshers: dict[Any, Any] = {}

    def _on_collect(self) -> weakref.finalize[[dict[str, Any], _Router[Any], OutlierSweep], Any]:
        """When the client is garbage-collected unclosed: wake its refreshers to end, interrupt its resolvers.

        The finalizer refers to the refreshers and services, never to the mesh (or it would never run); it
        does not wait for anything, as it may run on any thread the garbage collector happens to run on.
        """
        finalizer = weakref.finalize(self, _halt, self._refreshers, self._router, self.outlier_sweep)
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
        self.rng = random.Random()  # not the parent's sequence
        self._routing_state()
        old = self._router
        try:
            self._router = _Router(self.config, self._new_transport, self._base_table)
            self._tables_lock = threading.Lock()
            self._pushed = {}
            if self.xds is not None:  # the xDS services again, from the accepted resources; streams of its own
                if self.config.xds == "all":
                    self._router.dynamic = self.xds.pending_for
                self.xds.after_fork(self)
            if self.consul is not None:  # the chains' services again, from the last answers; watches of its own
                self.consul.after_fork(self)
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
        self.outlier_sweep = OutlierSweep(self)  # the parent's thread does not exist here; the child's own starts
        self._finalizer = self._on_collect()

    def _watch_outliers(self, service: Service[T]) -> None:
        """After ``service`` applied an endpoint set: have the client's sweep evaluate its rate-based detectors
        every interval once it has enough endpoints for them to act (starts the sweep's thread on first need)."""
        if service.needs_sweep() and not self._closed:
            self.outlier_sweep.watch(service.detector)

    def _pool_idle(self, transport: T) -> None:
        """A retired endpoint's pool has no request left: close it, the driver's way."""
        raise NotImplementedError

    def _call(self, service: Service[T], request: Any, routed: Routed | None = None) -> Call[T]:
        """A new call (after running releases the garbage collector queued)."""
        self.home.settle()
        return Call(self.lib, service, request, self.home, self.telemetry, routed=routed)

    # -- routes ---------------------------------------------------------------------------------------------------

    @property
    def route_table(self) -> RouteTable:
        """The route table new calls are routed by."""
        return self._router.table

    def install_routes(self, table: RouteTable) -> None:
        """Route new calls by ``table`` (calls in flight finish on the table they started with).

        With a control plane as well, ``table`` routes the hosts it does not claim (see :meth:`_combined`)."""
        with self._tables_lock:
            self._base_table = table
            self._router.install(self._combined())
        self._routes_loaded_at = time.time()

    def add_services(
        self, added: Mapping[str, tuple[ServiceConfig, Resolver]], table: RouteTable | None = None
    ) -> None:
        """Add services a control plane names (and route by ``table`` if given), in one swap; from any thread.
        Their discovery starts on their first call, as for configured services."""
        self._router.add_services(added, table)
        if table is not None:
            self._routes_loaded_at = time.time()

    def apply_control_plane(
        self,
        table: RouteTable,
        added: Mapping[str, tuple[ServiceConfig, Resolver]],
        replaced: Mapping[str, tuple[ServiceConfig, Resolver]],
        *,
        source: str = "xds",
    ) -> None:
        """A control plane's update (``source``: ``xds``, ``consul``): its routes (for the hosts it claims), new
        services and rebuilt ones, in one swap; the services rebuilt are then released as removed ones are (calls
        in flight on them finish)."""
        with self._tables_lock:
            self._pushed = {**self._pushed, source: table}
            old = self._router.add_services(added, self._combined(), replaced)
        self._routes_loaded_at = time.time()
        self._release(old)

    def refresh_routes(self) -> None:
        """Forget cached host lookups (the same tables, a new state): a control plane's set of hosts changed."""
        with self._tables_lock:
            self._router.install(self._router.table)

    def _combined(self) -> RouteTable:
        """The file's (or API's) table with the control planes' ones: each control plane routes its own hosts (its
        services, from the start, and every host its table has), the file every other."""
        pushed = list(self._pushed.values())
        base = self._base_table
        claimed = set(self._claimed)
        for table in pushed:
            claimed.update(table.services.keys())
        shadowed = sorted(key for key in claimed if key in base.services)
        if shadowed and shadowed != self._shadowed:
            logger.warning(
                "routes of %s come from their control plane; the routes %s has for them are ignored",
                ", ".join(shadowed),
                base.source or "the route table",
            )
        self._shadowed = shadowed
        if not pushed and not shadowed:
            return base
        if not base.services and len(pushed) == 1:
            return pushed[0]
        services = {key: routes for key, routes in base.services.items() if key not in claimed}
        if not pushed:
            return dataclasses.replace(base, services=services)
        tables = [base, *pushed] if base.services or base.source else pushed
        for table in pushed:
            services.update(table.services)
        return RouteTable(
            services,
            " + ".join(table.source for table in tables),
            " + ".join(table.version for table in tables),
            tuple(route for table in tables for route in table.routes),
        )

    def remove_services(self, keys: Iterable[str]) -> None:
        """Stop routing to the services ``keys`` (normalised names) and release them; from any thread.

        Their refresh loop is halted and their resolver closed; their idle pools are closed now, and a pool
        with a request in flight is closed by that request's lease when it ends (the pool is retiring), so
        nothing in flight is cut. A call that was waiting for such a service's first answer fails at its
        deadline.
        """
        self._release(self._router.remove_services(keys))

    def _release(self, removed: list[Service[T]]) -> None:
        """Release services no longer routed to: halt their refresh loop, close their idle pools now (busy ones
        close with their last lease) and their resolver. Refreshers are keyed by the service object, so a service
        rebuilt under the same name starts its own."""
        if not removed:
            return
        with self._start_lock_or_none():
            refreshers = [self._refreshers.pop(service, None) for service in removed]
            first = getattr(self, "_first", None)
            if first is not None:
                for service in removed:
                    first.pop(service, None)
        for refresher in refreshers:
            if refresher is not None:
                refresher.halt()  # thread-safe for both drivers: a thread is told to end, a task is cancelled
        for service in removed:
            for transport in service.take_pools():
                self.home.close_pool(transport)
            try:
                service.resolver.close()
            except Exception:
                logger.exception("closing the resolver of service %s failed", service.name)

    def _start_lock_or_none(self) -> Any:
        """The blocking driver's lock around starting refreshers (none for the async driver, whose refreshers
        start on its loop)."""
        lock = getattr(self, "_start_lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    def routes_view(self) -> RoutesStatus | None:
        """The route table's state for ``mesh_status()`` (``None``: no routes, none ever installed)."""
        table = self._router.table
        source = self.routes_source
        if table is EMPTY_TABLE and source is None:
            return None
        applied, rejected, loaded_at = 1, None, self._routes_loaded_at
        if source is not None:
            state = source.status()
            applied, loaded_at = state.applied, state.loaded_at
            if state.rejected is not None:
                rejected = RejectedRoutes(
                    state.rejected.version or "unreadable", state.rejected.error, state.rejected.at
                )
        with self._counts_lock:
            mirrors = {f"{service}/{outcome}": n for (service, outcome), n in sorted(self.mirror_counts.items())}
        faults = {name: slot.injected for (name, _), slot in sorted(self._fault_slots.items())}
        return RoutesStatus(
            source=table.source or "api",
            version=table.version,
            loaded_at=loaded_at,
            routes=list(table.routes),
            applied=applied,
            rejected=rejected,
            mirrors=mirrors,
            faults=faults,
        )

    def _route(self, target: _Target[T], request: Any) -> tuple[Service[T] | None, Routed | None, Any]:
        """Route a call to ``target`` (a host with routes): the service it goes to (``None``: outside the mesh,
        pass it through) and the route decision; or, third, the answer the routes give themselves (no rule
        matched: 404; a redirect; no usable backend: 500). No route for this port: the service itself."""
        url = request.url
        routes = target.routes_for(url.port or _DEFAULT_PORTS.get(url.scheme, 80))
        if routes is None:
            return target.service, None, None
        path, query = path_and_query(url)
        method = request.method
        params = None
        if routes.reads_query:  # parsed lazily, only if a candidate rule has a query condition
            params = QueryString(query)
        selected = routes.select(method, path, request.headers, params)
        if selected is None:
            return None, None, self._local(request, None, 404, "no-route", no_route(target.name, method, path))
        match, rule = selected
        redirect = rule.filters.redirect
        if redirect is not None:
            location = redirect_location(
                scheme=url.scheme, host=url.host, port=url.port, path=path, query=query, match=match, redirect=redirect
            )
            answer = self._local(
                request,
                rule,
                redirect.status_code,
                "redirect",
                f"redirected to {location}",
                headers=[("location", location)],
            )
            return None, None, answer
        backend = rule.pick(self.rng)
        choice = None if backend is None else target.choices.get(id(backend))
        if backend is None or choice is None:
            return None, None, self._local(request, rule, 500, "no-backend", no_backend(rule, backend))
        routed = Routed(rule, match, backend, choice)
        if choice.fault is not None:
            self._fault(routed, choice.fault)
        return choice.service, routed, None

    def _fault(self, routed: Routed, fault: Any) -> None:
        """Draw the fault filter's delay and abort for one call (Istio's percentages, A33's active limit)."""
        rng = self.rng
        delay = fault.delay_s is not None and fault.delay_fraction > 0 and rng.random() < fault.delay_fraction
        abort = fault.abort_status is not None and fault.abort_fraction > 0 and rng.random() < fault.abort_fraction
        if not (delay or abort):
            return
        key = (fault.name, fault.max_active)
        slot = self._fault_slots.get(key)
        if slot is None:
            slot = self._fault_slots.setdefault(key, ActiveLimit(fault.max_active))
        if not slot.try_take():
            self.telemetry.fault(routed.rule.label, fault.name, "skipped-max-active")
            return
        routed.fault_slot = slot
        routed.delay_s = fault.delay_s if delay else None
        routed.abort_status = fault.abort_status if abort else None
        if delay:
            self.telemetry.fault(routed.rule.label, fault.name, "delay")
        if abort:
            self.telemetry.fault(routed.rule.label, fault.name, "abort")

    def _local(
        self,
        request: Any,
        rule: Any,
        status: int,
        why: str,
        reason: str,
        *,
        headers: list[tuple[str, str]] | None = None,
    ) -> Any:
        """A response the routes give themselves, observed like a call (span, duration) with no attempt."""
        response = local_answer(self.lib, request, status, why=why, reason=reason, headers=headers)
        if rule is not None:
            response.extensions[EXT_ROUTE] = rule.label
        trace = self.telemetry.call_started(request)
        if trace is not None:
            trace.answered_locally(rule, why)
            trace.call_finished(response, None, attempts=0, peer=None, verdict=None)
        return response

    # -- mirrors --------------------------------------------------------------------------------------------------

    def _count_mirror(self, service: str, outcome: str) -> None:
        with self._counts_lock:
            key = (service, outcome)
            self.mirror_counts[key] = self.mirror_counts.get(key, 0) + 1
        self.telemetry.mirror(service, outcome)

    def _mirrors_due(self, call: Call[T]) -> list[tuple[Service[T], Any]]:
        """The mirrored copies to send for ``call``, which got an answer: each with a slot of the mirror limit.

        Only requests that may be re-sent are mirrored (an idempotent method, an ``Idempotency-Key``, or
        ``retry_non_idempotent``), and only with a body in memory; a request that got no answer from its own
        backend is never mirrored, so a mirror never sees a request the primary did not.
        """
        routed = call.routed
        assert routed is not None
        due: list[tuple[Service[T], Any]] = []
        for mirror in routed.choice.mirrors:
            if mirror.fraction < 1.0 and self.rng.random() >= mirror.fraction:
                continue
            service = self._router.services.get(service_key(mirror.service))
            if service is None:
                continue
            if not call.replayable:
                self._count_mirror(service.name, "skipped-streaming")
                continue
            request = call.request
            if not resendable(
                call.method,
                retry_non_idempotent=bool(call.policy.retry_non_idempotent),
                has_idempotency_key=IDEMPOTENCY_KEY_HEADER in request.headers,
            ):
                self._count_mirror(service.name, "skipped-unsafe")
                continue
            if not self._mirror_gate.try_take():
                self._count_mirror(service.name, "dropped")
                continue
            copy = copy_request(request)
            copy.url = call.url
            headers = copy.headers
            if routed.rule.filters.request_headers is not None:  # the rule's filters; the backend's are its own
                modify(headers, routed.rule.filters.request_headers)
            host = headers.get("host") or request.url.host
            headers["Host"] = f"{host}-shadow"  # Envoy's and Istio's shadow host
            dropped = (POLICY_EXTENSION, "timeout", "sni_hostname")
            extensions = {k: v for k, v in request.extensions.items() if k not in dropped}
            # A mirrored copy is sent once: no retry, no hedge (a copy of a copy would multiply the shadow's load).
            extensions[POLICY_EXTENSION] = Policy(retries=0, timeout=call.policy.timeout, hedge=_NO_HEDGE)
            if request.url.scheme == "https":  # the mirror's own certificate is checked, as any backend's
                extensions["sni_hostname"] = mirror.service
            copy.extensions = extensions
            due.append((service, copy))
        return due

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
        """Whether ``host`` is in the mesh (a service, or the parent of routes)."""
        return self._router.route(host) is not None

    def service_for(self, host: str) -> str | None:
        """The name of the mesh service (or route parent) ``host`` names, or ``None`` for hosts outside the mesh."""
        target = self._router.route(host)
        return None if target is None else target.name

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(reason=self._closed_reason)


def _parse_routes(data: bytes, source: str, *, services: Mapping[str, str], namespace: str | None) -> RouteTable:
    """A routes file version, compiled (``RoutesError`` when invalid): what the file source validates with."""
    from meshlib.routing.gateway_api import parse_routes

    return parse_routes(data, source=source, services=services, namespace=namespace)


def _publish_routes(mesh: _Mesh[Any], table: RouteTable, version: Any) -> None:
    """A new valid routes file version: new calls route by it (the file source calls this on its thread)."""
    mesh.install_routes(dataclasses.replace(table, source=version.path, version=version.version))


def _until_deadline(config: MeshConfig, target: _Target[Any], request: Any) -> float:
    """Seconds left of ``request``'s deadline (its service's policy, scopes, the request's own); the request then
    carries what is left as its deadline, so waiting for routes counts against the whole call."""
    base = target.service.policy if target.service is not None else config.policy_for(target.key)
    rules = request.extensions.get(POLICY_EXTENSION)
    _, deadline = effective(base, rules if isinstance(rules, Policy) else None)
    remaining = deadline - time.monotonic()
    if remaining != float("inf"):
        narrowed = (rules if isinstance(rules, Policy) else Policy()).merge(Policy(deadline=max(remaining, 0.0)))
        request.extensions = {**request.extensions, POLICY_EXTENSION: narrowed}
    return remaining


def _no_routes(target: _Target[Any], request: Any) -> DeadlineExceeded:
    return DeadlineExceeded(
        target.name,
        f"no routes from the control plane within the deadline ({target.pending.source}); they are still awaited "
        "and will serve later calls",
        request=request,
    )


def _halt(refreshers: dict[str, Any], router: _Router[Any], sweep: OutlierSweep) -> None:
    """The finalizer of a mesh collected unclosed (see :meth:`_Mesh._on_collect`): its services as they are then,
    control-plane additions included, and its outlier sweep."""
    sweep.halt()
    for refresher in list(refreshers.values()):
        refresher.halt()
    for service in list(router.services.values()):
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

    _refreshers: dict[Any, RefreshThread]

    def _driver_state(self) -> None:
        self._refreshers = {}
        #: Set by each service's refresh thread once its first query has answered (or failed).
        self._first: dict[Any, threading.Event] = {}
        # Guards starting a service's refresh thread: held for a dict lookup and a thread start, never for I/O.
        self._start_lock = threading.Lock()
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._mirror_workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._workers_lock = threading.Lock()

    def _activate(self, service: Service[Any], call: Call[Any]) -> Active[Any]:
        """First use of a service: start its refresh thread (once), whose first query this call waits for.

        The wait is bounded by the call's deadline (taken before discovery, so waiting counts against it):
        past it, ``DeadlineExceeded``, and the query goes on in the background and serves later calls. Each
        service has its own thread and event, so a hung first query holds up no other service.
        """
        first = self._first.get(service)
        if first is None:
            with self._start_lock:
                self._check_open()
                first = self._first.get(service)
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
                    self._refreshers[service] = thread
                    self._first[service] = first
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
            self._watch_outliers(service)

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
        target = self._router.route(request.url.host)
        if target is not None and target.pending is not None and not target.pending.is_set():
            target = self._await_routes(target, request)
        service = None if target is None else target.service
        routed = None
        if target is not None and target.routes is not None:
            service, routed, answer = self._route(target, request)
            if answer is not None:
                return answer  # answered by the routes themselves (404, redirect, 500)
        if service is None:
            if self._passthrough is None:
                self._passthrough = self.lib.HTTPTransport()
            return self._passthrough.handle_request(request)
        call = self._call(service, request, routed)
        try:
            active = service.active
            if active is None or _TESTING.enabled or service.cache.consecutive_failures:
                active = self._view(service, call)
        except BaseException as exc:
            if routed is not None:
                routed.end()
            self._failed(call, exc)
            raise
        try:
            response = self.drive(call, call.plan(active))
        except MeshError as exc:
            self.lib.localize(exc)
            raise
        if routed is not None and routed.choice.mirrors and call.attempts:  # a server answered (no fault abort)
            self._mirror(call)
        return response

    def _await_routes(self, target: _Target[Any], request: Any) -> _Target[Any] | None:
        """A call to a service whose control plane has not sent its first routes: wait for them (bounded by the
        call's deadline, which the rest of the call then keeps) and route again."""
        remaining = _until_deadline(self.config, target, request)
        deadline = time.monotonic() + remaining
        found: _Target[Any] | None = target
        while found is not None and found.pending is not None and not found.pending.is_set():
            left = deadline - time.monotonic()  # (a host may first wait for the control plane's hosts, then its own)
            if not found.pending.wait(min(max(left, 0.0), threading.TIMEOUT_MAX)):
                raise self.lib.localize(_no_routes(found, request))
            found = self._router.route(request.url.host)
        return found

    def _view(self, service: Service[Any], call: Call[Any]) -> Active[Any]:
        """The endpoints a call picks from: the active view, after discovery's first answer on first use."""
        active = service.active
        if _TESTING.enabled:  # meshlib.testing.set_testing: no discovery, one stand-in endpoint
            url = call.request.url
            return service.stand_in(url.port or _DEFAULT_PORTS.get(url.scheme, 80))
        if active is None:
            return self._activate(service, call)  # first use: waits for discovery's first answer
        if service.cache.consecutive_failures:
            return service.current()  # discovery failing: still usable unless too stale
        return active

    def _mirror(self, call: Call[Any]) -> None:
        """Send the call's mirrored copies in the background (worker threads); their answers are discarded."""
        for service, request in self._mirrors_due(call):
            try:
                self._mirror_pool().submit(self._send_mirror, service, request)
            except RuntimeError:  # the client closed meanwhile
                self._mirror_gate.release()
                self._count_mirror(service.name, "dropped")

    def _send_mirror(self, service: Service[Any], request: Any) -> None:
        """One mirrored copy: a call of its own (no retry), answer read and dropped; failures only counted."""
        outcome = "failed"
        try:
            call = Call(self.lib, service, request, self.home)
            response = self.drive(call, call.plan(self._view(service, call)))
            try:
                for _ in response.iter_raw():
                    pass
            finally:
                response.close()
            outcome = "sent"
        except Exception as exc:
            logger.debug("mirrored request to service %s failed: %r", service.name, exc)
        finally:
            self._mirror_gate.release()
            self._count_mirror(service.name, outcome)

    def _mirror_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        pool = self._mirror_workers
        if pool is None:
            with self._workers_lock:
                self._check_open()
                pool = self._mirror_workers
                if pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    pool = self._mirror_workers = ThreadPoolExecutor(
                        max_workers=self.config.mirror_concurrency, thread_name_prefix="meshlib-mirror"
                    )
        return pool

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
            step.attempt.abort = Abort()
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
            if task is not None and not task.done():  # on the wire in a worker: stop it, let go when it returns
                if attempt.abort is not None:
                    attempt.abort.abort()
                task.add_done_callback(lambda _: self._discard(attempt))
            else:
                self._discard(attempt)
        return None

    @staticmethod
    def _send(call: Call[Any], attempt: Attempt) -> None:
        """One attempt's I/O: its outcome is left on the attempt for the plan."""
        token = DEADLINE.set(attempt.deadline)  # every socket operation of the attempt ends by then (_bounded)
        aborting = ABORT.set(attempt.abort) if attempt.abort is not None else None  # a started one may be stopped
        try:
            if call.trace is None or call.trace.span is None:
                attempt.response = attempt.transport.handle_request(attempt.request)
            else:  # meshlib traces this call: keep HTTP instrumentation from adding a span of its own
                attempt.response = send_suppressed(attempt.transport, attempt.request)
        except Exception as exc:
            attempt.error = exc
        finally:
            DEADLINE.reset(token)
            if aborting is not None:
                ABORT.reset(aborting)

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

                    # Hedged calls run every attempt here: room for 256 in flight (threads are made as needed).
                    workers = self._workers = ThreadPoolExecutor(max_workers=256, thread_name_prefix="meshlib-attempt")
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
        if self.routes_source is not None:
            self.routes_source.stop()
        for source in (self.xds, self.consul):
            if source is not None:
                source.close()
        self.outlier_sweep.stop()
        for thread in self._refreshers.values():
            thread.stop()
        self._refreshers.clear()
        for first in self._first.values():  # calls still waiting for a first answer: closed, they fail now
            first.set()
        if self._workers is not None:
            self._workers.shutdown(wait=False)
        if self._mirror_workers is not None:
            self._mirror_workers.shutdown(wait=False, cancel_futures=True)
        self.home.settle()
        for service in self.services.values():
            self._close_pools(service.take_pools())
            service.resolver.close()
        if self._passthrough is not None:
            self._passthrough.close()
