"""meshlib's Consul code against HashiCorp's own API double (npm ``@hashicorp/consul-api-double``).

An independent check of what meshlib parses: the answers here are HashiCorp's templates, not our emulator's.
What runs through meshlib: ``consul://`` discovery (``/v1/health/service/<name>``) through the resolver and
through ``meshlib.Client`` / ``AsyncClient``; the five discovery chains captured from Consul mapped onto route
tables, a ``consul+chain://`` client routed by one, the templated chain refused naming its field, and the Connect
CA answers refused (no ``TrustDomain``, a leaf expired in 2018). The shapes of the leaf, roots and authorize are
asserted too, with the double's
known departures from real Consul written down as assertions (docs/consul-npm-double.md), and the recorded
answers in ``tests/fixtures/consul/npm/`` checked to be what the double still serves.

Skipped when ``node`` or the npm packages are missing (``npm install`` in ``tests/servers/consul_npm``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import meshlib
from meshlib.discovery import DiscoverySettings, build_resolver
from meshlib.discovery.base import Endpoint
from meshlib.discovery.consul import ConsulResolver, aggregate_status
from tests.anyio_backends import asyncio_and_trio  # noqa: F401  (fixture: async tests under both)
from tests.servers.consul_npm import (
    CHAIN_KNOBS,
    FIXTURES,
    HEALTH_KNOBS,
    RECORD_SEED,
    RECORDED,
    ConsulNpmDouble,
    missing,
)

_REASON = missing()
pytestmark = [
    pytest.mark.skipif(_REASON is not None, reason=f"npm Consul double: {_REASON}"),
    pytest.mark.timeout(60),
]


@pytest.fixture(scope="module")
def healthy() -> Iterator[ConsulNpmDouble]:
    """Fixed counts, no checks (every instance passing), blocking queries answer at once."""
    with ConsulNpmDouble(seed=RECORD_SEED, knobs=HEALTH_KNOBS) as double:
        yield double


@pytest.fixture(scope="module")
def stock() -> Iterator[ConsulNpmDouble]:
    """The templates' defaults: random counts, ten checks per instance (the first two critical), a
    blocking query (``?index=``) held for 60 s."""
    with ConsulNpmDouble(seed=3) as double:
        yield double


@pytest.fixture(autouse=True)
def no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CONSUL_* variable from the developer's shell reaches the resolvers."""
    for name in list(os.environ):
        if name.startswith("CONSUL_"):
            monkeypatch.delenv(name)


def resolver(double: ConsulNpmDouble, target: str = "consul://web") -> ConsulResolver:
    """A resolver built as the clients build it (the ``consul://`` factory), pointed at the double."""
    built = build_resolver(
        "web", target, DiscoverySettings(environ={"CONSUL_HTTP_ADDR": double.address}), variable="MESHLIB_SERVICE_WEB"
    )
    assert isinstance(built, ConsulResolver)
    return built


def expected_endpoints(body: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What Consul's documentation says a passing instance is, computed here without meshlib: the service
    address (else the node's), a port in 1..65535, tags, meta, weight 1 (no Weights), and the zone: the service's
    ``Locality.Zone`` (Consul 1.17+), else a ``zone`` key in the node's then the service's metadata, else none
    (a datacenter spans zones, so it is not one)."""
    found = []
    for entry in body:
        service, node = entry["Service"], entry["Node"]
        if entry["Checks"] or not 1 <= service["Port"] <= 65535:
            continue
        found.append(
            (
                service["Address"] or node["Address"],
                service["Port"],
                1,
                (service.get("Locality") or {}).get("Zone")
                or (node.get("Meta") or {}).get("zone")
                or (service.get("Meta") or {}).get("zone"),
                tuple(service["Tags"]),
                dict(service.get("Meta") or {}),
            )
        )
    return found


def as_tuples(endpoints: tuple[Endpoint, ...]) -> list[tuple[Any, ...]]:
    return [(e.host, e.port, e.weight, e.zone, e.tags, dict(e.meta)) for e in endpoints]


# --- the double itself ---------------------------------------------------------------------------------------


def test_same_seed_and_counts_serve_the_same_bytes_and_cookies_are_knobs(healthy: ConsulNpmDouble) -> None:
    first = healthy.get("/v1/health/service/web")
    assert first.status == 200 and first.headers["content-type"].startswith("application/json")
    assert healthy.get("/v1/health/service/web").body == first.body
    assert len(first.json()) == int(HEALTH_KNOBS["CONSUL_NODE_COUNT"])
    # A cookie of the same name wins over the server's environment; a header does not work (api-double looks
    # up "X-CONSUL-NODE-COUNT" but Express lower-cases header names).
    assert len(healthy.get("/v1/health/service/web", cookies={"CONSUL_NODE_COUNT": "1"}).json()) == 1
    assert first.headers["x-consul-index"] == "2"  # always ?index= + 1 (1 without one)
    assert healthy.get("/v1/health/service/web?index=41").headers["x-consul-index"] == "42"


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_answers_are_what_the_double_serves(healthy: ConsulNpmDouble, name: str) -> None:
    """tests/fixtures/consul/npm/ is reproducible: same seed, same knobs, same answer (re-record with
    ``python -m tests.servers.consul_npm``)."""
    path, cookies, method, body = RECORDED[name]
    assert healthy.request(method, path, cookies=cookies, body=body).json() == json.loads((FIXTURES / name).read_text())


# --- consul:// discovery: what meshlib does today ------------------------------------------------------------


def test_resolver_parses_the_doubles_health_answer(healthy: ConsulNpmDouble) -> None:
    raw = healthy.get("/v1/health/service/web?passing=true").json()
    expected = expected_endpoints(raw)
    assert expected, "the recorded seed should give at least one usable instance"
    consul = resolver(healthy)
    try:
        assert as_tuples(consul.resolve().endpoints) == expected
        # The first query is plain; the answer's X-Consul-Index (2) is then blocked on.
        assert healthy.requests[-1] == "GET: /v1/health/service/web?passing=true&stale="
        assert consul.watch.index == 2
        again = consul.resolve()  # the double answers at once (CONSUL_LATENCY=0) with index 3, same body
        assert re.fullmatch(
            r"GET: /v1/health/service/web\?passing=true&stale=&index=2&wait=\d+ms", healthy.requests[-1]
        )
        assert consul.watch.index == 3 and consul.watch.unchanged == 1
        assert as_tuples(again.endpoints) == expected
    finally:
        consul.close()


@pytest.mark.anyio
async def test_async_resolver_parses_the_doubles_health_answer(healthy: ConsulNpmDouble) -> None:
    expected = expected_endpoints(healthy.get("/v1/health/service/web?passing=true").json())
    consul = resolver(healthy, "consul://web?tag=" + expected[0][4][0])
    try:
        with anyio.fail_after(30):
            endpoints = (await consul.aresolve()).endpoints
        # tag= is checked by meshlib too (the double ignores it, as an old Consul ignores a second tag).
        assert as_tuples(endpoints) == [e for e in expected if expected[0][4][0] in e[4]]
    finally:
        consul.close()


def test_critical_instances_are_left_out_although_the_double_ignores_passing(stock: ConsulNpmDouble) -> None:
    raw = stock.get("/v1/health/service/web?passing=true").json()
    assert raw and all(aggregate_status(entry["Checks"]) == "critical" for entry in raw)
    for target in ("consul://web", "consul://web?passing=false"):
        consul = resolver(stock, target)
        try:
            assert consul.resolve().endpoints == ()
        finally:
            consul.close()


def test_client_sends_nothing_to_critical_instances(stock: ConsulNpmDouble) -> None:
    env = {"MESHLIB_SERVICE_WEB": "consul://web", "CONSUL_HTTP_ADDR": stock.address}
    with meshlib.Client(environ=env) as client, pytest.raises(meshlib.NoEndpointsError, match="web"):
        client.get("http://web/")
    assert any(line.startswith("GET: /v1/health/service/web?passing=true") for line in stock.requests)


@pytest.mark.anyio
async def test_async_client_sends_nothing_to_critical_instances(stock: ConsulNpmDouble) -> None:
    env = {"MESHLIB_SERVICE_WEB": "consul://web", "CONSUL_HTTP_ADDR": stock.address}
    with anyio.fail_after(30):
        async with meshlib.AsyncClient(environ=env) as client:
            with pytest.raises(meshlib.NoEndpointsError, match="web"):
                await client.get("http://web/")


# --- shapes meshlib will need (issue 14) ---------------------------------------------------------------------


def check_chain(chain: dict[str, Any], *, failover_targets_listed: bool) -> None:
    """The compiled chain's shape: every reference resolves (start node, next nodes, resolver targets)."""
    for key in ("ServiceName", "Namespace", "Datacenter", "Protocol", "StartNode", "Nodes", "Targets"):
        assert key in chain, key
    nodes, targets = chain["Nodes"], chain["Targets"]
    assert chain["StartNode"] in nodes
    for name, node in nodes.items():
        assert name == f"{node['Type']}:{node['Name']}"
        if node["Type"] == "router":
            for route in node["Routes"]:
                assert route["NextNode"] in nodes
                assert set(route["Definition"]) <= {"Match", "Destination"}
                assert isinstance(route["Definition"]["Destination"]["Service"], str)
        elif node["Type"] == "splitter":
            assert sum(split["Weight"] for split in node["Splits"]) == pytest.approx(100)
            assert all(split["NextNode"] in nodes for split in node["Splits"])
        else:
            assert node["Type"] == "resolver"
            resolved = node["Resolver"]
            assert resolved["Target"] in targets and re.fullmatch(r"\d+s", resolved["ConnectTimeout"])
            for failover in resolved.get("Failover", {}).get("Targets", []):
                assert (failover in targets) is failover_targets_listed
    for key, target in targets.items():
        assert target["ID"] == key
        assert {"Service", "Namespace", "Datacenter", "MeshGateway", "SNI", "Name"} <= set(target)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_static_discovery_chains_are_consistent(stock: ConsulNpmDouble, n: int) -> None:
    """``virtual-admin-1..5`` are fixed answers (captured from a Consul): references all resolve."""
    reply = stock.get(f"/v1/discovery-chain/virtual-admin-{n}")
    assert reply.status == 200 and reply.headers["x-consul-index"] == "2"
    check_chain(reply.json()["Chain"], failover_targets_listed=True)


def test_templated_discovery_chain_shape(stock: ConsulNpmDouble) -> None:
    """The templated chain (random counts) always has the shape; its failover targets are never in
    ``Targets`` (real Consul lists them) and its route destinations name nodes, not services."""
    reply = stock.get("/v1/discovery-chain/web?dc=dc1", cookies={**CHAIN_KNOBS, "CONSUL_FAILOVER_COUNT": "2"})
    chain = reply.json()["Chain"]
    check_chain(chain, failover_targets_listed=False)
    (router,) = [node for node in chain["Nodes"].values() if node["Type"] == "router"]
    assert all(route["Definition"]["Destination"]["Service"] == route["NextNode"] for route in router["Routes"])
    for _ in range(5):  # random counts: still well-formed JSON of the same shape
        check_chain(stock.get("/v1/discovery-chain/web?dc=dc1").json()["Chain"], failover_targets_listed=False)
    # Without ?dc= the template prints JavaScript's undefined: callers must always send dc.
    assert stock.get("/v1/discovery-chain/web").json()["Chain"]["Datacenter"] == "undefined"


def test_leaf_certificate_and_roots_shapes(stock: ConsulNpmDouble) -> None:
    leaf = stock.get("/v1/agent/connect/ca/leaf/web").json()
    roots = stock.get("/v1/agent/connect/ca/roots").json()
    assert {"CertPEM", "PrivateKeyPEM", "ValidAfter", "ValidBefore", "Service", "ServiceURI", "SerialNumber"} <= set(
        leaf
    )
    cert = x509.load_pem_x509_certificate(leaf["CertPEM"].encode())
    key = serialization.load_pem_private_key(leaf["PrivateKeyPEM"].encode(), None)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == [leaf["ServiceURI"]]
    valid_before = datetime.strptime(leaf["ValidBefore"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert cert.not_valid_after_utc == valid_before
    assert valid_before.year == 2018  # a fixed, long-expired leaf: expiry logic cannot be tested on it

    # Roots: the JSON key is RootCert (Go's RootCertPEM); one Active root whose ID is ActiveRootID.
    (active,) = [root for root in roots["Roots"] if root["Active"]]
    assert active["ID"] == roots["ActiveRootID"]
    root = x509.load_pem_x509_certificate(active["RootCert"].encode())
    cert.verify_directly_issued_by(root)
    # Departures from real Consul: no TrustDomain, and the leaf's SPIFFE trust domain is not the root's.
    assert "TrustDomain" not in roots
    root_uris = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert not leaf["ServiceURI"].startswith(root_uris[0])
    assert stock.get("/v1/connect/ca/roots").json() == roots
    assert "x-consul-index" not in stock.get("/v1/agent/connect/ca/leaf/web").headers  # no blocking support
    # One fixed leaf whatever service is asked for.
    assert stock.get("/v1/agent/connect/ca/leaf/db").json() == leaf


def test_authorize_always_allows(stock: ConsulNpmDouble) -> None:
    """Authorize answers ``Authorized: true`` whatever is asked (GET or POST, any body): a deny path cannot
    be tested on this double."""
    spiffe = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web"
    for method, body in (("POST", {"Target": "db", "ClientCertURI": spiffe}), ("POST", {}), ("GET", None)):
        answer = stock.request(method, "/v1/agent/connect/authorize", body=body).json()
        assert answer == {"Authorized": True, "Reason": "matches intention XXX"}


def test_intentions_match_and_check_shapes(stock: ConsulNpmDouble) -> None:
    """Fixed intentions (``match`` by destination, with allow and deny) and an always-allowed ``check``."""
    matched = stock.get("/v1/connect/intentions/match?by=destination&name=db").json()
    actions = {(i["SourceName"], i["DestinationName"]): i["Action"] for i in matched["db"]}
    assert actions == {("billing", "db"): "deny", ("web", "db"): "allow"}
    assert stock.get("/v1/connect/intentions/check?source=billing&destination=db").json() == {"Allowed": True}


# --- meshlib's discovery-chain and Connect code against the double (issue 14) ----------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_meshlib_maps_the_chains_captured_from_consul(stock: ConsulNpmDouble, n: int) -> None:
    """The five fixed chains (captured from a Consul by HashiCorp) map onto a route table: one host, every backend
    a chain service with its targets; mesh gateways listed as not honoured, never silently dropped."""
    from meshlib._config.model import service_key
    from meshlib.control.consul.chain import map_chain, parse_chain_json

    body = stock.get(f"/v1/discovery-chain/virtual-admin-{n}").body
    mapping = map_chain(parse_chain_json(body), version="2")
    assert list(mapping.table.services) == [f"VIRTUAL_ADMIN_{n}"]
    chain = json.loads(body)["Chain"]
    named = {
        backend.service
        for routes in mapping.table.services.values()
        for host_routes in routes.values()
        for _, rule in host_routes.entries
        for backend in rule.backends
    }
    assert {service_key(name) for name in named} == set(mapping.services)
    every_target = {target.id for _, targets in mapping.services.values() for target, _ in targets}
    assert every_target <= set(chain["Targets"])
    gateways = [t for t, v in chain["Targets"].items() if v.get("MeshGateway", {}).get("Mode") in ("local", "remote")]
    assert all(any(f'Targets["{t}"].MeshGateway' in note for note in mapping.unsupported) for t in gateways)


def test_a_templated_chain_meshlib_cannot_read_is_refused_naming_the_field(stock: ConsulNpmDouble) -> None:
    """The templated chain puts booleans where Consul puts strings (a header match's ``Exact``): refused whole
    with the field's path, never half read."""
    from meshlib.control.consul.chain import ChainError, parse_chain_json

    body = stock.get("/v1/discovery-chain/web?dc=dc1", cookies={**CHAIN_KNOBS, "CONSUL_FAILOVER_COUNT": "2"}).body
    with pytest.raises(ChainError, match=r"Chain\.Nodes\[.*\]\.Routes\[\d+\]"):
        parse_chain_json(body)


def test_a_client_is_routed_by_the_doubles_chain(stock: ConsulNpmDouble) -> None:
    """``consul+chain://virtual-admin-4`` against the double: the chain is asked for, installed (its four
    resolver services), and each target watched on the health API."""
    environ = {"CONSUL_HTTP_ADDR": stock.address, "MESHLIB_SERVICE_ADMIN": "consul+chain://virtual-admin-4"}
    with meshlib.Client(environ=environ, timeout=5) as client:
        with pytest.raises(meshlib.MeshError):  # the double's dc2 has no instance of admin: no endpoints
            client.get("http://admin/")
        status = client.mesh_status().consul
    assert status is not None and status[0].routed and status[0].version == "2"
    assert set(status[0].backends) == {
        "consul-chain:login.default.dc1",
        "consul-chain:admin.default.dc1",
        "consul-chain:admin.default.dc2",
        "consul-chain:virtual-admin-4.default.dc1",
    }
    assert any("/v1/discovery-chain/virtual-admin-4" in line for line in stock.requests)


def test_the_doubles_roots_without_a_trust_domain_never_become_current(stock: ConsulNpmDouble) -> None:
    """The double's roots answer lacks ``TrustDomain`` (real Consul always sends it) and its leaf expired in 2018:
    a ConsulCASource refuses the material and says why, rather than trusting it."""
    from meshlib.security.consul_ca import ConsulCASource

    with pytest.raises(meshlib.ConfigError, match=r"TrustDomain|expired"):
        ConsulCASource("web", environ={"CONSUL_HTTP_ADDR": stock.address}, timeout=3)
