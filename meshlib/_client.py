"""What ``meshlib.httpx.Client`` and ``meshlib.httpx2.Client`` (and their async twins) share.

The public classes (:mod:`meshlib.httpx`, :mod:`meshlib.httpx2`) are subclasses of the library's own clients
with its typed constructor; everything else lives here, written once for both libraries and both I/O styles.
Requests to a host that names a mesh service are sent through the mesh (:mod:`meshlib._mesh`); every other
request takes exactly the path plain httpx would (mounts, proxies from the environment, the user's
``transport=``). Routing happens in ``_transport_for_url``, httpx's own per-URL transport choice, so a proxy
configured by ``HTTP_PROXY`` never captures mesh traffic.

A user's ``transport=`` is also the inner transport every endpoint sends through (shared, not owned), so
``httpx.MockTransport`` and respx keep working for code that uses meshlib: that is the form for tests.
Otherwise each endpoint gets its own pooled transport, created when the endpoint is first used and closed
when it leaves discovery (or the client closes), connecting with the SSL context of its service (below):

* by default an ``httpx.HTTPTransport`` / ``AsyncHTTPTransport`` built from the client's ``http1``,
  ``http2`` and ``limits``;
* ``MESHLIB_INNER_TRANSPORT=aiohttp`` (or ``inner_transport="aiohttp"``; ``AsyncClient`` only, the
  ``aiohttp`` extra): an ``httpx_aiohttp.AiohttpTransport`` with its own ``aiohttp.ClientSession`` and the
  client's ``limits`` (HTTP/1.1; several times httpx's async throughput under concurrency, see
  ``docs/performance.md`` S7);
* ``inner_transport=<callable>``: anything else (another pool, httpx2...). It is called once per endpoint
  (and per service, when two services share an address) as ``inner_transport(endpoint, ssl_context)``, with
  the :class:`~meshlib.discovery.base.Endpoint` and the ``ssl.SSLContext`` meshlib chose for its service,
  and must return an ``httpx.BaseTransport`` (``Client``) or ``httpx.AsyncBaseTransport`` (``AsyncClient``)
  that meshlib then owns and closes. The client's ``http1``/``http2``/``limits`` are the factory's business.

Telemetry (``docs/observability.md``): ``tracer_provider=`` / ``meter_provider=`` send the client's spans
and metrics to the given OpenTelemetry providers instead of the global ones; ``mesh_status()`` returns a
snapshot of the mesh; ``MESHLIB_ADMIN_ADDR`` registers the client with the loopback admin endpoint
(:mod:`meshlib.admin`) until it is closed; ``MESHLIB_PROPAGATE_TO`` lists outside hosts that may receive the
mesh's trace, baggage and deadline headers (:mod:`meshlib.telemetry.propagation`).

TLS: a service with meshlib TLS settings (``MESHLIB_TLS_*``, ``MESHLIB_SERVICE_<NAME>__TLS_*``, ``tls=`` or
``ServiceConfig(tls=...)``) connects with a :class:`~meshlib.security.tls.ReloadingContext` built from them
(mTLS, SPIFFE identity, rotation; see ``docs/security.md``), and the client's ``verify=``/``cert=`` do not
apply to it. Every other service uses the client's ``verify=``/``cert=``, exactly as httpx would.

SPIFFE Workload API: with ``SPIFFE_ENDPOINT_SOCKET`` set (in ``environ=``, else ``os.environ``) and the
``spiffe`` extra installed, every service whose TLS settings name a server SPIFFE ID (``server_id``,
``MESHLIB_TLS_SERVER_ID``) takes its client certificate, key and trust bundle from the Workload API instead of
files: one :class:`~meshlib.security.workload_api.WorkloadAPISource` per client, opened at construction
(an unusable socket is a :class:`meshlib.ConfigError` then), closed with the client, re-opened lazily in a
forked child. Such a service may not also name certificate, key or CA files (a ``ConfigError`` naming both);
services without a server SPIFFE ID keep their file or default TLS. See ``docs/security.md``.
"""

from __future__ import annotations

import logging
import os
import ssl
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from meshlib import admin
from meshlib._bounded import install as install_deadlines
from meshlib._config import MeshConfig, ResilienceSettings, ServiceConfig, parse_inner_transport
from meshlib._connection_age import ConnectionAge
from meshlib._connection_age import install as install_max_age
from meshlib._http import HttpLib, library_of
from meshlib._mesh import MeshTransport
from meshlib._plan import described_url
from meshlib.discovery.base import Endpoint
from meshlib.errors import ConfigError
from meshlib.routing.explain import Explanation, explain
from meshlib.security.tls import ReloadingContext, TLSContexts, TLSSettings
from meshlib.security.workload_api import ENDPOINT_VARIABLE, WorkloadAPISource
from meshlib.status import MeshStatus, status_of
from meshlib.telemetry.client import ClientTelemetry
from meshlib.telemetry.propagation import AsyncPropagatingTransport, PropagatingTransport, PropagationRule

if TYPE_CHECKING:
    from meshlib._amesh import AsyncMeshTransport
    from meshlib.security.consul_ca import ConsulCASource

logger = logging.getLogger("meshlib")

T = TypeVar("T")

#: ``inner_transport=`` of a sync client: ``"httpx"`` (the client's own library) or a factory
#: ``(endpoint, ssl_context) -> transport``.
InnerTransport = Literal["httpx"] | Callable[[Endpoint, ssl.SSLContext], Any]
#: ``inner_transport=`` of an async client: ``"httpx"``, ``"aiohttp"`` (httpx only) or a factory.
AsyncInnerTransport = Literal["httpx", "aiohttp"] | Callable[[Endpoint, ssl.SSLContext], Any]

_VARIABLE = "MESHLIB_INNER_TRANSPORT"
_ARGUMENT = "inner_transport (argument)"


def _mesh_config(
    config: MeshConfig | None,
    services: Mapping[str, str | ServiceConfig] | None,
    lb: str | None,
    dns_servers: str | list[str] | tuple[str, ...] | None,
    environ: Mapping[str, str] | None,
    *,
    tls: TLSSettings | None = None,
) -> MeshConfig:
    if config is not None:
        if services or lb or dns_servers or environ is not None or tls is not None:
            raise TypeError("pass either config= or the individual mesh arguments, not both")
        return config
    return MeshConfig.from_env(environ, services=services, lb=lb, dns_servers=dns_servers, tls=tls)


class _PoolFactory:
    """Makes each endpoint's pooled transport from the client's httpx arguments and the mesh TLS settings.

    Which transport: ``inner`` (the client's ``inner_transport=`` argument) if given, else
    ``MESHLIB_INNER_TRANSPORT``; ``kind`` is ``"sync"`` or ``"async"``, the client it is for. An unusable choice
    (``aiohttp`` for the sync client, or without ``httpx-aiohttp`` installed) is a :class:`meshlib.ConfigError`
    here.

    Services without meshlib TLS settings share one SSL context per client, built on first use from the
    client's ``verify``/``cert``: httpx would otherwise load the CA bundle again for each endpoint transport
    (20-40 ms each, on the first request). Services with TLS settings get a
    :class:`~meshlib.security.tls.ReloadingContext`, one per distinct settings, built here at client
    construction so a bad file is a :class:`meshlib.ConfigError` now rather than a failed request later.

    With ``SPIFFE_ENDPOINT_SOCKET`` set, services whose settings name a ``server_id`` get their context from
    the client's :attr:`source` (the SPIFFE Workload API) instead (:meth:`_spiffe_context`).
    """

    def __init__(self, lib: HttpLib, kwargs: Mapping[str, Any], mesh: MeshConfig, inner: object, kind: str) -> None:
        self._lib = lib
        self._factory: Callable[[Endpoint, ssl.SSLContext], Any] | None = None
        self._aiohttp: Callable[[ssl.SSLContext, Any], Any] | None = None
        self._aiohttp_variable = _VARIABLE
        if callable(inner):
            self._factory = inner
        else:
            self._choose(kwargs, mesh, inner, kind)
        self._verify = kwargs.get("verify", True)
        self._cert = kwargs.get("cert")
        self._trust_env = kwargs.get("trust_env", True)
        self._pool = {name: kwargs[name] for name in ("http1", "http2", "limits") if name in kwargs}
        self._pool.setdefault("limits", lib.Limits(max_connections=100, max_keepalive_connections=20))
        #: Connections per endpoint pool meshlib makes (``None``: unbounded, or the pools are not meshlib's).
        self.connections: int | None = None if self._factory is not None else self._pool["limits"].max_connections
        self._ssl: ssl.SSLContext | None = None
        self._mesh = mesh
        #: Service key -> the resilience settings its pools' maximum connection age was made from, and the age
        #: (``None``: none), made with the service's first pool: one per service, so its ``retired`` count covers
        #: all of the service's endpoints; made anew when the service's settings change (an xDS cluster update).
        self.ages: dict[str, tuple[ResilienceSettings, ConnectionAge | None]] = {}
        #: The client's live services (set once its driver exists): a service a control plane added carries its
        #: own settings (an xDS cluster's ``max_connection_duration``), not the environment's.
        self.live: Callable[[], Mapping[str, Any]] | None = None
        self.tls = TLSContexts(reload_interval=mesh.tls_reload_interval, trust_env=self._trust_env)
        #: Service key -> the context its endpoints connect with, for services with TLS settings.
        self.contexts: dict[str, ReloadingContext] = {}
        #: Service key -> how each endpoint's context is chosen, for services a control plane adds whose endpoints
        #: present different identities (a Consul discovery chain's failover targets).
        self.choosers: dict[str, Callable[[Endpoint], ssl.SSLContext]] = {}
        #: The client's SPIFFE Workload API source, if ``SPIFFE_ENDPOINT_SOCKET`` is set and a service uses it.
        self.source: WorkloadAPISource | None = None
        #: The client's Consul Connect identity (``MESHLIB_CONSUL_SERVICE``) when a ``consul+chain://`` service
        #: uses it: the leaf presented to, and the roots that verify, the chain's upstreams.
        self.consul: ConsulCASource | None = None
        self._closer: weakref.finalize[[], Any] | None = None
        self._consul_closer: weakref.finalize[[], Any] | None = None
        environ = os.environ if mesh.environ is None else mesh.environ
        endpoint = environ.get(ENDPOINT_VARIABLE, "")
        try:
            for key, svc in mesh.services.items():
                settings = mesh.tls_for(key)
                if settings is None:
                    continue
                if settings.server_id is not None and endpoint.strip():
                    self.contexts[key] = self._spiffe_context(settings, endpoint)
                else:
                    self.contexts[key] = self.tls.context_for(settings)
                if not settings.verify:
                    logger.warning(
                        "TLS verification is disabled for service %s (%s=false): its servers are not authenticated",
                        svc.name,
                        settings.variable("verify"),
                    )
            self._consul_identity(mesh, environ)
        except BaseException:
            self.close()  # a source already opened for an earlier service must not outlive the failed client
            raise
        if endpoint.strip() and self.source is None:
            logger.info(
                "%s is set but no mesh service names a server SPIFFE ID (MESHLIB_TLS_SERVER_ID or "
                "MESHLIB_SERVICE_<NAME>__TLS_SERVER_ID): this client does not use the Workload API",
                ENDPOINT_VARIABLE,
            )
        if self.contexts and (self._verify is not True or self._cert is not None):
            logger.warning(
                "the client's verify=/cert= arguments do not apply to mesh services with TLS settings (%s): "
                "those connect with their MESHLIB_TLS_* / TLSSettings configuration",
                ", ".join(sorted(mesh.services[key].name for key in self.contexts)),
            )

    def register_tls(self, key: str, settings: TLSSettings | Callable[[Endpoint], ssl.SSLContext]) -> None:
        """Give service ``key`` (added later by a control plane) the context ``settings`` make (an xDS cluster), or
        a chooser of each endpoint's context (a Consul chain's targets); from any thread (one dict assignment; the
        request path reads the dicts)."""
        if callable(settings):
            self.choosers[key] = settings
        else:
            self.contexts[key] = self.tls.context_for(settings)

    def _consul_identity(self, mesh: MeshConfig, environ: Mapping[str, str]) -> None:
        """``MESHLIB_CONSUL_SERVICE`` with ``consul+chain://`` services: this client's Consul Connect identity (its
        leaf and the CA roots, watched), opened now so an agent that refuses or does not answer is a
        :class:`~meshlib.ConfigError` (or :class:`~meshlib.errors.ConsulACLError`) at construction."""
        from meshlib.discovery import scheme_of

        if not environ.get("MESHLIB_CONSUL_SERVICE", "").strip():  # consul_ca.SERVICE_VARIABLE, not imported yet
            return
        if not any(scheme_of(svc.target) == "consul+chain" for svc in mesh.services.values()):
            return
        from meshlib.security.consul_ca import ConsulCASource

        self.consul = ConsulCASource(environ=environ)
        closer = weakref.finalize(self, self.consul.close)
        closer.atexit = False
        self._consul_closer = closer

    def _spiffe_context(self, settings: TLSSettings, endpoint: str) -> ReloadingContext:
        """The Workload API context for a service requiring ``settings.server_id`` (opening the source once).

        Certificates come from one place or the other: files named too are a :class:`~meshlib.ConfigError`
        naming both settings, never silently ignored (a stale file must not look like SPIFFE rotation, and an
        unused SVID must not look like file TLS).
        """
        assert settings.server_id is not None
        for attr in ("ca_file", "cert_file", "key_file"):
            value = getattr(settings, attr)
            if value is not None:
                raise ConfigError(
                    settings.variable(attr),
                    value,
                    f"no TLS file for a service whose server SPIFFE ID ({settings.variable('server_id')}) is checked "
                    f"with the SPIFFE Workload API's SVID and bundle ({ENDPOINT_VARIABLE}={endpoint.strip()}): "
                    f"unset one of the two",
                )
        if self.source is None:
            source = self.source = WorkloadAPISource(environ={ENDPOINT_VARIABLE: endpoint})
            # A client dropped without close() must not leave its stream running for the life of the process.
            closer = weakref.finalize(self, source.close)
            closer.atexit = False
            self._closer = closer
        return self.source.client_context(settings.server_id, settings.server_name)

    def _choose(self, kwargs: Mapping[str, Any], mesh: MeshConfig, inner: object, kind: str) -> None:
        """Resolve a named inner transport (argument, else ``MESHLIB_INNER_TRANSPORT``)."""
        if inner is None:
            variable, name = _VARIABLE, mesh.inner_transport
        elif isinstance(inner, str):
            variable, name = _ARGUMENT, parse_inner_transport(_ARGUMENT, inner)
        else:
            raise TypeError(
                f"inner_transport= must be 'httpx', 'aiohttp' or a callable (endpoint, ssl_context) -> transport, "
                f"not {type(inner).__name__}"
            )
        if name != "aiohttp":
            return
        if self._lib.name != "httpx":
            raise ConfigError(
                variable,
                name,
                f"httpx for a {self._lib.name} client: httpx-aiohttp plugs aiohttp into httpx, not {self._lib.name} "
                "(use meshlib.httpx.AsyncClient for aiohttp)",
            )
        if kind != "async":
            raise ConfigError(
                variable,
                name,
                "httpx for meshlib.Client: aiohttp is asyncio-only, use it with meshlib.AsyncClient "
                "(a sync client in the same process can pass inner_transport='httpx')",
            )
        try:
            from meshlib._aiohttp import EndpointAiohttpTransport
        except ImportError as error:
            raise ConfigError(
                variable, name, f"httpx, or install httpx-aiohttp first: pip install 'meshlib[aiohttp]' ({error})"
            ) from None
        self._aiohttp = EndpointAiohttpTransport
        self._aiohttp_variable = variable
        if kwargs.get("http2"):
            logger.warning(
                "http2=True does not apply to mesh endpoints with %s=aiohttp: aiohttp speaks HTTP/1.1", variable
            )

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = self._lib.create_ssl_context(verify=self._verify, cert=self._cert, trust_env=self._trust_env)
        return self._ssl

    def _context_for(self, key: str, endpoint: Endpoint) -> ssl.SSLContext:
        chooser = self.choosers.get(key)
        if chooser is not None:
            assert self.consul is not None
            self.consul.resume()  # in a forked child: the child's own leaf and roots watches (a pid check otherwise)
            return chooser(endpoint)
        context = self.contexts.get(key)
        if context is None:
            return self._context()
        self.tls.watch(context)  # rotation starts with the first connection pool that uses the context
        if self.source is not None:
            self.source.resume()  # in a forked child: the child's own Workload API stream (a pid check otherwise)
        return context

    def _made(self, endpoint: Endpoint, context: ssl.SSLContext, method: str) -> Any:
        """The factory's transport for ``endpoint``, checked to be of the client's kind (sync or async)."""
        assert self._factory is not None
        transport = self._factory(endpoint, context)
        if not callable(getattr(transport, method, None)) or library_of(transport) not in (None, self._lib):
            name = self._lib.name
            kind = f"{name}.AsyncBaseTransport" if method == "handle_async_request" else f"{name}.BaseTransport"
            raise TypeError(
                f"inner_transport= returned {type(transport).__name__} for endpoint {endpoint}: "
                f"expected an {kind} (with {method}) for this client"
            )
        return transport

    def sync(self, endpoint: Endpoint, service: str) -> Any:
        """A new pooled sync transport for ``endpoint`` (of the service whose key is ``service``)."""
        context = self._context_for(service, endpoint)
        if self._factory is not None:
            return self._made(endpoint, context, "handle_request")
        transport = self._lib.HTTPTransport(verify=context, **self._pool)
        install_deadlines(transport, asynchronous=False)
        install_max_age(transport, self._age(service))
        return transport

    def async_(self, endpoint: Endpoint, service: str) -> Any:
        """A new pooled async transport for ``endpoint`` (of the service whose key is ``service``)."""
        context = self._context_for(service, endpoint)
        if self._factory is not None:
            return self._made(endpoint, context, "handle_async_request")
        if self._aiohttp is not None:
            from meshlib._aio import on_trio

            if on_trio():  # checked here, on an endpoint's first request: a client is built outside any loop
                raise ConfigError(self._aiohttp_variable, "aiohttp", "httpx under trio: aiohttp runs on asyncio only")
            aiohttp_transport = self._aiohttp(context, self._pool["limits"])
            install_max_age(aiohttp_transport, self._age(service))  # not applied to aiohttp's pool: logged once
            return aiohttp_transport
        transport = self._lib.AsyncHTTPTransport(verify=context, **self._pool)
        install_deadlines(transport, asynchronous=True)
        install_max_age(transport, self._age(service))
        return transport

    def _age(self, key: str) -> ConnectionAge | None:
        """Service ``key``'s maximum connection age: its live settings' (an xDS cluster's
        ``max_connection_duration``), else ``MESHLIB_[SERVICE_<NAME>__]MAX_CONNECTION_AGE``; one per settings."""
        live = self.live
        service = live().get(key) if live is not None else None
        settings: ResilienceSettings = service.settings if service is not None else self._mesh.resilience_for(key)
        entry = self.ages.get(key)
        if entry is None or entry[0] is not settings:  # two threads racing: both make one, the last is kept
            entry = self.ages[key] = (settings, settings.connection_age())
        return entry[1]

    def close(self) -> None:
        """Stop watching certificate files; end the Workload API stream."""
        self.tls.close()
        if self._closer is not None:
            self._closer()  # source.close(), once
        if self._consul_closer is not None:
            self._consul_closer()


def _warn_tls_ignored(mesh: MeshConfig) -> None:
    if any(mesh.tls_for(key) is not None for key in mesh.services):
        logger.warning(
            "MESHLIB_TLS_* / TLSSettings are not applied: the client was given transport=, which sends every "
            "mesh request as it is"
        )


class _Observability:
    """A client's telemetry wiring: its providers, its admin registration, ``MESHLIB_PROPAGATE_TO``."""

    def __init__(
        self, mesh: MeshConfig, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None
    ) -> None:
        self.telemetry = ClientTelemetry(tracer_provider, meter_provider)
        self.rule = PropagationRule(mesh.propagate_to)
        self.admin: admin.AdminServer | None = None
        self._wrapped: dict[int, Any] = {}

    def start(self, transport: MeshTransport | AsyncMeshTransport, kind: str) -> None:
        address = transport.config.admin_addr
        if address is not None:
            self.admin = admin.attach(transport, self.telemetry, address, kind)

    def stop(self, transport: MeshTransport | AsyncMeshTransport) -> None:
        server, self.admin = self.admin, None
        if server is not None:
            admin.detach(server, transport, self.telemetry)

    def outside(self, url: Any, transport: T, wrap: Callable[[T], T]) -> T:
        """``transport`` for a non-mesh URL, wrapped to stamp mesh headers if its host is in the rule."""
        if not self.rule or not self.rule.matches(url.host):
            return transport
        wrapped = self._wrapped.get(id(transport))
        if wrapped is None or wrapped.inner is not transport:
            wrapped = self._wrapped[id(transport)] = wrap(transport)
        wrapper: T = wrapped
        return wrapper


#: The extension that marks a redirect from outside the mesh into it (see ``_MeshClient._build_redirect_request``).
_REFUSED_REDIRECT = "meshlib.refused_redirect"


#: The constructor arguments that are the mesh's own; every other one is the HTTP library's.
_MESH_ARGUMENTS = (
    "services",
    "lb",
    "dns_servers",
    "config",
    "environ",
    "tls",
    "tracer_provider",
    "meter_provider",
    "inner_transport",
)
#: The library's arguments that also shape each endpoint's pool (and the checks on ``transport=``/``mounts=``).
_POOL_ARGUMENTS = ("verify", "cert", "trust_env", "http1", "http2", "limits", "transport", "mounts")


class _MeshClient:
    """What every meshlib client shares: building the mesh from the arguments, and its views.

    A mixin rather than a base class because the clients must subclass their library's ``Client`` or
    ``AsyncClient``; :class:`SyncMesh` and :class:`AsyncMesh` add the I/O of each (``close`` / ``aclose``).
    """

    _lib: HttpLib
    _mesh: MeshTransport | AsyncMeshTransport
    _pools: _PoolFactory | None
    _observability: _Observability

    def _prepare(
        self,
        kwargs: Mapping[str, Any],
        *,
        config: MeshConfig | None,
        services: Mapping[str, str | ServiceConfig] | None,
        lb: str | None,
        dns_servers: str | list[str] | tuple[str, ...] | None,
        environ: Mapping[str, str] | None,
        tls: TLSSettings | None,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        inner_transport: object = None,
        kind: str = "sync",
    ) -> tuple[MeshConfig, _PoolFactory | None]:
        """Validate the mesh settings (``ConfigError`` here, not later) and build the pools and telemetry."""
        mesh = _mesh_config(config, services, lb, dns_servers, environ, tls=tls)
        user_transport = kwargs.get("transport")
        shared = user_transport is not None
        if shared and inner_transport is not None:
            raise TypeError(
                "pass either transport= (one shared inner transport, e.g. httpx.MockTransport in tests) or "
                "inner_transport= (one transport per endpoint), not both"
            )
        if shared:
            self._check_library(user_transport, "transport=")
        for mounted in (kwargs.get("mounts") or {}).values():
            if mounted is not None:
                self._check_library(mounted, "mounts=")
        self._observability = _Observability(mesh, tracer_provider, meter_provider)
        self._pools = None if shared else _PoolFactory(self._lib, kwargs, mesh, inner_transport, kind)
        if self._pools is None:
            _warn_tls_ignored(mesh)
        return mesh, self._pools

    def _init_mesh(self, arguments: Mapping[str, Any], kind: str) -> None:
        """The whole ``__init__`` of a public client, given its arguments (``locals()``): validate the mesh's,
        hand the library's to its client class, then build the mesh. One body for the four typed constructors."""
        library_arguments = {k: v for k, v in arguments.items() if k not in _MESH_ARGUMENTS and k != "self"}
        pool_options = {k: library_arguments[k] for k in _POOL_ARGUMENTS if k in library_arguments}
        mesh, pools = self._prepare(pool_options, kind=kind, **{k: arguments[k] for k in _MESH_ARGUMENTS})
        super().__init__(**library_arguments)  # the library's Client / AsyncClient, next in the MRO
        self._build_mesh(mesh, pools, library_arguments.get("transport"), kind)

    def _check_library(self, transport: object, argument: str) -> None:
        """A transport of the other HTTP library cannot work (its responses are not this library's): say so."""
        found = library_of(transport)
        if found is not None and found is not self._lib:
            raise TypeError(
                f"{argument} is a {found.name} transport ({type(transport).__name__}) but this client is "
                f"meshlib.{self._lib.name}.{type(self).__name__}: use meshlib.{found.name}.{type(self).__name__}, "
                f"or a {self._lib.name} transport"
            )

    def _build_mesh(self, mesh: MeshConfig, pools: _PoolFactory | None, user_transport: Any, kind: str) -> None:
        telemetry = self._observability.telemetry
        if kind == "sync":
            driver: type[MeshTransport | AsyncMeshTransport] = MeshTransport
        else:
            from meshlib._amesh import AsyncMeshTransport

            driver = AsyncMeshTransport
        if pools is None:
            shared = user_transport

            def same(endpoint: Endpoint, service: str) -> Any:
                return shared

            self._mesh = driver(self._lib, mesh, same, owns_transports=False, telemetry=telemetry)
        else:
            self._mesh = driver(
                self._lib,
                mesh,
                pools.sync if kind == "sync" else pools.async_,
                telemetry=telemetry,
                register_tls=pools.register_tls,
                connect=pools.consul,
            )
            driver_ref = weakref.ref(self._mesh)  # weak: the pools must not keep a dropped client's mesh alive

            def live() -> Mapping[str, Any]:
                mesh_driver = driver_ref()
                return mesh_driver.services if mesh_driver is not None else {}

            pools.live = live
            if kind != "sync":
                self._mesh.connections = pools.connections  # type: ignore[union-attr]
        self._observability.start(self._mesh, kind)

    @property
    def workload_api(self) -> WorkloadAPISource | None:
        """The client's SPIFFE Workload API source (``SPIFFE_ENDPOINT_SOCKET``), or ``None`` when it uses none."""
        return self._pools.source if self._pools is not None else None

    @property
    def tls_contexts(self) -> Mapping[str, ReloadingContext]:
        """Service key -> the reloading TLS context of each service with TLS settings (status views, tests)."""
        return dict(self._pools.contexts) if self._pools is not None else {}

    def mesh_status(self) -> MeshStatus:
        """A snapshot of every mesh service (endpoints, latency, in-flight, breakers, ejections, discovery), the
        route table and, for a client steered by xDS, its control planes and resources (``.xds``)."""
        self._mesh.home.settle()
        return status_of(
            self._mesh.services,
            "sync" if isinstance(self._mesh, MeshTransport) else "async",
            self._mesh.routes_view(),
            self._mesh.xds,
            self._mesh.consul,
        )

    def explain(
        self,
        request: Any,
        url: Any = None,
        *,
        headers: Any = None,
        params: Any = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> Explanation:
        """What this client would do with a request, and why: route, rule, filters, backends, endpoints, policy.

        ``request`` is a request (``client.build_request(...)``) or a method, then ``url`` (and optional
        ``headers``, ``params``, ``extensions``) build one with :meth:`build_request`, so the client's own
        headers and ``base_url`` apply as they would to a call. Nothing is sent and nothing is drawn or counted:
        it reports what is known now (endpoints appear once discovery has started; ``meshlib explain`` starts
        it). Explain the request from where the call would be made: the ``meshlib.policy()`` scopes in effect
        there are part of the answer. See docs/routing.md, "meshlib explain".
        """
        if isinstance(request, str):
            if url is None:
                raise TypeError("explain(method, url): the url is missing")
            request = self.build_request(  # type: ignore[attr-defined]
                request, url, headers=headers, params=params, extensions=extensions
            )
        elif url is not None or headers is not None or params is not None or extensions is not None:
            raise TypeError("explain(request) takes a built request alone, or explain(method, url, headers=...)")
        return explain(self._mesh, request)

    @property
    def http_library(self) -> str:
        """The HTTP library this client is built on: ``"httpx"`` or ``"httpx2"``."""
        return self._lib.name

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """The address the admin endpoint this client reports to listens on (``None``: none)."""
        server = self._observability.admin
        return None if server is None or not server.serving else server.address

    def _build_redirect_request(self, request: Any, response: Any) -> Any:
        """The library's redirect request, marked as refused when it leads from outside the mesh into it.

        Marked, not raised here: the library also builds the redirect for ``follow_redirects=False``, as
        ``response.next_request``, and a caller that does not follow must still get its 3xx response. The
        marked request is refused when it is sent (:meth:`_refuse_redirect`), so following automatically
        and ``client.send(response.next_request)`` end the same way, before anything reaches the service.
        """
        redirect = super()._build_redirect_request(request, response)  # type: ignore[misc]
        if self._mesh.routes(redirect.url.host) and not self._mesh.routes(request.url.host):
            # A new dict: the library hands the same extensions object down the whole redirect chain.
            redirect.extensions = {**redirect.extensions, _REFUSED_REDIRECT: described_url(request.url)}
        return redirect

    def _refuse_redirect(self, request: Any) -> None:
        """Raise :class:`~meshlib.RedirectRefusedError` if ``request`` is a refused redirect into the mesh."""
        source = request.extensions.get(_REFUSED_REDIRECT)
        if source is None:
            return
        service = self._mesh.service_for(request.url.host)
        if service is None:  # the caller pointed the redirect elsewhere meanwhile: no longer into the mesh
            return
        target = described_url(request.url)
        logger.warning("refused a redirect from %s (outside the mesh) to %s (mesh service %s)", source, target, service)
        raise self._lib.errors["RedirectRefusedError"](source, target, service, request=request)  # type: ignore[call-arg]

    def _stop_background(self) -> None:
        """Leave the admin endpoint and stop watching certificate files (the mesh transport closes apart)."""
        self._observability.stop(self._mesh)
        if self._pools is not None:
            self._pools.close()


class SyncMesh(_MeshClient):
    """The sync clients' half: mesh hosts routed to the blocking driver, and closing it with the client."""

    _mesh: MeshTransport

    @property
    def mesh(self) -> MeshTransport:
        """The mesh transport (services, endpoint stats), for status views and tests."""
        return self._mesh

    def _transport_for_url(self, url: Any) -> Any:
        if self._mesh.routes(url.host):
            return self._mesh
        return self._observability.outside(url, super()._transport_for_url(url), PropagatingTransport)  # type: ignore[misc]

    def _send_single_request(self, request: Any) -> Any:
        if _REFUSED_REDIRECT in request.extensions:
            self._refuse_redirect(request)
        return super()._send_single_request(request)  # type: ignore[misc]

    def close(self) -> None:
        """Close the client: its library's pools, discovery threads, every endpoint's pool, the certificate watcher."""
        try:
            super().close()  # type: ignore[misc]
        finally:
            self._stop_background()
            self._mesh.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc_value, traceback)  # type: ignore[misc]
        finally:
            self._stop_background()
            self._mesh.close()


class AsyncMesh(_MeshClient):
    """The async clients' half: mesh hosts routed to the awaiting driver, and closing it with the client."""

    _mesh: AsyncMeshTransport

    @property
    def mesh(self) -> AsyncMeshTransport:
        """The mesh transport (services, endpoint stats), for status views and tests."""
        return self._mesh

    def _transport_for_url(self, url: Any) -> Any:
        if self._mesh.routes(url.host):
            return self._mesh
        return self._observability.outside(url, super()._transport_for_url(url), AsyncPropagatingTransport)  # type: ignore[misc]

    async def _send_single_request(self, request: Any) -> Any:
        if _REFUSED_REDIRECT in request.extensions:
            self._refuse_redirect(request)
        return await super()._send_single_request(request)  # type: ignore[misc]

    async def aclose(self) -> None:
        """Close the client: its library's pools, discovery tasks, every endpoint's pool, the certificate watcher."""
        try:
            await super().aclose()  # type: ignore[misc]
        finally:
            self._stop_background()
            await self._mesh.aclose()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        try:
            await super().__aexit__(exc_type, exc_value, traceback)  # type: ignore[misc]
        finally:
            self._stop_background()
            await self._mesh.aclose()
