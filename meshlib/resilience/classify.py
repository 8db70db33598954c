"""The one classifier: what an attempt's outcome *is*, read by retries, breakers, outlier detection and metrics.

Finagle splits *which* requests retry (``ResponseClassifier`` / ``Retries.Policy``) from *how many*
(``RetryBudget``) and *when* (``Backoff``); tower splits ``retry::Policy`` from the ``Retry`` wrapper. meshlib
does the same: this module only answers "what happened?", as a :class:`Classification`, and every component
reads that same answer instead of inspecting responses and exceptions on its own.

Two questions are kept apart because they have different answers:

* **Is it worth trying again?** (:attr:`Classification.outcome`) Connect failures, timeouts, broken
  connections, 502/503/504 (configurable) and 429 are :attr:`Outcome.RETRYABLE`. Other 5xx are
  :attr:`Outcome.FAILURE`; 1xx-4xx are :attr:`Outcome.SUCCESS` (the endpoint did its job; a 404 is the
  application's answer, not a sick server).
* **Does it count against the endpoint?** (:attr:`Classification.endpoint_failure`) Every 5xx, connection
  failure and timeout does, as Envoy's ``consecutive_5xx`` and "gateway failure" outlier detection count them
  (a local-origin connect failure is reported as a 503 there). 4xx and 429 do not: Envoy does not eject on
  them, and a 429 says "ask someone else" rather than "I am broken" (Consul: "another server could fulfil
  it - retry elsewhere immediately").

And one question decides whether re-sending is *safe*: :attr:`Classification.sent`. ``False`` only when the
request provably never reached a server (connect refused/failed/timed out, no pooled connection, or meshlib
refused it itself); such a request may be re-sent whatever its method (gRPC calls these "transparent
retries"). Anything else may have been processed, so :func:`may_resend` allows it only for idempotent
methods (RFC 9110 section 9.2.2) or when the caller opted in.
"""

from __future__ import annotations

import email.utils
import enum
import math
import re
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import timezone

from meshlib.errors import (
    CircuitOpenError,
    DeadlineExceeded,
    DiscoveryError,
    NoEndpointsError,
    OverloadedError,
)

__all__ = [
    "DEFAULT_RETRY_STATUSES",
    "IDEMPOTENCY_KEY_HEADER",
    "IDEMPOTENT_METHODS",
    "RETRY_AFTER_CAP",
    "Classification",
    "Outcome",
    "classify_exception",
    "classify_response",
    "may_resend",
    "resendable",
    "parse_retry_after",
    "should_retry",
]

#: Statuses retried by default: the gateway errors Envoy's ``retry_on: gateway-error`` (502, 503, 504) and
#: Istio/Linkerd default to. 429 is handled on its own (see :func:`classify_response`).
DEFAULT_RETRY_STATUSES: frozenset[int] = frozenset({502, 503, 504})

#: A ``Retry-After`` longer than this (seconds) is ignored and the retry falls back to backoff: Envoy's
#: ``rate_limited_retry_back_off`` default ``max_interval`` and Linkerd's load-biaser maximum are both 300 s.
RETRY_AFTER_CAP = 300.0

#: Methods RFC 9110 section 9.2.2 defines as idempotent: sending one twice has the effect of sending it once.
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

#: The header (IETF draft ``httpapi-idempotency-key-header``, Stripe and others) that makes a non-idempotent
#: request safe to re-send, because the server de-duplicates on it.
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"

_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


class Outcome(enum.Enum):
    """What an attempt's result means for the caller."""

    #: The endpoint answered (any 1xx-4xx status apart from those configured as retryable, and 429).
    SUCCESS = "success"
    #: A failure another attempt may cure: connect/transport errors, timeouts, retry statuses, 429.
    RETRYABLE = "retryable"
    #: A failure not worth retrying: a 5xx outside the retry statuses, a local error, meshlib refusing the
    #: call (circuit open, overloaded, no endpoints, deadline), or an exception that is not a transport error.
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one attempt, shared by every component.

    ``reason`` is a short stable token for logs, metrics labels and span attributes: ``status-503``,
    ``connect-error``, ``connect-refused``, ``connect-timeout``, ``pool-timeout``, ``read-timeout``,
    ``write-timeout``, ``read-error``, ``write-error``, ``remote-protocol-error``, ``circuit-open``, ...
    ``status`` is the response status (``None`` for exceptions); ``retry_after`` the server's requested delay in
    seconds, when it sent a usable one.
    """

    outcome: Outcome
    sent: bool
    reason: str
    status: int | None = None
    retry_after: float | None = None
    endpoint_failure: bool = False

    @property
    def retryable(self) -> bool:
        """``outcome is Outcome.RETRYABLE``."""
        return self.outcome is Outcome.RETRYABLE


# Verdicts that carry no per-call data are built once and shared, so the hot path allocates nothing: one
# cache per outcome, keyed by status alone (``endpoint_failure`` follows from the status).
_SUCCESS_BY_STATUS: dict[int, Classification] = {}
_FAILURE_BY_STATUS: dict[int, Classification] = {}
_RETRYABLE_BY_STATUS: dict[int, Classification] = {}


def _status_verdict(status: int, outcome: Outcome, cache: dict[int, Classification]) -> Classification:
    verdict = cache.get(status)
    if verdict is None:
        verdict = Classification(outcome, True, f"status-{status}", status, None, status >= 500)
        if 100 <= status <= 599:  # bounded: never grows past the valid status space
            cache[status] = verdict
    return verdict


def classify_response(
    response_status: int,
    headers: Mapping[str, str],
    *,
    retry_statuses: AbstractSet[int] = DEFAULT_RETRY_STATUSES,
    retry_rate_limited: bool = True,
    retry_after_cap: float = RETRY_AFTER_CAP,
    now_wall: Callable[[], float] = time.time,
) -> Classification:
    """Classify a response by its status (and, for 429/503, its ``Retry-After`` header).

    * a status in ``retry_statuses`` (default 502, 503, 504) is :attr:`Outcome.RETRYABLE`;
    * 429 is retryable too, without being listed: rate limiting is a per-server answer that another endpoint
      (or a later try) may not give. ``retry_rate_limited=False`` turns that off unless 429 is listed;
    * any other 5xx is :attr:`Outcome.FAILURE`; everything else :attr:`Outcome.SUCCESS`;
    * ``endpoint_failure`` is true for every 5xx (Envoy ``consecutive_5xx``), false otherwise, 429 included;
    * ``Retry-After`` is read on retryable 429 and 503 responses only (RFC 6585 section 4, RFC 9110 section
      10.2.3): see :func:`parse_retry_after`.

    ``headers`` may be an ``httpx.Headers`` / ``httpx2.Headers`` or any mapping (looked up case-insensitively).
    It is not touched for ordinary answers, so classifying a 200 costs a few dictionary lookups.
    """
    if response_status == 429:
        retryable = retry_rate_limited or 429 in retry_statuses
    else:
        retryable = response_status in retry_statuses
    if not retryable:
        if response_status < 500:
            return _status_verdict(response_status, Outcome.SUCCESS, _SUCCESS_BY_STATUS)
        return _status_verdict(response_status, Outcome.FAILURE, _FAILURE_BY_STATUS)
    if response_status in (429, 503):
        value = _header(headers, "retry-after")
        if value is not None:
            delay = parse_retry_after(value, cap=retry_after_cap, now_wall=now_wall)
            if delay is not None:
                return Classification(
                    Outcome.RETRYABLE, True, f"status-{response_status}", response_status, delay, response_status >= 500
                )
    return _status_verdict(response_status, Outcome.RETRYABLE, _RETRYABLE_BY_STATUS)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    if type(headers).__name__ == "Headers":  # httpx's or httpx2's: already case-insensitive
        found: str | None = headers.get(name)
        return found
    value = headers.get(name)
    if value is not None:
        return value
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None


def parse_retry_after(
    value: str, *, cap: float = RETRY_AFTER_CAP, now_wall: Callable[[], float] = time.time
) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or ``None`` to fall back to ordinary backoff.

    Accepts delta-seconds (``120``; a decimal fraction such as ``1.5`` is tolerated) and an HTTP-date
    (``Wed, 21 Oct 2015 07:28:00 GMT``, read relative to ``now_wall()``). ``None`` for anything else: a
    negative or malformed value, a date already past (clock skew makes it meaningless), or a delay above
    ``cap`` (Envoy drops such values too rather than waiting minutes). The caller still must not wait past
    its deadline.
    """
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        delay = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000" or no zone: HTTP-dates are always GMT (RFC 9110 section 5.6.7)
            when = when.replace(tzinfo=timezone.utc)
        delay = when.timestamp() - now_wall()
        if delay < 0.0:
            return None
    if not math.isfinite(delay) or delay > cap:
        return None
    return delay


# Exceptions. meshlib's own errors first (they are mixed into httpx exception classes: a CircuitOpenError is a
# ConnectError); then the HTTP library's exceptions, by class *name*, so httpx's and httpx2's (the same
# hierarchy under another module) classify alike; then plain OSErrors from a custom inner transport.
def _verdict(outcome: Outcome, sent: bool, reason: str, endpoint_failure: bool) -> Classification:
    return Classification(outcome, sent, reason, None, None, endpoint_failure)


_R, _F = Outcome.RETRYABLE, Outcome.FAILURE
_CONNECT_REFUSED = _verdict(_R, False, "connect-refused", True)
_MESH_RULES: tuple[tuple[type[BaseException], Classification], ...] = (
    (CircuitOpenError, _verdict(_F, False, "circuit-open", False)),
    (OverloadedError, _verdict(_F, False, "overloaded", False)),
    (NoEndpointsError, _verdict(_F, False, "no-endpoints", False)),
    (DiscoveryError, _verdict(_F, False, "discovery-error", False)),
    # Time ran out; an attempt may have been in flight, so assume it was sent.
    (DeadlineExceeded, _verdict(_F, True, "deadline-exceeded", False)),
)
#: The HTTP library's exceptions by class name (httpx and httpx2 alike), most specific first.
_HTTP_RULES: tuple[tuple[str, Classification], ...] = (
    # Never sent: no connection was made, so no byte of the request left.
    ("ConnectTimeout", _verdict(_R, False, "connect-timeout", True)),
    ("ConnectError", _verdict(_R, False, "connect-error", True)),
    # Waiting for one of our own pooled connections: a local condition, not the endpoint's fault.
    ("PoolTimeout", _verdict(_R, False, "pool-timeout", False)),
    # Maybe sent: the request may be (partly) written and processed.
    ("ReadTimeout", _verdict(_R, True, "read-timeout", True)),
    ("WriteTimeout", _verdict(_R, True, "write-timeout", True)),
    ("TimeoutException", _verdict(_R, True, "timeout", True)),
    ("ReadError", _verdict(_R, True, "read-error", True)),
    ("WriteError", _verdict(_R, True, "write-error", True)),
    ("RemoteProtocolError", _verdict(_R, True, "remote-protocol-error", True)),
    # h11/h2 refused to emit an invalid request: nothing went out, and another try would fail the same way.
    ("LocalProtocolError", _verdict(_F, False, "local-protocol-error", False)),
    ("UnsupportedProtocol", _verdict(_F, False, "unsupported-protocol", False)),
    ("ProxyError", _verdict(_R, True, "proxy-error", True)),
    ("NetworkError", _verdict(_R, True, "network-error", True)),
    ("TransportError", _verdict(_R, True, "transport-error", True)),
)
_HTTP_MODULES = frozenset({"httpx", "httpx2"})
_OTHER_RULES: tuple[tuple[type[BaseException], Classification], ...] = (
    # Plain OSErrors from a custom inner transport.
    (ConnectionRefusedError, _CONNECT_REFUSED),
    (ConnectionError, _verdict(_R, True, "connection-error", True)),
    (TimeoutError, _verdict(_R, True, "timeout", True)),
    # Anything else (a bug, a DecodingError, cancellation) says nothing about the endpoint and is not retried.
    (Exception, _verdict(_F, True, "error", False)),
    (BaseException, _verdict(_F, True, "cancelled", False)),
)
#: Exception type -> its verdict (before the connect-refused refinement), filled on first sight of each type.
_BY_TYPE: dict[type[BaseException], Classification] = {}


def _rule_for(exc_type: type[BaseException]) -> Classification:
    for mesh_type, verdict in _MESH_RULES:
        if issubclass(exc_type, mesh_type):
            return verdict
    names = {cls.__name__ for cls in exc_type.__mro__ if cls.__module__.partition(".")[0] in _HTTP_MODULES}
    if names:
        for name, verdict in _HTTP_RULES:
            if name in names:
                return verdict
    for other_type, verdict in _OTHER_RULES:
        if issubclass(exc_type, other_type):
            return verdict
    raise AssertionError("unreachable: BaseException matches every exception")  # pragma: no cover


def classify_exception(exc: BaseException) -> Classification:
    """Classify an exception raised while sending one attempt.

    Connect errors and connect/pool timeouts are ``sent=False`` (a ``ConnectError`` caused by
    ``ConnectionRefusedError`` reads ``connect-refused``); read/write errors and timeouts and remote
    protocol errors are ``sent=True``. meshlib's own refusals (circuit open, overloaded, no endpoints) are
    never-sent :attr:`Outcome.FAILURE`\\ s that do not count against any endpoint. Anything that is not a
    transport error (a bug, ``asyncio.CancelledError``) is a non-retryable failure that does not count
    against the endpoint either. httpx's and httpx2's exceptions classify alike.
    """
    exc_type = type(exc)
    verdict = _BY_TYPE.get(exc_type)
    if verdict is None:
        if len(_BY_TYPE) >= 256:  # bounded: exception types are few, but a transport could mint new ones
            _BY_TYPE.clear()
        verdict = _BY_TYPE[exc_type] = _rule_for(exc_type)
    if verdict.reason == "connect-error" and _caused_by(exc, ConnectionRefusedError):
        return _CONNECT_REFUSED
    return verdict


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 8:  # httpx -> httpcore -> OSError is 2 deep; bound against cycles
        if isinstance(cause, kind):
            return True
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False


def resendable(method: str, *, retry_non_idempotent: bool, has_idempotency_key: bool) -> bool:
    """Whether a request that may already have been processed may be sent again (retried, mirrored): its
    method is idempotent (RFC 9110 9.2.2), it carries an ``Idempotency-Key``, or the policy opts in."""
    return retry_non_idempotent or has_idempotency_key or method.upper() in IDEMPOTENT_METHODS


def may_resend(
    method: str, classification: Classification, *, retry_non_idempotent: bool, has_idempotency_key: bool
) -> bool:
    """Whether sending the request again is *safe* (not whether it is worth it: see :func:`should_retry`).

    A request that never reached a server may be re-sent whatever its method. One that may have been
    processed is re-sent only if its method is idempotent, the request carries an ``Idempotency-Key``, or
    the policy says ``retry_non_idempotent=True``: re-sending a POST that was processed charges twice.
    """
    if not classification.sent:
        return True
    return resendable(method, retry_non_idempotent=retry_non_idempotent, has_idempotency_key=has_idempotency_key)


def should_retry(
    method: str, classification: Classification, *, retry_non_idempotent: bool, has_idempotency_key: bool
) -> bool:
    """Retryable *and* safe to re-send. The retry budget, attempt count and deadline still have their say."""
    return classification.outcome is Outcome.RETRYABLE and may_resend(
        method,
        classification,
        retry_non_idempotent=retry_non_idempotent,
        has_idempotency_key=has_idempotency_key,
    )
