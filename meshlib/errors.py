"""The typed errors meshlib raises.

Each subclasses the httpx exception a caller would already catch, so ``except httpx.HTTPError`` (or
``httpx.TransportError``) keeps working around mesh calls.
"""

from __future__ import annotations

import httpx


class MeshError(Exception):
    """Base of every error meshlib raises (mixed into an httpx exception where one fits)."""


class ConfigError(MeshError, ValueError):
    """A configuration value is invalid: names the variable, the value and what was expected.

    Raised at client construction, never on the request path.
    """

    def __init__(self, variable: str, value: object, expected: str) -> None:
        self.variable = variable
        self.value = value
        self.expected = expected
        super().__init__(f"{variable}={value!r} is invalid: expected {expected}")


class DiscoveryError(MeshError, httpx.TransportError):
    """A discovery source could not answer (DNS timeout, NXDOMAIN, Consul down...)."""

    def __init__(self, message: str, *, service: str = "", source: str = "") -> None:
        self.service = service
        self.source = source
        super().__init__(message)


class NoEndpointsError(DiscoveryError):
    """A mesh service has no endpoint to send to: discovery answered empty, failed, or went too stale."""

    def __init__(self, service: str, source: str, reason: str) -> None:
        super().__init__(
            f"no endpoints for service {service!r} (discovery {source}): {reason}", service=service, source=source
        )
        self.reason = reason
