"""``meshlib explain``: what a client would do with one request, and why -- from the request path's own decisions.

:func:`explain` answers, for a request not sent, the questions an operator asks about routes: which host and
service it names, which route table applies, which rule wins and why every other candidate did not, what the
winning rule's filters do to it (or the answer the routes give themselves: 404, 500, a redirect), which
backends it may go to with their weights and shares, what each backend's discovery has found, and the policy
the call would run under with the layer that set each field.

It never re-implements a decision: the host lookup is the mesh's own (:meth:`meshlib._mesh._Router.route`),
the winner is :meth:`HostRoutes.select` over the same entries, the reasons come from :func:`why_not`, which
checks conditions in the same order as :meth:`RouteMatch.test` (and agrees with it, a property test says),
the shares are the :class:`Rule`'s weights, and the policy is :func:`meshlib.policy.effective` of the same base
the call would use (``target.bases[id(rule)]`` or the service's policy). It does no I/O and draws nothing from
the mesh's random number generator, so explaining a request changes nothing.

Everything that came from outside (paths, header values, hosts) is escaped with :func:`meshlib.status.printable`
before it is stored in the :class:`Explanation`, so :meth:`Explanation.text` is safe to print on a terminal.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from meshlib.policy import DEFAULT_POLICY, NO_POLICY, POLICY_EXTENSION, Policy, current_deadline, current_policy
from meshlib.resilience.hedging import HedgePolicy
from meshlib.routing.decision import no_backend, no_route
from meshlib.routing.model import HeaderModifier, PathMatch, QueryString, RouteMatch, _header_value
from meshlib.status import printable

if TYPE_CHECKING:
    from meshlib._client import SyncMesh
    from meshlib._mesh import _Mesh, _Target
    from meshlib._service import Service
    from meshlib.routing.model import Backend, Filters, Rule

__all__ = [
    "BackendExplanation",
    "Candidate",
    "EndpointExplanation",
    "Explanation",
    "FilterExplanation",
    "LocalAnswer",
    "PolicyExplanation",
    "PolicyField",
    "describe_match",
    "explain",
    "wait_for_discovery",
    "why_not",
]

#: The policy layers, weakest first, as :class:`PolicyField.source` names them.
Layer = Literal["default", "env", "service", "route", "scope", "request"]
_FIELDS = (
    "timeout",
    "deadline",
    "per_try_timeout",
    "retries",
    "retry_on",
    "retry_non_idempotent",
    "backoff_base",
    "backoff_cap",
    "retry_after_cap",
    "hedge",
)


# -- why a match did not match ------------------------------------------------------------------------------------


def _quote(value: str) -> str:
    return "'" + printable(value, 200) + "'"


def _path_reason(match: PathMatch, path: str) -> str | None:
    if match.test(path):
        return None
    shown = printable(path, 200)
    if match.kind == "PathPrefix":
        return f"path {shown} is not under prefix {printable(match.value)}"
    if match.kind == "Exact":
        return f"path {shown} is not {printable(match.value)}"
    return f"path {shown} does not fully match regular expression {_quote(match.value)}"


def _value_reason(what: str, kind: str, expected: str, found: str | None) -> str:
    if found is None:
        return f"{what} is absent"
    if kind == "Exact":
        return f"{what} is {_quote(found)}, not {_quote(expected)}"
    return f"{what} is {_quote(found)}, which does not fully match regular expression {_quote(expected)}"


def why_not(match: RouteMatch, method: str, path: str, headers: Any, query: Mapping[str, str] | None) -> str | None:
    """The first condition of ``match`` the request fails, in words; ``None`` when the request meets it.

    Same arguments as :meth:`RouteMatch.test`, conditions checked in its order (method, path, headers, query),
    each by the match's own test, so ``why_not(...) is None`` exactly when ``match.test(...)`` is true.
    """
    if match.method is not None and method != match.method:
        return f"method {printable(method, 40)} is not {match.method}"
    reason = _path_reason(match.path, path)
    if reason is not None:
        return reason
    for header in match.headers:
        found = _header_value(headers, header.name)
        if not header.test_value(found):
            return _value_reason(f"header {header.name}", header.kind, header.value, found)
    if match.query:
        params = query or {}
        for param in match.query:
            found = params.get(param.name)
            if not param.test_value(found):
                return _value_reason(f"query parameter {printable(param.name, 80)}", param.kind, param.value, found)
    return None


def describe_match(match: RouteMatch) -> str:
    """A match's conditions in one line: ``POST, path prefix /charge, header x-canary = '1'``."""
    parts: list[str] = []
    if match.method is not None:
        parts.append(match.method)
    path = match.path
    if not (path.kind == "PathPrefix" and path.value == "/"):
        kind = {"PathPrefix": "path prefix", "Exact": "path", "RegularExpression": "path ~"}[path.kind]
        parts.append(f"{kind} {printable(path.value)}")
    for header in match.headers:
        op = "=" if header.kind == "Exact" else "~"
        parts.append(f"header {header.name} {op} {_quote(header.value)}")
    for param in match.query:
        op = "=" if param.kind == "Exact" else "~"
        parts.append(f"query {printable(param.name, 80)} {op} {_quote(param.value)}")
    return ", ".join(parts) if parts else "any request"


# -- the explanation ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (match, rule) entry of the routes, in precedence order: whether the request meets it, and if not why.

    ``winner`` marks the entry the call takes (the first that matched); a later entry may match too
    (``matched`` true, not the winner): an earlier one takes precedence.
    """

    route: str
    rule: str
    match_index: int
    conditions: str
    matched: bool
    winner: bool
    why_not: str | None


@dataclass(frozen=True, slots=True)
class FilterExplanation:
    """One filter the call would go through: its Gateway API kind, whose it is (``rule`` or a backend's service
    name) and what it does to this request."""

    kind: str
    scope: str
    description: str


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """The answer the routes give themselves, never sent to a server: ``why`` as in ``response.extensions
    ["meshlib.local"]`` (``no-route``, ``redirect``, ``no-backend``), ``message`` the response body's text."""

    status: int
    why: str
    message: str
    location: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointExplanation:
    """One discovered endpoint of a backend, as its service's status view shows it now."""

    address: str
    weight: int
    zone: str | None
    breaker: str
    ejected: bool
    inflight: int


@dataclass(frozen=True, slots=True)
class BackendExplanation:
    """A backend the call may go to: ``share`` is its percentage of the calls (its weight over the rule's total).

    ``configured`` is false for a backend that is no mesh service (its share of the calls is answered 500, as
    is an ``invalid`` reference's). ``discovered`` is false until the service's discovery has started (the first
    call starts it); ``endpoints`` are what it has found. ``budget_available`` is how many retries its retry
    budget would allow now, ``budget_exhausted`` how many it refused so far.
    """

    service: str | None
    weight: int
    share: float
    configured: bool
    invalid: str | None = None
    discovery: str | None = None
    discovered: bool = False
    discovery_error: str | None = None
    balancer: str | None = None
    endpoints: tuple[EndpointExplanation, ...] = ()
    budget_available: float | None = None
    budget_percent: float | None = None
    budget_exhausted: int | None = None
    filters: tuple[FilterExplanation, ...] = ()


@dataclass(frozen=True, slots=True)
class PolicyField:
    """One field of the effective policy: its value (JSON-ready: ``None`` for unbounded, a sorted list of
    statuses for ``retry_on``), as text, and the layer that set it."""

    name: str
    value: float | int | bool | tuple[int, ...] | None
    text: str
    source: Layer


@dataclass(frozen=True, slots=True)
class PolicyExplanation:
    """The policy the call would run under, field by field, and the deadline it gives: ``deadline_s`` seconds
    from when the explanation was made (``None``: unbounded), set by ``deadline_by``."""

    fields: tuple[PolicyField, ...]
    deadline_s: float | None
    deadline_by: str

    def field(self, name: str) -> PolicyField:
        """The field called ``name`` (``timeout``, ``retries``...)."""
        for found in self.fields:
            if found.name == name:
                return found
        raise KeyError(name)


@dataclass(frozen=True, slots=True)
class Explanation:
    """What a client would do with one request, and why (:func:`explain`, ``client.explain(...)``).

    ``in_mesh``: the host names a mesh service or a route parent; ``service`` is that name (``None`` outside the
    mesh) and ``configured`` whether it is a configured service. ``routes`` says whether routes apply:
    ``"outside the mesh"``, ``"none attached"``, ``"none for port N"`` or ``"apply"``. ``candidates`` are the
    route entries in precedence order; ``winner`` the label of the rule taken (as ``response.extensions
    ["meshlib.route"]``); ``local`` the answer the routes give themselves, if they do; ``backends`` where the
    call may go; ``policy`` the call's policy (``None`` when the call would not be a mesh call).
    """

    method: str
    url: str
    host: str
    port: int
    in_mesh: bool
    service: str | None
    configured: bool
    table_source: str
    table_version: str
    routes: str
    candidates: tuple[Candidate, ...] = ()
    winner: str | None = None
    filters: tuple[FilterExplanation, ...] = ()
    local: LocalAnswer | None = None
    backends: tuple[BackendExplanation, ...] = ()
    policy: PolicyExplanation | None = None

    def to_dict(self) -> dict[str, Any]:
        """The explanation as JSON-ready dictionaries and lists."""
        return dataclasses.asdict(self)

    def text(self) -> str:
        """The explanation for a terminal, one fact a line."""
        return "\n".join(_render(self))


# -- building it ----------------------------------------------------------------------------------------------------


def explain(mesh: _Mesh[Any], request: Any) -> Explanation:
    """Explain what ``mesh`` (a client's mesh transport, ``client.mesh``) would do with ``request`` now.

    No I/O, no random draw, nothing recorded: the explanation reads the route table, the services' status
    views and the policy scopes of the calling context, as they are at this instant.
    """
    from meshlib._plan import _DEFAULT_PORTS, path_and_query

    url = request.url
    method = request.method
    port = url.port or _DEFAULT_PORTS.get(url.scheme, 80)
    router = mesh._router
    table = router.table
    target = router.route(url.host)
    base = Explanation(
        method=printable(method, 40),
        url=printable(_shown_url(url), 300),
        host=printable(url.host, 200),
        port=port,
        in_mesh=False,
        service=None,
        configured=False,
        table_source=printable(table.source, 300),
        table_version=printable(table.version, 100),
        routes="outside the mesh",
    )
    if target is None:
        return base
    base = replace(base, in_mesh=True, service=target.name, configured=target.service is not None)
    routes = target.routes_for(port)  # the request path's own lookup
    if routes is None:
        state = "none attached" if target.routes is None else f"none for port {port}"
        service = target.service
        if service is None:  # a route parent only, and no route here: the request leaves the mesh as it is
            return replace(base, routes=state)
        return replace(
            base,
            routes=state,
            backends=(_backend_of(mesh, service.name, 1, 100.0, None),),
            policy=_policy(mesh, target, None, service.policy, request),
        )
    path, raw_query = path_and_query(url)  # as the request path reads them
    query = QueryString(raw_query) if routes.reads_query else None
    selected = routes.select(method, path, request.headers, query)
    candidates = []
    for match, rule in routes.entries:
        reason = why_not(match, method, path, request.headers, query)
        candidates.append(
            Candidate(
                route=printable(rule.route),
                rule=printable(rule.label),
                match_index=_index_of(rule, match),
                conditions=describe_match(match),
                matched=reason is None,
                winner=selected is not None and selected[0] is match and selected[1] is rule,
                why_not=reason,
            )
        )
    base = replace(base, routes="apply", candidates=tuple(candidates))
    if selected is None:
        message = no_route(target.name, method, path)
        return replace(base, local=LocalAnswer(404, "no-route", printable(message, 500)))
    match, rule = selected
    base = replace(base, winner=printable(rule.label), filters=_filters(rule.filters, "rule", match, path, url))
    redirect = rule.filters.redirect
    if redirect is not None:
        from meshlib.routing.filters import redirect_location

        location = redirect_location(
            scheme=url.scheme,
            host=url.host,
            port=url.port,
            path=path,
            query=raw_query,
            match=match,
            redirect=redirect,
        )
        shown = printable(location, 500)
        return replace(base, local=LocalAnswer(redirect.status_code, "redirect", f"redirected to {shown}", shown))
    total = rule.total_weight
    backends = tuple(
        _backend_of(
            mesh,
            backend.service,
            backend.weight,
            (100.0 * backend.weight / total) if total > 0 else 0.0,
            backend,
            filters=_filters(backend.filters, printable(backend.service or "invalid"), match, path, url),
        )
        for backend in rule.backends
    )
    base = replace(base, backends=backends, policy=_policy(mesh, target, rule, target.bases[id(rule)], request))
    if total <= 0:
        message = no_backend(rule, None)
        return replace(base, local=LocalAnswer(500, "no-backend", printable(message, 500)))
    return base


def _shown_url(url: Any) -> str:
    """The request's URL without user info (it may hold a password); the query stays: routes may match it."""
    port = f":{url.port}" if url.port is not None else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}{url.raw_path.decode('ascii')}"


def _index_of(rule: Rule, match: RouteMatch) -> int:
    """The position of ``match`` in its rule's ``matches`` (by identity, the compiled entry's own object)."""
    for index, candidate in enumerate(rule.matches):
        if candidate is match:
            return index
    return rule.matches.index(match) if match in rule.matches else 0


def _backend_of(
    mesh: _Mesh[Any],
    name: str | None,
    weight: int,
    share: float,
    backend: Backend | None,
    *,
    filters: tuple[FilterExplanation, ...] = (),
) -> BackendExplanation:
    """One backend with its service's state now (``Service.view()``)."""
    from meshlib._config import service_key

    invalid = None if backend is None or backend.invalid is None else printable(backend.invalid, 300)
    service: Service[Any] | None = None if name is None else mesh.services.get(service_key(name))
    shown = None if name is None else printable(name, 200)
    share = round(share, 2)
    if service is None:
        return BackendExplanation(shown, weight, share, configured=False, invalid=invalid, filters=filters)
    view = service.view()
    endpoints = tuple(
        EndpointExplanation(
            address=printable(e.address, 200),
            weight=e.weight,
            zone=None if e.zone is None else printable(e.zone, 80),
            breaker=e.breaker,
            ejected=e.ejected,
            inflight=e.inflight,
        )
        for e in view.endpoints
    )
    error = view.discovery.last_error
    return BackendExplanation(
        service=shown,
        weight=weight,
        share=share,
        configured=True,
        invalid=invalid,
        discovery=printable(view.discovery.source, 300),
        discovered=view.started,
        discovery_error=None if error is None else printable(error, 300),
        balancer=view.balancer,
        endpoints=endpoints,
        budget_available=view.budget.available,
        budget_percent=view.budget.percent,
        budget_exhausted=view.budget.exhausted,
        filters=filters,
    )


def _headers(modifier: HeaderModifier) -> str:
    parts = [f"set {name}: {_quote(value)}" for name, value in modifier.set]
    parts += [f"add {name}: {_quote(value)}" for name, value in modifier.add]
    parts += [f"remove {name}" for name in modifier.remove]
    return "; ".join(parts) or "no change"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _filters(filters: Filters, scope: str, match: RouteMatch, path: str, url: Any) -> tuple[FilterExplanation, ...]:
    """The filters of a rule (or one backend) in the order they apply, each described for this request."""
    from meshlib.routing.filters import rewritten_path

    found: list[FilterExplanation] = []
    fault = filters.fault
    if fault is not None:
        parts = []
        if fault.delay_s is not None and fault.delay_fraction > 0:
            parts.append(f"delay {fault.delay_s:g}s for {_percent(fault.delay_fraction)} of calls")
        if fault.abort_status is not None and fault.abort_fraction > 0:
            parts.append(f"abort with {fault.abort_status} for {_percent(fault.abort_fraction)} of calls")
        parts.append("no limit on active faults" if fault.max_active is None else f"at most {fault.max_active} active")
        found.append(FilterExplanation("Fault", scope, f"{printable(fault.name)}: " + ", ".join(parts)))
    redirect = filters.redirect
    if redirect is not None:
        found.append(FilterExplanation("RequestRedirect", scope, f"answered {redirect.status_code}, never sent"))
    if filters.request_headers is not None:
        found.append(FilterExplanation("RequestHeaderModifier", scope, _headers(filters.request_headers)))
    rewrite = filters.rewrite
    if rewrite is not None:
        parts = []
        if rewrite.hostname is not None:
            parts.append(f"Host {printable(rewrite.hostname)}")
        if rewrite.path is not None:
            new = rewritten_path(path, match, rewrite.path)
            parts.append(f"path {printable(path, 200)} -> {printable(new, 200)} ({rewrite.path.kind})")
        found.append(FilterExplanation("URLRewrite", scope, ", ".join(parts) or "no change"))
    found.extend(
        FilterExplanation("RequestMirror", scope, f"copy {_percent(m.fraction)} of calls to {printable(m.service)}")
        for m in filters.mirrors
    )
    if filters.response_headers is not None:
        found.append(FilterExplanation("ResponseHeaderModifier", scope, _headers(filters.response_headers)))
    return tuple(found)


# -- the policy and where each field comes from ---------------------------------------------------------------------


def _policy(mesh: _Mesh[Any], target: _Target[Any], rule: Rule | None, base: Policy, request: Any) -> PolicyExplanation:
    """The call's policy as :func:`meshlib.policy.effective` makes it from ``base`` (the same base the call would
    use), each field credited to the last layer that set it."""
    from meshlib.policy import effective

    requested = request.extensions.get(POLICY_EXTENSION)
    request_policy = requested if isinstance(requested, Policy) else None
    now = time.monotonic()
    rules, deadline = effective(base, request_policy)
    config = mesh.config
    svc = config.services.get(target.key)
    layers: list[tuple[Layer, Policy]] = [
        ("service", NO_POLICY if svc is None or svc.policy is None else svc.policy),
        ("route", NO_POLICY if rule is None else rule.policy),
        ("scope", current_policy()),
        ("request", request_policy or NO_POLICY),
    ]
    fields = []
    for name in _FIELDS:
        value = getattr(rules, name)
        source: Layer = "env" if getattr(config.policy, name) != getattr(DEFAULT_POLICY, name) else "default"
        for layer, policy in layers:
            if getattr(policy, name) is not None:
                source = layer
        fields.append(PolicyField(name, _json_value(value), _text_value(name, value), source))
    return PolicyExplanation(tuple(fields), *_deadline(rules, deadline, now))


def _deadline(rules: Policy, deadline: float, now: float) -> tuple[float | None, str]:
    """Seconds from ``now`` to the call's deadline, and which bound set it (the same min as ``effective``)."""
    if not math.isfinite(deadline):
        return None, "nothing (no timeout, no deadline)"
    scope = current_deadline()
    if scope is not None and scope <= deadline:
        by = "the policy() scope's deadline"
    elif rules.deadline is not None and math.isfinite(rules.deadline) and rules.deadline < (rules.timeout or 0):
        by = "the policy's deadline"
    else:
        by = "the policy's timeout"
    return round(deadline - now, 3), by


def _json_value(value: object) -> float | int | bool | tuple[int, ...] | None:
    if isinstance(value, HedgePolicy):  # JSON-ready: the attempts in flight at most (1: no hedging)
        return value.max_attempts or 1
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, (frozenset, set)):
        return tuple(sorted(value))
    assert value is None or isinstance(value, (float, int, bool))
    return value


def _text_value(name: str, value: object) -> str:
    if isinstance(value, HedgePolicy):
        if not value.enabled:
            return "off"
        delay = f"{value.delay:g}s" if value.delay is not None else f"p{(value.percentile or 0.95) * 100:g}"
        statuses = ",".join(str(s) for s in sorted(value.non_fatal or ())) or "none"
        unsafe = "any method" if value.non_idempotent else "idempotent requests"
        return f"{value.max_attempts} attempts, delay {delay}, non-fatal {statuses}, {unsafe}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (frozenset, set)):
        return ",".join(str(s) for s in sorted(value)) or "none"
    if isinstance(value, float):
        return "none" if math.isinf(value) else f"{value:g}s"
    return str(value)


# -- discovery without a request ----------------------------------------------------------------------------------


def wait_for_discovery(client: SyncMesh, names: Iterable[str], timeout: float) -> dict[str, bool]:
    """Start the discovery of the services ``names`` of a blocking client (``meshlib.Client``) as a first call
    would, and wait up to ``timeout`` seconds in all for their first answers; whether each answered in time.

    It takes the request path's own first-use path (the driver's ``_view``: the service's refresh thread starts
    once, and a call waits on its first answer within its deadline), with a call that is never sent: its
    deadline is the time left, so nothing waits past ``timeout``, and a query still running goes on in the
    background as it does for a call that gave up. A first answer that is an error counts as an answer (the
    explanation shows it). Names that are no configured service are left out.
    """
    from meshlib._config import service_key
    from meshlib._plan import Call
    from meshlib.errors import DeadlineExceeded, MeshError

    mesh = client.mesh
    services = [s for s in (mesh.services.get(service_key(name)) for name in dict.fromkeys(names)) if s is not None]
    deadline = time.monotonic() + max(timeout, 0.0)
    answered: dict[str, bool] = {}
    for wait in (False, True):  # start every service's discovery first, then wait for each within what is left
        for service in services:
            left = max(deadline - time.monotonic(), 0.0) if wait else 0.0
            request = mesh.lib.Request(
                "GET", f"http://{service.name}/", extensions={POLICY_EXTENSION: Policy(deadline=left)}
            )
            try:
                mesh._view(service, Call(mesh.lib, service, request, mesh.home))
                answered[service.name] = True
            except DeadlineExceeded:
                answered[service.name] = False
            except MeshError:  # it answered, with an error (shown in the explanation's discovery state)
                answered[service.name] = True
    return answered


# -- text -----------------------------------------------------------------------------------------------------------


def _render(e: Explanation) -> list[str]:
    lines = [f"{e.method} {e.url}"]
    if not e.in_mesh:
        lines.append(f"host {e.host}: outside the mesh (no service, no route): sent as it is by the HTTP library")
        return lines
    kind = "a configured mesh service" if e.configured else "a route parent only, no service configured"
    lines.append(f"host {e.host} port {e.port}: {e.service}, {kind}")
    table = f"{e.table_source or 'none'}" + (f" version {e.table_version}" if e.table_version else "")
    lines.append(f"route table: {table}")
    if e.routes != "apply":
        where = f"service {e.service}" if e.configured else "outside the mesh, sent as it is by the HTTP library"
        lines.append(f"routes: {e.routes}: the call goes to {where}")
    else:
        lines.append("candidates, in precedence order:")
        for number, c in enumerate(e.candidates, 1):
            if c.winner:
                verdict = "MATCHED: taken"
            elif c.matched:
                verdict = "matched, but an earlier entry takes precedence"
            else:
                verdict = f"no: {c.why_not}"
            lines.append(f"  {number}. {c.rule} match {c.match_index} [{c.conditions}]: {verdict}")
        lines.append(f"winner: {e.winner or 'none'}")
        lines.extend(f"  filter {f.kind}: {f.description}" for f in e.filters)
    if e.local is not None:
        location = f" (Location: {e.local.location})" if e.local.location else ""
        lines.append(f"answered by meshlib itself: {e.local.status} {e.local.why}: {e.local.message}{location}")
    if e.backends:
        lines.append("backends:")
        for b in e.backends:
            lines.extend(_render_backend(b))
    if e.policy is not None:
        lines.append("policy (value, set by):")
        lines.extend(f"  {p.name:<21} {p.text:<12} {p.source}" for p in e.policy.fields)
        if e.policy.deadline_s is None:
            lines.append("  deadline: none")
        else:
            lines.append(f"  deadline: {e.policy.deadline_s:.3f}s from now, set by {e.policy.deadline_by}")
    return lines


def _render_backend(b: BackendExplanation) -> list[str]:
    head = f"  {b.service or '(invalid)'}  weight {b.weight}  share {b.share:g}%"
    if b.invalid is not None:
        return [f"{head}  invalid ({b.invalid}): its share is answered 500"]
    if not b.configured:
        return [f"{head}  not a mesh service: its share is answered 500"]
    lines = [f"{head}  balancer {b.balancer}  discovery {b.discovery}"]
    lines.extend(f"    filter {f.kind}: {f.description}" for f in b.filters)
    if not b.discovered:
        lines.append("    endpoints: not discovered yet (the first call starts discovery)")
    elif not b.endpoints:
        error = f" (last error: {b.discovery_error})" if b.discovery_error else ""
        lines.append(f"    endpoints: none{error}")
    else:
        for ep in b.endpoints:
            extra = "  ejected" if ep.ejected else ""
            zone = f"  zone {ep.zone}" if ep.zone else ""
            lines.append(
                f"    {ep.address}  weight {ep.weight}{zone}  breaker {ep.breaker}  in flight {ep.inflight}{extra}"
            )
    lines.append(
        f"    retry budget: {b.budget_available:g} retries available now ({_percent(b.budget_percent or 0.0)} of "
        f"requests), {b.budget_exhausted} refused so far"
    )
    return lines
