"""``static://`` -- a fixed endpoint list written in the target itself.

Form: ``static://host:port[;weight=N][;zone=Z][,host:port[;...]...]``. IPv6 literals go in brackets
(``static://[::1]:8080``), as in URLs. Hosts may be names; they are then resolved by the connection, not by
meshlib. ``weight`` (default 1) is relative, 1..65535 like SRV and Consul weights; ``zone`` sets
``Endpoint.zone``, which only zone-aware routing reads (:mod:`meshlib.balance.locality`, on when the client's
``MESHLIB_ZONE`` is set); otherwise it is shown, not used. Entries keep their written order and may not repeat.

The answer never changes, so it is built once, at client construction, and has ``ttl=None``: the
directory never asks again.

The ``host:port`` parser here (:func:`parse_host_port`) is shared with ``dns://``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution

if TYPE_CHECKING:
    from meshlib.discovery import Target

__all__ = ["FORM", "MAX_WEIGHT", "StaticResolver", "check_host", "from_target", "parse_host_port", "parse_static"]

FORM = "static://host:port[;weight=N][;zone=Z][,host:port...]"

#: Largest accepted ``weight``: the SRV and Consul ``Weights`` range, so weights mean the same everywhere.
MAX_WEIGHT = 65535

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DIGITS = re.compile(r"[0-9]+")
_ZONE = re.compile(r"[A-Za-z0-9_.:-]+")


class StaticResolver:
    """A :class:`~meshlib.discovery.base.Resolver` that always answers the same endpoints.

    ``resolve`` and ``aresolve`` return the same immutable :class:`Resolution` object every time.
    """

    def __init__(self, endpoints: Iterable[Endpoint], *, source: str) -> None:
        self.source = source
        self._resolution = Resolution(endpoints=tuple(endpoints), ttl=None)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The configured endpoints, in written order."""
        return self._resolution.endpoints

    def resolve(self) -> Resolution:
        """The configured endpoints, ``ttl=None`` (never expires)."""
        return self._resolution

    async def aresolve(self) -> Resolution:
        """Same as :meth:`resolve`; no I/O."""
        return self._resolution

    def close(self) -> None:
        """Nothing to release."""

    def __repr__(self) -> str:
        return f"StaticResolver({self.source!r})"


def from_target(target: Target, settings: DiscoverySettings) -> StaticResolver:
    """Factory registered for ``static://``: parse the list now, raising ``ConfigError`` on any bad entry."""
    return StaticResolver(parse_static(target), source=target.uri)


def parse_static(target: Target) -> tuple[Endpoint, ...]:
    """The endpoints of a ``static://`` target (``target.rest`` is the comma-separated list)."""
    if not target.rest.strip():
        raise target.invalid("at least one host:port after static://")
    endpoints: list[Endpoint] = []
    seen: set[tuple[str, int]] = set()
    for raw_entry in target.rest.split(","):
        entry = raw_entry.strip()
        if not entry:
            raise target.invalid("host:port entries separated by single commas, with no empty entry")
        address, *params = (part.strip() for part in entry.split(";"))
        host, port = parse_host_port(target, address)
        weight = 1
        zone: str | None = None
        for param in params:
            key, sep, value = param.partition("=")
            key = key.strip().lower()
            value = value.strip()
            if key == "weight" and sep:
                if not _is_int_in(value, 1, MAX_WEIGHT):
                    raise target.invalid(
                        f"weight=N with N an integer from 1 to {MAX_WEIGHT} in entry {entry!r}, got {value!r}"
                    )
                weight = int(value)
            elif key == "zone" and sep:
                if not _ZONE.fullmatch(value):
                    raise target.invalid(f"zone=Z with a non-empty zone name in entry {entry!r}, got {value!r}")
                zone = value
            else:
                raise target.invalid(f"';weight=N' or ';zone=Z' after host:port in entry {entry!r}, got {param!r}")
        if (host, port) in seen:
            raise target.invalid(f"each host:port listed once, but {address!r} repeats")
        seen.add((host, port))
        endpoints.append(Endpoint(host=host, port=port, weight=weight, zone=zone))
    return tuple(endpoints)


def parse_host_port(target: Target, text: str) -> tuple[str, int]:
    """``host:port`` -> ``(host, port)``; IPv6 literals bracketed in, returned without brackets.

    The host must be an IPv4 address, a bracketed IPv6 address or a DNS name; the port an integer in
    1..65535. Raises ``target.invalid(...)`` saying which part is wrong.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise target.invalid(f"an IPv6 literal closed by ']' as in [::1]:8080, got {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        try:
            scope = ipaddress.IPv6Address(host).scope_id
        except ValueError:
            raise target.invalid(f"a valid IPv6 address inside [...], got {host!r}") from None
        if scope is not None:
            # A %zone would need URL-escaping as %25 (RFC 6874), which HTTP stacks handle unevenly.
            raise target.invalid(f"an IPv6 address without a %zone inside [...], got {host!r}")
        if not rest.startswith(":"):
            raise target.invalid(f"[ipv6]:port with a port after the ']', got {text!r}")
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise target.invalid(f"IPv6 literals in brackets, as in [::1]:8080, got {text!r}")
        host, sep, port_text = text.partition(":")
        if not sep:
            raise target.invalid(f"host:port with an explicit port, got {text!r}")
        check_host(target, host, text)
    return host, _parse_port(target, port_text, text)


def _is_int_in(text: str, low: int, high: int) -> bool:
    # Length first: int() of thousands of digits is slow (and refused past 4300 digits).
    return len(text) <= 10 and _DIGITS.fullmatch(text) is not None and low <= int(text) <= high


def check_host(target: Target, host: str, text: str) -> None:
    """Raise ``target.invalid(...)`` unless ``host`` is an IPv4 address or a DNS name (``text``: for the message)."""
    if not host:
        raise target.invalid(f"a host before ':port', got {text!r}")
    if all(c.isdigit() or c == "." for c in host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise target.invalid(f"a valid IPv4 address, got {host!r}") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise target.invalid(
            f"a host name of dot-separated labels (letters, digits, '-', '_'; 1-63 characters each), got {host!r}"
        )


def _parse_port(target: Target, port_text: str, text: str) -> int:
    if not _is_int_in(port_text, 1, 65535):
        raise target.invalid(f"a port from 1 to 65535 in {text!r}, got {port_text!r}")
    return int(port_text)
