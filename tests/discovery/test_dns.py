"""``dns://`` and ``dns+srv://`` against a real dnsmasq on loopback, sync and async.

A few tests drive the resolvers with a fake dnspython resolver instead, to pin down what a real server on
loopback cannot be made to do on demand (leave out the additional section, answer a "." target).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from meshlib.discovery import build_resolver
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution, Resolver
from meshlib.discovery.dns import ZERO_WEIGHT_SCALE, DnsResolver, SrvResolver
from meshlib.errors import ConfigError, DiscoveryError
from tests.servers.dnsmasq import Dnsmasq, SrvRecord

pytestmark = pytest.mark.one_library

VARIABLE = "MESHLIB_SERVICE_USERS"


def build(target: str, settings: DiscoverySettings) -> Resolver:
    return build_resolver("users", target, settings, variable=VARIABLE)


async def resolve(resolver: Resolver, mode: str) -> Resolution:
    return resolver.resolve() if mode == "sync" else await resolver.aresolve()


def hosts_ports(resolution: Resolution) -> list[tuple[str, int]]:
    return [(e.host, e.port) for e in resolution.endpoints]


both = pytest.mark.parametrize("mode", ["sync", "async"])


# --- target parsing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("dns://users.internal", "host:port with an explicit port"),
        ("dns://users.internal:70000", "a port from 1 to 65535"),
        ("dns://users.internal:0", "a port from 1 to 65535"),
        ("dns://:80", "a host before ':port'"),
        ("dns://10.0.0.1:80", "a DNS name, not the IP address '10.0.0.1' (use static://"),
        ("dns://[::1]:80", "a DNS name, not the IP address '::1'"),
        ("dns:///users.internal:80", "nothing but the name and port after dns://"),
        ("dns://8.8.8.8/users.internal:80", "nothing but the name and port"),
        ("dns://users.internal:80?x=1", "no '?'"),
        ("dns://bad_name!:80", "a host name of dot-separated labels"),
        ("dns+srv://", "a DNS name to ask SRV records of"),
        ("dns+srv://_http._tcp.users.internal:80", "without ':port' (SRV records carry the ports)"),
        ("dns+srv://10.0.0.1", "a DNS name, not the IP address"),
        ("dns+srv://a..b", "a host name of dot-separated labels"),
        ("dns+srv://users/x", "nothing but the name after dns+srv://"),
    ],
)
def test_dns_targets_refused_with_what_was_expected(target: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(target, DiscoverySettings())
    assert info.value.variable == VARIABLE
    assert info.value.value == target
    assert fragment in info.value.expected


def test_dns_targets_build_the_dns_resolvers() -> None:
    settings = DiscoverySettings(dns_servers=(("127.0.0.1", 53),))
    a = build("dns://users.internal:8080", settings)
    srv = build("DNS+SRV://_http._tcp.users.internal.", settings)
    assert isinstance(a, DnsResolver)
    assert a.port == 8080
    assert isinstance(srv, SrvResolver)
    assert isinstance(a, Resolver)
    assert isinstance(srv, Resolver)
    assert a.source == "dns://users.internal:8080"
    assert srv.source == "DNS+SRV://_http._tcp.users.internal."
    a.close()
    a.close()


# --- dns:// against dnsmasq -----------------------------------------------------------------------------------


@both
@pytest.mark.anyio
async def test_a_and_aaaa_records_become_endpoints_with_their_ttl(dnsmasq: Dnsmasq, mode: str) -> None:
    resolver = build("dns://users.internal:8080", dnsmasq.settings())
    resolution = await resolve(resolver, mode)
    assert resolution == Resolution(
        (Endpoint("127.0.0.1", 8080), Endpoint("127.0.0.2", 8080), Endpoint("::1", 8080)), ttl=float(dnsmasq.ttl)
    )


@both
@pytest.mark.anyio
async def test_name_with_only_a_records_answers_ipv4_only(dnsmasq: Dnsmasq, mode: str) -> None:
    resolution = await resolve(build("dns://v4only.internal:80", dnsmasq.settings()), mode)
    assert resolution == Resolution((Endpoint("127.0.0.4", 80),), ttl=float(dnsmasq.ttl))


@both
@pytest.mark.anyio
async def test_name_without_address_records_answers_empty_not_an_error(dnsmasq: Dnsmasq, mode: str) -> None:
    # The SRV name exists (NOERROR) but has no A/AAAA: an empty answer; the directory decides what it means.
    resolution = await resolve(build("dns://_http._tcp.users.internal:80", dnsmasq.settings()), mode)
    assert resolution.endpoints == ()
    assert resolution.ttl is not None
    assert resolution.ttl >= 0


@both
@pytest.mark.anyio
async def test_nxdomain_is_a_discovery_error_naming_the_name(dnsmasq: Dnsmasq, mode: str) -> None:
    resolver = build("dns://missing.internal:80", dnsmasq.settings())
    with pytest.raises(DiscoveryError) as info:
        await resolve(resolver, mode)
    error = info.value
    assert str(error) == "DNS name missing.internal does not exist (NXDOMAIN)"
    assert error.service == "users"
    assert error.source == "dns://missing.internal:80"
    assert isinstance(error.__cause__, dns.resolver.NXDOMAIN)


@both
@pytest.mark.anyio
async def test_changed_records_are_seen_by_the_next_resolve(dnsmasq: Dnsmasq, mode: str) -> None:
    resolver = build("dns://users.internal:80", dnsmasq.settings())
    assert len((await resolve(resolver, mode)).endpoints) == 3
    dnsmasq.set_records(hosts={"users.internal": ["127.0.0.9", "::9"]}, ttl=7)
    assert await resolve(resolver, mode) == Resolution((Endpoint("127.0.0.9", 80), Endpoint("::9", 80)), ttl=7.0)
    dnsmasq.set_records(hosts={"users.internal": ["127.0.0.10"]})
    assert hosts_ports(await resolve(resolver, mode)) == [("127.0.0.10", 80)]


# --- dns+srv:// against dnsmasq -------------------------------------------------------------------------------


@both
@pytest.mark.anyio
async def test_srv_records_give_ports_weights_priorities_and_min_ttl(dnsmasq: Dnsmasq, mode: str) -> None:
    resolution = await resolve(build("dns+srv://_http._tcp.users.internal", dnsmasq.settings()), mode)
    assert resolution.endpoints == (
        Endpoint("127.0.0.11", 8081, weight=60, priority=10),
        Endpoint("127.0.0.12", 8082, weight=20, priority=10),
        Endpoint("::12", 8082, weight=20, priority=10),
        # Alone at its priority, weight 0 means "no preference": weight 1.
        Endpoint("127.0.0.13", 8083, weight=1, priority=20),
    )
    assert dnsmasq.srv_ttl < dnsmasq.ttl
    assert resolution.ttl == float(dnsmasq.srv_ttl)
    first = resolution.endpoints[0]
    assert first.meta == {"srv_target": "web1.users.internal", "srv_weight": "60"}


@both
@pytest.mark.anyio
async def test_srv_ttl_is_the_smaller_of_srv_and_address_ttls(dnsmasq: Dnsmasq, mode: str) -> None:
    resolver = build("dns+srv://_http._tcp.users.internal", dnsmasq.settings())
    dnsmasq.set_records(ttl=100, srv_ttl=12)
    assert (await resolve(resolver, mode)).ttl == 12.0
    dnsmasq.set_records(ttl=8, srv_ttl=100)
    assert (await resolve(resolver, mode)).ttl == 8.0


@both
@pytest.mark.anyio
async def test_srv_weight_zero_beside_nonzero_weights_gets_a_minimal_share(dnsmasq: Dnsmasq, mode: str) -> None:
    dnsmasq.set_records(
        srv=[
            SrvRecord("_http._tcp.users.internal", "web1.users.internal", 8081, priority=1, weight=3),
            SrvRecord("_http._tcp.users.internal", "web2.users.internal", 8082, priority=1, weight=0),
            SrvRecord("_http._tcp.users.internal", "web3.users.internal", 8083, priority=2, weight=0),
        ]
    )
    resolution = await resolve(build("dns+srv://_http._tcp.users.internal", dnsmasq.settings()), mode)
    weights = {(e.host, e.port): (e.priority, e.weight) for e in resolution.endpoints}
    assert weights == {
        ("127.0.0.11", 8081): (1, 3 * ZERO_WEIGHT_SCALE),
        ("127.0.0.12", 8082): (1, 1),
        ("::12", 8082): (1, 1),
        ("127.0.0.13", 8083): (2, 1),
    }


@both
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("primary.payments.service.consul", [("127.0.0.11", 9001)]),
        ("_payments._primary.service.consul", [("127.0.0.12", 9002), ("::12", 9002)]),
    ],
)
async def test_consul_dns_name_forms_work_as_srv_targets(
    dnsmasq: Dnsmasq, mode: str, name: str, expected: list[tuple[str, int]]
) -> None:
    resolution = await resolve(build(f"dns+srv://{name}", dnsmasq.settings()), mode)
    assert hosts_ports(resolution) == expected


@both
@pytest.mark.anyio
async def test_srv_target_without_addresses_is_skipped(dnsmasq: Dnsmasq, mode: str) -> None:
    dnsmasq.set_records(
        srv=[
            SrvRecord("_http._tcp.users.internal", "web1.users.internal", 8081, weight=1),
            SrvRecord("_http._tcp.users.internal", "gone.users.internal", 8089, weight=1),
        ]
    )
    resolution = await resolve(build("dns+srv://_http._tcp.users.internal", dnsmasq.settings()), mode)
    assert hosts_ports(resolution) == [("127.0.0.11", 8081)]


@both
@pytest.mark.anyio
async def test_srv_record_with_port_zero_is_skipped(dnsmasq: Dnsmasq, mode: str) -> None:
    dnsmasq.set_records(
        srv=[
            SrvRecord("_http._tcp.users.internal", "web1.users.internal", 8081, weight=1),
            SrvRecord("_http._tcp.users.internal", "web2.users.internal", 0, weight=1),
        ]
    )
    resolution = await resolve(build("dns+srv://_http._tcp.users.internal", dnsmasq.settings()), mode)
    assert hosts_ports(resolution) == [("127.0.0.11", 8081)]  # no endpoint on port 0


@both
@pytest.mark.anyio
async def test_name_without_srv_records_answers_empty(dnsmasq: Dnsmasq, mode: str) -> None:
    resolution = await resolve(build("dns+srv://users.internal", dnsmasq.settings()), mode)
    assert resolution.endpoints == ()
    assert resolution.ttl is not None


@both
@pytest.mark.anyio
async def test_srv_nxdomain_is_a_discovery_error(dnsmasq: Dnsmasq, mode: str) -> None:
    with pytest.raises(DiscoveryError, match=r"DNS name _http\._tcp\.nope\.internal does not exist") as info:
        await resolve(build("dns+srv://_http._tcp.nope.internal", dnsmasq.settings()), mode)
    assert info.value.source == "dns+srv://_http._tcp.nope.internal"
    assert isinstance(info.value.__cause__, dns.resolver.NXDOMAIN)


@both
@pytest.mark.anyio
async def test_changed_srv_records_are_seen_by_the_next_resolve(dnsmasq: Dnsmasq, mode: str) -> None:
    resolver = build("dns+srv://_http._tcp.users.internal", dnsmasq.settings())
    assert len((await resolve(resolver, mode)).endpoints) == 4
    dnsmasq.set_records(srv=[SrvRecord("_http._tcp.users.internal", "web3.users.internal", 9999, weight=5)])
    assert (await resolve(resolver, mode)).endpoints == (Endpoint("127.0.0.13", 9999, weight=5),)


# --- failures -------------------------------------------------------------------------------------------------


@pytest.fixture
def dead_port() -> int:
    """A loopback UDP port with nothing listening (queries to it are refused by the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback UDP port that receives queries and never answers (a black-holed DNS server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@both
@pytest.mark.anyio
@pytest.mark.parametrize("target", ["dns://users.internal:80", "dns+srv://_http._tcp.users.internal"])
async def test_unreachable_server_fails_fast_with_a_discovery_error(dead_port: int, mode: str, target: str) -> None:
    resolver = build(target, DiscoverySettings(dns_servers=(("127.0.0.1", dead_port),), dns_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(DiscoveryError) as info:
        await resolve(resolver, mode)
    assert time.monotonic() - started < 1.5
    message = str(info.value)
    assert "query for " in message
    assert f"127.0.0.1:{dead_port}" in message
    assert info.value.source == target
    assert info.value.service == "users"
    assert isinstance(info.value.__cause__, dns.exception.DNSException)


@both
@pytest.mark.anyio
async def test_silent_server_times_out_after_dns_timeout(silent_port: int, mode: str) -> None:
    resolver = build(
        "dns://users.internal:80", DiscoverySettings(dns_servers=(("127.0.0.1", silent_port),), dns_timeout=0.3)
    )
    started = time.monotonic()
    with pytest.raises(DiscoveryError, match=r"DNS A query for users\.internal timed out after 0\.3s") as info:
        await resolve(resolver, mode)
    elapsed = time.monotonic() - started
    # One query's lifetime, not one per query: the AAAA query is never sent after A failed.
    assert 0.25 <= elapsed < 1.0
    assert isinstance(info.value.__cause__, dns.exception.Timeout)


@both
@pytest.mark.anyio
async def test_second_server_answers_when_the_first_is_dead(dnsmasq: Dnsmasq, dead_port: int, mode: str) -> None:
    settings = DiscoverySettings(dns_servers=(("127.0.0.1", dead_port), dnsmasq.server), dns_timeout=1.0)
    assert len((await resolve(build("dns://users.internal:80", settings), mode)).endpoints) == 3


@both
@pytest.mark.anyio
async def test_missing_system_resolver_config_is_a_discovery_error_at_resolve(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    def no_config(self: object, filename: object) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", no_config)
    resolver = build("dns://users.internal:80", DiscoverySettings(dns_servers=None))  # construction still works
    with pytest.raises(DiscoveryError, match="no DNS server configured") as info:
        await resolve(resolver, mode)
    assert isinstance(info.value.__cause__, dns.resolver.NoResolverConfiguration)


# --- SRV decisions a loopback dnsmasq cannot be made to exercise ----------------------------------------------


class FakeDns:
    """Stands in for dnspython's resolver: answers from a dict, with real dnspython messages and Answers."""

    def __init__(self, records: dict[tuple[str, str], list[str]], additional: Sequence[dns.rrset.RRset] = ()) -> None:
        self.records = records
        self.additional = list(additional)
        self.asked: list[tuple[str, str]] = []

    def resolve(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, **_: Any) -> dns.resolver.Answer:
        qname = qname.derelativize(dns.name.root)  # as dnspython does for a relative name without a search list
        key = (qname.to_text(), dns.rdatatype.to_text(rdtype))
        self.asked.append(key)
        if not any(name == key[0] for name, _ in self.records):
            raise dns.resolver.NXDOMAIN(qnames=[qname])
        response = dns.message.make_response(dns.message.make_query(qname, rdtype))
        # find_rrset(create=True) keeps the message's index in step (a plain append would not be found).
        if key in self.records:
            rrset = dns.rrset.from_text(qname, 20, "IN", key[1], *self.records[key])
            response.find_rrset(response.answer, qname, rrset.rdclass, rrset.rdtype, create=True).update(rrset)
        if key[1] == "SRV":
            for extra in self.additional:
                section = response.additional
                response.find_rrset(section, extra.name, extra.rdclass, extra.rdtype, create=True).update(extra)
        return dns.resolver.Answer(qname, rdtype, dns.rdataclass.IN, response)


def srv_resolver(fake: FakeDns) -> SrvResolver:
    resolver = SrvResolver(
        "users", "_http._tcp.x.internal", DiscoverySettings(dns_servers=(("127.0.0.1", 9),)), source="s"
    )
    resolver._sync = fake  # type: ignore[assignment]
    return resolver


def test_srv_targets_missing_from_the_additional_section_are_asked_for() -> None:
    fake = FakeDns(
        {
            ("_http._tcp.x.internal.", "SRV"): ["1 5 80 a.x.internal.", "1 5 81 b.x.internal.", "1 5 82 a.x.internal."],
            ("a.x.internal.", "A"): ["10.0.0.1"],
            ("a.x.internal.", "AAAA"): ["2001:db8::1"],
            ("b.x.internal.", "A"): ["10.0.0.2"],
        },
        additional=[dns.rrset.from_text("b.x.internal.", 5, "IN", "A", "10.0.0.2")],
    )
    resolution = srv_resolver(fake).resolve()
    assert hosts_ports(resolution) == [
        ("10.0.0.1", 80),
        ("10.0.0.1", 82),
        ("10.0.0.2", 81),
        ("2001:db8::1", 80),
        ("2001:db8::1", 82),
    ]
    # b came from the additional section (TTL 5); a was asked for once, A and AAAA, despite two records.
    assert fake.asked == [("_http._tcp.x.internal.", "SRV"), ("a.x.internal.", "A"), ("a.x.internal.", "AAAA")]
    assert resolution.ttl == 5.0


def test_srv_dot_target_means_not_available() -> None:
    fake = FakeDns({("_http._tcp.x.internal.", "SRV"): ["0 0 0 ."]})
    resolution = srv_resolver(fake).resolve()
    assert resolution == Resolution((), ttl=20.0)
    assert fake.asked == [("_http._tcp.x.internal.", "SRV")]


def test_same_address_in_two_priorities_keeps_the_preferred_one() -> None:
    fake = FakeDns(
        {("_http._tcp.x.internal.", "SRV"): ["5 1 80 a.x.internal.", "1 7 80 b.x.internal."]},
        additional=[
            dns.rrset.from_text("a.x.internal.", 60, "IN", "A", "10.0.0.1"),
            dns.rrset.from_text("b.x.internal.", 60, "IN", "A", "10.0.0.1"),
        ],
    )
    assert srv_resolver(fake).resolve().endpoints == (Endpoint("10.0.0.1", 80, weight=7, priority=1),)
