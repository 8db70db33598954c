"""The route tables S9, S10 and the instructions count share, built from the compiled model (no YAML parsing).

Kept free of heavy imports (no numpy, no harness) so that ``benchmarks.instructions`` can build the same table
under valgrind cheaply. Every table routes calls to the service ``bench`` (key ``BENCH``); the request they are
built for is :data:`PATH` with :data:`HEADERS`, which every variant of S9 sends, routed or not, so that only
the routing differs.

The 50-rule table is a worst case for linear first-match: the rule that matches is the *last* entry, and the
49 before it fail in different ways and at different depths, as a real table's would:

* ``PathPrefix /svcN`` -- fails on the path (the cheapest miss);
* ``PathPrefix /api`` + header ``x-tenant: tN`` -- the path matches, the header value does not;
* ``PathPrefix /api`` + query ``region=rN`` -- the path matches, the query parameter does not (and its
  presence makes the table read the query string on every call);
* ``RegularExpression /v[0-9]+/svcN/.*`` -- a regex that fails;
* ``Exact /api/orders`` + method ``POST`` -- fails on the method.

The last rule: ``PathPrefix /api`` + header ``x-tenant: acme`` + query ``region=eu``, which the request meets.
"""

from __future__ import annotations

import re

from meshlib.policy import NO_POLICY, Policy
from meshlib.routing.model import (
    Backend,
    Filters,
    HeaderMatch,
    HeaderModifier,
    HostRoutes,
    Mirror,
    PathMatch,
    QueryMatch,
    RouteMatch,
    RouteTable,
    Rule,
)

SERVICE = "bench"
#: The request every S9 variant sends (path and query) and its headers.
PATH = "/api/orders?region=eu&page=2"
HEADERS = {"x-tenant": "acme", "accept": "application/json"}
RULES = 50


def table(*rules: Rule, parent: str = SERVICE) -> RouteTable:
    """One parent service's routes, in the order given (taken as the precedence order)."""
    entries = tuple((match, rule) for rule in rules for match in rule.matches)
    reads_query = any(match.query for match, _ in entries)
    routes = HostRoutes(parent, entries, reads_query)
    key = parent.upper().replace("-", "_").replace(".", "_")
    return RouteTable(services={key: {None: routes}}, source="benchmarks", version="1", routes=(parent,))


def _miss(i: int) -> RouteMatch:
    kind = i % 5
    if kind == 0:
        return RouteMatch(path=PathMatch("PathPrefix", f"/svc{i}"))
    if kind == 1:
        return RouteMatch(path=PathMatch("PathPrefix", "/api"), headers=(HeaderMatch("x-tenant", "Exact", f"t{i}"),))
    if kind == 2:
        return RouteMatch(path=PathMatch("PathPrefix", "/api"), query=(QueryMatch("region", "Exact", f"r{i}"),))
    if kind == 3:
        pattern = f"/v[0-9]+/svc{i}/.*"
        return RouteMatch(path=PathMatch("RegularExpression", pattern, re.compile(pattern)))
    return RouteMatch(path=PathMatch("Exact", "/api/orders"), method="POST")


def _last() -> RouteMatch:
    return RouteMatch(
        path=PathMatch("PathPrefix", "/api"),
        headers=(HeaderMatch("x-tenant", "Exact", "acme"),),
        query=(QueryMatch("region", "Exact", "eu"),),
    )


def one_rule() -> RouteTable:
    """(b) One rule, ``PathPrefix /api``, to ``bench`` itself."""
    return table(
        Rule("bench-one", 0, matches=(RouteMatch(path=PathMatch("PathPrefix", "/api")),), backends=(Backend(SERVICE),))
    )


def fifty_rules(*, split: bool = False) -> RouteTable:
    """(c) 50 rules, the request matching the last; (d) with ``split``: the last rule splits 90/10 between
    ``bench`` and ``bench-canary`` and sets a request header (``RequestHeaderModifier``)."""
    rules = [Rule("bench-fifty", i, matches=(_miss(i),), backends=(Backend(SERVICE),)) for i in range(RULES - 1)]
    if split:
        last = Rule(
            "bench-fifty",
            RULES - 1,
            matches=(_last(),),
            backends=(Backend(SERVICE, 90), Backend("bench-canary", 10)),
            filters=Filters(request_headers=HeaderModifier(set=(("x-route", "fifty"),))),
        )
    else:
        last = Rule("bench-fifty", RULES - 1, matches=(_last(),), backends=(Backend(SERVICE),))
    return table(*rules, last)


def mirrored(primary: str, mirror: str | None, *, timeout: float | None = None) -> RouteTable:
    """S10: every call to ``bench`` goes to ``primary``; with ``mirror``, 100% of them are mirrored to it.
    ``timeout`` is the rule's ``timeouts.request`` (mirrors inherit the call's timeout)."""
    filters = Filters(mirrors=(Mirror(mirror, 1.0),)) if mirror else Filters()
    policy = Policy(timeout=timeout) if timeout is not None else NO_POLICY
    return table(Rule("bench-mirror", 0, backends=(Backend(primary),), filters=filters, policy=policy))
