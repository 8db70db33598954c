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
a thread pool that copies the context, so they inherit the deadline too.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any, Protocol

from meshlib.deadline import INBOUND_HEADERS, budget_from_headers, deadline_scope

__all__ = [
    "ASGIApp",
    "ASGIInboundMiddleware",
    "DeadlineHook",
    "DeadlineMiddleware",
    "Hook",
    "InboundRequest",
    "WSGIApp",
    "WSGIDeadlineMiddleware",
    "WSGIInboundMiddleware",
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

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (any case), or ``None``."""
        ...


Hook = Callable[[InboundRequest], "AbstractContextManager[object] | None"]


class _ASGIRequest:
    __slots__ = ("_headers", "scope")

    def __init__(self, scope: ASGIScope) -> None:
        self.scope = scope
        self._headers: dict[str, str] | None = None

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
    __slots__ = ("environ",)

    def __init__(self, environ: Mapping[str, Any]) -> None:
        self.environ = environ

    @property
    def method(self) -> str:
        return str(self.environ.get("REQUEST_METHOD", "GET"))

    @property
    def path(self) -> str:
        return str(self.environ.get("PATH_INFO", ""))

    def header(self, name: str) -> str | None:
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)


class DeadlineHook:
    """Opens a deadline scope of the smallest budget the request's deadline headers carry.

    ``headers`` restricts which headers are trusted (default: every one :mod:`meshlib.deadline` decodes,
    ``grpc-timeout`` first). A request without any usable header gets no scope: its outgoing calls use
    their own policy timeouts. A budget can only shorten outgoing calls, never lengthen them, so an
    untrusted client can at worst shorten its own request.
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
        return None if budget is None else deadline_scope(budget)


def _enter(stack: ExitStack, hooks: Sequence[Hook], request: InboundRequest) -> bool:
    entered = False
    for hook in hooks:
        manager = hook(request)
        if manager is not None:
            stack.enter_context(manager)
            entered = True
    return entered


class ASGIInboundMiddleware:
    """Runs ``hooks`` around every ``http`` and ``websocket`` request of an ASGI app (lifespan untouched)."""

    def __init__(self, app: ASGIApp, hooks: Sequence[Hook] = ()) -> None:
        self.app = app
        self.hooks = tuple(hooks)

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] not in ("http", "websocket") or not self.hooks:
            await self.app(scope, receive, send)
            return
        with ExitStack() as stack:  # same task throughout: the scope set here is the handler's context
            _enter(stack, self.hooks, _ASGIRequest(scope))
            await self.app(scope, receive, send)


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

    def __call__(self, environ: dict[str, Any], start_response: WSGIStartResponse) -> Iterable[bytes]:
        if not self.hooks:
            return self.app(environ, start_response)
        context = contextvars.copy_context()
        stack = ExitStack()
        try:
            entered = context.run(_enter, stack, self.hooks, _WSGIRequest(environ))
            body = context.run(self.app, environ, start_response)
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
