"""Authorization of inbound requests: :class:`AuthorizationHook` enforces Istio ``AuthorizationPolicy``
documents (:mod:`meshlib.security.authz`) before the application runs.

It runs after :class:`~meshlib.server.middleware.PeerIdentityHook` (the verified SPIFFE ID of the caller, or
none) and refuses denied requests with a 403 and a short reason (:class:`~meshlib.server.middleware.Refusal`),
so the application never sees them. Policies come from ``MESHLIB_AUTHZ_FILE`` (watched and hot-reloaded by
:class:`meshlib.control.file.FileSource`: validated whole, swapped atomically; an invalid version keeps the last
good one) or are given in code. The decision is written on the SERVER span (``meshlib.authz.decision``,
``meshlib.authz.policy``) and counted in ``meshlib.server.authz`` (the same two attributes; the policy is absent
when none decided: no ALLOW policy applies, or none of them matched). AUDIT matches are logged at INFO.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from meshlib.control.file import FileVersion
from meshlib.security.authz import Decision, PolicySet, header_map, parse_policies
from meshlib.server._watched import WatchedFileHook
from meshlib.server.middleware import InboundRequest, Refusal, peer_identity
from meshlib.telemetry.inbound import ServerSinks, current_server_span

__all__ = ["AUTHZ_FILE_VARIABLE", "DENIED_BODY", "AuthorizationHook"]

logger = logging.getLogger("meshlib.server")

#: The 403 body, Envoy's RBAC filter's words: which policy denied is for the operator (span, metric, DEBUG log),
#: not for the caller.
DENIED_BODY = "RBAC: access denied"

_NO_HEADERS: Mapping[str, str] = MappingProxyType({})
#: Distinct (decision, policy) attribute sets kept for reuse.
_ATTRIBUTE_SETS = 1024

#: Where the policies file is named.
AUTHZ_FILE_VARIABLE = "MESHLIB_AUTHZ_FILE"


def _parse(data: bytes, source: str) -> PolicySet:
    return parse_policies(data, source=source)


def _publish(hook: AuthorizationHook, policies: PolicySet, version: FileVersion) -> None:
    hook.policies = policies


class AuthorizationHook(WatchedFileHook[PolicySet]):
    """Refuses requests the policies deny (403), before the application; list it after the peer identity hook.

    ``policies``: a :class:`~meshlib.security.authz.PolicySet` given in code; ``file``: a policies file to load
    now (an invalid one is a :class:`~meshlib.ConfigError` here) and watch every ``reload_interval`` seconds
    (``0``: read once). ``meter_provider``: where the decision counter goes (default: the global provider).
    """

    def __init__(
        self,
        policies: PolicySet | None = None,
        *,
        file: str | None = None,
        reload_interval: float = 1.0,
        meter_provider: Any = None,
    ) -> None:
        if (policies is None) == (file is None):
            raise TypeError("AuthorizationHook takes policies= or file=, one of them")
        self._sinks = ServerSinks(meter_provider)
        self._attributes: dict[tuple[bool, str | None], dict[str, str]] = {}
        if file is not None:
            policies = self._watch(
                file, _parse, _publish, variable=AUTHZ_FILE_VARIABLE, interval=reload_interval, what="authz"
            )
        assert policies is not None
        #: The policies in force; replaced whole (one assignment) when the file changes.
        self.policies: PolicySet = policies

    def decide(self, request: InboundRequest) -> Decision:
        """The policies' decision for ``request`` (read while its hooks run: the peer identity is the verified one
        :class:`~meshlib.server.middleware.PeerIdentityHook` found), without acting on it.

        Only what some policy reads is collected: the headers, the source address and the port are skipped
        when no policy matches on them (a map of every header costs more than most evaluations).
        """
        policies = self.policies
        peer = peer_identity()
        address = request.peer_address() if policies.needs_source_ip else None
        return policies.evaluate_fields(
            None if peer is None else str(peer),
            None if address is None else address[0],
            request.method,
            request.path,
            request.server_port() if policies.needs_port else None,
            # repeated headers joined with "," as Envoy's matchers see them
            header_map(request.header_pairs()) if policies.needs_headers else _NO_HEADERS,
        )

    def __call__(self, request: InboundRequest) -> Any:
        decision = self.decide(request)
        key = (decision.allowed, decision.policy)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {"meshlib.authz.decision": "allow" if decision.allowed else "deny"}
            if decision.policy is not None:
                attributes["meshlib.authz.policy"] = decision.policy
            if len(self._attributes) < _ATTRIBUTE_SETS:  # policy names come from the file: bounded anyway
                self._attributes[key] = attributes
        span = current_server_span()
        if span is not None:
            span.set_attributes(attributes)
        for sink in self._sinks.current():
            sink.authz.add(1, attributes)
        if decision.audit:
            logger.info("authz audit: %s %s by policy %s", request.method, request.path[:200], decision.audit_policy)
        if not decision.allowed:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("authz: %s %s denied: %s", request.method, request.path[:200], decision.reason)
            raise Refusal(403, DENIED_BODY)
        return None
