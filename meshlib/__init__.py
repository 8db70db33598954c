"""meshlib: a sidecarless service mesh for Python.

``meshlib.Client()`` / ``meshlib.AsyncClient()`` are httpx clients that discover the endpoints of logical
services (``http://payments/charge``), balance across them, apply deadlines, retries within a budget,
circuit breakers and outlier ejection, and send in-process: what a sidecar does for outbound calls,
without the sidecar. This module is the public face; ``__all__`` is the contract.
"""

from __future__ import annotations

from meshlib.client import AsyncClient, Client
from meshlib.config import MeshConfig, ResilienceSettings, ServiceConfig
from meshlib.discovery.base import Endpoint
from meshlib.errors import (
    CircuitOpenError,
    ConfigError,
    ConsulACLError,
    DeadlineExceeded,
    DiscoveryError,
    MeshError,
    NoEndpointsError,
    OverloadedError,
)
from meshlib.policy import Policy, current_deadline, policy
from meshlib.security import IdentityError, TLSSettings, find_identity_error
from meshlib.status import MeshStatus

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "CircuitOpenError",
    "Client",
    "ConfigError",
    "ConsulACLError",
    "DeadlineExceeded",
    "DiscoveryError",
    "Endpoint",
    "IdentityError",
    "MeshConfig",
    "MeshError",
    "MeshStatus",
    "NoEndpointsError",
    "OverloadedError",
    "Policy",
    "ResilienceSettings",
    "ServiceConfig",
    "TLSSettings",
    "__version__",
    "current_deadline",
    "find_identity_error",
    "policy",
]
