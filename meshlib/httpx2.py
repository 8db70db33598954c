"""meshlib on httpx2: ``Client`` and ``AsyncClient`` are ``httpx2.Client`` / ``httpx2.AsyncClient`` subclasses.

They take every argument their httpx2 base takes, with the same types, plus the mesh's own (keyword-only,
first): ``services``, ``lb``, ``dns_servers``, ``config``, ``environ``, ``tls``, ``tracer_provider``,
``meter_provider``, ``inner_transport``. Requests to a mesh service are discovered, balanced, retried within a
budget and observed in-process; every other request takes exactly httpx2's own path. meshlib's errors raised by
these clients are httpx2 exceptions too (``DeadlineExceeded`` below subclasses ``meshlib.DeadlineExceeded`` and
``httpx2.TimeoutException``), so ``except httpx2.HTTPError`` keeps working around mesh calls.

Install with ``pip install 'meshlib[httpx2]'`` (Python 3.11 or later). ``inner_transport="aiohttp"`` is
httpx-only (httpx-aiohttp plugs into httpx); httpx2's own async pool is fast enough not to need it.

The top-level ``meshlib.Client`` is one of ``meshlib.httpx.Client`` / ``meshlib.httpx2.Client``; see
:mod:`meshlib` for the rule.
"""

from __future__ import annotations

import ssl
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING

import httpx2
from httpx2._client import EventHook
from httpx2._config import DEFAULT_LIMITS, DEFAULT_MAX_REDIRECTS, DEFAULT_TIMEOUT_CONFIG
from httpx2._types import AuthTypes, CertTypes, CookieTypes, HeaderTypes, ProxyTypes, QueryParamTypes, TimeoutTypes
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from meshlib import errors as _errors
from meshlib._client import AsyncInnerTransport, AsyncMesh, InnerTransport, SyncMesh
from meshlib._config import MeshConfig, ServiceConfig
from meshlib._http import library
from meshlib.security.tls import TLSSettings

__all__ = [
    "AsyncClient",
    "CircuitOpenError",
    "Client",
    "ConsulACLError",
    "DeadlineExceeded",
    "DiscoveryError",
    "NoEndpointsError",
    "OverloadedError",
    "RedirectRefusedError",
]

_LIB = library("httpx2")

if TYPE_CHECKING:

    class DiscoveryError(_errors.DiscoveryError, httpx2.TransportError):
        """:class:`meshlib.DiscoveryError` as a ``httpx2.TransportError``."""

    class NoEndpointsError(_errors.NoEndpointsError, DiscoveryError):
        """:class:`meshlib.NoEndpointsError` as a ``httpx2.TransportError``."""

    class ConsulACLError(_errors.ConsulACLError, DiscoveryError):
        """:class:`meshlib.ConsulACLError` as a ``httpx2.TransportError``."""

    class CircuitOpenError(_errors.CircuitOpenError, httpx2.ConnectError):
        """:class:`meshlib.CircuitOpenError` as a ``httpx2.ConnectError``."""

    class OverloadedError(_errors.OverloadedError, httpx2.PoolTimeout):
        """:class:`meshlib.OverloadedError` as a ``httpx2.PoolTimeout``."""

    class DeadlineExceeded(_errors.DeadlineExceeded, httpx2.TimeoutException):
        """:class:`meshlib.DeadlineExceeded` as a ``httpx2.TimeoutException``."""

    class RedirectRefusedError(_errors.RedirectRefusedError, httpx2.RequestError):
        """:class:`meshlib.RedirectRefusedError` as a ``httpx2.RequestError``."""

else:
    DiscoveryError = _LIB.errors["DiscoveryError"]
    NoEndpointsError = _LIB.errors["NoEndpointsError"]
    ConsulACLError = _LIB.errors["ConsulACLError"]
    CircuitOpenError = _LIB.errors["CircuitOpenError"]
    OverloadedError = _LIB.errors["OverloadedError"]
    DeadlineExceeded = _LIB.errors["DeadlineExceeded"]
    RedirectRefusedError = _LIB.errors["RedirectRefusedError"]


class Client(SyncMesh, httpx2.Client):
    """A thread-safe ``httpx2.Client`` that discovers, balances and sends to mesh services in-process.

    Mesh settings come from ``MESHLIB_*`` environment variables (``environ`` replaces ``os.environ``,
    useful in tests); ``services``, ``lb``, ``dns_servers`` and ``tls`` (mesh-wide
    :class:`~meshlib.TLSSettings`) override them, or pass a whole :class:`~meshlib.MeshConfig` as
    ``config``. A bad value, or a TLS file that cannot be loaded, raises :class:`meshlib.ConfigError` here.
    ``tracer_provider`` / ``meter_provider``: OpenTelemetry providers for this client's spans and metrics
    (default: the global ones, once the application sets them). ``inner_transport``: ``"httpx"`` (the
    default: a ``httpx2.HTTPTransport`` per endpoint) or a factory ``(endpoint, ssl_context) -> transport``
    called once per endpoint; overrides ``MESHLIB_INNER_TRANSPORT``. ``transport=`` instead makes every
    endpoint share that one transport (tests: ``httpx2.MockTransport``). Every other argument is httpx2's.
    """

    _lib = _LIB

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
        auth: AuthTypes | None = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes | None = None,
        cookies: CookieTypes | None = None,
        verify: ssl.SSLContext | str | bool = True,
        cert: CertTypes | None = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        proxy: ProxyTypes | None = None,
        mounts: Mapping[str, httpx2.BaseTransport | None] | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT_CONFIG,
        follow_redirects: bool = False,
        limits: httpx2.Limits = DEFAULT_LIMITS,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        event_hooks: Mapping[str, list[EventHook]] | None = None,
        base_url: httpx2.URL | str = "",
        transport: httpx2.BaseTransport | None = None,
        default_encoding: str | typing.Callable[[bytes], str | None] = "utf-8",
    ) -> None:
        self._init_mesh(locals(), "sync")


class AsyncClient(AsyncMesh, httpx2.AsyncClient):
    """A ``httpx2.AsyncClient`` that discovers, balances and sends to mesh services in-process.

    Same arguments as :class:`Client`. Background discovery runs as tasks on the event loop that first uses
    each service; ``aclose()`` (or leaving ``async with``) stops them. A factory given as ``inner_transport``
    returns ``httpx2.AsyncBaseTransport`` objects.
    """

    _lib = _LIB

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
        auth: AuthTypes | None = None,
        params: QueryParamTypes | None = None,
        headers: HeaderTypes | None = None,
        cookies: CookieTypes | None = None,
        verify: ssl.SSLContext | str | bool = True,
        cert: CertTypes | None = None,
        http1: bool = True,
        http2: bool = False,
        proxy: ProxyTypes | None = None,
        mounts: Mapping[str, httpx2.AsyncBaseTransport | None] | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT_CONFIG,
        follow_redirects: bool = False,
        limits: httpx2.Limits = DEFAULT_LIMITS,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        event_hooks: Mapping[str, list[EventHook]] | None = None,
        base_url: httpx2.URL | str = "",
        transport: httpx2.AsyncBaseTransport | None = None,
        trust_env: bool = True,
        default_encoding: str | typing.Callable[[bytes], str | None] = "utf-8",
    ) -> None:
        self._init_mesh(locals(), "async")
