"""``static://`` targets and the scheme registry: what parses, what is refused and how the refusal reads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshlib import discovery
from meshlib.discovery import SCHEMES, Target, build_resolver, register_scheme
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution, Resolver
from meshlib.discovery.static import StaticResolver
from meshlib.errors import ConfigError

pytestmark = pytest.mark.one_library

VARIABLE = "MESHLIB_SERVICE_USERS"


def build(target: str) -> Resolver:
    return build_resolver("users", target, DiscoverySettings(), variable=VARIABLE)


def refused(target: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build(target)
    error = info.value
    assert error.variable == VARIABLE
    assert error.value == target
    assert VARIABLE in str(error)
    assert repr(target) in str(error)
    return error


# --- good targets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("static://10.0.0.5:8080", [Endpoint("10.0.0.5", 8080)]),
        ("static://a.internal:80,b.internal:81", [Endpoint("a.internal", 80), Endpoint("b.internal", 81)]),
        ("static://[::1]:8080", [Endpoint("::1", 8080)]),
        (
            "static://10.0.0.1:80;weight=3,[2001:db8::2]:80;weight=1",
            [Endpoint("10.0.0.1", 80, weight=3), Endpoint("2001:db8::2", 80, weight=1)],
        ),
        ("static://h:1;zone=eu-west-1a;weight=65535", [Endpoint("h", 1, weight=65535, zone="eu-west-1a")]),
        ("STATIC://h:1", [Endpoint("h", 1)]),
        ("static://h:1 ,  k:2 ; WEIGHT = 2 ", [Endpoint("h", 1), Endpoint("k", 2, weight=2)]),
        ("static://localhost:65535", [Endpoint("localhost", 65535)]),
        ("static://fqdn.example.:443", [Endpoint("fqdn.example.", 443)]),
        ("static://_svc.my-host_1.internal:443", [Endpoint("_svc.my-host_1.internal", 443)]),
    ],
)
def test_static_targets_parse_in_written_order(target: str, expected: list[Endpoint]) -> None:
    resolver = build(target)
    assert isinstance(resolver, StaticResolver)
    assert resolver.resolve() == Resolution(tuple(expected), ttl=None)


def test_static_endpoint_keeps_ipv6_address_unbracketed_and_brackets_it_for_urls() -> None:
    (endpoint,) = build("static://[::1]:8080").resolve().endpoints
    assert endpoint.host == "::1"
    assert endpoint.address == "[::1]:8080"


@pytest.mark.anyio
async def test_static_resolve_and_aresolve_return_the_same_immutable_answer() -> None:
    resolver = build("static://10.0.0.1:80,10.0.0.2:80")
    first = resolver.resolve()
    assert resolver.resolve() is first
    assert await resolver.aresolve() is first
    assert isinstance(first.endpoints, tuple)
    assert first.ttl is None
    with pytest.raises(AttributeError):
        first.endpoints = ()  # type: ignore[misc]
    resolver.close()
    resolver.close()  # idempotent


def test_static_resolver_satisfies_the_protocol_and_reports_its_source() -> None:
    resolver = build("static://10.0.0.1:80")
    assert isinstance(resolver, Resolver)
    assert resolver.source == "static://10.0.0.1:80"


# --- refused targets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected_fragment"),
    [
        ("static://", "at least one host:port"),
        ("static://   ", "at least one host:port"),
        ("static://:8080", "a host before ':port'"),
        ("static://10.0.0.1", "host:port with an explicit port"),
        ("static://10.0.0.1:", "a port from 1 to 65535"),
        ("static://10.0.0.1:0", "a port from 1 to 65535"),
        ("static://10.0.0.1:70000", "a port from 1 to 65535 in '10.0.0.1:70000', got '70000'"),
        ("static://10.0.0.1:http", "a port from 1 to 65535"),
        ("static://10.0.0.1:-1", "a port from 1 to 65535"),
        ("static://10.0.0.1:" + "9" * 5000, "a port from 1 to 65535"),
        ("static://::1:8080", "IPv6 literals in brackets"),
        ("static://[::1:8080", "closed by ']'"),
        ("static://[not-ipv6]:8080", "a valid IPv6 address inside [...]"),
        ("static://[fe80::1%eth0]:8080", "without a %zone"),
        ("static://[::1]8080", "[ipv6]:port"),
        ("static://[::1]", "[ipv6]:port"),
        ("static://999.1.1.1:80", "a valid IPv4 address"),
        ("static://bad!host:80", "a host name of dot-separated labels"),
        ("static://a..b:80", "a host name of dot-separated labels"),
        ("static://" + "a" * 64 + ":80", "a host name of dot-separated labels"),
        ("static://h:1;weight=0", "weight=N with N an integer from 1 to 65535"),
        ("static://h:1;weight=-2", "weight=N with N an integer from 1 to 65535"),
        ("static://h:1;weight=1.5", "weight=N with N an integer from 1 to 65535"),
        ("static://h:1;weight=70000", "weight=N with N an integer from 1 to 65535"),
        ("static://h:1;weight=", "weight=N with N an integer from 1 to 65535"),
        ("static://h:1;weight", "';weight=N' or ';zone=Z'"),
        ("static://h:1;color=red", "';weight=N' or ';zone=Z'"),
        ("static://h:1;zone=", "zone=Z with a non-empty zone name"),
        ("static://h:1,,k:2", "no empty entry"),
        ("static://h:1,", "no empty entry"),
        ("static://h:1,h:1;weight=2", "each host:port listed once"),
    ],
)
def test_static_refuses_bad_targets_saying_what_was_expected(target: str, expected_fragment: str) -> None:
    error = refused(target)
    assert expected_fragment in error.expected
    assert "form: static://host:port" in error.expected


def test_bad_entry_is_named_in_the_error() -> None:
    error = refused("static://10.0.0.1:80,10.0.0.2:80;weight=zero")
    assert "'10.0.0.2:80;weight=zero'" in error.expected
    assert "got 'zero'" in error.expected


# --- the scheme registry --------------------------------------------------------------------------------------


def test_unknown_scheme_lists_the_known_ones() -> None:
    error = refused("consulx://payments")
    assert "a known discovery scheme, one of" in error.expected
    for scheme in ("static://", "dns://", "dns+srv://"):
        assert scheme in error.expected
    assert "'consulx'" in error.expected


@pytest.mark.parametrize("target", ["10.0.0.1:8080", "://10.0.0.1:8080", "static:10.0.0.1:8080", ""])
def test_target_without_scheme_is_refused(target: str) -> None:
    error = refused(target)
    assert "a discovery target URI with a scheme" in error.expected
    assert "static://" in error.expected


def test_schemes_document_the_builtin_forms() -> None:
    assert SCHEMES["static"].startswith("static://host:port")
    assert SCHEMES["dns"] == "dns://name:port"
    assert SCHEMES["dns+srv"].startswith("dns+srv://name")
    with pytest.raises(TypeError):
        SCHEMES["x"] = "y"  # type: ignore[index]


@pytest.fixture
def registry() -> Iterator[None]:
    """Restore the scheme registry after a test registers a fake scheme."""
    factories, forms = dict(discovery._FACTORIES), dict(discovery._FORMS)
    yield
    discovery._FACTORIES.clear()
    discovery._FACTORIES.update(factories)
    discovery._FORMS.clear()
    discovery._FORMS.update(forms)


@pytest.mark.usefixtures("registry")
def test_registered_scheme_is_dispatched_with_the_parsed_target() -> None:
    seen: list[Target] = []

    def factory(target: Target, settings: DiscoverySettings) -> Resolver:
        seen.append(target)
        if target.rest == "bad":
            raise target.invalid("a service name")
        return StaticResolver([Endpoint("10.9.9.9", 1)], source=target.uri)

    register_scheme("Fake", factory, form="fake://service")
    assert SCHEMES["fake"] == "fake://service"
    resolver = build_resolver("pay", "FAKE://payments", DiscoverySettings(), variable="V")
    assert resolver.resolve().endpoints == (Endpoint("10.9.9.9", 1),)
    assert seen == [Target("pay", "FAKE://payments", "fake", "payments", "V", "fake://service")]
    assert "fake://" in refused("nope://x").expected

    error = refused("fake://bad")
    assert error.expected == "a service name (form: fake://service)"


@pytest.mark.usefixtures("registry")
def test_registering_a_scheme_twice_needs_replace() -> None:
    def factory(target: Target, settings: DiscoverySettings) -> Resolver:
        return StaticResolver([], source=target.uri)

    with pytest.raises(ValueError, match="already registered"):
        register_scheme("static", factory, form="static://x")
    register_scheme("static", factory, form="static://x", replace=True)
    assert build("static://anything").resolve().endpoints == ()
    with pytest.raises(ValueError, match="invalid URI scheme"):
        register_scheme("bad scheme", factory, form="x")
