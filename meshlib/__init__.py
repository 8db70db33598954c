"""meshlib: a sidecarless service mesh for Python.

``meshlib.Client()`` / ``meshlib.AsyncClient()`` are httpx clients that discover the endpoints of logical
services (``http://payments/charge``), balance across them and send in-process: what a sidecar does for
outbound calls, without the sidecar. This module is the public face; ``__all__`` is the contract.
"""

from __future__ import annotations

from meshlib.client import AsyncClient, Client
from meshlib.config import MeshConfig, ServiceConfig
from meshlib.discovery.base import Endpoint
from meshlib.errors import ConfigError, DiscoveryError, MeshError, NoEndpointsError

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ConfigError",
    "DiscoveryError",
    "Endpoint",
    "MeshConfig",
    "MeshError",
    "NoEndpointsError",
    "ServiceConfig",
    "__version__",
]
