"""``MESHLIB_INNER_TRANSPORT=aiohttp``: one ``httpx_aiohttp.AiohttpTransport`` per mesh endpoint.

Imported only when that option is chosen (the ``aiohttp`` extra installs ``httpx-aiohttp``). Each endpoint
transport owns its own ``aiohttp.ClientSession`` and ``TCPConnector`` (its connection pool), created on its
first request and closed with the transport, so an endpoint that leaves discovery has its connections closed
as with the default ``httpx.AsyncHTTPTransport``. What this adds to the upstream transport:

* the SSL context meshlib chose for the endpoint's service (the client's ``verify=``/``cert=``, or the
  service's :class:`~meshlib.security.tls.ReloadingContext`): asyncio's TLS calls ``wrap_bio``, which the
  reloading context forwards, so rotation, ``TLS_SERVER_NAME`` and SPIFFE checks apply unchanged. The TLS
  server name is the request's ``sni_hostname`` extension (aiohttp's ``server_hostname``), i.e. the logical
  service name, as with httpcore;
* httpx's request headers sent as they are: no cookie jar (aiohttp's would store ``Set-Cookie`` answers and
  replay them on later requests of other callers), no ``Accept``/``Accept-Encoding``/``User-Agent`` added
  back when the caller removed them;
* no retry of its own (aiohttp re-sends idempotent requests once after a disconnect): meshlib's retries,
  budget and attempt counts stay the only ones;
* exceptions mapped by what meshlib's retry rules need to know, whether the request may have been sent:
  upstream maps every ``aiohttp.ClientConnectionError`` (a server that closed the connection after reading the
  request included) to ``httpx.ConnectTimeout``, which reads as "never sent" and would let a POST be re-sent.
  Here only connect failures and connect/pool timeouts are "never sent".
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

#: Headers aiohttp adds when a request lacks them: httpx already decided these (and the caller may have
#: removed them on purpose), so aiohttp must not add them back.
_NOT_ADDED = ("Accept", "Accept-Encoding", "User-Agent")


def _translated(error: BaseException) -> httpx.TransportError | None:
    """The httpx exception for an aiohttp one, or ``None`` when it is not a transport error."""
    message = str(error) or type(error).__name__
    exc_type: type[httpx.TransportError]
    if isinstance(error, aiohttp.ConnectionTimeoutError):  # socket connect, or waiting for a pooled connection
        exc_type = httpx.ConnectTimeout
    elif isinstance(error, aiohttp.ServerTimeoutError):  # SocketTimeoutError: the response did not come in time
        exc_type = httpx.ReadTimeout
    elif isinstance(error, aiohttp.ClientConnectorError):  # refused, unreachable, DNS, TLS handshake/verification
        exc_type = httpx.ConnectError
    elif isinstance(error, (aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError)):
        # Closed after (part of) the request was written, or a malformed response: it may have been processed.
        exc_type = httpx.RemoteProtocolError
    elif isinstance(error, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        exc_type = httpx.ReadError
    elif isinstance(error, aiohttp.ClientError):
        exc_type = httpx.TransportError
    else:
        return None
    return exc_type(message)


def _remap(error: BaseException) -> httpx.TransportError | None:
    """What to raise instead of ``error`` (an upstream-mapped httpx exception or a raw aiohttp one), if anything."""
    source = error.__cause__ if isinstance(error, httpx.TransportError) else error
    if source is None:
        return None
    return _translated(source)


class _ResponseStream(httpx.AsyncByteStream):
    """The upstream response stream, with errors while reading the body mapped as above."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except (httpx.TransportError, aiohttp.ClientError) as error:
            mapped = _remap(error)
            if mapped is None:
                raise
            raise mapped from (error.__cause__ if isinstance(error, httpx.TransportError) else error)

    async def aclose(self) -> None:
        await self._inner.aclose()


class EndpointAiohttpTransport(AiohttpTransport):
    """One mesh endpoint's aiohttp pool: ``context`` for TLS, ``limits.max_connections`` connections at most.

    ``limits.keepalive_expiry`` becomes aiohttp's keep-alive timeout; ``max_keepalive_connections`` has no
    aiohttp equivalent. HTTP/1.1 only.
    """

    def __init__(self, context: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(verify=context, limits=limits, client=self._new_session)
        self._context = context

    def _new_session(self) -> aiohttp.ClientSession:
        limit = self.limits.max_connections
        connector = aiohttp.TCPConnector(
            ssl=self._context,
            limit=0 if limit is None else limit,  # aiohttp: 0 is no limit
            keepalive_timeout=self.limits.keepalive_expiry,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_NOT_ADDED,
            trust_env=False,  # mesh traffic goes to the endpoint itself, never through HTTP(S)_PROXY
        )
        # aiohttp re-sends an idempotent request once, on a new connection, when the server closed or reset
        # the connection: a second attempt meshlib would not see (no retry budget, no attempt count, the same
        # endpoint), doubling the load on a failing endpoint. meshlib's retries decide. There is no public switch;
        # aiohttp's own test client turns it off the same way.
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False
        return session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through this endpoint's session (SNI from the ``sni_hostname`` extension)."""
        try:
            response = await super().handle_async_request(request)
        except (httpx.TransportError, aiohttp.ClientError) as error:
            mapped = _remap(error)
            if mapped is None:
                raise
            mapped.request = request
            raise mapped from (error.__cause__ if isinstance(error, httpx.TransportError) else error)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ResponseStream(response.stream)
        return response
