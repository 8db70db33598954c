"""HostRoutes.select (compiled: candidates by method and path, headers read once, query parsed lazily) gives the
same answer as testing every entry's RouteMatch.test in order, on the request path's own inputs."""

from __future__ import annotations

import itertools
import re
from urllib.parse import parse_qsl

import pytest

from meshlib.routing.model import (
    HeaderMatch,
    HostRoutes,
    PathMatch,
    QueryMatch,
    QueryString,
    RouteMatch,
    Rule,
    first_query_values,
)
from tests.httplib import httpx


def _regex(value: str) -> re.Pattern[str]:
    return re.compile(value)


MATCHES = (
    RouteMatch(path=PathMatch("PathPrefix", "/api"), headers=(HeaderMatch("x-tenant", "Exact", "t1"),)),
    RouteMatch(path=PathMatch("PathPrefix", "/api"), query=(QueryMatch("region", "Exact", "eu west"),)),
    RouteMatch(
        path=PathMatch("PathPrefix", "/api"), query=(QueryMatch("page", "RegularExpression", "2", _regex("2")),)
    ),
    RouteMatch(
        path=PathMatch("PathPrefix", "/api"),
        headers=(HeaderMatch("x-tenant", "RegularExpression", "a.*", _regex("a.*")), HeaderMatch("x-b", "Exact", "1")),
    ),
    RouteMatch(path=PathMatch("Exact", "/api/orders"), method="POST"),
    RouteMatch(path=PathMatch("RegularExpression", "/v[0-9]+/.*", _regex("/v[0-9]+/.*"))),
    RouteMatch(path=PathMatch("PathPrefix", "/api"), headers=(HeaderMatch("x-multi", "Exact", "a,b"),)),
    RouteMatch(path=PathMatch("PathPrefix", "/api"), headers=(HeaderMatch("x-tenant", "Exact", "acme"),)),
    RouteMatch(),
)

REQUESTS = list(
    itertools.product(
        ("GET", "POST"),
        ("/api/orders", "/apix", "/v2/x", "/other"),
        (
            {},
            {"x-tenant": "t1"},
            {"x-tenant": "acme"},
            {"x-tenant": "abc", "x-b": "1"},
            [("x-multi", "a"), ("x-multi", "b")],
        ),
        ("", "region=eu+west", "region=eu%20west&region=x", "page=2", "page=3&page=2", "a&&region="),
    )
)


@pytest.mark.parametrize("order", [MATCHES, MATCHES[::-1], MATCHES[2:] + MATCHES[:2]])
def test_select_equals_testing_every_entry_in_order(order: tuple[RouteMatch, ...]) -> None:
    entries = tuple((match, Rule("r", i, matches=(match,))) for i, match in enumerate(order))
    routes = HostRoutes("svc", entries, reads_query=True)
    for method, path, headers, query in REQUESTS * 2:  # twice: the second pass reads the candidates cache
        request = httpx.Request(method, f"http://svc{path}?{query}", headers=headers)
        params = request.url.params
        expected = next((e for e in entries if e[0].test(method, path, request.headers, params)), None)
        assert routes.select(method, path, request.headers, QueryString(query)) is expected
        assert routes.select(method, path, request.headers, params) is expected


@pytest.mark.parametrize("raw", ["", "a=1&a=2&b", "a+b=c+d&x=%2F%41", "&&=v&k=", "k=v=w&k=z", "%zz=1"])
def test_first_query_values_is_parse_qsl_first_value(raw: str) -> None:
    expected: dict[str, str] = {}
    for name, value in parse_qsl(raw, keep_blank_values=True):
        expected.setdefault(name, value)
    assert first_query_values(raw) == expected
    assert dict(QueryString(raw)) == expected


# -- the exact-value dispatch (many rules differing only by a header or query value) -------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAMES = ("x-tenant", "x-b")
_PARAMS = ("region", "page")
_VALUES = ("a", "b", "c")
_PATHS = (
    PathMatch("PathPrefix", "/"),
    PathMatch("PathPrefix", "/api"),
    PathMatch("PathPrefix", "/api/v1"),
    PathMatch("Exact", "/api/x"),
    PathMatch("RegularExpression", "/api/[0-9]+", _regex("/api/[0-9]+")),
)


@st.composite
def _match(draw: st.DrawFn) -> RouteMatch:
    headers = tuple(
        HeaderMatch(name, "Exact", draw(st.sampled_from(_VALUES)))
        if draw(st.booleans())
        else HeaderMatch(name, "RegularExpression", "[ab]", _regex("[ab]"))
        for name in draw(st.lists(st.sampled_from(_NAMES), max_size=2, unique=True))
    )
    query = tuple(
        QueryMatch(name, "Exact", draw(st.sampled_from(_VALUES)))
        if draw(st.booleans())
        else QueryMatch(name, "RegularExpression", "[bc]", _regex("[bc]"))
        for name in draw(st.lists(st.sampled_from(_PARAMS), max_size=2, unique=True))
    )
    method = draw(st.sampled_from((None, None, "GET", "POST")))
    path = draw(st.sampled_from(_PATHS if draw(st.booleans()) else _PATHS[:4]))  # with regexes, or without
    return RouteMatch(path=path, method=method, headers=headers, query=query)


@given(
    matches=st.lists(_match(), min_size=1, max_size=30),
    method=st.sampled_from(("GET", "POST")),
    paths=st.lists(st.sampled_from(("/api/x", "/api/12", "/api/13", "/api/v1/7", "/api", "/other", "x")), min_size=1),
    header_values=st.fixed_dictionaries({name: st.sampled_from((None, *_VALUES)) for name in _NAMES}),
    param_values=st.fixed_dictionaries({name: st.sampled_from((None, *_VALUES)) for name in _PARAMS}),
)
def test_dispatch_on_exact_values_selects_what_testing_every_entry_selects(
    matches: list[RouteMatch],
    method: str,
    paths: list[str],
    header_values: dict[str, str | None],
    param_values: dict[str, str | None],
) -> None:
    entries = tuple((match, Rule("r", index, matches=(match,))) for index, match in enumerate(matches))
    routes = HostRoutes("svc", entries, any(match.query for match in matches))
    headers = httpx.Headers({name: value for name, value in header_values.items() if value is not None})
    raw_query = "&".join(f"{name}={value}" for name, value in param_values.items() if value is not None)
    params = first_query_values(raw_query)
    for path in paths:  # several paths through one table: the cache (keyed by method and index keys) is shared
        expected = next((entry for entry in entries if entry[0].test(method, path, headers, params)), None)
        assert routes.select(method, path, headers, QueryString(raw_query)) is expected
