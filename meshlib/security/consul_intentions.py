"""Consul intentions for the inbound half: who may call this service, decided as Consul Connect Native does.

:class:`IntentionsAuthorizer` answers "may the caller with this SPIFFE ID make this request?" for one
destination service (``MESHLIB_CONSUL_SERVICE``), from the local Consul agent. User documentation:
``docs/consul-intentions.md``; the inbound hook is :class:`meshlib.server.consul_intentions.ConsulIntentionsHook`.

What Consul's own native integration does, and what this module does (hashicorp/consul, read for this):

* The Go ``connect`` package (``connect/tls.go``, the server-side verifier) asks the agent
  ``POST /v1/agent/connect/authorize`` on *every* TLS handshake and keeps no cache of its own; an error from
  the agent fails the handshake (closed). The caching is the agent's: ``agent/connect_auth.go``
  (``Agent.ConnectAuthorize``) reads the destination's intentions through the agent cache type
  ``intention-match`` (``agent/cache-types/intention_match.go``), registered with ``Refresh: true``,
  ``RefreshTimer: 0`` and ``QueryTimeout: 10m``: a background blocking query on ``Intention.Match`` keeps the
  entry current, so a change is seen within one blocking-query round trip; there is no time-to-live on a
  decision while the agent is connected. ``ConnectAuthorize`` takes the first matching intention in
  precedence order; an intention with ``Permissions`` (L7) makes it answer *deny* ("Matched L7 intention"),
  and no match answers the ACL default (``IntentionDefaultAllow``; allow when ACLs are disabled).
* Here, mirroring the agent's cache one level up: decisions are cached per caller SPIFFE ID in a bounded
  LRU (``cache_size``), tagged with a *generation*; a watch thread holds the same blocking query over HTTP
  (``GET /v1/connect/intentions/match?by=destination&name=<service>``) and bumps the generation whenever the
  answer changes, which invalidates every cached decision at once. A change therefore takes effect within one
  blocking-query round trip (plus the next request), as in the agent; a decision computed while a change
  landed is tagged with the old generation and never served.
* Agent down (the watch fails: unreachable, 5xx, ACL refusal, unparseable answer): cached decisions keep
  being served for ``stale_for`` seconds from the first failure, then none is (every request then needs a
  fresh answer from the agent, and an agent that does not answer means deny). Never fail open: a caller
  without a verified Consul service identity, a failed ``authorize`` call, or no decision is a deny.
* L7 (``protocol`` ``http``, ``http2`` or ``grpc``): ``authorize`` is L4 only, so the intentions from the
  watch are evaluated here by :class:`Intentions` (first matching source in Consul's precedence order, as the
  match endpoint returns them; then its ``Permissions`` in order, first match wins; no permission matching
  gives ``l7_default_allow``, deny by default: the agent API does not expose the ACL default policy). A
  caller no intention matches gets the agent's ``authorize`` answer, which for such a caller *is* the
  default. meshlib's Istio engine (:mod:`meshlib.security.authz`) cannot express this: its DENY policies
  override every ALLOW whatever the precedence, and it has no regex path or header matches; so this module
  carries the smallest evaluator instead.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from meshlib.discovery.consul.agent import AgentClient, ConsulAgent, Request, _Closed, _redact, acl_error
from meshlib.errors import ConfigError, SourceError

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_STALE_FOR",
    "L7_PROTOCOLS",
    "ConsulCaller",
    "HeaderMatch",
    "IntentionDecision",
    "Intentions",
    "IntentionsAuthorizer",
    "IntentionsError",
    "Permission",
    "SourceIntention",
    "parse_intentions",
]

logger = logging.getLogger("meshlib.security")

#: Callers whose decisions are remembered (least recently used evicted first).
DEFAULT_CACHE_SIZE = 1024
#: How long cached decisions outlive the agent (seconds from the watch's first failure); then fail closed.
DEFAULT_STALE_FOR = 60.0
#: Service protocols for which L7 intentions are evaluated (Consul's ``service-defaults`` ``Protocol``).
L7_PROTOCOLS = frozenset({"http", "http2", "grpc"})
_PROTOCOLS = L7_PROTOCOLS | {"tcp"}

_MAX_INTENTIONS = 4096
_MAX_PERMISSIONS = 512
_MAX_HEADERS = 64
_MAX_REGEX = 1024
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class IntentionsError(SourceError):
    """An intentions answer from Consul (``/v1/connect/intentions/match``) meshlib cannot enforce as Consul
    would: names the intention, the field path, the value found and what was expected. The watch keeps its
    last good intentions (for ``stale_for``) and logs it; it never enforces less than the intention says."""


# -- callers ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsulCaller:
    """A Consul service identity: ``spiffe://<td>[/ap/<partition>]/ns/<ns>/dc/<dc>/svc/<service>``."""

    uri: str
    service: str
    namespace: str
    partition: str
    datacenter: str

    @classmethod
    def parse(cls, uri: str) -> ConsulCaller | None:
        """The identity in ``uri``, or ``None`` when it is not a Consul service SPIFFE ID (an agent, a mesh
        gateway, another mesh's workload): such callers are denied, as ``authorize`` refuses them."""
        if not uri.startswith("spiffe://"):
            return None
        _, _, path = uri[len("spiffe://") :].partition("/")
        parts = path.split("/")
        partition = "default"
        if len(parts) == 8 and parts[0] == "ap":
            partition, parts = parts[1], parts[2:]
        if len(parts) != 6 or (parts[0], parts[2], parts[4]) != ("ns", "dc", "svc"):
            return None
        if not all(_SEGMENT.fullmatch(part) for part in (partition, parts[1], parts[3], parts[5])):
            return None
        return cls(uri, parts[5], parts[1], partition, parts[3])


# -- intentions and their evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One ``Permissions[].HTTP.Header[]`` condition (Envoy's header matcher): exactly one of ``present``,
    ``exact``, ``prefix``, ``suffix``, ``contains``, ``regex``; ``invert`` negates it; ``ignore_case`` for
    the string forms."""

    name: str
    present: bool = False
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    contains: str | None = None
    regex: re.Pattern[str] | None = None
    invert: bool = False
    ignore_case: bool = False

    def matches(self, value: str | None) -> bool:
        if value is None:
            found = False
        elif self.present:
            found = True
        elif self.regex is not None:
            found = self.regex.fullmatch(value) is not None
        else:
            subject = value.lower() if self.ignore_case else value
            if self.exact is not None:
                found = subject == self.exact
            elif self.prefix is not None:
                found = subject.startswith(self.prefix)
            elif self.suffix is not None:
                found = subject.endswith(self.suffix)
            else:
                found = self.contains is not None and self.contains in subject
        return found != self.invert


@dataclass(frozen=True, slots=True)
class Permission:
    """One L7 permission: its action and its HTTP match (every given condition must hold)."""

    allow: bool
    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: frozenset[str] | None = None
    headers: tuple[HeaderMatch, ...] = ()

    def matches(self, method: str, path: str, header: Callable[[str], str | None]) -> bool:
        if self.path_exact is not None and path != self.path_exact:
            return False
        if self.path_prefix is not None and not path.startswith(self.path_prefix):
            return False
        if self.path_regex is not None and self.path_regex.fullmatch(path) is None:
            return False
        if self.methods is not None and method.upper() not in self.methods:
            return False
        return all(match.matches(header(match.name)) for match in self.headers)


@dataclass(frozen=True, slots=True)
class SourceIntention:
    """One source of an intention to this service: who it matches (``*`` is a wildcard) and what it decides:
    ``allow`` for an L4 intention, ``permissions`` (in order) for an L7 one. ``label`` names it in spans,
    metrics and logs (``web => api``)."""

    name: str
    namespace: str
    partition: str
    label: str
    allow: bool = False
    permissions: tuple[Permission, ...] = ()
    #: peered, sameness-group or non-Consul sources never match a local Consul identity
    local: bool = True

    def matches(self, caller: ConsulCaller) -> bool:
        return (
            self.local
            and self.name in ("*", caller.service)
            and self.namespace in ("*", caller.namespace)
            and self.partition in ("*", caller.partition)
        )


@dataclass(frozen=True, slots=True)
class Intentions:
    """The intentions to one destination, highest precedence first (the order the match endpoint returns)."""

    sources: tuple[SourceIntention, ...] = ()

    def match(self, caller: ConsulCaller) -> SourceIntention | None:
        """The first intention (by precedence) whose source is ``caller``, else ``None``."""
        for source in self.sources:
            if source.matches(caller):
                return source
        return None


def _fail(source: str, label: str, path: str, value: object, expected: str) -> Any:
    raise IntentionsError(source, label, path, value, expected)


def _text(source: str, label: str, path: str, value: object, *, lower: bool = False) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_REGEX:
        _fail(source, label, path, value, f"a non-empty string of at most {_MAX_REGEX} characters")
    assert isinstance(value, str)
    return value.lower() if lower else value


def _regex(source: str, label: str, path: str, value: object) -> re.Pattern[str]:
    text = _text(source, label, path, value)
    try:
        return re.compile(text)
    except re.error as exc:
        return _fail(source, label, path, text, f"a regular expression ({exc})")  # type: ignore[no-any-return]


_HEADER_FIELDS = {"Name", "Present", "Exact", "Prefix", "Suffix", "Contains", "Regex", "Invert", "IgnoreCase"}
_HTTP_FIELDS = {"PathExact", "PathPrefix", "PathRegex", "Methods", "Header"}


def _header(source: str, label: str, path: str, raw: object) -> HeaderMatch:
    if not isinstance(raw, Mapping):
        return _fail(source, label, path, raw, "an object")  # type: ignore[no-any-return]
    unknown = set(raw) - _HEADER_FIELDS
    if unknown:
        _fail(source, label, f"{path}.{sorted(unknown)[0]}", sorted(unknown), f"fields among {sorted(_HEADER_FIELDS)}")
    kinds = [key for key in ("Exact", "Prefix", "Suffix", "Contains", "Regex") if raw.get(key)]
    present = bool(raw.get("Present"))
    if len(kinds) + present != 1:
        _fail(source, label, path, dict(raw), "exactly one of Present, Exact, Prefix, Suffix, Contains, Regex")
    ignore_case = bool(raw.get("IgnoreCase"))

    def value(key: str) -> str | None:
        return _text(source, label, f"{path}.{key}", raw[key], lower=ignore_case) if raw.get(key) else None

    return HeaderMatch(
        name=_text(source, label, f"{path}.Name", raw.get("Name"), lower=True),
        present=present,
        exact=value("Exact"),
        prefix=value("Prefix"),
        suffix=value("Suffix"),
        contains=value("Contains"),
        regex=_regex(source, label, f"{path}.Regex", raw["Regex"]) if raw.get("Regex") else None,
        invert=bool(raw.get("Invert")),
        ignore_case=ignore_case,
    )


def _permission(source: str, label: str, path: str, raw: object) -> Permission:
    if not isinstance(raw, Mapping):
        return _fail(source, label, path, raw, "an object")  # type: ignore[no-any-return]
    unknown = set(raw) - {"Action", "HTTP"}
    if unknown:  # JWT (Consul 1.16+) and anything newer: refused, never ignored
        _fail(source, label, f"{path}.{sorted(unknown)[0]}", sorted(unknown), "Action and HTTP only")
    action = raw.get("Action")
    if action not in ("allow", "deny"):
        _fail(source, label, f"{path}.Action", action, "allow or deny")
    http = raw.get("HTTP")
    if not isinstance(http, Mapping) or not http:
        return _fail(source, label, f"{path}.HTTP", http, "an HTTP match object")  # type: ignore[no-any-return]
    unknown = set(http) - _HTTP_FIELDS
    if unknown:
        _fail(source, label, f"{path}.HTTP.{sorted(unknown)[0]}", sorted(unknown), f"among {sorted(_HTTP_FIELDS)}")
    if sum(bool(http.get(key)) for key in ("PathExact", "PathPrefix", "PathRegex")) > 1:
        _fail(source, label, f"{path}.HTTP", dict(http), "at most one of PathExact, PathPrefix, PathRegex")
    methods = http.get("Methods")
    if methods is not None and (not isinstance(methods, list) or not all(isinstance(m, str) for m in methods)):
        _fail(source, label, f"{path}.HTTP.Methods", methods, "a list of HTTP methods")
    headers = http.get("Header") or []
    if not isinstance(headers, list) or len(headers) > _MAX_HEADERS:
        _fail(source, label, f"{path}.HTTP.Header", headers, f"a list of at most {_MAX_HEADERS} header matches")
    return Permission(
        allow=action == "allow",
        path_exact=_text(source, label, f"{path}.HTTP.PathExact", http["PathExact"]) if http.get("PathExact") else None,
        path_prefix=(
            _text(source, label, f"{path}.HTTP.PathPrefix", http["PathPrefix"]) if http.get("PathPrefix") else None
        ),
        path_regex=_regex(source, label, f"{path}.HTTP.PathRegex", http["PathRegex"])
        if http.get("PathRegex")
        else None,
        methods=frozenset(m.upper() for m in methods) if methods else None,
        headers=tuple(_header(source, label, f"{path}.HTTP.Header[{i}]", h) for i, h in enumerate(headers)),
    )


def parse_intentions(data: bytes | str, *, service: str, source: str) -> Intentions:
    """The intentions to ``service`` from a ``/v1/connect/intentions/match?by=destination`` answer
    (``{"<service>": [intention, ...]}``, highest precedence first). Raises :class:`IntentionsError`."""
    try:
        body = json.loads(data)
    except ValueError as exc:
        return _fail(source, "", "", str(data)[:100], f"JSON ({exc})")  # type: ignore[no-any-return]
    if not isinstance(body, Mapping):
        return _fail(source, "", "", body, "an object keyed by service name")  # type: ignore[no-any-return]
    items = body.get(service) or []
    if not isinstance(items, list) or len(items) > _MAX_INTENTIONS:
        _fail(source, "", service, type(items).__name__, f"a list of at most {_MAX_INTENTIONS} intentions")
    sources: list[SourceIntention] = []
    for index, raw in enumerate(items):
        label = f"intention {index}"
        if not isinstance(raw, Mapping):
            _fail(source, label, "", raw, "an intention object")
        name = _text(source, label, "SourceName", raw.get("SourceName"))
        label = f"intention {name} => {service}"
        permissions = raw.get("Permissions") or []
        if not isinstance(permissions, list) or len(permissions) > _MAX_PERMISSIONS:
            _fail(source, label, "Permissions", permissions, f"a list of at most {_MAX_PERMISSIONS} permissions")
        action = raw.get("Action") or ""
        if not permissions and action not in ("allow", "deny"):
            _fail(source, label, "Action", action, "allow or deny (or Permissions)")
        source_type = raw.get("SourceType") or "consul"
        sources.append(
            SourceIntention(
                name=name,
                namespace=str(raw.get("SourceNS") or "default"),
                partition=str(raw.get("SourcePartition") or "default"),
                label=f"{name} => {service}",
                allow=action == "allow",
                permissions=tuple(
                    _permission(source, label, f"Permissions[{i}]", p) for i, p in enumerate(permissions)
                ),
                local=source_type == "consul" and not raw.get("SourcePeer") and not raw.get("SamenessGroup"),
            )
        )
    return Intentions(tuple(sources))


# -- decisions ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntentionDecision:
    """One decision: ``allowed``, the ``intention`` that decided (``web => api``; ``None`` for the ACL default
    or a failure) and a ``reason`` for logs (never sent to the caller)."""

    allowed: bool
    reason: str
    intention: str | None = None


_NO_IDENTITY = IntentionDecision(False, "no verified Consul service identity (mTLS client certificate)")


@dataclass(slots=True)
class _Entry:
    generation: int
    decision: IntentionDecision | None  # None: evaluate ``intention``'s permissions per request
    intention: SourceIntention | None = None


@dataclass(slots=True)
class _State:
    generation: int = 0
    intentions: Intentions | None = None
    healthy: bool = False
    down_since: float | None = None
    index: int = 0
    error: str = ""
    answers: int = 0


class IntentionsAuthorizer:
    """Decides inbound callers for ``service`` from Consul intentions; see the module docstring.

    ``agent``: the local agent (:meth:`ConsulAgent.from_env`). ``protocol``: ``tcp`` (L4: every decision from
    ``authorize``) or ``http``/``http2``/``grpc`` (L7 intentions evaluated here). ``cache_size``: callers
    remembered. ``stale_for``: seconds cached decisions outlive an unreachable agent (``0``: none). ``wait``:
    the blocking query's ``wait``. ``l7_default_allow``: the decision when an L7 intention matches the caller but
    none of its permissions matches the request (Consul applies the ACL default policy there; deny unless you
    say your cluster's default is allow). ``clock``: monotonic seconds (tests). Thread-safe; :meth:`start`
    runs the watch thread, :meth:`close` ends it.
    """

    def __init__(
        self,
        service: str,
        agent: ConsulAgent,
        *,
        protocol: str = "tcp",
        cache_size: int = DEFAULT_CACHE_SIZE,
        stale_for: float = DEFAULT_STALE_FOR,
        wait: float = 300.0,
        l7_default_allow: bool = False,
        request_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(service, str) or not _SEGMENT.fullmatch(service):
            raise ConfigError("MESHLIB_CONSUL_SERVICE", service, "a Consul service name (letters, digits, . _ -)")
        if protocol not in _PROTOCOLS:
            raise ConfigError("protocol", protocol, f"one of {sorted(_PROTOCOLS)}")
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ConfigError("cache_size", cache_size, "an integer >= 1")
        for name, value in (("stale_for", stale_for), ("wait", wait), ("request_timeout", request_timeout)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(name, value, "a finite number of seconds >= 0")
        self.service = service
        self.agent = agent
        self.l7 = protocol in L7_PROTOCOLS
        self.stale_for = float(stale_for)
        self.wait = max(1.0, min(float(wait), 600.0))
        self.l7_default_allow = l7_default_allow
        self._clock = clock
        self._cache_size = cache_size
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._state = _State()
        self._closed = threading.Event()
        self._watch_client = AgentClient(agent, self._closed)
        headers = {"Accept": "application/json"}
        if agent.token:
            headers["X-Consul-Token"] = agent.token
        self._extensions: dict[str, Any] = {"sni_hostname": agent.server_name} if agent.server_name else {}
        self._http = httpx.Client(
            base_url=agent.base_url,
            transport=httpx.HTTPTransport(verify=agent.tls or True, uds=agent.uds),
            auth=agent.auth,
            headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=min(request_timeout, 2.0)),
            trust_env=False,
        )
        self._thread: threading.Thread | None = None
        self._last_logged = ""

    # -- lifecycle

    def start(self) -> IntentionsAuthorizer:
        """Start the watch thread (idempotent); returns ``self``."""
        with self._lock:
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(
                    target=self._watch, name=f"meshlib-consul-intentions-{self.service}", daemon=True
                )
                self._thread.start()
        return self

    def ready(self, timeout: float = 10.0) -> bool:
        """Wait for the watch's first answer or first failure; ``True`` when intentions were read."""
        self.wait_until(lambda a: a._state.answers > 0 or a._state.down_since is not None, timeout)
        return self.healthy

    def close(self) -> None:
        """End the watch (interrupting its blocking query) and close the agent clients. Idempotent."""
        self._watch_client.close()  # sets _closed
        with self._changed:
            self._changed.notify_all()
        self._http.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    # -- observation (tests, health endpoints)

    @property
    def generation(self) -> int:
        """Bumped each time the intentions to the service change (every cached decision is then dropped)."""
        with self._lock:
            return self._state.generation

    @property
    def healthy(self) -> bool:
        """Whether the watch's last query succeeded."""
        with self._lock:
            return self._state.healthy

    def wait_until(self, predicate: Callable[[IntentionsAuthorizer], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(self)`` holds after a watch answer or failure (a synchronisation point for
        tests and readiness checks); ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                self._changed.release()
                try:
                    if predicate(self):
                        return True
                finally:
                    self._changed.acquire()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    return False
                self._changed.wait(remaining)

    # -- deciding

    def decide(
        self,
        caller_uri: str | None,
        method: str = "GET",
        path: str = "/",
        header: Callable[[str], str | None] = lambda name: None,
        serial: Callable[[], str | None] = lambda: None,
    ) -> IntentionDecision:
        """The decision for one request from ``caller_uri`` (its verified SPIFFE ID, or ``None``).

        ``header(name)`` returns a request header (lower-case name) for L7 header permissions; ``serial()``
        the client certificate's serial for ``authorize`` (only called on a cache miss).
        """
        caller = ConsulCaller.parse(caller_uri) if caller_uri else None
        if caller is None:
            return _NO_IDENTITY
        now = self._clock()
        with self._lock:
            state = self._state
            generation = state.generation
            fresh = state.healthy or (state.down_since is not None and now - state.down_since <= self.stale_for)
            entry = self._cache.get(caller.uri) if fresh else None
            if entry is not None and entry.generation == generation:
                self._cache.move_to_end(caller.uri)
            else:
                entry = None
            intentions = state.intentions if fresh else None
        if entry is None:
            if self.l7 and intentions is not None:
                matched = intentions.match(caller)
                if matched is not None:
                    entry = _Entry(generation, None if matched.permissions else _l4(matched), matched)
            if entry is None:
                decision = self._authorize(caller, serial)
                if decision is None:
                    return IntentionDecision(False, "the Consul agent did not answer authorize: failing closed")
                entry = _Entry(generation, decision)
            if fresh:
                self._remember(caller.uri, entry)
        if entry.decision is not None:
            return entry.decision
        assert entry.intention is not None
        for permission in entry.intention.permissions:
            if permission.matches(method, path, header):
                verb = "allowed" if permission.allow else "denied"
                return IntentionDecision(permission.allow, f"{verb} by L7 intention", entry.intention.label)
        return IntentionDecision(
            self.l7_default_allow, "no permission of the L7 intention matched: default", entry.intention.label
        )

    def _remember(self, uri: str, entry: _Entry) -> None:
        with self._lock:
            if entry.generation != self._state.generation:
                return  # the intentions changed while this was decided: never serve it
            self._cache[uri] = entry
            self._cache.move_to_end(uri)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _authorize(self, caller: ConsulCaller, serial: Callable[[], str | None]) -> IntentionDecision | None:
        """``POST /v1/agent/connect/authorize`` for ``caller``; ``None`` when the agent gave no decision."""
        body: dict[str, str] = {"Target": self.service, "ClientCertURI": caller.uri}
        number = serial()
        if number:
            body["ClientCertSerial"] = number
        params = self._scope()
        try:
            response = self._http.post(
                "/v1/agent/connect/authorize", json=body, params=params, extensions=self._extensions
            )
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: closed client
            self._log("authorize", f"the Consul agent at {self.agent.address} is unreachable ({type(exc).__name__})")
            return None
        if response.status_code == 403:
            error = acl_error(
                self.agent,
                self.service,
                service=self.service,
                source="consul intentions",
                body=response.text[:200],
            )
            self._log("authorize", f"{error} (authorize needs service:write on {self.service!r})")
            return None
        if response.status_code != 200:
            text = _redact(response.text[:200], self.agent.secrets())
            self._log("authorize", f"authorize answered {response.status_code}: {text}")
            return None
        try:
            answer = response.json()
            allowed, reason = answer["Authorized"], answer.get("Reason", "")
        except (ValueError, KeyError, TypeError):
            self._log("authorize", "authorize answered something other than {Authorized, Reason}")
            return None
        if not isinstance(allowed, bool):
            return None
        return IntentionDecision(allowed, str(reason)[:300] or ("allowed" if allowed else "denied"))

    def _scope(self) -> list[tuple[str, str | int | float | bool | None]]:
        params: list[tuple[str, str | int | float | bool | None]] = []
        if self.agent.namespace:
            params.append(("ns", self.agent.namespace))
        if self.agent.partition:
            params.append(("partition", self.agent.partition))
        return params

    def _log(self, what: str, message: str) -> None:
        if message != self._last_logged:  # one line per distinct problem, not one per request
            self._last_logged = message
            logger.error("consul intentions for %s, %s: %s", self.service, what, message)

    # -- the watch

    def _watch(self) -> None:
        failures = 0
        path = "/v1/connect/intentions/match"
        while not self._closed.is_set():
            with self._lock:
                index = self._state.index
            params = [("by", "destination"), ("name", self.service), *((k, str(v)) for k, v in self._scope())]
            if index:
                params += [("index", str(index)), ("wait", f"{int(self.wait)}s")]
            read = self.wait * 17 / 16 + 5.0 if index else 10.0
            request = Request(path, tuple(params), httpx.Timeout(read, connect=2.0), bool(index))
            try:
                reply = self._watch_client.send(request)
            except _Closed:
                return
            problem = ""
            intentions: Intentions | None = None
            if reply.error is not None:
                problem = f"the Consul agent at {self.agent.address} is unreachable ({type(reply.error).__name__})"
            elif reply.status == 403:
                problem = (
                    str(
                        acl_error(
                            self.agent,
                            self.service,
                            service=self.service,
                            source="consul intentions",
                            body=reply.body[:200].decode("utf-8", "replace"),
                        )
                    )
                    + f" (reading intentions needs intentions:read on {self.service!r})"
                )
            elif reply.status != 200:
                text = _redact(reply.body[:200].decode("utf-8", "replace"), self.agent.secrets())
                problem = f"{quote(path)} answered {reply.status}: {text}"
            else:
                try:
                    intentions = parse_intentions(reply.body, service=self.service, source="consul intentions match")
                except IntentionsError as exc:
                    problem = str(exc)
            if intentions is not None:
                failures = 0
                self._applied(intentions, reply.headers.get("x-consul-index", ""), index)
                continue
            failures += 1
            self._failed(problem)
            delay = min(60.0, 0.5 * 2 ** min(failures - 1, 10)) * (0.5 + random.random() / 2)
            if self._closed.wait(delay):
                return

    def _applied(self, intentions: Intentions, raw_index: str, asked: int) -> None:
        new_index = int(raw_index) if raw_index.isdigit() else 0
        with self._changed:
            state = self._state
            if state.intentions != intentions:
                state.intentions = intentions
                state.generation += 1
                self._cache.clear()
                logger.info("consul intentions for %s: %d source(s) now apply", self.service, len(intentions.sources))
            elif not state.healthy and state.down_since is not None:
                # back after an outage: decisions cached before it may predate changes the answer cannot show
                state.generation += 1
                self._cache.clear()
            # Consul's blocking rules: an index that goes backwards (snapshot restore) restarts from 0
            state.index = max(1, new_index) if new_index >= asked and new_index > 0 else 0
            state.healthy = True
            state.down_since = None
            state.answers += 1
            self._changed.notify_all()
        self._last_logged = ""

    def _failed(self, problem: str) -> None:
        with self._changed:
            state = self._state
            if state.healthy or state.down_since is None:
                state.down_since = self._clock()
            state.healthy = False
            state.index = 0  # the next query after an error is a plain one: a recovery is seen at once
            state.error = problem
            self._changed.notify_all()
        self._log("watch", problem)


def _l4(intention: SourceIntention) -> IntentionDecision:
    verb = "allowed" if intention.allow else "denied"
    return IntentionDecision(intention.allow, f"{verb} by L4 intention", intention.label)
