"""Gateway API ``HTTPRoute`` documents (YAML or JSON) compiled into a :class:`~meshlib.routing.model.RouteTable`.

:func:`parse_routes` is pure: text in, an immutable table out, or a :class:`~meshlib.errors.RoutesError` naming the
source, the document, the field path, the value found and what was expected. It applies every validation the
Gateway API CRDs state (``apis/v1/httproute_types.go``, ``shared_types.go``: kubebuilder markers and CEL rules),
so a file that a Kubernetes API server would refuse is refused here too, and the GAMMA rules for ``Service``
parents (GEP-1294, GEP-1324). docs/routing.md ("Gateway API semantics in meshlib") lists the choices the spec
leaves to implementations and what meshlib does.

Hostile input is bounded: the text size, the number of documents, the nesting depth and the number of nodes
walked (YAML aliases are counted each time they are walked, so an alias bomb is refused, not expanded).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from meshlib._config.model import service_key
from meshlib.control.documents import MAX_DEPTH, MAX_DOCUMENTS, MAX_NODES, MAX_TEXT, list_field, load_documents
from meshlib.control.documents import SHOW_LIMIT as _SHOW_LIMIT
from meshlib.control.documents import show as _show
from meshlib.errors import ConfigError, RoutesError
from meshlib.policy import MAX_RETRIES, NO_POLICY, Policy
from meshlib.resilience.hedging import hedge_from_env
from meshlib.routing.model import (
    NO_FILTERS,
    Backend,
    Fault,
    Filters,
    HeaderMatch,
    HeaderModifier,
    HostRoutes,
    Mirror,
    PathMatch,
    PathModifier,
    QueryMatch,
    Redirect,
    RouteMatch,
    RouteTable,
    Rule,
    URLRewrite,
    ValueKind,
)

__all__ = [
    "FAULT_GROUP",
    "FAULT_KIND",
    "MAX_DEPTH",
    "MAX_DOCUMENTS",
    "MAX_NODES",
    "MAX_REGEX",
    "MAX_TEXT",
    "parse_routes",
]

logger = logging.getLogger("meshlib")

#: Limits on one routes source (hostile or runaway input): refused above them.
#: The longest regular expression accepted (the spec's own limit on path values).
MAX_REGEX = 1024

#: meshlib's fault-injection extension filter: ``{type: ExtensionRef, extensionRef: {group: meshlib.dev, kind:
#: HTTPFault, name: NAME}}`` naming an ``HTTPFault`` document of the same namespace.
FAULT_GROUP = "meshlib.dev"
FAULT_KIND = "HTTPFault"
_FAULT_API = "meshlib.dev/v1alpha1"
_ROUTE_APIS = frozenset({"gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"})

# -- patterns from the CRDs ---------------------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")  # HeaderName (RFC 7230 token)
_PATH_CHARS = re.compile(r"(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+")
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_PRECISE_HOSTNAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SECTION_NAME = _PRECISE_HOSTNAME
_GROUP = re.compile(r"|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KIND = re.compile(r"[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?")
_DURATION = re.compile(r"([0-9]{1,5}(h|m|s|ms)){1,4}")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
    "CORS": "cors",
    "ExternalAuth": "externalAuth",
}
_NOT_REPEATED = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite", "CORS")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# -- errors -------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Doc:
    """Where errors point: the source and one document's label."""

    source: str
    label: str

    def fail(self, path: str, value: object, expected: str) -> NoReturn:
        raise RoutesError(self.source, self.label, path, _show(value), expected)


# -- typed field readers ------------------------------------------------------------------------------------------


def _mapping(doc: _Doc, path: str, value: object, allowed: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        doc.fail(path, value, "an object")
    for key in value:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            doc.fail(where, key, "one of the fields " + ", ".join(allowed) + " (unknown fields are refused)")
    return value


_list = list_field


def _string(doc: _Doc, path: str, value: object, *, max_len: int = 253, min_len: int = 1) -> str:
    if not isinstance(value, str):
        doc.fail(path, value, "a string")
    if not min_len <= len(value) <= max_len:
        doc.fail(path, value, f"a string of {min_len} to {max_len} characters")
    return value


def _pattern(doc: _Doc, path: str, value: object, pattern: re.Pattern[str], what: str, *, max_len: int = 253) -> str:
    text = _string(doc, path, value, max_len=max_len, min_len=0 if pattern is _GROUP else 1)
    if pattern.fullmatch(text) is None:
        doc.fail(path, value, what)
    return text


def _integer(doc: _Doc, path: str, value: object, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        doc.fail(path, value, f"an integer from {low:,} to {high:,}" if high is not None else f"an integer >= {low}")
    return value


def _duration(doc: _Doc, path: str, value: object) -> float:
    """A GEP-2257 duration (``1h30m``, ``500ms``, ``0s``) in seconds."""
    if not isinstance(value, str) or _DURATION.fullmatch(value) is None:
        doc.fail(
            path, value, "a Gateway API duration (GEP-2257: 1 to 4 of <1-5 digits><h|m|s|ms>, e.g. 2s, 1h30m, 500ms)"
        )
    return sum(int(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(value))


def _regex(doc: _Doc, path: str, value: str) -> re.Pattern[str]:
    if len(value) > MAX_REGEX:
        doc.fail(path, value, f"a regular expression of at most {MAX_REGEX} characters")
    try:
        return re.compile(value)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        doc.fail(path, value, f"a valid (Python re) regular expression: {exc}")


def _header_value(doc: _Doc, path: str, value: object, max_len: int) -> str:
    text = _string(doc, path, value, max_len=max_len)
    if "\r" in text or "\n" in text or "\0" in text:
        doc.fail(path, value, "a header value without CR, LF or NUL")
    return text


# -- documents ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Route:
    """One HTTPRoute, validated: its identity, precedence data and compiled rules."""

    namespace: str
    name: str
    created: datetime.datetime | None
    parents: list[tuple[str, str, int | None]]  # (name, namespace, port) of its Service parents
    rules: list[Rule] = field(default_factory=list)

    @property
    def ident(self) -> str:
        return f"{self.namespace}/{self.name}"


def _metadata(doc: _Doc, value: object) -> tuple[str, str, datetime.datetime | None]:
    if not isinstance(value, Mapping):
        doc.fail("metadata", value, "an object with a name")
    name = _pattern(doc, "metadata.name", value.get("name"), _PRECISE_HOSTNAME, "a Kubernetes object name (RFC 1123)")
    namespace = value.get("namespace")
    if namespace is None:
        namespace = "default"
    namespace = _pattern(doc, "metadata.namespace", namespace, _NAMESPACE, "a namespace (RFC 1123 label)", max_len=63)
    created = value.get("creationTimestamp")
    stamp: datetime.datetime | None = None
    if isinstance(created, datetime.datetime):  # YAML reads an unquoted timestamp as a datetime
        stamp = created if created.tzinfo else created.replace(tzinfo=datetime.timezone.utc)
    elif isinstance(created, str):
        try:
            stamp = datetime.datetime.fromisoformat(created.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            doc.fail("metadata.creationTimestamp", created, "an RFC 3339 timestamp (2024-05-01T12:00:00Z)")
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    elif created is not None:
        doc.fail("metadata.creationTimestamp", created, "an RFC 3339 timestamp (2024-05-01T12:00:00Z)")
    return namespace, name, stamp


def _percentage(doc: _Doc, path: str, value: object) -> float:
    if value is None:
        return 1.0
    spec = _mapping(doc, path, value, ("value",))
    number = spec.get("value")
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0.0 <= number <= 100.0:
        doc.fail(f"{path}.value", number, "a percentage from 0.0 to 100.0")  # NaN fails the range test too
    return float(number) / 100.0


def _fault(doc: _Doc, name: str, value: object) -> Fault:
    """An ``HTTPFault`` spec: Istio's ``HTTPFaultInjection`` fields, plus gRFC A33's ``maxActiveFaults``."""
    spec = _mapping(doc, "spec", value, ("delay", "abort", "maxActiveFaults"))
    if spec.get("delay") is None and spec.get("abort") is None:
        doc.fail("spec", value, "a delay, an abort or both")
    delay_s: float | None = None
    delay_fraction = 0.0
    if spec.get("delay") is not None:
        delay = _mapping(doc, "spec.delay", spec["delay"], ("fixedDelay", "percentage"))
        delay_s = _duration(doc, "spec.delay.fixedDelay", delay.get("fixedDelay"))
        delay_fraction = _percentage(doc, "spec.delay.percentage", delay.get("percentage"))
    abort_status: int | None = None
    abort_fraction = 0.0
    if spec.get("abort") is not None:
        abort = _mapping(doc, "spec.abort", spec["abort"], ("httpStatus", "percentage"))
        abort_status = _integer(doc, "spec.abort.httpStatus", abort.get("httpStatus"), 200, 599)
        abort_fraction = _percentage(doc, "spec.abort.percentage", abort.get("percentage"))
    max_active = spec.get("maxActiveFaults")
    if max_active is not None:
        max_active = _integer(doc, "spec.maxActiveFaults", max_active, 0, 2**32 - 1)
    return Fault(name, delay_s, delay_fraction, abort_status, abort_fraction, max_active)


@dataclass(slots=True)
class _Context:
    """What compiling one route needs: the services it may name and the faults it may reference."""

    services: Mapping[str, str]
    faults: Mapping[tuple[str, str], Fault]
    cluster_domain: str
    check_services: bool = True


def _service(ctx: _Context, doc: _Doc, path: str, ref: Mapping[str, Any], namespace: str) -> str | None:
    """The configured service a Service backend reference names, ``None`` when the route is not used here."""
    name = _pattern(doc, f"{path}.name", ref.get("name"), _PRECISE_HOSTNAME, "a Service name (RFC 1123)")
    ns = ref.get("namespace")
    ns = (
        namespace
        if ns is None
        else _pattern(doc, f"{path}.namespace", ns, _NAMESPACE, "a namespace (RFC 1123)", max_len=63)
    )
    for candidate in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{ctx.cluster_domain}"):
        found = ctx.services.get(service_key(candidate))
        if found is not None:
            return found
    if not ctx.check_services:
        return None
    configured = ", ".join(sorted(ctx.services.values())) or "none"
    doc.fail(f"{path}.name", name, f"a configured meshlib service (configured: {configured})")


_BACKEND_FIELDS = ("group", "kind", "name", "namespace", "port")


def _backend_kind(doc: _Doc, path: str, ref: Mapping[str, Any]) -> str | None:
    """``None`` for a core Service reference, else why the reference is invalid (another group/kind)."""
    group = ref.get("group", "")
    kind = ref.get("kind", "Service")
    group = _pattern(doc, f"{path}.group", group, _GROUP, "a Kubernetes API group (RFC 1123 subdomain or empty)")
    kind = _pattern(doc, f"{path}.kind", kind, _KIND, "a Kubernetes kind", max_len=63)
    if group in ("", "core") and kind == "Service":
        return None
    return f"unsupported backend kind {group or 'core'}/{kind} (meshlib routes to Services)"


def _path_modifier(doc: _Doc, path: str, value: object) -> PathModifier:
    spec = _mapping(doc, path, value, ("type", "replaceFullPath", "replacePrefixMatch"))
    kind = spec.get("type")
    if kind not in ("ReplaceFullPath", "ReplacePrefixMatch"):
        doc.fail(f"{path}.type", kind, "ReplaceFullPath or ReplacePrefixMatch")
    other = "replacePrefixMatch" if kind == "ReplaceFullPath" else "replaceFullPath"
    own = "replaceFullPath" if kind == "ReplaceFullPath" else "replacePrefixMatch"
    if spec.get(other) is not None:
        doc.fail(f"{path}.{other}", spec[other], f"no {other} when type is {kind}")
    if spec.get(own) is None:
        doc.fail(f"{path}.{own}", None, f"{own} set when type is {kind}")
    text = _string(doc, f"{path}.{own}", spec[own], max_len=1024, min_len=0)
    if kind == "ReplaceFullPath" and not text.startswith("/"):
        doc.fail(f"{path}.{own}", text, "an absolute path starting with '/'")
    if text and (not text.startswith("/") or _PATH_CHARS.fullmatch(text) is None):
        doc.fail(f"{path}.{own}", text, "an absolute path starting with '/' of valid path characters")
    return PathModifier(kind, text)


def _header_modifier(doc: _Doc, path: str, value: object) -> HeaderModifier:
    spec = _mapping(doc, path, value, ("set", "add", "remove"))
    seen: dict[str, str] = {}

    def claim(where: str, name: str) -> None:
        lower = name.lower()
        if lower in seen:
            doc.fail(where, name, f"one action per header name (already in {seen[lower]})")
        seen[lower] = where

    pairs: dict[str, tuple[tuple[str, str], ...]] = {}
    for action in ("set", "add"):
        items = []
        for index, entry in enumerate(_list(doc, f"{path}.{action}", spec.get(action), 16)):
            where = f"{path}.{action}[{index}]"
            header = _mapping(doc, where, entry, ("name", "value"))
            name = _pattern(
                doc,
                f"{where}.name",
                header.get("name"),
                _HEADER_NAME,
                "an HTTP header name (RFC 7230 token)",
                max_len=256,
            )
            claim(where, name)
            items.append((name, _header_value(doc, f"{where}.value", header.get("value"), 4096)))
        pairs[action] = tuple(items)
    removed = []
    for index, name in enumerate(_list(doc, f"{path}.remove", spec.get("remove"), 16)):
        where = f"{path}.remove[{index}]"
        _pattern(doc, where, name, _HEADER_NAME, "an HTTP header name (RFC 7230 token)", max_len=256)
        claim(where, name)
        removed.append(name)
    return HeaderModifier(pairs["set"], pairs["add"], tuple(removed))


def _mirror(ctx: _Context, doc: _Doc, path: str, value: object, namespace: str) -> Mirror | None:
    spec = _mapping(doc, path, value, ("backendRef", "percent", "fraction"))
    if spec.get("backendRef") is None:
        doc.fail(f"{path}.backendRef", None, "a backendRef")
    ref = _mapping(doc, f"{path}.backendRef", spec["backendRef"], _BACKEND_FIELDS)
    invalid = _backend_kind(doc, f"{path}.backendRef", ref)
    if invalid is not None:
        doc.fail(f"{path}.backendRef.kind", ref.get("kind"), 'a Service (group "", kind Service)')
    if ref.get("port") is not None:
        _integer(doc, f"{path}.backendRef.port", ref["port"], 1, 65535)
    service = _service(ctx, doc, f"{path}.backendRef", ref, namespace)
    percent, fraction = spec.get("percent"), spec.get("fraction")
    if percent is not None and fraction is not None:
        doc.fail(path, value, "only one of percent or fraction")
    share = 1.0
    if percent is not None:
        share = _integer(doc, f"{path}.percent", percent, 0, 100) / 100
    elif fraction is not None:
        parts = _mapping(doc, f"{path}.fraction", fraction, ("numerator", "denominator"))
        numerator = _integer(doc, f"{path}.fraction.numerator", parts.get("numerator"), 0, 2**31 - 1)
        denominator = parts.get("denominator", 100)
        denominator = _integer(doc, f"{path}.fraction.denominator", denominator, 1, 2**31 - 1)
        if numerator > denominator:
            doc.fail(f"{path}.fraction", fraction, "numerator <= denominator")
        share = numerator / denominator
    return None if service is None else Mirror(service, share)


def _redirect(doc: _Doc, path: str, value: object) -> Redirect:
    spec = _mapping(doc, path, value, ("scheme", "hostname", "path", "port", "statusCode"))
    scheme = spec.get("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        doc.fail(f"{path}.scheme", scheme, "http or https")
    hostname = spec.get("hostname")
    if hostname is not None:
        hostname = _pattern(doc, f"{path}.hostname", hostname, _PRECISE_HOSTNAME, "a hostname (RFC 1123, no IP)")
    modifier = None if spec.get("path") is None else _path_modifier(doc, f"{path}.path", spec["path"])
    port = spec.get("port")
    if port is not None:
        port = _integer(doc, f"{path}.port", port, 1, 65535)
    status = spec.get("statusCode", 302)
    if isinstance(status, bool) or status not in _REDIRECT_CODES:
        doc.fail(f"{path}.statusCode", status, "one of 301, 302, 303, 307, 308")
    return Redirect(scheme, hostname, modifier, port, status)


def _rewrite(doc: _Doc, path: str, value: object) -> URLRewrite:
    spec = _mapping(doc, path, value, ("hostname", "path"))
    hostname = spec.get("hostname")
    if hostname is not None:
        hostname = _pattern(doc, f"{path}.hostname", hostname, _PRECISE_HOSTNAME, "a hostname (RFC 1123, no IP)")
    modifier = None if spec.get("path") is None else _path_modifier(doc, f"{path}.path", spec["path"])
    return URLRewrite(hostname, modifier)


def _filters(ctx: _Context, doc: _Doc, path: str, value: object, namespace: str) -> Filters:
    items = _list(doc, path, value, 16)
    if not items:
        return NO_FILTERS
    types: list[str] = []
    found: dict[str, Any] = {"mirrors": []}
    for index, entry in enumerate(items):
        where = f"{path}[{index}]"
        spec = _mapping(doc, where, entry, ("type", *_FILTER_FIELDS.values()))
        kind = spec.get("type")
        if kind not in _FILTER_FIELDS:
            doc.fail(f"{where}.type", kind, "one of " + ", ".join(_FILTER_FIELDS))
        own = _FILTER_FIELDS[kind]
        for other in _FILTER_FIELDS.values():
            if other != own and spec.get(other) is not None:
                doc.fail(f"{where}.{other}", spec[other], f"no {other} when type is {kind}")
        if spec.get(own) is None:
            doc.fail(f"{where}.{own}", None, f"{own} set when type is {kind}")
        if kind in _NOT_REPEATED and kind in types:
            doc.fail(f"{where}.type", kind, f"at most one {kind} filter")
        types.append(kind)
        body = spec[own]
        if kind in ("CORS", "ExternalAuth"):
            doc.fail(f"{where}.type", kind, "a filter meshlib supports (CORS and ExternalAuth are not supported)")
        if kind == "RequestHeaderModifier":
            found["request_headers"] = _header_modifier(doc, f"{where}.{own}", body)
        elif kind == "ResponseHeaderModifier":
            found["response_headers"] = _header_modifier(doc, f"{where}.{own}", body)
        elif kind == "RequestRedirect":
            found["redirect"] = _redirect(doc, f"{where}.{own}", body)
        elif kind == "URLRewrite":
            found["rewrite"] = _rewrite(doc, f"{where}.{own}", body)
        elif kind == "RequestMirror":
            mirror = _mirror(ctx, doc, f"{where}.{own}", body, namespace)
            if mirror is not None:
                found["mirrors"].append(mirror)
        else:  # ExtensionRef
            ref = _mapping(doc, f"{where}.{own}", body, ("group", "kind", "name"))
            group, ref_kind, name = ref.get("group"), ref.get("kind"), ref.get("name")
            if group != FAULT_GROUP or ref_kind != FAULT_KIND:
                doc.fail(
                    f"{where}.{own}", body, f"an extension meshlib supports (group {FAULT_GROUP}, kind {FAULT_KIND})"
                )
            name = _pattern(doc, f"{where}.{own}.name", name, _PRECISE_HOSTNAME, "an HTTPFault name (RFC 1123)")
            if "fault" in found:
                doc.fail(f"{where}.{own}", body, "at most one HTTPFault per rule or backend")
            fault = ctx.faults.get((namespace, name))
            if fault is None:
                known = ", ".join(sorted(f"{ns}/{n}" for ns, n in ctx.faults)) or "none"
                doc.fail(f"{where}.{own}.name", name, f"an HTTPFault in namespace {namespace} (defined: {known})")
            found["fault"] = fault
    if "RequestRedirect" in types and "URLRewrite" in types:
        doc.fail(path, "RequestRedirect and URLRewrite", "either RequestRedirect or URLRewrite, not both")
    found["mirrors"] = tuple(found["mirrors"])
    return Filters(**found)


def _uses_prefix_replace(filters: Filters) -> bool:
    for modifier in (filters.rewrite, filters.redirect):
        if modifier is not None and modifier.path is not None and modifier.path.kind == "ReplacePrefixMatch":
            return True
    return False


def _path_match(doc: _Doc, path: str, value: object) -> PathMatch:
    spec = _mapping(doc, path, value, ("type", "value"))
    kind = spec.get("type", "PathPrefix")
    text = spec.get("value", "/")
    if kind not in ("Exact", "PathPrefix", "RegularExpression"):
        doc.fail(f"{path}.type", kind, "Exact, PathPrefix or RegularExpression")
    text = _string(doc, f"{path}.value", text, max_len=1024)
    if kind == "RegularExpression":
        return PathMatch(kind, text, _regex(doc, f"{path}.value", text))
    where = f"{path}.value"
    if not text.startswith("/"):
        doc.fail(where, text, "an absolute path starting with '/'")
    for bad in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if bad in text:
            doc.fail(where, text, f"a path without {bad!r}")
    if text.endswith(("/..", "/.")):
        doc.fail(where, text, "a path not ending with '/.' or '/..'")
    if _PATH_CHARS.fullmatch(text) is None:
        doc.fail(where, text, "a path of unreserved, sub-delim, ':', '@', '/' or %XX characters")
    if kind == "PathPrefix" and len(text) > 1:
        text = text.rstrip("/") or "/"
    return PathMatch(kind, text)


def _value_matches(
    doc: _Doc, path: str, value: object, *, header: bool
) -> list[tuple[str, ValueKind, str, re.Pattern[str] | None]]:
    items = _list(doc, path, value, 16)
    names: set[str] = set()
    equivalent: set[str] = set()
    out: list[tuple[str, ValueKind, str, re.Pattern[str] | None]] = []
    max_value = 4096 if header else 1024
    for index, entry in enumerate(items):
        where = f"{path}[{index}]"
        spec = _mapping(doc, where, entry, ("type", "name", "value"))
        name = _pattern(
            doc, f"{where}.name", spec.get("name"), _HEADER_NAME, "a name of RFC 7230 token characters", max_len=256
        )
        if name in names:
            doc.fail(f"{where}.name", name, "names unique in the list")
        names.add(name)
        kind: ValueKind = spec.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            doc.fail(f"{where}.type", kind, "Exact or RegularExpression")
        text = _header_value(doc, f"{where}.value", spec.get("value"), max_value)
        regex = _regex(doc, f"{where}.value", text) if kind == "RegularExpression" else None
        key = name.lower() if header else name
        if key in equivalent:  # the spec: only the first of equivalent names counts, later ones are ignored
            continue
        equivalent.add(key)
        out.append((key, kind, text, regex))
    return out


def _match(doc: _Doc, path: str, value: object) -> RouteMatch:
    spec = _mapping(doc, path, value, ("path", "headers", "queryParams", "method"))
    path_match = (
        PathMatch("PathPrefix", "/") if spec.get("path") is None else _path_match(doc, f"{path}.path", spec["path"])
    )
    method = spec.get("method")
    if method is not None and method not in _METHODS:
        doc.fail(f"{path}.method", method, "one of " + ", ".join(_METHODS))
    headers = tuple(
        HeaderMatch(*item) for item in _value_matches(doc, f"{path}.headers", spec.get("headers"), header=True)
    )
    query = tuple(
        QueryMatch(*item) for item in _value_matches(doc, f"{path}.queryParams", spec.get("queryParams"), header=False)
    )
    return RouteMatch(path_match, method, headers, query)


def _policy(doc: _Doc, path: str, timeouts: object, retry: object) -> Policy:
    fields: dict[str, Any] = {}
    if timeouts is not None:
        spec = _mapping(doc, f"{path}.timeouts", timeouts, ("request", "backendRequest"))
        request = backend = None
        if spec.get("request") is not None:
            request = _duration(doc, f"{path}.timeouts.request", spec["request"])
            fields["timeout"] = request or math.inf
        if spec.get("backendRequest") is not None:
            backend = _duration(doc, f"{path}.timeouts.backendRequest", spec["backendRequest"])
            fields["per_try_timeout"] = backend or math.inf
        if request and backend is not None and backend > request:
            doc.fail(
                f"{path}.timeouts.backendRequest",
                spec["backendRequest"],
                f"at most timeouts.request ({spec['request']})",
            )
    if retry is not None:
        spec = _mapping(doc, f"{path}.retry", retry, ("codes", "attempts", "backoff"))
        codes = spec.get("codes")
        if codes is not None:
            listed = _list(doc, f"{path}.retry.codes", codes, 100)
            for index, code in enumerate(listed):
                _integer(doc, f"{path}.retry.codes[{index}]", code, 400, 599)
            if len(set(listed)) != len(listed):
                doc.fail(f"{path}.retry.codes", codes, "a set of status codes (no repeats)")
            fields["retry_on"] = frozenset(listed)
        if spec.get("attempts") is not None:
            attempts = _integer(doc, f"{path}.retry.attempts", spec["attempts"], 1, None)
            fields["retries"] = min(attempts, MAX_RETRIES)
        if spec.get("backoff") is not None:
            backoff = _duration(doc, f"{path}.retry.backoff", spec["backoff"])
            fields["backoff_base"] = backoff
            fields["backoff_cap"] = backoff * 10
    return Policy(**fields) if fields else NO_POLICY


#: HTTPRoute annotations that set hedging for every rule of the route (Gateway API has no hedging field; Linkerd
#: sets retries and timeouts by HTTPRoute annotations the same way): annotation -> ``MESHLIB_HEDGE_*`` suffix.
HEDGE_ANNOTATIONS = {
    "hedge.meshlib.io/max-attempts": "MAX_ATTEMPTS",
    "hedge.meshlib.io/delay": "DELAY",
    "hedge.meshlib.io/non-fatal": "NON_FATAL",
    "hedge.meshlib.io/non-idempotent": "NON_IDEMPOTENT",
}


def _hedge_annotations(doc: _Doc, metadata: object) -> Policy:
    """The route's hedging layer from its ``hedge.meshlib.io/*`` annotations (values as the variables take)."""
    annotations = metadata.get("annotations") if isinstance(metadata, Mapping) else None
    if annotations is None:
        return NO_POLICY
    if not isinstance(annotations, Mapping):
        doc.fail("metadata.annotations", annotations, "an object of strings")
    fields: dict[str, str] = {}
    for key, suffix in HEDGE_ANNOTATIONS.items():
        raw = annotations.get(key)
        if raw is None:
            continue
        where = f"metadata.annotations[{key}]"
        if not isinstance(raw, str):
            doc.fail(where, raw, "a string (quote it in YAML)")
        try:
            hedge_from_env({f"HEDGE_{suffix}": raw}, "")  # checked one by one, so the error names the annotation
        except ConfigError as error:
            doc.fail(where, raw, error.expected)
        fields[f"HEDGE_{suffix}"] = raw
    if not fields:
        return NO_POLICY
    return Policy(hedge=hedge_from_env(fields, "")[0])


def _rule(ctx: _Context, doc: _Doc, route: str, index: int, value: object, *, namespace: str) -> tuple[Rule, int]:
    path = f"spec.rules[{index}]"
    spec = _mapping(
        doc, path, value, ("name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence")
    )
    if spec.get("sessionPersistence") is not None:
        doc.fail(f"{path}.sessionPersistence", spec["sessionPersistence"], "no sessionPersistence (unsupported)")
    name = spec.get("name")
    if name is not None:
        name = _pattern(doc, f"{path}.name", name, _SECTION_NAME, "a rule name (RFC 1123 subdomain)")
    raw_matches = _list(doc, f"{path}.matches", spec.get("matches"), 64)
    matches = tuple(_match(doc, f"{path}.matches[{i}]", m) for i, m in enumerate(raw_matches)) or (RouteMatch(),)
    filters = _filters(ctx, doc, f"{path}.filters", spec.get("filters"), namespace)
    backends = []
    refs = _list(doc, f"{path}.backendRefs", spec.get("backendRefs"), 16)
    prefix_replace = _uses_prefix_replace(filters)
    for i, entry in enumerate(refs):
        where = f"{path}.backendRefs[{i}]"
        ref = _mapping(doc, where, entry, (*_BACKEND_FIELDS, "weight", "filters"))
        weight = _integer(doc, f"{where}.weight", ref.get("weight", 1), 0, 1_000_000)
        port = ref.get("port")
        if port is not None:
            port = _integer(doc, f"{where}.port", port, 1, 65535)
        backend_filters = _filters(ctx, doc, f"{where}.filters", ref.get("filters"), namespace)
        prefix_replace = prefix_replace or _uses_prefix_replace(backend_filters)
        invalid = _backend_kind(doc, where, ref)
        if invalid is not None:
            _string(doc, f"{where}.name", ref.get("name"))
            backends.append(Backend(None, weight, backend_filters, port, invalid))
            continue
        service = _service(ctx, doc, where, ref, namespace)
        backends.append(Backend(service, weight, backend_filters, port))
    if refs and filters.redirect is not None:
        doc.fail(f"{path}.filters", "RequestRedirect", "no RequestRedirect filter in a rule with backendRefs")
    if prefix_replace and (len(matches) != 1 or matches[0].path.kind != "PathPrefix"):
        doc.fail(f"{path}.matches", raw_matches, "exactly one PathPrefix match with a ReplacePrefixMatch path modifier")
    policy = _policy(doc, path, spec.get("timeouts"), spec.get("retry"))
    rule = Rule(route, index, matches, filters, tuple(backends), policy, name)
    return rule, len(matches)


def _parents(doc: _Doc, value: object, namespace: str) -> list[tuple[str, str, int | None]]:
    """The route's Service parents as (name, namespace, port); other parents (Gateways...) are left out."""
    refs = _list(doc, "spec.parentRefs", value, 32)
    parents: list[tuple[str, str, int | None]] = []
    seen: dict[tuple[str, str, str, str], list[int | None]] = {}
    for index, entry in enumerate(refs):
        where = f"spec.parentRefs[{index}]"
        ref = _mapping(doc, where, entry, ("group", "kind", "namespace", "name", "sectionName", "port"))
        group = _pattern(doc, f"{where}.group", ref.get("group", "gateway.networking.k8s.io"), _GROUP, "an API group")
        kind = _pattern(doc, f"{where}.kind", ref.get("kind", "Gateway"), _KIND, "a Kubernetes kind", max_len=63)
        name = _string(doc, f"{where}.name", ref.get("name"))
        ns = ref.get("namespace")
        ns = namespace if ns is None else _pattern(doc, f"{where}.namespace", ns, _NAMESPACE, "a namespace", max_len=63)
        port = ref.get("port")
        if port is not None:
            port = _integer(doc, f"{where}.port", port, 1, 65535)
        section = ref.get("sectionName")
        if section is not None:
            _pattern(doc, f"{where}.sectionName", section, _SECTION_NAME, "a section name (RFC 1123 subdomain)")
        seen.setdefault((group, kind, ns, name), []).append(port if section is None else -1)
        if group not in ("", "core") or kind != "Service":
            continue
        if section is not None:
            doc.fail(f"{where}.sectionName", section, "no sectionName on a Service parent (unsupported: use port)")
        _pattern(doc, f"{where}.name", name, _PRECISE_HOSTNAME, "a Service name (RFC 1123)")
        parents.append((name, ns, port))
    for (_, _, ns, name), ports in seen.items():
        if len(ports) > 1 and (None in ports or len(set(ports)) != len(ports)):
            doc.fail(
                "spec.parentRefs", f"{ns}/{name}", "a distinct sectionName or port on each reference to one parent"
            )
    return parents


def _route(ctx: _Context, doc: _Doc, body: Mapping[str, Any], applies: Any) -> _Route | None:
    namespace, name, created = _metadata(doc, body.get("metadata"))
    spec = _mapping(doc, "spec", body.get("spec"), ("parentRefs", "hostnames", "rules", "useDefaultGateways"))
    if body.get("spec") is None:
        doc.fail("spec", None, "a spec")
    parents = _parents(doc, spec.get("parentRefs"), namespace)
    if not parents:
        logger.debug(
            "routes %s, %s: HTTPRoute %s/%s has no Service parent (a Gateway's): skipped",
            doc.source,
            doc.label,
            namespace,
            name,
        )
        return None
    if spec.get("useDefaultGateways") is not None:
        doc.fail("spec.useDefaultGateways", spec["useDefaultGateways"], "no useDefaultGateways on a mesh route")
    hostnames = _list(doc, "spec.hostnames", spec.get("hostnames"), 16)
    for index, hostname in enumerate(hostnames):
        _pattern(doc, f"spec.hostnames[{index}]", hostname, _HOSTNAME, "a hostname (RFC 1123, optional '*.' prefix)")
    if hostnames:
        logger.debug("routes %s, %s: spec.hostnames ignored on Service parents (GEP-1294)", doc.source, doc.label)
    route = _Route(namespace, name, created, parents)
    hedge = _hedge_annotations(doc, body.get("metadata"))
    ctx.check_services = applies(route)
    raw_rules = spec.get("rules")
    rules = _list(doc, "spec.rules", raw_rules, 16) if raw_rules is not None else [{}]
    if not rules:
        doc.fail("spec.rules", raw_rules, "at least one rule")
    total = 0
    names: set[str] = set()
    for index, entry in enumerate(rules):
        rule, count = _rule(ctx, doc, f"{namespace}/{name}", index, entry, namespace=namespace)
        if hedge is not NO_POLICY:
            rule = replace(rule, policy=hedge.merge(rule.policy))
        total += count
        if rule.name is not None:
            if rule.name in names:
                doc.fail(f"spec.rules[{index}].name", rule.name, "rule names unique within the route")
            names.add(rule.name)
        route.rules.append(rule)
    if total > 128:
        doc.fail("spec.rules", f"{total} matches", "at most 128 matches over all rules")
    return route


# -- precedence ---------------------------------------------------------------------------------------------------

_PATH_RANK = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}
_NEWEST = datetime.datetime.max.replace(tzinfo=datetime.timezone.utc)


def _precedence(match: RouteMatch, route: _Route, rule: Rule, match_index: int) -> tuple[Any, ...]:
    """The sort key of one (match, rule): Gateway API precedence, RegularExpression ranked as Istio does
    (Exact > PathPrefix > RegularExpression, then the longer value), then route age, name, rule and match order."""
    return (
        _PATH_RANK[match.path.kind],
        -len(match.path.value),
        match.method is None,
        -len(match.headers),
        -len(match.query),
        route.created or _NEWEST,  # no timestamp: as if created now (newer than any that has one)
        route.ident,
        rule.index,
        match_index,
    )


def _host_routes(service: str, routes: Sequence[_Route]) -> HostRoutes:
    keyed = []
    for route in routes:
        for rule in route.rules:
            for index, match in enumerate(rule.matches):
                keyed.append((_precedence(match, route, rule, index), match, rule))
    keyed.sort(key=lambda item: item[0])
    entries = tuple((match, rule) for _, match, rule in keyed)
    return HostRoutes(service, entries, any(match.query for match, _ in entries))


# -- the table ----------------------------------------------------------------------------------------------------


def parse_routes(
    text: str | bytes,
    *,
    source: str,
    services: Mapping[str, str],
    namespace: str | None = None,
    cluster_domain: str = "cluster.local",
) -> RouteTable:
    """Compile HTTPRoute (and meshlib ``HTTPFault``) documents into a :class:`RouteTable`.

    ``text``: YAML (``---``-separated documents) or JSON (an object, an array, or a ``List`` with ``items``).
    ``source`` names the text in errors (a file path). ``services`` maps service keys
    (:func:`meshlib._config.service_key`) to the client's configured service names: every backend and mirror
    must name one of them (a typo fails the load instead of answering 500s). ``namespace`` is the client's
    namespace (default ``"default"``): consumer routes of that namespace apply, others' do not (GAMMA).

    Raises :class:`~meshlib.errors.RoutesError` for anything the Gateway API CRDs would refuse, anything meshlib
    does not support, and input over the limits (:data:`MAX_TEXT`, :data:`MAX_DOCUMENTS`, :data:`MAX_DEPTH`,
    :data:`MAX_NODES`).
    """
    client_ns = namespace or "default"
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    version = hashlib.sha256(raw).hexdigest()[:16]
    documents = load_documents(text, source, error=RoutesError, what="routes")
    bodies: list[tuple[_Doc, Mapping[str, Any]]] = []
    faults: dict[tuple[str, str], Fault] = {}
    for label, value in documents:
        doc = _Doc(source, label)
        if not isinstance(value, Mapping):
            doc.fail("", value, "a Kubernetes object (apiVersion, kind, metadata, spec)")
        kind, api = value.get("kind"), value.get("apiVersion")
        name = value.get("metadata", {}).get("name") if isinstance(value.get("metadata"), Mapping) else None
        if isinstance(kind, str) and isinstance(name, str):
            shown = name if len(name) <= _SHOW_LIMIT and not _CONTROL.search(name) else str(_show(name))
            doc.label = f"{label} ({_show(kind) if _CONTROL.search(kind) else kind} {shown})"
        if kind == "HTTPRoute":
            if api not in _ROUTE_APIS:
                doc.fail("apiVersion", api, "gateway.networking.k8s.io/v1 or v1beta1")
            _mapping(doc, "", value, ("apiVersion", "kind", "metadata", "spec", "status"))
            bodies.append((doc, value))
        elif kind == FAULT_KIND and isinstance(api, str) and api.split("/")[0] == FAULT_GROUP:
            if api != _FAULT_API:
                doc.fail("apiVersion", api, _FAULT_API)
            _mapping(doc, "", value, ("apiVersion", "kind", "metadata", "spec"))
            fault_ns, fault_name, _ = _metadata(doc, value.get("metadata"))
            if (fault_ns, fault_name) in faults:
                doc.fail("metadata.name", fault_name, f"a unique HTTPFault name in namespace {fault_ns}")
            faults[(fault_ns, fault_name)] = _fault(doc, fault_name, value.get("spec"))
        else:
            if not isinstance(kind, str) or not isinstance(api, str):
                doc.fail(
                    "kind" if not isinstance(kind, str) else "apiVersion",
                    kind if not isinstance(kind, str) else api,
                    "a Kubernetes object (apiVersion and kind strings)",
                )
            logger.debug("routes %s, %s: %s %s skipped (not an HTTPRoute)", source, doc.label, api, kind)

    def applies(route: _Route) -> bool:
        # a producer route (parent in the route's namespace) applies to every client; a consumer route only to
        # clients of its own namespace (GEP-1294)
        return any(route.namespace in (ns, client_ns) for _, ns, _ in route.parents)

    ctx = _Context(services, faults, cluster_domain)
    routes: list[_Route] = []
    seen: set[str] = set()
    for doc, body in bodies:
        route = _route(ctx, doc, body, applies)
        if route is None:
            continue
        if route.ident in seen:
            doc.fail("metadata.name", route.name, f"a unique HTTPRoute name in namespace {route.namespace}")
        seen.add(route.ident)
        routes.append(route)
    return _table(
        routes, client_ns=client_ns, cluster_domain=cluster_domain, services=services, source=source, version=version
    )


def _table(
    routes: list[_Route],
    *,
    client_ns: str,
    cluster_domain: str,
    services: Mapping[str, str],
    source: str,
    version: str,
) -> RouteTable:
    # (parent name, parent namespace) -> port -> routes; producer and consumer routes kept apart
    producer: dict[tuple[str, str], dict[int | None, list[_Route]]] = {}
    consumer: dict[tuple[str, str], dict[int | None, list[_Route]]] = {}
    for route in routes:
        for name, ns, port in route.parents:
            if ns == route.namespace:
                group = producer
            elif route.namespace == client_ns:
                group = consumer
            else:
                continue  # another namespace's consumer route
            by_port = group.setdefault((name, ns), {})
            if route not in by_port.setdefault(port, []):
                by_port[port].append(route)
    chosen = dict(producer)
    chosen.update(consumer)  # consumer routes replace the producer's for this client (GEP-1294)
    compiled: dict[tuple[str, str], dict[int | None, HostRoutes]] = {}
    used: set[str] = set()
    for (name, ns), by_port in chosen.items():
        display = services.get(service_key(name), name)
        portless = by_port.get(None, [])
        table: dict[int | None, HostRoutes] = {}
        if portless:
            table[None] = _host_routes(display, portless)
        for port, attached in by_port.items():
            if port is not None:
                table[port] = _host_routes(display, [*attached, *(r for r in portless if r not in attached)])
        compiled[(name, ns)] = table
        used.update(route.ident for attached in by_port.values() for route in attached)
    keyed: dict[str, Mapping[int | None, HostRoutes]] = {}
    bare: dict[str, list[str]] = {}
    for (name, ns), table in compiled.items():
        for qualified in (f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{cluster_domain}"):
            keyed[service_key(qualified)] = table
        bare.setdefault(name, []).append(ns)
    for name, namespaces in bare.items():
        # the bare name is the parent in the client's namespace, or the only parent of that name
        if client_ns in namespaces:
            keyed[service_key(name)] = compiled[(name, client_ns)]
        elif len(namespaces) == 1:
            keyed[service_key(name)] = compiled[(name, namespaces[0])]
        else:
            logger.debug(
                "routes %s: %s is a parent in namespaces %s: call it as name.namespace", source, name, namespaces
            )
    return RouteTable(services=keyed, source=source, version=version, routes=tuple(sorted(used)))
