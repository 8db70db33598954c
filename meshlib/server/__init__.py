"""Inbound (server-side) helpers: ASGI and WSGI middleware that turn request headers into meshlib context.

Today that is the deadline: a request carrying ``grpc-timeout`` (or Envoy's/Finagle's deadline headers) is
handled inside a deadline scope, so the mesh calls its handler makes get at most the caller's remaining
budget. See :mod:`meshlib.server.middleware`.
"""

from __future__ import annotations

from meshlib.server.middleware import (
    ASGIInboundMiddleware,
    DeadlineHook,
    DeadlineMiddleware,
    Hook,
    InboundRequest,
    WSGIDeadlineMiddleware,
    WSGIInboundMiddleware,
)

__all__ = [
    "ASGIInboundMiddleware",
    "DeadlineHook",
    "DeadlineMiddleware",
    "Hook",
    "InboundRequest",
    "WSGIDeadlineMiddleware",
    "WSGIInboundMiddleware",
]
