"""One mesh service inside one client: discovery cache, balancer, per-endpoint stats and transports.

A :class:`Service` turns each new discovery :class:`~meshlib.discovery.cache.Snapshot` into an immutable
:class:`Active` view (endpoint stats, inner transports, one picker per SRV priority level) and swaps it in
with a single attribute assignment, so the request path reads ``service.active`` without a lock (grpc-go's
picker-per-state model). Stats and transports of endpoints that stay are carried over, so latency history
and pooled connections survive refreshes; transports of endpoints that leave are closed once their last
in-flight request is done.

The class is generic over the transport type so ``Client`` (``httpx.BaseTransport``) and ``AsyncClient``
(``httpx.AsyncBaseTransport``) share every decision; only creating and closing transports differs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Generic, TypeVar

from meshlib.balance import make_balancer
from meshlib.balance.base import Balancer, BalancerOptions, EndpointStats, Picker
from meshlib.config import MeshConfig, ServiceConfig
from meshlib.discovery.base import Endpoint, Resolver
from meshlib.discovery.cache import DiscoveryCache, Snapshot
from meshlib.errors import NoEndpointsError

logger = logging.getLogger("meshlib.discovery")

T = TypeVar("T")

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Active(Generic[T]):
    """What the request path reads: built on the slow path, never mutated afterwards."""

    snapshot: Snapshot
    stats: dict[Address, EndpointStats]
    transports: dict[Address, T]
    #: One picker per SRV priority level, lowest (most preferred) first.
    pickers: tuple[Picker, ...]

    def pick(self, key: bytes | None, exclude: Container[Endpoint]) -> EndpointStats | None:
        """Pick from the most preferred priority level that still has a usable endpoint (RFC 2782)."""
        for picker in self.pickers:
            chosen = picker.pick(key=key, exclude=exclude)
            if chosen is not None:
                return chosen
        return None


class Service(Generic[T]):
    """A logical service as one client sees it."""

    def __init__(
        self,
        config: ServiceConfig,
        mesh: MeshConfig,
        resolver: Resolver,
        new_transport: Callable[[Endpoint], T],
    ) -> None:
        self.name = config.name
        self.config = config
        self.resolver = resolver
        self.hash_header = config.hash_header or mesh.hash_header
        self.lb_name = config.lb or mesh.lb
        self.balancer: Balancer = make_balancer(
            self.lb_name, BalancerOptions(default_rtt=mesh.default_rtt, decay=mesh.ewma_decay)
        )
        self._mesh = mesh
        self.cache = DiscoveryCache(
            config.name, resolver.source, ttl_min=mesh.ttl_min, ttl_max=mesh.ttl_max, max_stale=mesh.max_stale
        )
        self._new_transport = new_transport
        self.active: Active[T] | None = None
        #: Transports of endpoints that left while requests were still using them: closed when those end.
        self.retiring: dict[Address, tuple[EndpointStats, T]] = {}
        self._update_lock = threading.Lock()

    def current(self) -> Active[T]:
        """The active view, or :class:`NoEndpointsError` if discovery has nothing usable (or too stale)."""
        active = self.active
        if active is None or self.cache.consecutive_failures:
            self.cache.usable()  # raises when there is nothing, or only a too-stale set
            if active is None:
                raise NoEndpointsError(self.name, self.resolver.source, "endpoints not applied yet")
        return active

    def apply(self, snapshot: Snapshot) -> list[T]:
        """Build and swap in the view for ``snapshot``; returns transports to close now (nothing in flight)."""
        with self._update_lock:
            old = self.active
            stats: dict[Address, EndpointStats] = {}
            transports: dict[Address, T] = {}
            for endpoint in snapshot.endpoints:
                address = (endpoint.host, endpoint.port)
                if address in stats:
                    continue  # the same address listed twice: keep the first
                if old is not None and address in old.stats:
                    existing = old.stats[address]
                    existing.endpoint = endpoint  # weight or metadata may have changed; history stays
                    stats[address] = existing
                    transports[address] = old.transports[address]
                elif address in self.retiring:  # came back before its old requests finished
                    existing, transport = self.retiring.pop(address)
                    existing.endpoint = endpoint
                    stats[address] = existing
                    transports[address] = transport
                else:
                    stats[address] = EndpointStats(
                        endpoint, default_rtt=self._mesh.default_rtt, decay=self._mesh.ewma_decay
                    )
                    transports[address] = self._new_transport(endpoint)
            levels: dict[int, list[EndpointStats]] = {}
            for s in stats.values():
                levels.setdefault(s.endpoint.priority, []).append(s)
            pickers = tuple(self.balancer.build(levels[p]) for p in sorted(levels))
            self.active = Active(snapshot=snapshot, stats=stats, transports=transports, pickers=pickers)
            _log_change(self.name, old.stats if old else {}, stats)
            to_close: list[T] = []
            if old is not None:
                for address, s in old.stats.items():
                    if address in stats:
                        continue
                    if s.inflight > 0:
                        self.retiring[address] = (s, old.transports[address])
                    else:
                        to_close.append(old.transports[address])
            return to_close

    def release(self, stats: EndpointStats) -> T | None:
        """After a request on a retiring endpoint ends: its transport, if it is now idle and should close."""
        address = (stats.endpoint.host, stats.endpoint.port)
        with self._update_lock:
            entry = self.retiring.get(address)
            if entry is None or entry[0] is not stats or stats.inflight > 0:
                return None
            del self.retiring[address]
            return entry[1]

    def all_transports(self) -> list[T]:
        """Every transport this service owns (active and retiring), for closing the client."""
        with self._update_lock:
            found = list(self.active.transports.values()) if self.active else []
            found.extend(t for _, t in self.retiring.values())
            self.retiring.clear()
            self.active = None
            return found


def _log_change(service: str, old: dict[Address, EndpointStats], new: dict[Address, EndpointStats]) -> None:
    """One INFO line per endpoint-set change, after the new set serves traffic."""
    if old.keys() == new.keys():
        return
    added = sorted(new[a].endpoint.address for a in new.keys() - old.keys())
    removed = sorted(old[a].endpoint.address for a in old.keys() - new.keys())
    logger.info(
        "endpoints of service %s changed: %d now; added %s; removed %s",
        service,
        len(new),
        ", ".join(added) or "none",
        ", ".join(removed) or "none",
    )
