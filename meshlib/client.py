"""``meshlib.Client`` and ``meshlib.AsyncClient``: httpx clients whose mesh hosts go through the mesh.

They are ``httpx.Client`` / ``httpx.AsyncClient`` subclasses and accept every httpx argument. Requests to
a host that names a mesh service are sent through :class:`~meshlib.transport.MeshTransport`; every other
request takes exactly the path plain httpx would (mounts, proxies from the environment, the user's
``transport=``). Routing happens in ``_transport_for_url``, httpx's own per-URL transport choice, so a proxy
configured by ``HTTP_PROXY`` never captures mesh traffic.

A user's ``transport=`` is also the inner transport every endpoint sends through (shared, not owned), so
``httpx.MockTransport`` and respx keep working for code that uses meshlib. Otherwise each endpoint gets its
own pooled ``httpx.HTTPTransport`` built from the client's ``verify``, ``cert``, ``http1``, ``http2`` and
``limits``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from meshlib.config import MeshConfig, ServiceConfig
from meshlib.discovery.base import Endpoint
from meshlib.transport import AsyncMeshTransport, MeshTransport

logger = logging.getLogger("meshlib")


def _mesh_config(
    config: MeshConfig | None,
    services: Mapping[str, str | ServiceConfig] | None,
    lb: str | None,
    dns_servers: str | list[str] | tuple[str, ...] | None,
    environ: Mapping[str, str] | None,
) -> MeshConfig:
    if config is not None:
        if services or lb or dns_servers or environ is not None:
            raise TypeError("pass either config= or the individual mesh arguments, not both")
        return config
    return MeshConfig.from_env(environ, services=services, lb=lb, dns_servers=dns_servers)


class _PoolFactory:
    """Makes each endpoint's pooled transport from the client's httpx arguments.

    The SSL context is built once per client, on first use, and shared by every endpoint: httpx would
    otherwise load the CA bundle again for each endpoint transport (20-40 ms each, on the first request).
    """

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        self._verify = kwargs.get("verify", True)
        self._cert = kwargs.get("cert")
        self._trust_env = kwargs.get("trust_env", True)
        self._pool = {name: kwargs[name] for name in ("http1", "http2", "limits") if name in kwargs}
        self._pool.setdefault("limits", httpx.Limits(max_connections=100, max_keepalive_connections=20))
        self._ssl: ssl.SSLContext | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context(verify=self._verify, cert=self._cert, trust_env=self._trust_env)
        return self._ssl

    def sync(self, endpoint: Endpoint) -> httpx.BaseTransport:
        """A new pooled sync transport for ``endpoint``."""
        return httpx.HTTPTransport(verify=self._context(), **self._pool)

    def async_(self, endpoint: Endpoint) -> httpx.AsyncBaseTransport:
        """A new pooled async transport for ``endpoint``."""
        return httpx.AsyncHTTPTransport(verify=self._context(), **self._pool)


class Client(httpx.Client):
    """A thread-safe ``httpx.Client`` that discovers, balances and sends to mesh services in-process.

    Mesh settings come from ``MESHLIB_*`` environment variables (``environ`` replaces ``os.environ``,
    useful in tests); ``services``, ``lb`` and ``dns_servers`` override them, or pass a whole
    :class:`~meshlib.config.MeshConfig` as ``config``. A bad value raises :class:`meshlib.ConfigError` here.
    """

    def __init__(
        self,
        *,
        services: Mapping[str, str | ServiceConfig] | None = None,
        lb: str | None = None,
        dns_servers: str | list[str] | tuple[str, ...] | None = None,
        config: MeshConfig | None = None,
        environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        mesh = _mesh_config(config, services, lb, dns_servers, environ)
        user_transport: httpx.BaseTransport | None = kwargs.get("transport")
        super().__init__(**kwargs)
        if user_transport is not None:
            shared = user_transport
            self._mesh = MeshTransport(mesh, lambda endpoint: shared, owns_transports=False)
        else:
            self._mesh = MeshTransport(mesh, _PoolFactory(kwargs).sync)

    @property
    def mesh(self) -> MeshTransport:
        """The mesh transport (services, endpoint stats), for status views and tests."""
        return self._mesh

    def _transport_for_url(self, url: httpx.URL) -> httpx.BaseTransport:
        if self._mesh.routes(url.host):
            return self._mesh
        return super()._transport_for_url(url)

    def close(self) -> None:
        """Close the client: httpx's pools, discovery threads and every endpoint's pool."""
        try:
            super().close()
        finally:
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
            self._mesh.close()


class AsyncClient(httpx.AsyncClient):
    """An ``httpx.AsyncClient`` that discovers, balances and sends to mesh services in-process.

    Same arguments as :class:`Client`. Background discovery runs as tasks on the event loop that first
    uses each service; ``aclose()`` (or leaving ``async with``) stops them.
    """

    def __init__(
        self,
        *,
        services: Mapping[str, str | ServiceConfig] | None = None,
        lb: str | None = None,
        dns_servers: str | list[str] | tuple[str, ...] | None = None,
        config: MeshConfig | None = None,
        environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        mesh = _mesh_config(config, services, lb, dns_servers, environ)
        user_transport: httpx.AsyncBaseTransport | None = kwargs.get("transport")
        super().__init__(**kwargs)
        if user_transport is not None:
            shared = user_transport
            self._mesh = AsyncMeshTransport(mesh, lambda endpoint: shared, owns_transports=False)
        else:
            self._mesh = AsyncMeshTransport(mesh, _PoolFactory(kwargs).async_)

    @property
    def mesh(self) -> AsyncMeshTransport:
        """The mesh transport (services, endpoint stats), for status views and tests."""
        return self._mesh

    def _transport_for_url(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        if self._mesh.routes(url.host):
            return self._mesh
        return super()._transport_for_url(url)

    async def aclose(self) -> None:
        """Close the client: httpx's pools, discovery tasks and every endpoint's pool."""
        try:
            await super().aclose()
        finally:
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
            await self._mesh.aclose()
