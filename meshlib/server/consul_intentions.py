"""Consul intentions enforced inbound: :class:`ConsulIntentionsHook` refuses callers that intentions deny (403)
before the application runs, with the same body, span attributes and metric as
:class:`~meshlib.server.authz.AuthorizationHook`.

List it after :class:`~meshlib.server.middleware.PeerIdentityHook` (the verified SPIFFE ID of the caller); with
:class:`~meshlib.server.middleware.MeshMiddleware` / ``WSGIMeshMiddleware`` pass it in ``hooks=[...]``. The
decisions come from :class:`meshlib.security.consul_intentions.IntentionsAuthorizer` (cached per caller,
invalidated by a blocking query on the service's intentions); see ``docs/consul-intentions.md``.

Under ASGI the hook runs on the event loop: a cache miss (a caller not seen since the intentions last changed)
costs one ``authorize`` round trip to the local agent there, bounded by ``request_timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from meshlib.discovery.consul.agent import ConsulAgent
from meshlib.security.consul_intentions import IntentionDecision, IntentionsAuthorizer
from meshlib.server.authz import DENIED_BODY
from meshlib.server.middleware import InboundRequest, Refusal, peer_identity
from meshlib.telemetry.inbound import ServerSinks, current_server_span

__all__ = ["SERVICE_VARIABLE", "ConsulIntentionsHook"]

logger = logging.getLogger("meshlib.server")

#: Names this process's Consul service (the intentions' destination).
SERVICE_VARIABLE = "MESHLIB_CONSUL_SERVICE"
_DEFAULT_POLICY = "consul-default"
_ATTRIBUTE_SETS = 1024


def _serial(der: bytes | None) -> str | None:
    """The certificate's serial as Consul writes it (``connect.EncodeSerialNumber``: hex bytes joined by ``:``)."""
    if der is None:
        return None
    from cryptography import x509

    try:
        number = x509.load_der_x509_certificate(der).serial_number
    except ValueError:
        return None
    raw = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    return ":".join(f"{byte:02x}" for byte in raw)


class ConsulIntentionsHook:
    """Refuses requests Consul intentions deny (403), before the application; list it after the peer identity hook.

    ``authorizer``: an :class:`IntentionsAuthorizer` (started here if it is not); or ``service`` (default
    ``MESHLIB_CONSUL_SERVICE``) with the agent from the ``CONSUL_*`` variables of ``environ`` and ``options``
    for the authorizer. ``meter_provider``: where the decision counter goes. :meth:`close` stops an authorizer
    this hook built.
    """

    def __init__(
        self,
        authorizer: IntentionsAuthorizer | None = None,
        *,
        service: str | None = None,
        environ: Mapping[str, str] | None = None,
        meter_provider: Any = None,
        ready_timeout: float = 10.0,
        **options: Any,
    ) -> None:
        self._owned = authorizer is None
        if authorizer is None:
            import os

            env = os.environ if environ is None else environ
            name = service or env.get(SERVICE_VARIABLE, "").strip()
            if not name:
                from meshlib.errors import ConfigError

                raise ConfigError(SERVICE_VARIABLE, name, "the name of this service in Consul")
            authorizer = IntentionsAuthorizer(name, ConsulAgent.from_env(env), **options)
        self.authorizer = authorizer.start()
        if not self.authorizer.ready(ready_timeout):
            logger.warning(
                "consul intentions for %s: no intentions read from the agent yet; callers are decided by "
                "authorize until they are (and denied while the agent does not answer)",
                self.authorizer.service,
            )
        self._sinks = ServerSinks(meter_provider)
        self._attributes: dict[tuple[bool, str], dict[str, str]] = {}

    def close(self) -> None:
        if self._owned:
            self.authorizer.close()

    def decide(self, request: InboundRequest) -> IntentionDecision:
        """The intentions' decision for ``request`` (read while its hooks run), without acting on it."""
        peer = peer_identity()
        return self.authorizer.decide(
            None if peer is None else str(peer),
            request.method,
            request.path,
            request.header,
            lambda: _serial(request.peer_certificate()),
        )

    def __call__(self, request: InboundRequest) -> Any:
        decision = self.decide(request)
        key = (decision.allowed, decision.intention or _DEFAULT_POLICY)
        attributes = self._attributes.get(key)
        if attributes is None:
            attributes = {"meshlib.authz.decision": "allow" if decision.allowed else "deny"}
            attributes["meshlib.authz.policy"] = key[1]
            if len(self._attributes) < _ATTRIBUTE_SETS:
                self._attributes[key] = attributes
        span = current_server_span()
        if span is not None:
            span.set_attributes(attributes)
        for sink in self._sinks.current():
            sink.authz.add(1, attributes)
        if not decision.allowed:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("consul intentions: %s %s denied: %s", request.method, request.path[:200], decision.reason)
            raise Refusal(403, DENIED_BODY)
        return None
