"""The xDS config dump: what the ADS client holds, in the shape of CSDS (gRFC A40, ``envoy.service.status.v3``).

:func:`config_dump` renders one client as a ``ClientConfig`` in protobuf's JSON mapping: the node, and for every
resource a ``genericXdsConfigs`` entry with its type, name, version, ``clientStatus`` (REQUESTED, ACKED, NACKED,
DOES_NOT_EXIST), last update time, the accepted resource itself (``xdsConfig``, as the server sent it) and, for a
NACKED one, ``errorState`` (the error, when). This is what the admin endpoint serves at ``/config_dump`` and what
tools that read CSDS (``istioctl x describe``-style) understand; meshlib adds the stream's state under
``meshlib.connection``. Everything in it came from the control plane: readers print it escaped.
"""

from __future__ import annotations

import datetime
from typing import Any

from meshlib.control.xds.client import AdsClient, ResourceState

__all__ = ["config_dump"]


def _time(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _entry(state: ResourceState) -> dict[str, Any]:
    from google.protobuf import json_format  # type: ignore[import-untyped]

    entry: dict[str, Any] = {
        "typeUrl": state.type_url,
        "name": state.name,
        "versionInfo": state.version,
        "clientStatus": state.status,
    }
    updated = _time(state.updated_at)
    if updated is not None:
        entry["lastUpdated"] = updated
    if state.raw is not None:
        try:
            entry["xdsConfig"] = json_format.MessageToDict(state.raw)
        except Exception:  # a type this process has no descriptor for: name it rather than fail the dump
            entry["xdsConfig"] = {"@type": state.raw.type_url}
    if state.status == "NACKED":
        entry["errorState"] = {"details": state.error or "", "lastUpdateAttempt": updated}
    return entry


def config_dump(client: AdsClient, node: Any = None) -> dict[str, Any]:
    """``client``'s resources as a CSDS ``ClientConfig`` (JSON-ready); ``node``: the ``envoy.config.core.v3.Node``
    the client identifies itself with (default: the one it was built with)."""
    from google.protobuf import json_format

    connection = client.connection()
    config: dict[str, Any] = {
        "node": json_format.MessageToDict(node if node is not None else client.node),
        "genericXdsConfigs": [_entry(state) for state in client.resources()],
        "meshlib.connection": {
            "server": connection.server,
            "connected": connection.connected,
            "streams": connection.streams,
            "lastError": connection.last_error,
            "since": _time(connection.since),
        },
    }
    return {"config": [config]}
