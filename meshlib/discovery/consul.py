"""``consul://`` discovery: Consul's health endpoint, watched with blocking queries.

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

The agent and credentials come from the Consul tools' own variables, read when the resolver is built
(from ``DiscoverySettings.environ`` when the client was given an environment, else ``os.environ``):

``CONSUL_HTTP_ADDR``  ``host:port``, ``http://host[:port][/prefix]``, ``https://...`` or ``unix:///path``
(default ``127.0.0.1:8500``); ``CONSUL_HTTP_SSL=true`` makes ``host:port`` (and ``http://``) use https.
``CONSUL_HTTP_TOKEN`` / ``CONSUL_HTTP_TOKEN_FILE`` (the file wins, as in Consul's API client): sent as the
``X-Consul-Token`` header, never in a URL, a log line, an error or a repr. ``CONSUL_HTTP_AUTH``
(``user:password``, HTTP basic auth). ``CONSUL_CACERT``, ``CONSUL_CAPATH``, ``CONSUL_CLIENT_CERT`` and
``CONSUL_CLIENT_KEY`` (both or neither), ``CONSUL_TLS_SERVER_NAME`` (SNI and certificate name),
``CONSUL_HTTP_SSL_VERIFY=false`` (logs a warning). ``CONSUL_NAMESPACE`` / ``CONSUL_PARTITION`` (Enterprise)
become ``ns`` / ``partition`` unless the URI sets them. A bad value raises :class:`~meshlib.ConfigError`
naming the variable (where Consul's Go client would log and carry on, e.g. ``CONSUL_HTTP_SSL_VERIFY=maybe``
would silently disable verification there).

How an answer becomes endpoints (:func:`endpoints_from_health`): the address is ``Service.Address``, else
``Node.Address``; an instance's health is the worst of all its checks, the node's ``serfHealth`` included
(``passing`` < ``warning`` < ``critical``; maintenance and unknown statuses count as critical); a passing
instance gets ``Service.Weights.Passing``, a warning one ``Weights.Warning`` (default 1 and 1, as Consul
does), and weight 0 removes it, as in Consul's DNS. ``Service.Tags`` go to ``Endpoint.tags``,
``Service.Meta`` to ``Endpoint.meta``, ``Node.Datacenter`` to ``Endpoint.zone``. Unknown fields are ignored.

Watching (:class:`BlockingQuery` holds the rules, without I/O; Consul's ``blocking.mdx``):

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

Each :meth:`ConsulResolver.resolve` is one query and returns ``Resolution(endpoints, ttl=None, watch=True)``;
the refresh loop calls it again at once (:mod:`meshlib.discovery.refresh`), and keeps the last good set
while it raises (fail static). Errors: :class:`~meshlib.DiscoveryError` when Consul cannot answer,
:class:`~meshlib.errors.ConsulACLError` when it refuses the token (403) or filters every instance out for
lack of permission (``X-Consul-Results-Filtered-By-ACLs``); a 404 or an unknown service is an empty answer.

:meth:`ConsulResolver.close` may be called from any thread and ends a query in flight at once: it shuts down
the query's socket (closing a socket does not wake a thread blocked reading it; shutting it down does),
and the interrupted resolve returns the last answer. Connections are not kept alive between queries (one
every few minutes at most, or one per 15 s under churn), so nothing is left to close asynchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote

import httpx

from meshlib._config import parse_duration
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution
from meshlib.errors import ConfigError, ConsulACLError, DiscoveryError

if TYPE_CHECKING:
    from meshlib.discovery import Target

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

logger = logging.getLogger("meshlib.discovery")

FORM = "consul://service[?tag=t&dc=dc1&passing=true&near=_agent&wait=5m&stale=true]"

#: Consul's default agent address (``api.DefaultConfig``).
DEFAULT_ADDR = "127.0.0.1:8500"
#: Consul's default and maximum ``wait`` of a blocking query (``blocking.mdx``).
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0

_PASSING, _WARNING, _CRITICAL, _MAINTENANCE = "passing", "warning", "critical", "maintenance"
_SEVERITY = {_PASSING: 0, _WARNING: 1, _CRITICAL: 2, _MAINTENANCE: 3}
#: CheckIDs of Consul's maintenance mode (``api.NodeMaint``, ``api.ServiceMaintPrefix``).
_NODE_MAINTENANCE = "_node_maintenance"
_SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"

#: httpcore trace events whose return value is a freshly connected (or TLS-wrapped) network stream.
_CONNECTED = frozenset(
    {
        "connection.connect_tcp.complete",
        "connection.connect_unix_socket.complete",
        "connection.start_tls.complete",
    }
)


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


# --- the agent (CONSUL_* variables) --------------------------------------------------------------------------

_GO_TRUE = frozenset({"1", "t", "true"})
_GO_FALSE = frozenset({"0", "f", "false"})
_HOST = re.compile(r"[A-Za-z0-9_.-]+")


def _go_bool(variable: str, raw: str) -> bool:
    """A boolean as Go's ``strconv.ParseBool`` reads it (what Consul's tools use), else a ConfigError."""
    value = raw.strip().lower()
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise ConfigError(variable, raw, "a boolean: true or false (also 1/0, t/f)")


def _split_host_port(variable: str, raw: str, text: str, default_port: int | None) -> tuple[str, int]:
    expected = _ADDR_EXPECTED
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(variable, raw, expected)
        host, rest = text[1:end], text[end + 1 :]
        if not host or ":" not in host:
            raise ConfigError(variable, raw, expected)
    else:
        host, sep, port_text = text.partition(":")
        rest = f":{port_text}" if sep else ""
        if not host or not _HOST.fullmatch(host):
            raise ConfigError(variable, raw, expected)
    if not rest:
        if default_port is None:
            raise ConfigError(variable, raw, f"{expected} (host:port needs the port)")
        return host, default_port
    port_text = rest[1:] if rest.startswith(":") else ""
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(variable, raw, f"{expected} (port from 1 to 65535)")
    return host, int(port_text)


_ADDR_EXPECTED = "the Consul HTTP API address: host:port, http://host[:port][/prefix], https://... or unix:///path"


@dataclass(frozen=True, slots=True)
class ConsulAgent:
    """Where and how to reach the Consul HTTP API, from the ``CONSUL_*`` variables (validated).

    ``base_url`` is what httpx talks to (``http://localhost`` for a unix socket, then ``uds`` is the path);
    ``address`` is the printable form used in errors. Secrets (token, basic auth) are excluded from the
    repr and from every message.
    """

    base_url: str
    address: str
    uds: str | None = None
    tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    server_name: str | None = None
    namespace: str | None = None
    partition: str | None = None
    token: str | None = field(default=None, repr=False)
    token_origin: str = ""
    auth: tuple[str, str] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ConsulAgent:
        """Read ``CONSUL_HTTP_ADDR`` and the other variables the Consul CLI and API client honour."""

        def get(name: str) -> str | None:
            value = environ.get(name)
            return value.strip() if value is not None and value.strip() else None

        ssl_flag = False
        if (raw_ssl := get("CONSUL_HTTP_SSL")) is not None:
            ssl_flag = _go_bool("CONSUL_HTTP_SSL", raw_ssl)
        verify = True
        if (raw_verify := get("CONSUL_HTTP_SSL_VERIFY")) is not None:
            verify = _go_bool("CONSUL_HTTP_SSL_VERIFY", raw_verify)

        raw = get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR
        variable = "CONSUL_HTTP_ADDR"
        uds: str | None = None
        prefix = ""
        if raw.lower().startswith("unix://"):
            uds = raw[len("unix://") :]
            if not uds:
                raise ConfigError(variable, raw, f"{_ADDR_EXPECTED} (unix:// needs a socket path)")
            scheme, host, port = "http", "localhost", 80
        elif "://" in raw:
            scheme, rest = raw.split("://", 1)
            scheme = scheme.lower()
            if scheme not in ("http", "https"):
                raise ConfigError(variable, raw, f"{_ADDR_EXPECTED} (unknown scheme {scheme!r})")
            if ssl_flag:
                scheme = "https"  # as Consul's client: never back to http when TLS was asked for
            hostport, _, path = rest.partition("/")
            if path.strip("/"):
                prefix = "/" + path.strip("/")
            host, port = _split_host_port(variable, raw, hostport, 443 if scheme == "https" else 80)
        else:
            if "/" in raw:
                raise ConfigError(variable, raw, _ADDR_EXPECTED)
            scheme = "https" if ssl_flag else "http"
            host, port = _split_host_port(variable, raw, raw, None)

        tls: ssl.SSLContext | None = None
        server_name: str | None = None
        if scheme == "https":
            tls = _tls_context(get, verify)
            if (name := get("CONSUL_TLS_SERVER_NAME")) is not None:
                server_name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name.strip("[]")
        url_host = f"[{host}]" if ":" in host else host
        base_url = f"{scheme}://{url_host}:{port}{prefix}"
        address = f"unix://{uds}" if uds is not None else base_url

        token: str | None = None
        origin = ""
        if (token_file := get("CONSUL_HTTP_TOKEN_FILE")) is not None:
            try:
                with open(token_file, encoding="utf-8") as handle:
                    token = handle.read().strip() or None
            except OSError as exc:
                raise ConfigError(
                    "CONSUL_HTTP_TOKEN_FILE", token_file, f"a readable file holding a Consul ACL token ({exc.strerror})"
                ) from None
            origin = "CONSUL_HTTP_TOKEN_FILE" if token else ""
        if token is None and (raw_token := get("CONSUL_HTTP_TOKEN")) is not None:
            token, origin = raw_token, "CONSUL_HTTP_TOKEN"
        auth: tuple[str, str] | None = None
        if (raw_auth := environ.get("CONSUL_HTTP_AUTH")) is not None and raw_auth:
            user, _, password = raw_auth.partition(":")
            auth = (user, password)
        return cls(
            base_url=base_url,
            address=address,
            uds=uds,
            tls=tls,
            server_name=server_name,
            namespace=get("CONSUL_NAMESPACE"),
            partition=get("CONSUL_PARTITION"),
            token=token,
            token_origin=origin,
            auth=auth,
        )

    def secrets(self) -> tuple[str, ...]:
        """The values that must never appear in a message (for :func:`_redact`)."""
        found = [self.token] if self.token else []
        if self.auth is not None and self.auth[1]:
            found.append(self.auth[1])
        return tuple(found)


def _tls_context(get: Callable[[str], str | None], verify: bool) -> ssl.SSLContext:
    """An SSL context from ``CONSUL_CACERT``/``CONSUL_CAPATH``/``CONSUL_CLIENT_CERT``/``CONSUL_CLIENT_KEY``."""
    cafile, capath = get("CONSUL_CACERT"), get("CONSUL_CAPATH")
    try:
        context = ssl.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl.SSLError) as exc:
        variable, value = ("CONSUL_CACERT", cafile) if cafile else ("CONSUL_CAPATH", capath)
        raise ConfigError(variable, value, f"readable PEM CA certificates ({exc})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = get("CONSUL_CLIENT_CERT"), get("CONSUL_CLIENT_KEY")
    if (cert is None) != (key is None):
        missing, present, value = (
            ("CONSUL_CLIENT_KEY", "CONSUL_CLIENT_CERT", cert)
            if key is None
            else ("CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY", key)
        )
        raise ConfigError(present, value, f"to be set together with {missing} (both client cert and key, or neither)")
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "CONSUL_CLIENT_CERT", cert, f"a readable PEM certificate matching CONSUL_CLIENT_KEY ({exc})"
            ) from None
    if not verify:
        logger.warning(
            "CONSUL_HTTP_SSL_VERIFY=false: the Consul agent's TLS certificate is NOT verified; "
            "anyone on the path can impersonate it and redirect traffic"
        )
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


# --- the query (the target URI) ------------------------------------------------------------------------------

_URI_PARAMS = ("tag", "dc", "passing", "near", "wait", "stale", "consistent", "filter", "ns", "partition", "peer")
_BOOL_PARAMS = frozenset({"passing", "stale", "consistent"})


@dataclass(frozen=True, slots=True)
class ConsulQuery:
    """What to ask Consul for one service (parsed from the target URI by :func:`from_target`)."""

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

    @property
    def path(self) -> str:
        """``/v1/health/service/<service>``, the name percent-encoded."""
        return f"/v1/health/service/{quote(self.service, safe='')}"

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
    if "token" in values:
        # The target is printed in errors and logs: never let a secret into it, nor into this message.
        redacted = _redact(target.uri, [v for v in values["token"] if v])
        raise ConfigError(
            target.variable,
            redacted,
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
    return ConsulResolver(target.service, query, agent, source=target.uri, options=options)


# --- answers -> endpoints (pure) -----------------------------------------------------------------------------


def aggregate_status(checks: object) -> str:
    """The worst status of an instance's checks: ``passing``, ``warning``, ``critical`` or ``maintenance``.

    Maintenance mode is recognised by Consul's check IDs (``_node_maintenance``,
    ``_service_maintenance:<id>``) or a ``maintenance`` status; an unknown status counts as critical; an
    instance without checks is passing (as ``api.HealthChecks.AggregatedStatus``).
    """
    worst = _PASSING
    for check in checks if isinstance(checks, list) else ():
        if not isinstance(check, dict):
            continue
        check_id = str(check.get("CheckID") or "")
        if check_id == _NODE_MAINTENANCE or check_id.startswith(_SERVICE_MAINTENANCE_PREFIX):
            status = _MAINTENANCE
        else:
            status = str(check.get("Status") or "").lower()
            if status not in _SEVERITY:
                status = _CRITICAL
        if _SEVERITY[status] > _SEVERITY[worst]:
            worst = status
    return worst


def _int_field(value: object, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return default


def _weights(service: Mapping[str, Any]) -> tuple[int, int]:
    weights = service.get("Weights")
    if not isinstance(weights, dict):
        return 1, 1  # Consul's default when a registration sets none
    return _int_field(weights.get("Passing"), 1), _int_field(weights.get("Warning"), 1)


def endpoints_from_health(
    entries: object, *, passing_only: bool = True, tags: Iterable[str] = ()
) -> tuple[Endpoint, ...]:
    """Endpoints from a ``/v1/health/service/<name>`` body (decoded JSON), in Consul's order.

    Raises :class:`ValueError` when the body is not a JSON array. Entries that cannot be used (no address,
    no valid port, critical or in maintenance, weight 0, missing a required tag, warning while
    ``passing_only``) are left out; unknown fields are ignored.
    """
    if not isinstance(entries, list):
        raise ValueError(f"expected a JSON array of service instances, got {type(entries).__name__}")
    required = tuple(tags)
    found: list[Endpoint] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        node: Mapping[str, Any] = entry["Node"] if isinstance(entry.get("Node"), dict) else {}
        if not isinstance(entry.get("Service"), dict):
            continue
        service: Mapping[str, Any] = entry["Service"]
        status = aggregate_status(entry.get("Checks"))
        passing_weight, warning_weight = _weights(service)
        if status == _PASSING:
            weight = passing_weight
        elif status == _WARNING and not passing_only:
            weight = warning_weight
        else:
            continue
        if weight <= 0:
            continue
        host = str(service.get("Address") or "") or str(node.get("Address") or "")
        port = _int_field(service.get("Port"), 0)
        if not host or not 1 <= port <= 65535:
            logger.debug("Consul instance %r has no usable address or port; skipped", service.get("ID"))
            continue
        raw_tags = service.get("Tags")
        endpoint_tags = tuple(str(t) for t in raw_tags) if isinstance(raw_tags, list) else ()
        if any(tag not in endpoint_tags for tag in required):
            continue
        raw_meta = service.get("Meta")
        meta = MappingProxyType({str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {})
        zone = str(node.get("Datacenter") or "") or None
        found.append(Endpoint(host, port, weight=weight, zone=zone, tags=endpoint_tags, meta=meta))
    return tuple(found)


def _payload_key(endpoints: tuple[Endpoint, ...]) -> frozenset[tuple[Any, ...]]:
    """What "the same answer" means: the same endpoints with the same weights, tags and metadata."""
    return frozenset(
        (e.host, e.port, e.weight, e.priority, e.zone, e.tags, tuple(sorted(e.meta.items()))) for e in endpoints
    )


# --- the blocking-query loop (pure) --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pause:
    """Step: wait this long before the next query (rate limit or backoff)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Request:
    """Step: send ``GET path?params``; ``blocking`` when it carries ``index``."""

    path: str
    params: tuple[tuple[str, str], ...]
    timeout: httpx.Timeout
    blocking: bool


@dataclass(frozen=True, slots=True)
class Reply:
    """What a request gave: a response (status, lower-case headers, body) or a transport error."""

    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: Exception | None = None


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
    ) -> None:
        self.query = query
        self.agent = agent
        self.options = options
        self.service = service or query.service
        self.source = source or f"consul://{query.service}"
        self.index = 0
        self.answer: Resolution | None = None
        self._answer_key: frozenset[tuple[Any, ...]] | None = None
        self.bucket = TokenBucket(options.burst, options.refill, options.clock)
        self._not_before = -math.inf
        self._params = tuple(query.params(agent))
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
        return Request(self.query.path, params, timeout, blocking)

    def on_reply(self, reply: Reply) -> Resolution:
        """Apply a reply: the answer (the previous object when nothing changed), or raise the error."""
        if reply.error is not None:
            raise self._failed(self._transport_error(reply.error))
        status = reply.status
        if status == 200:
            try:
                endpoints = endpoints_from_health(
                    json.loads(reply.body), passing_only=self.query.passing, tags=self.query.tags
                )
            except ValueError as exc:  # JSONDecodeError is a ValueError
                raise self._failed(self._error(f"Consul answered with an unreadable body: {exc}")) from None
            if not endpoints and reply.headers.get("x-consul-results-filtered-by-acls", "").lower() == "true":
                raise self._failed(self._acl_error(filtered=True))
            self._observe(reply.headers)
            self._advance(reply.headers.get("x-consul-index"))
            return self._succeeded(endpoints)
        if status == 404:  # no such service (or endpoint) on this agent: an empty answer, not an error
            self._advance(None)
            return self._succeeded(())
        if status == 403:
            raise self._failed(self._acl_error(body=_text(reply.body)))
        if status in (429, 503):
            what = "rate limiting requests (429)" if status == 429 else "unavailable (503)"
            raise self._failed(self._error(f"Consul is {what}: {_text(reply.body) or 'no detail'}; backing off"))
        detail = _text(reply.body) or "no detail"
        raise self._failed(self._error(f"Consul answered HTTP {status} for {self.query.path}: {detail}"))

    # -- internals

    def _succeeded(self, endpoints: tuple[Endpoint, ...]) -> Resolution:
        if self.failures:
            logger.info("Consul answers again for service %s after %d failed queries", self.service, self.failures)
        self.failures = 0
        self._not_before = -math.inf
        key = _payload_key(endpoints)
        if self.answer is not None and key == self._answer_key:
            self.unchanged += 1
            logger.debug("Consul answer for service %s unchanged (index %d)", self.service, self.index)
            return self.answer
        self._answer_key = key
        self.answer = Resolution(endpoints, ttl=None, watch=True)
        return self.answer

    def _advance(self, raw_index: str | None) -> None:
        """Consul's two index rules: reset to 0 when it goes backwards, else keep it >= 1."""
        index: int | None = None
        if raw_index is not None and raw_index.strip().isdigit():
            index = int(raw_index)
        if index is None:
            self.index = 0  # no index to block on: the next query is a plain one (rate limited)
        elif index < self.index:
            self.resets += 1
            logger.info(
                "Consul index for service %s went backwards (%d -> %d): restarting the blocking loop",
                self.service,
                self.index,
                index,
            )
            self.index = 0
        else:
            self.index = max(index, 1)

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
        self.last_contact = int(contact) / 1000 if contact is not None and contact.isdigit() else None

    def _failed(self, error: DiscoveryError) -> DiscoveryError:
        self.failures += 1
        options = self.options
        backoff = min(options.backoff_cap, options.backoff_base * 2.0 ** (self.failures - 1))
        self._not_before = options.clock() + backoff * (0.5 + 0.5 * options.random())
        return error

    def _error(self, message: str) -> DiscoveryError:
        return DiscoveryError(_redact(message, self.agent.secrets()), service=self.service, source=self.source)

    def _transport_error(self, exc: Exception) -> DiscoveryError:
        where = f"Consul agent at {self.agent.address}"
        if isinstance(exc, httpx.TimeoutException):
            return self._error(f"{where} did not answer in time ({type(exc).__name__}: {exc})")
        return self._error(f"{where} unreachable: {type(exc).__name__}: {exc}")

    def _acl_error(self, *, body: str = "", filtered: bool = False) -> ConsulACLError:
        agent = self.agent
        which = f"the ACL token from {agent.token_origin}" if agent.token else "the agent's default ACL token"
        hint = (
            "check CONSUL_HTTP_TOKEN / CONSUL_HTTP_TOKEN_FILE"
            if agent.token
            else "no CONSUL_HTTP_TOKEN is set, so the agent's default token was used"
        )
        if filtered:
            message = (
                f"Consul filtered every instance of service {self.query.service!r} out of the answer: "
                f"{which} lacks node:read/service:read on it (X-Consul-Results-Filtered-By-ACLs); {hint}"
            )
        elif body.startswith("ACL not found"):
            message = (
                f"Consul rejected {which} (403 ACL not found: the token does not exist or has expired) "
                f"querying service {self.query.service!r}; {hint}"
            )
        else:
            message = f"Consul refused {which} (403 {body or 'Forbidden'}) for service {self.query.service!r}; {hint}"
        return ConsulACLError(_redact(message, agent.secrets()), service=self.service, source=self.source)


def _text(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


# --- the resolver (I/O) --------------------------------------------------------------------------------------

#: A resolve written once as a generator of steps (pause, request), driven with blocking calls by
#: :meth:`ConsulResolver.resolve` and with ``await`` by :meth:`ConsulResolver.aresolve`.
_Plan = Generator[Pause | Request, Reply | None, Resolution]


class _Closed(Exception):
    """The resolver was closed while a resolve was in progress."""


class ConsulResolver:
    """``consul://service``: the healthy instances of a Consul service, watched with blocking queries.

    Owns an ``httpx.Client`` (for :meth:`resolve`) and an ``httpx.AsyncClient`` (for :meth:`aresolve`),
    each created on first use. One resolve at a time (the refresh loop's); :meth:`close` from any thread.
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
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: set[Any] = set()
        self._sync_client: httpx.Client | None = None
        self._async_client: httpx.AsyncClient | None = None
        headers = {"Accept": "application/json"}
        if agent.token:
            headers["X-Consul-Token"] = agent.token
        self._headers = headers
        self._extensions: dict[str, Any] = {}
        if agent.server_name:
            self._extensions["sni_hostname"] = agent.server_name

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
                    step = plan.send(self._send(step))
        except StopIteration as done:
            resolution: Resolution = done.value
            return resolution
        except _Closed:
            return self._after_close()
        finally:
            plan.close()

    async def aresolve(self) -> Resolution:
        """Same as :meth:`resolve` on the event loop; cancelling the task ends a query at once."""
        self._check_open()
        plan = self._plan()
        try:
            step = next(plan)
            while True:
                if isinstance(step, Pause):
                    await asyncio.sleep(step.seconds)
                    if self._closed.is_set():
                        raise _Closed
                    step = plan.send(None)
                else:
                    step = plan.send(await self._asend(step))
        except StopIteration as done:
            resolution: Resolution = done.value
            return resolution
        except _Closed:
            return self._after_close()
        finally:
            plan.close()

    def close(self) -> None:
        """Stop: interrupt a query in flight (from any thread), close the HTTP clients. Idempotent."""
        self._closed.set()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
            client, self._sync_client = self._sync_client, None
            # Never keeps a connection between queries, and a query in flight ends with its socket below:
            # nothing is left that would need an ``await aclose()``.
            self._async_client = None
        for sock in sockets:
            _shutdown(sock)
        if client is not None:
            client.close()

    # -- I/O

    def _check_open(self) -> None:
        # Raising (rather than answering) makes a refresh loop that was not stopped back off, not spin.
        if self._closed.is_set():
            raise DiscoveryError("the Consul resolver is closed", service=self.service, source=self.source)

    def _after_close(self) -> Resolution:
        """A resolve interrupted by :meth:`close`: the last answer, so the refresh loop sees no change and ends."""
        if self.watch.answer is not None:
            return self.watch.answer
        raise DiscoveryError("the Consul resolver was closed", service=self.service, source=self.source)

    def _client_options(self) -> dict[str, Any]:
        """What both HTTP clients to the agent share: its address, TLS, auth, no keep-alive, no proxies."""
        return {
            "verify": self.agent.tls or True,
            "uds": self.agent.uds,
            "limits": httpx.Limits(max_keepalive_connections=0),
        }

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._closed.is_set():
                raise _Closed
            if self._sync_client is None:
                self._sync_client = httpx.Client(
                    base_url=self.agent.base_url,
                    transport=httpx.HTTPTransport(**self._client_options()),
                    auth=self.agent.auth,
                    trust_env=False,
                )
            return self._sync_client

    def _aclient(self) -> httpx.AsyncClient:
        with self._lock:
            if self._closed.is_set():
                raise _Closed
            if self._async_client is None:
                self._async_client = httpx.AsyncClient(
                    base_url=self.agent.base_url,
                    transport=httpx.AsyncHTTPTransport(**self._client_options()),
                    auth=self.agent.auth,
                    trust_env=False,
                )
            return self._async_client

    def _track(self, stream: Any, mine: list[Any]) -> None:
        """Remember a query's socket so :meth:`close` can shut it down (and do it now if already closed)."""
        sock = stream.get_extra_info("socket") if hasattr(stream, "get_extra_info") else None
        if sock is None:
            return
        with self._lock:
            closed = self._closed.is_set()
            if not closed:
                self._sockets.add(sock)
                mine.append(sock)
        if closed:
            _shutdown(sock)

    def _untrack(self, mine: list[Any]) -> None:
        with self._lock:
            self._sockets.difference_update(mine)

    def _send(self, request: Request) -> Reply:
        client = self._client()
        mine: list[Any] = []

        def trace(event: str, info: Mapping[str, Any]) -> None:
            if event in _CONNECTED:
                self._track(info.get("return_value"), mine)

        try:
            response = client.get(
                request.path,
                params=request.params,
                headers=self._headers,
                timeout=request.timeout,
                extensions={**self._extensions, "trace": trace},
            )
        except Exception as exc:  # httpx errors, and whatever a pool closed under our feet raises
            if self._closed.is_set():
                raise _Closed from None
            if not isinstance(exc, httpx.HTTPError):
                raise
            return Reply(error=exc)
        finally:
            self._untrack(mine)
        return Reply(response.status_code, _lower(response.headers), response.content)

    async def _asend(self, request: Request) -> Reply:
        client = self._aclient()
        mine: list[Any] = []

        async def trace(event: str, info: Mapping[str, Any]) -> None:
            if event in _CONNECTED:
                self._track(info.get("return_value"), mine)

        try:
            response = await client.get(
                request.path,
                params=request.params,
                headers=self._headers,
                timeout=request.timeout,
                extensions={**self._extensions, "trace": trace},
            )
        except Exception as exc:
            if self._closed.is_set():
                raise _Closed from None
            if not isinstance(exc, httpx.HTTPError):
                raise
            return Reply(error=exc)
        finally:
            self._untrack(mine)
        return Reply(response.status_code, _lower(response.headers), response.content)


def _lower(headers: httpx.Headers) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def _shutdown(sock: Any) -> None:
    """Wake whoever is blocked reading ``sock`` (shutdown does, close does not), ignoring a dead socket."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        sock.shutdown(socket.SHUT_RDWR)
