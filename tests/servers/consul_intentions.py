"""The Consul emulator's intentions: ``service-intentions`` config entries, the match endpoint and authorize.

Follows Consul's documentation and ``agent/connect_auth.go``:

* ``GET /v1/connect/intentions/match?by=destination&name=<service>`` (blocking): ``{"<service>": [...]}``, the
  intentions that apply to the destination (its own and ``*``), highest ``Precedence`` first (9 exact source
  and destination ... 1 all wildcards, Consul's table), each with ``SourceName``, ``SourceNS``,
  ``SourcePartition``, ``DestinationName``, ``Action`` (``""`` for an L7 one), ``Permissions``, ``Precedence``;
  needs ``intentions:read`` (here: the token can read the service).
* ``GET /v1/config/service-intentions/<name>`` (blocking): the config entry, 404 when there is none.
* ``POST /v1/agent/connect/authorize`` (``Target``, ``ClientCertURI``, ``ClientCertSerial``): 400 for a URI that
  is not a Consul service identity, 403 without ``service:write`` on the target; first matching intention by
  precedence: an L4 one decides by its action, an L7 one denies ("Matched L7 intention"); no match: allowed when
  ACLs are disabled, else the ACL default policy.

Test controls on the emulator: ``set_intentions(destination, sources)`` (``sources``: config-entry ``Sources``
items), ``delete_intentions(destination)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.servers.consul import ConsulEmulator

_URI = re.compile(r"spiffe://[^/]+(?:/ap/([^/]+))?/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)")


def precedence(source_ns: str, source: str, destination_ns: str, destination: str) -> int:
    """Consul's intention precedence table (namespaces included)."""
    table = {
        (False, False, False, False): 9,
        (False, True, False, False): 8,
        (True, True, False, False): 7,
        (False, False, False, True): 6,
        (False, True, False, True): 5,
        (True, True, False, True): 4,
        (False, False, True, True): 3,
        (False, True, True, True): 2,
        (True, True, True, True): 1,
    }
    key = (source_ns == "*", source == "*", destination_ns == "*", destination == "*")
    return table.get(key, 0)


class IntentionStore:
    """``service-intentions`` config entries of one emulator (guarded by the emulator's condition)."""

    def __init__(self, emulator: ConsulEmulator) -> None:
        self.emulator = emulator
        self.entries: dict[str, dict[str, Any]] = {}

    def set(self, destination: str, sources: Iterable[Mapping[str, Any]]) -> None:
        emulator = self.emulator
        with emulator._cond:
            index = emulator._next_index()
            previous = self.entries.get(destination)
            self.entries[destination] = {
                "Kind": "service-intentions",
                "Name": destination,
                "Sources": [dict(source) for source in sources],
                "CreateIndex": previous["CreateIndex"] if previous else index,
                "ModifyIndex": index,
            }
            emulator._cond.notify_all()

    def delete(self, destination: str) -> None:
        emulator = self.emulator
        with emulator._cond:
            self.entries.pop(destination, None)
            emulator._next_index()
            emulator._cond.notify_all()

    def matches(self, destination: str) -> list[dict[str, Any]]:
        """The intentions that apply to ``destination``, highest precedence first (caller holds the lock)."""
        found = []
        for name, entry in self.entries.items():
            if name not in (destination, "*"):
                continue
            for source in entry["Sources"]:
                source_ns = source.get("Namespace") or "default"
                found.append(
                    {
                        "SourceName": source["Name"],
                        "SourceNS": source_ns,
                        "SourcePartition": source.get("Partition") or "default",
                        "SourcePeer": source.get("Peer", ""),
                        "SourceType": source.get("Type", "consul"),
                        "DestinationName": name,
                        "DestinationNS": "default",
                        "DestinationPartition": "default",
                        "Action": source.get("Action", ""),
                        "Permissions": source.get("Permissions") or None,
                        "Precedence": precedence(source_ns, source["Name"], "default", name),
                        "Description": source.get("Description", ""),
                        "CreateIndex": entry["CreateIndex"],
                        "ModifyIndex": entry["ModifyIndex"],
                    }
                )
        # Consul sorts by precedence, then by names for a stable order
        found.sort(key=lambda i: (-i["Precedence"], i["SourceNS"], i["SourceName"]))
        return found

    def authorize(self, body: Mapping[str, Any], secret: str | None) -> tuple[int, Any]:
        """Answer ``POST /v1/agent/connect/authorize`` (caller holds the lock)."""
        emulator = self.emulator
        target = body.get("Target")
        if not target:
            return 400, "Target service must be specified"
        match = _URI.fullmatch(str(body.get("ClientCertURI") or ""))
        if match is None:
            return 400, "ClientCertURI not a valid Connect identifier"
        partition, namespace, _, service = match.groups()
        token, denied = emulator._token(secret)
        if denied:
            return 403, denied
        if emulator.acl_enabled and (token is None or not token.can_write(str(target))):
            return 403, "Permission denied"
        for intention in self.matches(str(target)):
            if intention["SourceName"] not in ("*", service) or intention["SourceNS"] not in ("*", namespace):
                continue
            if intention["SourcePartition"] != (partition or "default") or intention["SourcePeer"]:
                continue
            label = f"{intention['SourceName']} => {intention['DestinationName']} (ID: , Precedence: " + str(
                intention["Precedence"]
            )
            if intention["Permissions"]:
                return 200, {"Authorized": False, "Reason": f"Matched L7 intention: {label})"}
            return 200, {"Authorized": intention["Action"] == "allow", "Reason": f"Matched L4 intention: {label})"}
        if not emulator.acl_enabled:
            return 200, {"Authorized": True, "Reason": "ACLs disabled, access is allowed by default"}
        return 200, {"Authorized": emulator.default_policy == "allow", "Reason": "Default behavior configured by ACLs"}
