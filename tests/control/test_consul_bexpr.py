"""Consul filter expressions (go-bexpr) over health entries: the docs' examples, the grammar's rules, refusals."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from meshlib.control.consul.bexpr import MAX_DEPTH, MAX_EXPRESSION, BexprError, compile_filter

pytestmark = pytest.mark.one_library


def entry(service: dict[str, Any], node: dict[str, Any] | None = None, checks: Any = None) -> dict[str, Any]:
    """A ``/v1/health/service`` entry."""
    return {"Node": node or {"Node": "node-1", "Datacenter": "dc1"}, "Service": service, "Checks": checks or []}


# The agent-services example of Consul's filtering page (website/content/api-docs/features/filtering.mdx), each
# service as the Service of a health entry.
REDIS = {
    "redis1": {"ID": "redis1", "Service": "redis", "Tags": ["primary", "production"],
               "Meta": {"env": "production", "foo": "bar"}, "Port": 1234, "Address": "",
               "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False},
    "redis2": {"ID": "redis2", "Service": "redis", "Tags": ["secondary", "production"],
               "Meta": {"env": "production", "foo": "bar"}, "Port": 1235, "Address": "",
               "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False},
    "redis3": {"ID": "redis3", "Service": "redis", "Tags": ["primary", "qa"], "Meta": {"env": "qa"},
               "Port": 1234, "Address": "", "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False},
}  # fmt: skip
# The catalog example's nodes (NodeMeta -> Node.Meta).
NODES = {
    "node-1": {"Node": "node-1", "Address": "198.18.0.1", "Datacenter": "dc1",
               "Meta": {"agent": "true", "arch": "i386", "os": "darwin"}},
    "node-2": {"Node": "node-2", "Address": "198.18.0.2", "Datacenter": "dc1", "Meta": {"arch": "arm", "os": "linux"}},
    "node-4": {"Node": "node-4", "Address": "198.18.0.4", "Datacenter": "dc1",
               "Meta": {"arch": "i386", "os": "freebsd"}},
}  # fmt: skip


def selected(expression: str, entries: dict[str, dict[str, Any]]) -> list[str]:
    compiled = compile_filter(expression)
    return [name for name, value in entries.items() if compiled.matches(value)]


def test_docs_agent_example_selects_the_qa_service() -> None:
    entries = {name: entry(service) for name, service in REDIS.items()}
    assert selected('Service.Meta.env == "qa"', entries) == ["redis3"]


def test_docs_catalog_example_selects_the_linux_node() -> None:
    entries = {name: entry({"Service": "api-internal"}, node) for name, node in NODES.items()}
    assert selected('Node.Meta.os == "linux"', entries) == ["node-2"]


def test_docs_not_equal_empty_string() -> None:
    entries = {"named": entry({"Service": "web"}), "unnamed": entry({"Service": ""})}
    assert selected('Service.Service != ""', entries) == ["named"]


def test_docs_selector_forms_and_quoting() -> None:
    entries = {name: entry(service) for name, service in REDIS.items()}
    assert selected('Service.Meta["foo"] == bar', entries) == ["redis1", "redis2"]
    assert selected("Service.Meta.foo == `bar`", entries) == ["redis1", "redis2"]
    assert selected('"primary" in Service.Tags', entries) == ["redis1", "redis3"]
    assert selected("Service.Tags contains primary", entries) == ["redis1", "redis3"]
    assert selected("Service.Tags not contains primary", entries) == ["redis2"]
    assert selected("primary not in Service.Tags", entries) == ["redis2"]
    assert selected("Service.Port == 1235", entries) == ["redis2"]
    assert selected("Service.Port != 1235", entries) == ["redis1", "redis3"]
    assert selected("Service.EnableTagOverride == false", entries) == ["redis1", "redis2", "redis3"]
    assert selected("Service.Weights.Passing == 1", entries) == ["redis1", "redis2", "redis3"]


def test_docs_precedence_example_is_and_not_then_or() -> None:
    """``E1 and not E2 or E3`` equals ``(E1 and (not E2)) or E3`` on every combination (the page's example)."""
    plain = compile_filter("Service.Meta.a == 1 and not Service.Meta.b == 1 or Service.Meta.c == 1")
    grouped = compile_filter("( Service.Meta.a == 1 and (not Service.Meta.b == 1 ) ) or Service.Meta.c == 1")
    for a, b, c in itertools.product("01", repeat=3):
        value = entry({"Meta": {"a": a, "b": b, "c": c}})
        expected = (a == "1" and b != "1") or c == "1"
        assert plain.matches(value) is expected
        assert grouped.matches(value) is expected


def test_resolver_subset_filters_of_the_chain_examples() -> None:
    v1 = entry({"Service": "web", "Meta": {"version": "v1"}})
    v2 = entry({"Service": "web", "Meta": {"version": "v2"}})
    bare = entry({"Service": "web"})
    assert compile_filter("Service.Meta.version == v1").matches(v1)
    assert not compile_filter("Service.Meta.version == v1").matches(v2)
    assert not compile_filter("Service.Meta.version == v1").matches(bare)
    canary = entry({"Service": "web", "Meta": {"flavor": "canary"}})
    assert compile_filter("Service.Meta.flavor == canary").matches(canary)
    assert not compile_filter("Service.Meta.flavor == canary").matches(v1)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Service.Meta.missing == x", False),
        ("Service.Meta.missing != x", True),
        ("Service.Meta.missing contains x", False),
        ("Service.Meta.missing not contains x", True),
        ("Service.Meta.missing matches x", False),
        ("Service.Meta.missing not matches x", True),
        ("Service.Meta.missing is empty", True),
        ("Service.Meta.missing is not empty", False),
    ],
)
def test_absent_map_key_follows_not_present_disposition(expression: str, expected: bool) -> None:
    assert compile_filter(expression).matches(entry({"Meta": {"other": "x"}})) is expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('Service.ID matches "^redis[0-9]$"', True),
        ('Service.ID matches "edis"', True),  # unanchored, as Go's MatchString
        ('Service.ID not matches "^api"', True),
        ("Service.ID contains dis", True),  # substring of a string
        ("dis in Service.ID", True),
        ("Service.Meta contains env", True),  # a key of a map
        ("Service.Meta contains production", False),  # values are not keys
        ("Service.Tags is empty", False),
        ("Node.Meta is empty", True),
        ("Service.Address is empty", True),
        ("Checks is empty", True),
        ("not not Service.Port == 1234", True),
        ("(Service.Port == 1234)", True),
        ("not (Service.Port == 1234 or Service.Port == 1)", False),
        ("Service.Port==1234 and Service.ID!=redis2", True),
        ('Service.Meta.env == "prod\\u0075ction"', True),
        ("Service.Connect.Native == true", False),
        ("Service.Kind is empty", True),
    ],
)
def test_operators(expression: str, expected: bool) -> None:
    assert compile_filter(expression).matches(entry(REDIS["redis1"])) is expected


def test_fields_an_entry_lacks_read_as_zero_values() -> None:
    empty = entry({})
    assert compile_filter("Service.Tags is empty").matches(empty)
    assert compile_filter("Service.Port == 0").matches(empty)
    assert compile_filter('Service.ID == ""').matches(empty)
    assert compile_filter("Checks is not empty").matches(entry({}, checks=[{"Status": "passing"}]))


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("Service.Port == abc", "not a decimal integer"),
        ("Service.Port == 0x10", "invalid number literal"),  # go-bexpr: "0" then "x"
        ("Service.EnableTagOverride == yes", "not a boolean"),
        ("Service.Tags == x", "'==' does not apply to 'Service.Tags'"),
        ("Service.Port contains 1", "does not apply to 'Service.Port'"),
        ("Service.Meta matches x", "does not apply"),
        ("Checks.Status == passing", "'Checks.Status' is not a field meshlib evaluates"),
        ("Service.Proxy.Mode == x", "is not a field"),
        ("Service.Meta.a.b == x", "is not a field"),
        ("Service == x", "is not a field"),
        ('"/Service/ID" == x', "JSON-pointer selectors are not supported"),
        ('Service.ID == "abc', "unterminated string literal"),
        ("(Service.ID == a", "unmatched parentheses"),
        ("Service.ID ==", "expected a value"),
        ("Service.ID == 1.2.3", "invalid number literal"),
        ("Service.ID = x", "expected a match expression"),
        ("Service.ID == a AND Service.ID == b", "unexpected"),
        ("Service.ID == a and", "unexpected"),
        ("", "empty expression"),
        ('Service.ID == "\\q"', "invalid escape"),
        ('Service.ID matches "(?=a)"', "look-around"),
        ('Service.ID matches "(a"', "invalid regex"),
        ('Service.Meta["a] == x', "unterminated string literal"),
        ("x in", "expected a match expression"),
    ],
)
def test_refused_with_a_clear_error(expression: str, message: str) -> None:
    with pytest.raises(BexprError, match=r"^Subset\.Filter: ") as caught:
        compile_filter(expression, where="Subset.Filter")
    assert message in str(caught.value)


def test_bounds() -> None:
    with pytest.raises(BexprError, match="longer than"):
        compile_filter("Service.ID == " + "a" * MAX_EXPRESSION)
    deep = "(" * (MAX_DEPTH + 1) + "Service.ID == a" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(BexprError, match="nested deeper"):
        compile_filter(deep)
    nots = "not " * (MAX_DEPTH + 1) + "Service.ID == a"
    with pytest.raises(BexprError, match="nested deeper"):
        compile_filter(nots)
    ok = "(" * MAX_DEPTH + "Service.ID == a" + ")" * MAX_DEPTH
    assert compile_filter(ok).matches(entry({"ID": "a"}))
