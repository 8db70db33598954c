"""The live view: ``mesh_status()`` snapshots, the loopback admin endpoint, and ``meshlib status``."""

from __future__ import annotations

import copy
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import meshlib
from meshlib import admin
from meshlib.status import printable
from meshlib.testing import Backend, Behavior
from meshlib.tools import cli
from meshlib.tools.cli import main
from tests.conftest import BackendFactory, static_target
from tests.httplib import httpx


def _env(backends: list[Backend], **settings: str) -> dict[str, str]:
    env = {"MESHLIB_SERVICE_PAYMENTS": static_target(backends), "MESHLIB_SERVICE_LEDGER": static_target(backends)}
    env.update({f"MESHLIB_{key}": value for key, value in settings.items()})
    return env


def _get(address: tuple[str, int], path: str, **headers: str) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10) as plain:
        return plain.get(f"http://{address[0]}:{address[1]}{path}", headers=headers)


@pytest.fixture(autouse=True)
def no_admin_left_behind() -> Iterator[None]:
    yield
    assert admin.running() == {}, "a test left an admin server running"


def test_mesh_status_is_a_json_ready_snapshot(start_backends: BackendFactory) -> None:
    backends = start_backends(2)
    backends[1].behavior = Behavior(status=503)
    with meshlib.Client(environ=_env(backends, RETRIES="0")) as client:
        for _ in range(4):
            client.get("http://payments/x")
        status = client.mesh_status()
    assert isinstance(status, meshlib.MeshStatus)
    assert status.client == "sync"
    payload = json.loads(json.dumps(status.to_dict()))  # plain data, all the way down
    ledger, payments = payload["services"]
    assert ledger["name"] == "ledger" and ledger["started"] is False and ledger["endpoints"] == []
    assert payments["started"] is True and payments["balancer"] == "p2c_ewma"
    assert payments["discovery"]["source"].startswith("static://")
    assert payments["discovery"]["refreshes"] == 1 and payments["discovery"]["age_s"] >= 0
    assert payments["budget"]["max_inflight"] == 1024 and payments["budget"]["inflight"] == 0
    endpoints = {e["address"]: e for e in payments["endpoints"]}
    assert set(endpoints) == {b.address for b in backends}
    assert sum(e["requests"] for e in endpoints.values()) == 4
    assert endpoints[backends[1].address]["failures"] == backends[1].count
    assert all(e["latency_ms"] > 0 and e["breaker"] == "closed" and e["ejected"] is False for e in endpoints.values())


@pytest.mark.anyio
async def test_async_mesh_status(start_backends: BackendFactory) -> None:
    async with meshlib.AsyncClient(environ=_env(start_backends(1))) as client:
        await client.get("http://ledger/")
        status = client.mesh_status()
    assert status.client == "async"
    assert [s.started for s in status.services] == [True, False]


@pytest.mark.parametrize("address", ["0.0.0.0:9901", "10.1.2.3:9901", "[::]:9901", "example.com:9901", "9901"])
def test_the_admin_endpoint_is_loopback_only(address: str) -> None:
    with pytest.raises(meshlib.ConfigError, match="MESHLIB_ADMIN_ADDR"):
        meshlib.Client(environ={"MESHLIB_ADMIN_ADDR": address})


def test_admin_endpoint_serves_status_and_metrics(start_backends: BackendFactory) -> None:
    backends = start_backends(1)
    env = _env(backends, ADMIN_ADDR="127.0.0.1:0")
    with meshlib.Client(environ=env) as one, meshlib.Client(environ=env) as two:
        address = one.admin_address
        assert address is not None and address[0] == "127.0.0.1" and address[1] > 0
        assert two.admin_address == address  # one server per address per process, shared
        one.get("http://payments/a")
        two.get("http://payments/b")
        status = _get(address, "/status")
        assert status.status_code == 200 and status.headers["content-type"] == "application/json"
        body = status.json()
        assert body["meshlib"] == meshlib.__version__
        assert len(body["clients"]) == 2
        metrics = _get(address, "/metrics")
        assert metrics.status_code == 200
        assert "http_client_request_duration_seconds_count" in metrics.text
        assert 'server_address="payments"' in metrics.text
        assert "meshlib_client_attempts" in metrics.text
        assert _get(address, "/status", Host="attacker.example").status_code == 403  # DNS rebinding
        assert _get(address, "/nothing").status_code == 404
        one.close()
        assert len(_get(address, "/status").json()["clients"]) == 1  # still served for the other client
    with pytest.raises(httpx.ConnectError):  # the last client closed: the server stopped
        _get(address, "/status")


def test_metrics_without_the_exporter_is_404_with_a_hint(
    start_backends: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin._Prometheus, "create", classmethod(lambda cls: None))
    with meshlib.Client(environ=_env(start_backends(1), ADMIN_ADDR="[::1]:0")) as client:
        address = client.admin_address
        assert address is not None and address[0] == "::1"
        with httpx.Client(trust_env=False, timeout=10) as plain:
            answer = plain.get(f"http://[::1]:{address[1]}/metrics")
    assert answer.status_code == 404
    assert "pip install 'meshlib[prometheus]'" in answer.text


def test_a_busy_admin_port_is_a_warning_not_a_failure(
    start_backends: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="meshlib.admin"):
            client = meshlib.Client(environ=_env(start_backends(1), ADMIN_ADDR=f"127.0.0.1:{port}"))
        with client:
            assert client.admin_address is None
            assert client.get("http://payments/").status_code == 200
    (record,) = caplog.records
    assert f"127.0.0.1:{port}" in record.getMessage() and "MESHLIB_ADMIN_ADDR" in record.getMessage()


def test_meshlib_status_prints_a_table(start_backends: BackendFactory, capsys: pytest.CaptureFixture[str]) -> None:
    backends = start_backends(2)
    with meshlib.Client(environ=_env(backends, ADMIN_ADDR="127.0.0.1:0")) as client:
        client.get("http://payments/")
        address = client.admin_address
        assert address is not None
        assert main(["status", "--addr", f"127.0.0.1:{address[1]}"]) == 0
        table = capsys.readouterr().out
        assert main(["status", "--addr", f"localhost:{address[1]}", "--json"]) == 0
        raw = json.loads(capsys.readouterr().out)
    assert "client 1 (sync): 2 service(s)" in table
    assert "ENDPOINT" in table and "EWMA ms" in table and "BREAKER" in table
    assert all(b.address in table for b in backends)
    assert "ledger (not used yet)" in table
    assert raw["clients"][0]["client"] == "sync"


def test_meshlib_status_without_an_admin_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        assert main(["status", "--addr", f"127.0.0.1:{port}"]) == 1
    assert "MESHLIB_ADMIN_ADDR" in capsys.readouterr().err
    assert main(["status", "--addr", "192.0.2.1:9901"]) == 2  # loopback only, here too


# --- meshlib status against whatever answers on the admin port ------------------------------------------------

#: Every character a terminal may act on: C0 controls (but the newline ending each line), DEL, C1 controls.
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(scope="module")
def real_status() -> dict[str, Any]:
    """A genuine ``/status`` answer (one client, one used service), to be served altered by a fake endpoint."""
    with Backend("real") as backend:
        env = {"MESHLIB_SERVICE_PAYMENTS": static_target([backend]), "MESHLIB_ADMIN_ADDR": "127.0.0.1:0"}
        with meshlib.Client(environ=env) as client:
            client.get("http://payments/")
            address = client.admin_address
            assert address is not None
            payload: dict[str, Any] = _get(address, "/status").json()
    return payload


def _status_from(backend: Backend, *extra: str) -> int:
    return main(["status", "--addr", backend.address, *extra])


def _assert_one_line_error(err: str, backend: Backend, *expected: str) -> None:
    assert err.count("\n") == 1 and err.startswith("meshlib: ")
    assert backend.address in err and "Traceback" not in err
    assert not _CONTROL.search(err.rstrip("\n"))
    for text in expected:
        assert text in err


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[]", "the payload is a list of 0 item(s); expected a JSON object (meshlib's /status)"),
        (b'"ok"', "the payload is the string 'ok'; expected a JSON object"),
        (b"42", "the payload is the number 42; expected a JSON object"),
        (b"null", "the payload is null; expected a JSON object"),
        (b'{"meshlib": "0.1.0", "pid": 1}', "clients is missing; expected a list"),
        (b'{"meshlib": "0.1.0", "pid": 1, "clients": {}}', "clients is a JSON object; expected a list"),
        (b'{"meshlib": "0.1.0", "pid": "1", "clients": []}', "pid is the string '1'; expected a whole number"),
        (b"<html>\x1b[2J</html>", "answered 17 bytes that are not JSON (starting '<html>\\x1b[2J</html>')"),
        (b"[" * 100_000, "that are not JSON"),  # nesting deeper than the decoder's recursion limit
    ],
    ids=["list", "string", "number", "null", "missing", "wrong-type", "pid-type", "non-json", "deep"],
)
def test_meshlib_status_refuses_an_answer_of_the_wrong_shape(
    start_backends: BackendFactory, capsys: pytest.CaptureFixture[str], body: bytes, expected: str
) -> None:
    (backend,) = start_backends(1, Behavior(body=body))
    assert _status_from(backend) == 1
    assert _status_from(backend, "--json") == 1  # --json prints only what it has checked too
    captured = capsys.readouterr()
    assert captured.out == ""
    first, second = captured.err.splitlines(keepends=True)
    assert first == second
    _assert_one_line_error(first, backend, f"http://{backend.address}/status", expected)


def test_meshlib_status_names_the_first_bad_field_deep_inside(
    start_backends: BackendFactory, capsys: pytest.CaptureFixture[str], real_status: dict[str, Any]
) -> None:
    (backend,) = start_backends(1)
    cases = [
        (("services", 0, "name"), 5, "clients[0].services[0].name is the number 5; expected a string"),
        (
            ("services", 0, "discovery", "age_s"),
            "old",
            "discovery.age_s is the string 'old'; expected a number or null",
        ),
        (("services", 0, "endpoints", 0, "ejected"), "no", "endpoints[0].ejected is the string 'no'; expected true or"),
        (("services", 0, "budget"), [], "clients[0].services[0].budget is a list of 0 item(s); expected a JSON object"),
        (("services", 0, "endpoints", 0, "inflight"), True, "endpoints[0].inflight is true; expected a whole number"),
    ]
    for path, value, expected in cases:
        payload = copy.deepcopy(real_status)
        target = payload["clients"][0]
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        backend.behavior = Behavior(body=json.dumps(payload).encode())
        assert _status_from(backend) == 1
        _assert_one_line_error(capsys.readouterr().err, backend, expected)
    payload = copy.deepcopy(real_status)
    del payload["clients"][0]["services"][0]["endpoints"][0]["breaker"]
    backend.behavior = Behavior(body=json.dumps(payload).encode())
    assert _status_from(backend) == 1
    _assert_one_line_error(capsys.readouterr().err, backend, "endpoints[0].breaker is missing; expected a string")


def test_meshlib_status_refuses_an_error_status_and_a_huge_answer(
    start_backends: BackendFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    (backend,) = start_backends(1, Behavior(status=404, body=b"{}"))
    assert _status_from(backend) == 1
    _assert_one_line_error(capsys.readouterr().err, backend, "answered HTTP 404, expected 200 with /status JSON")
    backend.behavior = Behavior(body=b'"' + b"a" * cli.MAX_STATUS_BYTES + b'"')
    assert _status_from(backend) == 1
    _assert_one_line_error(capsys.readouterr().err, backend, "answered more than 16 MiB")


def test_meshlib_status_refuses_a_server_that_does_not_speak_http(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer_garbage() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"\x1b]0;pwned\x07 not http\r\n\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        assert main(["status", "--addr", f"127.0.0.1:{port}"]) == 1
        thread.join(timeout=10)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "well-formed HTTP" in err
    assert not _CONTROL.search(err.rstrip("\n"))


def test_meshlib_status_escapes_what_the_peer_wrote(
    start_backends: BackendFactory, capsys: pytest.CaptureFixture[str], real_status: dict[str, Any]
) -> None:
    payload = copy.deepcopy(real_status)
    service = payload["clients"][0]["services"][0]
    service["name"] = "pay\x1b[31mments\u202e"
    service["balancer"] = "p2c\x9b2J"  # C1 CSI: an escape sequence without ESC
    service["discovery"]["consecutive_failures"] = 1
    consul_body = "rpc error: \x1b]0;pwned\x07\x1b[2J\r" + "x" * 10_000  # a hostile Consul error body
    service["discovery"]["last_error"] = f"consul answered 500: {consul_body}"
    service["endpoints"][0]["address"] = "10.0.0.1:80\x08\x08\x08evil"
    payload["meshlib"] = "0.1\x00"
    (backend,) = start_backends(1, Behavior(body=json.dumps(payload).encode()))
    assert _status_from(backend) == 0
    out = capsys.readouterr().out
    assert not _CONTROL.search(out)
    assert "pay\\x1b[31mments\\u202e" in out and "p2c\\x9b2J" in out and "meshlib 0.1\\x00," in out
    assert "consul answered 500: rpc error: \\x1b]0;pwned\\x07\\x1b[2J\\x0d" in out
    assert "10.0.0.1:80\\x08\\x08\\x08evil" in out
    assert max(len(line) for line in out.splitlines()) < 600  # the 10,000-character body was cut
    assert _status_from(backend, "--json") == 0
    raw = capsys.readouterr().out
    assert not _CONTROL.search(raw) and json.loads(raw) == payload  # JSON escapes, and says it all


def test_meshlib_status_prints_why_an_endpoint_is_ejected_escaped(real_status: dict[str, Any]) -> None:
    from meshlib.status import format_status

    payload = copy.deepcopy(real_status)
    service = payload["clients"][0]["services"][0]
    service["endpoints"][0].update(ejected=True, ejected_reason="success-rate\x1b[2J")
    service["ejections"] = 3
    service["ejections_by_reason"] = {"consecutive": 2, "success-rate": 1, "failure-percentage": 0, "x": "bad"}
    table = format_status(payload)
    assert "3 ejection(s) (consecutive 2, success-rate 1)" in table
    assert "success-rate\\x1b[2J" in table and not _CONTROL.search(table)
    del service["endpoints"][0]["ejected_reason"]  # an older meshlib: yes/no only
    del service["ejections_by_reason"]
    lines = format_status(payload).splitlines()
    assert any(line.endswith("; 3 ejection(s)") for line in lines)
    assert [line.split()[7] for line in lines if line.lstrip().startswith("127.0.0.1:")] == ["yes"]


def test_printable_escapes_and_bounds() -> None:
    assert printable("payments") == "payments"
    assert printable("a\x1b[0m\x7f\x85\u2028b") == "a\\x1b[0m\\x7f\\x85\\u2028b"
    assert printable("x" * 50, 10) == "x" * 10 + "..."
    assert printable("\x1b" * 50, 10) == "\\x1b" * 2 + "..."
    assert printable(404) == "404"


# --- the inbound middleware's metrics on the admin endpoint ---------------------------------------------------


def _teapot_asgi(done: threading.Semaphore) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from meshlib.server import MeshMiddleware

    async def teapot(request: Request) -> PlainTextResponse:
        return PlainTextResponse("short and stout", status_code=418)

    class Finished:  # outside the mesh middleware: released once its hooks have recorded the request
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)
            if scope["type"] == "http":
                done.release()

    middleware = [Middleware(Finished), Middleware(MeshMiddleware)]
    return Starlette(routes=[Route("/tea", teapot)], middleware=middleware)


def _teapot_wsgi(done: threading.Semaphore) -> Any:
    from meshlib.server import WSGIMeshMiddleware

    def teapot(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("418 I'm a teapot", [("content-type", "text/plain")])
        return [b"short and stout"]

    wrapped = WSGIMeshMiddleware(teapot)

    def finished(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        body = wrapped(environ, start_response)
        try:
            yield from body
        finally:  # the server closes the body after sending it; the mesh middleware's hooks exit in close()
            getattr(body, "close", lambda: None)()
            done.release()

    return finished


@pytest.mark.parametrize("protocol", ["asgi", "wsgi"])
def test_admin_metrics_include_the_inbound_server_metrics(start_backends: BackendFactory, protocol: str) -> None:
    from tests.server.test_middleware import serve_asgi, serve_wsgi

    done = threading.Semaphore(0)
    serve = serve_asgi(_teapot_asgi(done)) if protocol == "asgi" else serve_wsgi(_teapot_wsgi(done))
    # No meter provider anywhere: the admin endpoint is the only place these metrics go.
    with (
        serve as url,
        meshlib.Client(environ=_env(start_backends(1), ADMIN_ADDR="127.0.0.1:0")) as client,
        httpx.Client(trust_env=False, timeout=10) as plain,
    ):
        address = client.admin_address
        assert address is not None
        for _ in range(3):
            assert plain.get(f"{url}/tea").status_code == 418
        for _ in range(3):
            assert done.acquire(timeout=10)
        text = _get(address, "/metrics").text
    (count,) = [line for line in text.splitlines() if line.startswith("http_server_request_duration_seconds_count{")]
    assert 'http_request_method="GET"' in count and 'http_response_status_code="418"' in count
    assert count.endswith(" 3.0")
    assert re.search(r'^http_server_active_requests\{[^}]*http_request_method="GET"[^}]*\} 0\.0$', text, re.M)


def test_meshlib_status_shows_the_inbound_policy_files_and_a_rejected_version(
    start_backends: BackendFactory, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    from meshlib.server.authz import AuthorizationHook

    path = tmp_path / "authz.yaml"
    path.write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n"
        "spec: {action: ALLOW, rules: [{}]}\n"
    )
    hook = AuthorizationHook(file=str(path), reload_interval=0)
    path.write_text(path.read_text().replace("ALLOW", "ALLOWED"))
    assert hook.source is not None and hook.source.check_now()
    backends = start_backends(1)
    try:
        with meshlib.Client(environ=_env(backends, ADMIN_ADDR="127.0.0.1:0")) as client:
            address = client.admin_address
            assert address is not None
            assert main(["status", "--addr", f"127.0.0.1:{address[1]}"]) == 0
            table = capsys.readouterr().out
            raw = _get(address, "/status").json()
    finally:
        hook.close()
    mine = [source for source in raw["inbound"] if source["path"] == str(path)]
    assert len(mine) == 1 and mine[0]["what"] == "authz" and mine[0]["applied"] == 1
    assert "ALLOWED" in mine[0]["rejected"]["error"]
    assert f"inbound authz: MESHLIB_AUTHZ_FILE={path} version" in table
    assert "REJECTED version" in table and "spec.action='ALLOWED'" in table
