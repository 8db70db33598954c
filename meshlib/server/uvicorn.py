"""uvicorn protocol classes that give each request the ASGI TLS extension, so mTLS peers are identified.

uvicorn terminates TLS but does not implement the ASGI TLS extension: its scopes carry no client certificate,
so :class:`~meshlib.server.middleware.PeerIdentityHook` (which reads
``scope["extensions"]["tls"]["client_cert_chain"]``) cannot see who called. The classes here are uvicorn's own
protocols with one addition: when a TLS connection is made they read the handshake's results from the
transport's ``ssl_object`` once, build the extension dictionary once, and add it to the scope of every request
on that connection (the same dictionary each time; nothing is copied per request)::

    uvicorn app:app --http meshlib.server.uvicorn:H11Protocol --ws meshlib.server.uvicorn:WSProtocol \\
        --ssl-certfile server.crt --ssl-keyfile server.key --ssl-ca-certs ca.pem --ssl-cert-reqs 2

    uvicorn.run(app, http=H11Protocol, ws=WSProtocol, ssl_cert_reqs=ssl.CERT_REQUIRED, ...)

The dictionary follows the extension's specification (asgiref ``specs/tls.rst``, version 0.2):

- ``client_cert_chain``: PEM strings, the client's certificate first (``()`` without one). Before Python 3.13
  the :mod:`ssl` module exposes only the peer's own certificate, so the chain holds that one; from 3.13 the
  intermediates the client sent follow it (``SSLObject.get_unverified_chain``).
- ``client_cert_name``: the certificate subject as an RFC 4514 string, ``None`` without a certificate.
- ``client_cert_error``: always ``None``: Python's :mod:`ssl` refuses the handshake when a presented
  certificate fails verification, so a request only exists for certificates that passed (or for none).
- ``tls_version``: ``0x0303`` for TLS 1.2, ``0x0304`` for TLS 1.3 (``None`` for a version not listed).
- ``cipher_suite``: the IANA code of the negotiated suite (``0x1301`` for ``TLS_AES_128_GCM_SHA256``), found
  through the server context's :meth:`~ssl.SSLContext.get_ciphers` (OpenSSL's id is ``0x0300XXXX``).
- ``server_cert``: the first certificate of uvicorn's ``ssl_certfile`` as PEM (read once per ``Config``, the
  first time a TLS connection needs it; uvicorn itself loads its certificate once, at startup), else ``None``.

An extension already in the scope is never replaced, and plain-text connections get none (the specification
forbids it). The HTTP classes also set ``TCP_NODELAY`` on each connection (:func:`_no_delay`): without it a
keep-alive request through uvicorn waits up to 40 ms for a delayed ACK between the response head and body.
Whether the client certificate is required is uvicorn's ``ssl_cert_reqs`` (``CERT_REQUIRED``: 2,
``CERT_OPTIONAL``: 1); verification is OpenSSL's, against ``ssl_ca_certs``.

HTTP: :class:`H11Protocol`, and :class:`HttpToolsProtocol` when ``httptools`` is installed. WebSockets (the
upgrade builds a new protocol object for the connection, so it needs its own class): :class:`WSProtocol`
(``wsproto``) and :class:`WebSocketsSansIOProtocol` (``websockets``) when their libraries are installed.
uvicorn's legacy ``websockets`` protocol is not wrapped (importing it warns that it is deprecated); any other
protocol class gets the same behaviour as ``class Mine(TLSExtensionMixin, TheirProtocol)``.

uvicorn is an optional dependency of meshlib: it is imported here only, so ``import meshlib.server`` never
needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from cryptography import x509
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol as _H11Protocol

__all__ = ["TLS_EXTENSION", "H11Protocol", "TLSExtensionMixin", "tls_extension", "with_tls_extension"]

logger = logging.getLogger("meshlib.server")

#: The key of the extension in ``scope["extensions"]``.
TLS_EXTENSION = "tls"

_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
#: OpenSSL cipher name -> IANA code, filled from contexts' cipher lists as names are met (facts about OpenSSL,
#: the same for every server: safe to share; bounded by the number of cipher names OpenSSL knows).
_CIPHER_CODES: dict[str, int] = {}
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
#: The server's own certificate (PEM or ``None``) per uvicorn ``Config``; dropped with the config.
_SERVER_CERTS: weakref.WeakKeyDictionary[Config, str | None] = weakref.WeakKeyDictionary()

_Scope = MutableMapping[str, Any]
_App = Callable[[_Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


def _cipher_code(ssl_object: ssl.SSLObject) -> int | None:
    cipher = ssl_object.cipher()
    if cipher is None:
        return None
    name = cipher[0]
    code = _CIPHER_CODES.get(name)
    if code is None:
        for known in ssl_object.context.get_ciphers():
            _CIPHER_CODES[str(known["name"])] = int(known["id"]) & 0xFFFF
        code = _CIPHER_CODES.get(name)
    return code


def _client_chain(ssl_object: ssl.SSLObject) -> tuple[bytes, ...]:
    """The client's certificate (DER) and, where :mod:`ssl` exposes it (3.13+), the chain it sent after it."""
    leaf = ssl_object.getpeercert(binary_form=True)
    if not leaf:
        return ()
    chain = [leaf]
    unverified = getattr(ssl_object, "get_unverified_chain", None)
    if unverified is not None:
        try:
            sent = unverified() or ()
        except (ssl.SSLError, ValueError):
            sent = ()
        # DER bytes (3.13's ssl.py converts); OpenSSL may or may not list the leaf in a server's view of the chain
        chain.extend(der for der in sent if isinstance(der, bytes) and der != leaf)
    return tuple(chain)


def _subject(der: bytes) -> str | None:
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError as error:
        logger.debug("client certificate subject unreadable: %s", error)
        return None


def _server_cert(config: Config | None) -> str | None:
    """The first certificate of ``config.ssl_certfile`` as PEM text, read once per config; ``None`` if unknown."""
    if config is None:
        return None
    try:
        return _SERVER_CERTS[config]
    except KeyError:
        pass
    pem: str | None = None
    certfile = getattr(config, "ssl_certfile", None)
    if certfile:
        try:
            found = _PEM_CERTIFICATE.search(Path(certfile).read_bytes())
        except OSError as error:
            logger.debug("server certificate %s unreadable for the ASGI TLS extension: %s", certfile, error)
        else:
            pem = found.group().decode("ascii") + "\n" if found else None
    _SERVER_CERTS[config] = pem
    return pem


def tls_extension(ssl_object: ssl.SSLObject, server_cert: str | None = None) -> dict[str, Any]:
    """The ASGI TLS extension dictionary of a connection whose handshake ``ssl_object`` completed."""
    chain = _client_chain(ssl_object)
    return {
        "server_cert": server_cert,
        "client_cert_chain": tuple(ssl.DER_cert_to_PEM_cert(der) for der in chain),
        "client_cert_name": _subject(chain[0]) if chain else None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_code(ssl_object),
    }


def with_tls_extension(app: _App, tls: dict[str, Any]) -> _App:
    """``app`` with ``tls`` added as ``scope["extensions"]["tls"]`` to every scope that has none yet (an extension
    the server already provides is kept). For servers other than uvicorn that know the connection's TLS state."""

    async def app_with_tls(scope: _Scope, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        extensions = scope.get("extensions")
        if extensions is None:
            scope["extensions"] = {TLS_EXTENSION: tls}
        elif TLS_EXTENSION not in extensions:
            extensions[TLS_EXTENSION] = tls
        await app(scope, receive, send)

    return app_with_tls


class TLSExtensionMixin(asyncio.Protocol):
    """Adds the ASGI TLS extension to every scope of a TLS connection; list it before a uvicorn protocol class.

    The protocol must keep its ASGI app in ``self.app`` (uvicorn's do) and its ``Config`` in ``self.config``.
    """

    app: Any
    config: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _no_delay(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # plain text: no extension (the specification forbids it)
            tls = tls_extension(ssl_object, _server_cert(getattr(self, "config", None)))
            self.app = with_tls_extension(self.app, tls)


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off on the connection's TCP socket.

    uvicorn writes a response's head and its body in separate writes; with Nagle on (the accepted sockets of
    this Python's asyncio servers have ``TCP_NODELAY`` unset), the body waits for the client to acknowledge the
    head, which a client delays by up to 40 ms on Linux: every keep-alive request would take 40 ms.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):  # the peer may already be gone; nothing to speed up then
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class H11Protocol(TLSExtensionMixin, _H11Protocol):
    """uvicorn's h11 protocol, with the ASGI TLS extension (``--http meshlib.server.uvicorn:H11Protocol``)."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _HttpToolsProtocol
except ImportError:  # httptools not installed
    pass
else:

    class HttpToolsProtocol(TLSExtensionMixin, _HttpToolsProtocol):
        """uvicorn's httptools protocol, with the ASGI TLS extension
        (``--http meshlib.server.uvicorn:HttpToolsProtocol``)."""

    __all__ += ["HttpToolsProtocol"]

try:
    from uvicorn.protocols.websockets.wsproto_impl import WSProtocol as _WSProtocol
except ImportError:  # wsproto not installed
    pass
else:

    class WSProtocol(TLSExtensionMixin, _WSProtocol):
        """uvicorn's wsproto WebSocket protocol, with the ASGI TLS extension
        (``--ws meshlib.server.uvicorn:WSProtocol``)."""

    __all__ += ["WSProtocol"]

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _WebSocketsSansIOProtocol,
    )
except ImportError:  # websockets not installed
    pass
else:

    class WebSocketsSansIOProtocol(TLSExtensionMixin, _WebSocketsSansIOProtocol):
        """uvicorn's ``websockets-sansio`` protocol, with the ASGI TLS extension
        (``--ws meshlib.server.uvicorn:WebSocketsSansIOProtocol``)."""

    __all__ += ["WebSocketsSansIOProtocol"]
