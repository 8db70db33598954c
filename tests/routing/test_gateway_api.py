"""meshlib.routing.gateway_api: HTTPRoute documents compiled into a RouteTable, as the Gateway API spec says."""

from __future__ import annotations

import json
import math
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from meshlib._config import service_key
from meshlib.errors import RoutesError
from meshlib.policy import Policy
from meshlib.routing.gateway_api import MAX_DOCUMENTS, MAX_NODES, MAX_TEXT, parse_routes
from meshlib.routing.model import Fault, HostRoutes, Mirror, RouteTable
from tests.httplib import httpx

CONFORMANCE = Path(__file__).parent / "conformance"
SERVICES = ["echo", "echo-v1", "echo-v2", "payments", "payments-v1", "payments-v2", "shadow"]
SERVICES += ["infra-backend-v1", "infra-backend-v2", "infra-backend-v3"]


def services(*names: str) -> dict[str, str]:
    return {service_key(name): name for name in names or SERVICES}


def parse(text: str, **kwargs: object) -> RouteTable:
    kwargs.setdefault("services", services())
    return parse_routes(text, source="routes.yaml", **kwargs)  # type: ignore[arg-type]


def route(rules: str, *, name: str = "r", parent: str = "payments", extra: str = "") -> str:
    """One HTTPRoute document on a Service parent, ``rules`` as YAML indented under ``spec``."""
    return (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        f"metadata: {{name: {name}{extra}}}\n"
        "spec:\n"
        f"  parentRefs: [{{group: '', kind: Service, name: {parent}}}]\n"
        f"  rules:\n{rules}"
    )


def backend_of(host: HostRoutes, method: str, target: str, headers: dict[str, str] | None = None) -> str | None:
    """The first backend's service of the rule a request selects; None: no rule (404)."""
    parts = urlsplit(target)
    query = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(key, value)  # the first value of each parameter
    found = host.select(method, parts.path or "/", httpx.Headers(headers or {}), query)
    if found is None:
        return None
    return found[1].backends[0].service


def conformance(name: str, *, parent: str | None = None) -> str:
    text = (CONFORMANCE / name).read_text()
    if parent is not None:  # a Gateway route's manifest, attached to a Service parent instead
        text = text.replace("  - name: same-namespace\n", f"  - group: ''\n    kind: Service\n    name: {parent}\n")
    return text


# -- parsing --------------------------------------------------------------------------------------------------


ISSUE_EXAMPLE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payments-canary}
spec:
  parentRefs: [{group: "", kind: Service, name: payments}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: payments-v2}]
  - matches: [{path: {type: PathPrefix, value: /charge}, method: POST}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {codes: [503], attempts: 3, backoff: 50ms}
    backendRefs: [{name: payments-v1, weight: 90}, {name: payments-v2, weight: 10}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow}, percent: 5}
"""


def test_the_issue_example_compiles_to_rules_policy_and_mirror() -> None:
    table = parse(ISSUE_EXAMPLE)
    assert table.routes == ("default/payments-canary",)
    assert table.source == "routes.yaml" and table.version
    host = table.lookup(service_key("payments"), 80)
    assert host is not None and not host.reads_query
    (_, charge), (_, canary) = host.entries  # PathPrefix /charge is longer than the default "/": it comes first
    assert charge.label == "default/payments-canary#1"
    assert [(b.service, b.weight) for b in charge.backends] == [("payments-v1", 90), ("payments-v2", 10)]
    assert charge.policy == Policy(
        timeout=2.0, per_try_timeout=0.5, retries=3, retry_on={503}, backoff_base=0.05, backoff_cap=0.5
    )
    assert charge.filters.mirrors == (Mirror("shadow", 0.05),)
    assert canary.backends[0].service == "payments-v2" and canary.policy == Policy()


def test_parents_are_registered_under_their_qualified_names_too() -> None:
    table = parse(route("  - backendRefs: [{name: echo}]\n", parent="unconfigured-frontend"))
    host = table.lookup(service_key("unconfigured-frontend"), 80)  # parents may be any name
    assert host is not None
    for name in ("unconfigured-frontend.default", "unconfigured-frontend.default.svc"):
        assert table.lookup(service_key(name), 80) is host
    assert table.lookup(service_key("unconfigured-frontend.default.svc.cluster.local"), 443) is host
    other = parse(route("  - backendRefs: [{name: echo}]\n"), cluster_domain="mesh.example")
    assert other.lookup(service_key("payments.default.svc.mesh.example"), 80) is not None
    assert table.lookup(service_key("payments"), 80) is None  # no route: call the service itself


def test_json_object_array_and_list_forms() -> None:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "HTTPRoute",
        "metadata": {"name": "j", "namespace": "default"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": [{}]},
    }
    for text in (
        json.dumps(doc),
        json.dumps([doc]),
        json.dumps({"apiVersion": "v1", "kind": "List", "items": [doc]}),
        json.dumps({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRouteList", "items": [doc]}),
    ):
        table = parse(text)
        assert table.routes == ("default/j",)
        host = table.lookup("ECHO", 80)
        assert host is not None
        assert host.entries[0][1].backends == ()  # no backendRefs: every call of the rule gets a 500
    assert parse(json.dumps(doc).encode()).routes == ("default/j",)


def test_other_kinds_and_gateway_routes_are_skipped() -> None:
    text = """
apiVersion: v1
kind: Service
metadata: {name: echo}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: for-a-gateway}
spec:
  parentRefs: [{name: my-gateway}]
  rules: [{backendRefs: [{name: not-a-meshlib-service, port: 80}]}]
---
"""
    table = parse(text + route("  - backendRefs: [{name: echo}]\n"))
    assert table.routes == ("default/r",)


def test_invalid_backend_kinds_are_kept_for_their_weight() -> None:
    rules = "  - backendRefs: [{name: echo-v1, weight: 1}, {group: example.com, kind: Bucket, name: b, weight: 3}]\n"
    host = parse(route(rules)).lookup("PAYMENTS", 80)
    assert host is not None
    rule = host.entries[0][1]
    invalid = rule.backends[1]
    assert invalid.service is None and invalid.weight == 3 and invalid.invalid is not None
    assert "example.com/Bucket" in invalid.invalid
    assert rule.total_weight == 4


def test_fault_extension_filter() -> None:
    text = """
apiVersion: meshlib.dev/v1alpha1
kind: HTTPFault
metadata: {name: slow}
spec:
  delay: {fixedDelay: 2s, percentage: {value: 10.0}}
  abort: {httpStatus: 503}
  maxActiveFaults: 100
---
""" + route(
        "  - filters: [{type: ExtensionRef, extensionRef: {group: meshlib.dev, kind: HTTPFault, name: slow}}]\n"
        "    backendRefs:\n"
        "    - name: echo\n"
        "      filters: [{type: ExtensionRef, extensionRef: {group: meshlib.dev, kind: HTTPFault, name: slow}}]\n"
    )
    rule = parse(text).lookup("PAYMENTS", 80).entries[0][1]  # type: ignore[union-attr]
    expected = Fault("slow", delay_s=2.0, delay_fraction=0.1, abort_status=503, abort_fraction=1.0, max_active=100)
    assert rule.filters.fault == expected
    assert rule.backends[0].filters.fault == expected


def test_policy_mapping() -> None:
    rules = (
        "  - timeouts: {request: 0s, backendRequest: 0s}\n    retry: {attempts: 50}\n    backendRefs: [{name: echo}]\n"
        "  - matches: [{path: {value: /x}}]\n    timeouts: {request: 1h30m}\n    retry: {backoff: 1s}\n"
        "    backendRefs: [{name: echo}]\n"
    )
    entries = parse(route(rules)).lookup("PAYMENTS", 80).entries  # type: ignore[union-attr]
    by_index = {rule.index: rule.policy for _, rule in entries}
    assert by_index[0] == Policy(timeout=math.inf, per_try_timeout=math.inf, retries=10)  # clamped to Policy's max
    assert by_index[1] == Policy(timeout=5400.0, backoff_base=1.0, backoff_cap=10.0)


def test_mirror_fraction() -> None:
    rules = (
        "  - filters:\n"
        "    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 1}}}\n"
        "    - {type: RequestMirror, requestMirror: {backendRef: {name: echo}, fraction: {numerator: 1, "
        "denominator: 8}}}\n"
        "    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v1}}}\n"
        "    backendRefs: [{name: echo}]\n"
    )
    rule = parse(route(rules)).lookup("PAYMENTS", 80).entries[0][1]  # type: ignore[union-attr]
    assert rule.filters.mirrors == (Mirror("shadow", 0.01), Mirror("echo", 0.125), Mirror("echo-v1", 1.0))


# -- precedence -------------------------------------------------------------------------------------------------


# conformance/tests/mesh/httproute-matching.go (cases) with mesh/httproute-matching.yaml
MESH_MATCHING = [
    ("/", {}, "echo-v1"),
    ("/example", {}, "echo-v1"),
    ("/", {"Version": "one"}, "echo-v1"),
    ("/v2", {}, "echo-v2"),
    ("/v2/example", {}, "echo-v2"),
    ("/", {"Version": "two"}, "echo-v2"),
    ("/v2/", {}, "echo-v2"),
    ("/v2example", {}, "echo-v1"),
    ("/foo/v2/example", {}, "echo-v1"),
]


@pytest.mark.parametrize(("path", "headers", "expected"), MESH_MATCHING)
def test_mesh_httproute_matching(path: str, headers: dict[str, str], expected: str) -> None:
    table = parse(conformance("mesh-httproute-matching.yaml"), namespace="gateway-conformance-mesh")
    host = table.lookup("ECHO", 80)
    assert host is not None
    assert backend_of(host, "GET", path, headers) == expected


# conformance/tests/mesh/httproute-query-param-matching.go with mesh/httproute-query-param-matching.yaml
MESH_QUERY = [
    ("/?animal=whale", {}, "echo-v1"),
    ("/?animal=dolphin", {}, "echo-v2"),
    ("/?animal=whale&otherparam=irrelevant", {}, "echo-v1"),
    ("/?animal=dolphin&color=yellow", {}, "echo-v2"),
    ("/?color=blue", {}, None),
    ("/?animal=dog", {}, None),
    ("/?animal=whaledolphin", {}, None),
    ("/", {}, None),
    ("/path1?animal=whale", {}, "echo-v1"),
    ("/?animal=whale", {"version": "one"}, "echo-v2"),
    ("/path3?animal=shark", {}, "echo-v1"),
    ("/path4?animal=kraken", {"version": "three"}, "echo-v1"),
    ("/?animal=shark", {}, None),
    ("/path4?animal=kraken", {}, None),
    ("/path5?animal=hydra", {}, "echo-v1"),
]


@pytest.mark.parametrize(("target", "headers", "expected"), MESH_QUERY)
def test_mesh_httproute_query_param_matching(target: str, headers: dict[str, str], expected: str | None) -> None:
    table = parse(conformance("mesh-httproute-query-param-matching.yaml"), namespace="gateway-conformance-mesh")
    host = table.lookup("ECHO", 80)
    assert host is not None and host.reads_query
    assert backend_of(host, "GET", target, headers) == expected


# conformance/tests/httproute-path-match-order.go with httproute-path-match-order.yaml (on a Service parent)
PATH_ORDER = [
    ("/match/exact/one", "infra-backend-v3"),
    ("/match/exact", "infra-backend-v2"),
    ("/match", "infra-backend-v1"),
    ("/match/prefix/one/any", "infra-backend-v2"),
    ("/match/prefix/any", "infra-backend-v1"),
    ("/match/any", "infra-backend-v3"),
]


@pytest.mark.parametrize(("path", "expected"), PATH_ORDER)
def test_path_match_order(path: str, expected: str) -> None:
    table = parse(conformance("httproute-path-match-order.yaml", parent="echo"), namespace="gateway-conformance-infra")
    host = table.lookup("ECHO", 80)
    assert host is not None
    assert backend_of(host, "GET", path) == expected


def test_precedence_criteria_in_the_spec_order() -> None:
    # apis/v1/httproute_types.go, HTTPRouteRule.Matches: Exact; longest PathPrefix; method; most headers; most
    # query params; then the oldest route, then "{namespace}/{name}"; then rule order. RegularExpression: Istio's
    # place (after Exact and PathPrefix, the longer pattern first).
    older = route(
        "  - matches: [{path: {type: PathPrefix, value: /a}}]\n    backendRefs: [{name: echo-v1}]\n",
        name="zz-older",
        extra=", creationTimestamp: '2020-01-01T00:00:00Z'",
    )
    newer = route(
        "  - matches: [{path: {type: PathPrefix, value: /a}}]\n    backendRefs: [{name: echo-v2}]\n"
        "  - matches: [{path: {type: Exact, value: /a}}]\n    backendRefs: [{name: infra-backend-v1}]\n"
        "  - matches: [{path: {type: RegularExpression, value: '/a/.*/long'}}]\n    backendRefs: [{name: echo}]\n"
        "  - matches: [{path: {type: RegularExpression, value: '/a/.*'}}]\n    backendRefs: [{name: shadow}]\n"
        "  - matches: [{path: {value: /a/b}, method: GET}]\n    backendRefs: [{name: payments-v1}]\n"
        "  - matches: [{path: {value: /a/b}, headers: [{name: h, "
        "value: '1'}]}]\n    backendRefs: [{name: payments-v2}]\n"
        "  - matches: [{path: {value: /a/b}, headers: [{name: h, value: '1'}, {name: i, value: '1'}]}]\n"
        "    backendRefs: [{name: infra-backend-v2}]\n"
        "  - matches: [{path: {value: /a/b}, headers: [{name: h, value: '1'}], queryParams: [{name: q, value: '1'}]}]\n"
        "    backendRefs: [{name: infra-backend-v3}]\n",
        name="aa-newer",
        extra=", creationTimestamp: '2021-01-01T00:00:00Z'",
    )
    host = parse(older + "\n---\n" + newer).lookup("PAYMENTS", 80)
    assert host is not None
    labels = [(match.path.kind, match.path.value, rule.label) for match, rule in host.entries]
    assert labels == [
        ("Exact", "/a", "default/aa-newer#1"),
        ("PathPrefix", "/a/b", "default/aa-newer#4"),  # method
        ("PathPrefix", "/a/b", "default/aa-newer#6"),  # 2 headers
        ("PathPrefix", "/a/b", "default/aa-newer#7"),  # 1 header and 1 query param
        ("PathPrefix", "/a/b", "default/aa-newer#5"),  # 1 header
        ("PathPrefix", "/a", "default/zz-older#0"),  # older route first, whatever its name
        ("PathPrefix", "/a", "default/aa-newer#0"),
        ("RegularExpression", "/a/.*/long", "default/aa-newer#2"),
        ("RegularExpression", "/a/.*", "default/aa-newer#3"),
    ]
    assert backend_of(host, "GET", "/a/x/long") == "echo-v1"  # the prefix /a wins over the regexes
    # without timestamps, "{namespace}/{name}" decides
    plain_a = route("  - backendRefs: [{name: echo-v1}]\n", name="b-route")
    plain_b = route("  - backendRefs: [{name: echo-v2}]\n", name="a-route")
    host = parse(plain_a + "\n---\n" + plain_b).lookup("PAYMENTS", 80)
    assert [rule.route for _, rule in host.entries] == ["default/a-route", "default/b-route"]  # type: ignore[union-attr]


def test_header_names_match_case_insensitively_and_only_the_first_equivalent_counts() -> None:
    rules = (
        "  - matches: [{headers: [{name: Version, value: one}, {name: version, value: two}]}]\n"
        "    backendRefs: [{name: echo}]\n"
    )
    host = parse(route(rules)).lookup("PAYMENTS", 80)
    assert host is not None
    assert backend_of(host, "GET", "/", {"version": "one"}) == "echo"
    assert backend_of(host, "GET", "/", {"version": "two"}) is None


# -- GAMMA: ports, consumer and producer routes -------------------------------------------------------------------


def test_mesh_ports() -> None:
    # conformance/tests/mesh/mesh-ports.go: echo-v1's route is on port 80 only; echo-v2's on every port
    table = parse(conformance("mesh-ports.yaml"), namespace="gateway-conformance-mesh")
    v1_80 = table.lookup("ECHO_V1", 80)
    assert v1_80 is not None
    assert v1_80.entries[0][1].filters.response_headers.set == (("X-Header-Set", "v1"),)  # type: ignore[union-attr]
    assert table.lookup("ECHO_V1", 8080) is None  # an excluded port: no route, the call goes to the service
    for port in (80, 8080):
        v2 = table.lookup("ECHO_V2", port)
        assert v2 is not None
        assert v2.entries[0][1].filters.response_headers.set == (("X-Header-Set", "v2"),)  # type: ignore[union-attr]


def test_port_routes_merge_with_port_less_ones() -> None:
    on_80 = route("  - matches: [{path: {value: /p}}]\n    backendRefs: [{name: echo-v1}]\n", name="on-80")
    on_80 = on_80.replace("name: payments}", "name: payments, port: 80}")
    everywhere = route("  - backendRefs: [{name: echo-v2}]\n", name="everywhere")
    table = parse(on_80 + "\n---\n" + everywhere)
    assert [rule.route for _, rule in table.lookup("PAYMENTS", 80).entries] == [  # type: ignore[union-attr]
        "default/on-80",
        "default/everywhere",
    ]
    assert [rule.route for _, rule in table.lookup("PAYMENTS", 81).entries] == ["default/everywhere"]  # type: ignore[union-attr]


def test_mesh_consumer_route_applies_only_in_its_namespace() -> None:
    # conformance/tests/mesh/mesh-consumer-route.go
    text = conformance("mesh-consumer-route.yaml")
    consumer = parse(text, namespace="gateway-conformance-mesh-consumer")
    host = consumer.lookup(service_key("echo-v1.gateway-conformance-mesh"), 80)
    assert host is not None
    assert host.entries[0][1].filters.response_headers.set == (("X-Header-Set", "set"),)  # type: ignore[union-attr]
    producer_side = parse(text, namespace="gateway-conformance-mesh")
    assert producer_side.lookup(service_key("echo-v1.gateway-conformance-mesh"), 80) is None
    assert producer_side.routes == ()


def test_consumer_routes_replace_the_producer_routes_for_their_namespace() -> None:
    producer = route("  - backendRefs: [{name: echo-v1}]\n", name="producer", extra=", namespace: shop")
    producer = producer.replace("name: payments}", "name: payments, namespace: shop}")
    consumer = route("  - backendRefs: [{name: echo-v2}]\n", name="consumer", extra=", namespace: web")
    consumer = consumer.replace("name: payments}", "name: payments, namespace: shop}")
    text = producer + "\n---\n" + consumer
    for namespace, expected in (("web", "web/consumer"), ("shop", "shop/producer"), ("other", "shop/producer")):
        table = parse(text, namespace=namespace)
        host = table.lookup(service_key("payments.shop"), 80)
        assert host is not None
        assert [rule.route for _, rule in host.entries] == [expected]
        assert table.routes == (expected,)


def test_consumer_routes_of_other_namespaces_are_not_checked_against_the_services() -> None:
    other = route("  - backendRefs: [{name: only-in-their-cluster}]\n", extra=", namespace: other")
    other = other.replace("name: payments}", "name: payments, namespace: shop}")
    assert parse(other, namespace="web").routes == ()
    with pytest.raises(RoutesError, match="only-in-their-cluster"):
        parse(other, namespace="other")


def test_hostnames_are_validated_and_ignored_on_service_parents() -> None:
    text = route("  - backendRefs: [{name: echo}]\n").replace("spec:\n", "spec:\n  hostnames: [example.com]\n")
    host = parse(text).lookup("PAYMENTS", 80)
    assert host is not None
    assert backend_of(host, "GET", "/", {"host": "other.example"}) == "echo"


# -- validation errors: one per class -----------------------------------------------------------------------------


def error(text: str, **kwargs: object) -> RoutesError:
    with pytest.raises(RoutesError) as caught:
        parse(text, **kwargs)
    return caught.value


def assert_error(exc: RoutesError, document: str, path: str, expected: str) -> None:
    message = str(exc)
    assert exc.source == "routes.yaml" and "routes.yaml" in message
    assert exc.document == document and document in message
    assert exc.path == path and path in message
    assert expected in message


R = "document 1 (HTTPRoute r)"
CASES = [
    # (rules YAML, path, expected text)
    ("  - backendRefs: [{name: ehco}]\n", "spec.rules[0].backendRefs[0].name", "configured: echo, echo-v1"),
    ("  - backendRefs: [{name: echo, weight: 1000001}]\n", "spec.rules[0].backendRefs[0].weight", "0 to 1,000,000"),
    ("  - backendRefs: [{name: echo, weight: -1}]\n", "spec.rules[0].backendRefs[0].weight", "0 to 1,000,000"),
    ("  - matches: [{path: {value: foo}}]\n", "spec.rules[0].matches[0].path.value", "starting with '/'"),
    ("  - matches: [{path: {value: /a//b}}]\n", "spec.rules[0].matches[0].path.value", "without '//'"),
    ("  - matches: [{path: {type: Prefix}}]\n", "spec.rules[0].matches[0].path.type", "Exact, PathPrefix or Regular"),
    (
        "  - matches: [{path: {type: RegularExpression, value: '(['}}]\n",
        "spec.rules[0].matches[0].path.value",
        "regular expression",
    ),
    (
        "  - matches: [{headers: [{name: 'a b', value: x}]}]\n",
        "spec.rules[0].matches[0].headers[0].name",
        "RFC 7230 token",
    ),
    (
        '  - matches: [{headers: [{name: a, value: "x\\ny"}]}]\n',
        "spec.rules[0].matches[0].headers[0].value",
        "without CR, LF or NUL",
    ),
    (
        "  - matches: [{headers: [{name: a, value: x}, {name: a, value: y}]}]\n",
        "spec.rules[0].matches[0].headers[1].name",
        "unique",
    ),
    ("  - matches: [{method: FETCH}]\n", "spec.rules[0].matches[0].method", "one of GET"),
    (
        "  - matches: [{queryParams: [{name: q, value: ''}]}]\n",
        "spec.rules[0].matches[0].queryParams[0].value",
        "1 to 1024",
    ),
    ("  - timeouts: {request: 1.5s}\n", "spec.rules[0].timeouts.request", "GEP-2257"),
    (
        "  - timeouts: {request: 1s, backendRequest: 2s}\n",
        "spec.rules[0].timeouts.backendRequest",
        "at most timeouts.request",
    ),
    ("  - retry: {attempts: 0}\n", "spec.rules[0].retry.attempts", "an integer >= 1"),
    ("  - retry: {codes: [200]}\n", "spec.rules[0].retry.codes[0]", "400 to 599"),
    (
        "  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]\n",
        "spec.rules[0].filters[0].requestRedirect.statusCode",
        "301, 302, 303, 307, 308",
    ),
    (
        "  - filters: [{type: RequestRedirect, requestRedirect: {}}]\n    backendRefs: [{name: echo}]\n",
        "spec.rules[0].filters",
        "no RequestRedirect filter in a rule with backendRefs",
    ),
    (
        "  - filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]\n",
        "spec.rules[0].filters",
        "not both",
    ),
    (
        "  - filters: [{type: URLRewrite, urlRewrite: {}}, {type: URLRewrite, urlRewrite: {}}]\n",
        "spec.rules[0].filters[1].type",
        "at most one URLRewrite",
    ),
    (
        "  - matches: [{path: {type: Exact, value: /a}}]\n    filters: [{type: URLRewrite, "
        "urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n",
        "spec.rules[0].matches",
        "exactly one PathPrefix match",
    ),
    (
        "  - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /b}}}]\n",
        "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
        "no replacePrefixMatch",
    ),
    (
        "  - filters: [{type: RequestHeaderModifier, responseHeaderModifier: {}}]\n",
        "spec.rules[0].filters[0].responseHeaderModifier",
        "when type is RequestHeaderModifier",
    ),
    (
        "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: x}], "
        "remove: [A]}}]\n",
        "spec.rules[0].filters[0].requestHeaderModifier.remove[0]",
        "one action per header name",
    ),
    (
        "  - filters: [{type: CORS, cors: {}}]\n",
        "spec.rules[0].filters[0].type",
        "CORS and ExternalAuth are not supported",
    ),
    (
        "  - filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Thing, name: t}}]\n",
        "spec.rules[0].filters[0].extensionRef",
        "an extension meshlib supports",
    ),
    (
        "  - filters: [{type: ExtensionRef, extensionRef: {group: meshlib.dev, kind: HTTPFault, name: missing}}]\n",
        "spec.rules[0].filters[0].extensionRef.name",
        "an HTTPFault in namespace default",
    ),
    (
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo}, percent: 5, "
        "fraction: {numerator: 1}}}]\n",
        "spec.rules[0].filters[0].requestMirror",
        "only one of percent or fraction",
    ),
    (
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo}, "
        "fraction: {numerator: 3, denominator: 2}}}]\n",
        "spec.rules[0].filters[0].requestMirror.fraction",
        "numerator <= denominator",
    ),
    (
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: nope}}}]\n",
        "spec.rules[0].filters[0].requestMirror.backendRef.name",
        "a configured meshlib service",
    ),
    (
        "  - backendRefs: [{name: echo, weigth: 1}]\n",
        "spec.rules[0].backendRefs[0].weigth",
        "unknown fields are refused",
    ),
    ("  - name: a\n  - name: a\n", "spec.rules[1].name", "rule names unique"),
    ("  - sessionPersistence: {}\n", "spec.rules[0].sessionPersistence", "unsupported"),
    ("".join("  - backendRefs: [{name: echo}]\n" for _ in range(17)), "spec.rules", "at most 16 items"),
    ("  - matches: [" + ", ".join(["{}"] * 65) + "]\n", "spec.rules[0].matches", "at most 64 items"),
    ("".join("  - matches: [" + ", ".join(["{}"] * 60) + "]\n" for _ in range(3)), "spec.rules", "at most 128 matches"),
]


@pytest.mark.parametrize(("rules", "path", "expected"), CASES, ids=[case[1] + ":" + case[2][:20] for case in CASES])
def test_validation_errors_name_source_document_path_and_expectation(rules: str, path: str, expected: str) -> None:
    assert_error(error(route(rules)), R, path, expected)


def test_parent_errors() -> None:
    text = route("  - backendRefs: [{name: echo}]\n").replace("name: payments}", "name: payments, sectionName: http}")
    assert_error(error(text), R, "spec.parentRefs[0].sectionName", "no sectionName on a Service parent")
    text = route("  - backendRefs: [{name: echo}]\n").replace(
        "[{group: '', kind: Service, name: payments}]",
        "[{group: '', kind: Service, name: payments, port: 80}, {group: '', kind: Service, name: payments}]",
    )
    assert_error(error(text), R, "spec.parentRefs", "distinct sectionName or port")


def test_document_errors() -> None:
    assert_error(error("just text"), "document 1", "", "a Kubernetes object")
    assert_error(error("a: [b"), "document 1", "line 2 column 1", "valid YAML")
    text = "kind: HTTPRoute\napiVersion: gateway.networking.k8s.io/v2\nmetadata: {name: x}\n"
    assert_error(error(text), "document 1 (HTTPRoute x)", "apiVersion", "gateway.networking.k8s.io/v1 or v1beta1")
    doubled = route("  - backendRefs: [{name: echo}]\n")
    assert_error(
        error(doubled + "\n---\n" + doubled), "document 2 (HTTPRoute r)", "metadata.name", "a unique HTTPRoute name"
    )
    stamp = route("  - {}\n", extra=", creationTimestamp: yesterday")
    assert_error(error(stamp), R, "metadata.creationTimestamp", "RFC 3339")


def test_fault_errors() -> None:
    head = "apiVersion: meshlib.dev/v1alpha1\nkind: HTTPFault\nmetadata: {name: f}\nspec: "
    doc = "document 1 (HTTPFault f)"
    assert_error(error(head + "{}"), doc, "spec", "a delay, an abort or both")
    assert_error(error(head + "{abort: {httpStatus: 700}}"), doc, "spec.abort.httpStatus", "200 to 599")
    assert_error(
        error(head + "{delay: {fixedDelay: 1s, percentage: {value: 101}}}"),
        doc,
        "spec.delay.percentage.value",
        "0.0 to 100.0",
    )
    assert_error(error(head + "{delay: {fixedDelay: 1.5}}"), doc, "spec.delay.fixedDelay", "GEP-2257")


# -- hostile input ------------------------------------------------------------------------------------------------


def test_text_over_the_size_limit_is_refused() -> None:
    exc = error("#" * (MAX_TEXT + 1))
    assert "4 MiB" in str(exc)


def test_too_many_documents_are_refused() -> None:
    exc = error("---\na: 1\n" * (MAX_DOCUMENTS + 1))
    assert f"at most {MAX_DOCUMENTS}" in str(exc)
    exc = error(json.dumps([{}] * (MAX_DOCUMENTS + 1)))
    assert f"at most {MAX_DOCUMENTS}" in str(exc)


def test_deep_nesting_is_refused() -> None:
    assert "nesting at most 64" in str(error("a: " + "[" * 70 + "]" * 70))
    assert "nesting at most 64" in str(error("[" * 100_000 + "]" * 100_000))
    assert "nesting depth" in str(error("a: " + "[" * 100_000 + "]" * 100_000))  # PyYAML's own limit (1,000)


def test_yaml_alias_bomb_is_refused_without_expanding() -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, 9):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 10)}]")
    exc = error("\n".join(lines) + "\n")
    assert f"at most {MAX_NODES}" in str(exc)


def test_values_in_messages_are_truncated_and_free_of_control_characters() -> None:
    long_name = "x" * 500 + "\x1b[31m"
    exc = error(route(f"  - backendRefs: [{{name: {json.dumps(long_name)}}}]\n"))
    message = str(exc)
    assert "\x1b" not in message and len(message) < 600
    assert "..." in message


def test_the_path_index_selects_what_a_linear_scan_selects() -> None:
    # HostRoutes.select tests only the entries the path index keeps: it must pick what testing every entry picks
    import random

    rng = random.Random(11)
    values = ["/", "/a", "/a/b", "/a/b/c", "/ab", "/b", "/a/"]
    rules = []
    for index in range(16):
        kind = rng.choice(["Exact", "PathPrefix", "PathPrefix", "RegularExpression"])
        value = rng.choice(values) if kind != "RegularExpression" else rng.choice(["/a.*", "/b", ".*c"])
        if kind != "PathPrefix" and value == "/a/":
            value = "/a"
        header = ", headers: [{name: h, value: '1'}]" if rng.random() < 0.3 else ""
        rules.append(f"  - matches: [{{path: {{type: {kind}, value: '{value}'}}{header}}}]\n")
        rules.append(f"    backendRefs: [{{name: echo, port: {index + 1}}}]\n")
    host = parse(route("".join(rules))).lookup("PAYMENTS", 80)
    assert host is not None
    for path in ["/", "/a", "/a/", "/a/b", "/a/b/", "/a/b/c/d", "/ab", "/abc", "/b", "/c", "x", "", "/a//b"]:
        for headers in ({}, {"h": "1"}):
            linear = next(
                (entry for entry in host.entries if entry[0].test("GET", path, httpx.Headers(headers), None)), None
            )
            assert host.select("GET", path, httpx.Headers(headers)) == linear, (path, headers)
