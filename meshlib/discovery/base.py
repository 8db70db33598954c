"""Endpoints, discovery answers and the resolver protocol every discovery source implements.

A resolver turns one logical service into an immutable :class:`Resolution` (endpoints plus how long the
answer may be cached). Resolvers do I/O but hold no cache of their own: caching, background refresh and
"keep the last good set" live in :mod:`meshlib.discovery.directory`, once for every source.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable

_EMPTY_META: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True, eq=False)
class Endpoint:
    """One address of a service: where to connect, and how much traffic it should get.

    ``weight`` is relative (SRV weight, static ``;weight=N``, Consul ``Weights``); ``priority`` follows SRV
    (lower is preferred). Endpoints are values: two with the same fields are the same endpoint.
    """

    host: str
    port: int
    weight: int = 1
    priority: int = 0
    zone: str | None = None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: _EMPTY_META, compare=False, hash=False)
    _address: str = field(init=False, repr=False, compare=False, hash=False)
    _key: tuple[object, ...] = field(init=False, repr=False, compare=False, hash=False)
    _hash: int = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Computed once: the request path reads the address for every response (response.extensions) and
        # span, and discovery compares sets of thousands of endpoints on every refresh.
        object.__setattr__(self, "_address", f"{_url_host(self.host)}:{self.port}")
        key = (self.host, self.port, self.weight, self.priority, self.zone, self.tags)
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    # Equality and hash over the fields that define an endpoint (not ``meta``), from values computed once.
    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Endpoint:
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    @property
    def address(self) -> str:
        """``host:port``, with IPv6 literals bracketed, as used in URLs and logs."""
        return self._address

    @property
    def url_host(self) -> str:
        """The host as it goes into a URL (IPv6 literals bracketed)."""
        return _url_host(self.host)

    def __str__(self) -> str:
        return self.address


def _url_host(host: str) -> str:
    if ":" in host and not host.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return host
        return f"[{host}]"
    return host


@dataclass(frozen=True, slots=True)
class Resolution:
    """One answer from a discovery source.

    ``ttl`` is how long (seconds) the answer may be used before asking again, clamped by the cache to
    ``MESHLIB_DNS_TTL_MIN..MAX``; ``None`` means it never expires (static lists). ``watch=True`` marks a
    source whose ``resolve`` itself blocks until something changes (Consul blocking queries): it is called
    again at once, without clamping, and rate-limits itself.
    """

    endpoints: tuple[Endpoint, ...]
    ttl: float | None
    watch: bool = False


@runtime_checkable
class Resolver(Protocol):
    """A discovery source for one service, keyed by URI scheme (``static``, ``dns``, ``dns+srv``, ...).

    ``source`` is a printable description (the target URI, without secrets) used in errors and logs.
    Both methods raise :class:`meshlib.DiscoveryError` (or a subclass) when the source cannot answer;
    an answer with no endpoints is returned, not raised, so the directory can decide what it means.
    """

    source: str

    def resolve(self) -> Resolution:
        """Ask the source synchronously (called from a background thread or the first request)."""
        ...

    async def aresolve(self) -> Resolution:
        """Ask the source from an event loop without blocking it."""
        ...

    def close(self) -> None:
        """Release anything the resolver holds (sockets, HTTP clients). Idempotent."""
        ...


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """Settings a resolver factory may need, already validated by :mod:`meshlib._config`.

    ``dns_servers`` is ``None`` for the system resolver (``/etc/resolv.conf``), else ``(ip, port)`` pairs.
    """

    dns_servers: tuple[tuple[str, int], ...] | None = None
    dns_timeout: float = 2.0
    #: The environment the client was built from, for sources that read their own variables (``CONSUL_*``);
    #: ``None`` means ``os.environ``. Kept out of the repr and comparisons: it may hold secrets.
    environ: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
