"""A discovery source whose endpoint set the test changes: ``test-members://<name>``, re-read every 50 ms.

Stands in for a Consul check going critical or a Kubernetes endpoint leaving: the set changes under a live
client. The ``members`` fixture (tests/conftest.py) gives each test its own; ``MESHLIB_DNS_TTL_MIN=50ms`` lets the
client pick up a change within one refresh, and the ``log_event`` fixture waits for it to be applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshlib.discovery import DiscoverySettings, Target, register_scheme
from meshlib.discovery.base import Endpoint, Resolution
from meshlib.testing import Backend


@dataclass
class Members:
    """The endpoint set ``test-members://<name>`` answers now."""

    source: str
    endpoints: tuple[Endpoint, ...] = ()

    def set(self, backends: Iterable[Backend], zone: str | None = None) -> None:
        """Answer ``backends`` (each in ``zone``) from the next refresh on."""
        self.endpoints = tuple(Endpoint(b.host, b.port, zone=zone) for b in backends)

    def set_zones(self, zones: dict[str, list[Backend]]) -> None:
        """Answer every backend of ``zones`` (zone name -> backends) from the next refresh on."""
        self.endpoints = tuple(Endpoint(b.host, b.port, zone=zone) for zone, group in zones.items() for b in group)

    def resolve(self) -> Resolution:
        return Resolution(endpoints=self.endpoints, ttl=0.05)

    async def aresolve(self) -> Resolution:
        return self.resolve()

    def close(self) -> None:
        pass


MEMBERS: dict[str, Members] = {}


def _members(target: Target, settings: DiscoverySettings) -> Members:
    return MEMBERS[target.rest]


register_scheme("test-members", _members, form="test-members://<name> (tests)", replace=True)
