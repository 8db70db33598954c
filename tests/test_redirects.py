"""Redirects and the mesh boundary: a host outside the mesh cannot send the client into a mesh service.

Real backends on loopback: ``outside`` is reached by its address (not a mesh service) and answers a redirect;
``payments`` is a mesh service. What matters is what the mesh backend received: nothing, when refused.
"""

from __future__ import annotations

import pytest

import meshlib
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory, static_target
from tests.httplib import LIBRARY, httpx


def _env(backend: Backend) -> dict[str, str]:
    return {"MESHLIB_SERVICE_PAYMENTS": static_target([backend])}


def _redirecting(start_backends: BackendFactory, location: str) -> Backend:
    (outside,) = start_backends(1, Behavior(status=302, body=b"", headers=(("location", location),)), prefix="out")
    return outside


def _assert_refused(error: meshlib.RedirectRefusedError, outside: Backend) -> None:
    assert isinstance(error, httpx.RequestError)  # the library's flavour, as for every meshlib error
    assert type(error).__module__ == f"meshlib.{LIBRARY}"
    assert error.source == f"http://127.0.0.1:{outside.port}/start?…"  # no user info, no query
    assert error.target == "http://payments/admin"
    assert error.service == "payments"
    message = str(error)
    assert f"127.0.0.1:{outside.port}" in message and "http://payments/admin" in message
    assert "secret" not in message and "hunter2" not in message


def test_a_redirect_from_outside_into_the_mesh_is_refused(start_backends: BackendFactory) -> None:
    (mesh,) = start_backends(1, prefix="mesh")
    outside = _redirecting(start_backends, "http://payments/admin")
    with (
        meshlib.Client(environ=_env(mesh), follow_redirects=True) as client,
        pytest.raises(meshlib.RedirectRefusedError) as refused,
    ):
        client.get(f"http://user:hunter2@127.0.0.1:{outside.port}/start?token=secret")
    _assert_refused(refused.value, outside)
    assert outside.count == 1
    assert mesh.count == 0


@pytest.mark.anyio
async def test_an_async_redirect_from_outside_into_the_mesh_is_refused(start_backends: BackendFactory) -> None:
    (mesh,) = start_backends(1, prefix="mesh")
    outside = _redirecting(start_backends, "http://payments/admin")
    async with meshlib.AsyncClient(environ=_env(mesh), follow_redirects=True) as client:
        with pytest.raises(meshlib.RedirectRefusedError) as refused:
            await client.get(f"http://user:hunter2@127.0.0.1:{outside.port}/start?token=secret")
    _assert_refused(refused.value, outside)
    assert mesh.count == 0


def test_next_request_is_no_back_door(start_backends: BackendFactory) -> None:
    """Not following: the caller gets the 302; sending ``next_request`` as it is is refused the same way."""
    (mesh,) = start_backends(1, prefix="mesh")
    outside = _redirecting(start_backends, "http://payments/admin")
    with meshlib.Client(environ=_env(mesh)) as client:
        response = client.get(f"{outside.url}/start?token=secret")
        assert response.status_code == 302
        assert response.next_request is not None
        with pytest.raises(meshlib.RedirectRefusedError):
            client.send(response.next_request)
        assert mesh.count == 0
        # A new request to the URL is the caller's own decision: it goes to the mesh as any call does.
        assert client.get(response.headers["location"]).status_code == 200
    assert mesh.count == 1


@pytest.mark.anyio
async def test_async_next_request_is_no_back_door(start_backends: BackendFactory) -> None:
    (mesh,) = start_backends(1, prefix="mesh")
    outside = _redirecting(start_backends, "http://payments/admin")
    async with meshlib.AsyncClient(environ=_env(mesh)) as client:
        response = await client.get(f"{outside.url}/start")
        assert response.status_code == 302
        with pytest.raises(meshlib.RedirectRefusedError):
            await client.send(response.next_request)
    assert mesh.count == 0


def test_redirects_from_a_mesh_service_are_followed(start_backends: BackendFactory) -> None:
    """mesh -> mesh and mesh -> outside are the service's own choice, followed as httpx follows them."""
    (elsewhere,) = start_backends(1, prefix="elsewhere")
    (mesh,) = start_backends(1, prefix="mesh")
    ledger = _redirecting(start_backends, "http://payments/landed")
    billing = _redirecting(start_backends, elsewhere.url + "/out")
    env = {
        "MESHLIB_SERVICE_PAYMENTS": static_target([mesh]),
        "MESHLIB_SERVICE_LEDGER": static_target([ledger]),
        "MESHLIB_SERVICE_BILLING": static_target([billing]),
    }
    with meshlib.Client(environ=env, follow_redirects=True) as client:
        assert client.get("http://ledger/go").status_code == 200
        assert client.get("http://billing/go").status_code == 200
    assert [r.path for r in mesh.requests] == ["/landed"]
    assert [r.path for r in elsewhere.requests] == ["/out"]


def test_redirects_between_outside_hosts_are_followed(start_backends: BackendFactory) -> None:
    (elsewhere,) = start_backends(1, prefix="elsewhere")
    outside = _redirecting(start_backends, elsewhere.url + "/landed")
    with meshlib.Client(environ={}, follow_redirects=True) as client:
        assert client.get(outside.url + "/start").status_code == 200
    assert elsewhere.count == 1
