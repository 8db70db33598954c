"""``meshlib explain`` / ``client.explain()``: what a call would do and why, from the request path's own decisions.

Real clients (sync and async, both libraries) with route tables installed through the API (built from the model,
as tests/routing/test_routed_calls.py does), real loopback backends for the endpoints; the consistency property
sends generated requests to a live client and checks explain named the rule each one took.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meshlib
from meshlib.policy import POLICY_EXTENSION, Policy
from meshlib.routing.decision import EXT_LOCAL, EXT_ROUTE
from meshlib.routing.explain import why_not
from meshlib.routing.model import (
    Backend,
    Fault,
    Filters,
    HeaderMatch,
    HeaderModifier,
    HostRoutes,
    Mirror,
    PathMatch,
    PathModifier,
    QueryMatch,
    Redirect,
    RouteMatch,
    RouteTable,
    Rule,
    URLRewrite,
)
from meshlib.tools.cli import main
from tests.anyio_backends import asyncio_and_trio  # noqa: F401  (the anyio_backend fixture: asyncio and trio)
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def table(parent: str, *rules: Rule) -> RouteTable:
    """One parent service's routes, in the order given (already in precedence order)."""
    entries = tuple((match, rule) for rule in rules for match in rule.matches)
    routes = HostRoutes(parent, entries, any(match.query for match, _ in entries))
    return RouteTable(services={parent.upper().replace("-", "_"): {None: routes}}, source="test.yaml", version="v7")


CANARY = Rule(
    "payments-canary",
    0,
    matches=(RouteMatch(headers=(HeaderMatch("x-canary", "Exact", "1"),)),),
    backends=(Backend("payments-v2"),),
)
CHARGE = Rule(
    "payments",
    1,
    matches=(RouteMatch(path=PathMatch("PathPrefix", "/charge"), method="POST"),),
    backends=(Backend("payments-v1", 90), Backend("payments-v2", 10)),
    policy=Policy(timeout=2.0, per_try_timeout=0.5),
)
BETA = Rule(
    "payments",
    2,
    matches=(RouteMatch(path=PathMatch("Exact", "/status"), query=(QueryMatch("beta", "Exact", "yes"),)),),
    backends=(Backend("payments-v2"),),
)
REFUND = Rule(
    "payments",
    3,
    matches=(
        RouteMatch(path=PathMatch("RegularExpression", "/refund/[0-9]+", re.compile("/refund/[0-9]+"))),
        RouteMatch(path=PathMatch("PathPrefix", "/legacy")),
    ),
    backends=(Backend("payments-v1"),),
)
RULES = (CANARY, CHARGE, BETA, REFUND)


def environ(v1: str = "static://127.0.0.1:1", v2: str = "static://127.0.0.1:2", **more: str) -> dict[str, str]:
    return {"MESHLIB_SERVICE_PAYMENTS_V1": v1, "MESHLIB_SERVICE_PAYMENTS_V2": v2, **more}


# -- why_not agrees with RouteMatch.test ------------------------------------------------------------------------

_VALUES = st.sampled_from(["1", "2", "a1", "", "1,2", "x y"])
_PATHS = st.sampled_from(["/", "/charge", "/charge/", "/charge/1", "/chargeback", "/refund/12", "/refund/x", "/a/b"])
_REGEXES = ["[0-9]+", "a.*", "1(,2)?", ".*"]


@st.composite
def _value_match(draw: st.DrawFn, cls: type[Any], names: list[str]) -> Any:
    name = draw(st.sampled_from(names))
    if draw(st.booleans()):
        return cls(name, "Exact", draw(_VALUES))
    pattern = draw(st.sampled_from(_REGEXES))
    return cls(name, "RegularExpression", pattern, re.compile(pattern))


@st.composite
def route_matches(draw: st.DrawFn) -> RouteMatch:
    kind = draw(st.sampled_from(["Exact", "PathPrefix", "RegularExpression"]))
    if kind == "RegularExpression":
        pattern = draw(st.sampled_from(["/charge/[0-9]+", "/refund/.*", "/.*"]))
        path = PathMatch(kind, pattern, re.compile(pattern))
    else:
        path = PathMatch(kind, draw(st.sampled_from(["/", "/charge", "/refund/12", "/a"])))
    return RouteMatch(
        path=path,
        method=draw(st.sampled_from([None, "GET", "POST"])),
        headers=tuple(draw(st.lists(_value_match(HeaderMatch, ["x-canary", "x-user"]), max_size=2))),
        query=tuple(draw(st.lists(_value_match(QueryMatch, ["v", "beta"]), max_size=2))),
    )


@settings(max_examples=300, deadline=None)
@given(
    match=route_matches(),
    method=st.sampled_from(["GET", "POST", "PUT"]),
    path=_PATHS,
    headers=st.lists(st.tuples(st.sampled_from(["x-canary", "x-user", "x-other"]), _VALUES), max_size=3),
    query=st.one_of(st.none(), st.dictionaries(st.sampled_from(["v", "beta", "w"]), _VALUES, max_size=2)),
)
def test_why_not_is_none_exactly_when_the_match_matches(
    match: RouteMatch, method: str, path: str, headers: list[tuple[str, str]], query: dict[str, str] | None
) -> None:
    request_headers = httpx.Headers(headers)
    reason = why_not(match, method, path, request_headers, query)
    assert (reason is None) == match.test(method, path, request_headers, query), reason


def test_why_not_says_which_condition_failed_in_words() -> None:
    headers = httpx.Headers([("x-canary", "2")])
    prefix = RouteMatch(path=PathMatch("PathPrefix", "/charge"))
    assert why_not(prefix, "GET", "/refund", headers, None) == "path /refund is not under prefix /charge"
    assert why_not(RouteMatch(method="POST"), "GET", "/", headers, None) == "method GET is not POST"
    canary = RouteMatch(headers=(HeaderMatch("x-canary", "Exact", "1"),))
    assert why_not(canary, "GET", "/", headers, None) == "header x-canary is '2', not '1'"
    assert why_not(canary, "GET", "/", httpx.Headers(), None) == "header x-canary is absent"
    beta = RouteMatch(query=(QueryMatch("beta", "Exact", "yes"),))
    assert why_not(beta, "GET", "/", headers, {"beta": "no"}) == "query parameter beta is 'no', not 'yes'"
    assert why_not(beta, "GET", "/", headers, None) == "query parameter beta is absent"
    exact = RouteMatch(path=PathMatch("Exact", "/status"))
    assert why_not(exact, "GET", "/status/x", headers, None) == "path /status/x is not /status"
    assert why_not(canary, "GET", "/", headers, None) is not None
    assert why_not(canary, "GET", "/", httpx.Headers([("x-canary", "1")]), None) is None


# -- winner, candidates and their reasons -----------------------------------------------------------------------


def test_winner_and_why_the_others_did_not_match() -> None:
    with meshlib.Client(environ=environ()) as client:
        client.mesh.install_routes(table("payments", *RULES))
        found = client.explain("POST", "http://payments/charge/9", headers={"x-canary": "2"})
    assert (found.in_mesh, found.service, found.configured, found.routes) == (True, "payments", False, "apply")
    assert (found.table_source, found.table_version) == ("test.yaml", "v7")
    assert found.winner == "payments#1"
    assert found.local is None
    rows = [(c.rule, c.match_index, c.matched, c.winner, c.why_not) for c in found.candidates]
    assert rows == [
        ("payments-canary#0", 0, False, False, "header x-canary is '2', not '1'"),
        ("payments#1", 0, True, True, None),
        ("payments#2", 0, False, False, "path /charge/9 is not /status"),
        ("payments#3", 0, False, False, "path /charge/9 does not fully match regular expression '/refund/[0-9]+'"),
        ("payments#3", 1, False, False, "path /charge/9 is not under prefix /legacy"),
    ]
    text = found.text()
    assert "2. payments#1 match 0 [POST, path prefix /charge]: MATCHED: taken" in text
    assert "winner: payments#1" in text


def test_a_later_match_that_also_matches_is_shown_as_outranked() -> None:
    with meshlib.Client(environ=environ()) as client:
        client.mesh.install_routes(table("payments", *RULES))
        found = client.explain(client.build_request("POST", "http://payments/charge", headers={"x-canary": "1"}))
    assert found.winner == "payments-canary#0"
    assert [(c.matched, c.winner) for c in found.candidates[:2]] == [(True, True), (True, False)]
    assert "matched, but an earlier entry takes precedence" in found.text()


def test_query_parameters_are_matched_and_explained() -> None:
    with meshlib.Client(environ=environ()) as client:
        client.mesh.install_routes(table("payments", *RULES))
        hit = client.explain("GET", "http://payments/status", params={"beta": "yes"})
        miss = client.explain("GET", "http://payments/status?beta=no")
    assert hit.winner == "payments#2"
    assert miss.winner is None
    assert miss.candidates[2].why_not == "query parameter beta is 'no', not 'yes'"


def test_outside_values_are_escaped() -> None:
    with meshlib.Client(environ=environ()) as client:
        client.mesh.install_routes(table("payments", *RULES))
        found = client.explain("GET", "http://payments/x", headers={"x-canary": b"\x1b[31mred\xe2\x80\xae"})
    text = found.text()
    assert "\x1b" not in text
    assert "\u202e" not in text
    assert "header x-canary is '\\x1b[31mred\\u202e', not '1'" in text
    assert "\x1b" not in json.dumps(found.to_dict(), ensure_ascii=False)


def test_explain_takes_a_request_or_method_and_url_only() -> None:
    with meshlib.Client(environ=environ()) as client:
        with pytest.raises(TypeError, match="url is missing"):
            client.explain("GET")
        with pytest.raises(TypeError, match="built request alone"):
            client.explain(client.build_request("GET", "http://payments/"), headers={"a": "b"})


# -- the policy, field by field, with its layer -----------------------------------------------------------------


def test_each_policy_layer_is_shown_as_the_source_of_the_field_it_sets() -> None:
    env = environ(
        MESHLIB_SERVICE_PAYMENTS="static://127.0.0.1:3",
        MESHLIB_RETRY_AFTER_CAP="60s",  # env
        MESHLIB_SERVICE_PAYMENTS__RETRY_BACKOFF_CAP="1s",  # service (the called one, as the request path takes it)
        MESHLIB_SERVICE_PAYMENTS__TIMEOUT="9s",  # service, then the route's 2s wins
    )
    with meshlib.Client(environ=env) as client:
        client.mesh.install_routes(table("payments", CHARGE))
        with meshlib.policy(retries=3, hedge=meshlib.HedgePolicy(max_attempts=2, delay=0.03)):  # scope
            request = client.build_request(
                "POST", "http://payments/charge", extensions={POLICY_EXTENSION: Policy(backoff_base=0.1)}
            )
            found = client.explain(request)
    assert found.policy is not None
    hedge = next(f for f in found.policy.fields if f.name == "hedge")
    assert hedge.text == "2 attempts, delay 0.03s, non-fatal 429,502,503,504, idempotent requests"
    sources = {f.name: (f.value, f.source) for f in found.policy.fields}
    assert sources == {
        "timeout": (2.0, "route"),
        "deadline": (None, "default"),
        "per_try_timeout": (0.5, "route"),
        "retries": (3, "scope"),
        "retry_on": ((502, 503, 504), "default"),
        "retry_non_idempotent": (False, "default"),
        "backoff_base": (0.1, "request"),
        "backoff_cap": (1.0, "service"),
        "retry_after_cap": (60.0, "env"),
        "hedge": (2, "scope"),
    }
    assert found.policy.deadline_by == "the policy's timeout"
    assert found.policy.deadline_s is not None and 0 < found.policy.deadline_s <= 2.0
    assert re.search(r"retries\s+3\s+scope", found.text())


def test_a_scope_deadline_is_shown_as_what_bounds_the_call() -> None:
    env = environ(MESHLIB_SERVICE_PAYMENTS="static://127.0.0.1:3")
    with meshlib.Client(environ=env) as client, meshlib.policy(deadline=0.75):
        found = client.explain("GET", "http://payments/")
    assert found.routes == "none attached"
    assert found.policy is not None
    assert found.policy.deadline_by == "the policy() scope's deadline"
    assert found.policy.deadline_s is not None and 0 < found.policy.deadline_s <= 0.75


# -- backends: shares, discovery, endpoints, balancer, budget ---------------------------------------------------


def test_backends_with_shares_and_their_endpoints_once_discovered(start_backends: BackendFactory) -> None:
    v1 = start_backends(2, prefix="v1-")
    v2 = start_backends(1, prefix="v2-")
    env = environ(static_target(v1), static_target(v2), MESHLIB_SERVICE_PAYMENTS_V2__LB="round_robin")
    with meshlib.Client(environ=env) as client:
        client.mesh.install_routes(table("payments", CHARGE))
        before = client.explain("POST", "http://payments/charge")
        assert [(b.service, b.weight, b.share, b.discovered) for b in before.backends] == [
            ("payments-v1", 90, 90.0, False),
            ("payments-v2", 10, 10.0, False),
        ]
        assert "endpoints: not discovered yet" in before.text()
        client.get("http://payments-v1/")
        client.get("http://payments-v2/")
        after = client.explain("POST", "http://payments/charge")
    first, second = after.backends
    assert first.discovered and second.discovered
    assert {e.address for e in first.endpoints} == {b.address for b in v1}
    assert [e.address for e in second.endpoints] == [v2[0].address]
    assert (first.balancer, second.balancer) == ("p2c_ewma", "round_robin")
    assert first.discovery == static_target(v1)
    assert first.budget_available is not None and first.budget_exhausted == 0
    text = after.text()
    assert f"    {v2[0].address}  weight 1  breaker closed" in text
    assert "payments-v1  weight 90  share 90%  balancer p2c_ewma" in text


@pytest.mark.anyio
async def test_async_client_explains_backends_and_endpoints(start_backends: BackendFactory) -> None:
    v1 = start_backends(1, prefix="v1-")
    v2 = start_backends(1, prefix="v2-")
    async with meshlib.AsyncClient(environ=environ(static_target(v1), static_target(v2))) as client:
        client.mesh.install_routes(table("payments", *RULES))
        await client.get("http://payments-v2/")
        found = client.explain("GET", "http://payments/", headers={"x-canary": "1"})
        charge = client.explain("POST", "http://payments/charge")
    assert found.winner == "payments-canary#0"
    (backend,) = found.backends
    assert (backend.service, backend.share, [e.address for e in backend.endpoints]) == (
        "payments-v2",
        100.0,
        [v2[0].address],
    )
    assert charge.backends[0].discovered is False


def test_filters_are_described() -> None:
    rule = Rule(
        "payments",
        0,
        matches=(RouteMatch(path=PathMatch("PathPrefix", "/charge")),),
        filters=Filters(
            request_headers=HeaderModifier(set=(("x-env", "canary"),), remove=("x-debug",)),
            response_headers=HeaderModifier(add=(("x-served-by", "mesh"),)),
            rewrite=URLRewrite(hostname="payments.internal", path=PathModifier("ReplacePrefixMatch", "/v2/charge")),
            mirrors=(Mirror("payments-shadow", 0.05),),
            fault=Fault("chaos", delay_s=0.5, delay_fraction=0.1, abort_status=503, abort_fraction=0.02, max_active=3),
        ),
        backends=(Backend("payments-v1", 1, filters=Filters(request_headers=HeaderModifier(add=(("x-v", "1"),)))),),
    )
    with meshlib.Client(environ=environ()) as client:
        client.mesh.install_routes(table("payments", rule))
        found = client.explain("GET", "http://payments/charge/7")
    described = {(f.kind, f.scope): f.description for f in found.filters + found.backends[0].filters}
    assert described == {
        ("Fault", "rule"): "chaos: delay 0.5s for 10% of calls, abort with 503 for 2% of calls, at most 3 active",
        ("RequestHeaderModifier", "rule"): "set x-env: 'canary'; remove x-debug",
        ("URLRewrite", "rule"): "Host payments.internal, path /charge/7 -> /v2/charge/7 (ReplacePrefixMatch)",
        ("RequestMirror", "rule"): "copy 5% of calls to payments-shadow",
        ("ResponseHeaderModifier", "rule"): "add x-served-by: 'mesh'",
        ("RequestHeaderModifier", "payments-v1"): "add x-v: '1'",
    }


# -- answers the routes give themselves, as the request path gives them -----------------------------------------


def test_local_answers_say_what_the_call_gets(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    zero = Rule(
        "payments",
        4,
        matches=(RouteMatch(path=PathMatch("PathPrefix", "/zero")),),
        backends=(Backend("payments-v1", 0), Backend("payments-v2", 0)),
    )
    moved = Rule(
        "payments",
        5,
        matches=(RouteMatch(path=PathMatch("PathPrefix", "/old")),),
        filters=Filters(redirect=Redirect(hostname="new.example", path=PathModifier("ReplaceFullPath", "/new"))),
    )
    with meshlib.Client(environ=environ(static_target([v1]))) as client:
        client.mesh.install_routes(table("payments", CHARGE, zero, moved))
        for method, url in (
            ("GET", "http://payments/nowhere"),
            ("GET", "http://payments/zero"),
            ("GET", "http://payments/old?a=1"),
        ):
            found = client.explain(method, url)
            response = client.request(method, url)
            assert found.local is not None
            assert found.local.status == response.status_code
            assert found.local.why == response.extensions[EXT_LOCAL]
            assert found.local.message == response.text.strip()
            assert found.local.location == response.headers.get("location")
            assert found.winner == response.extensions.get(EXT_ROUTE)
    assert v1.count == 0


def test_hosts_outside_the_mesh_and_services_without_routes() -> None:
    with meshlib.Client(environ=environ(MESHLIB_SERVICE_USERS="static://127.0.0.1:4")) as client:
        client.mesh.install_routes(table("payments", CHARGE))
        outside = client.explain("GET", "https://example.org/x")
        plain = client.explain("GET", "http://users:8080/me")
    assert (outside.in_mesh, outside.service, outside.routes, outside.policy, outside.backends) == (
        False,
        None,
        "outside the mesh",
        None,
        (),
    )
    assert "outside the mesh" in outside.text()
    assert (plain.in_mesh, plain.configured, plain.routes, plain.port) == (True, True, "none attached", 8080)
    assert [(b.service, b.share) for b in plain.backends] == [("users", 100.0)]
    assert "routes: none attached: the call goes to service users" in plain.text()


def test_a_port_without_routes_is_said_so() -> None:
    routes = HostRoutes("payments", tuple((m, CHARGE) for m in CHARGE.matches))
    only_8443 = RouteTable(services={"PAYMENTS": {8443: routes}}, source="s", version="1")
    with meshlib.Client(environ=environ(MESHLIB_SERVICE_PAYMENTS="static://127.0.0.1:5")) as client:
        client.mesh.install_routes(only_8443)
        found = client.explain("POST", "http://payments/charge")
        routed = client.explain("POST", "http://payments:8443/charge")
    assert found.routes == "none for port 80"
    assert [b.service for b in found.backends] == ["payments"]
    assert routed.winner == "payments#1"


# -- explain agrees with what calls do ---------------------------------------------------------------------------

_REQUESTS = st.tuples(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.sampled_from(["/", "/charge", "/charge/1", "/chargeback", "/status", "/refund/3", "/refund/x", "/legacy/a"]),
    st.sampled_from([None, "1", "2"]),
    st.sampled_from([None, "yes", "no"]),
)


def _request_args(method: str, path: str, canary: str | None, beta: str | None) -> dict[str, Any]:
    return {
        "method": method,
        "url": "http://payments" + path,
        "headers": {} if canary is None else {"x-canary": canary},
        "params": {} if beta is None else {"beta": beta},
    }


def test_explains_winner_is_the_rule_every_call_takes(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    with meshlib.Client(environ=environ(static_target([v1]), static_target([v2]))) as client:
        client.mesh.install_routes(table("payments", *RULES))

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(_REQUESTS)
        def check(case: tuple[str, str, str | None, str | None]) -> None:
            args = _request_args(*case)
            found = client.explain(args["method"], args["url"], headers=args["headers"], params=args["params"])
            response = client.request(**args)
            assert found.winner == response.extensions.get(EXT_ROUTE)
            assert (found.local.status if found.local else 200) == response.status_code

        check()
    assert v1.count + v2.count > 0


@pytest.mark.anyio
async def test_async_explains_winner_is_the_rule_every_call_takes(start_backends: BackendFactory) -> None:
    import random

    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    rng = random.Random(5)
    cases = [tuple(rng.choice(options) for options in _CASE_OPTIONS) for _ in range(120)]
    async with meshlib.AsyncClient(environ=environ(static_target([v1]), static_target([v2]))) as client:
        client.mesh.install_routes(table("payments", *RULES))
        for case in cases:
            args = _request_args(*case)  # type: ignore[arg-type]
            found = client.explain(args["method"], args["url"], headers=args["headers"], params=args["params"])
            response = await client.request(**args)
            assert found.winner == response.extensions.get(EXT_ROUTE), case
            assert (found.local.status if found.local else 200) == response.status_code


_CASE_OPTIONS = (
    ["GET", "POST", "PUT"],
    ["/", "/charge", "/charge/1", "/chargeback", "/status", "/refund/3", "/refund/x", "/legacy/a"],
    [None, "1", "2"],
    [None, "yes", "no"],
)


# -- the command ---------------------------------------------------------------------------------------------------


def test_cli_explain_waits_for_discovery_and_prints_endpoints(
    start_backends: BackendFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    backends = start_backends(2)
    monkeypatch.setenv("MESHLIB_SERVICE_PAYMENTS", static_target(backends))
    monkeypatch.setenv("MESHLIB_SERVICE_PAYMENTS__TIMEOUT", "3s")
    assert main(["explain", "POST", "http://payments/charge", "-H", "x-canary: 1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("POST http://payments/charge\n")
    for backend in backends:
        assert f"    {backend.address}  weight 1" in out
    assert re.search(r"timeout\s+3s\s+service", out)
    assert all(b.count == 0 for b in backends)  # nothing was sent

    assert main(["explain", "GET", "http://payments/x", "--json", "--wait", "5"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["service"] == "payments"
    assert {e["address"] for e in payload["backends"][0]["endpoints"]} == {b.address for b in backends}


def test_cli_explain_usage_and_config_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHLIB_SERVICE_PAYMENTS", "static://127.0.0.1:1")
    assert main(["explain", "GET", "http://payments/", "-H", "no colon here"]) == 2
    assert capsys.readouterr().err == (
        "meshlib: error: -H 'no colon here': expected 'NAME: VALUE', NAME an HTTP header name\n"
    )
    assert main(["explain", "GET", "http://payments/", "--wait", "-1"]) == 2
    assert "--wait" in capsys.readouterr().err
    monkeypatch.setenv("MESHLIB_SERVICE_PAYMENTS__RETRIES", "many")
    assert main(["explain", "GET", "http://payments/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "MESHLIB_SERVICE_PAYMENTS__RETRIES='many'" in err


def test_cli_explain_does_not_hang_on_discovery_that_never_answers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A DNS server that reads queries and never answers: the first query outlives --wait.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MESHLIB_SERVICE_PAYMENTS", "dns://payments.example:80")
        monkeypatch.setenv("MESHLIB_DNS_SERVERS", f"127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("MESHLIB_DNS_TIMEOUT", "2s")
        assert main(["explain", "GET", "http://payments/", "--wait", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "payments  weight 1  share 100%" in out
    assert "endpoints: not discovered yet" in out


def test_meshlib_explain_command_in_a_subprocess(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESHLIB_") or k == "MESHLIB_HTTP_LIBRARY"},
        "MESHLIB_SERVICE_PAYMENTS": static_target([backend]),
        "MESHLIB_SERVICE_PAYMENTS__RETRIES": "4",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "meshlib.tools.cli", "explain", "GET", "http://payments/orders"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"    {backend.address}  weight 1" in done.stdout
    assert re.search(r"retries\s+4\s+service", done.stdout)
    assert backend.count == 0
