"""``consul://`` discovery: the healthy instances of a Consul service, from the local agent's health API,
watched with blocking queries. User documentation: ``docs/consul.md``.

One job per module, each importing only the ones above it:

* :mod:`~meshlib.discovery.consul.agent` -- talking to the agent: the ``CONSUL_*`` settings (address, TLS,
  token), the HTTP clients and their requests, ACL errors;
* :mod:`~meshlib.discovery.consul.health` -- ``/v1/health/service`` answers to endpoints (pure functions);
* :mod:`~meshlib.discovery.consul.query` -- the blocking-query rules (index, wait, pacing, backoff), no I/O;
* :mod:`~meshlib.discovery.consul.resolver` -- :class:`ConsulResolver`, which drives those rules over the
  agent's clients (sync and async), and :func:`from_target`, the ``consul://`` factory that
  :mod:`meshlib.discovery` registers.

There is no separate watch module: each resolve is one query, and the repeating is the generic refresh
loop's (:mod:`meshlib.discovery.refresh`). This package re-exports the names the rest of meshlib, the tests
and the documentation use from ``meshlib.discovery.consul``.
"""

from __future__ import annotations

from meshlib.discovery.consul.agent import DEFAULT_ADDR, ConsulAgent, Reply, Request
from meshlib.discovery.consul.health import aggregate_status, endpoints_from_health
from meshlib.discovery.consul.query import BlockingQuery, ConsulQuery, TokenBucket, WatchOptions
from meshlib.discovery.consul.resolver import FORM, ConsulResolver, Pause, from_target

__all__ = [
    "DEFAULT_ADDR",
    "FORM",
    "ConsulAgent",
    "ConsulQuery",
    "ConsulResolver",
    "BlockingQuery",
    "Pause",
    "Reply",
    "Request",
    "TokenBucket",
    "WatchOptions",
    "aggregate_status",
    "endpoints_from_health",
    "from_target",
]
