"""SPIFFE ID parsing and the X.509-SVID leaf rules, on certificates made in the test (no network)."""

from __future__ import annotations

import pickle
import ssl

import pytest

from meshlib.security.identity import (
    ExpectedIdentity,
    IdentityError,
    SpiffeId,
    check_peer_certificate,
    find_identity_error,
    presented_identity,
)
from tests.security.pki import CA

pytestmark = pytest.mark.one_library

PAYMENTS = "spiffe://prod.example/ns/pay/sa/payments"


@pytest.mark.parametrize(
    ("value", "trust_domain", "path"),
    [
        ("spiffe://prod.example", "prod.example", ""),
        (PAYMENTS, "prod.example", "/ns/pay/sa/payments"),
        ("spiffe://a-b_c.0/X.y-z_1", "a-b_c.0", "/X.y-z_1"),
    ],
)
def test_valid_ids(value: str, trust_domain: str, path: str) -> None:
    parsed = SpiffeId.parse(value)
    assert (parsed.trust_domain, parsed.path) == (trust_domain, path)
    assert str(parsed) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "spiffe://",
        "SPIFFE://prod.example/x",
        "spiffe://prod.example/",
        "spiffe://prod.example//x",
        "spiffe://prod.example/./x",
        "spiffe://prod.example/x#frag",
        "spiffe://user@prod.example/x",
        "spiffe://prod.example/caf%C3%A9",
        "spiffe://prod.éxample/x",
    ],
)
def test_invalid_ids(value: str) -> None:
    with pytest.raises(ValueError):
        SpiffeId.parse(value)


def test_expected_full_id_and_trust_domain() -> None:
    full = ExpectedIdentity.parse(PAYMENTS)
    domain = ExpectedIdentity.parse("spiffe://prod.example")
    same_domain = SpiffeId.parse("spiffe://prod.example/ns/pay/sa/billing")
    assert full.matches(SpiffeId.parse(PAYMENTS))
    assert not full.matches(same_domain)
    assert domain.trust_domain_only and domain.matches(same_domain)
    assert not domain.matches(SpiffeId.parse("spiffe://prod.example.evil/ns/pay/sa/payments"))
    assert not full.matches(SpiffeId.parse(PAYMENTS + "/more"))


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA("spire", trust_domain="prod.example")


def test_a_leaf_svid_presents_its_id(ca: CA) -> None:
    spiffe_id, described = presented_identity(ca.issue("payments", uris=(PAYMENTS,)).der)
    assert spiffe_id == SpiffeId.parse(PAYMENTS)
    assert described == PAYMENTS
    check_peer_certificate(ExpectedIdentity.parse(PAYMENTS), ca.issue(uris=(PAYMENTS,)).der)


@pytest.mark.parametrize(
    ("issue", "presented"),
    [
        (lambda ca: ca.issue("payments"), "a certificate without a URI SAN"),
        (lambda ca: ca.issue(uris=(PAYMENTS, PAYMENTS + "2")), "with 2 URI SANs"),
        (lambda ca: ca.issue(uris=("https://prod.example/ns/pay",)), "not a valid SPIFFE ID (scheme is 'https'"),
        (lambda ca: ca.issue(uris=("spiffe://prod.example",)), "without a workload path"),
        (lambda ca: ca.issue(uris=(PAYMENTS,), ca=True), "CA/signing certificate"),
        (lambda ca: ca.issue(uris=(PAYMENTS,), key_cert_sign=True), "CA/signing certificate"),
        (lambda ca: ca.issue(uris=("spiffe://other.example/ns/pay/sa/payments",)), "spiffe://other.example/"),
    ],
)
def test_what_is_refused_and_how_it_is_described(ca: CA, issue: object, presented: str) -> None:
    der = issue(ca).der  # type: ignore[operator]
    with pytest.raises(IdentityError) as caught:
        check_peer_certificate(ExpectedIdentity.parse(PAYMENTS), der, "payments")
    error = caught.value
    assert presented in error.presented
    assert error.expected == PAYMENTS
    assert str(error) == f"TLS peer identity of payments rejected: expected {PAYMENTS}, presented {error.presented}"
    assert isinstance(error, ssl.SSLCertVerificationError)  # what httpcore maps to ConnectError


def test_no_certificate() -> None:
    with pytest.raises(IdentityError, match="presented no certificate"):
        check_peer_certificate(ExpectedIdentity.parse(PAYMENTS), None)


def test_hostile_values_are_quoted_and_bounded(ca: CA) -> None:
    long_uri = "https://x/" + "a" * 1000
    _, described = presented_identity(ca.issue(uris=(long_uri,)).der)
    assert len(described) < 400


def test_identity_errors_survive_pickling_and_are_found_in_chains() -> None:
    error = IdentityError("spiffe://a/x", "spiffe://a/y", "payments")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.expected, copy.presented, copy.server_name) == ("spiffe://a/x", "spiffe://a/y", "payments")
    try:
        try:
            raise error
        except ssl.SSLError as inner:
            raise ConnectionError("wrapped") from inner
    except ConnectionError as outer:
        assert find_identity_error(outer) is error
    assert find_identity_error(ValueError("no")) is None
