"""The endpoints of an aggregate cluster (gRFC A37): each leaf cluster's in turn, its priorities after the
previous leaf's, so the balancer fails over from one leaf to the next as from one priority to the next.

The leaves' EDS assignments are pushed: :class:`AggregateResolver` listens to every EDS leaf and answers the
refresh loop as soon as any of them changes (``watch=True``: no polling, as :class:`EdsResolver` does), so a
primary that regains a healthy endpoint takes the traffic back at the next push. A ``LOGICAL_DNS`` leaf is
asked again each time, and at least as often as its DNS answer's TTL (bounded by :data:`DNS_INTERVAL`).

The first answer waits until every EDS leaf has answered (with endpoints, or known not to exist: the ADS
client's does-not-exist timer bounds the wait); a leaf that does not exist contributes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Final

from meshlib.control.xds.eds_resolver import DEFAULT_WAIT, EdsResolver, PushedResolver
from meshlib.discovery import build_resolver
from meshlib.discovery.base import Resolution
from meshlib.errors import DiscoveryError

if TYPE_CHECKING:
    from meshlib.control.xds.source import XdsSource
    from meshlib.discovery.base import Resolver

__all__ = ["AggregateResolver"]

#: How long an aggregate with a LOGICAL_DNS leaf waits at most between two DNS queries (seconds).
DNS_INTERVAL: Final = 30.0
#: ... and at least (a DNS TTL of 0 must not make the refresh loop spin).
DNS_MIN_INTERVAL: Final = 1.0


class AggregateResolver(PushedResolver):
    """The resolver of aggregate cluster ``cluster`` of ``source``, for meshlib service ``service``."""

    def __init__(self, source: XdsSource, service: str, cluster: str, *, wait: float = DEFAULT_WAIT) -> None:
        super().__init__(service, f"xDS aggregate cluster {cluster}", wait=wait)
        self._children: list[Resolver] = []
        self._dns: dict[int, Resolution | None] = {}
        for leaf in source._leaves(cluster):
            if leaf.kind == "EDS":
                self._children.append(
                    EdsResolver(
                        source._clusters[leaf.name].client,
                        service,
                        leaf.eds_service_name or leaf.name,
                        on_push=self._leaf_pushed,
                    )
                )
            else:
                self._dns[len(self._children)] = None
                self._children.append(
                    build_resolver(
                        service,
                        f"dns://{leaf.dns_host}:{leaf.dns_port}",
                        source._settings,
                        variable=f"xDS cluster {leaf.name}",
                    )
                )
        if self._dns:
            self._generation = 1  # the first answer need not wait for an EDS push: DNS is asked at once

    def _leaf_pushed(self) -> None:
        """A leaf's EDS changed: answer once every EDS leaf has answered (or is known not to exist), so the first
        answer is not the primary's alone while the secondary's is still on its way (gRPC waits for every leaf's
        resources too, and its does-not-exist timer bounds the wait)."""
        if all(child.answered for child in self._children if isinstance(child, EdsResolver)):
            self._pushed()

    def _wait_for(self) -> float:
        if not self._dns:
            return self._wait
        ttls = [answer.ttl for answer in self._dns.values() if answer is not None and answer.ttl is not None]
        return max(DNS_MIN_INTERVAL, min([self._wait, DNS_INTERVAL, *ttls]))

    def resolve(self) -> Resolution:
        answer = super().resolve()  # waits for a push (or the DNS interval)
        if not self._dns:
            return answer
        for index in self._dns:
            try:
                self._dns[index] = self._children[index].resolve()
            except DiscoveryError:
                self._dns[index] = None
        with self._changed:
            return self._combine()

    async def aresolve(self) -> Resolution:
        answer = await super().aresolve()
        if not self._dns:
            return answer
        for index in self._dns:
            try:
                self._dns[index] = await self._children[index].aresolve()
            except DiscoveryError:
                self._dns[index] = None
        with self._changed:
            return self._combine()

    def _answer_locked(self) -> Resolution:
        self._seen = self._generation
        return self._combine()

    def _combine(self) -> Resolution:
        endpoints = []
        offset = 0
        answered = False
        for index, child in enumerate(self._children):
            answer: Resolution | None
            if index in self._dns:
                answer = self._dns[index]
            else:
                try:
                    answer = child.current()  # type: ignore[attr-defined]
                except DiscoveryError:
                    answer = None
            if answer is None:
                continue
            answered = True
            top = 0
            for endpoint in answer.endpoints:
                endpoints.append(dataclasses.replace(endpoint, priority=endpoint.priority + offset))
                top = max(top, endpoint.priority + 1)
            offset += top
        if not answered and not self._closed:
            raise DiscoveryError("no leaf cluster answered yet", service=self.service, source=self.source)
        return Resolution(tuple(endpoints), ttl=None, watch=True)

    def _release(self) -> None:
        for child in self._children:
            child.close()
