"""meshlib.routing.filters: header changes, rewritten paths and redirect locations, from the Gateway API
conformance cases (conformance/tests/httproute-request-header-modifier.go, httproute-rewrite-path.go,
httproute-redirect-*.go at commit 4564255ac2c35d582249b3cdf261bdf51c8bca32) and the spec's own table."""

from __future__ import annotations

import pytest

from meshlib.routing.filters import modify, redirect_location, rewritten_path
from meshlib.routing.model import HeaderModifier, PathMatch, PathModifier, Redirect, RouteMatch
from tests.httplib import httpx
from tests.routing.test_gateway_api import conformance, parse


def prefix(value: str) -> RouteMatch:
    return RouteMatch(PathMatch("PathPrefix", value.rstrip("/") or "/"))


# -- RequestHeaderModifier (httproute-request-header-modifier.go) ------------------------------------------------


def test_set_overwrites_and_add_appends_with_a_comma() -> None:
    headers = httpx.Headers({"Some-Other-Header": "val", "X-Header-Set": "some-other-value"})
    modify(headers, HeaderModifier(set=(("X-Header-Set", "set-overwrites-values"),)))
    assert headers["x-header-set"] == "set-overwrites-values" and headers["some-other-header"] == "val"
    headers = httpx.Headers({"X-Header-Add": "some-other-value"})
    modify(headers, HeaderModifier(add=(("X-Header-Add", "add-appends-values"),)))
    assert headers.get_list("x-header-add") == ["some-other-value,add-appends-values"]
    headers = httpx.Headers({})
    modify(headers, HeaderModifier(add=(("X-Header-Add", "add-appends-values"),)))
    assert headers["X-Header-Add"] == "add-appends-values"


def test_multiple_actions_and_case_insensitivity() -> None:
    modifier = HeaderModifier(
        set=(("X-Header-Set-1", "header-set-1"), ("X-Header-Set-2", "header-set-2")),
        add=(
            ("X-Header-Add-1", "header-add-1"),
            ("X-Header-Add-2", "header-add-2"),
            ("X-Header-Add-3", "header-add-3"),
        ),
        remove=("X-Header-Remove-1", "X-Header-Remove-2"),
    )
    headers = httpx.Headers(
        {
            "X-Header-Set-2": "set-val-2",
            "X-Header-Add-2": "add-val-2",
            "X-Header-Remove-2": "remove-val-2",
            "Another-Header": "another-header-val",
        }
    )
    modify(headers, modifier)
    assert dict(headers) == {
        "x-header-set-1": "header-set-1",
        "x-header-set-2": "header-set-2",
        "x-header-add-1": "header-add-1",
        "x-header-add-2": "add-val-2,header-add-2",
        "x-header-add-3": "header-add-3",
        "another-header": "another-header-val",
    }
    lower = httpx.Headers(
        {
            "x-header-set": "original-val-set",
            "x-header-add": "original-val-add",
            "x-header-remove": "original-val-remove",
        }
    )
    modify(
        lower,
        HeaderModifier(
            set=(("X-Header-Set", "header-set"),), add=(("X-Header-Add", "header-add"),), remove=("X-Header-Remove",)
        ),
    )
    assert dict(lower) == {"x-header-set": "header-set", "x-header-add": "original-val-add,header-add"}


def test_a_repeated_header_is_joined_before_the_addition() -> None:
    headers = httpx.Headers([("x-a", "1"), ("x-a", "2")])
    modify(headers, HeaderModifier(add=(("X-A", "3"),)))
    assert headers.get_list("x-a") == ["1,2,3"]


# -- URLRewrite path (the spec's ReplacePrefixMatch table, httproute_types.go) ------------------------------------

SPEC_TABLE = [
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
]


@pytest.mark.parametrize(("path", "match", "replacement", "expected"), SPEC_TABLE)
def test_replace_prefix_match_spec_table(path: str, match: str, replacement: str, expected: str) -> None:
    assert rewritten_path(path, prefix(match), PathModifier("ReplacePrefixMatch", replacement)) == expected


# httproute-rewrite-path.go: request path -> path the backend sees (the manifest, compiled by the parser)
REWRITE_CASES = [
    ("/prefix/one/two", "/one/two"),
    ("/strip-prefix/three", "/three"),
    ("/strip-prefix", "/"),
    ("/full/one/two", "/one"),
    ("/full/rewrite-path-and-modify-headers/test", "/test"),
    ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
]


@pytest.mark.parametrize(("path", "expected"), REWRITE_CASES)
def test_conformance_rewrite_path(path: str, expected: str) -> None:
    table = parse(conformance("httproute-rewrite-path.yaml", parent="echo"), namespace="gateway-conformance-infra")
    host = table.lookup("ECHO", 80)
    assert host is not None
    found = host.select("GET", path, httpx.Headers({}))
    assert found is not None
    match, rule = found
    assert rule.filters.rewrite is not None and rule.filters.rewrite.path is not None
    assert rewritten_path(path, match, rule.filters.rewrite.path) == expected


# -- RequestRedirect (httproute-redirect-*.go) -------------------------------------------------------------------


def location(
    redirect: Redirect, path: str = "/p", *, scheme: str = "http", port: int | None = None, query: str = ""
) -> str:
    return redirect_location(scheme, "echo", port, path, query, prefix("/p"), redirect)


def test_redirect_path_host_and_status() -> None:
    original = RouteMatch(PathMatch("PathPrefix", "/original-prefix"))
    replace = Redirect(path=PathModifier("ReplacePrefixMatch", "/replacement-prefix"))
    assert redirect_location("http", "echo", None, "/original-prefix/lemon", "", original, replace) == (
        "http://echo/replacement-prefix/lemon"
    )
    full = Redirect(path=PathModifier("ReplaceFullPath", "/full-path-replacement"))
    assert location(full, "/full/path/original") == "http://echo/full-path-replacement"
    assert location(Redirect(hostname="example.org")) == "http://example.org/p"
    assert location(Redirect(hostname="example.org"), query="a=1&b=2") == "http://example.org/p?a=1&b=2"


# httproute-redirect-port-and-scheme.go: (listener scheme, listener port, redirect scheme, redirect port) -> URL
PORT_AND_SCHEME = [
    ("http", 80, None, None, "http://example.org/p"),
    ("http", 80, None, 80, "http://example.org/p"),
    ("http", 80, None, 8080, "http://example.org:8080/p"),
    ("http", 80, "https", None, "https://example.org/p"),
    ("http", 80, "https", 443, "https://example.org/p"),
    ("http", 80, "https", 8443, "https://example.org:8443/p"),
    ("http", 8080, None, None, "http://example.org:8080/p"),
    ("http", 8080, None, 80, "http://example.org/p"),
    ("http", 8080, "https", None, "https://example.org/p"),
    ("https", 443, None, None, "https://example.org/p"),
    ("https", 443, None, 443, "https://example.org/p"),
    ("https", 443, None, 8443, "https://example.org:8443/p"),
    ("https", 443, "http", None, "http://example.org/p"),
    ("https", 443, "http", 80, "http://example.org/p"),
    ("https", 443, "http", 8080, "http://example.org:8080/p"),
    ("http", None, None, None, "http://example.org/p"),  # the request's default port
]


@pytest.mark.parametrize(("scheme", "port", "to_scheme", "to_port", "expected"), PORT_AND_SCHEME)
def test_redirect_port_and_scheme(
    scheme: str, port: int | None, to_scheme: str | None, to_port: int | None, expected: str
) -> None:
    redirect = Redirect(scheme=to_scheme, hostname="example.org", port=to_port)
    assert location(redirect, scheme=scheme, port=port) == expected


def test_redirect_port_keeps_the_host() -> None:
    # httproute-redirect-port.go
    assert location(Redirect(port=8083), port=80) == "http://echo:8083/p"
    assert location(Redirect(port=8083, hostname="example.org"), port=80) == "http://example.org:8083/p"
    assert redirect_location("http", "::1", 8080, "/p", "", prefix("/p"), Redirect()) == "http://[::1]:8080/p"
