"""The blocking-query rules for one service: what to ask Consul, when, and what each answer means, without I/O.

:class:`ConsulQuery` is what to ask (``/v1/health/service/<name>`` and its parameters, ``stale`` included);
:class:`BlockingQuery` is the loop's state: which ``index`` and ``wait`` the next request carries, how long
to pause before it (:class:`TokenBucket`, error backoff), and how a :class:`~.agent.Reply` becomes an
answer or an error. It never touches a socket or a clock of its own (:class:`WatchOptions` injects both the
clock and the randomness), so the same rules drive the blocking and the asyncio resolver and are tested
with a fake clock.

Watching (Consul's ``blocking.mdx``):

* the first query is a plain one (no ``index``), so the first request of a client does not wait for a
  blocking query; later ones pass the last ``X-Consul-Index`` and ``wait``, and hang until something
  changed or ``wait`` (+ up to ``wait/16`` of Consul's jitter) elapsed: the httpx read timeout is
  ``wait * 17/16`` plus a margin;
* an index lower than the previous one (snapshot restore, ...) resets the loop: the next query is a plain
  one again; otherwise the index is kept at 1 or more, so a server bug answering 0 cannot cause a busy loop;
* the index moves on unrelated writes, so answers are compared: an unchanged endpoint set returns the same
  :class:`Resolution` object, and nothing is rebuilt;
* the loop is rate limited by a token bucket (burst 2, one token per 15 s): no wait while changes are rare,
  one query per 15 s when Consul churns;
* after an error (unreachable, timeout, 5xx, 429, 503, ACL) the next query waits an exponential backoff
  with jitter (1 s doubling to 60 s, each wait drawn between half and all of it) and is a plain one, so a
  recovery is seen at once.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from meshlib._config.parse import ascii_digits
from meshlib.discovery.base import Endpoint, Resolution
from meshlib.discovery.consul.agent import ConsulAgent, Reply, Request, _redact, acl_error
from meshlib.discovery.consul.health import DEFAULT_ZONE_KEY, _payload_key, endpoints_from_health
from meshlib.errors import ConsulACLError, DiscoveryError

__all__ = [
    "DEFAULT_WAIT",
    "MAX_WAIT",
    "BlockingQuery",
    "ConsulQuery",
    "TokenBucket",
    "WatchOptions",
    "next_index",
]

logger = logging.getLogger("meshlib.discovery")

#: Consul's default and maximum ``wait`` of a blocking query (``blocking.mdx``).
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0


# --- options -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchOptions:
    """How the blocking-query loop paces itself; the defaults follow Consul's ``blocking.mdx``.

    ``burst`` / ``refill``: token bucket of the loop (2 tokens, one more every 15 s; ``refill=0`` disables
    the limit, for tests). ``backoff_base`` / ``backoff_cap``: after the n-th consecutive error the next
    query waits ``min(cap, base * 2**(n-1))`` times a random factor in [0.5, 1]. ``connect_timeout`` bounds
    connecting (and writing); ``query_timeout`` is the read timeout of a plain query; a blocking query may
    read for ``wait * 17/16 + read_margin``. ``clock`` (monotonic seconds) and ``random`` (in [0, 1)) are
    injectable so the rules can be tested without waiting.
    """

    burst: int = 2
    refill: float = 15.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    connect_timeout: float = 2.0
    query_timeout: float = 10.0
    read_margin: float = 5.0
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    random: Callable[[], float] = field(default=random.random, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {self.burst!r}")
        for name in ("refill", "backoff_base", "backoff_cap", "read_margin"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("connect_timeout", "query_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.backoff_cap < self.backoff_base:
            raise ValueError(f"backoff_cap ({self.backoff_cap}) must be >= backoff_base ({self.backoff_base})")


class TokenBucket:
    """``burst`` tokens, one more every ``refill`` seconds (``refill=0``: unlimited).

    Consul's advice for blocking loops: no wait while results change rarely, a couple of quick successive
    deliveries allowed, then one query per ``refill`` seconds while they churn.
    """

    def __init__(self, burst: int, refill: float, clock: Callable[[], float]) -> None:
        self.burst = burst
        self.refill = refill
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _update(self) -> None:
        now = self._clock()
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) / self.refill)
        self._at = now

    def delay(self) -> float:
        """Seconds until a token is available (0.0 when one is available now)."""
        if self.refill <= 0:
            return 0.0
        self._update()
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) * self.refill

    def take(self) -> None:
        """Use one token (taking from an empty bucket is a debt that delays the next token)."""
        if self.refill <= 0:
            return
        self._update()
        self._tokens -= 1.0


# --- the query -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsulQuery:
    """What to ask Consul for one service (parsed from the target URI by :func:`~.resolver.from_target`)."""

    service: str
    tags: tuple[str, ...] = ()
    dc: str | None = None
    passing: bool = True
    near: str | None = None
    wait: float = DEFAULT_WAIT
    stale: bool = True
    consistent: bool = False
    filter: str | None = None
    ns: str | None = None
    partition: str | None = None
    peer: str | None = None
    #: Ask ``/v1/health/connect/<service>``: the instances that accept Connect mTLS (Connect Native services and
    #: sidecar proxies, at the proxy's address), as Consul's own proxies do for mesh upstreams.
    connect: bool = False
    #: The metadata key holding an instance's zone when ``Service.Locality`` has none (``MESHLIB_CONSUL_ZONE_KEY``).
    zone_key: str = DEFAULT_ZONE_KEY

    @property
    def path(self) -> str:
        """``/v1/health/service/<service>`` (``/v1/health/connect/...`` with ``connect``), the name
        percent-encoded."""
        kind = "connect" if self.connect else "service"
        return f"/v1/health/{kind}/{quote(self.service, safe='')}"

    def params(self, agent: ConsulAgent) -> list[tuple[str, str]]:
        """Query parameters of every request (without ``index``/``wait``), as Consul's API client sends them."""
        params: list[tuple[str, str]] = []
        if self.dc:
            params.append(("dc", self.dc))
        params.extend(("tag", tag) for tag in self.tags)
        if self.passing:
            params.append(("passing", "true"))
        if self.near:
            params.append(("near", self.near))
        if self.filter:
            params.append(("filter", self.filter))
        if self.stale:
            params.append(("stale", ""))
        if self.consistent:
            params.append(("consistent", ""))
        if ns := self.ns or agent.namespace:
            params.append(("ns", ns))
        if partition := self.partition or agent.partition:
            params.append(("partition", partition))
        if self.peer:
            params.append(("peer", self.peer))
        return params


# --- the blocking-query loop (pure) --------------------------------------------------------------------------


class BlockingQuery:
    """The rules of one service's blocking-query loop (Consul ``blocking.mdx``), with no I/O.

    Call :meth:`pause` (seconds to wait first), then :meth:`next_request`, send it, and hand the reply to
    :meth:`on_reply`, which returns the answer or raises. Counters for status pages and tests: ``queries``,
    ``unchanged`` (answers equal to the previous one), ``resets`` (index went backwards), ``failures``
    (consecutive errors).
    """

    def __init__(
        self,
        query: ConsulQuery,
        agent: ConsulAgent,
        options: WatchOptions,
        *,
        service: str = "",
        source: str = "",
        path: str | None = None,
        params: Iterable[tuple[str, str]] | None = None,
        select: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        self.query = query
        #: Keeps the entries of an answer that may be used, before they become endpoints (a discovery chain
        #: target's subset filter, evaluated here as well as by the agent).
        self.select = select
        #: What is asked: the query's health path and parameters, unless the caller watches another endpoint
        #: with the same rules (``path``/``params``: the Connect CA's leaf and roots).
        self.path = query.path if path is None else path
        self.agent = agent
        self.options = options
        self.service = service or query.service
        self.source = source or f"consul://{query.service}"
        self.index = 0
        self.answer: Resolution | None = None
        self._answer_key: frozenset[tuple[Any, ...]] | None = None
        self.bucket = TokenBucket(options.burst, options.refill, options.clock)
        self._not_before = -math.inf
        self._params = tuple(query.params(agent) if params is None else params)
        self.failures = 0
        self.queries = 0
        self.unchanged = 0
        self.resets = 0
        self.known_leader: bool | None = None
        self.last_contact: float | None = None

    def pause(self) -> float:
        """Seconds to wait before the next query: the rate limit's, or what remains of an error backoff."""
        backoff = self._not_before - self.options.clock()
        return max(0.0, self.bucket.delay(), backoff)

    def next_request(self) -> Request:
        """The next query (uses a token): plain first, after an error or a reset; blocking otherwise."""
        self.bucket.take()
        self.queries += 1
        options = self.options
        blocking = self.index > 0 and self.failures == 0
        params = self._params
        if blocking:
            wait_ms = max(1, round(self.query.wait * 1000))
            params = (*params, ("index", str(self.index)), ("wait", f"{wait_ms}ms"))
            read = self.query.wait * 17 / 16 + options.read_margin
        else:
            read = options.query_timeout
        timeout = httpx.Timeout(options.connect_timeout, read=read)
        return Request(self.path, params, timeout, blocking)

    def on_reply(self, reply: Reply) -> Resolution:
        """Apply a reply: the answer (the previous object when nothing changed), or raise the error."""
        if reply.error is None and reply.status == 404:
            # No such service (or endpoint) on this agent: an empty answer, not an error.
            self._advance(None)
            return self._succeeded(())
        document = self.document(reply)
        try:
            if self.select is not None and isinstance(document, list):
                document = self.select(document)
            query = self.query
            endpoints = endpoints_from_health(
                document, passing_only=query.passing, tags=query.tags, zone_key=query.zone_key
            )
        except ValueError as exc:
            raise self._failed(self._error(f"Consul answered with an unreadable body: {exc}")) from None
        if not endpoints and reply.headers.get("x-consul-results-filtered-by-acls", "").lower() == "true":
            raise self._failed(self._acl_error(filtered=True))
        self.accept(reply)
        return self._succeeded(endpoints)

    def document(self, reply: Reply) -> Any:
        """The JSON document of a 200 answer; for anything else raise the error (and schedule the backoff).

        Shared by every endpoint watched with these rules: the caller checks the document, then calls
        :meth:`accept` (the index moves on) or raises :meth:`failed` with its own error.
        """
        if reply.error is not None:
            raise self._failed(self._transport_error(reply.error))
        status = reply.status
        if status == 200:
            try:
                return json.loads(reply.body)
            except ValueError as exc:  # JSONDecodeError is a ValueError
                raise self._failed(self._error(f"Consul answered with an unreadable body: {exc}")) from None
        if status == 403:
            raise self._failed(self._acl_error(body=self._text(reply.body)))
        if status in (429, 503):
            what = "rate limiting requests (429)" if status == 429 else "unavailable (503)"
            raise self._failed(self._error(f"Consul is {what}: {self._text(reply.body) or 'no detail'}; backing off"))
        detail = self._text(reply.body) or "no detail"
        raise self._failed(self._error(f"Consul answered HTTP {status} for {self.path}: {detail}"))

    def accept(self, reply: Reply) -> None:
        """A 200 answer was used: note the leader headers and move the index on (Consul's index rules)."""
        self._observe(reply.headers)
        self._advance(reply.headers.get("x-consul-index"))

    def failed(self, error: DiscoveryError) -> DiscoveryError:
        """Count ``error`` as a failed query (the next one waits the backoff and is a plain one); returns it."""
        return self._failed(error)

    def recovered(self) -> bool:
        """After a usable answer: reset the backoff; ``True`` when queries had been failing until now."""
        failing = self.failures > 0
        if failing:
            logger.info("Consul answers again for service %s after %d failed queries", self.service, self.failures)
        self.failures = 0
        self._not_before = -math.inf
        return failing

    # -- internals

    def _succeeded(self, endpoints: tuple[Endpoint, ...]) -> Resolution:
        self.recovered()
        key = _payload_key(endpoints)
        if self.answer is not None and key == self._answer_key:
            self.unchanged += 1
            logger.debug("Consul answer for service %s unchanged (index %d)", self.service, self.index)
            return self.answer
        self._answer_key = key
        self.answer = Resolution(endpoints, ttl=None, watch=True)
        return self.answer

    def _advance(self, raw_index: str | None) -> None:
        """Consul's two index rules (:func:`next_index`), counting and logging a reset."""
        index, reset = next_index(self.index, raw_index)
        if reset:
            self.resets += 1
            logger.info(
                "Consul index for service %s went backwards (%s -> %s): restarting the blocking loop",
                self.service,
                self.index,
                raw_index,
            )
        self.index = index

    def _observe(self, headers: Mapping[str, str]) -> None:
        leader = headers.get("x-consul-knownleader")
        known = None if leader is None else leader.lower() == "true"
        if known is False and self.known_leader is not False:
            logger.warning(
                "Consul answered for service %s without a known leader (X-Consul-KnownLeader: false): "
                "the instances may be stale",
                self.service,
            )
        self.known_leader = known
        contact = headers.get("x-consul-lastcontact")
        self.last_contact = int(contact) / 1000 if contact is not None and ascii_digits(contact, 20) else None

    def _failed(self, error: DiscoveryError) -> DiscoveryError:
        self.failures += 1
        options = self.options
        # The exponent is capped: 2.0 ** 1024 overflows, and a watch may fail that often in a long outage.
        backoff = min(options.backoff_cap, options.backoff_base * 2.0 ** min(self.failures - 1, 64))
        self._not_before = options.clock() + backoff * (0.5 + 0.5 * options.random())
        return error

    def _error(self, message: str) -> DiscoveryError:
        return DiscoveryError(_redact(message, self.agent.secrets()), service=self.service, source=self.source)

    def _transport_error(self, exc: Exception) -> DiscoveryError:
        where = f"Consul agent at {self.agent.address}"
        if isinstance(exc, httpx.TimeoutException):
            return self._error(f"{where} did not answer in time ({type(exc).__name__}: {exc})")
        return self._error(f"{where} unreachable: {type(exc).__name__}: {exc}")

    def _text(self, body: bytes) -> str:
        return _text(body, self.agent.secrets())

    def _acl_error(self, *, body: str = "", filtered: bool = False) -> ConsulACLError:
        return acl_error(
            self.agent, self.query.service, service=self.service, source=self.source, body=body, filtered=filtered
        )


def next_index(current: int, raw_index: str | None) -> tuple[int, bool]:
    """The index the next blocking query carries after an answer with ``X-Consul-Index: raw_index``, and
    whether the loop was reset. Consul's two rules: reset to 0 (a plain query next) when the index goes
    backwards (or is missing), else keep it >= 1 so a server answering 0 cannot cause a busy loop."""
    if raw_index is None or not ascii_digits(raw_index.strip(), 20):  # a uint64
        return 0, False  # no index to block on: the next query is a plain one (rate limited)
    index = int(raw_index)
    if index < current:
        return 0, True
    return max(index, 1), False


def _text(body: bytes, secrets: Iterable[str], limit: int = 300) -> str:
    """An answer's body for a message: redacted *before* it is cut, so no secret is left half-shown."""
    text = _redact(body.decode("utf-8", "replace").strip(), secrets)
    return text if len(text) <= limit else text[:limit] + "..."
