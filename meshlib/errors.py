"""The typed errors meshlib raises, independent of the HTTP library.

These classes are the library-neutral kinds. A call made through ``meshlib.httpx.Client`` raises the httpx
flavour of each (``meshlib.httpx.DeadlineExceeded`` subclasses both :class:`DeadlineExceeded` and
``httpx.TimeoutException``), a call through ``meshlib.httpx2.Client`` the httpx2 flavour, so ``except
httpx.HTTPError`` (or ``httpx2.HTTPError``) keeps working around mesh calls, and ``except
meshlib.MeshError`` catches either. The request path raises the neutral kind and the client re-classes it
into its library's flavour on the way out (:meth:`meshlib._http.HttpLib.localize`); each class names the
exception family it belongs to in ``http_family``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar


class MeshError(Exception):
    """Base of every error meshlib raises (mixed into an httpx/httpx2 exception where one fits)."""

    #: The name of the HTTP library's exception this kind belongs to (``None``: it has none, e.g. a
    #: configuration error); each library's flavour subclasses that exception too.
    http_family: ClassVar[str | None] = None
    _request: Any = None


class ConfigError(MeshError, ValueError):
    """A configuration value is invalid: names the variable, the value and what was expected.

    Raised at client construction, never on the request path.
    """

    def __init__(self, variable: str, value: object, expected: str) -> None:
        self.variable = variable
        self.value = value
        self.expected = expected
        super().__init__(f"{variable}={value!r} is invalid: expected {expected}")


class ClientClosedError(MeshError, RuntimeError):
    """The client was closed: no request starts through it, and a call in flight makes no further attempt.

    A ``RuntimeError``, as httpx's own "the client has been closed" is. A call whose attempt was already on the
    wire when ``close()`` ran gets that attempt's answer (its connection is closed once the answer is read);
    only a retry, hedge or first attempt that would start after the close gets this error.
    """

    def __init__(self, service: str = "", reason: str = "the client is closed") -> None:
        self.service = service
        self.reason = reason
        where = f" (service {service!r})" if service else ""
        super().__init__(f"cannot send a request through a closed meshlib client{where}: {reason}")


class DiscoveryError(MeshError):
    """A discovery source could not answer (DNS timeout, NXDOMAIN, Consul down...)."""

    http_family = "TransportError"

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


def _tried(endpoints: tuple[str, ...]) -> str:
    return f"endpoints tried: {', '.join(endpoints)}" if endpoints else "no endpoint tried"


class _CallError(MeshError):
    """What the errors about one call to a service share: the service, the reason, the endpoints tried."""

    service: str
    reason: str
    endpoints: tuple[str, ...]

    def _record(self, service: str, reason: str, endpoints: Iterable[str]) -> str:
        """Keep the details as attributes; return ``"<reason> (endpoints tried: ...)"`` for the message."""
        self.service = service
        self.reason = reason
        self.endpoints = tuple(endpoints)
        return f"{reason} ({_tried(self.endpoints)})"


class CircuitOpenError(_CallError):
    """Every usable endpoint of a service has its circuit breaker open: the call failed fast, nothing was sent.

    Subclasses :class:`httpx.ConnectError` because that is what the caller would have seen had meshlib tried
    anyway (a connection that cannot be made), and because, like a connect error, it guarantees that the
    request never reached a server, so any method may safely be tried again later.
    ``endpoints`` lists the endpoints whose breakers were open (or were tried before they opened).
    """

    http_family = "ConnectError"

    def __init__(
        self,
        service: str,
        reason: str,
        *,
        endpoints: Iterable[str] = (),
        request: Any = None,
    ) -> None:
        details = self._record(service, reason, endpoints)
        super().__init__(f"circuit open for service {service!r}: {details}")
        self._request = request


class OverloadedError(_CallError):
    """The client already has the service's maximum number of requests in flight: refused at once, nothing sent.

    Subclasses :class:`httpx.PoolTimeout` because it is the same event as httpx's own: its connection pool
    raises ``PoolTimeout`` when ``Limits(max_connections=...)`` is reached and no connection frees up in time.
    meshlib's per-service in-flight cap is that limit with a zero wait (a bulkhead, not a queue that grows
    without bound), so code that already handles pool exhaustion handles this too, and a caller catching
    ``httpx.TimeoutException`` to "try again later" does the right thing.
    """

    http_family = "PoolTimeout"

    def __init__(
        self,
        service: str,
        reason: str,
        *,
        endpoints: Iterable[str] = (),
        request: Any = None,
    ) -> None:
        details = self._record(service, reason, endpoints)
        super().__init__(f"service {service!r} overloaded: {details}")
        self._request = request


class DeadlineExceeded(_CallError):
    """The call's overall deadline (covering every attempt and backoff) ran out before an answer arrived.

    Subclasses :class:`httpx.TimeoutException` so ``except httpx.TimeoutException`` keeps catching mesh calls
    that time out. An attempt may have reached a server before time ran out: do not assume it did not.
    ``timeout`` is the deadline the call had (seconds), when known.
    """

    http_family = "TimeoutException"

    def __init__(
        self,
        service: str,
        reason: str,
        *,
        endpoints: Iterable[str] = (),
        timeout: float | None = None,
        request: Any = None,
    ) -> None:
        details = self._record(service, reason, endpoints)
        self.timeout = timeout
        budget = f" of {timeout:g} s" if timeout is not None else ""
        super().__init__(f"deadline{budget} exceeded calling service {service!r}: {details}")
        self._request = request


class ConsulACLError(DiscoveryError):
    """Consul refused the ACL token (403), or filtered every instance out because the token lacks permission.

    A clear error rather than an empty service: the message says which token was used (the variable it came
    from, never its value) and what Consul answered, so the cause is fixed in the right place.
    """


class RedirectRefusedError(MeshError):
    """A host outside the mesh redirected the client to a mesh service: refused, nothing was sent to the service.

    A response from outside the mesh is not trusted to choose a mesh destination: following it would send the
    mesh's headers (trace context, deadline) and, with mTLS, the client's own identity to whatever mesh
    service the ``Location`` named (``302 Location: http://payments/admin``). Browsers and Envoy treat
    cross-origin redirects as untrusted the same way. Redirects from a mesh service (to the mesh or outside)
    and between outside hosts are followed as the HTTP library follows them.

    Subclasses the library's ``RequestError``, as its own ``TooManyRedirects`` does: a refusal of the
    redirect chain, not a transport failure, so code retrying transport errors does not retry it. ``source``
    and ``target`` are the two URLs without user info or query string; ``service`` is the mesh service.
    """

    http_family = "RequestError"

    def __init__(self, source: str, target: str, service: str, *, request: Any = None) -> None:
        self.source = source
        self.target = target
        self.service = service
        super().__init__(
            f"refused a redirect from {source} (outside the mesh) to {target} (mesh service {service!r}): a host "
            "outside the mesh may not send this client to a mesh service; to call it, send a new request "
            "to that URL yourself"
        )
        self._request = request


class SourceError(ConfigError):
    """A file of Kubernetes-style documents an operator wrote is invalid: names the source, the document
    (``document 2 (HTTPRoute payments)``), the field path, the value found and what was expected. The base of
    :class:`RoutesError`, ``AuthzPolicyError`` and ``RateLimitError``."""

    def __init__(self, source: str, document: str, path: str, value: object, expected: str) -> None:
        self.source = source
        self.document = document
        self.path = path
        where = f"{source}, {document}" if document else source
        super().__init__(f"{where}: {path}" if path else where, value, expected)


class RoutesError(SourceError):
    """A routes source (``MESHLIB_ROUTES_FILE``...) is invalid: names the source, the document, the field path,
    the value found and what was expected.

    Raised at client construction for the first version (nothing is routed on a table that failed); a later
    version that fails is rejected the same way, logged, and shown in ``mesh_status()`` while the last good
    table keeps serving (as an xDS NACK would).
    """
