"""Local rate limits per caller: :class:`RateLimitHook` answers 429 with ``Retry-After`` before the application.

Linkerd's ``HTTPLocalRateLimitPolicy`` semantics (:mod:`meshlib.security.ratelimit`: a total limit, a limit per
client identity, overrides for named clients; GCRA). It runs after
:class:`~meshlib.server.middleware.PeerIdentityHook`, keyed by the caller's verified SPIFFE ID (callers without
one share one bucket). Limits come from ``MESHLIB_RATELIMIT_FILE`` (watched; a new version starts with full
buckets) or from code. meshlib clients honour ``Retry-After``: a refused mesh caller backs off and retries.
A refusal is written on the SERVER span (``meshlib.ratelimit``: the limit that refused) and counted in
``meshlib.server.rate_limited`` (attribute ``meshlib.ratelimit``: ``total``, ``identity`` or ``override``; the
caller's identity is not an attribute, so the series stay bounded).
"""

from __future__ import annotations

from typing import Any

from meshlib.control.file import FileVersion
from meshlib.security.ratelimit import RateLimiter, RateLimits, parse_rate_limits
from meshlib.server._watched import WatchedFileHook
from meshlib.server.middleware import InboundRequest, Refusal, peer_identity
from meshlib.telemetry.inbound import ServerSinks, annotate_server_span

__all__ = ["RATELIMIT_FILE_VARIABLE", "RateLimitHook"]

#: Where the rate limits file is named.
RATELIMIT_FILE_VARIABLE = "MESHLIB_RATELIMIT_FILE"


def _parse(data: bytes, source: str) -> RateLimits:
    return parse_rate_limits(data, source=source)


def _publish(hook: RateLimitHook, limits: RateLimits, version: FileVersion) -> None:
    hook.limiter = RateLimiter(limits, max_identities=hook.max_identities)


class RateLimitHook(WatchedFileHook[RateLimits]):
    """Refuses callers over their limit with 429 and ``Retry-After``; list it after the peer identity hook.

    ``limits``: :class:`~meshlib.security.ratelimit.RateLimits` given in code; ``file``: a limits file loaded now
    (an invalid one is a :class:`~meshlib.ConfigError` here) and watched every ``reload_interval`` seconds.
    ``max_identities`` bounds the callers tracked at once; ``meter_provider``: where the refusal counter goes
    (default: the global provider).
    """

    def __init__(
        self,
        limits: RateLimits | None = None,
        *,
        file: str | None = None,
        reload_interval: float = 1.0,
        max_identities: int = 10_000,
        meter_provider: Any = None,
    ) -> None:
        if (limits is None) == (file is None):
            raise TypeError("RateLimitHook takes limits= or file=, one of them")
        self._sinks = ServerSinks(meter_provider)
        self.max_identities = max_identities
        if file is not None:
            limits = self._watch(
                file, _parse, _publish, variable=RATELIMIT_FILE_VARIABLE, interval=reload_interval, what="rate limits"
            )
        assert limits is not None
        #: The limiter in force; replaced whole (one assignment) when the file changes.
        self.limiter = RateLimiter(limits, max_identities=max_identities)

    def __call__(self, request: InboundRequest) -> Any:
        peer = peer_identity()
        verdict = self.limiter.check(None if peer is None else str(peer))
        if not verdict.allowed:
            limit = verdict.limit or "total"
            annotate_server_span("meshlib.ratelimit", limit)
            for sink in self._sinks.current():
                sink.rate_limited.add(1, {"meshlib.ratelimit": limit})
            raise Refusal(429, f"rate limited ({verdict.limit} limit)", [("retry-after", verdict.retry_after)])
        return None
