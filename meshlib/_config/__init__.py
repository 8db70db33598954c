"""Mesh settings, split by job: :mod:`.parse` (value parsers), :mod:`.model` (the settings classes and their
per-service lookups) and :mod:`.env` (``MESHLIB_*`` variables read into them).

Private: the public names are re-exported by :mod:`meshlib.config` (and the main ones by :mod:`meshlib`).
"""

from meshlib._config.env import (
    ENV_PREFIX,
    KNOWN,
    SERVICE_PREFIX,
    SERVICE_SETTING_SEPARATOR,
    SERVICE_SETTINGS,
    logger,
    mesh_config_from_env,
)
from meshlib._config.model import MeshConfig, ResilienceSettings, ServiceConfig, service_key
from meshlib._config.parse import (
    INNER_TRANSPORTS,
    LB_NAMES,
    parse_admin_addr,
    parse_duration,
    parse_inner_transport,
    parse_port,
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
    "mesh_config_from_env",
    "parse_admin_addr",
    "parse_duration",
    "parse_inner_transport",
    "parse_port",
    "service_key",
]
