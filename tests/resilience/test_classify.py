"""The one classifier: statuses, Retry-After, exceptions, and when a request may be re-sent."""

from __future__ import annotations

import email.utils
import errno

import httpcore
import pytest
from hypothesis import given
from hypothesis import strategies as st

import meshlib
from meshlib import (
    CircuitOpenError,
    DeadlineExceeded,
    MeshError,
    NoEndpointsError,
    OverloadedError,
)
from meshlib.resilience import (
    IDEMPOTENT_METHODS,
    Classification,
    Outcome,
    classify_exception,
    classify_response,
    may_resend,
    parse_retry_after,
    should_retry,
)
from tests.httplib import LIBRARY, httpx

NOW = 1_700_000_000.0


def now_wall() -> float:
    return NOW


# -- responses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304, 400, 401, 403, 404, 409, 422])
def test_ordinary_answers_are_successes_that_do_not_count_against_the_endpoint(status: int) -> None:
    c = classify_response(status, {})
    assert c == Classification(Outcome.SUCCESS, True, f"status-{status}", status, None, False)


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors_are_retryable_endpoint_failures(status: int) -> None:
    c = classify_response(status, httpx.Headers())
    assert c.outcome is Outcome.RETRYABLE
    assert c.retryable
    assert c.endpoint_failure
    assert c.sent
    assert c.reason == f"status-{status}"
    assert c.status == status


@pytest.mark.parametrize("status", [500, 501, 505, 599])
def test_other_5xx_fail_without_retry_but_count_against_the_endpoint(status: int) -> None:
    c = classify_response(status, {})
    assert c.outcome is Outcome.FAILURE
    assert c.endpoint_failure


def test_retry_statuses_are_configurable() -> None:
    assert classify_response(500, {}, retry_statuses=frozenset({500})).outcome is Outcome.RETRYABLE
    assert classify_response(503, {}, retry_statuses=frozenset({502})).outcome is Outcome.FAILURE
    c = classify_response(409, {}, retry_statuses=frozenset({409}))
    assert c.outcome is Outcome.RETRYABLE
    assert not c.endpoint_failure


def test_429_is_retryable_but_not_an_endpoint_failure() -> None:
    c = classify_response(429, {})
    assert c.outcome is Outcome.RETRYABLE
    assert not c.endpoint_failure
    assert c.retry_after is None
    assert classify_response(429, {}, retry_rate_limited=False).outcome is Outcome.SUCCESS


def test_429_retry_after_delta_seconds() -> None:
    assert classify_response(429, httpx.Headers({"Retry-After": "7"})).retry_after == 7.0
    assert classify_response(429, {"retry-after": " 2 "}).retry_after == 2.0
    assert classify_response(429, {"RETRY-AFTER": "0.5"}).retry_after == 0.5  # case-insensitive plain mapping


def test_503_retry_after_http_date() -> None:
    date = email.utils.formatdate(NOW + 120, usegmt=True)
    c = classify_response(503, httpx.Headers({"Retry-After": date}), now_wall=now_wall)
    assert c.retry_after == pytest.approx(120.0)
    assert c.endpoint_failure


def test_retry_after_is_ignored_on_other_statuses() -> None:
    assert classify_response(502, {"Retry-After": "3"}).retry_after is None
    assert classify_response(200, {"Retry-After": "3"}).retry_after is None


@pytest.mark.parametrize("value", ["-1", "abc", "", "1e3", "inf", "nan", "0x10", "3 s", "Mon, 99 Foo 2020"])
def test_garbage_retry_after_falls_back_to_backoff(value: str) -> None:
    assert parse_retry_after(value, now_wall=now_wall) is None
    assert classify_response(429, {"Retry-After": value}, now_wall=now_wall).retry_after is None


def test_retry_after_above_the_cap_falls_back_to_backoff() -> None:
    assert parse_retry_after("300", now_wall=now_wall) == 300.0
    assert parse_retry_after("301", now_wall=now_wall) is None
    assert parse_retry_after("10", cap=5.0) is None
    far = email.utils.formatdate(NOW + 3600, usegmt=True)
    assert parse_retry_after(far, now_wall=now_wall) is None


def test_retry_after_date_in_the_past_falls_back_to_backoff() -> None:
    past = email.utils.formatdate(NOW - 10, usegmt=True)
    assert parse_retry_after(past, now_wall=now_wall) is None


def test_retry_after_date_without_zone_is_gmt() -> None:
    naive = email.utils.formatdate(NOW + 30, usegmt=True).replace("GMT", "-0000")
    assert parse_retry_after(naive, now_wall=now_wall) == pytest.approx(30.0)


@given(st.integers(min_value=0, max_value=10_000))
def test_delta_seconds_property(seconds: int) -> None:
    got = parse_retry_after(str(seconds))
    assert got == (float(seconds) if seconds <= 300 else None)


@given(st.text(max_size=40))
def test_retry_after_never_raises_and_is_bounded(value: str) -> None:
    got = parse_retry_after(value, now_wall=now_wall)
    assert got is None or 0.0 <= got <= 300.0


@given(st.integers(min_value=100, max_value=599))
def test_response_classification_invariants(status: int) -> None:
    c = classify_response(status, {"Retry-After": "1"})
    assert c.sent
    assert c.status == status
    assert c.endpoint_failure == (status >= 500)
    assert (c.outcome is Outcome.SUCCESS) == (status < 500 and status != 429)
    if c.retry_after is not None:
        assert status in (429, 503)


def test_ordinary_verdicts_are_shared_not_rebuilt() -> None:
    assert classify_response(200, {}) is classify_response(200, httpx.Headers())


# -- exceptions --------------------------------------------------------------------------------------------


def _chained(outer: httpx.TransportError, inner: BaseException) -> httpx.TransportError:
    """An httpx error raised ``from`` an httpcore one raised ``from`` an OSError, as httpx does."""
    core = httpcore.ConnectError(str(inner))
    core.__cause__ = inner
    outer.__cause__ = core
    return outer


@pytest.mark.parametrize(
    ("exc", "outcome", "sent", "reason", "endpoint_failure"),
    [
        (httpx.ConnectError("x"), Outcome.RETRYABLE, False, "connect-error", True),
        (httpx.ConnectTimeout("x"), Outcome.RETRYABLE, False, "connect-timeout", True),
        (httpx.PoolTimeout("x"), Outcome.RETRYABLE, False, "pool-timeout", False),
        (httpx.ReadTimeout("x"), Outcome.RETRYABLE, True, "read-timeout", True),
        (httpx.WriteTimeout("x"), Outcome.RETRYABLE, True, "write-timeout", True),
        (httpx.ReadError("x"), Outcome.RETRYABLE, True, "read-error", True),
        (httpx.WriteError("x"), Outcome.RETRYABLE, True, "write-error", True),
        (httpx.RemoteProtocolError("x"), Outcome.RETRYABLE, True, "remote-protocol-error", True),
        (httpx.CloseError("x"), Outcome.RETRYABLE, True, "network-error", True),
        (httpx.ProxyError("x"), Outcome.RETRYABLE, True, "proxy-error", True),
        (httpx.LocalProtocolError("x"), Outcome.FAILURE, False, "local-protocol-error", False),
        (httpx.UnsupportedProtocol("x"), Outcome.FAILURE, False, "unsupported-protocol", False),
        (CircuitOpenError("svc", "all open"), Outcome.FAILURE, False, "circuit-open", False),
        (OverloadedError("svc", "1024 in flight"), Outcome.FAILURE, False, "overloaded", False),
        (NoEndpointsError("svc", "static://", "empty"), Outcome.FAILURE, False, "no-endpoints", False),
        (DeadlineExceeded("svc", "out of time"), Outcome.FAILURE, True, "deadline-exceeded", False),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Outcome.RETRYABLE, False, "connect-refused", True),
        (ConnectionResetError(), Outcome.RETRYABLE, True, "connection-error", True),
        (ValueError("bug"), Outcome.FAILURE, True, "error", False),
        (KeyboardInterrupt(), Outcome.FAILURE, True, "cancelled", False),
    ],
)
def test_exceptions(exc: BaseException, outcome: Outcome, sent: bool, reason: str, endpoint_failure: bool) -> None:
    c = classify_exception(exc)
    assert (c.outcome, c.sent, c.reason, c.endpoint_failure) == (outcome, sent, reason, endpoint_failure)
    assert c.status is None
    assert c.retry_after is None


def test_refused_connection_is_recognised_through_the_cause_chain() -> None:
    exc = _chained(httpx.ConnectError("All connection attempts failed"), ConnectionRefusedError(111, "refused"))
    c = classify_exception(exc)
    assert c.reason == "connect-refused"
    assert not c.sent


def test_a_real_refused_connection_is_never_sent() -> None:
    import socket

    with socket.socket() as s:  # a port that is bound but not listening refuses connections
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with httpx.Client() as client, pytest.raises(httpx.ConnectError) as info:
            client.post(f"http://127.0.0.1:{port}/", content=b"x")
    c = classify_exception(info.value)
    assert not c.sent
    assert c.reason in ("connect-refused", "connect-error")
    assert c.retryable


# -- re-sending --------------------------------------------------------------------------------------------

NOT_SENT = classify_exception(httpx.ConnectError("refused"))
SENT = classify_exception(httpx.ReadError("reset"))


@pytest.mark.parametrize("method", ["GET", "POST", "PATCH", "put", "CONNECT"])
def test_never_sent_may_be_resent_whatever_the_method(method: str) -> None:
    assert may_resend(method, NOT_SENT, retry_non_idempotent=False, has_idempotency_key=False)


def test_sent_requests_are_resent_only_when_safe() -> None:
    for method in IDEMPOTENT_METHODS:
        assert may_resend(method, SENT, retry_non_idempotent=False, has_idempotency_key=False)
        assert may_resend(method.lower(), SENT, retry_non_idempotent=False, has_idempotency_key=False)
    for method in ("POST", "PATCH", "CONNECT"):
        assert not may_resend(method, SENT, retry_non_idempotent=False, has_idempotency_key=False)
        assert may_resend(method, SENT, retry_non_idempotent=True, has_idempotency_key=False)
        assert may_resend(method, SENT, retry_non_idempotent=False, has_idempotency_key=True)


def test_should_retry_needs_a_retryable_outcome_too() -> None:
    opts = {"retry_non_idempotent": False, "has_idempotency_key": False}
    assert should_retry("POST", NOT_SENT, **opts)
    assert not should_retry("POST", SENT, **opts)
    assert should_retry("GET", SENT, **opts)
    assert not should_retry("GET", classify_response(500, {}), **opts)
    assert not should_retry("GET", classify_response(200, {}), **opts)
    assert not should_retry("GET", classify_exception(CircuitOpenError("svc", "open")), **opts)


@given(
    method=st.sampled_from(["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "POST", "PATCH"]),
    sent=st.booleans(),
    outcome=st.sampled_from(list(Outcome)),
    allow=st.booleans(),
    key=st.booleans(),
)
def test_resend_property(method: str, sent: bool, outcome: Outcome, allow: bool, key: bool) -> None:
    c = Classification(outcome, sent, "x")
    safe = may_resend(method, c, retry_non_idempotent=allow, has_idempotency_key=key)
    # A POST that may have been processed is never re-sent unless the caller said it is safe.
    if sent and method in ("POST", "PATCH") and not (allow or key):
        assert not safe
    if not sent:
        assert safe
    assert should_retry(method, c, retry_non_idempotent=allow, has_idempotency_key=key) == (
        safe and outcome is Outcome.RETRYABLE
    )


# -- the errors themselves ---------------------------------------------------------------------------------


def test_errors_subclass_the_matching_httpx_exception_and_say_why() -> None:
    flavour = getattr(meshlib, LIBRARY)  # meshlib.httpx or meshlib.httpx2: what that library's clients raise
    CircuitOpenError, OverloadedError, DeadlineExceeded = (
        flavour.CircuitOpenError,
        flavour.OverloadedError,
        flavour.DeadlineExceeded,
    )
    request = httpx.Request("GET", "http://payments/charge")
    err = CircuitOpenError("payments", "every breaker open", endpoints=["10.0.0.1:80", "10.0.0.2:80"], request=request)
    assert isinstance(err, MeshError)
    assert isinstance(err, httpx.ConnectError)
    assert err.service == "payments"
    assert err.endpoints == ("10.0.0.1:80", "10.0.0.2:80")
    assert err.request is request
    assert "payments" in str(err)
    assert "every breaker open" in str(err)
    assert "10.0.0.2:80" in str(err)

    over = OverloadedError("payments", "1024 requests in flight")
    assert isinstance(over, httpx.PoolTimeout)
    assert isinstance(over, httpx.TimeoutException)
    assert "no endpoint tried" in str(over)

    late = DeadlineExceeded("payments", "no time left for attempt 3", endpoints=["a:1"], timeout=0.3)
    assert isinstance(late, httpx.TimeoutException)
    assert late.timeout == 0.3
    assert "0.3 s" in str(late)
    assert "a:1" in str(late)
    for exc in (err, over, late):
        assert isinstance(exc, httpx.TransportError)
