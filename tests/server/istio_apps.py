"""The apps of ``tests/server/test_istio_examples.py``: one handler, as ASGI and as WSGI, behind
``PeerIdentityHook`` and ``AuthorizationHook``, that records every call it handles.

:class:`Protected` is built in the test process for uvicorn (the test sets its policies and reads its calls
directly). gunicorn imports :data:`wsgi_app` in its worker process, so that app also answers two control paths
*outside* the middleware (test-only): ``POST /__control/policies`` replaces the policies with the YAML body and
clears the calls; ``GET /__control/calls`` returns the calls as JSON.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

from meshlib.security.authz import Decision, parse_policies
from meshlib.server.authz import AuthorizationHook
from meshlib.server.middleware import (
    ASGIInboundMiddleware,
    InboundRequest,
    PeerIdentityHook,
    WSGIInboundMiddleware,
    peer_identity,
)

CONTROL_POLICIES = "/__control/policies"
CONTROL_CALLS = "/__control/calls"


class RecordingAuthz(AuthorizationHook):
    """The real hook, noting the reason of each denial (the 403 body is Envoy's ``RBAC: access denied`` whichever
    policy decided, so the test reads the deciding policy here)."""

    def __init__(self, owner: Protected) -> None:
        super().__init__(policies=parse_policies("", source="no policy"))
        self.owner = owner

    def decide(self, request: InboundRequest) -> Decision:
        decision = super().decide(request)
        if not decision.allowed:
            with self.owner._lock:
                self.owner.calls.append(f"refused: {decision.reason}")
        return decision


class Protected:
    """The handler behind the hooks; ``calls`` lists ``"METHOD PATH PEER"`` for each request it handled and
    ``"refused: REASON"`` for each the authorization hook denied."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self.authz = RecordingAuthz(self)
        hooks = (PeerIdentityHook(), self.authz)
        self.asgi = ASGIInboundMiddleware(self._asgi, hooks=hooks)
        self.wsgi = WSGIInboundMiddleware(self._wsgi, hooks=hooks)

    def set_policies(self, text: str) -> None:
        """Replace the policies (whole, as a file reload does) and forget the calls."""
        self.authz.policies = parse_policies(text, source="test policies")
        with self._lock:
            self.calls.clear()

    def _record(self, method: str, path: str) -> bytes:
        peer = peer_identity()
        with self._lock:
            self.calls.append(f"{method} {path} {peer}")
        return f"ran {peer}\n".encode()

    async def _asgi(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = self._record(scope["method"], scope["path"])
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = self._record(environ["REQUEST_METHOD"], environ["PATH_INFO"])
        start_response("200 OK", [("content-type", "text/plain"), ("content-length", str(len(body)))])
        return [body]


served = Protected()


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """:attr:`served` ``.wsgi``, with the control paths in front of it (for gunicorn, in another process)."""
    path = environ["PATH_INFO"]
    if path == CONTROL_POLICIES and environ["REQUEST_METHOD"] == "POST":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        served.set_policies(environ["wsgi.input"].read(size).decode())
        start_response("204 No Content", [])
        return []
    if path == CONTROL_CALLS:
        with served._lock:
            body = json.dumps(served.calls).encode()
        start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
        return [body]
    return served.wsgi(environ, start_response)
