"""Load balancers, keyed by name as grpc-go keys its ``balancer.Builder`` registry.

``p2c_ewma`` is the default (Linkerd's and Finagle's): power of two choices over peak-EWMA latency.
The others are ``least_request`` (Envoy's default policy: P2C on in-flight requests), ``round_robin``,
``random`` and ``ring_hash`` (consistent hashing on a request key). Each balancer builds an immutable
:class:`~meshlib.balance.base.Picker` per endpoint set; see :mod:`meshlib.balance.base`.
"""

from __future__ import annotations

import random
import time

from meshlib.balance.base import Balancer, BalancerOptions, Clock, EndpointStats, Picker
from meshlib.balance.least_request import LeastRequest
from meshlib.balance.p2c import P2CPeakEwma
from meshlib.balance.random import WeightedRandom
from meshlib.balance.ring_hash import RingHash
from meshlib.balance.round_robin import RoundRobin

__all__ = [
    "BALANCERS",
    "Balancer",
    "BalancerOptions",
    "EndpointStats",
    "LeastRequest",
    "P2CPeakEwma",
    "Picker",
    "RingHash",
    "RoundRobin",
    "WeightedRandom",
    "make_balancer",
]

#: Every balancer by its configuration name (``MESHLIB_LB``); the first is the default.
BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (P2CPeakEwma, RoundRobin, LeastRequest, WeightedRandom, RingHash)
}


def make_balancer(
    name: str,
    options: BalancerOptions | None = None,
    *,
    clock: Clock = time.monotonic,
    rng: random.Random | None = None,
) -> Balancer:
    """The balancer registered as ``name``, with injected ``clock`` and ``rng`` (for deterministic tests).

    Raises :class:`KeyError` naming the known balancers when ``name`` is not one of them.
    """
    try:
        cls = BALANCERS[name]
    except KeyError:
        raise KeyError(f"unknown balancer {name!r}; known: {', '.join(BALANCERS)}") from None
    return cls(options, clock=clock, rng=rng)
