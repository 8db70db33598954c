"""The compiled route table: what the request path reads to route one call (Gateway API HTTPRoute semantics).

Everything here is immutable and built once when a routes source loads (:mod:`meshlib.routing.gateway_api`
turns HTTPRoute documents into it; the xDS and Consul sources will too). The request path only reads it:

1. :meth:`RouteTable.lookup` -- the routes attached to the called service (and port), or ``None`` when no
   route is attached: the call then goes to the service itself, as if there were no routes (GAMMA);
2. :meth:`HostRoutes.select` -- the first entry, in Gateway API precedence order, whose match the request
   meets: its :class:`Rule`; ``None`` means no rule matched and the call is answered 404 (GAMMA: "requests
   that do not match at least one of the Routes will be rejected");
3. :meth:`Rule.pick` -- the weighted backend, drawn from the call's random number generator.

A table is swapped whole (one attribute assignment), so a call routes on exactly one version of it, and keeps
the :class:`Rule` it matched (its filters and policy) until it ends, whatever is loaded meanwhile.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

from meshlib.policy import NO_POLICY, Policy

if TYPE_CHECKING:
    import random

__all__ = [
    "Backend",
    "Fault",
    "Filters",
    "HeaderMatch",
    "HeaderModifier",
    "HostRoutes",
    "Mirror",
    "PathMatch",
    "PathModifier",
    "QueryMatch",
    "QueryString",
    "Redirect",
    "RouteMatch",
    "RouteTable",
    "Rule",
    "URLRewrite",
    "first_query_values",
]

PathKind = Literal["Exact", "PathPrefix", "RegularExpression"]
ValueKind = Literal["Exact", "RegularExpression"]


# -- matches ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathMatch:
    """``matches[].path``: ``Exact``, ``PathPrefix`` (whole segments: ``/foo`` matches ``/foo/bar``, not
    ``/foobar``; a trailing ``/`` in the value is ignored) or ``RegularExpression`` (a full match, as Envoy's
    ``safe_regex``). Compared with the request's path as sent, before any percent-decoding (Envoy's default)."""

    kind: PathKind
    value: str
    regex: re.Pattern[str] | None = None

    def test(self, path: str) -> bool:
        """Whether ``path`` (the request's raw path, no query string) meets this match."""
        kind = self.kind
        value = self.value
        if kind == "PathPrefix":
            if value == "/":
                return True
            if not path.startswith(value):
                return False
            # value carries no trailing "/" (normalised when compiled): the next character must end a segment.
            return len(path) == len(value) or path[len(value)] == "/"
        if kind == "Exact":
            return path == value
        regex = self.regex
        return regex is not None and regex.fullmatch(path) is not None


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """``matches[].headers[]``: the header's value (its values joined with ``,`` when it appears several times,
    as Envoy does) equals ``value`` or fully matches ``regex``. ``name`` is lower-case."""

    name: str
    kind: ValueKind
    value: str
    regex: re.Pattern[str] | None = None

    def test_value(self, found: str | None) -> bool:
        """Whether a request whose header value is ``found`` (``None``: absent) meets this match."""
        return _value_meets(self.kind, self.value, self.regex, found)


@dataclass(frozen=True, slots=True)
class EnvoyHeaderMatch(HeaderMatch):
    """A header (or query) condition with Envoy's semantics, as xDS routes and Consul's router give them:
    ``predicate`` tests a present value (a header's values joined with ``,``) and ``invert`` negates it; an
    absent header fails the match, inverted or not (grpc-go returns ``false`` before looking at
    ``invert_match``), except for a presence condition (``present``: the presence required, already inverted).
    ``kind`` is ``RegularExpression`` so the exact-value dispatch never keys on it."""

    predicate: Callable[[str], Any] | None = None
    invert: bool = False
    present: bool | None = None

    def test_value(self, found: str | None) -> bool:
        """Whether a request whose value is ``found`` (``None``: absent) meets this condition."""
        if self.present is not None:
            return (found is not None) is self.present
        if found is None or self.predicate is None:
            return False
        return bool(self.predicate(found)) is not self.invert


@dataclass(frozen=True, slots=True)
class QueryMatch:
    """``matches[].queryParams[]``: the first value of the parameter ``name`` (exact, case-sensitive name)
    equals ``value`` or fully matches ``regex``."""

    name: str
    kind: ValueKind
    value: str
    regex: re.Pattern[str] | None = None

    def test_value(self, found: str | None) -> bool:
        """Whether a request whose first ``name`` parameter is ``found`` (``None``: absent) meets this match."""
        return _value_meets(self.kind, self.value, self.regex, found)


def _value_meets(kind: ValueKind, value: str, regex: re.Pattern[str] | None, found: str | None) -> bool:
    """A header or query condition on the value ``found`` (``None``: absent): equal, or a full regex match."""
    if found is None:
        return False
    if kind == "Exact":
        return found == value
    return regex is not None and regex.fullmatch(found) is not None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One ``matches[]`` entry: every condition it sets must hold (AND); a rule matches if any entry does (OR)."""

    path: PathMatch = PathMatch("PathPrefix", "/")
    method: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[QueryMatch, ...] = ()

    def test(self, method: str, path: str, headers: Any, query: Mapping[str, str] | None) -> bool:
        """Whether a request meets this match. ``headers``: the request's headers (httpx/httpx2 ``Headers``);
        ``query``: the first value of each query parameter (only read when the match has query conditions)."""
        if self.method is not None and method != self.method:
            return False
        if not self.path.test(path):
            return False
        for header in self.headers:
            if not header.test_value(_header_value(headers, header.name)):
                return False
        if self.query:
            params = query or {}
            for param in self.query:
                if not param.test_value(params.get(param.name)):
                    return False
        return True


def _header_value(headers: Any, name: str) -> str | None:
    """The header's values joined with ``,`` (Envoy's view of a repeated header); ``None`` when absent.

    ``headers`` is the request's ``Headers``, or the ``dict`` :func:`header_view` made of them (what
    :meth:`HostRoutes.select` passes, so a table with many header matches reads the headers once)."""
    if type(headers) is dict:
        found: str | None = headers.get(name)
        return found
    values = headers.get_list(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else ",".join(values)


def header_view(headers: Any) -> dict[str, str]:
    """The request's headers as ``{lower-case name: values joined with ","}``: one pass over them, then each
    header match is a dict lookup (``Headers.get_list`` scans every header on every call)."""
    view: dict[str, str] = {}
    for name, value in headers.multi_items():
        key = name.lower()
        previous = view.get(key)
        view[key] = value if previous is None else f"{previous},{value}"
    return view


# -- filters ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    """``RequestHeaderModifier`` / ``ResponseHeaderModifier``: ``set`` replaces, ``add`` appends, ``remove``
    deletes (names compared case-insensitively), applied in that order (:func:`meshlib.routing.filters.modify`)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PathModifier:
    """``URLRewrite.path`` / ``RequestRedirect.path``: ``ReplaceFullPath`` or ``ReplacePrefixMatch`` (the
    part of the path the rule's ``PathPrefix`` match matched is replaced by ``value``)."""

    kind: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    value: str


@dataclass(frozen=True, slots=True)
class URLRewrite:
    """``URLRewrite``: the ``Host`` the backend receives, and/or its path."""

    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class Redirect:
    """``RequestRedirect``: the call is answered with a redirect, never sent. ``None`` fields keep the
    request's own (scheme, host, path; the port follows the scheme's rules in the spec)."""

    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True)
class Mirror:
    """``RequestMirror``: a copy of ``fraction`` of the requests (0..1, from ``percent`` or ``fraction``) goes to
    ``service`` too; its answer is discarded."""

    service: str
    fraction: float = 1.0


@dataclass(frozen=True, slots=True)
class Fault:
    """meshlib's fault-injection extension filter (Istio's ``fault`` semantics, gRFC A33's ``max_active_faults``).

    ``delay_s`` seconds of delay for ``delay_fraction`` of the calls, then an answer of ``abort_status`` for
    ``abort_fraction`` of them, decided before any byte leaves; at most ``max_active`` faults of this filter at
    once per client (``None``: no limit). ``name`` is the ``ExtensionRef`` name (metrics, spans, status).
    """

    name: str
    delay_s: float | None = None
    delay_fraction: float = 0.0
    abort_status: int | None = None
    abort_fraction: float = 0.0
    max_active: int | None = None


@dataclass(frozen=True, slots=True)
class Filters:
    """A rule's (or one backend's) filters, by kind. Applied in a fixed order whatever the list order was:
    fault, redirect, request headers, URL rewrite, mirrors; response headers on the answer (docs/routing.md)."""

    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    rewrite: URLRewrite | None = None
    redirect: Redirect | None = None
    mirrors: tuple[Mirror, ...] = ()
    fault: Fault | None = None

    @property
    def empty(self) -> bool:
        """Whether no filter is set."""
        return self == _NO_FILTERS


_NO_FILTERS = Filters()
NO_FILTERS = _NO_FILTERS


# -- rules and backends -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    """One ``backendRefs[]`` entry: a meshlib service (by its configured name) and its weight.

    ``service`` is ``None`` for an invalid reference kept for its weight (its share of the calls is answered
    500, as the spec says); ``invalid`` says why.
    """

    service: str | None
    weight: int = 1
    filters: Filters = NO_FILTERS
    port: int | None = None
    invalid: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``rules[]`` entry of one route, compiled: its filters, backends and policy layer.

    ``route`` is the route's ``namespace/name`` (or ``name``), ``index`` the rule's position in it; ``label`` is
    the low-cardinality name used in spans and metrics (``name#index``, or ``name/rule-name``).
    """

    route: str
    index: int
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    filters: Filters = NO_FILTERS
    backends: tuple[Backend, ...] = ()
    #: The route's policy layer: ``timeouts.request`` -> ``timeout`` (0s: none), ``timeouts.backendRequest`` ->
    #: ``per_try_timeout``, ``retry.attempts`` -> ``retries``, ``retry.codes`` -> ``retry_on``, ``retry.backoff``
    #: -> ``backoff_base`` (and ``backoff_cap`` = 10x it, Envoy's default maximum interval).
    policy: Policy = NO_POLICY
    name: str | None = None
    #: Running totals of the backends' weights (for :meth:`pick`); computed at construction.
    cumulative: tuple[int, ...] = field(default=(), compare=False)
    #: The rule's low-cardinality name for spans and metrics (``route#index``, or ``route/rule-name``); computed.
    label: str = field(default="", init=False, compare=False)

    def __post_init__(self) -> None:
        total = 0
        running = []
        for backend in self.backends:
            total += backend.weight
            running.append(total)
        object.__setattr__(self, "cumulative", tuple(running))
        object.__setattr__(self, "label", f"{self.route}/{self.name}" if self.name else f"{self.route}#{self.index}")

    @property
    def total_weight(self) -> int:
        """The sum of the backends' weights (0: every call of this rule is answered 500)."""
        return self.cumulative[-1] if self.cumulative else 0

    def pick(self, rng: random.Random) -> Backend | None:
        """The weighted backend for one call; ``None`` when there is none to choose (no backends, or all
        weights zero: the call is answered 500, as the spec says)."""
        cumulative = self.cumulative
        if not cumulative:
            return None
        total = cumulative[-1]
        if total <= 0:
            return None
        if len(cumulative) == 1:
            return self.backends[0]
        draw = rng.random() * total
        return self.backends[bisect.bisect_right(cumulative, draw)]


#: Distinct (method, path) pairs whose candidate entries one :class:`HostRoutes` remembers (then it starts over:
#: paths with ids in them must not grow memory without bound).
_CANDIDATES_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class HostRoutes:
    """The routes attached to one service (and port), compiled into one list in Gateway API precedence order.

    :meth:`select` does not try every entry: an index built at construction maps each ``Exact`` path and each
    ``PathPrefix`` value to its entries, so a request only tries the entries its path can meet (those whose
    value is one of the request path's segment prefixes, or the path itself) plus the entries no index can
    rule out (``PathPrefix /``, regular expressions), in precedence order.

    Then, because matching is the request path's only loop over the table, :meth:`select` is compiled for speed (S9 in
    docs/performance.md): the method and path conditions depend on the request's method and path alone, so the
    entries that pass them (the *candidates*, in order) are computed once per distinct (method, path) and
    remembered (bounded); header and query conditions are then tested on the candidates only, each header read
    at most once per request and the query string parsed only if a candidate has a query condition. The result
    is the same as testing every entry's :meth:`RouteMatch.test` in order.
    """

    service: str
    #: (match, rule) pairs, most specific first: the first whose match the request meets wins.
    entries: tuple[tuple[RouteMatch, Rule], ...]
    #: Whether any match reads query parameters (the query string is parsed only then).
    reads_query: bool = False
    #: The path index (see the class docstring); computed at construction.
    by_exact: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)
    by_prefix: Mapping[str, tuple[int, ...]] = field(default_factory=dict, compare=False, repr=False)
    always: tuple[int, ...] = field(default=(), compare=False, repr=False)
    by_keys: bool = field(default=False, compare=False, repr=False)
    #: (method, path) -> candidate entries; filled by :meth:`select` (a cache of a pure function).
    _candidates: dict[tuple[str, ...], _Dispatch] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        exact: dict[str, list[int]] = {}
        prefix: dict[str, list[int]] = {}
        always: list[int] = []
        for position, (match, _) in enumerate(self.entries):
            kind, value = match.path.kind, match.path.value
            if kind == "Exact":
                exact.setdefault(value, []).append(position)
            elif kind == "PathPrefix" and value.startswith("/") and len(value) > 1 and not value.endswith("/"):
                prefix.setdefault(value, []).append(position)
            else:  # PathPrefix "/" (or a value not normalised), RegularExpression: no index rules them out
                always.append(position)
        put = object.__setattr__
        put(self, "by_exact", {value: tuple(positions) for value, positions in exact.items()})
        put(self, "by_prefix", {value: tuple(positions) for value, positions in prefix.items()})
        put(self, "always", tuple(always))
        # Entries no index rules out are all "PathPrefix /" (they meet every path): then which entries a path
        # can meet depends only on the index keys it hits, and paths with ids (/charge/42, /charge/43...) share
        # one cache entry (:meth:`_key`). A regular expression makes the whole path the key.
        put(self, "by_keys", all(self.entries[i][0].path == _EVERY_PATH for i in always))

    def candidates(self, path: str) -> Sequence[int]:
        """The positions of the entries ``path`` may meet, in precedence order (a superset of those it meets)."""
        if not path.startswith("/"):
            return range(len(self.entries))
        hits = [self.always] if self.always else []
        hit = self.by_exact.get(path)
        if hit:
            hits.append(hit)
        by_prefix = self.by_prefix
        if by_prefix:
            end = 0
            while True:
                end = path.find("/", end + 1)
                hit = by_prefix.get(path if end < 0 else path[:end])
                if hit:
                    hits.append(hit)
                if end < 0:
                    break
        if len(hits) == 1:
            return hits[0]
        if not hits:
            return ()
        return sorted(chain.from_iterable(hits))

    def _key(self, method: str, path: str) -> tuple[str, ...]:
        """What decides the candidates of a request: its method and the index keys its path hits (the Exact
        value, the PathPrefix values of its leading segments), or its whole path when that is not enough."""
        if not self.by_keys or not path.startswith("/"):
            return (method, path)
        key = [method]
        if path in self.by_exact:
            key.append("=" + path)
        by_prefix = self.by_prefix
        if by_prefix:
            end = 0
            while True:
                end = path.find("/", end + 1)
                prefix = path if end < 0 else path[:end]
                if prefix in by_prefix:
                    key.append(prefix)
                if end < 0:
                    break
        return tuple(key)

    def select(
        self, method: str, path: str, headers: Any, query: Mapping[str, str] | None = None
    ) -> tuple[RouteMatch, Rule] | None:
        """The first (match, rule) the request meets, or ``None``: no rule matched (the call gets a 404)."""
        cache = self._candidates
        key = self._key(method, path)
        dispatch = cache.get(key)
        if dispatch is None:
            entries = self.entries
            dispatch = _Dispatch(
                tuple(
                    entry
                    for entry in (entries[position] for position in self.candidates(path))
                    if (entry[0].method is None or entry[0].method == method) and entry[0].path.test(path)
                )
            )
            if len(cache) >= _CANDIDATES_CACHE_SIZE:
                cache.clear()
            cache[key] = dispatch
        candidates = dispatch.candidates
        seen: dict[str, str | None] = {}
        params: Mapping[str, str] | None = None
        order: Iterable[int]
        if dispatch.keyed is None:
            order = range(len(candidates))
        else:  # only the candidates whose exact header/query value is the request's can match (see _Dispatch)
            picked = list(dispatch.unkeyed)
            sources = 1 if picked else 0
            for is_header, name, by_value in dispatch.keyed:
                if is_header:
                    value = seen[name] = _header_value(headers, name)
                else:
                    if params is None:
                        params = query._values() if type(query) is QueryString else (query or {})
                    value = params.get(name)
                hit = None if value is None else by_value.get(value)
                if hit:
                    picked.extend(hit)
                    sources += 1
            if sources > 1:
                picked.sort()
            order = picked
        for position in order:
            entry = candidates[position]
            match = entry[0]
            ok = True
            for header in match.headers:
                name = header.name
                if name in seen:
                    found = seen[name]
                else:
                    found = seen[name] = _header_value(headers, name)
                if not header.test_value(found):
                    ok = False
                    break
            if ok and match.query:
                if params is None:
                    params = query._values() if type(query) is QueryString else (query or {})
                for param in match.query:
                    if not param.test_value(params.get(param.name)):
                        ok = False
                        break
            if ok:
                return entry
        return None


_EVERY_PATH = PathMatch("PathPrefix", "/")

#: Fewer candidates than this are simply tested in order (building and reading the dispatch costs more).
_DISPATCH_MIN = 5


class _Dispatch:
    """The candidates of one (method, path), and a dispatch on exact header and query values over them.

    Each candidate with an ``Exact`` header condition is keyed by its first one (else by its first ``Exact``
    query condition); a keyed candidate can only match a request whose value for that header (or parameter) is
    its key, since the condition fails otherwise. So a request tests the unkeyed candidates and those filed
    under its own values, still in precedence order: the same first match as testing every candidate, found
    without testing the (typically many) rules that differ only by a header or query value.
    """

    __slots__ = ("candidates", "keyed", "unkeyed")

    def __init__(self, candidates: tuple[tuple[RouteMatch, Rule], ...]) -> None:
        self.candidates = candidates
        #: (is a header, name, value -> candidate positions) per keyed name; ``None``: test every candidate.
        self.keyed: tuple[tuple[bool, str, dict[str, tuple[int, ...]]], ...] | None = None
        self.unkeyed: tuple[int, ...] = ()
        if len(candidates) < _DISPATCH_MIN:
            return
        tables: dict[tuple[bool, str], dict[str, list[int]]] = {}
        unkeyed: list[int] = []
        for position, (match, _) in enumerate(candidates):
            header = next((h for h in match.headers if h.kind == "Exact"), None)
            if header is not None:
                tables.setdefault((True, header.name), {}).setdefault(header.value, []).append(position)
                continue
            param = next((q for q in match.query if q.kind == "Exact"), None)
            if param is not None:
                tables.setdefault((False, param.name), {}).setdefault(param.value, []).append(position)
                continue
            unkeyed.append(position)
        if not tables:
            return
        self.unkeyed = tuple(unkeyed)
        self.keyed = tuple(
            (is_header, name, {value: tuple(positions) for value, positions in by_value.items()})
            for (is_header, name), by_value in tables.items()
        )


class QueryString(Mapping[str, str]):
    """The first value of each query parameter of a raw query string (what ``url.params.get`` returns, as
    httpx and httpx2 parse it: ``parse_qs(..., keep_blank_values=True)``), parsed on first use only."""

    __slots__ = ("_parsed", "_raw")

    def __init__(self, raw: str) -> None:
        self._raw = raw
        self._parsed: dict[str, str] | None = None

    def _values(self) -> dict[str, str]:
        parsed = self._parsed
        if parsed is None:
            parsed = self._parsed = first_query_values(self._raw)
        return parsed

    def __getitem__(self, name: str) -> str:
        return self._values()[name]

    def get(self, name: str, default: Any = None) -> Any:
        """The first value of ``name``, or ``default``."""
        return self._values().get(name, default)

    def __iter__(self) -> Any:
        return iter(self._values())

    def __len__(self) -> int:
        return len(self._values())


def first_query_values(raw: str) -> dict[str, str]:
    """``{name: first value}`` of a raw query string, exactly as ``urllib.parse.parse_qsl(raw,
    keep_blank_values=True)`` decodes it (the fast split is only taken when nothing needs unquoting)."""
    found: dict[str, str] = {}
    if "%" in raw or "+" in raw:
        from urllib.parse import parse_qsl

        for name, value in parse_qsl(raw, keep_blank_values=True):
            found.setdefault(name, value)
        return found
    for part in raw.split("&"):
        if part:
            name, _, value = part.partition("=")
            found.setdefault(name, value)
    return found


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Every route of one source, by called service: swapped whole when the source changes.

    ``services`` maps a service key (:func:`meshlib._config.service_key` of the called host) to its routes:
    ``None`` key in the inner mapping holds the routes attached without a port (they apply to every port),
    an int key the routes for that port (already merged with the port-less ones, and sorted).
    """

    services: Mapping[str, Mapping[int | None, HostRoutes]]
    #: Where the table came from (a file path, ``xds://...``), and its version (a content hash, an xDS
    #: version_info) as shown in ``mesh_status()`` and logs.
    source: str = ""
    version: str = ""
    #: The names of the routes in the table (``namespace/name``), for status and explain.
    routes: tuple[str, ...] = ()

    def lookup(self, key: str, port: int) -> HostRoutes | None:
        """The routes for a call to service ``key`` on ``port``; ``None``: no route applies (call the service)."""
        by_port = self.services.get(key)
        if by_port is None:
            return None
        found = by_port.get(port)
        if found is None:
            found = by_port.get(None)
        return found


EMPTY_TABLE = RouteTable(services={})
