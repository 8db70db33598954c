"""RDS: RouteConfigurations validated as gRPC's proxyless client does (NACKs name the field) and compiled into
meshlib's route table, asserted through ``HostRoutes.select`` / ``Rule.pick`` as the request path uses them, and
end to end with real clients calling real loopback backends (sync and async, both HTTP libraries)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2, extension_pb2, protocol_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2, range_pb2
from google.protobuf import wrappers_pb2

import meshlib
from meshlib.control.xds.resources import (
    CLUSTER_PREFIX,
    NoVirtualHostError,
    XdsResourceError,
    cluster_service,
    to_route_table,
    validate_listener,
    validate_route_configuration,
)
from meshlib.control.xds.resources.regex import compile_re2
from meshlib.routing.model import RouteTable, Rule
from tests.anyio_backends import asyncio_and_trio  # noqa: F401  (the anyio_backend fixture: asyncio and trio)
from tests.conftest import BackendFactory, static_target
from tests.control.xds_builders import (
    any_of,
    fault,
    hcm_listener,
    http_filter,
    percent,
    route,
    route_config,
    router_filter,
    seconds,
    virtual_host,
    weighted,
)
from tests.httplib import httpx

pytestmark = pytest.mark.timeout(120)


def table(*routes: Any, listener: Any = None, **host: Any) -> RouteTable:
    """The table a channel to ``payments`` routes on, for one virtual host holding ``routes``."""
    update = validate_route_configuration(route_config(virtual_host(*routes, **host)))
    if listener is None:
        return to_route_table(update, listener_name="payments")
    return to_route_table(
        update,
        listener_name="payments",
        http_filters=listener.http_filters,
        max_stream_duration_s=listener.max_stream_duration_s,
    )


def select(table: RouteTable, path: str = "/", method: str = "GET", **headers: str) -> Rule | None:
    """The rule a call to http://payments<path> takes (``None``: no route matched), as the request path selects."""
    routes = table.lookup("PAYMENTS", 80)
    assert routes is not None
    found = routes.select(method, path, httpx.Headers({k.replace("_", "-"): v for k, v in headers.items()}))
    return None if found is None else found[1]


def cluster(rule: Rule | None) -> str | None:
    """The single cluster of the rule selected (``None``: no rule)."""
    if rule is None:
        return None
    backend = rule.pick(random.Random(0))
    assert backend is not None and backend.service is not None
    assert backend.service.startswith(CLUSTER_PREFIX)
    return backend.service[len(CLUSTER_PREFIX) :]


def nack(config: Any) -> XdsResourceError:
    with pytest.raises(XdsResourceError) as caught:
        validate_route_configuration(config)
    return caught.value


def regex(pattern: str) -> Any:
    return regex_pb2.RegexMatcher(regex=pattern)


# -- NACKs: each names the field -----------------------------------------------------------------------------------


def test_a_bad_path_regex_is_nacked_naming_the_field() -> None:
    error = nack(route_config(virtual_host(route(prefix=None, safe_regex=regex("/a(")))))
    assert error.field_path == "virtual_hosts[0].routes[0].match.safe_regex.regex"
    assert "invalid regex '/a('" in str(error)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("(a)\\1", "backreference"),
        ("(?=a)a", "look-around"),
        ("a++", "possessive"),
        ("x{1001}", "repeat count"),
        ("\\pL+", "Unicode class"),
        ("(?U)a+", "ungreedy"),
        ("[[:^alpha:]]", "negated POSIX class"),
    ],
)
def test_regexes_re2_or_meshlib_cannot_match_alike_are_nacked(pattern: str, why: str) -> None:
    error = nack(route_config(virtual_host(route(prefix=None, safe_regex=regex(pattern)))))
    assert why in error.message


def test_re2_syntax_is_translated_to_the_same_meaning() -> None:
    assert compile_re2("[[:digit:]]+", "w").fullmatch("123")
    assert compile_re2("[[:digit:]]+", "w").fullmatch("1:2") is None  # Python alone would read a set of chars
    assert compile_re2("a$\\n", "w").fullmatch("a\n") is None  # RE2's $ is the end of the text only
    assert compile_re2("\\Qa.b\\E", "w").fullmatch("a.b")
    assert compile_re2("\\Qa.b\\E", "w").fullmatch("axb") is None
    assert compile_re2("(?<id>\\d+)\\z", "w").fullmatch("42")
    assert compile_re2("\\d", "w").fullmatch("\u0663") is None  # ASCII digits, as RE2
    assert compile_re2("\\s", "w").fullmatch("\v") is None  # RE2's \s has no \v
    assert compile_re2("\\x{263a}", "w").fullmatch("\u263a")
    with pytest.raises(XdsResourceError, match="at most 1024"):
        compile_re2("a" * 1025, "w")


def test_weights_summing_to_zero_are_nacked() -> None:
    error = nack(route_config(virtual_host(route(action=weighted(("a", 0), ("b", 0))))))
    assert error.field_path == "virtual_hosts[0].routes[0].route.weighted_clusters.clusters"
    assert "sum to 0" in error.message


def test_weights_summing_above_32_bits_are_nacked() -> None:
    error = nack(route_config(virtual_host(route(action=weighted(("a", 2**32 - 1), ("b", 1))))))
    assert error.field_path == "virtual_hosts[0].routes[0].route.weighted_clusters.clusters[1].weight"


def test_a_route_without_match_or_path_specifier_is_nacked() -> None:
    no_match = rc.Route(route=rc.RouteAction(cluster="a"))
    assert nack(route_config(virtual_host(route(), no_match))).field_path == "virtual_hosts[0].routes[1].match"
    no_path = rc.Route(match=rc.RouteMatch(headers=[rc.HeaderMatcher(name="x", present_match=True)]))
    assert nack(route_config(virtual_host(no_path))).field_path == "virtual_hosts[0].routes[0].match.path_specifier"
    separated = route(prefix=None, path_separated_prefix="/a")
    error = nack(route_config(virtual_host(separated)))
    assert error.field_path == "virtual_hosts[0].routes[0].match.path_separated_prefix"


def test_bad_header_matchers_are_nacked() -> None:
    def with_header(**matcher: Any) -> Any:
        return route_config(virtual_host(route(headers=[rc.HeaderMatcher(name="x-a", **matcher)])))

    where = "virtual_hosts[0].routes[0].match.headers[0]"
    assert nack(with_header(safe_regex_match=regex("("))).field_path == f"{where}.safe_regex_match.regex"
    assert nack(with_header(string_match=string_pb2.StringMatcher())).field_path == f"{where}.string_match"
    empty_prefix = string_pb2.StringMatcher(prefix="")
    error = nack(with_header(string_match=empty_prefix))
    assert error.field_path == f"{where}.string_match.prefix"
    assert "empty prefix" in error.message
    assert nack(with_header()).field_path == f"{where}.header_match_specifier"


@pytest.mark.parametrize(
    ("policy", "field", "text"),
    [
        (rc.RetryPolicy(retry_on="unavailable", num_retries=wrappers_pb2.UInt32Value(value=0)), "num_retries", ">= 1"),
        (
            rc.RetryPolicy(retry_on="5xx", retry_back_off=rc.RetryPolicy.RetryBackOff()),
            "retry_back_off.base_interval",
            "> 0",
        ),
        (
            rc.RetryPolicy(
                retry_on="5xx",
                retry_back_off=rc.RetryPolicy.RetryBackOff(base_interval=seconds(0.1), max_interval=seconds(0)),
            ),
            "retry_back_off.max_interval",
            "> 0",
        ),
    ],
)
def test_bad_retry_policies_are_nacked(policy: Any, field: str, text: str) -> None:
    in_route = nack(route_config(virtual_host(route(action=rc.RouteAction(cluster="a", retry_policy=policy)))))
    assert in_route.field_path == f"virtual_hosts[0].routes[0].route.retry_policy.{field}"
    assert text in in_route.message
    in_host = nack(route_config(virtual_host(route(), retry_policy=policy)))
    assert in_host.field_path == f"virtual_hosts[0].retry_policy.{field}"


def test_a_bad_hash_policy_regex_is_nacked() -> None:
    rewrite = regex_pb2.RegexMatchAndSubstitute(pattern=regex("("), substitution="x")
    header = rc.RouteAction.HashPolicy.Header(header_name="x-user", regex_rewrite=rewrite)
    action = rc.RouteAction(cluster="a", hash_policy=[rc.RouteAction.HashPolicy(header=header)])
    error = nack(route_config(virtual_host(route(action=action))))
    assert error.field_path == "virtual_hosts[0].routes[0].route.hash_policy[0].header.regex_rewrite.pattern.regex"


def test_cluster_specifier_plugins_meshlib_does_not_have_are_nacked_unless_optional() -> None:
    plugin = rc.ClusterSpecifierPlugin(
        extension=extension_pb2.TypedExtensionConfig(name="rls", typed_config=any_of(router_pb2.Router()))
    )
    uses = route(action=rc.RouteAction(cluster_specifier_plugin="rls"))
    error = nack(route_config(virtual_host(uses), cluster_specifier_plugins=[plugin]))
    assert error.field_path == "cluster_specifier_plugins[0]"
    unknown = nack(route_config(virtual_host(route(action=rc.RouteAction(cluster_specifier_plugin="nope")))))
    assert unknown.field_path == "virtual_hosts[0].routes[0].route.cluster_specifier_plugin"
    plugin.is_optional = True
    update = validate_route_configuration(
        route_config(virtual_host(uses, route("fallback")), cluster_specifier_plugins=[plugin])
    )
    assert [r.index for r in update.virtual_hosts[0].routes] == [1]  # the plugin's route is skipped, as gRPC


def test_filter_overrides_it_cannot_apply_are_nacked_unless_optional() -> None:
    router_override = route(typed_per_filter_config={"envoy.filters.http.router": any_of(router_pb2.Router())})
    error = nack(route_config(virtual_host(router_override)))
    assert error.field_path == "virtual_hosts[0].routes[0].typed_per_filter_config['envoy.filters.http.router']"
    unknown = any_of(wrappers_pb2.StringValue(value="x"))
    error = nack(route_config(virtual_host(route(), typed_per_filter_config={"custom": unknown})))
    assert error.field_path == "virtual_hosts[0].typed_per_filter_config['custom']"
    assert "not optional" in error.message
    optional = any_of(rc.FilterConfig(config=unknown, is_optional=True))
    update = validate_route_configuration(route_config(virtual_host(route(), typed_per_filter_config={"c": optional})))
    assert update.virtual_hosts[0].overrides == {}


def test_an_unnamed_route_configuration_is_nacked() -> None:
    assert nack(route_pb2.RouteConfiguration()).field_path == "name"


# -- what gRPC ignores ---------------------------------------------------------------------------------------------


def test_routes_with_query_parameters_or_cluster_header_are_skipped_as_grpc_does() -> None:
    query = route("by-query", query_parameters=[rc.QueryParameterMatcher(name="v", present_match=True)])
    by_header = route(action=rc.RouteAction(cluster_header="x-cluster"))
    routes = table(query, by_header, route("fallback"))
    assert cluster(select(routes, "/?v=1")) == "fallback"
    rule = select(routes)
    assert rule is not None and rule.index == 2


# -- virtual hosts by domain (A27) ---------------------------------------------------------------------------------


def routes_for(authority: str, *domains: tuple[str, ...]) -> str | None:
    hosts = [virtual_host(route(f"c{i}"), domains=d, name=f"vh{i}") for i, d in enumerate(domains)]
    update = validate_route_configuration(route_config(*hosts))
    try:
        found = to_route_table(update, listener_name="payments", authority=authority)
    except NoVirtualHostError:
        return None
    rules = next(iter(found.services.values()))[None]
    return rules.entries[0][1].route.rsplit("/", 1)[1]


def test_the_most_specific_domain_wins_exact_suffix_prefix_then_any() -> None:
    every = (("*",), ("pay*",), ("*ments",), ("payments",))
    assert routes_for("payments", *every) == "vh3"
    assert routes_for("payments", *every[:3]) == "vh2"
    assert routes_for("payments", *every[:2]) == "vh1"
    assert routes_for("payments", *every[:1]) == "vh0"
    assert routes_for("PAYMENTS", ("payments",)) == "vh0"  # host names compare case-insensitively
    assert routes_for("payments", ("*s",), ("*ents",)) == "vh1"  # the longer suffix
    assert routes_for("payments", ("pa*ts",), ("*",)) == "vh1"  # an invalid pattern never matches
    assert routes_for("payments", ("orders",)) is None


def test_no_matching_virtual_host_raises_for_the_caller_to_fail_calls() -> None:
    update = validate_route_configuration(route_config(virtual_host(route(), domains=("orders",))))
    with pytest.raises(NoVirtualHostError, match="no virtual host for 'payments'"):
        to_route_table(update, listener_name="payments")


# -- path matches (A28) --------------------------------------------------------------------------------------------


def test_routes_are_tried_in_order_and_a_prefix_is_a_plain_string_prefix() -> None:
    routes = table(route("foo", prefix="/foo"), route("exact", prefix=None, path="/foobar"), route("rest"))
    assert cluster(select(routes, "/foobar")) == "foo"  # first match wins (no Gateway API precedence)
    assert cluster(select(routes, "/foo/x")) == "foo"
    assert cluster(select(routes, "/fo")) == "rest"


def test_case_insensitive_prefix_and_path_and_case_sensitive_regex() -> None:
    insensitive = wrappers_pb2.BoolValue(value=False)
    routes = table(
        route("prefix", prefix="/Pay", case_sensitive=insensitive),
        route("path", prefix=None, path="/Exact", case_sensitive=insensitive),
        route("regex", prefix=None, safe_regex=regex("/r[a-z]+"), case_sensitive=insensitive),
        route("rest"),
    )
    assert cluster(select(routes, "/PAYMENTS")) == "prefix"
    assert cluster(select(routes, "/eXaCt")) == "path"
    assert cluster(select(routes, "/eXaCt/more")) == "rest"
    assert cluster(select(routes, "/rabc")) == "regex"
    assert cluster(select(routes, "/rABC")) == "rest"  # case_sensitive does not apply to safe_regex (gRPC)
    assert cluster(select(routes, "/rabc/x")) == "rest"  # a full match


# -- header matches ------------------------------------------------------------------------------------------------


def header_route(name: str, **matcher: Any) -> Any:
    return route(name, headers=[rc.HeaderMatcher(name="X-Tier", **matcher)])


@pytest.mark.parametrize(
    ("matcher", "value", "hit"),
    [
        ({"exact_match": "gold"}, "gold", True),
        ({"exact_match": "gold"}, "Gold", False),
        ({"exact_match": "gold", "invert_match": True}, "silver", True),
        ({"exact_match": "gold", "invert_match": True}, None, False),  # absent never matches, inverted or not
        ({"safe_regex_match": regex("g.l[a-z]")}, "gold", True),
        ({"safe_regex_match": regex("g.l")}, "gold", False),  # a full match
        ({"range_match": range_pb2.Int64Range(start=10, end=20)}, "10", True),
        ({"range_match": range_pb2.Int64Range(start=10, end=20)}, "20", False),
        ({"range_match": range_pb2.Int64Range(start=10, end=20)}, " 15", False),  # Go's ParseInt
        ({"range_match": range_pb2.Int64Range(start=10, end=20), "invert_match": True}, "x", True),
        ({"present_match": True}, "", True),
        ({"present_match": True}, None, False),
        ({"present_match": False}, None, True),
        ({"present_match": True, "invert_match": True}, None, True),
        ({"prefix_match": "go"}, "gold", True),
        ({"suffix_match": "ld"}, "gold", True),
        ({"contains_match": "ol"}, "gold", True),
        ({"contains_match": "ol", "invert_match": True}, "gold", False),
        ({"string_match": string_pb2.StringMatcher(exact="GOLD", ignore_case=True)}, "gold", True),
        ({"string_match": string_pb2.StringMatcher(prefix="GO", ignore_case=True)}, "gold", True),
        ({"string_match": string_pb2.StringMatcher(suffix="LD")}, "gold", False),
        ({"string_match": string_pb2.StringMatcher(safe_regex=regex("[a-z]+"))}, "gold", True),
    ],
)
def test_header_matchers_follow_grpc(matcher: dict[str, Any], value: str | None, hit: bool) -> None:
    routes = table(header_route("tier", **matcher), route("rest"))
    headers = {} if value is None else {"x_tier": value}
    assert cluster(select(routes, "/", **headers)) == ("tier" if hit else "rest")


def test_repeated_headers_are_joined_with_commas() -> None:
    routes = table(header_route("both", exact_match="a,b"), route("rest"))
    found = routes.lookup("PAYMENTS", 80)
    assert found is not None
    selected = found.select("GET", "/", httpx.Headers([("x-tier", "a"), ("x-tier", "b")]))
    assert selected is not None and cluster(selected[1]) == "both"


def test_a_method_match_becomes_the_routes_method() -> None:
    post = route(
        "post", headers=[rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact="POST"))]
    )
    routes = table(post, route("rest"))
    assert cluster(select(routes, "/", method="POST")) == "post"
    assert cluster(select(routes, "/", method="GET")) == "rest"


def test_runtime_fraction_matches_that_share_of_requests() -> None:
    never = route("never", runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=percent(0)))
    always = route(
        "always",
        runtime_fraction=base_pb2.RuntimeFractionalPercent(
            default_value=percent(1_000_000, percent_pb2.FractionalPercent.MILLION)
        ),
    )
    routes = table(never, always, route("rest"))
    assert {cluster(select(routes)) for _ in range(200)} == {"always"}
    half = route("half", runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=percent(50)))
    shares = table(half, route("rest"))
    hits = sum(cluster(select(shares)) == "half" for _ in range(4000))
    assert 1600 < hits < 2400  # 50%: a bound ~12 standard deviations wide, never flaky


# -- actions -------------------------------------------------------------------------------------------------------


def test_weighted_clusters_become_weighted_backends_named_by_cluster() -> None:
    routes = table(route(action=weighted(("v1", 30), ("zero", 0), ("v2", 70))))
    rule = select(routes)
    assert rule is not None
    assert [(b.service, b.weight) for b in rule.backends] == [(cluster_service("v1"), 30), (cluster_service("v2"), 70)]
    rng = random.Random(5)
    picks = [rule.pick(rng) for _ in range(10_000)]
    share = sum(1 for b in picks if b is not None and b.service == "xds-cluster:v2") / len(picks)
    assert abs(share - 0.70) < 0.02


def test_a_non_forwarding_route_is_kept_and_its_calls_fail() -> None:
    stop = rc.Route(match=rc.RouteMatch(prefix="/internal"), non_forwarding_action=rc.NonForwardingAction())
    routes = table(stop, route("rest"))
    rule = select(routes, "/internal/x")
    assert rule is not None
    backend = rule.pick(random.Random(0))
    assert backend is not None and backend.service is None and "non_forwarding_action" in (backend.invalid or "")
    assert cluster(select(routes, "/other")) == "rest"


def test_max_stream_duration_is_the_call_timeout_route_over_listener() -> None:
    listener = validate_listener(
        hcm_listener(common_http_protocol_options=protocol_pb2.HttpProtocolOptions(max_stream_duration=seconds(9)))
    )
    own = rc.RouteAction.MaxStreamDuration(max_stream_duration=seconds(2))
    header_max = rc.RouteAction.MaxStreamDuration(max_stream_duration=seconds(2), grpc_timeout_header_max=seconds(3))
    unlimited = rc.RouteAction.MaxStreamDuration(max_stream_duration=seconds(0))
    routes = table(
        route(prefix="/own", action=rc.RouteAction(cluster="a", max_stream_duration=own)),
        route(prefix="/header", action=rc.RouteAction(cluster="a", max_stream_duration=header_max)),
        route(prefix="/none", action=rc.RouteAction(cluster="a", max_stream_duration=unlimited)),
        route("a", prefix="/"),
        listener=listener,
    )
    timeouts = {p: select(routes, p).policy.timeout for p in ("/own", "/header", "/none", "/x")}  # type: ignore[union-attr]
    assert timeouts == {"/own": 2.0, "/header": 3.0, "/none": math.inf, "/x": 9.0}
    assert select(table(route()), "/").policy.timeout is None  # type: ignore[union-attr]  # unset: meshlib's own


def retry_policy_of(retry_on: str, **fields: Any) -> Any:
    rule = select(
        table(route(action=rc.RouteAction(cluster="a", retry_policy=rc.RetryPolicy(retry_on=retry_on, **fields))))
    )
    assert rule is not None
    return rule.policy


def test_retry_on_maps_grpc_codes_and_http_conditions_to_statuses() -> None:
    policy = retry_policy_of("unavailable, deadline-exceeded,internal,resource-exhausted,cancelled")
    assert policy.retry_on == {503, 504, 500, 429, 499}
    assert (policy.retries, policy.backoff_base, policy.backoff_cap) == (1, 0.025, 0.25)  # A44's defaults
    assert retry_policy_of("gateway-error").retry_on == {502, 503, 504}
    assert retry_policy_of("5xx").retry_on == set(range(500, 600))
    codes = retry_policy_of("retriable-status-codes", retriable_status_codes=[409, 418])
    assert codes.retry_on == {409, 418}
    transport = retry_policy_of("reset,connect-failure", num_retries=wrappers_pb2.UInt32Value(value=3))
    assert (transport.retries, transport.retry_on) == (3, frozenset())  # connection failures: meshlib's own rule
    assert retry_policy_of("unknown-thing").retries == 0  # no condition meshlib knows: no retry (as gRPC)
    many = retry_policy_of("unavailable", num_retries=wrappers_pb2.UInt32Value(value=50))
    assert (many.retries, many.max_attempts) == (10, 5)
    backoff = rc.RetryPolicy.RetryBackOff(base_interval=seconds(0.1), max_interval=seconds(0.05))
    slow = retry_policy_of("unavailable", retry_back_off=backoff)
    assert (slow.backoff_base, slow.backoff_cap) == (0.1, 0.1)  # a cap below the base is raised to it


def test_the_route_retry_policy_replaces_the_virtual_hosts() -> None:
    host_policy = rc.RetryPolicy(retry_on="gateway-error", num_retries=wrappers_pb2.UInt32Value(value=2))
    own = rc.RouteAction(cluster="a", retry_policy=rc.RetryPolicy(retry_on="unavailable"))
    routes = table(route(prefix="/own", action=own), route("a"), retry_policy=host_policy)
    inherited = select(routes, "/x")
    assert inherited is not None and (inherited.policy.retries, inherited.policy.retry_on) == (2, {502, 503, 504})
    replaced = select(routes, "/own")
    assert replaced is not None and (replaced.policy.retries, replaced.policy.retry_on) == (1, {503})


def test_hash_policies_are_kept_for_ring_hash() -> None:
    header = rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(header_name="X-User"), terminal=True)
    channel = rc.RouteAction.HashPolicy(filter_state=rc.RouteAction.HashPolicy.FilterState(key="io.grpc.channel_id"))
    other = rc.RouteAction.HashPolicy(filter_state=rc.RouteAction.HashPolicy.FilterState(key="something"))
    cookie = rc.RouteAction.HashPolicy(cookie=rc.RouteAction.HashPolicy.Cookie(name="c"))
    action = rc.RouteAction(cluster="a", hash_policy=[header, channel, other, cookie])
    update = validate_route_configuration(route_config(virtual_host(route(action=action))))
    kept = update.virtual_hosts[0].routes[0].hash_policies
    assert [(h.kind, h.header, h.terminal) for h in kept] == [("header", "x-user", True), ("channel_id", None, False)]


# -- fault injection (A33) and per-filter overrides (A39) ----------------------------------------------------------


def fault_listener(base: Any) -> Any:
    return validate_listener(hcm_listener(filters=[http_filter("fault", base), router_filter()]))


def test_the_listeners_fault_filter_applies_and_overrides_replace_it_most_specific_first() -> None:
    listener = fault_listener(fault(abort=503, abort_percent=10, max_active=4))
    route_override = {"fault": any_of(fault(delay=0.5, delay_percent=100))}
    cluster_override = {"fault": any_of(fault(grpc_abort=14, abort_percent=100))}
    split = weighted(("plain", 1), ("special", 1))
    split.weighted_clusters.clusters[1].typed_per_filter_config["fault"].CopyFrom(cluster_override["fault"])
    routes = table(
        route(prefix="/over", action=split, typed_per_filter_config=route_override),
        route("base", prefix="/"),
        listener=listener,
    )
    base = select(routes, "/x")
    assert base is not None
    (fault_of_base,) = [b.filters.fault for b in base.backends]
    assert fault_of_base is not None
    assert (fault_of_base.name, fault_of_base.abort_status, fault_of_base.abort_fraction, fault_of_base.max_active) == (
        "fault",
        503,
        0.1,
        4,
    )
    over = select(routes, "/over")
    assert over is not None
    plain, special = (b.filters.fault for b in over.backends)
    assert plain is not None and (plain.delay_s, plain.delay_fraction, plain.abort_status) == (0.5, 1.0, None)
    assert special is not None and (special.abort_status, special.delay_s) == (503, None)  # gRPC 14 -> 503


def test_a_virtual_host_override_applies_and_faults_that_inject_nothing_are_dropped() -> None:
    listener = fault_listener(fault())  # a fault filter configured to inject nothing
    routes = table(route("a"), listener=listener, typed_per_filter_config={"fault": any_of(fault(abort=418))})
    rule = select(routes)
    assert rule is not None and rule.backends[0].filters.fault is not None
    assert rule.backends[0].filters.fault.abort_status == 418
    quiet = table(route("a"), listener=listener)
    assert select(quiet).backends[0].filters.empty  # type: ignore[union-attr]
    out_of_range = table(route("a"), listener=fault_listener(fault(abort=600)))
    assert select(out_of_range).backends[0].filters.empty  # type: ignore[union-attr]  # ignored, as grpc-go


def test_overrides_for_filters_not_in_the_chain_do_nothing() -> None:
    routes = table(route("a", typed_per_filter_config={"fault": any_of(fault(abort=503))}))
    assert select(routes).backends[0].filters.empty  # type: ignore[union-attr]


# -- end to end: real clients, real backends -----------------------------------------------------------------------


def services(**clusters: Any) -> dict[str, str]:
    return {cluster_service(name): static_target(backends) for name, backends in clusters.items()}


def xds_table() -> RouteTable:
    listener = fault_listener(fault())
    stop = rc.Route(match=rc.RouteMatch(prefix="/internal"), non_forwarding_action=rc.NonForwardingAction())
    teapot = route("v1", prefix="/teapot", typed_per_filter_config={"fault": any_of(fault(abort=418))})
    canary = route("v2", headers=[rc.HeaderMatcher(name="x-canary", present_match=True)])
    return table(stop, teapot, canary, route(action=weighted(("v1", 3), ("v2", 1))), listener=listener)


def test_an_xds_route_table_steers_real_calls(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    with meshlib.Client(services=services(v1=[v1], v2=[v2])) as client:
        client.mesh.install_routes(xds_table())
        client.mesh.rng = random.Random(3)
        for _ in range(400):
            assert client.get("http://payments/charge").status_code == 200
        assert client.get("http://payments/charge", headers={"x-canary": "1"}).status_code == 200
        assert client.get("http://payments/teapot").status_code == 418
        assert client.get("http://payments/internal/x").status_code == 500
    assert v1.count + v2.count == 401
    assert 0.2 < (v2.count - 1) / 400 < 0.3  # 3:1, drawn from a seeded generator


@pytest.mark.anyio
async def test_an_xds_route_table_steers_real_async_calls(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    async with meshlib.AsyncClient(services=services(v1=[v1], v2=[v2])) as client:
        client.mesh.install_routes(xds_table())
        assert (await client.get("http://payments/c", headers={"x-canary": "yes"})).status_code == 200
        assert (await client.get("http://payments/teapot")).status_code == 418
        assert (await client.get("http://payments/internal")).status_code == 500
    assert (v1.count, v2.count) == (0, 1)
