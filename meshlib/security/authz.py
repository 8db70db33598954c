"""Istio ``AuthorizationPolicy`` documents (YAML or JSON) compiled into a :class:`PolicySet` for one workload.

:func:`parse_policies` is pure: text in, an immutable :class:`PolicySet` out, or an :class:`AuthzPolicyError`
(a :class:`~meshlib.errors.ConfigError`) naming the source, the document, the field path, the value found and
what was expected. :meth:`PolicySet.evaluate` decides one :class:`AuthzRequest` with Istio's order: any matching
DENY policy denies; else, when the set holds ALLOW policies, the request must match one of them; else it is
allowed. AUDIT policies only flag the decision (``Decision.audit``).

The set is for the one workload that reads it: ``metadata.namespace``, ``spec.selector`` and ``spec.targetRefs``
are accepted (a file written for Kubernetes loads unchanged) and do not scope anything; every policy in the file
applies. Anything meshlib cannot enforce as Istio would (``CUSTOM``, JWT fields, hosts, other ``when`` keys,
path templates, the dry-run annotation) is refused, never ignored: a policy that silently enforced less than it
says would fail open. docs/security.md (Authorization policies) lists the semantics and the choices made.

Matchers are compiled at parse time (exact values in frozensets, prefixes and suffixes in tuples for one
``str.startswith``/``endswith`` call, CIDRs as :mod:`ipaddress` networks), so an evaluation is a few attribute
tests per rule. Hostile input is bounded: text size, documents, nesting depth, nodes walked (a YAML alias
counts each time it is walked) and list lengths.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from meshlib.control.documents import MAX_DEPTH, MAX_DOCUMENTS, MAX_NODES, MAX_TEXT, list_field, load_documents
from meshlib.control.documents import show as _show
from meshlib.errors import SourceError

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENTS",
    "MAX_NODES",
    "MAX_TEXT",
    "MAX_VALUES",
    "Action",
    "AuthzPolicyError",
    "AuthzRequest",
    "Decision",
    "Policy",
    "PolicySet",
    "header_map",
    "parse_policies",
]

logger = logging.getLogger("meshlib")

#: Limits on one policy source (hostile or runaway input): refused above them.
#: At most this many rules per policy, sources/operations per rule (Istio's CRD: ``MaxItems=512``), and values
#: per field or conditions per rule.
MAX_ITEMS = 512
MAX_VALUES = 1024
_MAX_STRING = 1024

Action = Literal["ALLOW", "DENY", "AUDIT"]

_APIS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
_KIND = "AuthorizationPolicy"
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]+")
_HEADER_KEY = re.compile(r"request\.headers\[([^\]]*)\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPIFFE = "spiffe://"

_SOURCE_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks")
_OPERATION_FIELDS = ("methods", "notMethods", "paths", "notPaths", "ports", "notPorts")
#: Istio fields meshlib does not enforce, and why: refused with this explanation rather than ignored.
_UNSUPPORTED = {
    "requestPrincipals": "JWT request principals (meshlib authenticates peers by mTLS only)",
    "notRequestPrincipals": "JWT request principals (meshlib authenticates peers by mTLS only)",
    "remoteIpBlocks": "X-Forwarded-For / PROXY protocol addresses (meshlib sees the socket peer only: use ipBlocks)",
    "notRemoteIpBlocks": "X-Forwarded-For / PROXY protocol addresses (meshlib sees the socket peer only)",
    "serviceAccounts": "serviceAccounts (write principals: TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT)",
    "notServiceAccounts": "notServiceAccounts (write notPrincipals: TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT)",
    "trustDomains": "trustDomains (write principals with a prefix: TRUST_DOMAIN/*)",
    "notTrustDomains": "notTrustDomains (write notPrincipals with a prefix: TRUST_DOMAIN/*)",
    "hosts": "host matching (one workload: meshlib does not authorize by Host header)",
    "notHosts": "host matching (one workload: meshlib does not authorize by Host header)",
    "provider": "CUSTOM action providers (external authorization)",
}
_WHEN_KEYS = "request.headers[NAME], source.ip, source.namespace, source.principal, destination.port"


# -- errors -------------------------------------------------------------------------------------------------------


class AuthzPolicyError(SourceError):
    """An authorization policy source (``MESHLIB_AUTHZ_FILE``...) is invalid: names the source, the document,
    the field path, the value found and what was expected.

    A first version that fails refuses to start (no request is authorized by a policy that failed); a later
    version that fails is rejected and logged while the last good set keeps deciding.
    """


@dataclass(slots=True)
class _Doc:
    """Where errors point: the source and one document's label."""

    source: str
    label: str

    def fail(self, path: str, value: object, expected: str) -> NoReturn:
        raise AuthzPolicyError(self.source, self.label, path, _show(value), expected)


# -- requests and decisions ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthzRequest:
    """What a policy can see of one inbound request.

    ``principal``: the peer's verified SPIFFE ID with its scheme (``spiffe://td/ns/NS/sa/SA``), or ``None`` when
    the connection carried no verified identity (plain HTTP, TLS without a client certificate); anything not
    starting with ``spiffe://`` counts as no identity. ``source_ip``: the socket peer's address. ``method``:
    as sent (Istio's match is case-sensitive). ``path``: the decoded path without the query (ASGI
    ``scope["path"]``, WSGI ``PATH_INFO``); it is normalized before matching (see :meth:`PolicySet.evaluate`).
    ``port``: the local port the request arrived on. ``headers``: looked up by lower-case name, so pass a dict
    with lower-case keys (:func:`header_map`) or a case-insensitive mapping (httpx ``Headers``).
    """

    principal: str | None
    source_ip: str | None
    method: str
    path: str
    port: int | None
    headers: Mapping[str, str]

    @property
    def namespace(self) -> str | None:
        """The namespace named by the principal (``spiffe://td/ns/<ns>/sa/<sa>``), ``None`` if it names none."""
        return _identity(self.principal)[1]


def header_map(pairs: Iterable[tuple[str | bytes, str | bytes]]) -> dict[str, str]:
    """Request headers as :class:`AuthzRequest` wants them: lower-case names, repeated headers joined by ``,``
    (as Envoy presents them to its header matchers). Bytes (ASGI) are decoded as Latin-1."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        name = (raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name).lower()
        value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        previous = headers.get(name)
        headers[name] = value if previous is None else f"{previous},{value}"
    return headers


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :meth:`PolicySet.evaluate`.

    ``policy``/``action``/``rule``: the policy that decided (``namespace/name`` or ``name``), its action and the
    index of its first matching rule, all ``None`` when no policy decided (no policies, or none of the ALLOW
    policies matched). ``reason``: short printable text for a 403 body, a log line or a span attribute.
    ``audit``/``audit_policy``: an AUDIT policy matched (it never changes ``allowed``).
    """

    allowed: bool
    policy: str | None
    action: Action | None
    rule: int | None
    reason: str
    audit: bool = False
    audit_policy: str | None = None


# -- compiled matchers --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Strings:
    """Istio's string match over a list of values: exact ``abc``, prefix ``abc*``, suffix ``*abc``, presence ``*``
    (any non-empty value); the list matches when one value does."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    present: bool

    def match(self, value: str) -> bool:
        return (
            value in self.exact
            or (self.present and value != "")
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


#: A CIDR block compiled as ``(IP version, network address as an integer, netmask as an integer)``.
_Network = tuple[int, int, int]
#: An address as ``(IP version, integer)``.
_Address = tuple[int, int]


class _Attrs:
    """The request's attributes, derived once per evaluation (a plain slotted class: cheaper to build than a
    frozen dataclass, and never shared)."""

    __slots__ = ("headers", "ip", "method", "namespace", "path", "port", "principal")

    def __init__(  # noqa: PLR0917  # positional: built once per evaluation, on the hot path
        self,
        principal: str | None,
        namespace: str | None,
        ip: _Address | None,
        method: str,
        path: str,
        port: int | None,
        headers: Mapping[str, str],
    ) -> None:
        self.principal = principal  # without the scheme
        self.namespace = namespace
        self.ip = ip
        self.method = method
        self.path = path
        self.port = port
        self.headers = headers


def _in_networks(ip: _Address, networks: tuple[_Network, ...]) -> bool:
    """Whether ``ip`` (``(version, integer)``) is in one of ``networks`` (``(version, network, mask)``)."""
    version, value = ip
    for net_version, network, mask in networks:  # noqa: SIM110  # a loop is cheaper than any() over a generator
        if version == net_version and value & mask == network:
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> _Address | None:
    """A source address as ``(version, integer)``, IPv4-mapped IPv6 as IPv4; ``None`` if it is not an address.
    Cached (bounded, thread-safe): a workload sees the same peers again and again, and parsing costs microseconds.
    """
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.version, int(ip)


@dataclass(frozen=True, slots=True)
class _Source:
    """``from[].source``: every field set must match (AND); absent identity/IP never matches positively, and
    matches a negative field only outside ALLOW policies (``absent_negative``)."""

    principals: _Strings | None
    not_principals: _Strings | None
    namespaces: _Strings | None
    not_namespaces: _Strings | None
    ip_blocks: tuple[_Network, ...] | None
    not_ip_blocks: tuple[_Network, ...] | None
    absent_negative: bool

    def match(self, a: _Attrs) -> bool:
        principal = a.principal
        if self.principals is not None and (principal is None or not self.principals.match(principal)):
            return False
        if self.not_principals is not None and (
            not self.absent_negative if principal is None else self.not_principals.match(principal)
        ):
            return False
        namespace = a.namespace
        if self.namespaces is not None and (namespace is None or not self.namespaces.match(namespace)):
            return False
        if self.not_namespaces is not None and (
            not self.absent_negative if namespace is None else self.not_namespaces.match(namespace)
        ):
            return False
        ip = a.ip
        if self.ip_blocks is not None and (ip is None or not _in_networks(ip, self.ip_blocks)):
            return False
        return self.not_ip_blocks is None or (
            self.absent_negative if ip is None else not _in_networks(ip, self.not_ip_blocks)
        )


@dataclass(frozen=True, slots=True)
class _Operation:
    """``to[].operation``: every field set must match (AND)."""

    methods: _Strings | None
    not_methods: _Strings | None
    paths: _Strings | None
    not_paths: _Strings | None
    ports: frozenset[int] | None
    not_ports: frozenset[int] | None
    absent_negative: bool

    def match(self, a: _Attrs) -> bool:
        if self.methods is not None and not self.methods.match(a.method):
            return False
        if self.not_methods is not None and self.not_methods.match(a.method):
            return False
        if self.paths is not None and not self.paths.match(a.path):
            return False
        if self.not_paths is not None and self.not_paths.match(a.path):
            return False
        port = a.port
        if self.ports is not None and (port is None or port not in self.ports):
            return False
        return self.not_ports is None or (self.absent_negative if port is None else port not in self.not_ports)


_ConditionKind = Literal["header", "source.ip", "source.namespace", "source.principal", "destination.port"]


@dataclass(frozen=True, slots=True)
class _Condition:
    """One ``when`` entry: the attribute must match one of ``values`` (if set) and none of ``notValues``.

    A missing header is compared as Istio's Envoy header matcher does: it matches no value, so it satisfies
    ``notValues``. A missing identity, IP or port satisfies ``notValues`` only outside ALLOW policies."""

    kind: _ConditionKind
    header: str
    values: _Strings | tuple[_Network, ...] | frozenset[int] | None
    not_values: _Strings | tuple[_Network, ...] | frozenset[int] | None
    absent_negative: bool

    def _test(self, matcher: _Strings | tuple[_Network, ...] | frozenset[int], a: _Attrs) -> bool | None:
        """Whether the attribute matches ``matcher``; ``None`` when the request lacks the attribute."""
        kind = self.kind
        if kind == "header":
            value = a.headers.get(self.header)
            return None if value is None else isinstance(matcher, _Strings) and matcher.match(value)
        if kind in {"source.principal", "source.namespace"}:
            text = a.principal if kind == "source.principal" else a.namespace
            return None if text is None else isinstance(matcher, _Strings) and matcher.match(text)
        if kind == "source.ip":
            return None if a.ip is None else isinstance(matcher, tuple) and _in_networks(a.ip, matcher)
        return None if a.port is None else isinstance(matcher, frozenset) and a.port in matcher

    def match(self, a: _Attrs) -> bool:
        if self.values is not None and not self._test(self.values, a):
            return False
        if self.not_values is not None:
            hit = self._test(self.not_values, a)
            if hit is None:
                return self.kind == "header" or self.absent_negative
            if hit:
                return False
        return True


@dataclass(frozen=True, slots=True)
class _Rule:
    """A rule: one source (or none listed) AND one operation (or none listed) AND every condition."""

    sources: tuple[_Source, ...]
    operations: tuple[_Operation, ...]
    conditions: tuple[_Condition, ...]

    def match(self, a: _Attrs) -> bool:
        if self.sources:
            for source in self.sources:
                if source.match(a):
                    break
            else:
                return False
        if self.operations:
            for operation in self.operations:
                if operation.match(a):
                    break
            else:
                return False
        # a plain loop: cheaper than all() over a generator on the usual zero to two conditions
        for condition in self.conditions:  # noqa: SIM110
            if not condition.match(a):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Policy:
    """One compiled ``AuthorizationPolicy``: its name (``namespace/name``, or ``name`` without a namespace),
    action and rules (none: it matches no request)."""

    name: str
    action: Action
    rules: tuple[_Rule, ...]
    decision: Decision  # what a match of this policy decides (allow for ALLOW and AUDIT, deny for DENY)

    def first_match(self, a: _Attrs) -> int:
        """The index of the first rule matching, ``-1`` if none does."""
        for index, rule in enumerate(self.rules):
            if rule.match(a):
                return index
        return -1


_NO_POLICY = Decision(True, None, None, None, "allowed: no ALLOW policy applies")
_NO_MATCH = Decision(False, None, None, None, "denied: no ALLOW policy matched")


# -- path normalization -------------------------------------------------------------------------------------------


def _normalize(path: str) -> str:
    """``path`` with dot segments removed (RFC 3986 5.2.4) and repeated slashes merged, so ``/a/../admin`` and
    ``//admin`` are checked as ``/admin`` (Istio's ``MERGE_SLASHES`` normalization, on a decoded path)."""
    if not path.startswith("/"):
        path = "/" + path
    if "//" not in path and "/." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    trailing = segments[-1] in ("", ".", "..") and len(segments) > 2
    return "/" + "/".join(out) + ("/" if trailing and out else "")


@functools.lru_cache(maxsize=4096)  # bounded, thread-safe: a workload sees the same few callers again and again
def _identity(principal: str | None) -> tuple[str | None, str | None]:
    """``(principal without spiffe://, namespace)`` of a SPIFFE ID; ``(None, None)`` for no or another ID."""
    if principal is None or not principal.startswith(_SPIFFE) or len(principal) == len(_SPIFFE):
        return None, None
    ident = principal[len(_SPIFFE) :]
    parts = ident.split("/")
    namespace = parts[2] if len(parts) >= 5 and parts[1] == "ns" and parts[3] == "sa" and parts[2] else None
    return ident, namespace


# -- the set ------------------------------------------------------------------------------------------------------


class PolicySet:
    """The policies of one source, ready to evaluate; immutable and safe to share between threads."""

    __slots__ = ("_allow", "_audit", "_deny", "_needs_ip", "needs_headers", "needs_port", "policies")

    def __init__(self, policies: Sequence[Policy] = ()) -> None:
        self.policies: tuple[Policy, ...] = tuple(policies)
        self._deny = tuple(p for p in self.policies if p.action == "DENY")
        self._allow = tuple(p for p in self.policies if p.action == "ALLOW")
        self._audit = tuple(p for p in self.policies if p.action == "AUDIT")
        self._needs_ip = any(_reads(p, "source.ip") for p in self.policies)
        #: Whether any policy reads request headers / the destination port: a caller (the inbound hook) skips
        #: collecting what no policy reads (building a map of every header costs more than most evaluations).
        self.needs_headers: bool = any(_reads(p, "header") for p in self.policies)
        self.needs_port: bool = any(_reads(p, "destination.port") for p in self.policies)

    def __len__(self) -> int:
        return len(self.policies)

    @property
    def needs_source_ip(self) -> bool:
        """Whether any policy reads the source address (``ipBlocks``, ``source.ip``)."""
        return self._needs_ip

    def __repr__(self) -> str:
        return f"PolicySet({', '.join(f'{p.action} {p.name}' for p in self.policies)})"

    def evaluate(self, request: AuthzRequest) -> Decision:
        """Decide ``request`` in Istio's order: the first matching DENY policy denies; else, if there are ALLOW
        policies, the first matching one allows and none matching denies; else allow. AUDIT policies are
        evaluated too and only set ``audit``. Never raises on a request: an unparsable source IP counts as none.
        """
        return self.evaluate_fields(
            request.principal, request.source_ip, request.method, request.path, request.port, request.headers
        )

    def evaluate_fields(  # noqa: PLR0917  # positional: the inbound hook's hot path, without an AuthzRequest
        self,
        principal: str | None,
        source_ip: str | None,
        method: str,
        path: str,
        port: int | None,
        headers: Mapping[str, str],
    ) -> Decision:
        """:meth:`evaluate` with :class:`AuthzRequest`'s fields passed directly (saves building one per request)."""
        ident, namespace = _identity(principal)
        ip = _parse_ip(source_ip) if self._needs_ip and source_ip is not None else None
        a = _Attrs(ident, namespace, ip, method, _normalize(path), port, headers)
        decision = self._decide(a)
        for policy in self._audit:
            if policy.first_match(a) >= 0:
                return Decision(
                    decision.allowed,
                    decision.policy,
                    decision.action,
                    decision.rule,
                    decision.reason,
                    True,
                    policy.name,
                )
        return decision

    def _decide(self, a: _Attrs) -> Decision:
        denied = _first_decision(self._deny, a)
        if denied is not None:
            return denied
        if not self._allow:
            return _NO_POLICY
        allowed = _first_decision(self._allow, a)
        return _NO_MATCH if allowed is None else allowed


def _first_decision(policies: tuple[Policy, ...], a: _Attrs) -> Decision | None:
    """The decision of the first of ``policies`` that matches (with its rule's index), else ``None``."""
    for policy in policies:
        index = policy.first_match(a)
        if index >= 0:
            return policy.decision if index == 0 else _with_rule(policy.decision, index)
    return None


def _with_rule(decision: Decision, index: int) -> Decision:
    return Decision(decision.allowed, decision.policy, decision.action, index, decision.reason)


def _reads(policy: Policy, kind: _ConditionKind) -> bool:
    """Whether ``policy`` reads the request attribute ``kind``: in a ``when`` condition, or (for the source address
    and the port) in a source's ``ipBlocks`` or an operation's ``ports``."""
    for rule in policy.rules:
        if any(condition.kind == kind for condition in rule.conditions):
            return True
        if kind == "source.ip" and any(s.ip_blocks is not None or s.not_ip_blocks is not None for s in rule.sources):
            return True
        if kind == "destination.port" and any(o.ports is not None or o.not_ports is not None for o in rule.operations):
            return True
    return False


# -- typed field readers ------------------------------------------------------------------------------------------


def _mapping(doc: _Doc, path: str, value: object, allowed: Sequence[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        doc.fail(path, value, "an object")
    for key in value:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            if key in _UNSUPPORTED:
                doc.fail(where, key, f"a supported field: meshlib does not enforce {_UNSUPPORTED[key]}")
            doc.fail(where, key, "one of the fields " + ", ".join(allowed) + " (unknown fields are refused)")
    return value


_list = list_field


def _string(doc: _Doc, path: str, value: object) -> str:
    if not isinstance(value, str):
        doc.fail(path, value, "a string")
    if not 1 <= len(value) <= _MAX_STRING:
        doc.fail(path, value, f"a non-empty string of at most {_MAX_STRING} characters (Istio refuses empty values)")
    if _CONTROL.search(value):
        doc.fail(path, value, "a string without control characters")
    return value


def _strings(doc: _Doc, path: str, value: object, *, paths: bool = False) -> _Strings | None:
    """A list of Istio match strings compiled; ``None`` when the field is absent. An empty list is refused (Istio
    would read it as absent, which on a negative field silently drops the restriction)."""
    if value is None:
        return None
    items = _list(doc, path, value, MAX_VALUES)
    if not items:
        doc.fail(path, value, "at least one value (or leave the field out)")
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    present = False
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        text = _string(doc, where, item)
        if paths and ("{" in text or "}" in text):
            doc.fail(where, text, "a path without {*}/{**} templates (unsupported: use exact, /prefix*, *suffix or *)")
        if text == "*":
            present = True
        elif text.count("*") > 1 or "*" in text[1:-1]:
            doc.fail(where, text, "at most one * and only first or last (exact abc, prefix abc*, suffix *abc, or *)")
        elif text.endswith("*"):
            prefixes.append(text[:-1])
        elif text.startswith("*"):
            suffixes.append(text[1:])
        else:
            exact.add(text)
    return _Strings(frozenset(exact), tuple(prefixes), tuple(suffixes), present)


def _ip_blocks(doc: _Doc, path: str, value: object) -> tuple[_Network, ...] | None:
    if value is None:
        return None
    items = _list(doc, path, value, MAX_VALUES)
    if not items:
        doc.fail(path, value, "at least one value (or leave the field out)")
    networks: list[_Network] = []
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        text = _string(doc, where, item)
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            doc.fail(where, text, "an IP address (203.0.113.4) or CIDR block (203.0.113.0/24, 2001:db8::/32)")
        networks.append((network.version, int(network.network_address), int(network.netmask)))
    return tuple(networks)


def _ports(doc: _Doc, path: str, value: object) -> frozenset[int] | None:
    if value is None:
        return None
    items = _list(doc, path, value, MAX_VALUES)
    if not items:
        doc.fail(path, value, "at least one value (or leave the field out)")
    ports: set[int] = set()
    for index, item in enumerate(items):
        where = f"{path}[{index}]"
        # Istio writes ports as strings ("8080"); a YAML integer is accepted too.
        text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
        if not isinstance(text, str) or not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 65535:
            doc.fail(where, item, 'a port number from 0 to 65535 (as Istio writes it: "8080")')
        ports.add(int(text))
    return frozenset(ports)


# -- documents ----------------------------------------------------------------------------------------------------


def _source(doc: _Doc, path: str, value: object, absent_negative: bool) -> _Source:
    body = _mapping(doc, path, value, _SOURCE_FIELDS)
    if not body:
        doc.fail(path, value, "a source with at least one field (Istio refuses an empty source)")
    return _Source(
        _strings(doc, f"{path}.principals", body.get("principals")),
        _strings(doc, f"{path}.notPrincipals", body.get("notPrincipals")),
        _strings(doc, f"{path}.namespaces", body.get("namespaces")),
        _strings(doc, f"{path}.notNamespaces", body.get("notNamespaces")),
        _ip_blocks(doc, f"{path}.ipBlocks", body.get("ipBlocks")),
        _ip_blocks(doc, f"{path}.notIpBlocks", body.get("notIpBlocks")),
        absent_negative,
    )


def _operation(doc: _Doc, path: str, value: object, absent_negative: bool) -> _Operation:
    body = _mapping(doc, path, value, _OPERATION_FIELDS)
    if not body:
        doc.fail(path, value, "an operation with at least one field (Istio refuses an empty operation)")
    return _Operation(
        _strings(doc, f"{path}.methods", body.get("methods")),
        _strings(doc, f"{path}.notMethods", body.get("notMethods")),
        _strings(doc, f"{path}.paths", body.get("paths"), paths=True),
        _strings(doc, f"{path}.notPaths", body.get("notPaths"), paths=True),
        _ports(doc, f"{path}.ports", body.get("ports")),
        _ports(doc, f"{path}.notPorts", body.get("notPorts")),
        absent_negative,
    )


def _condition(doc: _Doc, path: str, value: object, absent_negative: bool) -> _Condition:
    body = _mapping(doc, path, value, ("key", "values", "notValues"))
    key = _string(doc, f"{path}.key", body.get("key"))
    kind: _ConditionKind
    header = ""
    found = _HEADER_KEY.fullmatch(key)
    if found is not None:
        if _HEADER_NAME.fullmatch(found.group(1)) is None:
            doc.fail(f"{path}.key", key, "request.headers[NAME] with NAME an HTTP header name")
        kind, header = "header", found.group(1).lower()
    elif key in ("source.ip", "source.namespace", "source.principal", "destination.port"):
        kind = key  # type: ignore[assignment]  # one of the literal values, checked just above
    else:
        doc.fail(f"{path}.key", key, f"one of the supported keys {_WHEN_KEYS}")
    if body.get("values") is None and body.get("notValues") is None:
        doc.fail(path, value, "values or notValues (Istio requires at least one)")

    def compile_values(field: str) -> _Strings | tuple[_Network, ...] | frozenset[int] | None:
        where, raw = f"{path}.{field}", body.get(field)
        if kind == "source.ip":
            return _ip_blocks(doc, where, raw)
        if kind == "destination.port":
            return _ports(doc, where, raw)
        return _strings(doc, where, raw)

    return _Condition(kind, header, compile_values("values"), compile_values("notValues"), absent_negative)


def _rule(doc: _Doc, path: str, value: object, absent_negative: bool) -> _Rule:
    body = _mapping(doc, path, value, ("from", "to", "when"))
    sources = []
    for index, item in enumerate(_list(doc, f"{path}.from", body.get("from"), MAX_ITEMS)):
        where = f"{path}.from[{index}]"
        entry = _mapping(doc, where, item, ("source",))
        if entry.get("source") is None:
            doc.fail(f"{where}.source", None, "a source (Istio refuses a from entry without one)")
        sources.append(_source(doc, f"{where}.source", entry["source"], absent_negative))
    operations = []
    for index, item in enumerate(_list(doc, f"{path}.to", body.get("to"), MAX_ITEMS)):
        where = f"{path}.to[{index}]"
        entry = _mapping(doc, where, item, ("operation",))
        if entry.get("operation") is None:
            doc.fail(f"{where}.operation", None, "an operation (Istio refuses a to entry without one)")
        operations.append(_operation(doc, f"{where}.operation", entry["operation"], absent_negative))
    conditions = [
        _condition(doc, f"{path}.when[{index}]", item, absent_negative)
        for index, item in enumerate(_list(doc, f"{path}.when", body.get("when"), MAX_ITEMS))
    ]
    return _Rule(tuple(sources), tuple(operations), tuple(conditions))


def _policy(doc: _Doc, body: Mapping[str, Any]) -> Policy:
    metadata = _mapping(
        doc,
        "metadata",
        body.get("metadata"),
        (
            "name",
            "namespace",
            "labels",
            "annotations",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "managedFields",
        ),
    )
    name = _string(doc, "metadata.name", metadata.get("name"))
    if len(name) > 253 or _NAME.fullmatch(name) is None:
        doc.fail("metadata.name", name, "a Kubernetes object name (RFC 1123 subdomain)")
    namespace = metadata.get("namespace")
    if namespace is not None:
        namespace = _string(doc, "metadata.namespace", namespace)
        if len(namespace) > 63 or _NAMESPACE.fullmatch(namespace) is None:
            doc.fail("metadata.namespace", namespace, "a namespace (RFC 1123 label)")
    annotations = metadata.get("annotations")
    if isinstance(annotations, Mapping) and str(annotations.get("istio.io/dry-run", "false")).lower() != "false":
        doc.fail(
            "metadata.annotations.istio.io/dry-run",
            annotations["istio.io/dry-run"],
            '"false" or no annotation: dry-run policies are not supported (meshlib would enforce it)',
        )
    spec = _mapping(doc, "spec", body.get("spec"), ("selector", "targetRef", "targetRefs", "action", "rules"))
    if sum(spec.get(key) is not None for key in ("selector", "targetRef", "targetRefs")) > 1:
        doc.fail("spec", sorted(k for k in ("selector", "targetRef", "targetRefs") if k in spec), "only one of them")
    if spec.get("selector") is not None or spec.get("targetRefs") is not None or spec.get("targetRef") is not None:
        logger.debug("authz %s, %s: selector/targetRefs ignored (the file is for this workload)", doc.source, doc.label)
    action = spec.get("action", "ALLOW")
    if action is None:
        action = "ALLOW"
    if action == "CUSTOM":
        doc.fail("spec.action", action, "ALLOW, DENY or AUDIT (CUSTOM, external authorization, is not supported)")
    if action not in ("ALLOW", "DENY", "AUDIT"):
        doc.fail("spec.action", action, "ALLOW, DENY or AUDIT")
    absent_negative = action != "ALLOW"
    rules = tuple(
        _rule(doc, f"spec.rules[{index}]", item, absent_negative)
        for index, item in enumerate(_list(doc, "spec.rules", spec.get("rules"), MAX_ITEMS))
    )
    ident = f"{namespace}/{name}" if namespace else name
    if action == "DENY":
        decision = Decision(False, ident, "DENY", 0, f"denied by policy {ident}")
    else:
        decision = Decision(True, ident, action, 0, f"allowed by policy {ident}")
    return Policy(ident, action, rules, decision)


def parse_policies(text: str | bytes, *, source: str) -> PolicySet:
    """Parse and compile every ``AuthorizationPolicy`` in ``text`` (YAML documents, a JSON object or array, or a
    Kubernetes ``...List``); documents of other kinds are skipped. ``source`` names the text in errors
    (the file path, or the variable). Raises :class:`AuthzPolicyError` on the first invalid field."""
    policies: list[Policy] = []
    seen: set[str] = set()
    for label, value in load_documents(text, source, error=AuthzPolicyError, what="policies"):
        doc = _Doc(source, label)
        if not isinstance(value, Mapping):
            doc.fail("", value, "a Kubernetes object (apiVersion, kind, metadata, spec)")
        kind, api = value.get("kind"), value.get("apiVersion")
        if kind != _KIND:
            logger.debug("authz %s, %s: %s %s skipped (not an AuthorizationPolicy)", source, label, api, kind)
            continue
        meta = value.get("metadata")
        shown = meta.get("name") if isinstance(meta, Mapping) else None
        doc.label = f"{label} ({_KIND} {_show(shown) if _CONTROL.search(str(shown)) else shown})"
        if api not in _APIS:
            # a Linkerd policy.linkerd.io AuthorizationPolicy has the same kind: skipping it would fail open
            doc.fail("apiVersion", api, "security.istio.io/v1 or security.istio.io/v1beta1")
        _mapping(doc, "", value, ("apiVersion", "kind", "metadata", "spec", "status"))
        policy = _policy(doc, value)
        if policy.name in seen:
            doc.fail("metadata.name", policy.name, "a unique policy name (per namespace)")
        seen.add(policy.name)
        policies.append(policy)
    return PolicySet(policies)
