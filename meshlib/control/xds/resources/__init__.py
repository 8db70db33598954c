"""xDS resources validated as gRPC's proxyless client validates them, and compiled into meshlib's own models.

Pure functions, no I/O: :func:`validate_listener` (LDS), :func:`validate_route_configuration` and
:func:`to_route_table` (RDS). A resource they refuse raises :class:`XdsResourceError`, whose text is the NACK's
``error_detail``. docs/xds.md lists the fields honoured, ignored and refused.
"""

from meshlib.control.xds.resources.errors import XdsResourceError
from meshlib.control.xds.resources.lds import HttpFilter, ListenerUpdate, validate_listener
from meshlib.control.xds.resources.rds import (
    CLUSTER_PREFIX,
    NoVirtualHostError,
    RouteConfigUpdate,
    cluster_service,
    find_virtual_host,
    to_route_table,
    validate_route_configuration,
)

__all__ = [
    "CLUSTER_PREFIX",
    "HttpFilter",
    "ListenerUpdate",
    "NoVirtualHostError",
    "RouteConfigUpdate",
    "XdsResourceError",
    "cluster_service",
    "find_virtual_host",
    "to_route_table",
    "validate_listener",
    "validate_route_configuration",
]
