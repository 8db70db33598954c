"""meshlib clients against real TLS servers on loopback: verification, server names, SPIFFE IDs, mTLS.

Every test runs through ``meshlib.Client`` and ``meshlib.AsyncClient`` (the ``mode`` fixture): the sync path
wraps sockets (``SSLContext.wrap_socket``), the async one memory BIOs (``wrap_bio``), and both must agree.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

import meshlib
from meshlib.security import IdentityError, find_identity_error
from tests.httplib import httpx
from tests.security.conftest import TLSBackendFactory, fetch, mesh_env
from tests.security.pki import CA, DAY, NOW, common_name

TD = "prod.example"
PAYMENTS_ID = f"spiffe://{TD}/ns/pay/sa/payments"


def test_verifies_the_logical_name_against_the_configured_ca(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(ca.issue("payments"))
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")))
    response = fetch(mode, "https://payments/charge", environ=env)
    assert response.status_code == 200
    assert response.json()["host"] == "payments"
    assert backend.count == 1


def test_a_certificate_for_another_name_fails_before_sending(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(ca.issue("billing"))
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")))
    with pytest.raises(httpx.ConnectError, match=r"(?i)hostname mismatch"):
        fetch(mode, "https://payments/charge", environ=env)
    assert backend.count == 0


def test_server_name_replaces_the_logical_name_for_sni_and_the_check(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(ca.issue("payments.prod.svc.cluster.local"))
    env = mesh_env(
        backend,
        TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")),
        SERVICE_PAYMENTS__TLS_SERVER_NAME="payments.prod.svc.cluster.local",
    )
    response = fetch(mode, "https://payments/charge", environ=env)
    assert response.status_code == 200
    assert response.json()["host"] == "payments"  # the Host header stays the logical name


def test_a_server_signed_by_another_ca_fails(mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory) -> None:
    backend = tls_backend(CA("rogue CA").issue("payments"))
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")))
    with pytest.raises(httpx.ConnectError, match=r"(?i)certificate verify failed"):
        fetch(mode, "https://payments/charge", environ=env)
    assert backend.count == 0


def test_an_expired_server_certificate_fails(mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory) -> None:
    backend = tls_backend(ca.issue("payments", not_before=NOW - 3 * DAY, not_after=NOW - DAY))
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")))
    with pytest.raises(httpx.ConnectError, match=r"(?i)expired"):
        fetch(mode, "https://payments/charge", environ=env)
    assert backend.count == 0


# -- SPIFFE ---------------------------------------------------------------------------------------------------


def test_the_expected_spiffe_id_passes_without_a_dns_name(
    mode: str, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    ca = CA("spire", trust_domain=TD)
    backend = tls_backend(ca.issue(uris=(PAYMENTS_ID,)))  # an SVID: no DNS SAN at all
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "bundle.pem")), TLS_SERVER_ID=PAYMENTS_ID)
    assert fetch(mode, "https://payments/charge", environ=env).status_code == 200


def test_a_wrong_spiffe_id_fails_before_any_request_byte(
    mode: str, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    ca = CA("spire", trust_domain=TD)
    presented = f"spiffe://{TD}/ns/pay/sa/billing"
    backend = tls_backend(ca.issue("payments", uris=(presented,)))
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "bundle.pem")), TLS_SERVER_ID=PAYMENTS_ID)
    with pytest.raises(httpx.ConnectError) as caught:
        fetch(mode, "https://payments/charge", environ=env)
    assert f"expected {PAYMENTS_ID}, presented {presented}" in str(caught.value)
    assert backend.count == 0  # the request never reached the server
    error = find_identity_error(caught.value)
    assert isinstance(error, IdentityError)
    assert (error.expected, error.presented, error.server_name) == (PAYMENTS_ID, presented, "payments")


def test_a_trust_domain_accepts_any_workload_of_it(mode: str, tmp_path: Path, tls_backend: TLSBackendFactory) -> None:
    ca = CA("spire", trust_domain=TD)
    backend = tls_backend(ca.issue(uris=(f"spiffe://{TD}/ns/other/sa/whatever",)))
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "bundle.pem")), TLS_SERVER_ID=f"spiffe://{TD}")
    assert fetch(mode, "https://payments/", environ=env).status_code == 200


def test_a_trust_domain_rejects_another_trust_domain(mode: str, tmp_path: Path, tls_backend: TLSBackendFactory) -> None:
    ca = CA("spire")  # one CA trusted for both: only the SPIFFE check tells them apart
    backend = tls_backend(ca.issue(uris=("spiffe://staging.example/ns/pay/sa/payments",)))
    env = mesh_env(
        backend, TLS_CA_FILE=str(ca.write(tmp_path / "bundle.pem")), SERVICE_PAYMENTS__TLS_SERVER_ID=f"spiffe://{TD}"
    )
    with pytest.raises(httpx.ConnectError, match=f"expected any SPIFFE ID of trust domain spiffe://{TD}, presented"):
        fetch(mode, "https://payments/", environ=env)
    assert backend.count == 0


def test_a_certificate_without_svid_fails_with_what_was_presented(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(ca.issue("payments"))
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")), TLS_SERVER_ID=PAYMENTS_ID)
    with pytest.raises(httpx.ConnectError, match="presented a certificate without a URI SAN"):
        fetch(mode, "https://payments/", environ=env)
    assert backend.count == 0


def test_a_matching_spiffe_id_from_an_untrusted_ca_still_fails(
    mode: str, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(CA("rogue", trust_domain=TD).issue(uris=(PAYMENTS_ID,)))
    bundle = CA("spire", trust_domain=TD).write(tmp_path / "bundle.pem")
    env = mesh_env(backend, TLS_CA_FILE=str(bundle), TLS_SERVER_ID=PAYMENTS_ID)
    with pytest.raises(httpx.ConnectError, match=r"(?i)certificate verify failed"):
        fetch(mode, "https://payments/", environ=env)


# -- mTLS -----------------------------------------------------------------------------------------------------


def test_a_server_requiring_a_client_certificate_refuses_a_client_without_one(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(ca.issue("payments"), client_ca=ca)
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")))
    # TLS 1.3 finishes the client's side of the handshake before the server checks the client: the refusal
    # arrives as an alert on the first read, so it surfaces as a transport error, never as a response.
    with pytest.raises(httpx.TransportError):
        fetch(mode, "https://payments/", environ=env)
    assert backend.count == 0


def test_the_client_certificate_is_presented_and_seen_by_the_server(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(ca.issue("payments"), client_ca=ca)
    cert, key = ca.issue(uris=("spiffe://prod.example/ns/web/sa/frontend",), common_name="frontend").write(
        tmp_path, "client"
    )
    env = mesh_env(
        backend, TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")), TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key)
    )
    assert fetch(mode, "https://payments/", environ=env).status_code == 200
    (recorded,) = backend.requests
    assert common_name(recorded.peercert) == "frontend"
    assert recorded.peercert is not None
    assert ("URI", "spiffe://prod.example/ns/web/sa/frontend") in recorded.peercert["subjectAltName"]


def test_settings_passed_in_code_work_like_the_environment(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(ca.issue("payments"), client_ca=ca)
    cert, key = ca.issue(common_name="coded").write(tmp_path, "client")
    tls = meshlib.security.TLSSettings(
        ca_file=str(ca.write(tmp_path / "ca.pem")), cert_file=str(cert), key_file=str(key)
    )
    env = mesh_env(backend)
    assert fetch(mode, "https://payments/", environ=env, tls=tls).status_code == 200
    assert common_name(backend.requests[0].peercert) == "coded"


# -- verification off, per service only ---------------------------------------------------------------------


def test_verify_false_for_one_service_accepts_any_server_and_warns(
    mode: str, tmp_path: Path, tls_backend: TLSBackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    backend = tls_backend(CA("self-made").issue("legacy"))
    env = {
        **mesh_env(backend, "LEGACY", SERVICE_LEGACY__TLS_VERIFY="false"),
        **mesh_env(backend, "PAYMENTS"),
        "MESHLIB_TLS_CA_FILE": str(CA("mesh").write(tmp_path / "ca.pem")),
    }
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        assert fetch(mode, "https://legacy/", environ=env).status_code == 200
    warnings = [r for r in caplog.records if "verification is disabled" in r.getMessage()]
    assert len(warnings) == 1
    assert "legacy" in warnings[0].getMessage()
    assert "MESHLIB_SERVICE_LEGACY__TLS_VERIFY" in warnings[0].getMessage()
    with pytest.raises(httpx.ConnectError):  # the other service of the same client still verifies
        fetch(mode, "https://payments/", environ=env)


def test_verification_cannot_be_disabled_mesh_wide() -> None:
    with pytest.raises(meshlib.ConfigError, match=r"MESHLIB_TLS_VERIFY.*MESHLIB_SERVICE_<NAME>__TLS_VERIFY"):
        meshlib.Client(environ={"MESHLIB_SERVICE_A": "static://127.0.0.1:1", "MESHLIB_TLS_VERIFY": "false"})


# -- without meshlib TLS settings, httpx's own arguments apply ------------------------------------------------


def test_without_mesh_tls_settings_the_client_verify_and_cert_apply(
    mode: str, ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory
) -> None:
    backend = tls_backend(ca.issue("payments"), client_ca=ca)
    cert, key = ca.issue(common_name="from-httpx-args").write(tmp_path, "client")
    context = ssl.create_default_context(cafile=str(ca.write(tmp_path / "ca.pem")))
    context.load_cert_chain(cert, key)
    response = fetch(mode, "https://payments/", environ=mesh_env(backend), verify=context)
    assert response.status_code == 200
    assert common_name(backend.requests[0].peercert) == "from-httpx-args"


def test_mesh_tls_settings_replace_the_client_verify_for_their_service(
    ca: CA, tmp_path: Path, tls_backend: TLSBackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    backend = tls_backend(ca.issue("payments"))
    env = mesh_env(backend, TLS_CA_FILE=str(ca.write(tmp_path / "ca.pem")))
    with caplog.at_level(logging.WARNING, logger="meshlib"):
        response = fetch("sync", "https://payments/", environ=env, verify=False)
    assert response.status_code == 200
    assert any("verify=/cert= arguments do not apply" in r.getMessage() for r in caplog.records)
