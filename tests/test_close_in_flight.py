"""``close()`` with calls in flight (issue 10, item 16).

A call whose attempt is on the wire when the client closes gets its answer: the connection is not closed under
its reader (which would also free the file descriptor for reuse while a thread still reads it). Its pool is closed
by the last request that ends on it, so nothing is left open. No attempt starts after the close: a retry the call
would have made raises ``meshlib.ClientClosedError`` (a ``RuntimeError``, as httpx's own) instead of going on to
"endpoints not applied yet".
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import meshlib
from meshlib.testing import Behavior
from tests.conftest import BackendFactory, static_target

pytestmark = pytest.mark.timeout(60)

SLOW = 0.5


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_a_call_in_flight_gets_its_answer_when_the_client_closes(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(delay=SLOW, body=b"the answer"))
    client = meshlib.Client(services={"svc": static_target([backend])}, environ={})
    thread, out = _in_thread(lambda: client.get("http://svc/"))
    assert backend.wait_for(1)
    client.close()
    thread.join(30)
    (result,) = out
    assert not isinstance(result, BaseException), repr(result)
    assert result.status_code == 200 and result.content == b"the answer"
    assert backend.count == 1
    assert backend.wait_idle(10), "the pool of the closed client was left open after its last request"


def test_a_streamed_body_is_read_to_the_end_after_close(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(body=b"x" * 500_000))
    client = meshlib.Client(services={"svc": static_target([backend])}, environ={})
    with client.stream("GET", "http://svc/") as response:
        client.close()
        assert sum(len(chunk) for chunk in response.iter_bytes()) == 500_000
    assert backend.wait_idle(10)


def test_no_retry_starts_after_close(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1, behavior=Behavior(status=503, delay=SLOW))
    client = meshlib.Client(services={"svc": static_target([backend])}, environ={"MESHLIB_RETRIES": "3"})
    thread, out = _in_thread(lambda: client.get("http://svc/"))
    assert backend.wait_for(1)
    client.close()
    thread.join(30)
    (result,) = out
    assert isinstance(result, meshlib.ClientClosedError), repr(result)
    assert isinstance(result, RuntimeError)
    assert "closed during the call after 1 attempt(s)" in str(result)
    assert backend.count == 1, "an attempt started after the client was closed"


def test_a_request_after_close_is_a_clear_error(start_backends: BackendFactory) -> None:
    (backend,) = start_backends(1)
    client = meshlib.Client(services={"svc": static_target([backend])}, environ={})
    client.get("http://svc/")
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.get("http://svc/")
    with pytest.raises(meshlib.ClientClosedError):
        client.mesh.handle_request(client.build_request("GET", "http://svc/"))
    assert backend.count == 1


@pytest.mark.anyio
async def test_async_call_in_flight_gets_its_answer_and_no_retry_starts(start_backends: BackendFactory) -> None:
    (ok,) = start_backends(1, behavior=Behavior(delay=SLOW, body=b"the answer"), prefix="ok")
    (failing,) = start_backends(1, behavior=Behavior(status=503, delay=SLOW), prefix="failing")
    client = meshlib.AsyncClient(
        services={"ok": static_target([ok]), "failing": static_target([failing])}, environ={"MESHLIB_RETRIES": "3"}
    )
    answered = asyncio.ensure_future(client.get("http://ok/"))
    refused = asyncio.ensure_future(client.get("http://failing/"))
    assert await asyncio.to_thread(ok.wait_for, 1)
    assert await asyncio.to_thread(failing.wait_for, 1)
    await client.aclose()
    response = await answered
    assert response.status_code == 200 and response.content == b"the answer"
    with pytest.raises(meshlib.ClientClosedError):
        await refused
    assert failing.count == 1
    assert await asyncio.to_thread(ok.wait_idle, 10)
