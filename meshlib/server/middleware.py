"""Inbound middleware: the server half of the mesh, one wrapper per protocol (ASGI, WSGI).

The mesh's client side stamps outgoing calls (deadline today; trace context and identity later). The server
side reads those headers when a request arrives and sets up the context its handler runs in, so the calls
the handler makes inherit them: a service in the middle of a chain spends only what its caller has left.

Each wrapper runs a list of *hooks* around the application. A hook is a callable taking the
:class:`InboundRequest` and returning a context manager to hold open while the request is handled (or
``None`` to do nothing). Context managers see exceptions on exit, which is what later tracing and metrics
hooks need; the wrappers stay the same::

    app = ASGIInboundMiddleware(app, hooks=[DeadlineHook()])     # == DeadlineMiddleware(app)
    wsgi_app = WSGIInboundMiddleware(wsgi_app, hooks=[DeadlineHook()])

Hooks are entered in order and exited in reverse, around the whole request: for ASGI the app call, for WSGI
the app call *and* the iteration of its response body (a streaming body that makes mesh calls still sees
the scope). Starlette: ``Starlette(middleware=[Middleware(DeadlineMiddleware)])``; sync endpoints run in
a thread pool that copies the context, so they inherit the deadline too. On exit a hook can read the
response status (``request.status``), captured from ``http.response.start`` / ``start_response``.

:class:`MeshMiddleware` / :class:`WSGIMeshMiddleware` run the whole inbound half, outermost first: the
SERVER span and trace context (:class:`~meshlib.telemetry.inbound.ServerTraceHook`), server metrics
(:class:`~meshlib.telemetry.inbound.ServerMetricsHook`), the peer's SPIFFE ID (:class:`PeerIdentityHook`)
and the deadline (:class:`DeadlineHook`).

**Peer identity** needs the client's certificate, which only some servers hand to the app: ASGI servers that
implement the ASGI TLS extension put the chain in ``scope["extensions"]["tls"]["client_cert_chain"]``
(uvicorn does not by itself: run it with :mod:`meshlib.server.uvicorn`'s protocol classes, which add it; the
stdlib's wsgiref does not either); Apache ``mod_ssl`` + ``mod_wsgi``
export ``SSL_CLIENT_CERT`` (``SSLOptions +ExportCertData``); gunicorn passes its TLS socket as
``environ["gunicorn.socket"]``. Those are read by default. Anything else (a server that terminates TLS
another way, a proxy that forwards a verified identity) is supplied by the application:
``PeerIdentityHook(resolve=lambda request: ...)``.
"""

from __future__ import annotations

import contextvars
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from meshlib import pushback
from meshlib._config.env import inbound_files_from_env, server_telemetry_from_env
from meshlib.deadline import INBOUND_HEADERS, budget_from_headers, deadline_scope
from meshlib.security.identity import SpiffeId, presented_identity
from meshlib.telemetry.inbound import ServerMetricsHook, ServerTraceHook, annotate_server_span

if TYPE_CHECKING:
    from meshlib.security.authz import PolicySet
    from meshlib.security.ratelimit import RateLimits
    from meshlib.server.authz import AuthorizationHook
    from meshlib.server.orca import LoadReporter
    from meshlib.server.ratelimit import RateLimitHook

logger = logging.getLogger("meshlib.server")

__all__ = [
    "DEADLINE_ATTRIBUTE",
    "PEER_IDENTITY_ATTRIBUTE",
    "ASGIApp",
    "ASGIInboundMiddleware",
    "DeadlineHook",
    "DeadlineMiddleware",
    "Refusal",
    "Hook",
    "InboundRequest",
    "MeshMiddleware",
    "PeerIdentityHook",
    "WSGIApp",
    "WSGIDeadlineMiddleware",
    "WSGIInboundMiddleware",
    "WSGIMeshMiddleware",
    "mesh_hooks",
    "peer_identity",
    "tracing_underneath",
]

ASGIScope = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, ASGIReceive, ASGISend], Awaitable[None]]
WSGIStartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], WSGIStartResponse], Iterable[bytes]]


class InboundRequest(Protocol):
    """What a hook may read of an inbound request, whatever the protocol."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def scheme(self) -> str:
        """``http`` or ``https``."""
        ...

    @property
    def status(self) -> int | None:
        """The response status once the app has started its response (read it on exit), else ``None``."""
        ...

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or ``None``."""
        ...

    def header_names(self) -> list[str]:
        """Every request header name, lower-cased."""
        ...

    def header_pairs(self) -> Iterable[tuple[str | bytes, str | bytes]]:
        """Every request header as received, repeated names included (ASGI: raw bytes pairs; WSGI: the
        server's ``HTTP_*`` variables, which already join repeated headers)."""
        ...

    def peer_address(self) -> tuple[str, int] | None:
        """The client's (IP, port) as the server saw it, when known."""
        ...

    def server_port(self) -> int | None:
        """The local port the request arrived on, when the server reports it."""
        ...

    def peer_certificate(self) -> bytes | None:
        """The client's TLS certificate (DER) when the server exposes it (see the module docstring)."""
        ...

    def annotate(self, key: str, value: object) -> None:
        """Store ``value`` where the app can read it: the ASGI ``scope`` or the WSGI ``environ``."""
        ...


Hook = Callable[[InboundRequest], "AbstractContextManager[object] | None"]


class _ASGIRequest:
    __slots__ = ("_headers", "scope", "status")

    def __init__(self, scope: ASGIScope) -> None:
        self.scope = scope
        self._headers: dict[str, str] | None = None
        self.status: int | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.scope.get("scheme") in ("https", "wss") else "http"

    def header_names(self) -> list[str]:
        self.header("")
        return list(self._headers or ())

    def header_pairs(self) -> Iterable[tuple[str | bytes, str | bytes]]:
        return self.scope.get("headers", ())  # type: ignore[no-any-return]

    def peer_address(self) -> tuple[str, int] | None:
        client = self.scope.get("client")
        return (str(client[0]), int(client[1])) if client else None

    def server_port(self) -> int | None:
        server = self.scope.get("server")
        return int(server[1]) if server and server[1] is not None else None

    def peer_certificate(self) -> bytes | None:
        tls = (self.scope.get("extensions") or {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or ()
        return _der(chain[0]) if chain else None

    def annotate(self, key: str, value: object) -> None:
        self.scope[key] = value

    @property
    def method(self) -> str:
        return str(self.scope.get("method", "GET"))

    @property
    def path(self) -> str:
        return str(self.scope.get("path", ""))

    def header(self, name: str) -> str | None:
        if self._headers is None:  # decoded once per request, on first use; the first of repeated names wins
            headers: dict[str, str] = {}
            for raw_name, raw_value in self.scope.get("headers", ()):
                headers.setdefault(bytes(raw_name).decode("latin-1").lower(), bytes(raw_value).decode("latin-1"))
            self._headers = headers
        return self._headers.get(name.lower())


class _WSGIRequest:
    __slots__ = ("environ", "status")

    def __init__(self, environ: MutableMapping[str, Any]) -> None:
        self.environ = environ
        self.status: int | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.environ.get("wsgi.url_scheme") == "https" else "http"

    def header_names(self) -> list[str]:
        return [str(name) for name, _ in self.header_pairs()]

    def header_pairs(self) -> Iterable[tuple[str | bytes, str | bytes]]:
        for key, value in self.environ.items():
            if key.startswith("HTTP_"):
                yield key[5:].lower().replace("_", "-"), str(value)
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                yield key.lower().replace("_", "-"), str(value)

    def server_port(self) -> int | None:
        try:
            return int(self.environ.get("SERVER_PORT") or "")
        except ValueError:
            return None

    def peer_address(self) -> tuple[str, int] | None:
        address, port = self.environ.get("REMOTE_ADDR"), self.environ.get("REMOTE_PORT")
        if not address:
            return None
        try:
            return str(address), int(port or 0)
        except ValueError:
            return str(address), 0

    def peer_certificate(self) -> bytes | None:
        pem = self.environ.get("SSL_CLIENT_CERT")  # Apache mod_ssl with SSLOptions +ExportCertData
        if pem:
            return _der(str(pem))
        sock = self.environ.get("gunicorn.socket")
        getpeercert = getattr(sock, "getpeercert", None)
        if getpeercert is not None:
            try:
                der: bytes | None = getpeercert(binary_form=True)
            except (OSError, ValueError):
                return None
            return der
        return None

    def annotate(self, key: str, value: object) -> None:
        self.environ[key] = value

    def _start_response(
        self, start_response: WSGIStartResponse, state: pushback.InboundState | None = None
    ) -> WSGIStartResponse:
        """``start_response`` that notes the status for the hooks and adds the retry pushback header."""

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            try:
                self.status = int(status.split(" ", 1)[0])
            except ValueError:
                self.status = None
            if state is not None and self.status is not None and pushback.should_mark(state, self.status):
                headers = [*headers, (pushback.NO_RETRY_HEADER, "1")]  # downstream already retried
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return capture

    @property
    def method(self) -> str:
        return str(self.environ.get("REQUEST_METHOD", "GET"))

    @property
    def path(self) -> str:
        return str(self.environ.get("PATH_INFO", ""))

    def header(self, name: str) -> str | None:
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)


def _der(pem: str) -> bytes | None:
    """DER bytes of a PEM certificate, ``None`` if it is not one."""
    try:
        return ssl.PEM_cert_to_DER_cert(pem.strip())
    except ValueError:
        return None


#: SERVER span attributes the hooks add (to meshlib's span, or to the framework's when it traces the request).
DEADLINE_ATTRIBUTE = "meshlib.deadline.budget"
PEER_IDENTITY_ATTRIBUTE = "meshlib.peer.spiffe_id"


class DeadlineHook:
    """Opens a deadline scope of the smallest budget the request's deadline headers carry.

    ``headers`` restricts which headers are trusted (default: every one :mod:`meshlib.deadline` decodes,
    ``grpc-timeout`` first). A request without any usable header gets no scope: its outgoing calls use
    their own policy timeouts. A budget can only shorten outgoing calls, never lengthen them, so an
    untrusted client can at worst shorten its own request. The budget (seconds) is set as
    :data:`DEADLINE_ATTRIBUTE` on the request's SERVER span, when one is recording.
    """

    __slots__ = ("headers",)

    def __init__(self, headers: Iterable[str] | None = None) -> None:
        names = tuple(INBOUND_HEADERS) if headers is None else tuple(name.lower() for name in headers)
        unknown = [name for name in names if name not in INBOUND_HEADERS]
        if unknown:
            raise ValueError(f"no deadline decoder for {unknown}; known: {', '.join(INBOUND_HEADERS)}")
        self.headers = names

    def __call__(self, request: InboundRequest) -> AbstractContextManager[object] | None:
        found = ((name, request.header(name)) for name in self.headers)
        budget = budget_from_headers((name, value) for name, value in found if value is not None)
        if budget is None:
            return None
        annotate_server_span(DEADLINE_ATTRIBUTE, budget)
        return deadline_scope(budget)


def _enter(stack: ExitStack, hooks: Sequence[Hook], request: InboundRequest) -> bool:
    entered = False
    for hook in hooks:
        manager = hook(request)
        if manager is not None:
            stack.enter_context(manager)
            entered = True
    return entered


_NO_RETRY = (pushback.NO_RETRY_HEADER.encode(), b"1")


class Refusal(Exception):
    """Raised by a hook to answer the request itself, without calling the application (403, 429...).

    The hooks entered before the one that refuses (the SERVER span, server metrics, peer identity) stay
    entered and see the refusal's status on exit, so a refused request is traced and counted like any other.
    ``reason`` is the short ``text/plain`` body (no secrets, nothing the caller sent unescaped); ``headers``
    are added to the answer (``Retry-After`` for a 429). A websocket request is closed with code 1008 (policy
    violation) before it is accepted, which ASGI servers answer with a 403.
    """

    def __init__(self, status: int, reason: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)
        self._body = (reason + "\n").encode("utf-8", "replace")

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"

    def body(self) -> bytes:
        """The answer's body: the reason and a newline."""
        return self._body

    def header_list(self) -> list[tuple[str, str]]:
        """The answer's headers: ``text/plain`` and its length, then :attr:`headers`."""
        return [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(self._body))),
            *self.headers,
        ]

    def asgi_headers(self) -> list[tuple[bytes, bytes]]:
        """:meth:`header_list` as ASGI wants it (Latin-1 bytes)."""
        return [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(self._body)),
            *((name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers),
        ]


#: Reason phrases for a refusal's WSGI status line.
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


def _close_hooks(hooks: Sequence[Hook]) -> None:
    for hook in hooks:
        close = getattr(hook, "close", None)
        if callable(close):
            close()


async def _refuse_asgi(scope: ASGIScope, send: ASGISend, refusal: Refusal) -> None:
    """Answer an ASGI request with ``refusal`` (the app is never called)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": refusal.reason[:120]})
        return
    await send({"type": "http.response.start", "status": refusal.status, "headers": refusal.asgi_headers()})
    await send({"type": "http.response.body", "body": refusal.body()})


class ASGIInboundMiddleware:
    """Runs ``hooks`` around every ``http`` and ``websocket`` request of an ASGI app (lifespan untouched)."""

    def __init__(self, app: ASGIApp, hooks: Sequence[Hook] = ()) -> None:
        self.app = app
        self.hooks = tuple(hooks)

    def close(self) -> None:
        """Stop what the hooks run in the background (the policy files' watchers): calls each hook's ``close()``.

        Optional: the watchers are daemon threads that end when the middleware is collected; call it when an
        app is torn down before the process ends (tests, a reloaded app) so a removed file is not reported.
        """
        _close_hooks(self.hooks)

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] not in ("http", "websocket") or not self.hooks:
            await self.app(scope, receive, send)
            return
        request = _ASGIRequest(scope)
        state, token = pushback.begin_inbound()

        async def send_noting_status(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                request.status = status = int(message["status"])
                if pushback.should_mark(state, status):  # downstream already retried: callers must not
                    message = {**message, "headers": [*message.get("headers", ()), _NO_RETRY]}
            await send(message)

        try:
            with ExitStack() as stack:  # same task throughout: the scope set here is the handler's context
                try:
                    _enter(stack, self.hooks, request)
                except Refusal as refusal:  # a hook answers (403, 429): the app never runs
                    if scope["type"] == "websocket":
                        request.status = 403
                    await _refuse_asgi(scope, send_noting_status, refusal)
                    return
                await self.app(scope, receive, send_noting_status)
        finally:
            pushback.end_inbound(token)


class DeadlineMiddleware(ASGIInboundMiddleware):
    """ASGI middleware: outgoing mesh calls made while handling a request inherit its deadline header.

    ``DeadlineMiddleware(app)``, or ``Middleware(DeadlineMiddleware)`` in Starlette. ``headers`` as in
    :class:`DeadlineHook`; ``hooks`` are run after the deadline hook.
    """

    def __init__(self, app: ASGIApp, *, headers: Iterable[str] | None = None, hooks: Sequence[Hook] = ()) -> None:
        super().__init__(app, hooks=(DeadlineHook(headers), *hooks))


class _ScopedBody:
    """A WSGI response body iterated inside the request's context; the hooks exit when it is closed."""

    def __init__(self, body: Iterable[bytes], context: contextvars.Context, stack: ExitStack) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._context = context
        self._stack: ExitStack | None = stack

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._body)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        stack, self._stack = self._stack, None
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            if stack is not None:
                self._context.run(stack.close)


class WSGIInboundMiddleware:
    """Runs ``hooks`` around every request of a WSGI app, response body iteration included.

    The app runs in a copy of the server thread's context (so nothing leaks into the next request served
    by the same thread); its body is iterated in that same context, and the hooks exit when the server
    closes the body, as PEP 3333 requires servers to do.
    """

    def __init__(self, app: WSGIApp, hooks: Sequence[Hook] = ()) -> None:
        self.app = app
        self.hooks = tuple(hooks)

    def close(self) -> None:
        """Stop what the hooks run in the background (the policy files' watchers): calls each hook's ``close()``.

        Optional: the watchers are daemon threads that end when the middleware is collected; call it when an
        app is torn down before the process ends (tests, a reloaded app) so a removed file is not reported.
        """
        _close_hooks(self.hooks)

    def __call__(self, environ: dict[str, Any], start_response: WSGIStartResponse) -> Iterable[bytes]:
        if not self.hooks:
            return self.app(environ, start_response)
        context = contextvars.copy_context()
        stack = ExitStack()
        request = _WSGIRequest(environ)
        state, _ = context.run(pushback.begin_inbound)  # the copied context ends with the request
        try:
            try:
                entered = context.run(_enter, stack, self.hooks, request)
            except Refusal as refusal:  # a hook answers (403, 429): the app never runs
                phrase = _PHRASES.get(refusal.status, "")
                start = request._start_response(start_response, state)
                start(f"{refusal.status} {phrase}".rstrip(), refusal.header_list())
                return _ScopedBody([refusal.body()], context, stack)
            body = context.run(self.app, environ, request._start_response(start_response, state))
        except BaseException:
            context.run(stack.__exit__, *sys.exc_info())
            raise
        if not entered:
            return body
        return _ScopedBody(body, context, stack)


class WSGIDeadlineMiddleware(WSGIInboundMiddleware):
    """WSGI middleware: outgoing mesh calls made while handling a request inherit its deadline header.

    ``app.wsgi_app = WSGIDeadlineMiddleware(app.wsgi_app)`` (Flask) or wrap the Django/any WSGI callable.
    ``headers`` as in :class:`DeadlineHook`; ``hooks`` are run after the deadline hook.
    """

    def __init__(self, app: WSGIApp, *, headers: Iterable[str] | None = None, hooks: Sequence[Hook] = ()) -> None:
        super().__init__(app, hooks=(DeadlineHook(headers), *hooks))


#: Where :class:`PeerIdentityHook` puts the peer's :class:`~meshlib.security.identity.SpiffeId` for the app:
#: ``scope[PEER_IDENTITY_KEY]`` (Starlette: ``request.scope[...]``) or ``environ[PEER_IDENTITY_KEY]``.
PEER_IDENTITY_KEY = "meshlib.peer_identity"
_peer: contextvars.ContextVar[SpiffeId | None] = contextvars.ContextVar("meshlib.peer_identity", default=None)
_CACHE_SIZE = 256

PeerResolver = Callable[[InboundRequest], "SpiffeId | str | bytes | None"]


def peer_identity() -> SpiffeId | None:
    """The SPIFFE ID of the client of the inbound request being handled (mTLS), or ``None``."""
    return _peer.get()


class PeerIdentityHook:
    """Exposes the caller's SPIFFE ID to the app: :func:`peer_identity`, and ``scope``/``environ`` key
    :data:`PEER_IDENTITY_KEY`.

    By default the ID comes from the client certificate the server exposes (module docstring), parsed as an
    X.509-SVID (its one ``spiffe://`` URI SAN; see :mod:`meshlib.security.identity`); results are cached per
    certificate. ``resolve`` replaces that for servers that do not expose certificates: it gets the request
    and returns a :class:`~meshlib.security.identity.SpiffeId`, an ID string, DER certificate bytes, or
    ``None``. The ID is also set as :data:`PEER_IDENTITY_ATTRIBUTE` on the request's SERVER span. The hook
    only *reports* who called; it rejects nothing -- the TLS server's client-certificate
    verification authenticates the peer, and authorisation is the application's decision.
    """

    __slots__ = ("_cache", "_resolve")

    def __init__(self, resolve: PeerResolver | None = None) -> None:
        self._resolve = resolve
        self._cache: dict[bytes, SpiffeId | None] = {}

    def identify(self, request: InboundRequest) -> SpiffeId | None:
        """The peer's SPIFFE ID, or ``None`` when it is unknown or not a valid X.509-SVID."""
        found = self._resolve(request) if self._resolve is not None else request.peer_certificate()
        if found is None or isinstance(found, SpiffeId):
            return found
        if isinstance(found, str):
            try:
                return SpiffeId.parse(found)
            except ValueError as error:
                logger.debug("peer identity %r is not a SPIFFE ID: %.200s", found[:200], error)
                return None
        cached = self._cache.get(found, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        spiffe_id, presented = presented_identity(found)
        if spiffe_id is None:
            logger.debug("peer certificate is not an X.509-SVID: %s", presented)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[found] = spiffe_id
        return spiffe_id

    def __call__(self, request: InboundRequest) -> AbstractContextManager[object] | None:
        spiffe_id = self.identify(request)
        if spiffe_id is None:
            return None
        request.annotate(PEER_IDENTITY_KEY, spiffe_id)
        annotate_server_span(PEER_IDENTITY_ATTRIBUTE, str(spiffe_id))
        return _peer_scope(spiffe_id)


@contextmanager
def _peer_scope(spiffe_id: SpiffeId) -> Iterator[SpiffeId]:
    token = _peer.set(spiffe_id)
    try:
        yield spiffe_id
    finally:
        _peer.reset(token)


def mesh_hooks(
    *,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    peer_identity: PeerIdentityHook | None = None,
    deadline_headers: Iterable[str] | None = None,
    server_telemetry: str | None = None,
    authz: AuthorizationHook | PolicySet | None = None,
    rate_limits: RateLimitHook | RateLimits | None = None,
    environ: Mapping[str, str] | None = None,
    intentions: Hook | bool | None = None,
) -> tuple[Hook, ...]:
    """The inbound half's hooks, outermost first: server span, server metrics, peer identity, authorization, rate
    limits, deadline.

    ``authz``: Istio ``AuthorizationPolicy`` enforcement (:class:`~meshlib.server.authz.AuthorizationHook`, or a
    :class:`~meshlib.security.authz.PolicySet` to enforce); by default from ``MESHLIB_AUTHZ_FILE`` when set (loaded
    now: an invalid file is a :class:`~meshlib.ConfigError` naming it; then watched every
    ``MESHLIB_INBOUND_RELOAD_INTERVAL``), else none. ``rate_limits``: likewise
    (:class:`~meshlib.server.ratelimit.RateLimitHook` or :class:`~meshlib.security.ratelimit.RateLimits`,
    default ``MESHLIB_RATELIMIT_FILE``). Both run after the peer identity hook, which gives them the caller's
    verified SPIFFE ID, and inside the span and metrics hooks, so a refused request (403, 429) still has its
    SERVER span and duration; authorization runs first, so a denied caller spends no rate-limit budget.
    ``intentions``: Consul intentions enforcement (a :class:`~meshlib.server.consul_intentions.ConsulIntentionsHook`;
    ``True`` or ``None`` with ``MESHLIB_CONSUL_SERVICE`` set: one for that service, its agent from the ``CONSUL_*``
    variables; ``False``: none). It runs right after the peer identity hook, before ``authz`` and rate limits:
    a caller intentions deny never reaches them or the application. ``environ``: read instead of ``os.environ``.

    The span is outermost so the duration is recorded while it is current (an SDK with exemplars links the
    measurement to the trace) and so the span ends last: once it is exported, the request is fully accounted.
    ``server_telemetry``: ``auto``/``on``/``off``, default ``MESHLIB_SERVER_TELEMETRY`` (else ``auto``): whether
    meshlib makes the SERVER span and server metrics when the framework already does
    (:mod:`meshlib.telemetry.inbound`).
    """
    from meshlib.security.authz import PolicySet
    from meshlib.security.ratelimit import RateLimits
    from meshlib.server.authz import AuthorizationHook
    from meshlib.server.ratelimit import RateLimitHook

    mode = server_telemetry_from_env(server_telemetry, environ)
    files = inbound_files_from_env(environ)
    consul = _intentions(intentions, environ, meter_provider)
    gates = [
        hook
        for hook in (
            _gate(authz, PolicySet, AuthorizationHook, files.authz, files.reload_interval, meter_provider),
            _gate(rate_limits, RateLimits, RateLimitHook, files.rate_limits, files.reload_interval, meter_provider),
        )
        if hook is not None
    ]
    return (
        ServerTraceHook(tracer_provider, mode=mode),
        ServerMetricsHook(meter_provider, mode=mode),
        peer_identity or PeerIdentityHook(),
        *([consul] if consul is not None else []),
        *gates,
        DeadlineHook(deadline_headers),
    )


def _intentions(given: Hook | bool | None, environ: Mapping[str, str] | None, meter_provider: Any) -> Hook | None:
    """The Consul intentions hook of :func:`mesh_hooks`: as given, or built for ``MESHLIB_CONSUL_SERVICE``."""
    import os

    if given is False:
        return None
    if given is not None and given is not True:
        return given
    env = os.environ if environ is None else environ
    from meshlib.server.consul_intentions import SERVICE_VARIABLE, ConsulIntentionsHook

    if given is None and not env.get(SERVICE_VARIABLE, "").strip():
        return None
    return ConsulIntentionsHook(environ=env, meter_provider=meter_provider)


def _gate(  # noqa: PLR0917  # one call per gate kind, in mesh_hooks
    given: Any, rules: type, hook: Callable[..., Hook], file: str | None, interval: float, meter_provider: Any
) -> Hook | None:
    """The hook for one gate: as given, built from rules given in code, else from its file, else none."""
    if isinstance(given, rules):
        return hook(given, meter_provider=meter_provider)
    if given is None and file is not None:
        return hook(file=file, reload_interval=interval, meter_provider=meter_provider)
    return given  # type: ignore[no-any-return]


class MeshMiddleware(ASGIInboundMiddleware):
    """ASGI middleware for the whole inbound half: metrics, trace context and span, peer identity, deadline.

    ``Starlette(middleware=[Middleware(MeshMiddleware)])``, ``app.add_middleware(MeshMiddleware)`` (FastAPI)
    or ``MeshMiddleware(app, tracer_provider=...)``. ``tracer_provider`` / ``meter_provider`` default to the
    global providers; ``peer_identity`` replaces the default :class:`PeerIdentityHook` (say, one with a
    ``resolve`` function); ``server_telemetry``, ``authz`` and ``rate_limits`` as in :func:`mesh_hooks` (by default
    ``MESHLIB_AUTHZ_FILE`` and ``MESHLIB_RATELIMIT_FILE``: a denied caller gets 403, one over its limit 429, and
    the app never runs); ``hooks`` run innermost; ``environ`` is read instead of ``os.environ``;
    ``load_reporter`` (a :class:`~meshlib.server.orca.LoadReporter`) adds an ORCA ``endpoint-load-metrics`` header
    to every answer of the application, for clients balancing with ``weighted_round_robin`` (docs/locality.md).

    Add it *inside* the framework's tracing (FastAPI's native telemetry, Starlette's or the contrib
    ``OpenTelemetryMiddleware`` listed before it): the framework's SERVER span is then current when meshlib's
    hooks run, and meshlib adds to it instead of making a second. Wrapped around such an app from outside it
    cannot see that span coming; it logs a warning naming what it found underneath.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        peer_identity: PeerIdentityHook | None = None,
        deadline_headers: Iterable[str] | None = None,
        server_telemetry: str | None = None,
        authz: AuthorizationHook | PolicySet | None = None,
        rate_limits: RateLimitHook | RateLimits | None = None,
        hooks: Sequence[Hook] = (),
        environ: Mapping[str, str] | None = None,
        load_reporter: LoadReporter | None = None,
    ) -> None:
        base = mesh_hooks(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            peer_identity=peer_identity,
            deadline_headers=deadline_headers,
            server_telemetry=server_telemetry,
            authz=authz,
            rate_limits=rate_limits,
            environ=environ,
        )
        if load_reporter is not None:  # innermost: it counts and reports what the application answered
            from meshlib.server.orca import ASGILoadReportMiddleware

            app = ASGILoadReportMiddleware(app, load_reporter)
        super().__init__(app, hooks=(*base, *hooks))
        if server_telemetry_from_env(server_telemetry) != "on":
            tracing = tracing_underneath(app)
            if tracing is not None:
                logger.warning(
                    "MeshMiddleware wraps %s, which traces requests itself: each request gets two SERVER spans. "
                    "Add MeshMiddleware inside it instead (FastAPI: app.add_middleware(MeshMiddleware); "
                    "Starlette: list it after the OpenTelemetryMiddleware), so meshlib adds to its span",
                    tracing,
                )


def tracing_underneath(app: object) -> str | None:
    """The name of a framework tracer found in ``app``'s middleware chain (following ``.app``), else ``None``.

    Known: a FastAPI application with native tracing on (``telemetry={"tracing": False}`` turns it off),
    Starlette's ``OpenTelemetryMiddleware`` and the contrib ``opentelemetry.instrumentation.asgi`` one.
    """
    seen: set[int] = set()
    while app is not None and id(app) not in seen and len(seen) < 64:
        seen.add(id(app))
        kind = type(app)
        name = f"{kind.__module__}.{kind.__qualname__}"
        if kind.__name__ == "OpenTelemetryMiddleware" and kind.__module__ in (
            "starlette.middleware.opentelemetry",
            "opentelemetry.instrumentation.asgi",
        ):
            return name
        config = getattr(app, "_telemetry", None)
        if kind.__module__.startswith("fastapi") and isinstance(config, dict) and config.get("tracing", True):
            return name
        app = getattr(app, "app", None)
    return None


class WSGIMeshMiddleware(WSGIInboundMiddleware):
    """WSGI twin of :class:`MeshMiddleware`: ``app.wsgi_app = WSGIMeshMiddleware(app.wsgi_app)`` (Flask)."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        peer_identity: PeerIdentityHook | None = None,
        deadline_headers: Iterable[str] | None = None,
        server_telemetry: str | None = None,
        authz: AuthorizationHook | PolicySet | None = None,
        rate_limits: RateLimitHook | RateLimits | None = None,
        hooks: Sequence[Hook] = (),
        environ: Mapping[str, str] | None = None,
        load_reporter: LoadReporter | None = None,
    ) -> None:
        base = mesh_hooks(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            peer_identity=peer_identity,
            deadline_headers=deadline_headers,
            server_telemetry=server_telemetry,
            authz=authz,
            rate_limits=rate_limits,
            environ=environ,
        )
        if load_reporter is not None:  # innermost, as in MeshMiddleware
            from meshlib.server.orca import WSGILoadReportMiddleware

            app = WSGILoadReportMiddleware(app, load_reporter)
        super().__init__(app, hooks=(*base, *hooks))
