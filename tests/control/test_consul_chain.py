"""Consul's compiled discovery chain: the API page's four worked examples (contract tests), each router, splitter
and resolver feature mapped onto the route table, and the chains meshlib refuses."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from meshlib.control.consul.chain import (
    MAX_ROUTES,
    ChainError,
    ChainMapping,
    map_chain,
    parse_chain,
    parse_chain_json,
)
from meshlib.policy import Policy
from meshlib.routing.filters import modify, rewritten_path
from meshlib.routing.model import HostRoutes, QueryString, Rule
from tests.httplib import httpx

FIXTURES = Path(__file__).parent.parent / "fixtures" / "consul"


def load(name: str) -> ChainMapping:
    return map_chain(parse_chain_json((FIXTURES / name).read_bytes()))


def routes_of(mapping: ChainMapping, host: str = "WEB") -> HostRoutes:
    found = mapping.table.services[host][None]
    return found


def route(routes: HostRoutes, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Rule | None:
    raw_path, _, query = path.partition("?")
    chosen = routes.select(method, raw_path, httpx.Headers(headers or {}), QueryString(query))
    return None if chosen is None else chosen[1]


def sole_backend(rule: Rule | None) -> str | None:
    assert rule is not None
    assert len(rule.backends) == 1
    return rule.backends[0].service


def targets(mapping: ChainMapping, service: str) -> list[tuple[str, int]]:
    return [(target.id, priority) for target, priority in mapping.services[service][1]]


# -- the four worked examples of website/content/api-docs/discovery-chain.mdx ------------------------------------


def test_multi_datacenter_failover_is_one_service_with_priorities() -> None:
    mapping = load("chain-multi-dc-failover.json")
    routes = routes_of(mapping)
    assert sole_backend(route(routes, "/anything")) == "consul-chain:web.default.dc1"
    assert list(mapping.services) == ["CONSUL_CHAIN:WEB_DEFAULT_DC1"]
    assert targets(mapping, "CONSUL_CHAIN:WEB_DEFAULT_DC1") == [
        ("web.default.dc1", 0),
        ("web.default.dc3", 1),
        ("web.default.dc4", 2),
    ]
    config, chosen = mapping.services["CONSUL_CHAIN:WEB_DEFAULT_DC1"]
    assert config.name == "consul-chain:web.default.dc1"
    assert [t.datacenter for t, _ in chosen] == ["dc1", "dc3", "dc4"]
    assert mapping.connect_timeouts == {"CONSUL_CHAIN:WEB_DEFAULT_DC1": 15.0}
    assert mapping.chain.protocol == "tcp"
    assert mapping.unsupported == ()


def test_datacenter_redirect_with_overrides() -> None:
    mapping = load("chain-dc-redirect-overrides.json")
    # The customization hash keeps the overridden chain's service apart from a plain one.
    assert sole_backend(route(routes_of(mapping), "/")) == "consul-chain:web.default.dc2~b94f529a"
    key = "CONSUL_CHAIN:WEB_DEFAULT_DC2~B94F529A"
    assert targets(mapping, key) == [("web.default.dc2", 0)]
    assert mapping.services[key][1][0][0].datacenter == "dc2"
    assert mapping.connect_timeouts[key] == 7.0
    assert mapping.chain.protocol == "grpc"
    assert len(mapping.unsupported) == 1
    assert "MeshGateway.Mode: 'remote'" in mapping.unsupported[0]


def test_version_split_weights_and_subset_filters() -> None:
    mapping = load("chain-version-split.json")
    rule = route(routes_of(mapping), "/")
    assert rule is not None
    assert [(b.service, b.weight) for b in rule.backends] == [
        ("consul-chain:v1.web.default.dc2", 9000),
        ("consul-chain:v2.web.default.dc2", 1000),
    ]
    v1 = mapping.services["CONSUL_CHAIN:V1_WEB_DEFAULT_DC2"][1][0][0]
    v2 = mapping.services["CONSUL_CHAIN:V2_WEB_DEFAULT_DC2"][1][0][0]
    assert (v1.service, v1.service_subset, v1.filter) == ("web", "v1", "Service.Meta.version == v1")
    instance = {"Service": {"Service": "web", "Meta": {"version": "v2"}}}
    assert v1.subset_filter is not None and v2.subset_filter is not None
    assert not v1.subset_filter.matches(instance)
    assert v2.subset_filter.matches(instance)
    # The weights draw 90/10 exactly over the draw space.
    draws = [rule.pick(random.Random(seed)) for seed in range(2000)]
    share = sum(1 for b in draws if b is not None and b.service.startswith("consul-chain:v2")) / len(draws)
    assert 0.07 < share < 0.13


def test_http_path_routing() -> None:
    mapping = load("chain-http-path-routing.json")
    routes = routes_of(mapping)
    admin = route(routes, "/admin/users")
    assert sole_backend(admin) == "consul-chain:admin.default.dc1"
    assert admin is not None and admin.policy.timeout == 15.0
    # Envoy's prefix match is a plain string prefix, and its prefix_rewrite swaps exactly the matched characters.
    assert sole_backend(route(routes, "/administrators")) == "consul-chain:admin.default.dc1"
    assert admin.filters.rewrite is not None and admin.filters.rewrite.path is not None
    match = routes.select("GET", "/admin/users", httpx.Headers({}))
    assert match is not None
    assert rewritten_path("/admin/users", match[0], admin.filters.rewrite.path) == "//users"
    assert rewritten_path("/admin", match[0], admin.filters.rewrite.path) == "/"
    canary = route(routes, "/x", {"x-debug": "1"})
    assert sole_backend(canary) == "consul-chain:canary.web.default.dc1"
    assert canary is not None
    assert canary.policy == Policy(retries=5, retry_on=frozenset({401, 409}))
    assert canary.filters.rewrite is None
    assert sole_backend(route(routes, "/x", {"x-debug": "2"})) == "consul-chain:web.default.dc1"
    assert sole_backend(route(routes, "/admin", {"x-debug": "1"})) == "consul-chain:admin.default.dc1"
    assert set(mapping.services) == {
        "CONSUL_CHAIN:ADMIN_DEFAULT_DC1",
        "CONSUL_CHAIN:CANARY_WEB_DEFAULT_DC1",
        "CONSUL_CHAIN:WEB_DEFAULT_DC1",
    }
    assert targets(mapping, "CONSUL_CHAIN:CANARY_WEB_DEFAULT_DC1") == [("canary.web.default.dc1", 0)]
    assert mapping.table.source == "consul:web"


def test_the_table_is_attached_to_the_called_host() -> None:
    chain = parse_chain_json((FIXTURES / "chain-http-path-routing.json").read_bytes())
    mapping = map_chain(chain, called="web-api", version="42")
    assert list(mapping.table.services) == ["WEB_API"]
    assert mapping.table.version == "42"
    assert mapping.table.lookup("WEB_API", 80) is not None


# -- features beyond the examples ---------------------------------------------------------------------------------


def chain_with(router_routes: list[dict[str, Any]], **extra_nodes: Any) -> dict[str, Any]:
    """A chain for ``web`` whose router has ``router_routes`` (each routed to a resolver named by its NextNode)."""
    nodes: dict[str, Any] = {
        "router:web": {"Type": "router", "Name": "web", "Routes": router_routes},
        "resolver:web.default.dc1": {
            "Type": "resolver",
            "Name": "web.default.dc1",
            "Resolver": {"Target": "web.default.dc1"},
        },
        "resolver:other.default.dc1": {
            "Type": "resolver",
            "Name": "other.default.dc1",
            "Resolver": {"Target": "other.default.dc1"},
        },
    }
    nodes.update(extra_nodes)
    return {
        "Chain": {
            "ServiceName": "web",
            "Protocol": "http",
            "StartNode": "router:web",
            "Nodes": nodes,
            "Targets": {
                "web.default.dc1": {"ID": "web.default.dc1", "Service": "web"},
                "other.default.dc1": {"ID": "other.default.dc1", "Service": "other"},
            },
        }
    }


def to_other(http: dict[str, Any], destination: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "Definition": {"Match": {"HTTP": http}, "Destination": destination or {}},
        "NextNode": "resolver:other.default.dc1",
    }


DEFAULT_ROUTE = {"Definition": {"Match": {"HTTP": {"PathPrefix": "/"}}}, "NextNode": "resolver:web.default.dc1"}


def mapped(*routes: dict[str, Any]) -> HostRoutes:
    return routes_of(map_chain(parse_chain(chain_with([*routes, DEFAULT_ROUTE]))))


def goes_other(routes: HostRoutes, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> bool:
    return sole_backend(route(routes, path, headers, method)) == "consul-chain:other.default.dc1"


def test_path_exact_and_regex() -> None:
    routes = mapped(to_other({"PathExact": "/a"}), to_other({"PathRegex": "/b/[0-9]+"}))
    assert goes_other(routes, "/a")
    assert not goes_other(routes, "/a/")
    assert goes_other(routes, "/b/12")
    assert not goes_other(routes, "/b/12x")  # a full match, as Envoy's safe_regex


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [
        ({"Name": "X-V", "Exact": "1"}, "1", True),
        ({"Name": "x-v", "Exact": "1"}, "2", False),
        ({"Name": "x-v", "Exact": "1", "Invert": True}, "2", True),
        ({"Name": "x-v", "Exact": "1", "Invert": True}, None, False),  # Envoy: an absent header fails, inverted too
        ({"Name": "x-v", "Prefix": "ab"}, "abc", True),
        ({"Name": "x-v", "Prefix": "ab"}, "cab", False),
        ({"Name": "x-v", "Prefix": "ab", "Invert": True}, "cab", True),
        ({"Name": "x-v", "Suffix": "bc"}, "abc", True),
        ({"Name": "x-v", "Suffix": "bc", "Invert": True}, "abc", False),
        ({"Name": "x-v", "Regex": "a+b"}, "aab", True),
        ({"Name": "x-v", "Regex": "a+b"}, "aabc", False),
        ({"Name": "x-v", "Regex": "a+b", "Invert": True}, "aabc", True),
        ({"Name": "x-v", "Present": True}, "", True),
        ({"Name": "x-v", "Present": True}, None, False),
        ({"Name": "x-v", "Present": True, "Invert": True}, None, True),
        ({"Name": "x-v", "Present": True, "Invert": True}, "1", False),
    ],
)
def test_header_matches(header: dict[str, Any], value: str | None, expected: bool) -> None:
    routes = mapped(to_other({"Header": [header]}))
    assert goes_other(routes, "/", {} if value is None else {"x-v": value}) is expected


@pytest.mark.parametrize(
    ("param", "query", "expected"),
    [
        ({"Name": "v", "Exact": "2"}, "v=2", True),
        ({"Name": "v", "Exact": "2"}, "v=3", False),
        ({"Name": "v", "Regex": "[0-9]"}, "v=3", True),
        ({"Name": "v", "Regex": "[0-9]"}, "v=33", False),
        ({"Name": "v", "Present": True}, "v=", True),
        ({"Name": "v", "Present": True}, "w=1", False),
    ],
)
def test_query_param_matches(param: dict[str, Any], query: str, expected: bool) -> None:
    routes = mapped(to_other({"QueryParam": [param]}))
    assert routes.reads_query
    assert goes_other(routes, "/?" + query) is expected


def test_methods_are_alternatives_and_the_rest_applies_to_each() -> None:
    routes = mapped(to_other({"PathPrefix": "/m", "Methods": ["GET", "PUT"], "Header": [{"Name": "x", "Exact": "1"}]}))
    assert goes_other(routes, "/m", {"x": "1"}, "GET")
    assert goes_other(routes, "/m", {"x": "1"}, "PUT")
    assert not goes_other(routes, "/m", {"x": "1"}, "POST")
    assert not goes_other(routes, "/m", {}, "PUT")


def test_routes_are_tried_in_order() -> None:
    first = to_other({"PathPrefix": "/a"})
    second = {"Definition": {"Match": {"HTTP": {"PathExact": "/a/b"}}}, "NextNode": "resolver:web.default.dc1"}
    routes = mapped(first, second)
    assert goes_other(routes, "/a/b")  # the prefix route comes first, as in Envoy's route list


def test_request_headers_and_response_headers() -> None:
    destination = {
        "RequestHeaders": {"Add": {"X-A": "1"}, "Set": {"X-S": "2"}, "Remove": ["X-R", "X-A2"]},
        "ResponseHeaders": {"Set": {"X-Out": "v"}},
    }
    rule = route(mapped(to_other({"PathPrefix": "/h"}, destination)), "/h")
    assert rule is not None and rule.filters.request_headers is not None
    headers = httpx.Headers([("x-r", "gone"), ("x-s", "old"), ("x-a", "0")])
    modify(headers, rule.filters.request_headers)
    assert headers.get_list("x-a") == ["0,1"]  # appended (meshlib joins with ",": the same list per RFC 9110)
    assert headers.get_list("x-s") == ["2"]
    assert "x-r" not in headers
    assert rule.filters.response_headers is not None
    assert rule.filters.response_headers.set == (("x-out", "v"),)


def test_removed_then_added_header_keeps_only_the_added_value() -> None:
    """Envoy removes before it adds; meshlib removes last: a name in both becomes a set."""
    destination = {"RequestHeaders": {"Add": {"X-A": "new"}, "Remove": ["x-a"]}}
    rule = route(mapped(to_other({"PathPrefix": "/h"}, destination)), "/h")
    assert rule is not None and rule.filters.request_headers is not None
    headers = httpx.Headers([("x-a", "old")])
    modify(headers, rule.filters.request_headers)
    assert headers.get_list("x-a") == ["new"]


@pytest.mark.parametrize(
    ("destination", "policy"),
    [
        ({"RequestTimeout": "1m30s"}, Policy(timeout=90.0)),
        ({"RequestTimeout": "250ms"}, Policy(timeout=0.25)),
        ({"NumRetries": 3, "RetryOnStatusCodes": [503]}, Policy(retries=3, retry_on=frozenset({503}))),
        ({"RetryOnConnectFailure": True}, Policy(retries=1, retry_on=frozenset())),
        ({"NumRetries": 2, "RetryOn": ["gateway-error"]}, Policy(retries=2, retry_on=frozenset({502, 503, 504}))),
        ({"NumRetries": 4}, Policy(retries=0)),  # Envoy: a retry policy naming no condition retries nothing
        ({"NumRetries": 50, "RetryOn": ["reset"]}, Policy(retries=10, retry_on=frozenset())),
        ({}, Policy()),
    ],
)
def test_destination_policy(destination: dict[str, Any], policy: Policy) -> None:
    rule = route(mapped(to_other({"PathPrefix": "/p"}, destination)), "/p")
    assert rule is not None
    assert rule.policy == policy


def test_resolver_request_timeout_applies_when_the_route_sets_none() -> None:
    document = chain_with([DEFAULT_ROUTE])
    document["Chain"]["Nodes"]["resolver:web.default.dc1"]["Resolver"]["RequestTimeout"] = "3s"
    rule = route(routes_of(map_chain(parse_chain(document))), "/")
    assert rule is not None and rule.policy.timeout == 3.0


def splitter(*splits: tuple[float, str]) -> dict[str, Any]:
    return {"Type": "splitter", "Name": "web", "Splits": [{"Weight": w, "NextNode": n} for w, n in splits]}


@pytest.mark.parametrize(
    ("weights", "expected"),
    [((33.33, 66.67), [3333, 6667]), ((0.29, 99.71), [29, 9971]), ((50, 50), [5000, 5000])],
)
def test_split_weights_with_two_decimals_are_exact_integers(weights: tuple[float, float], expected: list[int]) -> None:
    """0.29 * 100 is 28.999999999999996 in binary floating point: the hundredths are rounded, not truncated."""
    split = splitter((weights[0], "resolver:web.default.dc1"), (weights[1], "resolver:other.default.dc1"))
    document = chain_with([], **{"splitter:web": split})
    document["Chain"]["StartNode"] = "splitter:web"
    rule = route(routes_of(map_chain(parse_chain(document))), "/")
    assert rule is not None
    assert [b.weight for b in rule.backends] == expected


def test_nested_splitters_multiply_exactly() -> None:
    inner = splitter((50, "resolver:web.default.dc1"), (50, "resolver:other.default.dc1"))
    outer = splitter((10, "splitter:inner"), (90, "resolver:web.default.dc1"))
    document = chain_with([], **{"splitter:web": outer, "splitter:inner": inner})
    document["Chain"]["StartNode"] = "splitter:web"
    rule = route(routes_of(map_chain(parse_chain(document))), "/")
    assert rule is not None
    assert [(b.service, b.weight) for b in rule.backends] == [
        ("consul-chain:web.default.dc1", 500),
        ("consul-chain:other.default.dc1", 500),
        ("consul-chain:web.default.dc1", 9000),
    ]


def test_split_request_headers_go_on_the_backend() -> None:
    split = splitter((100, "resolver:web.default.dc1"))
    split["Splits"][0]["Definition"] = {"RequestHeaders": {"Set": {"x-leg": "a"}}}
    document = chain_with([], **{"splitter:web": split})
    document["Chain"]["StartNode"] = "splitter:web"
    rule = route(routes_of(map_chain(parse_chain(document))), "/")
    assert rule is not None and rule.backends[0].filters.request_headers is not None
    assert rule.backends[0].filters.request_headers.set == (("x-leg", "a"),)


def test_load_balancer_ring_hash_on_a_header() -> None:
    document = chain_with([DEFAULT_ROUTE])
    document["Chain"]["Nodes"]["resolver:web.default.dc1"]["LoadBalancer"] = {
        "Policy": "ring_hash",
        "RingHashConfig": {"MinimumRingSize": 1024},
        "HashPolicies": [{"Field": "header", "FieldValue": "X-User"}, {"Field": "cookie", "FieldValue": "s"}],
    }
    mapping = map_chain(parse_chain(document))
    config = mapping.services["CONSUL_CHAIN:WEB_DEFAULT_DC1"][0]
    assert (config.lb, config.hash_header) == ("ring_hash", "x-user")
    assert any("RingHashConfig" in note for note in mapping.unsupported)
    assert any("HashPolicies[1]: hashing on cookie" in note for note in mapping.unsupported)


@pytest.mark.parametrize(
    ("policy", "lb"),
    [("", None), ("round_robin", "round_robin"), ("least_request", "least_request"), ("random", "random"),
     ("maglev", "ring_hash")],
)  # fmt: skip
def test_load_balancer_policies(policy: str, lb: str | None) -> None:
    document = chain_with([DEFAULT_ROUTE])
    document["Chain"]["Nodes"]["resolver:web.default.dc1"]["LoadBalancer"] = {"Policy": policy}
    config = map_chain(parse_chain(document)).services["CONSUL_CHAIN:WEB_DEFAULT_DC1"][0]
    assert config.lb == lb
    assert config.hash_header is None


def test_failover_lists_each_target_once_at_its_first_priority() -> None:
    document = chain_with([DEFAULT_ROUTE])
    resolver = document["Chain"]["Nodes"]["resolver:web.default.dc1"]["Resolver"]
    resolver["Failover"] = {
        "Targets": ["other.default.dc1", "web.default.dc1"],
        "Policy": {"Mode": "order-by-locality"},
    }
    mapping = map_chain(parse_chain(document))
    assert targets(mapping, "CONSUL_CHAIN:WEB_DEFAULT_DC1") == [("web.default.dc1", 0), ("other.default.dc1", 1)]
    assert any("order-by-locality" in note for note in mapping.unsupported)


# -- refusals -------------------------------------------------------------------------------------------------------


def broken(edit: Any) -> dict[str, Any]:
    document = copy.deepcopy(json.loads((FIXTURES / "chain-http-path-routing.json").read_text()))
    edit(document["Chain"])
    return document


ROUTER = 'Chain.Nodes["router:web"]'


@pytest.mark.parametrize(
    ("edit", "path", "message"),
    [
        (lambda c: c.pop("StartNode"), "Chain.StartNode", "missing"),
        (lambda c: c.update(StartNode="router:nope"), "Chain.StartNode", "is not one of Chain.Nodes"),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][0].update(NextNode="resolver:gone"),
            f"{ROUTER}.Routes[0].NextNode",
            "is not one of Chain.Nodes",
        ),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][0].update(NextNode="router:web"),
            f"{ROUTER}.Routes[0].NextNode",
            "is a router",
        ),
        (
            lambda c: c["Nodes"]["resolver:web.default.dc1"]["Resolver"].update(Target="nope"),
            'Chain.Nodes["resolver:web.default.dc1"].Resolver.Target',
            "is not one of Chain.Targets",
        ),
        (
            lambda c: c["Targets"]["canary.web.default.dc1"]["Subset"].update(Filter="Service.Meta.flavor = x"),
            'Chain.Targets["canary.web.default.dc1"].Subset.Filter',
            "expected a match expression",
        ),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][0]["Definition"]["Destination"].update(RequestTimeout="5"),
            f"{ROUTER}.Routes[0].Definition.Destination.RequestTimeout",
            "is not a duration",
        ),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][1]["Definition"]["Match"]["HTTP"]["Header"][0].update(
                Prefix="x"
            ),
            f"{ROUTER}.Routes[1].Definition.Match.HTTP.Header[0]",
            "exactly one of",
        ),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][0]["Definition"]["Match"]["HTTP"].update(
                PathPrefix="", PathRegex="/a.*"
            ),
            f"{ROUTER}.Routes[0].Definition.Destination.PrefixRewrite",
            "needs a PathPrefix or PathExact",
        ),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][2]["Definition"]["Match"]["HTTP"].update(PathRegex="(?=x)"),
            f"{ROUTER}.Routes[2].Definition.Match.HTTP",
            "more than one of",
        ),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][2]["Definition"]["Match"]["HTTP"].update(
                PathPrefix=None, PathRegex="(?=x)"
            ),
            f"{ROUTER}.Routes[2].Definition.Match.HTTP.PathRegex",
            "look-around",
        ),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][2]["Definition"]["Destination"].update(
                RequestHeaders={"Set": {"x-ip": "%DOWNSTREAM_REMOTE_ADDRESS%"}}
            ),
            f'{ROUTER}.Routes[2].Definition.Destination.RequestHeaders.Set["x-ip"]',
            "Envoy variable",
        ),
        (
            lambda c: c["Nodes"]["router:web"]["Routes"][1]["Definition"]["Destination"].update(RetryOn=["bogus"]),
            f"{ROUTER}.Routes[1].Definition.Destination.RetryOn[0]",
            "expected one of",
        ),
        (
            lambda c: c["Nodes"]["router:web"].update(
                Routes=[c["Nodes"]["router:web"]["Routes"][0]] * (MAX_ROUTES + 1)
            ),
            f"{ROUTER}.Routes",
            f"at most {MAX_ROUTES}",
        ),
        (lambda c: c["Nodes"]["router:web"].update(Type="gateway"), f"{ROUTER}.Type", "expected one of"),
        (lambda c: c["Nodes"]["router:web"].update(Routes={"a": 1}), f"{ROUTER}.Routes", "expected a list"),
        (
            lambda c: c["Nodes"]["resolver:web.default.dc1"].update(LoadBalancer={"Policy": "fastest"}),
            'Chain.Nodes["resolver:web.default.dc1"].LoadBalancer.Policy',
            "expected one of",
        ),
        (
            lambda c: c["Targets"]["web.default.dc1"].update(ID="other"),
            'Chain.Targets["web.default.dc1"].ID',
            "differs from its key",
        ),
    ],
)
def test_refused_chains_name_the_field(edit: Any, path: str, message: str) -> None:
    with pytest.raises(ChainError) as caught:
        parse_chain(broken(edit))
    assert caught.value.path == path
    assert message in str(caught.value)
    assert str(caught.value).startswith("Consul discovery chain: ")


@pytest.mark.parametrize(
    ("weights", "message"),
    [((90.123, 9.877), "at most two decimals"), ((120, -20), "from 0 to 100"), ((0, 0), "sum to 0")],
)
def test_refused_split_weights(weights: tuple[float, float], message: str) -> None:
    split = splitter((weights[0], "resolver:web.default.dc1"), (weights[1], "resolver:other.default.dc1"))
    document = chain_with([], **{"splitter:web": split})
    document["Chain"]["StartNode"] = "splitter:web"
    with pytest.raises(ChainError, match=message):
        parse_chain(document)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1]", "expected an object"),
        (b"{}", "Chain: expected an object"),
        (b"{", "not JSON"),
        (b"[" * 100000, "not JSON"),
    ],
)
def test_refused_bodies(body: bytes, message: str) -> None:
    with pytest.raises(ChainError, match=message):
        parse_chain_json(body)


def test_unknown_fields_are_ignored() -> None:
    document = json.loads((FIXTURES / "chain-version-split.json").read_text())
    document["Chain"]["EnvoyExtensions"] = [{"Name": "x"}]
    document["Chain"]["Nodes"]["splitter:web"]["Future"] = {"Anything": True}
    document["Chain"]["Targets"]["v1.web.default.dc2"]["Locality"] = {"Region": "r"}
    rule = route(routes_of(map_chain(parse_chain(document))), "/")
    assert rule is not None and [b.weight for b in rule.backends] == [9000, 1000]
