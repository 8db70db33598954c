"""One logical call through the mesh: its policy and deadline, the endpoints it tried, what each attempt meant.

:class:`Call` holds every per-call decision and does no I/O, so ``MeshTransport`` and
``AsyncMeshTransport`` share it and differ only in how they send and sleep. The order of the steps of one
attempt, and why:

1. **deadline** -- no attempt starts once the call's deadline (policy timeout, scope deadline, inbound
   budget; whichever is first) has passed: ``DeadlineExceeded``.
2. **pick** -- the balancer chooses among endpoints that are not ejected (outlier detection), whose breaker
   is not open, and, for a retry, that this call has not tried yet (falling back to tried ones). When fewer
   than half are healthy the ejections are ignored (panic mode, as Envoy). Every breaker open: fail fast
   with ``CircuitOpenError``.
3. **guard** -- the picked endpoint's breaker ``allow()``: a half-open breaker lets one probe through and
   refuses the rest, who pick again.
4. **send** -- the request carries the endpoint's URL, the logical ``Host``, timeouts no longer than the
   remaining budget (and the per-try timeout), and the remaining budget in ``grpc-timeout`` for the next hop.
5. **observe** -- one :class:`~meshlib.resilience.classify.Classification` of the answer feeds the breaker,
   the outlier detector, the EWMA and the retry decision alike, and the call's span and duration metric
   (:mod:`meshlib.telemetry`; trace context is injected in step 4, into the endpoint request only).

The retry decision (:meth:`Call.retry_signal`) says *whether a retry is wanted and safe*: retryable outcome,
safe to re-send (never sent, or idempotent / opted in), attempts left, a replayable body, time left. The
retry budget then has the last word (in :mod:`meshlib.resilience.retry`), and tenacity sleeps.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx
from opentelemetry.context import Context
from opentelemetry.trace import Span

from meshlib import pushback
from meshlib.balance.base import EndpointStats
from meshlib.deadline import DEADLINE_HEADER, encode_timeout
from meshlib.discovery.base import Endpoint
from meshlib.errors import CircuitOpenError, DeadlineExceeded, NoEndpointsError, OverloadedError
from meshlib.policy import POLICY_EXTENSION, Policy, effective
from meshlib.resilience.classify import (
    IDEMPOTENCY_KEY_HEADER,
    Classification,
    Outcome,
    classify_exception,
    classify_response,
    may_resend,
)
from meshlib.service import Active, Address, Service
from meshlib.telemetry.tracing import AttemptRecord, inject

if TYPE_CHECKING:
    from meshlib.telemetry.client import ClientTelemetry

logger = logging.getLogger("meshlib")

T = TypeVar("T")

#: ``response.extensions`` keys meshlib sets on mesh responses.
EXT_ENDPOINT = "meshlib.endpoint"
EXT_SERVICE = "meshlib.service"
EXT_ATTEMPTS = "meshlib.attempts"


class _ByAddress:
    """An ``exclude`` container for pickers: endpoints matched by address, whatever their weight or metadata."""

    __slots__ = ("addresses",)

    def __init__(self, addresses: set[Address] | frozenset[Address]) -> None:
        self.addresses = addresses

    def __contains__(self, endpoint: object) -> bool:
        return isinstance(endpoint, Endpoint) and (endpoint.host, endpoint.port) in self.addresses


def endpoint_url(url: httpx.URL, endpoint: Endpoint) -> httpx.URL:
    """``url`` with the endpoint's host and port: the same as ``url.copy_with(host=..., port=...)``.

    ``URL.copy_with`` re-parses and re-validates the whole URL (about 20 µs, most of the mesh's per-request
    cost). The URL was validated when the request was built and the endpoint's address when discovery
    returned it, so this replaces the two fields of httpx's parsed form directly. That form is private to
    httpx (hence the pinned version range and the fallback); ``tests/test_call.py`` checks that both paths
    give the same URL.
    """
    parsed = getattr(url, "_uri_reference", None)
    replace = getattr(parsed, "_replace", None)
    if replace is None:  # a future httpx: take the documented, slower path
        return url.copy_with(host=endpoint.url_host, port=endpoint.port)
    port: int | None = endpoint.port
    if _DEFAULT_PORTS.get(url.scheme) == port:
        port = None  # httpx normalises a scheme's default port away
    fast = httpx.URL.__new__(httpx.URL)
    fast._uri_reference = replace(host=endpoint.host.lower(), port=port)
    return fast


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_NO_STATUSES: frozenset[int] = frozenset()


class RetrySignal(Exception):
    """An attempt failed in a way worth retrying; carries what the retry loop needs (never leaves meshlib).

    ``response`` is the attempt's response, still open, when there was one (a 503, a 429); ``error`` the
    exception otherwise. The transport closes the response before sleeping, or returns it if no retry comes.
    """

    def __init__(
        self,
        call: Call[Any],
        classification: Classification,
        *,
        response: httpx.Response | None = None,
        error: BaseException | None = None,
    ) -> None:
        super().__init__(classification.reason)
        self.call = call
        self.classification = classification
        self.response = response
        self.error = error


class Call(Generic[T]):
    """The state of one logical call (all its attempts). Created per mesh request; not shared."""

    __slots__ = (
        "attempts",
        "deadline",
        "limited",
        "method",
        "peer",
        "policy",
        "record",
        "replayable",
        "request",
        "service",
        "span",
        "span_context",
        "started",
        "telemetry",
        "tried",
        "tried_addresses",
        "verdict",
    )

    def __init__(self, service: Service[T], request: httpx.Request, telemetry: ClientTelemetry | None = None) -> None:
        self.started = time.monotonic()
        self.service = service
        self.request = request
        self.method = request.method
        rules = request.extensions.get(POLICY_EXTENSION)
        self.policy, self.deadline = effective(service.policy, rules if isinstance(rules, Policy) else None)
        self.attempts = 0
        self.tried: list[str] = []
        self.tried_addresses: set[Address] | None = None  # made on a retry: the first attempt needs none
        # A body already in memory can be sent again; a one-shot stream (generator, file) cannot.
        self.replayable = isinstance(request.stream, httpx.ByteStream)
        self.limited = False
        # Telemetry (meshlib.telemetry): the endpoint of the latest attempt and its verdict; the call's span
        # and the context injected into each attempt's headers, and the latest attempt's timestamps, only
        # while a tracer is configured.
        self.peer: Address | None = None
        self.verdict: Classification | None = None
        self.span: Span | None = None
        self.span_context: Context | None = None
        self.record: AttemptRecord | None = None
        self.telemetry = telemetry
        if telemetry is not None:
            telemetry.call_started(self)

    # -- before the first attempt -------------------------------------------------------------------------

    def admit(self) -> None:
        """Take a slot of the service's concurrency limit and count the call in the retry budget."""
        service = self.service
        if not service.limit.try_acquire():
            raise OverloadedError(
                service.name,
                f"{service.limit.max_inflight} requests already in flight (MESHLIB_MAX_INFLIGHT)",
                request=self.request,
            )
        self.limited = True
        service.budget.deposit()

    def release(self) -> None:
        """Give back the concurrency slot (once): when the response body is closed, or the call failed."""
        if self.limited:
            self.limited = False
            self.service.limit.release()

    # -- one attempt ----------------------------------------------------------------------------------------

    def remaining(self) -> float:
        """Seconds left before the call's deadline (may be negative)."""
        return self.deadline - time.monotonic()

    def prepare(self, active: Active[T]) -> tuple[EndpointStats, T, httpx.Request]:
        """Steps 1-4 up to the send: check the deadline, pick and guard an endpoint, build the request."""
        remaining = self.remaining()
        if remaining <= 0:
            raise self.deadline_exceeded("the deadline passed before an attempt could start")
        stats = self._pick(active)
        endpoint = stats.endpoint
        self.attempts += 1
        self.tried.append(endpoint.address)
        self.peer = address = (endpoint.host, endpoint.port)
        if self.tried_addresses is not None:
            self.tried_addresses.add(address)
        telemetry = self.telemetry
        if telemetry is not None and self.span is not None:
            telemetry.attempt_started(self)
        return stats, self.service.transport_for(stats), self._outgoing(endpoint, remaining)

    def _pick(self, active: Active[T]) -> EndpointStats:
        service = self.service
        key = service.hash_key(self.request)
        unhealthy = service.unhealthy()
        if unhealthy and service.detector.panic(len(active.stats), len(active.stats) - len(unhealthy)):
            unhealthy = service.open_breakers()  # panic: ignore ejections, never open breakers
        refused: set[Address] = set()
        for _ in range(len(active.stats) + 1):
            excluded = set(unhealthy) | refused
            stats = None
            if self.peer is not None:  # a retry prefers an endpoint this call has not tried
                tried = self.tried_addresses
                if tried is None:
                    tried = self.tried_addresses = {self.peer}
                stats = active.pick(key, _ByAddress(excluded | tried))
            if stats is None:
                stats = active.pick(key, _ByAddress(excluded) if excluded else ())
            if stats is None:
                break
            address = (stats.endpoint.host, stats.endpoint.port)
            breaker = service.breakers.get(address)
            if breaker is None or breaker.allow():
                return stats
            refused.add(address)  # half-open with its probe already out: choose another
        if refused or service.open_breakers():
            raise CircuitOpenError(
                service.name,
                "every usable endpoint's circuit breaker is open",
                endpoints=sorted(a.endpoint.address for a in active.stats.values()),
                request=self.request,
            )
        raise NoEndpointsError(service.name, service.resolver.source, "every endpoint is ejected or excluded")

    def _outgoing(self, endpoint: Endpoint, remaining: float) -> httpx.Request:
        """The request as sent to ``endpoint``: endpoint URL, logical Host and SNI, budgeted timeouts."""
        request = self.request
        extensions = dict(request.extensions)
        if request.url.scheme == "https" and "sni_hostname" not in extensions:
            extensions["sni_hostname"] = request.url.host
        per_try = self.policy.per_try_timeout
        budget = remaining if per_try is None or per_try <= 0 or per_try > remaining else per_try
        timeout = extensions.get("timeout")
        if isinstance(timeout, dict):
            extensions["timeout"] = {k: budget if v is None or v > budget else v for k, v in timeout.items()}
        else:
            extensions["timeout"] = {"connect": budget, "read": budget, "write": budget, "pool": budget}
        # A shallow clone, not httpx.Request(...): the constructor re-encodes and re-validates what httpx
        # already did for the caller's request. Same method, body stream and headers (copied, so the
        # caller's request is never modified); the endpoint's URL; this attempt's extensions.
        outgoing = object.__new__(httpx.Request)
        outgoing.__dict__.update(request.__dict__)
        outgoing.url = endpoint_url(request.url, endpoint)
        outgoing.headers = httpx.Headers(request.headers)
        outgoing.extensions = extensions
        if math.isfinite(remaining):
            outgoing.headers[DEADLINE_HEADER] = encode_timeout(remaining)
        inject(outgoing.headers, self.span_context)  # trace context and baggage: to mesh endpoints only
        return outgoing

    # -- after an attempt -----------------------------------------------------------------------------------

    def observe(self, address: Address, verdict: Classification, error: BaseException | None = None) -> None:
        """Feed one attempt's verdict to the endpoint's breaker and the service's outlier detector."""
        self.verdict = verdict
        if self.record is not None:
            self.record.finish(verdict, error)
        service = self.service
        if verdict.endpoint_failure:
            service.breaker_for(address).record_failure()
        else:
            breaker = service.breakers.get(address)  # none yet: the endpoint never failed, nothing to reset
            if breaker is not None:
                if verdict.sent or verdict.outcome is Outcome.SUCCESS:
                    breaker.record_success()
                else:
                    breaker.release()
        service.detector.record(address, verdict.endpoint_failure)

    def errored(self, address: Address, exc: Exception) -> BaseException:
        """Steps 5-6 for an attempt that raised: record the verdict; the exception the transport raises next.

        A :class:`RetrySignal` when a retry is wanted; else the caller's final error (``exc`` itself, or a
        clearer one of the same httpx type saying what failed and why it was not re-sent).
        """
        verdict = self.classify_error(exc)
        self.observe(address, verdict, exc)
        signal = self.retry_signal(verdict, error=exc)
        return signal if signal is not None else self.failure(exc, verdict)

    def answered(self, address: Address, response: httpx.Response) -> tuple[bool, RetrySignal | None]:
        """Steps 5-6 for an attempt that got a response: record the verdict.

        Returns whether the answer counts against the endpoint, and a :class:`RetrySignal` when a retry is
        wanted (the response is then still open, for the retry loop to close or to return).
        """
        verdict = self.classify(response)
        self.observe(address, verdict)
        return verdict.endpoint_failure, self.retry_signal(verdict, response=response)

    def classify(self, response: httpx.Response) -> Classification:
        """The verdict on a response, under this call's retry rules.

        A retryable answer that carries :data:`~meshlib.pushback.NO_RETRY_HEADER` was already retried by the
        hop that sent it (its own mesh client gave up): it is final here, so layers do not multiply retries.
        """
        verdict = classify_response(
            response.status_code,
            response.headers,
            retry_statuses=self.policy.retry_on or _NO_STATUSES,  # a frozenset already (Policy normalises it)
            retry_after_cap=self.policy.retry_after_cap or 300.0,
        )
        if verdict.outcome is Outcome.RETRYABLE and pushback.NO_RETRY_HEADER in response.headers:
            pushback.note_exhausted()  # and say so upstream in turn: no layer above retries it either
            return Classification(
                Outcome.FAILURE, verdict.sent, "retried-downstream", verdict.status, None, verdict.endpoint_failure
            )
        return verdict

    def classify_error(self, exc: BaseException) -> Classification:
        """The verdict on an exception raised while sending."""
        return classify_exception(exc)

    def retry_signal(
        self,
        verdict: Classification,
        *,
        response: httpx.Response | None = None,
        error: BaseException | None = None,
    ) -> RetrySignal | None:
        """A :class:`RetrySignal` when another attempt is wanted and safe, else ``None``.

        A retryable failure that is not retried here is the final answer of this call: while serving an
        inbound request, that is noted so the answer upstream says "already retried" (:mod:`meshlib.pushback`).
        """
        if verdict.outcome is not Outcome.RETRYABLE:
            return None
        if (
            self.attempts >= self.policy.max_attempts
            or self.remaining() <= 0
            or (verdict.sent and not self.replayable)  # a one-shot stream was consumed: it cannot be sent again
            or not may_resend(
                self.method,
                verdict,
                retry_non_idempotent=bool(self.policy.retry_non_idempotent),
                has_idempotency_key=IDEMPOTENCY_KEY_HEADER in self.request.headers,
            )
        ):
            pushback.note_exhausted()
            return None
        return RetrySignal(self, verdict, response=response, error=error)

    def failure(self, exc: BaseException, verdict: Classification) -> BaseException:
        """The exception the caller gets when an attempt's error is final: clear about what and why."""
        if isinstance(exc, httpx.TimeoutException) and self.remaining() <= 0.001:
            return self.deadline_exceeded(f"the last attempt timed out ({verdict.reason})")
        if not isinstance(exc, httpx.TransportError) or not isinstance(exc, Exception):
            return exc
        why = self._why_not_resent(verdict)
        if why is None:
            return exc
        message = (
            f"{self.method} {self.request.url} (service {self.service.name!r}) failed on "
            f"{', '.join(self.tried)}: {exc} [{verdict.reason}]; {why}"
        )
        try:
            clear = type(exc)(message, request=self.request)
        except Exception:  # an exception type with another constructor: keep the original
            return exc
        clear.__cause__ = exc
        return clear

    def _why_not_resent(self, verdict: Classification) -> str | None:
        if verdict.outcome is not Outcome.RETRYABLE:
            return None
        if verdict.sent and not self.replayable:
            return "not re-sent: the request body was a one-shot stream that has been consumed"
        if not may_resend(
            self.method,
            verdict,
            retry_non_idempotent=bool(self.policy.retry_non_idempotent),
            has_idempotency_key=IDEMPOTENCY_KEY_HEADER in self.request.headers,
        ):
            return (
                f"not re-sent: the server may have received it and {self.method} is not idempotent "
                "(send an Idempotency-Key header or use Policy(retry_non_idempotent=True) to allow it)"
            )
        return f"gave up after {self.attempts} attempt(s)"

    def deadline_exceeded(self, reason: str) -> DeadlineExceeded:
        """The error for a call whose deadline ran out."""
        return DeadlineExceeded(self.service.name, reason, endpoints=self.tried, request=self.request)

    def abandon(self, address: Address) -> None:
        """An attempt was interrupted (cancelled): give back the breaker's probe slot, record no verdict."""
        if self.record is not None:
            self.record.finish(None, None)
        breaker = self.service.breakers.get(address)
        if breaker is not None:
            breaker.release()

    def mark(self, response: httpx.Response, endpoint: str) -> None:
        """Tell the caller which endpoint answered and after how many attempts."""
        response.extensions[EXT_ENDPOINT] = endpoint
        response.extensions[EXT_SERVICE] = self.service.name
        response.extensions[EXT_ATTEMPTS] = self.attempts

    def finish(self, response: httpx.Response | None, error: BaseException | None = None) -> None:
        """The call is over for the caller (response headers arrived, or ``error``): end its span, measure it."""
        if self.telemetry is not None:
            self.telemetry.call_finished(self, response, error)
