"""``consul://`` as a meshlib resolver: the scheme's factory, and :class:`ConsulResolver`, which runs the
blocking-query rules (:mod:`.query`) over the agent's HTTP clients (:mod:`.agent`).

The rules are written once, as a sans-I/O plan (``ConsulResolver._plan``: pause, request, reply), and driven
twice: with blocking calls by :meth:`ConsulResolver.resolve` (the ``Client``'s refresh thread) and with
``await`` by :meth:`ConsulResolver.aresolve` (the ``AsyncClient``'s refresh task). :func:`from_target` is
what ``meshlib.discovery`` registers for the ``consul://`` scheme.

``consul://payments?tag=primary&dc=dc1&passing=true&near=_agent&wait=5m&stale=true``
    The instances of Consul service ``payments``, from ``GET /v1/health/service/payments`` on the Consul
    agent named by ``CONSUL_HTTP_ADDR``. Query parameters are Consul's own, passed through:

    * ``tag`` (repeatable; an instance must carry every tag) -- Consul's deprecated ``tag`` parameter, also
      checked here, so an old server that ignores a second tag cannot widen the set;
    * ``dc``, ``near`` (``_agent`` sorts by round-trip time from the agent; the order is kept),
      ``filter`` (a bexpr such as ``"primary" in Service.Tags``), ``ns``, ``partition``, ``peer``;
    * ``passing`` (default ``true``): only instances whose checks all pass. With ``passing=false``,
      instances in ``warning`` are included with their ``Weights.Warning``;
    * ``wait`` (default ``5m``, at most ``10m`` as Consul caps it): how long one blocking query may hang;
    * ``stale`` (default ``true``: any server may answer, as Consul's DNS does, so discovery keeps working
      without a leader) or ``consistent=true``.

    Nothing else is accepted (a typo fails at client construction), and in particular not ``token``: a
    secret does not belong in a URI that is printed in logs and errors. Use ``CONSUL_HTTP_TOKEN``.

Each :meth:`ConsulResolver.resolve` is one query and returns ``Resolution(endpoints, ttl=None, watch=True)``;
the refresh loop calls it again at once (:mod:`meshlib.discovery.refresh`), and keeps the last good set
while it raises (fail static). Errors: :class:`~meshlib.DiscoveryError` when Consul cannot answer,
:class:`~meshlib.errors.ConsulACLError` when it refuses the token (403) or filters every instance out for
lack of permission (``X-Consul-Results-Filtered-By-ACLs``); a 404 or an unknown service is an empty answer.

:meth:`ConsulResolver.close` may be called from any thread and ends a query in flight at once (the agent
client shuts down the query's socket), and the interrupted resolve returns the last answer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Generator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from meshlib._config import parse_duration
from meshlib._config.parse import is_secret_param, redact_uri
from meshlib.discovery.base import DiscoverySettings, Resolution
from meshlib.discovery.consul.agent import AgentClient, ConsulAgent, Reply, Request, _Closed
from meshlib.discovery.consul.health import zone_key_from_env
from meshlib.discovery.consul.query import DEFAULT_WAIT, MAX_WAIT, BlockingQuery, ConsulQuery, WatchOptions
from meshlib.errors import ConfigError, DiscoveryError

if TYPE_CHECKING:
    from meshlib.discovery import Target

__all__ = [
    "FORM",
    "ConsulResolver",
    "Pause",
    "from_target",
]

FORM = "consul://service[?tag=t&dc=dc1&passing=true&near=_agent&wait=5m&stale=true]"


# --- the target URI ------------------------------------------------------------------------------------------

_URI_PARAMS = ("tag", "dc", "passing", "near", "wait", "stale", "consistent", "filter", "ns", "partition", "peer")
_BOOL_PARAMS = frozenset({"passing", "stale", "consistent"})


def _parse_query(target: Target) -> ConsulQuery:
    rest = target.rest
    if "#" in rest:
        raise target.invalid("no '#fragment' in a consul:// target")
    name, _, query = rest.partition("?")
    if not name:
        raise target.invalid("a Consul service name after consul://")
    if "/" in name or "@" in name or any(c.isspace() for c in name):
        raise target.invalid(
            f"only a Consul service name before '?' (got {name!r}); the agent is set with CONSUL_HTTP_ADDR"
        )
    values: dict[str, list[str]] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        values.setdefault(key, []).append(value)
    if any(is_secret_param(key) for key in values):
        # The target is printed in errors and logs: never let a secret into it, nor into this message, in
        # whatever spelling it came (TOKEN=, %74oken=, a percent-encoded value): redacted on the raw text.
        raise ConfigError(
            target.variable,
            redact_uri(target.uri),
            "no token in the target URI: set CONSUL_HTTP_TOKEN or CONSUL_HTTP_TOKEN_FILE instead",
        )
    unknown = sorted(set(values) - set(_URI_PARAMS))
    if unknown:
        raise target.invalid(f"query parameters among {', '.join(_URI_PARAMS)} (unknown: {', '.join(unknown)})")
    single: dict[str, str] = {}
    for key, found in values.items():
        if key != "tag" and len(found) > 1:
            raise target.invalid(f"{key!r} given once (only 'tag' may repeat)")
        if key != "tag":
            single[key] = found[0]
    flags: dict[str, bool] = {}
    for key in _BOOL_PARAMS & single.keys():
        raw = single[key].strip().lower()
        if raw in ("", "true", "1", "yes", "t"):
            flags[key] = True
        elif raw in ("false", "0", "no", "f"):
            flags[key] = False
        else:
            raise target.invalid(f"{key}=true or {key}=false (got {single[key]!r})")
    tags = tuple(values.get("tag", ()))
    if any(not tag for tag in tags):
        raise target.invalid("a non-empty value for each tag=")
    for key in ("dc", "near", "filter", "ns", "partition", "peer"):
        if key in single and not single[key].strip():
            raise target.invalid(f"a non-empty value for {key}=")
    wait = DEFAULT_WAIT
    if "wait" in single:
        try:
            wait = parse_duration(f"{target.variable} (wait=)", single["wait"])
        except ConfigError:
            raise target.invalid(f"wait= as a duration such as 30s or 5m (got {single['wait']!r})") from None
        if wait > MAX_WAIT or wait < 0.001:
            raise target.invalid(f"wait= from 1ms to 10m, Consul's maximum (got {single['wait']!r})")
    stale = flags.get("stale", "consistent" not in flags or not flags["consistent"])
    consistent = flags.get("consistent", False)
    if stale and consistent:
        raise target.invalid("either stale or consistent reads, not both (Consul refuses the pair)")
    return ConsulQuery(
        service=name,
        tags=tags,
        dc=single.get("dc"),
        passing=flags.get("passing", True),
        near=single.get("near"),
        wait=wait,
        stale=stale,
        consistent=consistent,
        filter=single.get("filter"),
        ns=single.get("ns"),
        partition=single.get("partition"),
        peer=single.get("peer"),
    )


def from_target(target: Target, settings: DiscoverySettings, *, options: WatchOptions | None = None) -> ConsulResolver:
    """Factory registered for ``consul://``: parses the target, reads the ``CONSUL_*`` variables.

    ``options`` changes the loop's pacing; register a ``functools.partial`` of this function with
    ``register_scheme("consul", ..., replace=True)`` to use other options for every ``consul://`` target.
    """
    query = _parse_query(target)
    environ = settings.environ if settings.environ is not None else os.environ
    agent = ConsulAgent.from_env(environ)
    query = replace(query, zone_key=zone_key_from_env(environ))
    return ConsulResolver(target.service, query, agent, source=target.uri, options=options)


# --- the resolver (I/O) --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pause:
    """Step: wait this long before the next query (rate limit or backoff)."""

    seconds: float


#: A resolve written once as a generator of steps (pause, request), driven with blocking calls by
#: :meth:`ConsulResolver.resolve` and with ``await`` by :meth:`ConsulResolver.aresolve`.
_Plan = Generator[Pause | Request, Reply | None, Resolution]


class ConsulResolver:
    """``consul://service``: the healthy instances of a Consul service, watched with blocking queries.

    Owns an :class:`~.agent.AgentClient` (its ``httpx.Client`` serves :meth:`resolve`, its
    ``httpx.AsyncClient`` :meth:`aresolve`). One resolve at a time (the refresh loop's); :meth:`close` from
    any thread.
    """

    def __init__(
        self,
        service: str,
        query: ConsulQuery,
        agent: ConsulAgent,
        *,
        source: str,
        options: WatchOptions | None = None,
    ) -> None:
        self.service = service
        self.source = source
        self.agent = agent
        self.watch = BlockingQuery(query, agent, options or WatchOptions(), service=service, source=source)
        self._closed = threading.Event()
        self._http = AgentClient(agent, self._closed)

    def __repr__(self) -> str:
        return f"ConsulResolver({self.source!r}, agent={self.agent.address!r})"

    @property
    def query(self) -> ConsulQuery:
        """The query this resolver asks."""
        return self.watch.query

    def _plan(self) -> _Plan:
        pause = self.watch.pause()
        if pause > 0:
            yield Pause(pause)
        reply = yield self.watch.next_request()
        assert reply is not None
        return self.watch.on_reply(reply)

    def resolve(self) -> Resolution:
        """One query (blocking until Consul answers, up to ``wait``); see the module docs."""
        self._check_open()
        plan = self._plan()
        try:
            step = next(plan)
            while True:
                if isinstance(step, Pause):
                    if self._closed.wait(step.seconds):
                        raise _Closed
                    step = plan.send(None)
                else:
                    step = plan.send(self._http.send(step))
        except StopIteration as done:
            resolution: Resolution = done.value
            return resolution
        except _Closed:
            return self._after_close()
        finally:
            plan.close()

    async def aresolve(self) -> Resolution:
        """Same as :meth:`resolve` on the event loop (asyncio or trio); cancelling the task ends a query at once."""
        import anyio  # here, not at the top: a sync Client's consul:// never needs it

        self._check_open()
        plan = self._plan()
        try:
            step = next(plan)
            while True:
                if isinstance(step, Pause):
                    await anyio.sleep(step.seconds)
                    if self._closed.is_set():
                        raise _Closed
                    step = plan.send(None)
                else:
                    step = plan.send(await self._http.asend(step))
        except StopIteration as done:
            resolution: Resolution = done.value
            return resolution
        except _Closed:
            return self._after_close()
        finally:
            plan.close()

    def close(self) -> None:
        """Stop: interrupt a query in flight (from any thread), close the HTTP clients. Idempotent."""
        self._http.close()  # sets ``self._closed`` first, then ends the query in flight

    # -- internals

    def _check_open(self) -> None:
        # Raising (rather than answering) makes a refresh loop that was not stopped back off, not spin.
        if self._closed.is_set():
            raise DiscoveryError("the Consul resolver is closed", service=self.service, source=self.source)

    def _after_close(self) -> Resolution:
        """A resolve interrupted by :meth:`close`: the last answer, so the refresh loop sees no change and ends."""
        if self.watch.answer is not None:
            return self.watch.answer
        raise DiscoveryError("the Consul resolver was closed", service=self.service, source=self.source)
