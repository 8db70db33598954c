"""Testing mode (``meshlib.testing.set_testing``): users' unit tests, written as users write them.

Each test mocks the URL the code under test calls (``http://payments/charge``) with the mocking library a user
would pick: pytest-httpx (``httpx_mock``; on httpx2 its fork httpx2-pytest, ``httpx2_mock``), respx (httpx
only: it patches httpcore, which httpx2 does not use) or ``MockTransport``. The service's discovery target is a
Consul name with no Consul anywhere: testing mode must not ask it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from meshlib.testing import is_testing, set_testing
from tests.httplib import LIBRARY, ONLY_HTTPX, httpx

#: Unreachable discovery: a test that asked it would fail (nothing listens on port 9 of loopback).
ENV = {"MESHLIB_SERVICE_PAYMENTS": "consul://payments", "CONSUL_HTTP_ADDR": "127.0.0.1:9"}


@pytest.fixture(autouse=True)
def testing_mode() -> Iterator[None]:
    with set_testing(True):
        yield
    assert not is_testing()


@pytest.fixture
def http_mock(request: pytest.FixtureRequest) -> Any:
    """pytest-httpx's fixture for the library under test: ``httpx_mock`` or httpx2-pytest's ``httpx2_mock``."""
    return request.getfixturevalue("httpx2_mock" if LIBRARY == "httpx2" else "httpx_mock")


def charge(client: meshlib.Client) -> dict[str, Any]:
    """The code under test: a user's function calling a mesh service by its logical name."""
    response = client.post("http://payments/charge", json={"amount": 5})
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


async def acharge(client: meshlib.AsyncClient) -> dict[str, Any]:
    response = await client.post("http://payments/charge", json={"amount": 5})
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def test_pytest_httpx_matches_the_logical_url(http_mock: Any) -> None:
    http_mock.add_response(method="POST", url="http://payments/charge", json={"charged": 5})
    with meshlib.Client(environ=ENV) as client:
        assert charge(client) == {"charged": 5}
    (sent,) = http_mock.get_requests()
    assert sent.url == "http://payments/charge"
    assert sent.headers["host"] == "payments"
    assert json.loads(sent.content) == {"amount": 5}


@pytest.mark.anyio
async def test_async_pytest_httpx_matches_the_logical_url(http_mock: Any) -> None:
    http_mock.add_response(method="POST", url="http://payments/charge", json={"charged": 5})
    async with meshlib.AsyncClient(environ=ENV) as client:
        assert await acharge(client) == {"charged": 5}
    (sent,) = http_mock.get_requests()
    assert sent.url == "http://payments/charge"


@ONLY_HTTPX
def test_respx_matches_the_logical_url() -> None:
    import respx

    with respx.mock(assert_all_called=True) as router:
        route = router.post("http://payments/charge").mock(return_value=httpx.Response(200, json={"charged": 5}))
        with meshlib.Client(environ=ENV) as client:
            assert charge(client) == {"charged": 5}
    assert route.call_count == 1
    assert route.calls.last.request.url == "http://payments/charge"


@ONLY_HTTPX
@pytest.mark.anyio
async def test_async_respx_matches_the_logical_url() -> None:
    import respx

    with respx.mock(assert_all_called=True) as router:
        route = router.post("http://payments/charge").mock(return_value=httpx.Response(200, json={"charged": 5}))
        async with meshlib.AsyncClient(environ=ENV) as client:
            assert await acharge(client) == {"charged": 5}
    assert route.call_count == 1


def test_mock_transport_sees_the_logical_url() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"charged": 5})

    with meshlib.Client(environ=ENV, transport=httpx.MockTransport(handler)) as client:
        assert charge(client) == {"charged": 5}
    assert seen == ["http://payments/charge"]


def test_one_attempt_by_default_so_the_code_sees_the_mocked_failure(http_mock: Any) -> None:
    http_mock.add_response(url="http://payments/charge", status_code=503)
    with meshlib.Client(environ=ENV) as client, pytest.raises(httpx.HTTPStatusError):
        charge(client)
    assert len(http_mock.get_requests()) == 1  # the policy's retry is not made


@pytest.mark.timeout(20)  # "did not wait": a Retry-After of an hour would hang past this
@pytest.mark.anyio
async def test_attempts_retry_without_waiting(http_mock: Any) -> None:
    http_mock.add_response(url="http://payments/balance", status_code=503, headers={"retry-after": "3600"})
    http_mock.add_response(url="http://payments/balance", status_code=503)
    http_mock.add_response(url="http://payments/balance", json={"balance": 5})
    with set_testing(True, attempts=3):
        async with meshlib.AsyncClient(environ=ENV) as client:
            assert (await client.get("http://payments/balance")).json() == {"balance": 5}
    assert is_testing()  # the inner context put back the outer mode
    assert len(http_mock.get_requests()) == 3


def test_attempts_keep_the_safety_rules(http_mock: Any) -> None:
    """A POST that reached the server is not re-sent in testing mode either: the code sees what production sees."""
    http_mock.add_response(url="http://payments/charge", status_code=503)
    with set_testing(True, attempts=3), meshlib.Client(environ=ENV) as client, pytest.raises(httpx.HTTPStatusError):
        charge(client)
    assert len(http_mock.get_requests()) == 1


def test_failures_open_no_breaker_and_eject_nothing(http_mock: Any) -> None:
    http_mock.add_response(url="http://payments/charge", status_code=500, is_reusable=True)
    with meshlib.Client(environ=ENV) as client:
        for _ in range(10):  # twice the consecutive failures that open a breaker and eject an endpoint
            assert client.post("http://payments/charge").status_code == 500
        service = client.mesh.services["PAYMENTS"]
        assert service.breakers == {}
        assert not service.detector.ejected()
        assert service.active is None  # discovery was never asked
    assert len(http_mock.get_requests()) == 10


def test_each_request_keeps_its_own_url(http_mock: Any) -> None:
    """One stand-in endpoint per service; the URL (port included) is never rewritten to it."""
    http_mock.add_response(url="http://payments:8080/charge", json={})
    http_mock.add_response(url="http://payments/refund", json={})
    with meshlib.Client(environ=ENV) as client:
        response = client.get("http://payments:8080/charge")
        assert client.get("http://payments/refund").status_code == 200
    assert response.extensions["meshlib.service"] == "payments"
    assert response.extensions["meshlib.endpoint"] == "payments:8080"
    assert [str(r.url) for r in http_mock.get_requests()] == ["http://payments:8080/charge", "http://payments/refund"]


def test_off_again_the_mesh_asks_discovery() -> None:
    with set_testing(False), meshlib.Client(environ=ENV) as client, pytest.raises(meshlib.DiscoveryError):
        client.get("http://payments/charge")  # Consul is not there: testing mode is what made the calls work


def test_set_testing_names_a_bad_attempts_value() -> None:
    with pytest.raises(ValueError, match=r"attempts=0 is invalid: expected an integer >= 1"):
        set_testing(True, attempts=0)
    assert is_testing()  # a refused call changes nothing
