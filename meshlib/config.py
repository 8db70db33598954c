"""Compatibility module: the mesh settings now live in :mod:`meshlib._config` (``parse``, ``model``, ``env``).

Every name this module defined before the split is re-exported from there, unchanged, so
``from meshlib.config import MeshConfig, ServiceConfig, service_key, SERVICE_SETTINGS, ...`` keeps working.
"""

from meshlib._config import (
    ENV_PREFIX,
    INNER_TRANSPORTS,
    KNOWN,
    LB_NAMES,
    SERVICE_PREFIX,
    SERVICE_SETTING_SEPARATOR,
    SERVICE_SETTINGS,
    MeshConfig,
    ResilienceSettings,
    ServiceConfig,
    logger,
    parse_admin_addr,
    parse_duration,
    parse_inner_transport,
    parse_port,
    service_key,
)

__all__ = [
    "ENV_PREFIX",
    "INNER_TRANSPORTS",
    "KNOWN",
    "LB_NAMES",
    "SERVICE_PREFIX",
    "SERVICE_SETTINGS",
    "SERVICE_SETTING_SEPARATOR",
    "MeshConfig",
    "ResilienceSettings",
    "ServiceConfig",
    "logger",
    "parse_admin_addr",
    "parse_duration",
    "parse_inner_transport",
    "parse_port",
    "service_key",
]
