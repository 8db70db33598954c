"""Maximum connection age: an endpoint pool's connections retire once old, when idle, never mid-request.

A keep-alive connection can live for as long as the process. meshlib balances each *request* over the endpoints
it discovers, so that alone does not pin traffic; but when an "endpoint" is itself a balancer (a Kubernetes
``ClusterIP``, a cloud L4 load balancer, a DNS name whose addresses change), each connection stays on the backend
it was balanced to when it was opened, and new backends get no share until old connections end. A maximum age
makes them end. Sources:

* Envoy ``common_http_protocol_options.max_connection_duration`` (upstream: ``conn_pool_base.cc``
  ``ActiveClient::onConnectionDurationTimeout``): once a connection reaches its duration it is *drained* (no new
  streams) and closed when its active streams reach zero; counted in ``upstream_cx_max_duration_reached``.
* gRFC A9 ``MAX_CONNECTION_AGE``: the same on the server side, with GOAWAY, "a per-connection random jitter of
  +/-10%" so connections opened together (a deployment, a reconnect storm) do not all retire together.

How it plugs in: httpcore's (and httpcore2's) ``ConnectionPool`` asks each pooled connection, on every pass of its
bookkeeping (each new request, each response closed), whether it ``is_available()`` for a new request and
whether it ``has_expired()`` (then the pool closes it). :func:`install` wraps the connections *one* pool creates
(its ``create_connection``, per pool instance: nothing global) in :class:`_Aged`, which answers:

* ``is_available()``: ``False`` once the connection is past its age, so no new request (no new HTTP/2 stream)
  is put on it; the pool opens a new connection instead;
* ``has_expired()``: ``True`` once it is past its age *and idle*, so the pool closes it: at once when its last
  response is closed after the age passed (HTTP/1.1: the one response; HTTP/2: the last stream), or, if it sat
  idle in the pool, on the pool's next pass (the next request to that endpoint, before any reuse).

A request or a streamed response in progress is never cut: a busy connection is not idle, so it is never
expired. There is no grace period that force-closes a busy connection (A9's ``MAX_CONNECTION_AGE_GRACE``): the
client owns those requests, and each is already bounded by its own deadline.

The cost on the request path: one clock read per connection the pool looks at, per pass.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("meshlib")

__all__ = ["DEFAULT_JITTER", "MAX_JITTER", "ConnectionAge", "install"]

#: gRFC A9: "a per-connection random jitter of +/-10%".
DEFAULT_JITTER = 0.1
#: The widest jitter accepted: beyond +/-50 % the setting would no longer say how old a connection gets.
MAX_JITTER = 0.5


class ConnectionAge:
    """The maximum age of one service's pooled connections, with per-connection jitter, and what it retired.

    ``max_age``: seconds (> 0); ``jitter``: a fraction from 0 to :data:`MAX_JITTER`: each connection's lifetime is
    drawn uniformly from ``max_age * (1 - jitter)`` to ``max_age * (1 + jitter)``. ``clock`` (monotonic seconds)
    and ``rng`` are injectable for tests. One instance serves every endpoint pool of a service (thread-safe).
    """

    __slots__ = ("_lock", "_random", "_retired", "clock", "jitter", "max_age")

    def __init__(
        self,
        max_age: float,
        jitter: float = DEFAULT_JITTER,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not (isinstance(max_age, (int, float)) and 0 < max_age < float("inf")):
            raise ValueError(f"max_age must be a finite number of seconds > 0, got {max_age!r}")
        if not (isinstance(jitter, (int, float)) and 0 <= jitter <= MAX_JITTER):
            raise ValueError(f"jitter must be a fraction from 0 to {MAX_JITTER}, got {jitter!r}")
        self.max_age = float(max_age)
        self.jitter = float(jitter)
        self.clock = clock
        self._random = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._retired = 0

    def lifetime(self) -> float:
        """One connection's age limit: ``max_age`` with a uniform jitter of ``+/- jitter * max_age``."""
        if not self.jitter:
            return self.max_age
        with self._lock:  # random.Random is not documented thread-safe across implementations
            draw = self._random.uniform(-self.jitter, self.jitter)
        return self.max_age * (1.0 + draw)

    @property
    def retired(self) -> int:
        """Connections retired because of their age (Envoy's ``upstream_cx_max_duration_reached``)."""
        return self._retired

    def _count(self) -> None:
        with self._lock:
            self._retired += 1

    def __repr__(self) -> str:
        return f"ConnectionAge(max_age={self.max_age!r}, jitter={self.jitter!r}, retired={self._retired})"


class _Aged:
    """One pooled connection (any httpcore/httpcore2 ``ConnectionInterface``, sync or async), retired when old.

    Only ``is_available`` and ``has_expired`` differ from the connection it wraps; everything else is the wrapped
    connection's own (``handle_request``/``handle_async_request``, ``close``/``aclose``, ``is_idle``...).
    """

    __slots__ = ("_age", "_inner", "_retire_at", "_retired")

    def __init__(self, inner: Any, age: ConnectionAge) -> None:
        self._inner = inner
        self._age = age
        self._retire_at = age.clock() + age.lifetime()  # the pool opens it now (Envoy: once connected)
        self._retired = False

    def is_available(self) -> bool:
        """Whether a new request (a new HTTP/2 stream) may go on it: not once it is past its age."""
        available: bool = self._inner.is_available()
        return available and self._age.clock() < self._retire_at

    def has_expired(self) -> bool:
        """Whether the pool should close it: the connection's own reasons, or past its age while idle."""
        expired: bool = self._inner.has_expired()
        if expired:
            return True
        if self._age.clock() < self._retire_at or not self._inner.is_idle():
            return False  # young, or busy: a request or a response body in progress is never cut
        if not self._retired:  # counted once, whoever asks again before the pool drops it
            self._retired = True
            self._age._count()
            logger.debug("retiring pooled connection %r: past its maximum age", self._inner)
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __repr__(self) -> str:
        return f"<aged {self._inner!r}>"


class _Creator:
    """A pool's own ``create_connection``, whose connections are :class:`_Aged`."""

    __slots__ = ("_age", "_create")

    def __init__(self, create: Callable[[Any], Any], age: ConnectionAge) -> None:
        self._create = create
        self._age = age

    def __call__(self, origin: Any) -> _Aged:
        return _Aged(self._create(origin), self._age)


def install(transport: Any, age: ConnectionAge | None) -> bool:
    """Retire the connections of ``transport`` (an ``httpx``/``httpx2`` HTTP transport meshlib made) by ``age``.

    The transport's connection pool makes each connection with its ``create_connection(origin)`` (httpcore's
    override point for the connection class); it is replaced on this pool instance only, before the first
    connection. ``None`` (no maximum age) leaves the transport as it is. A transport whose pool is not an
    httpcore/httpcore2 one (aiohttp, an ``inner_transport=`` factory's) is left alone, once logged.
    """
    if age is None:
        return False
    pool: Any = getattr(transport, "_pool", None)
    create = getattr(pool, "create_connection", None)
    core_name = type(pool).__module__.partition(".")[0]
    if not callable(create) or core_name not in ("httpcore", "httpcore2"):
        _warn_once(type(transport).__name__)
        return False
    if isinstance(create, _Creator):
        return True
    pool.create_connection = _Creator(create, age)
    return True


@functools.cache
def _warn_once(kind: str) -> None:
    logger.warning(
        "MESHLIB_MAX_CONNECTION_AGE does not apply to %s transports (their connection pool is not one meshlib "
        "knows): their connections live as long as the pool keeps them",
        kind,
    )
