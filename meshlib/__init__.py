"""meshlib: a sidecarless service mesh for Python.

``meshlib.Client()`` / ``meshlib.AsyncClient()`` are HTTP clients that discover the endpoints of logical
services (``http://payments/charge``), balance across them, apply deadlines, retries within a budget,
circuit breakers and outlier ejection, and send in-process: what a sidecar does for outbound calls,
without the sidecar. This module is the public face; ``__all__`` is the contract.

**Which HTTP library.** meshlib runs on httpx and on httpx2 (httpx's maintained fork, same API), both
first class: ``meshlib.httpx.Client`` subclasses ``httpx.Client``, ``meshlib.httpx2.Client`` subclasses
``httpx2.Client`` (``pip install 'meshlib[httpx2]'``), and each raises its library's exceptions. The
top-level ``Client`` and ``AsyncClient`` follow one rule: they are httpx's, unless ``MESHLIB_HTTP_LIBRARY=httpx2``
is set when they are first used. The top-level errors (``DeadlineExceeded``, ``CircuitOpenError``,
``OverloadedError``, ``NoEndpointsError``, ``DiscoveryError``, ``ConsulACLError``, ``RedirectRefusedError``)
are library-neutral kinds:
what a client raises is its library's flavour of the kind (``meshlib.httpx.DeadlineExceeded`` subclasses both
``meshlib.DeadlineExceeded`` and ``httpx.TimeoutException``), so ``except meshlib.DeadlineExceeded`` catches
it from either library and ``except httpx.TimeoutException`` from an httpx client.

The clients and the HTTP library load on first use, so ``import meshlib`` stays cheap.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from meshlib._config import MeshConfig, ResilienceSettings, ServiceConfig
from meshlib.discovery.base import Endpoint
from meshlib.errors import (
    CircuitOpenError,
    ClientClosedError,
    ConfigError,
    ConsulACLError,
    DeadlineExceeded,
    DiscoveryError,
    MeshError,
    NoEndpointsError,
    OverloadedError,
    RedirectRefusedError,
)
from meshlib.policy import Policy, current_deadline, policy
from meshlib.resilience.hedging import HedgePolicy
from meshlib.routing.explain import Explanation
from meshlib.security import IdentityError, TLSSettings, find_identity_error
from meshlib.status import MeshStatus

if TYPE_CHECKING:
    from meshlib.httpx import AsyncClient, Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "CircuitOpenError",
    "ClientClosedError",
    "Client",
    "ConfigError",
    "ConsulACLError",
    "DeadlineExceeded",
    "DiscoveryError",
    "Endpoint",
    "Explanation",
    "HedgePolicy",
    "IdentityError",
    "MeshConfig",
    "MeshError",
    "MeshStatus",
    "NoEndpointsError",
    "OverloadedError",
    "Policy",
    "RedirectRefusedError",
    "ResilienceSettings",
    "ServiceConfig",
    "TLSSettings",
    "__version__",
    "current_deadline",
    "find_identity_error",
    "http_library",
    "policy",
]

#: The environment variable that picks the library behind the top-level names.
HTTP_LIBRARY_VARIABLE = "MESHLIB_HTTP_LIBRARY"
_FOLLOWING = frozenset({"AsyncClient", "Client"})


def http_library() -> str:
    """The HTTP library the top-level names use: ``MESHLIB_HTTP_LIBRARY`` (``httpx`` or ``httpx2``), else httpx.

    A bad value, or httpx2 asked for but not installed, is a :class:`ConfigError` naming the variable.
    """
    value = os.environ.get(HTTP_LIBRARY_VARIABLE, "").strip().lower() or "httpx"
    if value not in ("httpx", "httpx2"):
        raise ConfigError(HTTP_LIBRARY_VARIABLE, value, "httpx or httpx2")
    return value


def __getattr__(name: str) -> Any:
    if name in _FOLLOWING or name in ("httpx", "httpx2"):
        import importlib

        chosen = name if name in ("httpx", "httpx2") else http_library()
        try:
            module = importlib.import_module(f"meshlib.{chosen}")
        except ImportError as error:
            if chosen == "httpx2" and name != "httpx2":
                raise ConfigError(
                    HTTP_LIBRARY_VARIABLE,
                    chosen,
                    f"httpx, or install httpx2 first: pip install 'meshlib[httpx2]' ({error})",
                ) from None
            raise
        if name in ("httpx", "httpx2"):
            return module
        value = getattr(module, name)
        globals()[name] = value  # the choice is made once per process, on first use
        return value
    raise AttributeError(f"module 'meshlib' has no attribute {name!r}")
