"""The Istio ``AuthorizationPolicy`` engine: Istio's reference examples decided, validation errors, hostile input.

The policy cases follow the examples of Istio's ``security/v1beta1/authorization_policy.proto`` and the
istio.io authorization tasks (allow by principal, deny by path, ``notPrincipals``, ``when`` on headers, no
policy, the empty ALLOW policy, DENY precedence, namespaces, IP blocks, ports, methods).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlib.errors import ConfigError
from meshlib.security.authz import (
    MAX_DOCUMENTS,
    MAX_TEXT,
    AuthzPolicyError,
    AuthzRequest,
    PolicySet,
    header_map,
    parse_policies,
)

pytestmark = pytest.mark.one_library

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
TEST_NS = "spiffe://cluster.local/ns/test/sa/client"
DEV = "spiffe://cluster.local/ns/dev/sa/tool"
OTHER = "spiffe://cluster.local/ns/other/sa/web"


def policy(name: str, spec: str, *, namespace: str = "foo") -> str:
    """One AuthorizationPolicy document, ``spec`` written as YAML flow text."""
    return (
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )


def request(
    principal: str | None = SLEEP,
    *,
    method: str = "GET",
    path: str = "/",
    port: int | None = 8080,
    ip: str | None = "10.0.0.1",
    headers: dict[str, str] | None = None,
) -> AuthzRequest:
    return AuthzRequest(principal, ip, method, path, port, headers or {})


# Istio's first reference example: principal sleep OR namespace test, to GET /info* OR POST /data.
HTTPBIN = policy(
    "httpbin",
    """
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
    - source: {namespaces: ["test"]}
    to:
    - operation: {methods: ["GET"], paths: ["/info*"]}
    - operation: {methods: ["POST"], paths: ["/data"]}
""",
)
DENY_DEV_POST = policy(
    "deny-dev-post",
    "{action: DENY, rules: [{from: [{source: {namespaces: [dev]}}], to: [{operation: {methods: [POST]}}]}]}",
)
DENY_POST_8080 = policy(
    "deny-post-8080", '{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: ["8080"]}}]}]}'
)
ALLOW_NOTHING = policy("allow-nothing", "{}")
ALLOW_ALL = policy("allow-all", "{rules: [{}]}")
DENY_ADMIN = policy(
    "deny-admin", '{action: DENY, rules: [{to: [{operation: {paths: ["/admin/*", "*/secret", "/exact"]}}]}]}'
)
DENY_NOT_SLEEP = policy(
    "deny-not-sleep",
    '{action: DENY, rules: [{from: [{source: {notPrincipals: ["cluster.local/ns/default/sa/sleep"]}}]}]}',
)
DENY_PLAINTEXT = policy("require-mtls", '{action: DENY, rules: [{from: [{source: {notPrincipals: ["*"]}}]}]}')
ALLOW_NOT_DEV = policy("allow-not-dev", '{rules: [{from: [{source: {notNamespaces: ["dev"]}}]}]}')
WHEN_HEADER = policy("when-header", '{rules: [{when: [{key: "request.headers[X-Version]", values: ["v1*"]}]}]}')
WHEN_NOT_HEADER = policy(
    "when-not", '{action: DENY, rules: [{when: [{key: "request.headers[x-token]", notValues: ["ok"]}]}]}'
)
ALLOW_NOT_PROD = policy("not-prod", '{rules: [{when: [{key: "request.headers[x-env]", notValues: ["prod"]}]}]}')
IP_BLOCKS = policy(
    "ip", '{rules: [{from: [{source: {ipBlocks: ["203.0.113.0/24", "2001:db8::1"], notIpBlocks: ["203.0.113.4"]}}]}]}'
)
PORTS = policy("ports", '{rules: [{to: [{operation: {ports: ["8080", 9090], notMethods: [DELETE]}}]}]}')
PRINCIPAL_WILDCARDS = policy(
    "wild", '{rules: [{from: [{source: {principals: ["cluster.local/ns/default/*", "*/sa/web"]}}]}]}'
)
AUDIT_DELETE = policy("audit-delete", "{action: AUDIT, rules: [{to: [{operation: {methods: [DELETE]}}]}]}")
WHEN_SOURCE = policy(
    "when-source",
    '{rules: [{when: [{key: source.namespace, values: [default]}, {key: source.ip, values: ["10.0.0.0/8"]},'
    ' {key: destination.port, values: ["8080"]}, {key: source.principal, notValues: ["*/sa/blocked"]}]}]}',
)

CASES = [
    # (id, policies, request, allowed, deciding policy)
    ("no policy", [], request(None), True, None),
    ("allow by principal", [HTTPBIN], request(SLEEP, path="/info/x"), True, "foo/httpbin"),
    ("allow prefix matches the bare prefix", [HTTPBIN], request(SLEEP, path="/info"), True, "foo/httpbin"),
    ("allow by namespace", [HTTPBIN], request(TEST_NS, method="POST", path="/data"), True, "foo/httpbin"),
    ("allow: other principal denied", [HTTPBIN], request(OTHER, path="/info"), False, None),
    ("allow: method not listed", [HTTPBIN], request(SLEEP, method="POST", path="/info"), False, None),
    ("allow: exact path only", [HTTPBIN], request(SLEEP, method="POST", path="/data/x"), False, None),
    ("allow: no identity never matches principals", [HTTPBIN], request(None, path="/info"), False, None),
    ("deny dev POST", [DENY_DEV_POST], request(DEV, method="POST"), False, "foo/deny-dev-post"),
    ("deny dev POST: GET passes", [DENY_DEV_POST], request(DEV), True, None),
    ("deny POST on 8080", [DENY_POST_8080], request(SLEEP, method="POST"), False, "foo/deny-post-8080"),
    ("deny POST on 8080: other port", [DENY_POST_8080], request(SLEEP, method="POST", port=9090), True, None),
    ("allow-nothing", [ALLOW_NOTHING], request(SLEEP), False, None),
    ("allow-all (rules: [{}])", [ALLOW_ALL], request(None), True, "foo/allow-all"),
    (
        "DENY precedence over allow-all",
        [ALLOW_ALL, DENY_ADMIN],
        request(SLEEP, path="/admin/x"),
        False,
        "foo/deny-admin",
    ),
    ("deny path suffix", [DENY_ADMIN], request(SLEEP, path="/a/secret"), False, "foo/deny-admin"),
    ("deny path exact", [DENY_ADMIN], request(SLEEP, path="/exact"), False, "foo/deny-admin"),
    ("deny path: /exact/x passes", [DENY_ADMIN], request(SLEEP, path="/exact/x"), True, None),
    (
        "deny path: dot segments normalized",
        [DENY_ADMIN],
        request(SLEEP, path="/public/../admin/x"),
        False,
        "foo/deny-admin",
    ),
    ("deny path: repeated slashes merged", [DENY_ADMIN], request(SLEEP, path="//admin//x"), False, "foo/deny-admin"),
    ("notPrincipals: other is denied", [DENY_NOT_SLEEP], request(OTHER), False, "foo/deny-not-sleep"),
    ("notPrincipals: sleep passes", [DENY_NOT_SLEEP], request(SLEEP), True, None),
    ("notPrincipals in DENY: no identity is denied", [DENY_NOT_SLEEP], request(None), False, "foo/deny-not-sleep"),
    ("require mTLS: no identity denied", [DENY_PLAINTEXT], request(None), False, "foo/require-mtls"),
    ("require mTLS: any identity passes", [DENY_PLAINTEXT], request(OTHER), True, None),
    (
        "require mTLS: non-SPIFFE principal is none",
        [DENY_PLAINTEXT],
        request("cluster.local/ns/a/sa/b"),
        False,
        "foo/require-mtls",
    ),
    ("notNamespaces in ALLOW: other allowed", [ALLOW_NOT_DEV], request(OTHER), True, "foo/allow-not-dev"),
    ("notNamespaces in ALLOW: dev denied", [ALLOW_NOT_DEV], request(DEV), False, None),
    ("notNamespaces in ALLOW: no identity denied (fail closed)", [ALLOW_NOT_DEV], request(None), False, None),
    ("when header prefix", [WHEN_HEADER], request(headers={"x-version": "v1.2"}), True, "foo/when-header"),
    ("when header: other value", [WHEN_HEADER], request(headers={"x-version": "v2"}), False, None),
    ("when header: absent", [WHEN_HEADER], request(), False, None),
    ("when notValues: absent header matches", [WHEN_NOT_HEADER], request(), False, "foo/when-not"),
    ("when notValues: listed value passes", [WHEN_NOT_HEADER], request(headers={"x-token": "ok"}), True, None),
    ("when notValues in ALLOW: absent header matches", [ALLOW_NOT_PROD], request(None), True, "foo/not-prod"),
    ("when notValues in ALLOW: listed value", [ALLOW_NOT_PROD], request(headers={"x-env": "prod"}), False, None),
    ("when source/destination keys", [WHEN_SOURCE], request(SLEEP), True, "foo/when-source"),
    ("when source.namespace other", [WHEN_SOURCE], request(OTHER), False, None),
    ("when source.ip outside", [WHEN_SOURCE], request(SLEEP, ip="192.0.2.1"), False, None),
    ("when destination.port other", [WHEN_SOURCE], request(SLEEP, port=9090), False, None),
    ("ipBlocks CIDR", [IP_BLOCKS], request(ip="203.0.113.9"), True, "foo/ip"),
    ("ipBlocks: IPv4-mapped IPv6", [IP_BLOCKS], request(ip="::ffff:203.0.113.9"), True, "foo/ip"),
    ("ipBlocks: single IPv6", [IP_BLOCKS], request(ip="2001:db8::1"), True, "foo/ip"),
    ("ipBlocks: notIpBlocks wins", [IP_BLOCKS], request(ip="203.0.113.4"), False, None),
    ("ipBlocks: outside", [IP_BLOCKS], request(ip="198.51.100.1"), False, None),
    ("ipBlocks: unparsable source", [IP_BLOCKS], request(ip="not-an-ip"), False, None),
    ("ports (string and integer)", [PORTS], request(port=9090), True, "foo/ports"),
    ("ports: other port", [PORTS], request(port=80), False, None),
    ("ports: notMethods", [PORTS], request(method="DELETE"), False, None),
    ("principal prefix", [PRINCIPAL_WILDCARDS], request(SLEEP), True, "foo/wild"),
    ("principal suffix", [PRINCIPAL_WILDCARDS], request(OTHER), True, "foo/wild"),
    ("principal: neither", [PRINCIPAL_WILDCARDS], request(DEV), False, None),
]


@pytest.mark.parametrize(
    ("policies", "req", "allowed", "decided_by"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_istio_reference_cases(policies: list[str], req: AuthzRequest, allowed: bool, decided_by: str | None) -> None:
    decision = parse_policies("---\n".join(policies), source="policies.yaml").evaluate(req)
    assert decision.allowed is allowed, decision
    assert decision.policy == decided_by
    assert decision.reason.isprintable() and decision.reason


def test_decision_fields() -> None:
    policies = parse_policies("---\n".join([ALLOW_ALL, DENY_ADMIN, AUDIT_DELETE]), source="p.yaml")
    denied = policies.evaluate(request(path="/admin/x", method="DELETE"))
    assert (denied.allowed, denied.action, denied.rule, denied.reason) == (
        False,
        "DENY",
        0,
        "denied by policy foo/deny-admin",
    )
    assert (denied.audit, denied.audit_policy) == (True, "foo/audit-delete")
    allowed = policies.evaluate(request(path="/x"))
    assert (allowed.allowed, allowed.action, allowed.audit) == (True, "ALLOW", False)
    unmatched = parse_policies(ALLOW_NOTHING, source="p.yaml").evaluate(request())
    assert (unmatched.action, unmatched.reason) == (None, "denied: no ALLOW policy matched")


def test_rule_index_and_first_rule() -> None:
    text = policy(
        "two", "{action: DENY, rules: [{to: [{operation: {paths: [/a]}}]}, {to: [{operation: {paths: [/b]}}]}]}"
    )
    policies = parse_policies(text, source="p.yaml")
    assert policies.evaluate(request(path="/b")).rule == 1
    assert policies.evaluate(request(path="/a")).rule == 0


def test_audit_alone_never_denies() -> None:
    policies = parse_policies(AUDIT_DELETE, source="p.yaml")
    decision = policies.evaluate(request(method="DELETE"))
    assert (decision.allowed, decision.audit) == (True, True)
    assert policies.evaluate(request()).audit is False


def test_v1beta1_json_list_and_other_kinds() -> None:
    doc = {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "j"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "action": "DENY",
            "rules": [{"to": [{"operation": {"methods": ["PUT"]}}]}],
        },
    }
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "1"}}
    policies = parse_policies(json.dumps({"apiVersion": "v1", "kind": "List", "items": [other, doc]}), source="p.json")
    assert len(policies) == 1
    assert policies.evaluate(request(method="PUT")).policy == "j"
    assert parse_policies(json.dumps([other]).encode(), source="p.json").evaluate(request()).allowed


def test_header_map_and_request_namespace() -> None:
    headers = header_map([(b"X-Version", b"v1"), ("x-version", "v2"), (b"Host", b"a")])
    assert headers == {"x-version": "v1,v2", "host": "a"}
    assert request(SLEEP).namespace == "default"
    assert request(None).namespace is None
    assert request("spiffe://td/workload").namespace is None
    assert parse_policies(WHEN_HEADER, source="p").evaluate(request(headers=headers)).allowed


def test_empty_set_allows() -> None:
    assert PolicySet().evaluate(request(None)).allowed


# -- validation ---------------------------------------------------------------------------------------------------

ERRORS = [
    ("custom action", policy("c", "{action: CUSTOM, provider: {name: x}}"), "spec", "CUSTOM"),
    ("unknown action", policy("c", "{action: LOG}"), "spec.action", "ALLOW, DENY or AUDIT"),
    (
        "request principals",
        policy("c", "{rules: [{from: [{source: {requestPrincipals: [a]}}]}]}"),
        "requestPrincipals",
        "JWT",
    ),
    (
        "remote ip",
        policy("c", "{rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]}"),
        "remoteIpBlocks",
        "socket peer",
    ),
    (
        "hosts",
        policy("c", "{rules: [{to: [{operation: {hosts: [a.b]}}]}]}"),
        "spec.rules[0].to[0].operation.hosts",
        "Host",
    ),
    (
        "unknown field",
        policy("c", "{rules: [{from: [{source: {principal: [a]}}]}]}"),
        "source.principal",
        "unknown fields",
    ),
    (
        "unknown when key",
        policy("c", '{rules: [{when: [{key: "request.auth.claims[iss]", values: [a]}]}]}'),
        "when[0].key",
        "supported keys",
    ),
    ("when without values", policy("c", "{rules: [{when: [{key: source.ip}]}]}"), "when[0]", "values or notValues"),
    (
        "bad header key",
        policy("c", '{rules: [{when: [{key: "request.headers[a b]", values: [x]}]}]}'),
        "when[0].key",
        "header name",
    ),
    ("bad cidr", policy("c", "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}"), "ipBlocks[0]", "CIDR"),
    ("bad port", policy("c", '{rules: [{to: [{operation: {ports: ["80a"]}}]}]}'), "ports[0]", "port number"),
    ("port range", policy("c", "{rules: [{to: [{operation: {ports: [70000]}}]}]}"), "ports[0]", "65535"),
    (
        "middle wildcard",
        policy("c", '{rules: [{to: [{operation: {paths: ["/a/*/b"]}}]}]}'),
        "paths[0]",
        "first or last",
    ),
    ("path template", policy("c", '{rules: [{to: [{operation: {paths: ["/a/{*}"]}}]}]}'), "paths[0]", "templates"),
    ("empty value", policy("c", '{rules: [{to: [{operation: {methods: [""]}}]}]}'), "methods[0]", "non-empty"),
    ("empty list", policy("c", "{rules: [{to: [{operation: {notPaths: []}}]}]}"), "notPaths", "at least one"),
    ("empty source", policy("c", "{rules: [{from: [{source: {}}]}]}"), "from[0].source", "at least one field"),
    ("missing operation", policy("c", "{rules: [{to: [{}]}]}"), "to[0].operation", "an operation"),
    (
        "selector and targetRefs",
        policy("c", "{selector: {}, targetRefs: [{kind: Service, name: a}]}"),
        "spec",
        "only one",
    ),
    (
        "linkerd kind",
        "apiVersion: policy.linkerd.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: l}\nspec: {}\n",
        "apiVersion",
        "security.istio.io/v1",
    ),
    (
        "dry run",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: d, annotations: {istio.io/dry-run: 'true'}}\nspec: {}\n",
        "dry-run",
        "not supported",
    ),
    ("duplicate", "---\n".join([ALLOW_ALL, ALLOW_ALL]), "metadata.name", "unique"),
    ("bad name", policy("Bad_Name", "{}"), "metadata.name", "RFC 1123"),
    ("rules not a list", policy("c", "{rules: {a: 1}}"), "spec.rules", "a list"),
    ("not an object", "- 1\n- 2\n", "", "a Kubernetes object"),
]


@pytest.mark.parametrize(("text", "path", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_validation_errors(text: str, path: str, expected: str) -> None:
    with pytest.raises(AuthzPolicyError) as caught:
        parse_policies(text, source="/etc/mesh/authz.yaml")
    error = caught.value
    assert isinstance(error, ConfigError)
    message = str(error)
    assert message.startswith("/etc/mesh/authz.yaml, document ")
    assert path in message
    assert expected in message


def test_error_names_document_and_policy() -> None:
    bad = policy("deny-admin", "{action: DENY, rules: [{to: [{operation: {paths: ['']}}]}]}")
    with pytest.raises(AuthzPolicyError) as caught:
        parse_policies("---\n".join([ALLOW_ALL, bad]), source="authz.yaml")
    assert caught.value.document == "document 2 (AuthorizationPolicy deny-admin)"
    assert caught.value.path == "spec.rules[0].to[0].operation.paths[0]"
    assert "authz.yaml, document 2 (AuthorizationPolicy deny-admin): spec.rules[0].to[0].operation.paths[0]=''" in str(
        caught.value
    )


# -- hostile input ------------------------------------------------------------------------------------------------


def test_text_size_bound() -> None:
    with pytest.raises(AuthzPolicyError, match="at most 4194304 bytes"):
        parse_policies(b"#" * (MAX_TEXT + 1), source="big")


def test_alias_bomb_refused() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in range(1, 9):
        bomb += f"{'b' * level}: &{'b' * level} [*{'a' if level == 1 else 'b' * (level - 1)}] \n".replace(
            "]", ", " + ", ".join([f"*{'a' if level == 1 else 'b' * (level - 1)}"] * 9) + "]"
        )
    with pytest.raises(AuthzPolicyError, match="nodes"):
        parse_policies(bomb, source="bomb")


def test_depth_bound() -> None:
    with pytest.raises(AuthzPolicyError, match="deep"):
        parse_policies("[" * 200 + "]" * 200, source="deep")


def test_document_count_bound() -> None:
    with pytest.raises(AuthzPolicyError, match=f"at most {MAX_DOCUMENTS}"):
        parse_policies("---\na: 1\n" * (MAX_DOCUMENTS + 1), source="many")


def test_invalid_utf8_and_yaml() -> None:
    with pytest.raises(AuthzPolicyError, match="UTF-8"):
        parse_policies(b"a: \xff\xfe", source="bin")
    with pytest.raises(AuthzPolicyError, match="valid YAML"):
        parse_policies("a: [", source="y")
    with pytest.raises(AuthzPolicyError, match="valid JSON"):
        parse_policies("{", source="j")


def test_control_characters_escaped_in_errors() -> None:
    with pytest.raises(AuthzPolicyError) as caught:
        parse_policies(policy("c", '{rules: [{to: [{operation: {paths: ["/a\\x1b[31m"]}}]}]}'), source="c")
    assert "\x1b" not in str(caught.value)
    assert "\\x1b" in str(caught.value)


# -- DENY always wins ---------------------------------------------------------------------------------------------

_PATHS = st.sampled_from(["/", "/a", "/a/b", "/admin", "/admin/x", "/x/secret"])
_PRINCIPALS = st.sampled_from([None, SLEEP, DEV, OTHER, TEST_NS])
_METHODS = st.sampled_from(["GET", "POST", "DELETE"])
_SOURCES = st.sampled_from(
    [
        "",
        "from: [{source: {principals: ['cluster.local/ns/dev/*']}}], ",
        "from: [{source: {notNamespaces: [default]}}], ",
        "from: [{source: {namespaces: ['*']}}], ",
    ]
)
_OPERATIONS = st.sampled_from(
    ["", "to: [{operation: {paths: ['/admin*']}}], ", "to: [{operation: {methods: [POST], notPaths: ['/a']}}], "]
)


@settings(max_examples=300, deadline=None)
@given(
    allow_rules=st.lists(st.tuples(_SOURCES, _OPERATIONS), max_size=3),
    deny_rules=st.lists(st.tuples(_SOURCES, _OPERATIONS), min_size=1, max_size=3),
    principal=_PRINCIPALS,
    method=_METHODS,
    path=_PATHS,
)
def test_deny_always_wins(
    allow_rules: list[tuple[str, str]],
    deny_rules: list[tuple[str, str]],
    principal: str | None,
    method: str,
    path: str,
) -> None:
    def rules(items: list[tuple[str, str]]) -> str:
        return "[" + ", ".join("{" + (s + o).rstrip(", ") + "}" for s, o in items) + "]"

    deny = parse_policies(policy("deny", f"{{action: DENY, rules: {rules(deny_rules)}}}"), source="d")
    both = parse_policies(
        "---\n".join(
            [
                policy("allow", f"{{rules: {rules(allow_rules)}}}"),
                ALLOW_ALL,
                policy("deny", f"{{action: DENY, rules: {rules(deny_rules)}}}"),
            ]
        ),
        source="p",
    )
    req = request(principal, method=method, path=path)
    if not deny.evaluate(req).allowed:  # the DENY policy alone matches this request
        decision = both.evaluate(req)
        assert not decision.allowed
        assert decision.policy == "foo/deny"
    else:
        assert both.evaluate(req).allowed  # allow-all is in the set and no DENY matched
