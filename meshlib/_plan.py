"""The call plan: every decision of one mesh call, written once, as a sans-I/O generator.

:meth:`Call.plan` is a generator (the shape of httpx's ``Auth.auth_flow`` and of the discovery resolvers'
``_plan``): it yields *steps* and receives their outcomes, and never does I/O itself. Two drivers run it
(:mod:`meshlib._mesh`): a blocking one for ``Client`` and an awaiting one for ``AsyncClient``, each a few
dozen lines holding all the sending, sleeping and cancelling. The steps:

* :class:`Send` -- send one attempt now and come back with its outcome (the fast path: no task, no thread);
* :class:`Start` -- start an attempt and come back at once (several may then be in flight: hedging,
  mirroring);
* :class:`WaitFirst` -- wait until one of the started attempts has an outcome, or ``timeout`` seconds; the
  driver sends back that attempt, or ``None``;
* :class:`Cancel` -- stop an attempt (in flight: cancel it; answered: close its response) and release its
  lease;
* :class:`Sleep` -- wait (backoff between attempts).

The plan returns the caller's response (``StopIteration.value``) or raises the caller's error. Outcomes
reach the plan on the :class:`Attempt` object (``response`` or ``error``); an interruption of the driver
(cancellation, ``KeyboardInterrupt``) is thrown into the plan at its current step, so the plan releases what
it holds and re-raises.

One attempt, in order (docs/design.md):

1. **deadline** -- no attempt starts once the call's deadline has passed: ``DeadlineExceeded``;
2. **pick** -- the balancer chooses among endpoints not ejected and whose breaker is not open, preferring
   one this call has not tried; fewer than half healthy: ejections are ignored (panic mode, as Envoy);
3. **lease** -- the picked endpoint's breaker ``allow()`` (a half-open breaker lets one probe through), then
   a :class:`~meshlib._lease.Lease` that owns the attempt's bookkeeping until it is released;
4. **send** -- the request carries the endpoint's URL, the logical ``Host`` and TLS name, timeouts no longer
   than the time left (and the per-try timeout), the time left in ``grpc-timeout``, and trace context;
5. **observe** -- one :class:`~meshlib.resilience.classify.Classification` of the outcome is the lease's
   verdict (EWMA, breaker, outlier detection) and the observers' event;
6. **next** -- the call's :class:`~meshlib.resilience.retry.RetryRule` says "retry after X" or "give up".
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from meshlib._http import copy_request
from meshlib._lease import Lease, LeaseHome
from meshlib._testmode import MODE as _TESTING
from meshlib.deadline import DEADLINE_HEADER, encode_timeout
from meshlib.discovery.base import Endpoint
from meshlib.errors import CircuitOpenError, ClientClosedError, DeadlineExceeded, NoEndpointsError, OverloadedError
from meshlib.policy import POLICY_EXTENSION, Policy, effective
from meshlib.pushback import NO_RETRY_HEADER, note_exhausted
from meshlib.resilience.classify import (
    IDEMPOTENCY_KEY_HEADER,
    Classification,
    Outcome,
    classify_exception,
    classify_response,
)
from meshlib.resilience.classify import parse_retry_after as _parse_retry_after
from meshlib.resilience.hedging import NO_PUSHBACK, HedgeCall, HedgeDecision, HedgePolicy, hedge_pushback, hedgeable
from meshlib.resilience.retry import FINAL, GiveUp, RetryRule
from meshlib.routing.decision import EXT_ROUTE, Routed, local_answer
from meshlib.routing.filters import modify, rewritten_path
from meshlib.telemetry.tracing import inject

if TYPE_CHECKING:
    from meshlib._http import HttpLib
    from meshlib._service import Active, HostPort, Service
    from meshlib.balance.base import EndpointStats
    from meshlib.resilience.adaptive import AdaptiveConcurrencyLimit
    from meshlib.resilience.hedging import HedgeState
    from meshlib.resilience.limit import ConcurrencyLimit
    from meshlib.telemetry.client import CallTrace, ClientTelemetry

__all__ = [
    "EXT_ATTEMPTS",
    "EXT_ENDPOINT",
    "EXT_SERVICE",
    "Attempt",
    "Call",
    "Cancel",
    "Send",
    "Sleep",
    "Start",
    "Step",
    "WaitFirst",
    "endpoint_url",
    "path_and_query",
]

T = TypeVar("T")

#: ``response.extensions`` keys meshlib sets on mesh responses.
EXT_ENDPOINT = "meshlib.endpoint"
EXT_SERVICE = "meshlib.service"
EXT_ATTEMPTS = "meshlib.attempts"

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_DEADLINE_RAW = DEADLINE_HEADER.lower().encode("ascii")
_NO_STATUSES: frozenset[int] = frozenset()


# -- the steps --------------------------------------------------------------------------------------------------


class Attempt:
    """One attempt: the lease it holds, the request it sends, and (once the driver has it) its outcome."""

    __slots__ = ("abort", "deadline", "error", "hedge", "lease", "number", "request", "response", "task")

    def __init__(self, number: int, lease: Lease, request: Any, deadline: float | None = None) -> None:
        self.number = number
        #: A hedge (not the call's first attempt): its span says ``meshlib.hedge=true``.
        self.hedge = False
        #: The blocking driver's way to stop a started attempt on the wire (:class:`meshlib._bounded.Abort`).
        self.abort: Any = None
        self.lease = lease
        self.request = request
        #: When this attempt's socket operations end (``time.monotonic()``): the call's deadline or the per-try
        #: one if earlier; ``None``: unbounded. The driver binds it (:data:`meshlib._bounded.DEADLINE`).
        self.deadline = deadline
        self.response: Any = None
        self.error: Exception | None = None
        #: The driver's handle on a started attempt (a future or a task); ``None`` for a :class:`Send`.
        self.task: Any = None

    @property
    def transport(self) -> Any:
        """The endpoint's pooled inner transport to send through."""
        return self.lease.transport


class Send:
    """Send ``attempt`` now; the plan resumes when it has a response or an error."""

    __slots__ = ("attempt",)

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt


class Start:
    """Start ``attempt`` in the background; the plan resumes at once."""

    __slots__ = ("attempt",)

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt


class WaitFirst:
    """Wait for the first of ``attempts`` to finish (sent back) or ``timeout`` seconds (``None`` sent back)."""

    __slots__ = ("attempts", "timeout")

    def __init__(self, attempts: list[Attempt], timeout: float | None) -> None:
        self.attempts = attempts
        self.timeout = timeout


class Cancel:
    """Stop ``attempt`` (cancel it, or close the response it got) and release its lease."""

    __slots__ = ("attempt",)

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt


class Sleep:
    """Wait ``seconds`` before the plan goes on."""

    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


Step = Send | Start | WaitFirst | Cancel | Sleep
#: What a plan is: it yields steps, is sent attempts (or ``None``), and returns the caller's response.
Plan = Generator[Step, "Attempt | None", Any]


# -- the call -----------------------------------------------------------------------------------------------------


class _ByAddress:
    """An ``exclude`` container for pickers: endpoints matched by address, whatever their weight or metadata."""

    __slots__ = ("addresses",)

    def __init__(self, addresses: set[HostPort] | frozenset[HostPort]) -> None:
        self.addresses = addresses

    def __contains__(self, endpoint: object) -> bool:
        return isinstance(endpoint, Endpoint) and (endpoint.host, endpoint.port) in self.addresses


def endpoint_url(url: Any, endpoint: Endpoint) -> Any:
    """``url`` with the endpoint's host and port: the same as ``url.copy_with(host=..., port=...)``.

    ``URL.copy_with`` re-parses and re-validates the whole URL (about 20 µs, most of the mesh's per-request
    cost). The URL was validated when the request was built and the endpoint's address when discovery
    returned it, so this replaces the two fields of the parsed form directly. That form is private to httpx
    and httpx2 alike (a 7-field named tuple; hence the pinned version ranges and the fallback);
    ``tests/test_call.py`` checks that both paths give the same URL.
    """
    parsed: Any = getattr(url, "_uri_reference", None)
    parsed_type: Any = type(parsed)
    if getattr(parsed_type, "_fields", None) != _URI_FIELDS:  # a future release: the documented, slower path
        return url.copy_with(host=endpoint.url_host, port=endpoint.port)
    port: int | None = endpoint.port
    if _DEFAULT_PORTS.get(url.scheme) == port:
        port = None  # httpx normalises a scheme's default port away
    url_type = type(url)
    fast = object.__new__(url_type)
    # tuple.__new__ rather than namedtuple._replace: a third of the cost, the same value.
    fast._uri_reference = tuple.__new__(
        parsed_type, (parsed[0], parsed[1], endpoint.host.lower(), port, parsed[4], parsed[5], parsed[6])
    )
    return fast


_URI_FIELDS = ("scheme", "userinfo", "host", "port", "path", "query", "fragment")


def path_and_query(url: Any) -> tuple[str, str]:
    """The URL's path and query string as sent (percent-encoded, never decoded): what routes match on.

    Read from the parsed form both libraries keep (``URL.raw_path`` would encode it and the caller decode it
    again, per call), as :func:`endpoint_url` does; a future release without it takes ``raw_path``.
    """
    parsed: Any = getattr(url, "_uri_reference", None)
    if getattr(type(parsed), "_fields", None) == _URI_FIELDS:
        return parsed.path or "/", parsed.query or ""
    raw = url.raw_path.decode("ascii")
    path, _, query = raw.partition("?")
    return path, query


def routed_url(request: Any, routed: Routed) -> Any:
    """The logical URL a routed call's attempts go to: the caller's, or its path as a ``URLRewrite`` made it."""
    rewrite = routed.choice.rewrite
    url = request.url
    if rewrite is None or rewrite.path is None:
        return url
    path, query = path_and_query(url)
    new_path = rewritten_path(path, routed.match, rewrite.path)
    return url.copy_with(raw_path=(new_path + ("?" + query if query else "")).encode("ascii"))


def apply_request_filters(routed: Routed, headers: Any) -> None:
    """A routed attempt's headers: the request header filters, then a ``URLRewrite`` hostname as its ``Host``."""
    choice = routed.choice
    for modifier in choice.request_modifiers:
        modify(headers, modifier)
    rewrite = choice.rewrite
    if rewrite is not None and rewrite.hostname is not None:
        headers["Host"] = rewrite.hostname


def described_url(url: Any) -> str:
    """``url`` for an error message: no user info and no query string, which may carry credentials or keys.

    opentelemetry-util-http's ``redact_url`` (what spans follow) keeps most query values; an error message
    needs neither, so both are left out here.
    """
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}{url.path}" + ("?…" if url.query else "")


class Call(Generic[T]):
    """One logical call to a mesh service: its policy, deadline, attempts, and the plan that runs them.

    Created per mesh request by the driver, which then runs :meth:`plan`. Not shared between threads or tasks.
    """

    __slots__ = (
        "_rule",
        "attempts",
        "deadline",
        "home",
        "lib",
        "method",
        "peer",
        "permit",
        "policy",
        "replayable",
        "request",
        "routed",
        "service",
        "trace",
        "tried",
        "tried_addresses",
        "url",
        "verdict",
    )

    def __init__(
        self,
        lib: HttpLib,
        service: Service[T],
        request: Any,
        home: LeaseHome,
        telemetry: ClientTelemetry | None = None,
        *,
        routed: Routed | None = None,
    ) -> None:
        self.lib = lib
        self.service = service
        self.request = request
        self.home = home
        self.method = request.method
        #: The route decision (``None``: the called service has no routes) and the URL attempts are sent to:
        #: the caller's, or the one a ``URLRewrite`` filter made.
        self.routed = routed
        self.url = request.url if routed is None or routed.choice.rewrite is None else routed_url(request, routed)
        if service.tls_required and self.url.scheme == "http":  # the control plane asked for TLS: never plaintext
            self.url = self.url.copy_with(scheme="https")
        rules = request.extensions.get(POLICY_EXTENSION)
        base = service.policy if routed is None else routed.choice.base
        self.policy, self.deadline = effective(base, rules if isinstance(rules, Policy) else None)
        # A body already in memory can be sent again; a one-shot stream (generator, file) cannot.
        self.replayable = isinstance(request.stream, lib.ByteStream)
        self._rule: RetryRule | None = None  # made on the first retryable outcome: most calls never need it
        self.attempts = 0
        self.tried: list[str] = []
        self.tried_addresses: set[HostPort] | None = None  # made on a retry: the first attempt needs none
        self.peer: HostPort | None = None
        self.verdict: Classification | None = None
        #: The call's slot of the service's in-flight limit, until handed to the lease of the final answer.
        self.permit: ConcurrencyLimit | AdaptiveConcurrencyLimit | None = None
        self.trace: CallTrace | None = telemetry.call_started(request) if telemetry is not None else None
        if routed is not None and self.trace is not None:
            self.trace.routed(routed)

    @property
    def rule(self) -> RetryRule:
        """The call's retry rule (made on first use: a call that succeeds first time never asks it)."""
        rule = self._rule
        if rule is None:
            service = self.service
            rule = self._rule = RetryRule(
                self.policy,
                self.deadline,
                service.budget,
                method=self.method,
                replayable=self.replayable,
                has_idempotency_key=IDEMPOTENCY_KEY_HEADER in self.request.headers,
                on_budget_exhausted=service.log_budget_exhausted,
            )
        return rule

    # -- the plan -------------------------------------------------------------------------------------------------

    def plan(self, active: Active[T]) -> Plan:
        """Attempts until an answer is final, retrying as the call's :class:`RetryRule` allows."""
        sent: list[Attempt] = []  # attempts whose lease this plan must still settle if interrupted
        routed = self.routed
        try:
            if routed is not None and routed.fault_slot is not None:  # a fault filter chose this call
                if routed.delay_s is not None:
                    remaining = self.remaining()
                    yield Sleep(max(0.0, min(routed.delay_s, remaining)))
                    if routed.delay_s >= remaining:
                        raise self.deadline_exceeded(
                            f"the fault filter's {routed.delay_s:g}s delay outlasted the deadline"
                        )
                if routed.abort_status is not None:
                    response = self.fault_abort(routed.abort_status)
                    routed.end()
                    self.finished(response, None)
                    return response
            self.admit()
            hedge = self.policy.hedge
            if hedge is not None and (hedge.max_attempts or 1) > 1 and self._hedgeable(hedge):
                response = yield from self._hedged(active, hedge, sent)
                if routed is not None:
                    routed.end()
                self.finished(response, None)
                return response
            while True:
                attempt = self.attempt(active)
                sent.append(attempt)
                yield Send(attempt)
                verdict = self.judge(attempt)
                hedging = self.service.hedging
                if hedging.window is not None:  # a call hedges at a percentile of this service's latency
                    self._observe(hedging, attempt, verdict)
                decision = (
                    FINAL if verdict.outcome is not Outcome.RETRYABLE else self.rule.after(verdict, self.attempts)
                )
                if isinstance(decision, GiveUp):
                    sent.clear()
                    response = self.finish(attempt, verdict)
                    break
                sent.clear()
                yield Cancel(attempt)  # close the retried answer (its connection goes back to the pool)
                if decision > 0:
                    yield Sleep(decision)
                if self.home.closed:  # a retry would otherwise find no endpoints
                    raise self.closed_error()
                active = self.service.current()
        except BaseException as exc:
            for attempt in sent:  # interrupted with an attempt out: no verdict, give its lease back
                self.abandon(attempt)
            self.release_permit()
            if routed is not None:
                routed.end()
            self.finished(None, exc)
            raise
        if routed is not None:
            routed.end()
        self.finished(response, None)
        return response

    # -- hedging ----------------------------------------------------------------------------------------------

    def _hedgeable(self, hedge: HedgePolicy) -> bool:
        """Whether this call may be hedged: a copy may reach a second server, so only a request safe to send
        twice (idempotent method, ``Idempotency-Key``, or the policy's ``non_idempotent``) with a body in memory."""
        return self.replayable and hedgeable(
            self.method, has_idempotency_key=IDEMPOTENCY_KEY_HEADER in self.request.headers, policy=hedge
        )

    def _hedged(self, active: Active[T], hedge: HedgePolicy, sent: list[Attempt]) -> Generator[Step, Any, Any]:
        """gRFC A6 hedging: the first attempt now, another to an untried endpoint every delay (or at once after
        a non-fatal answer), each under the hedge budget and the retry budget; the first acceptable answer
        wins and every other attempt is cancelled at once (its server sees the disconnect), its lease released.

        ``sent`` is the plan's list of attempts to settle if interrupted: every attempt in flight (or held)
        is in it until it is finished or cancelled here.
        """
        service = self.service
        state = service.hedging
        state.budget.deposit()
        schedule = HedgeCall(hedge, state.delay_for(hedge))
        retry_after_cap = self.policy.retry_after_cap or 300.0
        first = self.attempt(active)
        sent.append(first)
        yield Start(first)
        schedule.start(time.monotonic())
        in_flight = [first]
        held: Attempt | None = None  # the last non-fatal answer, returned if nothing better comes
        held_verdict: Classification | None = None
        while True:
            now = time.monotonic()
            remaining = self.deadline - now
            if remaining <= 0:
                for attempt in list(sent):
                    sent.remove(attempt)
                    yield self.loser(attempt)
                raise self.deadline_exceeded("the deadline passed with every hedged attempt still out")
            due_at = schedule.next_at()
            timeout = remaining if due_at is None else max(0.0, min(due_at - now, remaining))
            done = yield WaitFirst(in_flight, None if timeout == math.inf else timeout)
            now = time.monotonic()
            if done is None:  # the delay passed (or the deadline: checked at the top)
                if schedule.due(now):
                    extra = self._hedge(active, state)
                    if extra is None:
                        schedule.skip()  # attempts in flight carry on
                    else:
                        sent.append(extra)
                        in_flight.append(extra)
                        yield Start(extra)
                        schedule.sent(now)
                continue
            in_flight.remove(done)
            verdict = self.judge(done)
            response = done.response
            if response is not None:
                status: int | None = response.status_code
                pushback = hedge_pushback(
                    response.status_code,
                    response.headers,
                    retry_after_cap=retry_after_cap,
                    parse_retry_after=_parse_retry_after,
                )
            else:  # an error: another endpoint may do better only if it is the endpoint's fault (A6 non-fatal)
                status = None if verdict.outcome is Outcome.RETRYABLE or verdict.endpoint_failure else 0
                pushback = NO_PUSHBACK
            decision = schedule.on_answer(now, status, pushback) if status != 0 else HedgeDecision.FAIL
            if decision is HedgeDecision.CONTINUE:
                if held is not None:
                    sent.remove(held)
                    yield Cancel(held)  # only the latest non-fatal answer is kept
                held, held_verdict = done, verdict
                if schedule.due(now) and in_flight:
                    continue  # the top of the loop waits 0 s and sends the next hedge
                if schedule.due(now):  # nothing in flight: send the next one now, or give up
                    extra = self._hedge(active, state)
                    if extra is None:
                        schedule.skip()
                        break  # return the held answer
                    sent.append(extra)
                    in_flight.append(extra)
                    yield Start(extra)
                    schedule.sent(now)
                elif not in_flight:  # pushback: the next hedge is due later (or never)
                    if schedule.next_at() is None:
                        break
                    wait = min(schedule.next_at() - now, self.remaining())  # type: ignore[operator]
                    if wait > 0:
                        yield Sleep(wait)
                    extra = self._hedge(active, state)
                    if extra is None:
                        schedule.skip()
                        break
                    sent.append(extra)
                    in_flight.append(extra)
                    yield Start(extra)
                    schedule.sent(time.monotonic())
                continue
            # ACCEPT or FAIL: this answer is the call's; EXHAUSTED: it is the last one there will be. A held
            # answer left in ``sent`` is cancelled with the attempts still in flight.
            held, held_verdict = done, verdict
            break
        assert held is not None and held_verdict is not None
        winner = held
        sent.remove(winner)
        now = time.monotonic()
        for loser in list(sent):  # cancel the others before the caller reads a byte: their servers stop now
            sent.remove(loser)
            if loser in in_flight:  # Finagle records a superseded attempt's time so far (a lower bound)
                state.record(now - loser.lease.started)
            yield self.loser(loser)
        cancelled = len(in_flight)
        if held_verdict.outcome is Outcome.SUCCESS:
            state.record(winner.lease.rtt)
        if winner.hedge or cancelled:
            state.count(won=1 if winner.hedge else 0, cancelled=cancelled)
        self.verdict = held_verdict
        self.peer = winner.lease.address
        return self.finish(winner, held_verdict)

    def _hedge(self, active: Active[T], state: HedgeState) -> Attempt | None:
        """The next hedge, or ``None``: no endpoint left untried (strictly: a hedge never goes where an attempt
        of this call went), no time left, or the hedge budget or the retry budget refuses."""
        if self.remaining() <= 0 or self.home.closed:
            return None
        tried = self.tried_addresses
        if tried is None and self.peer is not None:
            tried = self.tried_addresses = {self.peer}
        if tried is not None and len(tried) >= len(active.stats):
            return None  # every endpoint has one already: no budget spent on it
        if not state.budget.try_acquire(self.service.budget):
            return None
        active = self.service.current()  # discovery may have moved on since the first attempt
        stats = self._pick(active, strict=True)
        if stats is None:
            return None
        attempt = self._attempt_to(stats, hedge=True)
        attempt.hedge = True
        return attempt

    def _observe(self, state: HedgeState, attempt: Attempt, verdict: Classification) -> None:
        """Feed the latency window (Finagle records successes and timeouts, not fast failures)."""
        if verdict.outcome is Outcome.SUCCESS or isinstance(attempt.error, self.lib.TimeoutException):
            state.record(attempt.lease.rtt)

    def loser(self, attempt: Attempt) -> Cancel:
        """The step that cancels a hedge race's loser: no verdict on its endpoint (it was not at fault), and its
        time so far still counts against the endpoint's latency estimate."""
        lease = attempt.lease
        if not lease.judged:
            lease.failed = False
            lease.error = True  # its latency so far may raise the endpoint's estimate, never lower it
        return self.cancel(attempt)

    def fault_abort(self, status: int) -> Any:
        """The answer of a call the fault filter aborts: ``status``, made here, before any byte leaves."""
        response = local_answer(self.lib, self.request, status, why="fault-abort", reason="fault filter abort")
        assert self.routed is not None
        response.extensions[EXT_ROUTE] = self.routed.rule.label
        response.extensions[EXT_SERVICE] = self.service.name
        response.extensions[EXT_ATTEMPTS] = 0
        return response

    # -- the decisions ------------------------------------------------------------------------------------------

    def admit(self) -> None:
        """Apply the control plane's drops (once per call, as gRPC draws them), take a slot of the service's
        concurrency limit and count the call in the retry budget."""
        service = self.service
        drops = service.drops
        if drops is not None and drops.categories:  # an xDS cluster whose EDS assignment drops calls
            category = drops.draw()
            if category is not None:
                raise OverloadedError(
                    service.name,
                    f"dropped by the control plane: drop category {category!r} (EDS drop_overloads)",
                    request=self.request,
                )
        limit = service.limit
        if not limit.try_acquire():
            raise OverloadedError(
                service.name,
                f"{limit.max_inflight} requests already in flight ({service.limit_source})",
                request=self.request,
            )
        self.permit = limit
        service.budget.deposit()

    def release_permit(self, rtt: float | None = None) -> None:
        """Give back the call's in-flight slot if no lease took it (the call ended without an answer).

        ``rtt``: the final attempt's latency when it says something about the service's load (a timeout after
        the request was sent); ``None`` (no sample for an adaptive limit) for cancellations, local refusals and
        connection errors.
        """
        permit, self.permit = self.permit, None
        if permit is not None:
            permit.release(rtt)

    def remaining(self) -> float:
        """Seconds left before the call's deadline (may be negative)."""
        return self.deadline - time.monotonic()

    def attempt(self, active: Active[T]) -> Attempt:
        """Steps 1-4 up to the send: check the deadline, pick an endpoint, take its lease, build the request."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self.deadline_exceeded("the deadline passed before an attempt could start")
        if self.home.closed:
            raise self.closed_error()
        stats = self._pick(active)
        assert stats is not None  # only a strict pick finds none
        return self._attempt_to(stats, remaining)

    def _attempt_to(self, stats: EndpointStats, remaining: float | None = None, *, hedge: bool = False) -> Attempt:
        """Steps 3-4 for the endpoint picked: its lease and the request as sent there (``remaining``: seconds
        to the deadline, if the caller just read the clock)."""
        if remaining is None:
            remaining = self.deadline - time.monotonic()
        endpoint = stats.endpoint
        self.attempts += 1
        self.tried.append(endpoint.address)
        address = (endpoint.host, endpoint.port)
        if not hedge:  # a hedge is not the call's peer unless it wins (the plan says so then)
            self.peer = address
        if self.tried_addresses is not None:
            self.tried_addresses.add(address)
        service = self.service
        transport = service.transports.get(address)  # made on the endpoint's first request (transport_for)
        lease = Lease(service, stats, transport if transport is not None else service.transport_for(stats), self.home)
        trace = self.trace
        if trace is not None:
            trace.attempt_started(self.attempts, address, hedge=hedge)
        deadline: float | None = self.deadline
        per_try = self.policy.per_try_timeout
        if per_try is not None and 0 < per_try < remaining:
            deadline = self.deadline - remaining + per_try
        elif remaining == math.inf:
            deadline = None
        return Attempt(self.attempts, lease, self._outgoing(endpoint, remaining), deadline)

    def closed_error(self) -> ClientClosedError:
        """The error for an attempt that would start after the client was closed: none does."""
        done = self.attempts
        return ClientClosedError(
            self.service.name, f"closed during the call after {done} attempt(s)" if done else "the client is closed"
        )

    @overload
    def _pick(self, active: Active[T]) -> EndpointStats: ...
    @overload
    def _pick(self, active: Active[T], *, strict: bool) -> EndpointStats | None: ...

    def _pick(self, active: Active[T], *, strict: bool = False) -> EndpointStats | None:
        """The endpoint for the next attempt. ``strict`` (a hedge): only one this call has not tried, or ``None``."""
        service = self.service
        key = service.hash_key(self.request) if service.lb_name == "ring_hash" else None
        unhealthy, held = service.unhealthy()  # one reading serves the choice and the error below
        if not unhealthy and self.peer is None:  # the common case: a first attempt, every endpoint usable
            stats = active.pick(key, ())
            if stats is not None:
                endpoint = stats.endpoint
                breaker = service.breakers.get((endpoint.host, endpoint.port))
                if breaker is None or breaker.allow():
                    return stats
        panic = bool(unhealthy) and service.detector.panic(len(active.stats), len(active.stats) - len(unhealthy))
        if panic:
            unhealthy = held  # panic: ignore ejections, never open breakers
        refused: set[HostPort] = set()
        for _ in range(len(active.stats) + 1):
            excluded = set(unhealthy) | refused
            stats = None
            if self.peer is not None:  # a retry prefers an endpoint this call has not tried
                tried = self.tried_addresses
                if tried is None:
                    tried = self.tried_addresses = {self.peer}
                stats = active.pick(key, _ByAddress(excluded | tried), unhealthy, panic)
            if stats is None:
                if strict:
                    return None
                stats = active.pick(key, _ByAddress(excluded) if excluded else (), unhealthy, panic)
            if stats is None:
                break
            address = (stats.endpoint.host, stats.endpoint.port)
            breaker = service.breakers.get(address)
            if breaker is None or breaker.allow():
                return stats
            refused.add(address)  # half-open with its probe already out: choose another
        if strict:
            return None
        if refused or held:
            raise CircuitOpenError(
                service.name,
                "every usable endpoint's circuit breaker is open",
                endpoints=sorted(a.endpoint.address for a in active.stats.values()),
                request=self.request,
            )
        raise NoEndpointsError(service.name, service.resolver.source, "every endpoint is ejected or excluded")

    def _outgoing(self, endpoint: Endpoint, remaining: float) -> Any:
        """The request as sent to ``endpoint``: endpoint URL, logical Host and SNI, budgeted timeouts."""
        request = self.request
        extensions = dict(request.extensions)
        routed = self.routed
        if self.url.scheme == "https" and "sni_hostname" not in extensions:
            # A backend other than the service called is checked against its own name (its certificate).
            sni = None if routed is None else routed.choice.sni
            extensions["sni_hostname"] = sni or request.url.host
        per_try = self.policy.per_try_timeout
        budget = remaining if per_try is None or per_try <= 0 or per_try > remaining else per_try
        timeout = extensions.get("timeout")
        if isinstance(timeout, dict):
            extensions["timeout"] = {k: budget if v is None or v > budget else v for k, v in timeout.items()}
        else:
            extensions["timeout"] = {"connect": budget, "read": budget, "write": budget, "pool": budget}
        connect = self.service.config.connect_timeout
        if connect is not None and connect < extensions["timeout"].get("connect", budget):
            extensions["timeout"]["connect"] = connect  # the service's own bound (a fresh dict: built just above)
        # A copy with its own headers (the caller's request is never modified): the endpoint's URL and this
        # attempt's extensions.
        outgoing = copy_request(request)
        if not _TESTING.enabled:  # in testing mode the inner transport (and a user's mocks) see the logical URL
            outgoing.url = endpoint_url(self.url, endpoint)
        elif routed is not None:
            outgoing.url = self.url
        caller_headers = request.headers
        headers = outgoing.headers
        outgoing.extensions = extensions
        if routed is not None and (routed.choice.request_modifiers or routed.choice.rewrite is not None):
            apply_request_filters(routed, headers)
        if math.isfinite(remaining):
            value = encode_timeout(remaining)
            raw = getattr(headers, "_list", None)
            if type(raw) is list and DEADLINE_HEADER not in caller_headers:
                # Appended as the library stores it (raw name, lower-case name, value), which is what
                # ``headers[name] = value`` ends with when the name is absent, without its scan of every header.
                raw.append((_DEADLINE_RAW, _DEADLINE_RAW, value.encode("ascii")))
            else:
                headers[DEADLINE_HEADER] = value
        trace = self.trace
        inject(headers, trace.context if trace is not None else None)  # to mesh endpoints only
        return outgoing

    def judge(self, attempt: Attempt) -> Classification:
        """Step 5: the verdict on an attempt's outcome, recorded by its lease and reported to the observers."""
        error = attempt.error
        verdict = classify_exception(error) if error is not None else self.classify(attempt.response)
        self.verdict = verdict
        attempt.lease.judge(verdict, None if error is not None else attempt.response.headers)  # ORCA reports
        trace = self.trace
        if trace is not None:
            trace.attempt_finished(verdict, error, attempt.number)
        return verdict

    def classify(self, response: Any) -> Classification:
        """The verdict on a response, under this call's retry rules.

        A retryable answer that carries :data:`~meshlib.pushback.NO_RETRY_HEADER` was already retried by the
        hop that sent it (its own mesh client gave up): it is final here, so layers do not multiply retries.
        """
        policy = self.policy
        verdict = classify_response(
            response.status_code,
            response.headers,
            retry_statuses=policy.retry_on or _NO_STATUSES,  # a frozenset already (Policy normalises it)
            retry_after_cap=policy.retry_after_cap or 300.0,
        )
        if verdict.outcome is Outcome.RETRYABLE and NO_RETRY_HEADER in response.headers:
            note_exhausted()  # and say so upstream in turn: no layer above retries it either
            return Classification(
                Outcome.FAILURE, verdict.sent, "retried-downstream", verdict.status, None, verdict.endpoint_failure
            )
        return verdict

    def finish(self, attempt: Attempt, verdict: Classification) -> Any:
        """The final attempt: its response goes to the caller holding the lease (and the call's slot) until the
        body is closed; or its error is raised, made clear, with the lease released now."""
        lease = attempt.lease
        error = attempt.error
        if error is not None:
            lease.release()
            if verdict.sent and verdict.reason.endswith("timeout"):  # read/write timeout: the service was slow
                self.release_permit(lease.rtt)
            final = self.failure(error, verdict)
            raise final from (error if final is not error else error.__cause__)
        lease.permit, self.permit = self.permit, None
        response = attempt.response
        self._track(response, lease)
        extensions = response.extensions
        extensions[EXT_ENDPOINT] = self.tried[attempt.number - 1]
        extensions[EXT_SERVICE] = self.service.name
        extensions[EXT_ATTEMPTS] = self.attempts
        routed = self.routed
        if routed is not None:
            extensions[EXT_ROUTE] = routed.rule.label
            for modifier in routed.choice.response_modifiers:
                modify(response.headers, modifier)
        return response

    def _track(self, response: Any, lease: Lease) -> None:
        """Release ``lease`` when the response body is closed, or now if it already is.

        A response built with its content in memory (``MockTransport``, respx, pytest-httpx) arrives already read
        and closed, or with a ``ByteStream`` body, and the library may never close its stream: waiting for that
        would leak in-flight counts.
        """
        lib = self.lib
        if response.is_closed or isinstance(response.stream, lib.ByteStream):
            # Closed, or a body already in memory (pytest-httpx's responses): no connection to wait for. A
            # ByteStream is both a sync and an async stream, so it must not be wrapped as either.
            lease.release()
        elif isinstance(response.stream, lib.SyncByteStream):
            response.stream = lib.TrackedStream(response.stream, lease, self)
        elif isinstance(response.stream, lib.AsyncByteStream):
            response.stream = lib.AsyncTrackedStream(response.stream, lease, self)
        else:  # an inner transport returned something that is no stream: nothing will close it
            lease.release()

    def cancel(self, attempt: Attempt) -> Cancel:
        """The step that stops ``attempt`` (a losing hedge, a race): reported as cancelled if it had no verdict."""
        if not attempt.lease.judged:
            trace = self.trace
            if trace is not None:
                trace.attempt_finished(None, None, attempt.number)
        return Cancel(attempt)

    def abandon(self, attempt: Attempt) -> None:
        """An attempt was interrupted (cancelled) or lost a race: no verdict, and its lease released."""
        if not attempt.lease.judged:
            trace = self.trace
            if trace is not None:
                trace.attempt_finished(None, None, attempt.number)
        attempt.lease.release()

    def failure(self, exc: BaseException, verdict: Classification) -> BaseException:
        """The exception the caller gets when an attempt's error is final: clear about what and why."""
        lib = self.lib
        if isinstance(exc, lib.TimeoutException) and self.remaining() <= 0.001:
            return self.deadline_exceeded(f"the last attempt timed out ({verdict.reason})")
        if not isinstance(exc, lib.TransportError) or not isinstance(exc, Exception):
            return exc
        why = self.rule.why_not_resent(verdict, self.attempts)
        if why is None:
            return exc
        message = (
            f"{self.method} {described_url(self.request.url)} (service {self.service.name!r}) failed on "
            f"{', '.join(self.tried)}: {exc} [{verdict.reason}]; {why}"
        )
        try:
            exc_type: Any = type(exc)
            clear: BaseException = exc_type(message, request=self.request)
        except Exception:  # an exception type with another constructor: keep the original
            return exc
        clear.__cause__ = exc
        return clear

    def deadline_exceeded(self, reason: str) -> DeadlineExceeded:
        """The error for a call whose deadline ran out."""
        return DeadlineExceeded(self.service.name, reason, endpoints=self.tried, request=self.request)

    def finished(self, response: Any, error: BaseException | None) -> None:
        """The call is over for the caller (response headers arrived, or ``error``): tell the observers."""
        trace = self.trace
        if trace is not None:
            trace.call_finished(response, error, attempts=self.attempts, peer=self.peer, verdict=self.verdict)
