"""What the route table decided for one call: :class:`Routed`, made by the mesh before the call plan runs.

The mesh (:meth:`meshlib._mesh._Mesh._route`) matches the request against the called service's routes, draws
the backend and the fault decisions from its random number generator, and hands the call a :class:`Routed`.
The call plan then only reads it: the backend service, the policy layer (the called service's policy merged
with the rule's), the request and response filters to apply, the fault to inject and the mirrors to send.
Requests the routes answer themselves (no rule matched: 404; a redirect; no usable backend: 500) never
become calls: :func:`local_answer` builds their response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlib.policy import Policy
    from meshlib.routing.model import Backend, Fault, HeaderModifier, Mirror, RouteMatch, Rule, URLRewrite

__all__ = ["EXT_LOCAL", "EXT_ROUTE", "ActiveLimit", "BackendChoice", "Routed", "local_answer", "no_backend", "no_route"]

#: ``response.extensions`` key: the rule a routed call matched (its label), on every routed response.
EXT_ROUTE = "meshlib.route"
#: ``response.extensions`` key: why meshlib answered a request itself (``no-route``, ``redirect``,
#: ``no-backend``, ``fault-abort``); absent on responses that came from a server.
EXT_LOCAL = "meshlib.local"


class ActiveLimit:
    """A count of things in progress with an optional limit, never waited on: a full limit means "not now".

    gRFC A33's ``max_active_faults`` for one fault filter in one client (taken when a fault is injected, given
    back when its call ends), and the cap on one client's mirrored requests in flight. A plain counter under a
    lock held for one addition.
    """

    __slots__ = ("_lock", "active", "injected", "limit")

    def __init__(self, limit: int | None) -> None:
        import threading

        self._lock = threading.Lock()
        self.limit = limit
        self.active = 0
        #: Slots taken so far (status view).
        self.injected = 0

    def try_take(self) -> bool:
        """Take a slot; ``False`` when ``limit`` are already active (no fault is injected, the mirror is dropped)."""
        with self._lock:
            if self.limit is not None and self.active >= self.limit:
                return False
            self.active += 1
            self.injected += 1
            return True

    def release(self) -> None:
        """Give a slot back (the faulted call or the mirror ended)."""
        with self._lock:
            self.active -= 1


class BackendChoice:
    """What a call routed to one backend of one rule needs, worked out once when the route table is installed
    (for each called service, rule and backend), so routing a call costs a few attribute reads.

    ``service`` is the backend's mesh service (the driver's type); ``base`` the call policy below scopes and
    request (the called service's policy merged with the rule's); ``sni`` the TLS server name when the backend
    is another service than the one called (its own name, so its own certificate is checked; ``None``: the
    called name); the header changes (rule's then backend's on the request; backend's then rule's on the
    response), the URL rewrite, mirrors and fault of the rule and backend together.
    """

    __slots__ = (
        "base",
        "fault",
        "mirrors",
        "request_modifiers",
        "response_modifiers",
        "rewrite",
        "service",
        "sni",
    )

    def __init__(self, rule: Rule, backend: Backend, service: Any, base: Policy, sni: str | None) -> None:
        self.service = service
        self.base = base
        self.sni = sni
        ours, theirs = rule.filters, backend.filters
        self.request_modifiers: tuple[HeaderModifier, ...] = tuple(
            m for m in (ours.request_headers, theirs.request_headers) if m is not None
        )
        self.response_modifiers: tuple[HeaderModifier, ...] = tuple(
            m for m in (theirs.response_headers, ours.response_headers) if m is not None
        )
        self.rewrite: URLRewrite | None = ours.rewrite or theirs.rewrite
        self.mirrors: tuple[Mirror, ...] = ours.mirrors + theirs.mirrors
        self.fault: Fault | None = ours.fault or theirs.fault


class Routed:
    """The route decision of one call: rule, match, backend (and its :class:`BackendChoice`), and the fault
    draws made for it."""

    __slots__ = ("abort_status", "backend", "choice", "delay_s", "fault_slot", "match", "rule")

    def __init__(self, rule: Rule, match: RouteMatch, backend: Backend, choice: BackendChoice) -> None:
        self.rule = rule
        self.match = match
        self.backend = backend
        #: What a call to this backend of this rule needs: policy base, TLS name, filters, mirrors, fault.
        self.choice = choice
        self.delay_s: float | None = None
        self.abort_status: int | None = None
        self.fault_slot: ActiveLimit | None = None

    def end(self) -> None:
        """The call ended: give back its fault slot, if it took one."""
        slot, self.fault_slot = self.fault_slot, None
        if slot is not None:
            slot.release()


def no_route(service: str, method: str, path: str) -> str:
    """Why a call got the routes' 404: no rule of ``service``'s routes matched (the request path and explain)."""
    return f"no route of service {service!r} matched {method} {path}"


def no_backend(rule: Rule, backend: Backend | None) -> str:
    """Why a call got the routes' 500: the matched rule had no backend to draw, or drew an invalid one."""
    if backend is None:
        why = "its backends' weights are all zero" if rule.backends else "it has no backends"
    else:
        why = f"the backend drawn is invalid ({backend.invalid or backend.service})"
    return f"route rule {rule.label} matched but {why}"


def local_answer(
    lib: Any, request: Any, status: int, *, why: str, reason: str, headers: list[tuple[str, str]] | None = None
) -> Any:
    """A response meshlib gives itself (no server involved): ``status`` with ``reason`` as a text body."""
    body = (reason + "\n").encode("utf-8", "replace")
    response = lib.Response(
        status,
        headers=[("content-type", "text/plain; charset=utf-8"), *(headers or [])],
        content=body,
        request=request,
    )
    response.extensions[EXT_LOCAL] = why
    return response
