"""``MESHLIB_ROUTES_FILE`` end to end: Gateway API YAML steers live calls, and is hot-reloaded without loss.

Real files, the real watcher (driven with ``check_now()`` instead of waiting for its poll), real backends.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import meshlib
from meshlib.testing import Behavior
from tests.anyio_backends import asyncio_and_trio  # noqa: F401  (the anyio_backend fixture: asyncio and trio)
from tests.conftest import BackendFactory, static_target

pytestmark = pytest.mark.timeout(120)

CANARY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payments-canary}
spec:
  parentRefs: [{group: "", kind: Service, name: payments}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /charge}, headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: payments-v2}]
  - matches: [{path: {type: PathPrefix, value: /charge}, method: POST}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {codes: [503], attempts: 3, backoff: 50ms}
    backendRefs: [{name: payments-v1, weight: %(v1)d}, {name: payments-v2, weight: %(v2)d}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: payments-shadow}, percent: 100}
  - backendRefs: [{name: payments-v1}]
"""


def one_backend(name: str, label: str) -> str:
    """Every call to payments goes to ``name``, and its answer says which table routed it (``x-table``)."""
    return f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: payments}}
spec:
  parentRefs: [{{kind: Service, group: "", name: payments}}]
  rules:
  - backendRefs: [{{name: {name}}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{set: [{{name: x-table, value: {label}}}]}}
"""


def write(path: Path, text: str) -> None:
    """Replace the file atomically, as an operator's tooling (or Kubernetes) does."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def environ(path: Path, v1: Any, v2: Any, shadow: Any) -> dict[str, str]:
    return {
        "MESHLIB_ROUTES_FILE": str(path),
        "MESHLIB_ROUTES_RELOAD_INTERVAL": "0",  # the tests poll with check_now(): no background thread needed
        "MESHLIB_SERVICE_PAYMENTS_V1": static_target([v1]),
        "MESHLIB_SERVICE_PAYMENTS_V2": static_target([v2]),
        "MESHLIB_SERVICE_PAYMENTS_SHADOW": static_target([shadow]),
    }


@pytest.fixture
def trio_of_backends(start_backends: BackendFactory) -> tuple[Any, Any, Any]:
    (v1,) = start_backends(1, prefix="v1-")
    (v2,) = start_backends(1, prefix="v2-")
    (shadow,) = start_backends(1, prefix="shadow-")
    return v1, v2, shadow


def test_the_canary_file_routes_live_calls(tmp_path: Path, trio_of_backends: tuple[Any, Any, Any]) -> None:
    v1, v2, shadow = trio_of_backends
    path = tmp_path / "routes.yaml"
    write(path, CANARY % {"v1": 100, "v2": 0})
    with meshlib.Client(environ=environ(path, v1, v2, shadow)) as client:
        assert client.get("http://payments/charge/1", headers={"x-canary": "1"}).headers["x-backend"] == "v2-0"
        posted = client.post("http://payments/charge", content=b"{}", headers={"Idempotency-Key": "k"})
        assert posted.headers["x-backend"] == "v1-0"
        assert posted.extensions["meshlib.route"] == "default/payments-canary#1"
        assert client.get("http://payments/other").headers["x-backend"] == "v1-0"
        client.mesh._mirror_workers.shutdown(wait=True)
        status = client.mesh_status().routes
    assert [r.path for r in shadow.requests] == ["/charge"]  # the POST carried an Idempotency-Key: mirrored
    assert status is not None and status.source == str(path) and status.routes == ["default/payments-canary"]


def test_route_policy_from_the_file_retries_its_codes(tmp_path: Path, trio_of_backends: tuple[Any, Any, Any]) -> None:
    v1, v2, shadow = trio_of_backends
    v1.behavior = Behavior(status=503)
    path = tmp_path / "routes.yaml"
    write(path, CANARY % {"v1": 100, "v2": 0})
    env = {**environ(path, v1, v2, shadow), "MESHLIB_RETRY_BUDGET_PERCENT": "100%"}
    with meshlib.Client(environ=env) as client:
        response = client.post("http://payments/charge", content=b"{}", headers={"Idempotency-Key": "k"})
    assert response.status_code == 503
    assert v1.count == 4  # retry.attempts: 3 on the rule's code 503


def test_bad_routes_at_start_up_are_a_config_error_naming_file_document_and_field(
    tmp_path: Path, trio_of_backends: tuple[Any, Any, Any]
) -> None:
    v1, v2, shadow = trio_of_backends
    path = tmp_path / "routes.yaml"
    write(path, (CANARY % {"v1": 100, "v2": 0}).replace("payments-v2}]", "payments-v3}]", 1))
    with pytest.raises(meshlib.ConfigError) as raised:
        meshlib.Client(environ=environ(path, v1, v2, shadow))
    message = str(raised.value)
    assert str(path) in message
    assert "payments-canary" in message
    assert "spec.rules[0].backendRefs[0]" in message
    assert "payments-v3" in message


def test_missing_routes_file_is_a_config_error(tmp_path: Path, trio_of_backends: tuple[Any, Any, Any]) -> None:
    v1, v2, shadow = trio_of_backends
    with pytest.raises(meshlib.ConfigError, match="MESHLIB_ROUTES_FILE"):
        meshlib.Client(environ=environ(tmp_path / "nope.yaml", v1, v2, shadow))


def test_reload_applies_valid_versions_and_rejects_invalid_ones_keeping_the_last_good(
    tmp_path: Path, trio_of_backends: tuple[Any, Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    v1, v2, shadow = trio_of_backends
    path = tmp_path / "routes.yaml"
    write(path, one_backend("payments-v1", "one"))
    with meshlib.Client(environ=environ(path, v1, v2, shadow)) as client:
        assert client.get("http://payments/").headers["x-table"] == "one"
        write(path, one_backend("payments-v2", "two"))
        assert client.mesh.routes_source.check_now()
        assert client.get("http://payments/").headers["x-backend"] == "v2-0"
        good = client.mesh_status().routes
        with caplog.at_level(logging.ERROR, logger="meshlib"):
            write(path, one_backend("payments-v2", "two").replace("backendRefs", "backendRefz"))
            assert client.mesh.routes_source.check_now()
        # The last good table keeps serving; status shows the rejected version, the log names file and field.
        assert client.get("http://payments/").headers["x-table"] == "two"
        routes = client.mesh_status().routes
        assert routes is not None and good is not None
        assert routes.version == good.version
        assert routes.rejected is not None and "backendRefz" in routes.rejected.error
        assert any(str(path) in r.getMessage() and "backendRefz" in r.getMessage() for r in caplog.records)
        write(path, one_backend("payments-v1", "three"))
        assert client.mesh.routes_source.check_now()
        assert client.get("http://payments/").headers["x-table"] == "three"
        assert client.mesh_status().routes.rejected is None  # type: ignore[union-attr]


def test_reload_under_live_traffic_fails_no_request_and_never_mixes_tables(
    tmp_path: Path, trio_of_backends: tuple[Any, Any, Any]
) -> None:
    v1, v2, shadow = trio_of_backends
    path = tmp_path / "routes.yaml"
    tables = [one_backend("payments-v1", "one"), one_backend("payments-v2", "two")]
    expected = {"one": "v1-0", "two": "v2-0"}
    write(path, tables[0])
    seen: list[tuple[str, str]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    progress = threading.Condition()
    with meshlib.Client(environ=environ(path, v1, v2, shadow)) as client:

        def traffic() -> None:
            while not stop.is_set():
                try:
                    response = client.get("http://payments/")
                    seen.append((response.headers["x-table"], response.headers["x-backend"]))
                except BaseException as exc:  # every failure is the test's business
                    failures.append(exc)
                with progress:
                    progress.notify_all()

        callers = [threading.Thread(target=traffic) for _ in range(4)]
        for caller in callers:
            caller.start()
        try:
            for flip in range(1, 61):
                before = len(seen)
                write(path, tables[flip % 2] + f"# version {flip}\n")
                assert client.mesh.routes_source.check_now()
                with progress:  # some calls on each version
                    assert progress.wait_for(lambda n=before + 4: len(seen) >= n or bool(failures), 30)
        finally:
            stop.set()
            for caller in callers:
                caller.join(30)
    assert failures == []
    assert len(seen) >= 240
    assert all(expected[label] == backend for label, backend in seen), "a call mixed two tables"
    assert {label for label, _ in seen} == {"one", "two"}


def test_a_call_in_flight_finishes_on_the_table_it_started_with(
    tmp_path: Path, trio_of_backends: tuple[Any, Any, Any]
) -> None:
    v1, v2, shadow = trio_of_backends
    released = threading.Event()
    # v1's answer waits until the test lets it go (delay_fn runs in v1's own thread): the call stays in flight.
    v1.behavior = Behavior(delay_fn=lambda: float(not released.wait(30)))
    path = tmp_path / "routes.yaml"
    write(path, one_backend("payments-v1", "one"))
    answers: list[Any] = []
    with meshlib.Client(environ=environ(path, v1, v2, shadow)) as client:
        caller = threading.Thread(target=lambda: answers.append(client.get("http://payments/")))
        caller.start()
        assert v1.wait_for(1)  # the call is at its backend, routed by table "one"
        write(path, one_backend("payments-v2", "two"))
        assert client.mesh.routes_source.check_now()
        assert client.get("http://payments/").headers["x-table"] == "two"  # new calls: the new table
        released.set()
        caller.join(30)
    # The call in flight kept its rule: its response filter is the old table's.
    assert answers[0].headers["x-table"] == "one"
    assert answers[0].headers["x-backend"] == "v1-0"


@pytest.mark.anyio
async def test_async_reload_under_live_traffic(tmp_path: Path, trio_of_backends: tuple[Any, Any, Any]) -> None:
    v1, v2, shadow = trio_of_backends
    path = tmp_path / "routes.yaml"
    tables = [one_backend("payments-v1", "one"), one_backend("payments-v2", "two")]
    expected = {"one": "v1-0", "two": "v2-0"}
    write(path, tables[0])
    seen: list[tuple[str, str]] = []
    async with meshlib.AsyncClient(environ=environ(path, v1, v2, shadow)) as client:
        done = anyio.Event()

        async def traffic() -> None:
            while not done.is_set():
                response = await client.get("http://payments/")
                seen.append((response.headers["x-table"], response.headers["x-backend"]))

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(traffic)
            for flip in range(1, 21):
                before = len(seen)
                write(path, tables[flip % 2] + f"# version {flip}\n")
                assert await anyio.to_thread.run_sync(client.mesh.routes_source.check_now)
                while len(seen) < before + 4:
                    await anyio.lowlevel.checkpoint()
            done.set()
    assert all(expected[label] == backend for label, backend in seen)
    assert {label for label, _ in seen} == {"one", "two"}


REWRITE_AND_REDIRECT = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: payments}
spec:
  parentRefs: [{group: "", kind: Service, name: payments}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v1/charge}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: billing.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /charge}}
    backendRefs: [{name: payments-v1}]
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /v1/charge/9}, statusCode: 301}
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rewrite_is_seen_by_the_backend_and_a_redirect_is_followed_through_the_routes(
    mode: str, tmp_path: Path, trio_of_backends: tuple[Any, Any, Any]
) -> None:
    v1, v2, shadow = trio_of_backends
    path = tmp_path / "routes.yaml"
    write(path, REWRITE_AND_REDIRECT)
    env = environ(path, v1, v2, shadow)

    def calls(client: Any) -> tuple[Any, Any, Any]:
        return (
            client.get("http://payments/v1/charge/7?x=1"),
            client.get("http://payments/old"),
            client.get("http://payments/old", follow_redirects=True),
        )

    if mode == "sync":
        with meshlib.Client(environ=env) as client:
            rewritten, redirect, followed = calls(client)
    else:

        async def run() -> tuple[Any, Any, Any]:
            async with meshlib.AsyncClient(environ=env) as client:
                return (
                    await client.get("http://payments/v1/charge/7?x=1"),
                    await client.get("http://payments/old"),
                    await client.get("http://payments/old", follow_redirects=True),
                )

        rewritten, redirect, followed = anyio.run(run)
    assert rewritten.status_code == 200
    first = v1.requests[0]
    assert first.path == "/charge/7?x=1"  # the prefix replaced, the rest and the query kept
    assert first.headers["host"] == "billing.internal"
    assert redirect.status_code == 301
    assert redirect.headers["location"] == "http://payments/v1/charge/9"
    assert redirect.extensions["meshlib.local"] == "redirect"
    assert followed.status_code == 200  # the redirect led back into the routes: rewritten and sent to v1
    assert v1.requests[1].path == "/charge/9"
    assert v1.count == 2
