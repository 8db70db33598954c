"""``dns://`` (A/AAAA) and ``dns+srv://`` (SRV) discovery, with dnspython.

``dns://name:port``
    Every A and AAAA record of ``name`` is an endpoint on ``port``, weight 1. Both types are asked; either
    may be empty. The name not existing (NXDOMAIN) is an error; a name with no address records is an empty
    answer (the directory decides what empty means).

``dns+srv://name``
    The SRV records of ``name`` give each endpoint's port, weight and priority (RFC 2782); their targets are
    turned into addresses from the answer's additional section when the server put them there (Consul and
    dnsmasq do), else by asking A and AAAA. Any name works, not only ``_service._proto.domain``, which is
    what Consul's DNS interface needs:

    * ``dns+srv://primary.payments.service.consul`` -- ``[<tag>.]<service>.service[.<dc>].consul``
    * ``dns+srv://_payments._primary.service.consul`` -- RFC 2782 form, the tag in the protocol slot

    Point ``MESHLIB_DNS_SERVERS`` at the Consul agent (``127.0.0.1:8600``). Consul's default DNS TTL is 0,
    which the directory clamps to its minimum.

Weights: SRV weight 0 means "no preference" when every record of a priority has it, and "a very small
chance" when others have a weight (RFC 2782). Within one priority: if all weights are 0 each endpoint gets
weight 1; if 0 is mixed with non-zero weights, the non-zero weights are multiplied by
:data:`ZERO_WEIGHT_SCALE` and 0 becomes 1, so ratios between the non-zero records are kept and a weight-0
record gets 1% of what a weight-1 record gets. An SRV target with several addresses gives each address the
record's full weight. The original SRV weight and target are kept in ``Endpoint.meta``
(``srv_weight``, ``srv_target``). Every priority is returned; the directory uses the lowest one present.

TTL: the smallest TTL among the records used (SRV, address records, CNAMEs on the way); when no record
was found, the negative-caching TTL of the replies (dnspython uses 300 s when the server sends no SOA).

Timeouts: each query (one name, one type, all nameservers included) may take ``settings.dns_timeout``; the
per-try timeout is at most half of it so a lost UDP packet or a dead first server leaves time for a second
try. A failure stops the resolve at once, so a dead server costs one timeout, not one per query.

Nothing is cached here (dnspython resolvers have no cache unless given one); the directory caches each
:class:`Resolution` for its TTL. Relative names use the system resolver's search list like
``getaddrinfo`` would; with explicit ``dns_servers`` there is no search list, and a name ending in ``.`` is
never searched.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import sniffio

from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution
from meshlib.discovery.static import check_host, parse_host_port
from meshlib.errors import DiscoveryError

if TYPE_CHECKING:
    from meshlib.discovery import Target

__all__ = ["FORM", "SRV_FORM", "ZERO_WEIGHT_SCALE", "DnsResolver", "SrvResolver", "from_target", "srv_from_target"]

logger = logging.getLogger("meshlib.discovery")

FORM = "dns://name:port"
SRV_FORM = "dns+srv://name, e.g. dns+srv://_http._tcp.users.internal or dns+srv://web.payments.service.consul"

#: Factor applied to non-zero SRV weights in a priority that also has weight-0 records (see module docs).
ZERO_WEIGHT_SCALE = 100

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


# --- target parsing (at client construction) -----------------------------------------------------------------


def from_target(target: Target, settings: DiscoverySettings) -> DnsResolver:
    """Factory registered for ``dns://``: ``dns://name:port``."""
    _reject_path(target)
    host, port = parse_host_port(target, target.rest)
    if _is_ip(host):
        raise target.invalid(f"a DNS name, not the IP address {host!r} (use static:// for fixed addresses)")
    return DnsResolver(target.service, host, port, settings, source=target.uri)


def srv_from_target(target: Target, settings: DiscoverySettings) -> SrvResolver:
    """Factory registered for ``dns+srv://``: ``dns+srv://name``, no port (SRV records carry the ports)."""
    _reject_path(target)
    name = target.rest.strip()
    if not name:
        raise target.invalid("a DNS name to ask SRV records of")
    if ":" in name:
        raise target.invalid(f"a DNS name without ':port' (SRV records carry the ports), got {name!r}")
    check_host(target, name, name)
    if _is_ip(name):
        raise target.invalid(f"a DNS name, not the IP address {name!r}")
    return SrvResolver(target.service, name, settings, source=target.uri)


def _reject_path(target: Target) -> None:
    for char in "/?#@":
        if char in target.rest:
            raise target.invalid(
                f"nothing but the name{' and port' if target.scheme == 'dns' else ''} after "
                f"{target.scheme}:// (no {char!r}; DNS servers are set with MESHLIB_DNS_SERVERS)"
            )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- one query and its reply, independent of sync/async ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Query:
    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType


@dataclass(frozen=True, slots=True)
class _Reply:
    """What a query found. ``rrset`` is ``None`` when the name has no record of the type (or no name)."""

    rrset: dns.rrset.RRset | None
    ttl: float
    nxdomain: dns.resolver.NXDOMAIN | None = None
    additional: tuple[dns.rrset.RRset, ...] = ()

    @classmethod
    def of(cls, answer: dns.resolver.Answer) -> _Reply:
        rrset = answer.rrset if answer.rrset else None
        # chaining_result.minimum_ttl: smallest of the answer and any CNAME on the way, or the negative TTL.
        return cls(rrset, float(answer.chaining_result.minimum_ttl), additional=tuple(answer.response.additional))

    def addresses(self) -> tuple[str, ...]:
        return tuple(str(rdata.address) for rdata in _rdatas(self.rrset))


#: A resolve written once as a generator: it yields the queries it needs and receives their replies, and its
#: return value is the answer. :meth:`_DnsBase.resolve` and :meth:`_DnsBase.aresolve` drive it with
#: blocking and async dnspython respectively, so the sync and async paths share every decision.
_Plan = Generator[_Query, _Reply, Resolution]

_R = TypeVar("_R", dns.resolver.Resolver, dns.asyncresolver.Resolver)


def _rdatas(rrset: dns.rrset.RRset | None) -> Iterable[Any]:
    return () if rrset is None else rrset


def _min_ttl(replies: Iterable[_Reply]) -> float:
    """Smallest TTL of the replies that had records; if none had, smallest negative TTL."""
    found = [reply.ttl for reply in replies if reply.rrset is not None]
    if found:
        return min(found)
    negative = [reply.ttl for reply in replies if reply.nxdomain is None]
    return min(negative) if negative else 0.0


# --- the resolvers -------------------------------------------------------------------------------------------


class _DnsBase:
    """Shared machinery: dnspython configuration, the sync/async drivers, and error translation."""

    def __init__(self, service: str, qname: str, settings: DiscoverySettings, *, source: str) -> None:
        self.service = service
        self.source = source
        self._qname = dns.name.from_text(qname, origin=None)
        self._timeout = settings.dns_timeout
        self._setup_error: dns.exception.DNSException | None = None
        self._sync: dns.resolver.Resolver | None = None
        self._async: dns.asyncresolver.Resolver | None = None
        try:
            self._sync = _configure(dns.resolver.Resolver(configure=settings.dns_servers is None), settings)
            self._async = _configure(dns.asyncresolver.Resolver(configure=settings.dns_servers is None), settings)
        except dns.exception.DNSException as exc:
            # No /etc/resolv.conf (or no nameserver in it): report it on every resolve, where the directory
            # handles discovery failures, instead of failing client construction.
            self._setup_error = exc

    def _plan(self) -> _Plan:
        raise NotImplementedError

    def resolve(self) -> Resolution:
        """Ask the DNS servers now (blocking), following the plan of this resolver."""
        resolver = self._ready(self._sync)
        plan = self._plan()
        try:
            query = next(plan)
            while True:
                query = plan.send(self._ask(resolver, query))
        except StopIteration as done:
            resolution: Resolution = done.value
            return resolution
        finally:
            plan.close()

    async def aresolve(self) -> Resolution:
        """Same as :meth:`resolve`, with dnspython's async resolver (asyncio or trio)."""
        resolver = self._ready(self._async)
        plan = self._plan()
        try:
            query = next(plan)
            while True:
                query = plan.send(await self._aask(resolver, query))
        except StopIteration as done:
            resolution: Resolution = done.value
            return resolution
        finally:
            plan.close()

    def close(self) -> None:
        """Nothing to release: dnspython opens a socket per query and closes it."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    def _ready(self, resolver: _R | None) -> _R:
        if resolver is None:
            raise DiscoveryError(
                f"no DNS server configured: {self._setup_error} (set MESHLIB_DNS_SERVERS or fix /etc/resolv.conf)",
                service=self.service,
                source=self.source,
            ) from self._setup_error
        return resolver

    def _ask(self, resolver: dns.resolver.Resolver, query: _Query) -> _Reply:
        try:
            answer = resolver.resolve(
                query.name, query.rdtype, search=not query.name.is_absolute(), raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return _Reply(None, 0.0, nxdomain=exc)
        except (dns.exception.DNSException, OSError) as exc:
            raise self._failure(resolver, query, exc) from exc
        return _Reply.of(answer)

    async def _aask(self, resolver: dns.asyncresolver.Resolver, query: _Query) -> _Reply:
        try:
            answer = await resolver.resolve(
                query.name,
                query.rdtype,
                search=not query.name.is_absolute(),
                raise_on_no_answer=False,
                backend=_async_backend(),
            )
        except dns.resolver.NXDOMAIN as exc:
            return _Reply(None, 0.0, nxdomain=exc)
        except (dns.exception.DNSException, OSError) as exc:
            raise self._failure(resolver, query, exc) from exc
        return _Reply.of(answer)

    def _failure(self, resolver: dns.resolver.BaseResolver, query: _Query, exc: BaseException) -> DiscoveryError:
        what = f"DNS {dns.rdatatype.to_text(query.rdtype)} query for {query.name.to_text(omit_final_dot=True)}"
        servers = _describe_servers(resolver)
        if isinstance(exc, dns.exception.Timeout):
            message = f"{what} timed out after {self._timeout:g}s (servers: {servers}): {exc}"
        elif isinstance(exc, dns.resolver.NoNameservers):
            message = f"{what} failed: no DNS server gave a usable answer (servers: {servers}): {exc}"
        else:
            message = f"{what} failed (servers: {servers}): {type(exc).__name__}: {exc}"
        return DiscoveryError(message, service=self.service, source=self.source)

    def _not_found(self, name: dns.name.Name) -> DiscoveryError:
        return DiscoveryError(
            f"DNS name {name.to_text(omit_final_dot=True)} does not exist (NXDOMAIN)",
            service=self.service,
            source=self.source,
        )

    def _lookup_addresses(self, name: dns.name.Name) -> Generator[_Query, _Reply, list[_Reply]]:
        """Ask A then AAAA for ``name``: the two replies."""
        a = yield _Query(name, dns.rdatatype.A)
        aaaa = yield _Query(name, dns.rdatatype.AAAA)
        return [a, aaaa]


class DnsResolver(_DnsBase):
    """``dns://name:port``: one endpoint per A/AAAA record, sorted, weight 1."""

    def __init__(self, service: str, name: str, port: int, settings: DiscoverySettings, *, source: str) -> None:
        super().__init__(service, name, settings, source=source)
        self.port = port

    def _plan(self) -> _Plan:
        replies = yield from self._lookup_addresses(self._qname)
        if all(reply.nxdomain for reply in replies):
            raise self._not_found(self._qname) from replies[0].nxdomain
        hosts = sorted({address for reply in replies for address in reply.addresses()}, key=_address_key)
        return Resolution(tuple(Endpoint(host, self.port) for host in hosts), _min_ttl(replies))


class SrvResolver(_DnsBase):
    """``dns+srv://name``: one endpoint per address of each SRV target, with the record's port/weight/priority."""

    def __init__(self, service: str, name: str, settings: DiscoverySettings, *, source: str) -> None:
        super().__init__(service, name, settings, source=source)

    def _plan(self) -> _Plan:
        srv = yield _Query(self._qname, dns.rdatatype.SRV)
        if srv.nxdomain:
            raise self._not_found(self._qname) from srv.nxdomain
        # A target of "." means "decidedly not available at this domain" (RFC 2782); port 0 is no port to
        # connect to (static and Consul discovery refuse it too).
        records = sorted(
            (rdata for rdata in _rdatas(srv.rrset) if rdata.target != dns.name.root and rdata.port != 0),
            key=lambda r: (r.priority, r.target, r.port),
        )
        if not records:
            return Resolution((), srv.ttl)
        replies = [srv]
        addresses: dict[dns.name.Name, tuple[str, ...]] = {}
        for record in records:
            target: dns.name.Name = record.target
            if target in addresses:
                continue
            extra = [
                rrset
                for rrset in srv.additional
                if rrset.name == target and rrset.rdtype in _ADDRESS_TYPES and rrset.rdclass == dns.rdataclass.IN
            ]
            if extra:
                found = [_Reply(rrset, float(rrset.ttl)) for rrset in extra]
            else:
                found = yield from self._lookup_addresses(target)
            replies.extend(found)
            addresses[target] = tuple(sorted({a for reply in found for a in reply.addresses()}, key=_address_key))
            if not addresses[target]:
                logger.warning(
                    "SRV target %s of %s (service %s) has no A/AAAA record; skipped",
                    target.to_text(omit_final_dot=True),
                    self.source,
                    self.service,
                )
        weights = _effective_weights(records)
        endpoints: dict[tuple[str, int], Endpoint] = {}
        for record, weight in zip(records, weights, strict=True):
            meta = MappingProxyType(
                {"srv_target": record.target.to_text(omit_final_dot=True), "srv_weight": str(record.weight)}
            )
            for host in addresses[record.target]:
                # Records are sorted by priority: a host:port listed twice keeps its most preferred record.
                endpoints.setdefault(
                    (host, record.port),
                    Endpoint(host, record.port, weight=weight, priority=record.priority, meta=meta),
                )
        ordered = sorted(endpoints.values(), key=lambda e: (e.priority, _address_key(e.host), e.port))
        return Resolution(tuple(ordered), _min_ttl(replies))


def _async_backend() -> Any:  # dns.asyncbackend.Backend (not re-exported for type checkers)
    """dnspython's backend for the running library, asked on each query.

    Not dnspython's default: it sniffs the library once per process and keeps it, so a process that ran
    asyncio and then trio (or the other way) would query with the wrong one.
    """
    return dns.asyncbackend.get_backend(sniffio.current_async_library())


def _effective_weights(records: list[Any]) -> list[int]:
    """RFC 2782 weights as positive ints, per priority (see the module docstring for the rule)."""
    mixed = {
        priority
        for priority in {r.priority for r in records}
        if any(r.weight == 0 for r in records if r.priority == priority)
        and any(r.weight > 0 for r in records if r.priority == priority)
    }
    weights = []
    for record in records:
        if record.weight == 0:
            weights.append(1)
        elif record.priority in mixed:
            weights.append(record.weight * ZERO_WEIGHT_SCALE)
        else:
            weights.append(int(record.weight))
    return weights


def _address_key(host: str) -> tuple[int, int]:
    address = ipaddress.ip_address(host)
    return (address.version, int(address))


def _configure(resolver: _R, settings: DiscoverySettings) -> _R:
    if settings.dns_servers is not None:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in settings.dns_servers]
        # No search list with explicit servers (dnspython would otherwise derive one from the host name).
        resolver.search = []
        resolver.domain = dns.name.root
    resolver.lifetime = settings.dns_timeout
    resolver.timeout = min(resolver.timeout, settings.dns_timeout / 2)
    resolver.cache = None  # the directory caches, honouring TTLs; never a second cache here
    return resolver


def _describe_servers(resolver: dns.resolver.BaseResolver) -> str:
    names = []
    for server in resolver.nameservers:
        if isinstance(server, dns.nameserver.AddressAndPortNameserver):
            names.append(_hostport(server.address, server.port))
        elif isinstance(server, str):
            names.append(_hostport(server, resolver.port))
        else:
            names.append(str(server))
    return ", ".join(names) or "none"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
