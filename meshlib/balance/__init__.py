"""Load balancers, keyed by name as grpc-go keys its ``balancer.Builder`` registry.

``p2c_ewma`` is the default (Linkerd's and Finagle's): power of two choices over peak-EWMA latency.
The others are ``least_request`` (Envoy's default policy: P2C on in-flight requests), ``round_robin``,
``random``, ``ring_hash`` (consistent hashing on a request key) and ``weighted_round_robin`` (gRFC A58: weights
from the servers' ORCA load reports). Each balancer builds an immutable
:class:`~meshlib.balance.base.Picker` per endpoint set; see :mod:`meshlib.balance.base`.

A balancer is registered by name with :func:`register_balancer`, as its class or the class's dotted path,
like discovery schemes (:func:`meshlib.discovery.register_scheme`). The built-ins are registered by path: a
balancer's module is imported when a service first uses it (or :data:`BALANCERS` is read for it), not by
``import meshlib``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from meshlib._lazy import check_dotted_path, load
from meshlib.balance.base import Balancer, BalancerOptions, Clock, EndpointStats, Picker

if TYPE_CHECKING:
    from meshlib.balance.least_request import LeastRequest
    from meshlib.balance.p2c import P2CPeakEwma
    from meshlib.balance.random import WeightedRandom
    from meshlib.balance.ring_hash import RingHash
    from meshlib.balance.round_robin import RoundRobin
    from meshlib.balance.wrr import WeightedRoundRobin

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
    "WeightedRoundRobin",
    "make_balancer",
    "register_balancer",
]

#: name -> the balancer class, or its dotted path (imported when the name is first looked up).
_REGISTERED: dict[str, type[Balancer] | str] = {}


def register_balancer(name: str, balancer: type[Balancer] | str, *, replace: bool = False) -> None:
    """Make ``name`` buildable by :func:`make_balancer`: ``balancer`` is a :class:`Balancer` subclass or its
    dotted path (``"mypackage.balancers.Maglev"``), imported when the name is first used.

    Registering a name twice is a programming error unless ``replace=True``. A malformed path raises
    :class:`ValueError`, a class that is not a :class:`Balancer` :class:`TypeError`. (``MESHLIB_LB`` accepts
    the names :data:`meshlib.config.LB_NAMES` lists.)
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"invalid balancer name {name!r}")
    if isinstance(balancer, str):
        check_dotted_path(balancer)
    elif not (isinstance(balancer, type) and issubclass(balancer, Balancer)):
        raise TypeError(f"balancer {name!r} must be a Balancer subclass or its dotted path, not {balancer!r}")
    if name in _REGISTERED and not replace:
        raise ValueError(f"balancer {name!r} is already registered")
    _REGISTERED[name] = balancer


def _balancer_class(name: str) -> type[Balancer]:
    """The class registered as ``name`` (:class:`KeyError` if none), importing it if registered by path."""
    entry = _REGISTERED[name]
    if not isinstance(entry, str):
        return entry
    try:
        cls = load(entry)
    except ImportError as error:
        raise ImportError(f"balancer {name!r} is registered as {entry!r}, which cannot be imported: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, Balancer)):
        raise TypeError(f"balancer {name!r} is registered as {entry!r}, which is not a Balancer subclass: {cls!r}")
    return cls


class _Balancers(Mapping[str, type[Balancer]]):
    """:data:`BALANCERS`: a live, read-only view of the registry that imports a class when it is looked up."""

    def __getitem__(self, name: str) -> type[Balancer]:
        return _balancer_class(name)

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTERED)

    def __len__(self) -> int:
        return len(_REGISTERED)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTERED  # without importing anything

    def __repr__(self) -> str:
        return f"BALANCERS({list(_REGISTERED)})"


#: Every balancer by its configuration name (``MESHLIB_LB``); the first is the default. Looking a name up
#: (``BALANCERS[name]``, ``.items()``) imports that balancer; ``name in BALANCERS`` and iterating names do not.
BALANCERS: Mapping[str, type[Balancer]] = _Balancers()


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
    if name not in _REGISTERED:
        raise KeyError(f"unknown balancer {name!r}; known: {', '.join(_REGISTERED)}")
    return _balancer_class(name)(options, clock=clock, rng=rng)


#: The classes of ``__all__``, imported on first access (``from meshlib.balance import RingHash``).
_CLASSES = {
    "LeastRequest": "meshlib.balance.least_request.LeastRequest",
    "P2CPeakEwma": "meshlib.balance.p2c.P2CPeakEwma",
    "RingHash": "meshlib.balance.ring_hash.RingHash",
    "RoundRobin": "meshlib.balance.round_robin.RoundRobin",
    "WeightedRandom": "meshlib.balance.random.WeightedRandom",
    "WeightedRoundRobin": "meshlib.balance.wrr.WeightedRoundRobin",
}


if not TYPE_CHECKING:  # for type checkers these names are the imports above, and a typo stays an error

    def __getattr__(name: str) -> Any:
        path = _CLASSES.get(name)
        if path is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = load(path)
        globals()[name] = value
        return value


# The built-ins, by path, in the order MESHLIB_LB documents them (the first is the default).
register_balancer("p2c_ewma", "meshlib.balance.p2c.P2CPeakEwma")
register_balancer("round_robin", "meshlib.balance.round_robin.RoundRobin")
register_balancer("least_request", "meshlib.balance.least_request.LeastRequest")
register_balancer("random", "meshlib.balance.random.WeightedRandom")
register_balancer("ring_hash", "meshlib.balance.ring_hash.RingHash")
register_balancer("weighted_round_robin", "meshlib.balance.wrr.WeightedRoundRobin")
