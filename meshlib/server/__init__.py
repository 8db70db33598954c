"""Inbound (server-side) helpers: ASGI and WSGI middleware that turn request headers into meshlib context.

The deadline (a request carrying ``grpc-timeout``, or Envoy's/Finagle's deadline headers, is handled inside a
deadline scope, so the mesh calls its handler makes get at most the caller's remaining budget), and with
:class:`MeshMiddleware` / :class:`WSGIMeshMiddleware` the rest of the inbound half: trace context and a
SERVER span, server metrics, the peer's SPIFFE ID, authorization by Istio ``AuthorizationPolicy``
(:class:`AuthorizationHook`) and rate limits per caller (:class:`RateLimitHook`); and, opt-in, this server's
load in ORCA's ``endpoint-load-metrics`` header (:class:`LoadReporter`, :mod:`meshlib.server.orca`). See
:mod:`meshlib.server.middleware`.
"""

from __future__ import annotations

from meshlib.server.authz import AuthorizationHook
from meshlib.server.middleware import (
    DEADLINE_ATTRIBUTE,
    PEER_IDENTITY_ATTRIBUTE,
    PEER_IDENTITY_KEY,
    ASGIInboundMiddleware,
    DeadlineHook,
    DeadlineMiddleware,
    Hook,
    InboundRequest,
    MeshMiddleware,
    PeerIdentityHook,
    Refusal,
    WSGIDeadlineMiddleware,
    WSGIInboundMiddleware,
    WSGIMeshMiddleware,
    mesh_hooks,
    peer_identity,
)
from meshlib.server.orca import ASGILoadReportMiddleware, LoadReporter, WSGILoadReportMiddleware
from meshlib.server.ratelimit import RateLimitHook
from meshlib.telemetry.inbound import ServerMetricsHook, ServerTraceHook

__all__ = [
    "DEADLINE_ATTRIBUTE",
    "PEER_IDENTITY_ATTRIBUTE",
    "PEER_IDENTITY_KEY",
    "ASGIInboundMiddleware",
    "ASGILoadReportMiddleware",
    "AuthorizationHook",
    "DeadlineHook",
    "DeadlineMiddleware",
    "Hook",
    "InboundRequest",
    "LoadReporter",
    "MeshMiddleware",
    "PeerIdentityHook",
    "RateLimitHook",
    "Refusal",
    "ServerMetricsHook",
    "ServerTraceHook",
    "WSGIDeadlineMiddleware",
    "WSGIInboundMiddleware",
    "WSGILoadReportMiddleware",
    "WSGIMeshMiddleware",
    "mesh_hooks",
    "peer_identity",
]
