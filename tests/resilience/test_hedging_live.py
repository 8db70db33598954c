"""Hedging end to end: real loopback backends that stall, fail and push back, through Client and AsyncClient.

What each test asserts is what the servers saw (requests, hang-ups) and what the caller got, never the clock: a
stalled endpoint stalls for a minute, so a call that returns at all was answered by a hedge.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib import HedgePolicy
from meshlib.status import format_status
from meshlib.testing import Backend, Behavior
from tests.anyio_backends import asyncio_and_trio  # noqa: F401  (the anyio_backend fixture: asyncio and trio)
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx

pytestmark = pytest.mark.timeout(120)

STALL = Behavior(delay=60.0)  # longer than any test: an answer the caller gets is never this one's


def _env(backends: list[Backend], **settings: str) -> dict[str, str]:
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_LB": "round_robin"}
    env.update({f"MESHLIB_{key}": value for key, value in settings.items()})
    return env


#: Hedge after 50 ms, with a budget that allows a hedge on nearly every call once a few calls have been made.
HEDGING = {"HEDGE_MAX_ATTEMPTS": "2", "HEDGE_DELAY": "50ms", "HEDGE_MAX_EXTRA_LOAD": "0.99"}


def _hedging(client: meshlib.Client | meshlib.AsyncClient) -> Any:
    return client.mesh.services["PAYMENTS"].hedging


def _backend_of(response: Any) -> str:
    return str(response.headers["x-backend"])


def _until_a_hedge_wins(call: Callable[[], Any], state: Any) -> list[Any]:
    """Calls until one is answered by a hedge (round robin sends an original to the stalled endpoint within two
    calls, unless the fast one was itself slower than the delay and drew the hedge; at most 20)."""
    responses = []
    for _ in range(20):
        responses.append(call())
        if state.won:
            break
    return responses


def _total(backends: list[Backend]) -> int:
    return sum(b.count for b in backends)


# -- a hedge wins against a stalled endpoint, and the loser is cancelled ----------------------------------------------


def test_a_hedge_wins_against_a_stalled_endpoint_and_the_server_sees_the_loser_hang_up(
    start_backends: BackendFactory,
) -> None:
    fast, slow = start_backends(2)
    # No timeout would end the stalled attempts before the stall does: a hang-up the server sees is the cancel's.
    env = _env([fast, slow], **HEDGING, TIMEOUT="120s")
    with meshlib.Client(environ=env, timeout=120) as client:
        for _ in range(3):  # both answer: the budget fills
            assert client.get("http://payments/warm").status_code == 200
        slow.behavior = STALL
        slow.reset()
        state = _hedging(client)
        responses = _until_a_hedge_wins(lambda: client.get("http://payments/charge"), state)
        assert [r.status_code for r in responses] == [200] * len(responses)
        assert {_backend_of(r) for r in responses} == {fast.name}
        assert state.won >= 1  # round robin sends an original to the stalled endpoint: a hedge answered it
        assert any(r.extensions["meshlib.attempts"] == 2 for r in responses)
        # Every request the stalled endpoint got was cancelled: its connection closed under it, not left to run.
        assert slow.count >= 1
        assert slow.wait_for_hangups(slow.count, timeout=30)
        status = client.mesh_status().services
        hedge = next(s for s in status if s.name == "payments").hedge
        assert hedge.sent >= 1 and hedge.won == state.won and hedge.cancelled >= 1


@pytest.mark.anyio
async def test_async_a_hedge_wins_against_a_stalled_endpoint_and_every_lease_is_released(
    start_backends: BackendFactory,
) -> None:
    fast, slow = start_backends(2)
    async with meshlib.AsyncClient(environ=_env([fast, slow], **HEDGING, TIMEOUT="120s"), timeout=120) as client:
        for _ in range(3):
            assert (await client.get("http://payments/warm")).status_code == 200
        slow.behavior = STALL
        slow.reset()
        responses = []
        for _ in range(20):  # until an original goes to the stalled endpoint (round robin: soon)
            responses.append(await client.get("http://payments/charge"))
            if _hedging(client).won:
                break
        assert [r.status_code for r in responses] == [200] * len(responses)
        assert {_backend_of(r) for r in responses} == {fast.name}
        assert _hedging(client).won >= 1
        # A cancelled task's lease is released before the call returns: nothing is left in flight.
        service = client.mesh.services["PAYMENTS"]
        assert service.limit.inflight == 0
        assert [s.inflight for s in service.active.stats.values()] == [0, 0]
        assert slow.wait_for_hangups(slow.count, timeout=30)


# -- the budget --------------------------------------------------------------------------------------------------------


def test_hedges_stop_at_the_extra_load_cap(start_backends: BackendFactory) -> None:
    backends = start_backends(4)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="0")  # a hedge with every call, budget permitting
    with meshlib.Client(environ=env) as client:
        for _ in range(400):
            assert client.get("http://payments/item").status_code == 200
        budget = _hedging(client).budget
    # The default budget: hedges add at most 5 % of requests (20 of 400); every other call was refused one.
    assert 1 <= budget.sent <= 20
    assert budget.exhausted >= 380
    assert _total(backends) - 400 <= budget.sent


@pytest.mark.anyio
async def test_async_hedges_stop_at_the_extra_load_cap(start_backends: BackendFactory) -> None:
    backends = start_backends(4)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="0", HEDGE_MAX_EXTRA_LOAD="10%")
    async with meshlib.AsyncClient(environ=env) as client:
        for _ in range(200):
            assert (await client.get("http://payments/item")).status_code == 200
        budget = _hedging(client).budget
    assert 1 <= budget.sent <= 20
    assert _total(backends) - 200 <= budget.sent


# -- what may be hedged -----------------------------------------------------------------------------------------------


def test_a_post_is_never_hedged_without_an_opt_in(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="0", HEDGE_MAX_EXTRA_LOAD="0.99")
    with meshlib.Client(environ=env) as client:
        for _ in range(3):
            client.get("http://payments/warm")
        state = _hedging(client)
        before = state.budget.sent
        for b in backends:
            b.reset()
        for i in range(20):
            assert client.post("http://payments/charge", json={"n": i}).status_code == 200
        posts = [r.body for b in backends for r in b.requests if r.method == "POST"]
        assert len(posts) == 20 and len(set(posts)) == 20  # one copy each: a POST may not be sent twice
        assert state.budget.sent == before
        # An Idempotency-Key says a second copy is safe: then it is hedged.
        for i in range(5):
            client.post("http://payments/charge", json={"n": i}, headers={"Idempotency-Key": f"k{i}"})
        assert state.budget.sent > before


@pytest.mark.anyio
async def test_async_a_post_is_never_hedged_without_an_opt_in(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="0", HEDGE_MAX_EXTRA_LOAD="0.99")
    async with meshlib.AsyncClient(environ=env) as client:
        for _ in range(3):
            await client.get("http://payments/warm")
        state = _hedging(client)
        before = state.budget.sent
        for i in range(20):
            assert (await client.post("http://payments/charge", json={"n": i})).status_code == 200
        posts = [r.body for b in backends for r in b.requests if r.method == "POST"]
        assert len(posts) == 20 and len(set(posts)) == 20
        assert state.budget.sent == before


def test_non_idempotent_opt_in_hedges_a_post(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    env = _env(
        backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="0", HEDGE_MAX_EXTRA_LOAD="0.99", HEDGE_NON_IDEMPOTENT="true"
    )
    with meshlib.Client(environ=env) as client:
        for i in range(5):
            client.post("http://payments/charge", json={"n": i})
        assert _hedging(client).budget.sent >= 1


def test_a_streamed_body_is_never_hedged(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="0", HEDGE_MAX_EXTRA_LOAD="0.99")
    with meshlib.Client(environ=env) as client:
        for _ in range(3):
            client.get("http://payments/warm")
        before = _hedging(client).budget.sent
        for _ in range(5):
            client.put("http://payments/doc", content=iter([b"one-shot ", b"stream"]))
        assert _hedging(client).budget.sent == before


# -- answers: non-fatal, fatal, pushback ------------------------------------------------------------------------------


def test_a_non_fatal_answer_sends_the_next_hedge_at_once_and_a_fatal_one_ends_the_call(
    start_backends: BackendFactory,
) -> None:
    good, bad = start_backends(2)
    bad.behavior = Behavior(status=503)
    # A 10 s delay: any hedge sent here was sent because of an answer, not the timer.
    env = _env([good, bad], HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="10s", HEDGE_MAX_EXTRA_LOAD="0.99")
    with meshlib.Client(environ=env) as client:
        for _ in range(3):
            client.get("http://payments/warm")
        statuses = [client.get("http://payments/item").status_code for _ in range(6)]
        assert statuses == [200] * 6  # each 503 was followed at once by a hedge to the other endpoint
        assert _hedging(client).budget.sent >= 1
    bad.behavior = Behavior(status=500)  # fatal: another endpoint would say the same
    with meshlib.Client(environ=env) as client:  # a fresh client: the 503s above opened the endpoint's breaker
        bad.behavior = Behavior()
        for _ in range(3):
            client.get("http://payments/warm")
        bad.behavior = Behavior(status=500)
        good.reset()
        bad.reset()
        statuses = [client.get("http://payments/item").status_code for _ in range(6)]
    assert 500 in statuses
    assert _total([good, bad]) == 6  # no second copy after a fatal answer, and no retry of a hedged call


def test_pushback_stops_further_hedges(start_backends: BackendFactory) -> None:
    backends = start_backends(3, behavior=Behavior(status=429))  # 429 without Retry-After: "slow down"
    env = _env(backends, HEDGE_MAX_ATTEMPTS="3", HEDGE_DELAY="10s", HEDGE_MAX_EXTRA_LOAD="0.99")
    with meshlib.Client(environ=env) as client:
        for b in backends:
            b.behavior = Behavior()
        for _ in range(3):
            client.get("http://payments/warm")
        for b in backends:
            b.behavior = Behavior(status=429)
            b.reset()
        assert client.get("http://payments/item").status_code == 429
        assert _total(backends) == 1
        for b in backends:  # the same with 503: non-fatal, no pushback: every endpoint is tried
            b.behavior = Behavior(status=503)
            b.reset()
        assert client.get("http://payments/item").status_code == 503
        assert _total(backends) == 3


# -- deadline ----------------------------------------------------------------------------------------------------------


def test_the_deadline_bounds_a_hedged_call_and_every_attempt_is_cancelled(start_backends: BackendFactory) -> None:
    backends = start_backends(3, behavior=STALL)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="3", HEDGE_DELAY="10ms", HEDGE_MAX_EXTRA_LOAD="0.99", TIMEOUT="1s")
    with meshlib.Client(environ=env) as client:
        for b in backends:
            b.behavior = Behavior()
        for _ in range(3):
            client.get("http://payments/warm")
        for b in backends:
            b.behavior = STALL
            b.reset()
        with pytest.raises(meshlib.DeadlineExceeded):
            client.get("http://payments/item")
        assert client.mesh.services["PAYMENTS"].limit.inflight == 0
        sent = [b for b in backends if b.count]
        assert len(sent) == 3  # the original and two hedges, each to its own endpoint
        assert all(b.wait_for_hangups(1, timeout=30) for b in sent)


@pytest.mark.anyio
async def test_async_the_deadline_bounds_a_hedged_call(start_backends: BackendFactory) -> None:
    backends = start_backends(2, behavior=STALL)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="10ms", HEDGE_MAX_EXTRA_LOAD="0.99", TIMEOUT="1s")
    async with meshlib.AsyncClient(environ=env) as client:
        for b in backends:
            b.behavior = Behavior()
        for _ in range(3):
            await client.get("http://payments/warm")
        for b in backends:
            b.behavior = STALL
        with pytest.raises(meshlib.DeadlineExceeded):
            await client.get("http://payments/item")
        service = client.mesh.services["PAYMENTS"]
        assert service.limit.inflight == 0
        assert [s.inflight for s in service.active.stats.values()] == [0, 0]


# -- the delay ---------------------------------------------------------------------------------------------------------


def test_a_percentile_delay_waits_for_its_window_then_hedges_at_that_percentile(
    start_backends: BackendFactory,
) -> None:
    fast, slow = start_backends(2)
    env = _env([fast, slow], HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="p90", HEDGE_MIN_SAMPLES="20")
    env["MESHLIB_HEDGE_MAX_EXTRA_LOAD"] = "0.99"
    with meshlib.Client(environ=env) as client:
        client.get("http://payments/warm")
        state = _hedging(client)
        assert state.window is not None and state.last_delay is None  # cold: no timed hedge yet
        for _ in range(30):
            client.get("http://payments/warm")
        delay = state.last_delay
        assert delay is not None and delay < 60.0  # the p90 of answers that took (much) less than the stall
        slow.behavior = STALL
        responses = _until_a_hedge_wins(lambda: client.get("http://payments/charge"), state)
        assert {_backend_of(r) for r in responses} == {fast.name}
        assert state.won >= 1


# -- where hedging is set: policy scope, route -----------------------------------------------------------------------


def test_a_policy_scope_turns_hedging_on_for_its_calls_only(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    with meshlib.Client(environ=_env(backends, HEDGE_MAX_EXTRA_LOAD="0.99")) as client:
        for _ in range(5):
            client.get("http://payments/plain")
        state = _hedging(client)
        assert state.budget.sent == 0 and state.budget.exhausted == 0  # no hedging by default
        with meshlib.policy(hedge=HedgePolicy(max_attempts=2, delay=0.0)):
            for _ in range(5):
                client.get("http://payments/hedged")
        assert state.budget.sent >= 1


@pytest.mark.anyio
async def test_async_a_policy_decorator_turns_hedging_on(start_backends: BackendFactory) -> None:
    backends = start_backends(2)

    @meshlib.policy(hedge=HedgePolicy(max_attempts=2, delay=0.0))
    async def hedged(client: meshlib.AsyncClient) -> int:
        return (await client.get("http://payments/hedged")).status_code

    async with meshlib.AsyncClient(environ=_env(backends, HEDGE_MAX_EXTRA_LOAD="0.99")) as client:
        assert [await hedged(client) for _ in range(5)] == [200] * 5
        assert _hedging(client).budget.sent >= 1


ROUTES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: payments-reads
  annotations: {"hedge.meshlib.io/max-attempts": "2", "hedge.meshlib.io/delay": "0ms"}
spec:
  parentRefs: [{group: "", kind: Service, name: payments}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /reads}}]
    backendRefs: [{name: payments}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payments-rest}
spec:
  parentRefs: [{group: "", kind: Service, name: payments}]
  rules:
  - backendRefs: [{name: payments}]
"""


def test_a_route_annotation_hedges_that_route_only(start_backends: BackendFactory, tmp_path: Path) -> None:
    backends = start_backends(2)
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    env = _env(backends, HEDGE_MAX_EXTRA_LOAD="0.99", ROUTES_FILE=str(routes), ROUTES_RELOAD_INTERVAL="0")
    with meshlib.Client(environ=env) as client:
        for _ in range(5):
            assert client.get("http://payments/other").status_code == 200
        state = _hedging(client)
        assert state.budget.sent == 0
        for _ in range(5):
            assert client.get("http://payments/reads/1").status_code == 200
        assert state.budget.sent >= 1


def test_a_bad_hedge_annotation_names_the_annotation(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES.replace('"hedge.meshlib.io/max-attempts": "2"', '"hedge.meshlib.io/max-attempts": "9"'))
    env = {"MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:9", "MESHLIB_ROUTES_FILE": str(routes)}
    with pytest.raises(meshlib.ConfigError) as caught:
        meshlib.Client(environ=env)
    assert "hedge.meshlib.io/max-attempts" in str(caught.value) and "5" in str(caught.value)


def test_bad_hedging_variables_name_the_variable_and_the_value() -> None:
    for variable, value in (
        ("MESHLIB_HEDGE_MAX_ATTEMPTS", "6"),
        ("MESHLIB_HEDGE_DELAY", "soon"),
        ("MESHLIB_HEDGE_MAX_EXTRA_LOAD", "150%"),
        ("MESHLIB_SERVICE_PAYMENTS__HEDGE_NON_FATAL", "200"),
    ):
        env = {"MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:9", variable: value}
        with pytest.raises(meshlib.ConfigError) as caught:
            meshlib.Client(environ=env)
        assert variable in str(caught.value) and value in str(caught.value)


# -- observability -----------------------------------------------------------------------------------------------------


def test_meshlib_status_prints_the_hedging_line(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="0", HEDGE_MAX_EXTRA_LOAD="0.99")
    with meshlib.Client(environ=env) as client:
        for _ in range(5):
            client.get("http://payments/item")
        snapshot = client.mesh_status()
        text = format_status({"meshlib": "test", "pid": snapshot.pid, "clients": [snapshot.to_dict()]})
    assert "hedges: " in text and " sent, " in text and "won" in text


def test_a_hedged_call_keeps_httpx_semantics(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    env = _env(backends, HEDGE_MAX_ATTEMPTS="2", HEDGE_DELAY="0", HEDGE_MAX_EXTRA_LOAD="0.99")
    with meshlib.Client(environ=env) as client:
        for _ in range(3):
            client.get("http://payments/warm")
        with client.stream("GET", "http://payments/stream") as response:
            assert isinstance(response, httpx.Response)
            body = json.loads(response.read())
        assert body["path"] == "/stream" and body["host"] == "payments"
        assert str(response.url) == "http://payments/stream"
