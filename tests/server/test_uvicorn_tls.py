"""meshlib.server.uvicorn: a real uvicorn over real TLS gives each request the ASGI TLS extension.

The app answers with the ``tls`` extension it was given (and its ``id``); the client side is the stdlib's
``http.client`` (so the test knows the negotiated version and cipher from its own socket) or ``websockets``.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any

import pytest

from meshlib.server.middleware import ASGIInboundMiddleware, PeerIdentityHook, peer_identity
from tests.httplib import httpx
from tests.security.pki import CA, Leaf
from tests.server.test_middleware import serve_asgi

protocols = pytest.importorskip("meshlib.server.uvicorn", reason="uvicorn is in the dev extra")

SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
#: IANA codes of the suites this test can negotiate (RFC 8446 and RFC 5289), written out independently.
IANA = {
    "TLS_AES_128_GCM_SHA256": 0x1301,
    "TLS_AES_256_GCM_SHA384": 0x1302,
    "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
    "ECDHE-ECDSA-AES128-GCM-SHA256": 0xC02B,
}
HTTP_PROTOCOLS = [name for name in ("H11Protocol", "HttpToolsProtocol") if hasattr(protocols, name)]


async def tls_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Answers ``{"tls": <the extension or null>, "id": id(extension)}``; websockets get the same and the peer."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    tls = (scope.get("extensions") or {}).get("tls")
    answer = json.dumps({"tls": tls, "id": id(tls), "peer": str(peer_identity())}).encode()
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": answer.decode()})
        await send({"type": "websocket.close", "code": 1000})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = CA("cluster.local CA", trust_domain="cluster.local")
        self.ca_file = self.ca.write(directory / "ca.pem")
        self.server = self.ca.issue("127.0.0.1", common_name="httpbin")
        self.server_files = self.server.write(directory, "server")
        self.sleep: Leaf = self.ca.issue(uris=(SLEEP,), common_name="sleep")
        self.sleep_files = self.sleep.write(directory, "sleep")

    def options(self, http: str, **extra: Any) -> dict[str, Any]:
        cert, key = self.server_files
        return {
            "http": getattr(protocols, http),
            "ssl_certfile": str(cert),
            "ssl_keyfile": str(key),
            "ssl_ca_certs": str(self.ca_file),
            "ssl_cert_reqs": ssl.CERT_OPTIONAL,
            **extra,
        }

    def client_context(self, *, certificate: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if certificate:
            context.load_cert_chain(*self.sleep_files)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("uvicorn-tls"))


def get(connection: HTTPSConnection) -> dict[str, Any]:
    connection.request("GET", "/")
    response = connection.getresponse()
    assert response.status == 200
    answer: dict[str, Any] = json.loads(response.read())
    return answer


def der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_extension_carries_the_verified_client_certificate(pki: Pki, protocol: str) -> None:
    with serve_asgi(tls_app, **pki.options(protocol)) as url:
        port = int(url.rsplit(":", 1)[1])
        connection = HTTPSConnection("127.0.0.1", port, context=pki.client_context(), timeout=10)
        again = HTTPSConnection("127.0.0.1", port, context=pki.client_context(), timeout=10)
        try:
            first, second = get(connection), get(connection)  # one keep-alive connection
            other_connection = get(again)  # while the first is open (its dictionary alive: ids stay distinct)
            assert connection.sock is not None
            version, cipher = connection.sock.version(), connection.sock.cipher()
        finally:
            connection.close()
            again.close()

    tls = first["tls"]
    assert [der(pem) for pem in tls["client_cert_chain"]] == [pki.sleep.der]  # Python < 3.13: the leaf only
    assert tls["client_cert_name"] == "CN=sleep"
    assert tls["client_cert_error"] is None
    assert tls["tls_version"] == {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303}[str(version)]
    assert cipher is not None and tls["cipher_suite"] == IANA[cipher[0]]
    assert der(tls["server_cert"]) == pki.server.der
    assert second == first  # the same dictionary for every request of the connection...
    assert other_connection["tls"] == tls and other_connection["id"] != first["id"]  # ...and one per connection


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_tls_1_2_version_and_cipher_codes(pki: Pki, protocol: str) -> None:
    context = pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with serve_asgi(tls_app, **pki.options(protocol)) as url:
        connection = HTTPSConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), context=context, timeout=10)
        try:
            tls = get(connection)["tls"]
        finally:
            connection.close()
    assert (tls["tls_version"], tls["cipher_suite"]) == (0x0303, 0xC02B)
    assert [der(pem) for pem in tls["client_cert_chain"]] == [pki.sleep.der]


def test_no_client_certificate_and_plain_text(pki: Pki) -> None:
    with serve_asgi(tls_app, **pki.options("H11Protocol")) as url:
        port = int(url.rsplit(":", 1)[1])
        connection = HTTPSConnection("127.0.0.1", port, context=pki.client_context(certificate=False))
        try:
            anonymous = get(connection)
        finally:
            connection.close()
    assert anonymous["tls"]["client_cert_chain"] == [] and anonymous["tls"]["client_cert_name"] is None
    assert anonymous["tls"]["tls_version"] in (0x0303, 0x0304) and anonymous["peer"] == "None"

    with serve_asgi(tls_app, http=protocols.H11Protocol) as url:  # no TLS: no extension (the spec forbids it)
        assert httpx.get(url, timeout=10).json()["tls"] is None


def test_server_certificate_unknown_without_a_readable_certfile(pki: Pki, tmp_path: Path) -> None:
    """``server_cert`` is read from uvicorn's ``ssl_certfile`` once per config; a key-only file yields ``None``."""
    from uvicorn import Config

    config = Config(tls_app, ssl_certfile=str(tmp_path / "missing.pem"))
    assert protocols._server_cert(config) is None
    config = Config(tls_app, ssl_certfile=str(pki.server_files[0]))
    assert protocols._server_cert(config) is not None
    assert der(protocols._server_cert(config)) == pki.server.der


def test_an_existing_tls_extension_is_kept() -> None:
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["extensions"])

    ours = {"client_cert_chain": ("ours",)}
    wrapped = protocols.with_tls_extension(app, ours)
    theirs = {"client_cert_chain": ("theirs",)}
    asyncio.run(wrapped({"type": "http", "extensions": {"tls": theirs}}, None, None))
    asyncio.run(wrapped({"type": "http", "extensions": {"http.response.trailers": {}}}, None, None))
    asyncio.run(wrapped({"type": "http"}, None, None))
    assert seen == [{"tls": theirs}, {"http.response.trailers": {}, "tls": ours}, {"tls": ours}]


WS_PROTOCOLS = [name for name in ("WSProtocol", "WebSocketsSansIOProtocol") if hasattr(protocols, name)]


@pytest.mark.parametrize("ws", WS_PROTOCOLS)
@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_websocket_over_tls_gets_the_extension_and_the_peer(pki: Pki, protocol: str, ws: str) -> None:
    client = pytest.importorskip("websockets.sync.client")
    app = ASGIInboundMiddleware(tls_app, hooks=[PeerIdentityHook()])
    with serve_asgi(app, **pki.options(protocol, ws=getattr(protocols, ws))) as url:
        uri = "wss://127.0.0.1:" + url.rsplit(":", 1)[1] + "/ws"
        with client.connect(uri, ssl=pki.client_context(), open_timeout=10) as websocket:
            answer = json.loads(websocket.recv(timeout=10))
    assert [der(pem) for pem in answer["tls"]["client_cert_chain"]] == [pki.sleep.der]
    assert answer["peer"] == SLEEP


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_connections_have_nagle_off(pki: Pki, protocol: str, tls: bool) -> None:
    """uvicorn writes a response's head and body separately: with Nagle on, keep-alive requests wait for delayed
    ACKs. The protocol classes set TCP_NODELAY on each accepted connection (read back from the server's socket)."""
    import socket

    seen: list[int] = []
    base = getattr(protocols, protocol)

    class Probe(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    options = {**pki.options(protocol), "http": Probe} if tls else {"http": Probe}
    with serve_asgi(tls_app, **options) as url:
        port = int(url.rsplit(":", 1)[1])
        if tls:
            connection = HTTPSConnection("127.0.0.1", port, context=pki.client_context(), timeout=10)
            try:
                get(connection)
            finally:
                connection.close()
        else:
            with httpx.Client() as client:
                assert client.get(url).status_code == 200
    assert seen and all(flag != 0 for flag in seen)
