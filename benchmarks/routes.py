"""Micro-benchmark (not a test): ``HostRoutes.select`` on a 50-rule table compiled by the Gateway API parser,
the matching rule last, with httpx ``Headers``; then a client's whole route decision (the drivers' host lookup
and ``_Mesh._route``: table, match, backend draw, the call's route decision) without a table, with one rule and
with S9's 50 rules.
``python -m benchmarks.routes`` prints microseconds per select and per decision.

The 49 rules before it are what a real table holds: path prefixes, some with a method, header or query
condition, so every entry is tried (and fails) before the catch-all ``PathPrefix /`` matches.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from meshlib._config import service_key
from meshlib.routing.gateway_api import parse_routes
from meshlib.routing.model import HostRoutes

RUNS = 200_000


def table(shared: bool = False) -> HostRoutes:
    """A 50-rule table for the service ``payments``: 49 rules that do not match ``GET /charge/42``, then one.

    ``shared``: the 49 are all ``PathPrefix /charge`` (failing on their method, header or query condition), so
    the path index rules none out: the worst case, every entry tested."""
    rules = []
    for index in range(49):
        condition = ("method: POST", "headers: [{name: x-canary, value: '1'}]", "queryParams: [{name: v, value: '2'}]")
        extra = f", {condition[index % 3]}" if index % 2 or shared else ""
        value = "/charge" if shared else f"/api/v{index}"
        rules.append(
            f"  - matches: [{{path: {{type: PathPrefix, value: {value}}}{extra}}}]\n"
            "    backendRefs: [{name: payments-v2}]\n"
        )
    rules.append("  - backendRefs: [{name: payments-v1}]\n")
    # a route holds at most 16 rules: 5 routes of 10 on the same parent
    text = "---\n".join(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        f"metadata: {{name: bench-{part}}}\nspec:\n"
        "  parentRefs: [{group: '', kind: Service, name: payments}]\n  rules:\n"
        + "".join(rules[part * 10 : part * 10 + 10])
        for part in range(5)
    )
    names = ("payments", "payments-v1", "payments-v2")
    compiled = parse_routes(text, source="benchmark", services={service_key(n): n for n in names})
    host = compiled.lookup(service_key("payments"), 80)
    assert host is not None and len(host.entries) == 50
    return host


def main() -> None:
    headers = httpx.Headers({"accept": "application/json", "user-agent": "bench", "x-request-id": "abc"})
    for shared, what in ((False, "distinct path prefixes"), (True, "all PathPrefix /charge: every entry tested")):
        host = table(shared)
        query = {"v": "1"}
        found = host.select("GET", "/charge/42", headers, query)
        assert found is not None and found[1].label == "default/bench-4#9", found
        select = host.select
        start = time.perf_counter()
        for _ in range(RUNS):
            select("GET", "/charge/42", headers, query)
        elapsed = time.perf_counter() - start
        print(f"HostRoutes.select, 50 rules, match last, {what}: {elapsed / RUNS * 1e6:.2f} us ({RUNS:,} runs)")
    decisions()


def decisions() -> None:
    """The route decision of one S9 request through a real client (no I/O), per table, best of 5 runs."""
    import timeit

    import meshlib.httpx
    from benchmarks import route_tables

    tables = {"no table": None, "1 rule": route_tables.one_rule(), "50 rules (S9)": route_tables.fifty_rules()}
    base = None
    for what, routes in tables.items():
        with meshlib.httpx.Client(services={"bench": "static://127.0.0.1:8080"}, environ={}) as client:
            if routes is not None:
                client.mesh.install_routes(routes)
            request = client.build_request("GET", "http://bench" + route_tables.PATH, headers=route_tables.HEADERS)
            seconds = min(timeit.repeat(lambda: _decide(client.mesh, request), number=20_000, repeat=5)) / 20_000  # noqa: B023
        base = seconds if base is None else base
        added = "" if routes is None else f", {(seconds - base) * 1e6:.2f} us more than no table"
        print(f"route decision, {what}: {seconds * 1e6:.2f} us{added}")


def _decide(mesh: Any, request: Any) -> None:
    """What a driver does before building the call: the host lookup, then the route decision if routes apply."""
    target = mesh._router.route(request.url.host)
    if target is not None and target.routes is not None:
        mesh._route(target, request)


if __name__ == "__main__":
    main()
