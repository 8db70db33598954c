"""``meshlib.Client`` and ``meshlib.AsyncClient``: httpx clients whose mesh hosts go through the mesh.

They are ``httpx.Client`` / ``httpx.AsyncClient`` subclasses and accept every httpx argument. Requests to
a host that names a mesh service are sent through :class:`~meshlib.transport.MeshTransport`; every other
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
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from meshlib import admin
from meshlib.config import MeshConfig, ServiceConfig, parse_inner_transport
from meshlib.discovery.base import Endpoint
from meshlib.errors import ConfigError
from meshlib.security.tls import ReloadingContext, TLSContexts, TLSSettings
from meshlib.status import MeshStatus, snapshot
from meshlib.telemetry.client import ClientTelemetry
from meshlib.telemetry.propagation import AsyncPropagatingTransport, PropagatingTransport, PropagationRule
from meshlib.transport import AsyncMeshTransport, MeshTransport

logger = logging.getLogger("meshlib")

T = TypeVar("T")

#: ``inner_transport=`` of :class:`Client`: ``"httpx"`` or a factory ``(endpoint, ssl_context) -> transport``.
InnerTransport = Literal["httpx"] | Callable[[Endpoint, ssl.SSLContext], httpx.BaseTransport]
#: ``inner_transport=`` of :class:`AsyncClient`: ``"httpx"``, ``"aiohttp"`` or a factory.
AsyncInnerTransport = Literal["httpx", "aiohttp"] | Callable[[Endpoint, ssl.SSLContext], httpx.AsyncBaseTransport]

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
    """

    def __init__(self, kwargs: Mapping[str, Any], mesh: MeshConfig, inner: object, kind: str) -> None:
        self._factory: Callable[[Endpoint, ssl.SSLContext], Any] | None = None
        self._aiohttp: Callable[[ssl.SSLContext, httpx.Limits], httpx.AsyncBaseTransport] | None = None
        if callable(inner):
            self._factory = inner
        else:
            self._choose(kwargs, mesh, inner, kind)
        self._verify = kwargs.get("verify", True)
        self._cert = kwargs.get("cert")
        self._trust_env = kwargs.get("trust_env", True)
        self._pool = {name: kwargs[name] for name in ("http1", "http2", "limits") if name in kwargs}
        self._pool.setdefault("limits", httpx.Limits(max_connections=100, max_keepalive_connections=20))
        self._ssl: ssl.SSLContext | None = None
        self.tls = TLSContexts(reload_interval=mesh.tls_reload_interval, trust_env=self._trust_env)
        #: Service key -> the context its endpoints connect with, for services with TLS settings.
        self.contexts: dict[str, ReloadingContext] = {}
        for key, svc in mesh.services.items():
            settings = mesh.tls_for(key)
            if settings is None:
                continue
            self.contexts[key] = self.tls.context_for(settings)
            if not settings.verify:
                logger.warning(
                    "TLS verification is disabled for service %s (%s=false): its servers are not authenticated",
                    svc.name,
                    settings.variable("verify"),
                )
        if self.contexts and (self._verify is not True or self._cert is not None):
            logger.warning(
                "the client's verify=/cert= arguments do not apply to mesh services with TLS settings (%s): "
                "those connect with their MESHLIB_TLS_* / TLSSettings configuration",
                ", ".join(sorted(mesh.services[key].name for key in self.contexts)),
            )

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
        if kwargs.get("http2"):
            logger.warning(
                "http2=True does not apply to mesh endpoints with %s=aiohttp: aiohttp speaks HTTP/1.1", variable
            )

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context(verify=self._verify, cert=self._cert, trust_env=self._trust_env)
        return self._ssl

    def _context_for(self, key: str) -> ssl.SSLContext:
        context = self.contexts.get(key)
        if context is None:
            return self._context()
        self.tls.watch(context)  # rotation starts with the first connection pool that uses the context
        return context

    def _made(self, endpoint: Endpoint, context: ssl.SSLContext, method: str) -> Any:
        """The factory's transport for ``endpoint``, checked to be of the client's kind (sync or async)."""
        assert self._factory is not None
        transport = self._factory(endpoint, context)
        if not callable(getattr(transport, method, None)):
            kind = "httpx.AsyncBaseTransport" if method == "handle_async_request" else "httpx.BaseTransport"
            raise TypeError(
                f"inner_transport= returned {type(transport).__name__} for endpoint {endpoint}: "
                f"expected an {kind} (with {method}) for this client"
            )
        return transport

    def sync(self, endpoint: Endpoint, service: str) -> httpx.BaseTransport:
        """A new pooled sync transport for ``endpoint`` (of the service whose key is ``service``)."""
        context = self._context_for(service)
        if self._factory is not None:
            transport: httpx.BaseTransport = self._made(endpoint, context, "handle_request")
            return transport
        return httpx.HTTPTransport(verify=context, **self._pool)

    def async_(self, endpoint: Endpoint, service: str) -> httpx.AsyncBaseTransport:
        """A new pooled async transport for ``endpoint`` (of the service whose key is ``service``)."""
        context = self._context_for(service)
        if self._factory is not None:
            inner: httpx.AsyncBaseTransport = self._made(endpoint, context, "handle_async_request")
            return inner
        if self._aiohttp is not None:
            return self._aiohttp(context, self._pool["limits"])
        return httpx.AsyncHTTPTransport(verify=context, **self._pool)

    def close(self) -> None:
        """Stop watching certificate files."""
        self.tls.close()


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

    def outside(self, url: httpx.URL, transport: T, wrap: Callable[[T], T]) -> T:
        """``transport`` for a non-mesh URL, wrapped to stamp mesh headers if its host is in the rule."""
        if not self.rule or not self.rule.matches(url.host):
            return transport
        wrapped = self._wrapped.get(id(transport))
        if wrapped is None or wrapped.inner is not transport:
            wrapped = self._wrapped[id(transport)] = wrap(transport)
        wrapper: T = wrapped
        return wrapper


class _MeshClient:
    """What ``Client`` and ``AsyncClient`` share: building the mesh from the arguments, and its views.

    A mixin rather than a base class because the two must subclass ``httpx.Client`` and
    ``httpx.AsyncClient`` respectively; only their I/O (``close`` / ``aclose``) differs.
    """

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
        shared = kwargs.get("transport") is not None
        if shared and inner_transport is not None:
            raise TypeError(
                "pass either transport= (one shared inner transport, e.g. httpx.MockTransport in tests) or "
                "inner_transport= (one transport per endpoint), not both"
            )
        self._observability = _Observability(mesh, tracer_provider, meter_provider)
        self._pools = None if shared else _PoolFactory(kwargs, mesh, inner_transport, kind)
        if self._pools is None:
            _warn_tls_ignored(mesh)
        return mesh, self._pools

    @property
    def tls_contexts(self) -> Mapping[str, ReloadingContext]:
        """Service key -> the reloading TLS context of each service with TLS settings (status views, tests)."""
        return dict(self._pools.contexts) if self._pools is not None else {}

    def mesh_status(self) -> MeshStatus:
        """A snapshot of every mesh service: endpoints, latency, in-flight, breakers, ejections, discovery."""
        return snapshot(self._mesh.services, "sync" if isinstance(self._mesh, MeshTransport) else "async")

    @property
    def admin_address(self) -> tuple[str, int] | None:
        """The address the admin endpoint this client reports to listens on (``None``: none)."""
        server = self._observability.admin
        return None if server is None else server.address

    def _stop_background(self) -> None:
        """Leave the admin endpoint and stop watching certificate files (the mesh transport closes apart)."""
        self._observability.stop(self._mesh)
        if self._pools is not None:
            self._pools.close()


class Client(_MeshClient, httpx.Client):
    """A thread-safe ``httpx.Client`` that discovers, balances and sends to mesh services in-process.

    Mesh settings come from ``MESHLIB_*`` environment variables (``environ`` replaces ``os.environ``,
    useful in tests); ``services``, ``lb``, ``dns_servers`` and ``tls`` (mesh-wide
    :class:`~meshlib.security.tls.TLSSettings`) override them, or pass a whole
    :class:`~meshlib.config.MeshConfig` as ``config``. A bad value, or a TLS file that cannot be loaded,
    raises :class:`meshlib.ConfigError` here. ``tracer_provider`` / ``meter_provider``: OpenTelemetry
    providers for this client's spans and metrics (default: the global ones, once the application sets them).
    ``inner_transport``: ``"httpx"`` (the default) or a factory ``(endpoint, ssl_context) -> httpx.BaseTransport``
    called once per endpoint (see the module docstring); overrides ``MESHLIB_INNER_TRANSPORT``. ``transport=``
    instead makes every endpoint share that one transport (tests: ``httpx.MockTransport``, respx).
    """

    _mesh: MeshTransport

    def __init__(
        self,
        *,
        services: Mapping[str, str | ServiceConfig] | None = None,
        lb: str | None = None,
        dns_servers: str | list[str] | tuple[str, ...] | None = None,
        config: MeshConfig | None = None,
        environ: Mapping[str, str] | None = None,
        tls: TLSSettings | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        inner_transport: InnerTransport | None = None,
        **kwargs: Any,
    ) -> None:
        mesh, pools = self._prepare(
            kwargs,
            config=config,
            services=services,
            lb=lb,
            dns_servers=dns_servers,
            environ=environ,
            tls=tls,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            inner_transport=inner_transport,
            kind="sync",
        )
        user_transport: httpx.BaseTransport | None = kwargs.get("transport")
        super().__init__(**kwargs)
        telemetry = self._observability.telemetry
        if pools is None:
            assert user_transport is not None
            shared = user_transport
            self._mesh = MeshTransport(
                mesh, lambda endpoint, service: shared, owns_transports=False, telemetry=telemetry
            )
        else:
            self._mesh = MeshTransport(mesh, pools.sync, telemetry=telemetry)
        self._observability.start(self._mesh, "sync")

    @property
    def mesh(self) -> MeshTransport:
        """The mesh transport (services, endpoint stats), for status views and tests."""
        return self._mesh

    def _transport_for_url(self, url: httpx.URL) -> httpx.BaseTransport:
        if self._mesh.routes(url.host):
            return self._mesh
        return self._observability.outside(url, super()._transport_for_url(url), PropagatingTransport)

    def close(self) -> None:
        """Close the client: httpx's pools, discovery threads, every endpoint's pool, the certificate watcher."""
        try:
            super().close()
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
            super().__exit__(exc_type, exc_value, traceback)
        finally:
            self._stop_background()
            self._mesh.close()


class AsyncClient(_MeshClient, httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that discovers, balances and sends to mesh services in-process.

    Same arguments as :class:`Client`. Background discovery runs as tasks on the event loop that first
    uses each service; ``aclose()`` (or leaving ``async with``) stops them. ``inner_transport`` may also be
    ``"aiohttp"`` (``MESHLIB_INNER_TRANSPORT=aiohttp``), and a factory returns ``httpx.AsyncBaseTransport`` objects.
    """

    _mesh: AsyncMeshTransport

    def __init__(
        self,
        *,
        services: Mapping[str, str | ServiceConfig] | None = None,
        lb: str | None = None,
        dns_servers: str | list[str] | tuple[str, ...] | None = None,
        config: MeshConfig | None = None,
        environ: Mapping[str, str] | None = None,
        tls: TLSSettings | None = None,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        inner_transport: AsyncInnerTransport | None = None,
        **kwargs: Any,
    ) -> None:
        mesh, pools = self._prepare(
            kwargs,
            config=config,
            services=services,
            lb=lb,
            dns_servers=dns_servers,
            environ=environ,
            tls=tls,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            inner_transport=inner_transport,
            kind="async",
        )
        user_transport: httpx.AsyncBaseTransport | None = kwargs.get("transport")
        super().__init__(**kwargs)
        telemetry = self._observability.telemetry
        if pools is None:
            assert user_transport is not None
            shared = user_transport
            self._mesh = AsyncMeshTransport(
                mesh, lambda endpoint, service: shared, owns_transports=False, telemetry=telemetry
            )
        else:
            self._mesh = AsyncMeshTransport(mesh, pools.async_, telemetry=telemetry)
        self._observability.start(self._mesh, "async")

    @property
    def mesh(self) -> AsyncMeshTransport:
        """The mesh transport (services, endpoint stats), for status views and tests."""
        return self._mesh

    def _transport_for_url(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        if self._mesh.routes(url.host):
            return self._mesh
        return self._observability.outside(url, super()._transport_for_url(url), AsyncPropagatingTransport)

    async def aclose(self) -> None:
        """Close the client: httpx's pools, discovery tasks, every endpoint's pool, the certificate watcher."""
        try:
            await super().aclose()
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
            await super().__aexit__(exc_type, exc_value, traceback)
        finally:
            self._stop_background()
            await self._mesh.aclose()
