"""Retry pushback between hops: only the layer next to a failure retries it.

With a chain A -> B -> C and C down, B's mesh client retries C within B's budget, then gives B's handler the
failure; B answers A with a 5xx. If A retried that 5xx too, every layer would multiply the load (3 layers of
"retry once" is 8x). gRPC solves this with retry pushback (``grpc-retry-pushback-ms``), Linkerd by
marking proxy errors. meshlib does the same over HTTP:

* while B's inbound middleware (:mod:`meshlib.server`) serves a request, a mesh call that ends with a
  *retryable* failure it did not (or could no longer) retry notes it here (:func:`note_exhausted`);
* if B's response is then a 5xx, the middleware adds :data:`NO_RETRY_HEADER` to it;
* A's mesh client treats a response carrying that header as final: it is not retried (it still counts
  against B's health like any 5xx).

Outside an inbound request (no middleware), nothing is recorded.
"""

from __future__ import annotations

import contextvars

#: Response header telling the caller's mesh client not to retry this answer: the retries happened downstream.
NO_RETRY_HEADER = "x-meshlib-no-retry"


class InboundState:
    """Per inbound request: whether a downstream mesh call gave up on a retryable failure."""

    __slots__ = ("exhausted",)

    def __init__(self) -> None:
        self.exhausted = False


_inbound: contextvars.ContextVar[InboundState | None] = contextvars.ContextVar("meshlib.inbound", default=None)


def begin_inbound() -> tuple[InboundState, contextvars.Token[InboundState | None]]:
    """Start tracking an inbound request (the middleware calls this); reset the token when it ends."""
    state = InboundState()
    return state, _inbound.set(state)


def end_inbound(token: contextvars.Token[InboundState | None]) -> None:
    """Stop tracking the inbound request started with :func:`begin_inbound`."""
    _inbound.reset(token)


def note_exhausted() -> None:
    """A mesh call made while serving an inbound request ended on a retryable failure it did not retry."""
    state = _inbound.get()
    if state is not None:
        state.exhausted = True


def should_mark(state: InboundState, status: int) -> bool:
    """Whether the inbound response with ``status`` must carry :data:`NO_RETRY_HEADER`."""
    return status >= 500 and state.exhausted
