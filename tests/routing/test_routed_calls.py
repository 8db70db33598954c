"""Routed calls end to end: route tables steer real calls to real loopback backends (sync and async, both libraries).

The tables here are built from the model directly (what every routes source compiles to: the routes file, xDS,
Consul); tests/routing/test_routes_file.py loads the same behaviour from Gateway API YAML.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import anyio
import pytest

import meshlib
from meshlib import _aio
from meshlib.policy import POLICY_EXTENSION, Policy
from meshlib.routing.decision import EXT_LOCAL, EXT_ROUTE
from meshlib.routing.model import (
    Backend,
    Fault,
    Filters,
    HeaderMatch,
    HeaderModifier,
    HostRoutes,
    Mirror,
    PathMatch,
    RouteMatch,
    RouteTable,
    Rule,
)
from meshlib.testing import Behavior
from tests.anyio_backends import asyncio_and_trio  # noqa: F401  (the anyio_backend fixture: asyncio and trio)
from tests.conftest import BackendFactory, static_target

pytestmark = pytest.mark.timeout(120)


def table(parent: str, *rules: Rule) -> RouteTable:
    """One parent service's routes, in the order given (already in precedence order)."""
    entries = tuple((match, rule) for rule in rules for match in rule.matches)
    reads_query = any(match.query for match, _ in entries)
    routes = HostRoutes(parent, entries, reads_query)
    return RouteTable(services={parent.upper().replace("-", "_"): {None: routes}}, source="test", version="1")


def split(v1: int, v2: int, **fields: Any) -> Rule:
    return Rule("payments-canary", 0, backends=(Backend("payments-v1", v1), Backend("payments-v2", v2)), **fields)


def environ(v1: list[Any], v2: list[Any], **more: str) -> dict[str, str]:
    return {
        "MESHLIB_SERVICE_PAYMENTS_V1": static_target(v1),
        "MESHLIB_SERVICE_PAYMENTS_V2": static_target(v2),
        **more,
    }


def _service_status(status: Any, name: str) -> Any:
    return next(s for s in status.services if s.name == name)


def backend_of(response: Any) -> str:
    return str(response.headers["x-backend"])


# -- weighted splits --------------------------------------------------------------------------------------------


@pytest.mark.one_library  # the shares are drawn by meshlib, whichever HTTP library carries the calls
def test_90_10_split_over_10000_live_requests_lands_within_1_5_points(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", split(90, 10)))
        for _ in range(10_000):
            assert client.get("http://payments/charge").status_code == 200
    share = v2.count / (v1.count + v2.count)
    assert v1.count + v2.count == 10_000
    assert abs(share - 0.10) <= 0.015, share


def _expected_v1(seed: int, n: int, v1: int, total: int) -> int:
    """How many of n calls a Random(seed) sends to the first backend: one draw per call, as Rule.pick does."""
    rng = random.Random(seed)
    return sum(1 for _ in range(n) if rng.random() * total < v1)


def test_split_draws_from_the_injected_rng_so_counts_are_exact(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", split(70, 30)))
        client.mesh.rng = random.Random(7)
        for _ in range(300):
            client.get("http://payments/")
    assert v1.count == _expected_v1(7, 300, 70, 100)
    assert v2.count == 300 - v1.count


@pytest.mark.anyio
async def test_async_split_draws_from_the_injected_rng_so_counts_are_exact(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    async with meshlib.AsyncClient(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", split(50, 50)))
        client.mesh.rng = random.Random(11)
        for _ in range(200):
            await client.get("http://payments/")
    assert v1.count == _expected_v1(11, 200, 50, 100)
    assert v2.count == 200 - v1.count


def test_weight_zero_backend_gets_nothing_and_all_zero_is_answered_500(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", split(100, 0)))
        for _ in range(50):
            client.get("http://payments/")
        assert (v1.count, v2.count) == (50, 0)
        client.mesh.install_routes(table("payments", split(0, 0)))
        response = client.get("http://payments/")
    assert response.status_code == 500
    assert response.extensions[EXT_LOCAL] == "no-backend"
    assert "weights are all zero" in response.text
    assert v1.count + v2.count == 50


def test_invalid_backend_share_is_answered_500(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    rule = Rule(
        "r", 0, backends=(Backend("payments-v1", 1), Backend(None, 1, invalid="kind ServiceImport is not supported"))
    )
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", rule))
        client.mesh.rng = random.Random(3)
        statuses = [client.get("http://payments/").status_code for _ in range(100)]
    assert statuses.count(200) == v1.count == _expected_v1(3, 100, 1, 2)
    assert statuses.count(500) == 100 - v1.count


# -- matching and answers of the routes themselves --------------------------------------------------------------


def test_header_match_sends_canary_traffic_and_unmatched_requests_get_404(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    canary = Rule(
        "payments-canary",
        0,
        matches=(RouteMatch(headers=(HeaderMatch("x-canary", "Exact", "1"),)),),
        backends=(Backend("payments-v2"),),
    )
    charge = Rule(
        "payments-canary",
        1,
        matches=(RouteMatch(PathMatch("PathPrefix", "/charge")),),
        backends=(Backend("payments-v1"),),
    )
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", canary, charge))
        assert backend_of(client.get("http://payments/charge/42", headers={"x-canary": "1"})) == "v2-0"
        assert backend_of(client.get("http://payments/charge/42")) == "v1-0"
        missed = client.get("http://payments/refund")
    assert missed.status_code == 404
    assert missed.extensions[EXT_LOCAL] == "no-route"
    assert "no route of service 'payments' matched GET /refund" in missed.text
    assert (v1.count, v2.count) == (1, 1)


def test_backend_receives_the_called_host_and_routed_responses_name_their_rule(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", split(0, 1)))
        response = client.get("http://payments/x")
    assert json.loads(response.text)["host"] == "payments"
    assert response.extensions[EXT_ROUTE] == "payments-canary#0"
    assert response.extensions["meshlib.service"] == "payments_v2"  # MESHLIB_SERVICE_PAYMENTS_V2's name


def test_header_filters_are_seen_by_the_backend_and_response_filters_by_the_caller(
    start_backends: BackendFactory,
) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    rule = Rule(
        "r",
        0,
        matches=(RouteMatch(PathMatch("PathPrefix", "/old")),),
        filters=Filters(
            request_headers=HeaderModifier(set=(("x-set", "s"),), add=(("x-add", "a"),), remove=("x-drop",)),
            response_headers=HeaderModifier(set=(("x-answer", "routed"),)),
        ),
        backends=(
            Backend("payments-v1", filters=Filters(request_headers=HeaderModifier(set=(("x-backend-f", "v1"),)))),
        ),
    )
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", rule))
        response = client.get("http://payments/old/1", headers={"x-add": "first", "x-drop": "gone", "x-set": "was"})
    seen = v1.requests[-1].headers
    assert seen["x-set"] == "s"
    assert seen["x-add"] == "first,a"
    assert "x-drop" not in seen
    assert seen["x-backend-f"] == "v1"
    assert response.headers["x-answer"] == "routed"


# -- policy by route -----------------------------------------------------------------------------------------------


def test_route_retry_rule_retries_its_codes_and_scope_and_request_layers_override_it(
    start_backends: BackendFactory,
) -> None:
    (v1,) = start_backends(1, behavior=Behavior(status=500), prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    rule = Rule("r", 0, backends=(Backend("payments-v1"),), policy=Policy(retries=3, retry_on=frozenset({500})))
    env = environ([v1], [v2], MESHLIB_RETRY_BUDGET_PERCENT="100%", MESHLIB_BREAKER_FAILURES="100")
    with meshlib.Client(environ={**env, "MESHLIB_OUTLIER_FAILURES": "100"}) as client:
        client.mesh.install_routes(table("payments", rule))
        assert client.get("http://payments/").status_code == 500
        assert v1.count == 4  # the route's 3 retries on its code 500 (the default retry_on has no 500)
        with meshlib.policy(retries=1):  # a scope narrows the route
            client.get("http://payments/")
        assert v1.count == 6
        client.get("http://payments/", extensions={POLICY_EXTENSION: Policy(retries=0)})  # the request, innermost
        assert v1.count == 7


def test_route_timeouts_bound_each_try_and_the_call(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, behavior=Behavior(delay=30), prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    rule = Rule("r", 0, backends=(Backend("payments-v1"),), policy=Policy(timeout=0.6, per_try_timeout=0.2, retries=2))
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", rule))
        with pytest.raises(meshlib.DeadlineExceeded):
            client.get("http://payments/")
    # Per-try 0.2 s within 0.6 s: every try timed out on its own and was retried, none outlived the call.
    assert v1.count == 3


# -- fault injection ---------------------------------------------------------------------------------------------


def test_abort_fault_answers_before_any_byte_leaves(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    fault = Fault("outage", abort_status=503, abort_fraction=1.0)
    rule = Rule("r", 0, backends=(Backend("payments-v1"),), filters=Filters(fault=fault))
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", rule))
        response = client.get("http://payments/")
        status = client.mesh_status()
    assert response.status_code == 503
    assert response.extensions[EXT_LOCAL] == "fault-abort"
    assert v1.count == 0
    # The abort is no failure of the service: no attempt, nothing counted against its endpoints.
    assert all(e.requests == 0 for e in _service_status(status, "payments_v1").endpoints)


def test_abort_fault_rate_is_within_statistical_bounds(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    fault = Fault("flaky", abort_status=500, abort_fraction=0.2)
    rule = Rule("r", 0, backends=(Backend("payments-v1"),), filters=Filters(fault=fault))
    n = 2000
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", rule))
        aborted = sum(client.get("http://payments/").status_code == 500 for _ in range(n))
    sigma = math.sqrt(n * 0.2 * 0.8)
    assert abs(aborted - n * 0.2) <= 5 * sigma  # 5 sigma: a false alarm once in ~3.5 million runs
    assert v1.count == n - aborted


def test_delay_fault_longer_than_the_deadline_is_a_deadline_exceeded(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    fault = Fault("slow", delay_s=30.0, delay_fraction=1.0)
    rule = Rule("r", 0, backends=(Backend("payments-v1"),), filters=Filters(fault=fault))
    with meshlib.Client(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", rule))
        with pytest.raises(meshlib.DeadlineExceeded, match="delay outlasted the deadline"):
            client.get("http://payments/", extensions={POLICY_EXTENSION: Policy(timeout=0.2)})
    assert v1.count == 0


@pytest.mark.anyio
async def test_max_active_faults_holds_under_concurrency(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    fault = Fault("slow", delay_s=0.05, delay_fraction=1.0, max_active=2)
    rule = Rule("r", 0, backends=(Backend("payments-v1"),), filters=Filters(fault=fault))
    async with meshlib.AsyncClient(environ=environ([v1], [v2])) as client:
        client.mesh.install_routes(table("payments", rule))
        # Every call is routed (and its fault drawn) before its first await, so all 8 are decided while the
        # first faulted ones are still delayed: exactly max_active of them get the fault.
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(client.get, "http://payments/")
        slot = client.mesh._fault_slots[("slow", 2)]
        assert slot.injected == 2
        assert slot.active == 0
        # Once they ended, the next call is faulted again.
        await client.get("http://payments/")
        assert slot.injected == 3
    assert v1.count == 9


# -- mirroring ----------------------------------------------------------------------------------------------------


def mirror_env(v1: list[Any], shadow: list[Any]) -> dict[str, str]:
    return {"MESHLIB_SERVICE_PAYMENTS_V1": static_target(v1), "MESHLIB_SERVICE_PAYMENTS_SHADOW": static_target(shadow)}


def mirrored(fraction: float = 1.0) -> Rule:
    return Rule(
        "r",
        0,
        backends=(Backend("payments-v1"),),
        filters=Filters(mirrors=(Mirror("payments_shadow", fraction),)),
    )


def test_mirror_gets_a_copy_with_the_shadow_host_and_its_answer_is_discarded(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, behavior=Behavior(status=201, body=b"shadow answer"), prefix="shadow-")
    with meshlib.Client(environ=mirror_env([v1], [shadow])) as client:
        client.mesh.install_routes(table("payments", mirrored()))
        for i in range(20):
            response = client.get(f"http://payments/item/{i}")
            assert response.status_code == 200
            assert backend_of(response) == "v1-0"
        client.mesh._mirror_workers.shutdown(wait=True)  # every mirror has ended
        counts = dict(client.mesh.mirror_counts)
    assert sorted(r.path for r in shadow.requests) == sorted(f"/item/{i}" for i in range(20))
    assert {r.headers["host"] for r in shadow.requests} == {"payments-shadow"}
    assert counts == {("payments_shadow", "sent"): 20}


def test_a_mirrored_copy_is_never_hedged(start_backends: BackendFactory) -> None:
    v1 = start_backends(2, prefix="v1-")
    shadow = start_backends(2, prefix="shadow-")
    hedging = {"MESHLIB_HEDGE_MAX_ATTEMPTS": "2", "MESHLIB_HEDGE_DELAY": "0", "MESHLIB_HEDGE_MAX_EXTRA_LOAD": "0.99"}
    with meshlib.Client(environ={**mirror_env(v1, shadow), **hedging}) as client:
        client.mesh.install_routes(table("payments", mirrored()))
        for i in range(20):
            assert client.get(f"http://payments/item/{i}").status_code == 200
        client.mesh._mirror_workers.shutdown(wait=True)
        assert client.mesh.services["PAYMENTS_V1"].hedging.budget.sent >= 1  # the primary calls hedge...
    paths = [r.path for b in shadow for r in b.requests]
    assert sorted(paths) == sorted(f"/item/{i}" for i in range(20))  # ...the shadow gets exactly one copy each


def test_dead_mirror_changes_nothing_for_callers_or_the_primary(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, prefix="shadow-")
    shadow.refuse()
    with meshlib.Client(environ=mirror_env([v1], [shadow])) as client:
        client.mesh.install_routes(table("payments", mirrored()))
        statuses = [client.get("http://payments/").status_code for _ in range(30)]
        client.mesh._mirror_workers.shutdown(wait=True)  # every mirror has ended
        status = client.mesh_status()
    assert statuses == [200] * 30
    primary = _service_status(status, "payments_v1")
    assert primary.budget.retries == 0
    assert all(e.failures == 0 and e.breaker == "closed" and not e.ejected for e in primary.endpoints)
    assert client.mesh.mirror_counts[("payments_shadow", "failed")] == 30


def test_mirror_never_receives_a_request_the_primary_did_not(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, prefix="shadow-")
    v1.refuse()
    with meshlib.Client(environ=mirror_env([v1], [shadow])) as client:
        client.mesh.install_routes(table("payments", mirrored()))
        for _ in range(10):
            with pytest.raises(httpx_errors()):
                client.get("http://payments/")
    assert shadow.count == 0
    assert client.mesh.mirror_counts == {}


def httpx_errors() -> type[Exception]:
    from tests.httplib import httpx

    return httpx.TransportError


def test_non_idempotent_and_streaming_requests_are_not_mirrored_unless_allowed(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, prefix="shadow-")
    with meshlib.Client(environ=mirror_env([v1], [shadow])) as client:
        client.mesh.install_routes(table("payments", mirrored()))
        client.post("http://payments/charge", content=b"{}")
        client.put("http://payments/item", content=iter([b"one-shot"]))
        client.post("http://payments/charge", content=b"{}", headers={"Idempotency-Key": "k1"})
        with meshlib.policy(retry_non_idempotent=True):
            client.post("http://payments/charge", content=b"{}")
        assert shadow.wait_for(2)
        client.mesh._mirror_workers.shutdown(wait=True)
        counts = dict(client.mesh.mirror_counts)
    assert counts == {
        ("payments_shadow", "skipped-unsafe"): 1,
        ("payments_shadow", "skipped-streaming"): 1,
        ("payments_shadow", "sent"): 2,
    }
    assert [r.body for r in shadow.requests] == [b"{}", b"{}"]
    assert v1.count == 4


def test_mirror_fraction_draws_from_the_rng(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, prefix="shadow-")
    with meshlib.Client(environ=mirror_env([v1], [shadow])) as client:
        client.mesh.install_routes(table("payments", mirrored(0.25)))
        client.mesh.rng = random.Random(5)
        for _ in range(200):
            client.get("http://payments/")
        client.mesh._mirror_workers.shutdown(wait=True)
    rng = random.Random(5)
    # One draw per call (a single backend draws nothing), then the mirror's.
    expected = sum(1 for _ in range(200) if rng.random() < 0.25)
    assert shadow.count == expected


def test_excess_mirrors_are_dropped_and_counted(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, behavior=Behavior(delay=30), prefix="shadow-")
    with meshlib.Client(environ={**mirror_env([v1], [shadow]), "MESHLIB_MIRROR_CONCURRENCY": "3"}) as client:
        client.mesh.install_routes(table("payments", mirrored()))
        for _ in range(10):
            assert client.get("http://payments/").status_code == 200
        counts = dict(client.mesh.mirror_counts)
    assert counts[("payments_shadow", "dropped")] == 7
    assert v1.count == 10


@pytest.mark.anyio
async def test_async_mirror_and_split(start_backends: BackendFactory) -> None:
    (v1,) = start_backends(1, prefix="v1-")
    (shadow,) = start_backends(1, prefix="shadow-")
    async with meshlib.AsyncClient(environ=mirror_env([v1], [shadow])) as client:
        client.mesh.install_routes(table("payments", mirrored()))
        for i in range(10):
            assert (await client.get(f"http://payments/a/{i}")).status_code == 200
        with anyio.fail_after(10):
            for task in list(client.mesh._mirror_tasks):  # every mirror has ended
                await _aio.wait_done(task)
    assert shadow.count == 10
    assert client.mesh.mirror_counts == {("payments_shadow", "sent"): 10}
