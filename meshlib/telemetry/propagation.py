"""``MESHLIB_PROPAGATE_TO``: the few hosts outside the mesh that may receive the mesh's headers.

Requests to hosts that are not mesh services go through httpx exactly as plain httpx would send them, and by
default carry **none** of the mesh's headers: no ``traceparent``/``tracestate`` (they reveal trace ids to a
third party), no ``baggage`` (it may carry user ids, tenant names or feature flags meant for the mesh's own
services), no ``grpc-timeout`` (meaningless to most servers). That is the right default for calls to a
payment provider or a cloud API.

Some outside hosts are part of the same system all the same -- a legacy service behind a load balancer, an
internal gateway -- and their traces should join. ``MESHLIB_PROPAGATE_TO=gateway.corp.example,.internal``
lists them (a leading dot matches the domain and every subdomain); requests to those hosts get the trace
context and baggage of the code that sends them, and its deadline as ``grpc-timeout``. The wrapper is built
once per inner transport; hosts not listed never see it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from meshlib._http import copy_request
from meshlib.deadline import DEADLINE_HEADER, encode_timeout
from meshlib.policy import current_deadline
from meshlib.telemetry.tracing import inject

__all__ = ["AsyncPropagatingTransport", "PropagatingTransport", "PropagationRule", "stamp"]


class PropagationRule:
    """Which outside hosts get mesh headers: exact names/addresses, and ``.domain`` suffixes."""

    __slots__ = ("_exact", "_suffixes")

    def __init__(self, hosts: Iterable[str]) -> None:
        exact: set[str] = set()
        suffixes: list[str] = []
        for name in hosts:
            host = name.lower()
            if host.startswith("."):
                suffixes.append(host)
                exact.add(host[1:])
            else:
                exact.add(host)
        self._exact = frozenset(exact)
        self._suffixes = tuple(suffixes)

    def __bool__(self) -> bool:
        return bool(self._exact)

    def matches(self, host: str) -> bool:
        """Whether requests to ``host`` may carry mesh headers."""
        host = host.lower().rstrip(".")
        return host in self._exact or (bool(self._suffixes) and host.endswith(self._suffixes))


def stamp(headers: Any) -> None:
    """Write the current trace context, baggage and deadline into ``headers`` (replacing any present)."""
    inject(headers, None)
    deadline = current_deadline()
    if deadline is not None:
        headers[DEADLINE_HEADER] = encode_timeout(deadline - time.monotonic())


def stamped(request: Any) -> Any:
    """A shallow copy of ``request`` with its own headers, stamped; the caller's request is left as it was.

    Stamping the caller's request in place would let its headers travel on: the client builds a redirect from
    that same request, so a listed host's ``302`` would carry the trace context and deadline to any host.
    """
    copy = copy_request(request)
    stamp(copy.headers)
    return copy


class PropagatingTransport:
    """Stamps mesh headers on each request, then sends it with ``inner`` (which it does not own).

    Duck-typed as a transport of whichever library ``inner`` belongs to (httpx or httpx2).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def handle_request(self, request: Any) -> Any:
        return self.inner.handle_request(stamped(request))


class AsyncPropagatingTransport:
    """Async twin of :class:`PropagatingTransport`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def handle_async_request(self, request: Any) -> Any:
        return await self.inner.handle_async_request(stamped(request))
