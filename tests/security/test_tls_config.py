"""TLS settings from the environment and from code: layering, validation, errors naming the variable."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

import meshlib
from meshlib.config import SERVICE_SETTINGS, MeshConfig, ServiceConfig
from meshlib.security import TLSSettings
from tests.httplib import httpx
from tests.security.pki import CA, DAY, NOW

SERVICES = {"MESHLIB_SERVICE_PAYMENTS": "static://127.0.0.1:8443", "MESHLIB_SERVICE_BILLING": "static://127.0.0.1:9443"}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A CA file and a valid client certificate/key pair."""
    ca = CA()
    cert, key = ca.issue(common_name="client").write(tmp_path, "client")
    return {"ca": str(ca.write(tmp_path / "ca.pem")), "cert": str(cert), "key": str(key)}


def test_no_tls_variables_means_no_tls_settings() -> None:
    config = MeshConfig.from_env(SERVICES)
    assert config.tls is None
    assert config.tls_for("PAYMENTS") is None
    assert config.tls_reload_interval == 5.0


def test_mesh_wide_and_per_service_variables_layer(files: dict[str, str]) -> None:
    env = {
        **SERVICES,
        "MESHLIB_TLS_CA_FILE": files["ca"],
        "MESHLIB_TLS_CERT_FILE": files["cert"],
        "MESHLIB_TLS_KEY_FILE": files["key"],
        "MESHLIB_TLS_SERVER_ID": "spiffe://prod.example",
        "MESHLIB_TLS_RELOAD_INTERVAL": "250ms",
        "MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_ID": "spiffe://prod.example/ns/pay/sa/payments",
        "MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_NAME": "Payments.Internal",
    }
    config = MeshConfig.from_env(env)
    assert config.tls_reload_interval == 0.25
    billing = config.tls_for("BILLING")
    assert billing == TLSSettings(
        ca_file=files["ca"], cert_file=files["cert"], key_file=files["key"], server_id="spiffe://prod.example"
    )
    payments = config.tls_for("PAYMENTS")
    assert payments is not None
    assert payments.server_id == "spiffe://prod.example/ns/pay/sa/payments"
    assert payments.server_name == "payments.internal"
    assert payments.cert_file == files["cert"]
    assert payments.variable("server_id") == "MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_ID"
    assert payments.variable("ca_file") == "MESHLIB_TLS_CA_FILE"


def test_a_per_service_certificate_brings_its_own_key(files: dict[str, str]) -> None:
    env = {
        **SERVICES,
        "MESHLIB_TLS_CERT_FILE": files["cert"],
        "MESHLIB_TLS_KEY_FILE": files["key"],
        "MESHLIB_SERVICE_PAYMENTS__TLS_CERT_FILE": "/other/combined.pem",
    }
    payments = MeshConfig.from_env(env).tls_for("PAYMENTS")
    assert payments is not None
    assert (payments.cert_file, payments.key_file) == ("/other/combined.pem", None)


def test_verify_false_for_a_service_drops_the_inherited_identity() -> None:
    env = {
        **SERVICES,
        "MESHLIB_TLS_SERVER_ID": "spiffe://prod.example",
        "MESHLIB_SERVICE_BILLING__TLS_VERIFY": "false",
    }
    config = MeshConfig.from_env(env)
    billing = config.tls_for("BILLING")
    assert billing is not None
    assert (billing.verify, billing.server_id) == (False, None)
    assert config.tls_for("PAYMENTS") == TLSSettings(server_id="spiffe://prod.example")


def test_verify_false_with_an_explicit_identity_is_an_error() -> None:
    env = {
        **SERVICES,
        "MESHLIB_SERVICE_BILLING__TLS_SERVER_ID": "spiffe://prod.example",
        "MESHLIB_SERVICE_BILLING__TLS_VERIFY": "no",
    }
    with pytest.raises(meshlib.ConfigError, match="MESHLIB_SERVICE_BILLING__TLS_VERIFY"):
        MeshConfig.from_env(env)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MESHLIB_TLS_SERVER_ID", "https://prod.example/x", "scheme is 'https'"),
        ("MESHLIB_TLS_SERVER_ID", "spiffe://Prod.Example/x", "lower-case"),
        ("MESHLIB_TLS_SERVER_ID", "spiffe://prod.example/ns/", "trailing"),
        ("MESHLIB_TLS_SERVER_ID", "spiffe://prod.example/a/../b", r"'\.\.'"),
        ("MESHLIB_TLS_SERVER_ID", "spiffe://prod.example:8443/x", "trust domain"),
        ("MESHLIB_TLS_SERVER_ID", "spiffe:///ns/x", "trust domain is empty"),
        ("MESHLIB_TLS_SERVER_ID", "spiffe://prod.example/a?b=c", "path segment"),
        ("MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_ID", "prod.example", "does not start with spiffe://"),
        ("MESHLIB_TLS_KEY_FILE", "/some/key.pem", "MESHLIB_TLS_CERT_FILE is not set"),
        ("MESHLIB_TLS_SERVER_NAME", "payments.internal", "per-service setting"),
        ("MESHLIB_TLS_VERIFY", "false", "per-service setting"),
        ("MESHLIB_SERVICE_PAYMENTS__TLS_VERIFY", "maybe", "a boolean"),
        ("MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_NAME", "bad name!", "a DNS name or an IP address"),
        ("MESHLIB_TLS_RELOAD_INTERVAL", "often", "a duration"),
        # Blank security settings are refused, never read as "unset": an empty SPIFFE ID must not turn the check off.
        ("MESHLIB_TLS_SERVER_ID", "", "blank TLS setting is refused"),
        ("MESHLIB_SERVICE_PAYMENTS__TLS_SERVER_ID", "  ", "blank TLS setting is refused"),
        ("MESHLIB_TLS_CA_FILE", "", "blank TLS setting is refused"),
        ("MESHLIB_SERVICE_PAYMENTS__TLS_VERIFY", "", "blank TLS setting is refused"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(meshlib.ConfigError, match=message) as caught:
        MeshConfig.from_env({**SERVICES, variable: value})
    assert caught.value.variable == variable


def test_a_long_spiffe_id_is_refused() -> None:
    with pytest.raises(meshlib.ConfigError, match="2048 bytes"):
        TLSSettings(server_id="spiffe://prod.example/" + "a" * 2048)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("variable", "setup", "message"),
    [
        ("MESHLIB_TLS_CA_FILE", lambda d: str(d / "missing.pem"), "does not exist"),
        ("MESHLIB_TLS_CA_FILE", lambda d: _write(d / "junk.pem", b"junk"), "not a usable PEM CA bundle"),
        ("MESHLIB_TLS_CERT_FILE", lambda d: _write(d / "junk.crt", b"junk"), "not a PEM certificate"),
        ("MESHLIB_TLS_CERT_FILE", lambda d: str(d / "gone.crt"), "cannot be read"),
    ],
)
def test_files_are_loaded_at_construction(
    mode: str, tmp_path: Path, files: dict[str, str], *, variable: str, setup: object, message: str
) -> None:
    env = {**SERVICES, "MESHLIB_TLS_CA_FILE": files["ca"], "MESHLIB_TLS_CERT_FILE": files["cert"]}
    env["MESHLIB_TLS_KEY_FILE"] = files["key"]
    env[variable] = setup(tmp_path)  # type: ignore[operator]
    client_type = meshlib.Client if mode == "sync" else meshlib.AsyncClient
    with pytest.raises(meshlib.ConfigError, match=message) as caught:
        client_type(environ=env)
    assert caught.value.variable == variable


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_a_key_that_does_not_match_is_refused(tmp_path: Path, files: dict[str, str]) -> None:
    _, other_key = CA().issue().write(tmp_path, "other")
    env = {**SERVICES, "MESHLIB_TLS_CERT_FILE": files["cert"], "MESHLIB_TLS_KEY_FILE": str(other_key)}
    with pytest.raises(meshlib.ConfigError, match="does not match the certificate") as caught:
        meshlib.Client(environ=env)
    assert caught.value.variable == "MESHLIB_TLS_KEY_FILE"
    assert "PRIVATE KEY" not in str(caught.value)


def test_an_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    leaf = CA().issue()
    from cryptography.hazmat.primitives import serialization

    encrypted = leaf.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    cert, key = leaf.write(tmp_path, "client")
    key.write_bytes(encrypted)
    env = {**SERVICES, "MESHLIB_TLS_CERT_FILE": str(cert), "MESHLIB_TLS_KEY_FILE": str(key)}
    with pytest.raises(meshlib.ConfigError, match="encrypted"):
        meshlib.Client(environ=env)


def test_an_expired_client_certificate_is_refused_at_construction(tmp_path: Path) -> None:
    cert, key = CA().issue(not_before=NOW - 3 * DAY, not_after=NOW - DAY).write(tmp_path, "old")
    env = {**SERVICES, "MESHLIB_TLS_CERT_FILE": str(cert), "MESHLIB_TLS_KEY_FILE": str(key)}
    with pytest.raises(meshlib.ConfigError, match="expired at") as caught:
        meshlib.Client(environ=env)
    assert caught.value.variable == "MESHLIB_TLS_CERT_FILE"


def test_one_file_with_certificate_and_key_works(tmp_path: Path) -> None:
    leaf = CA().issue()
    combined = tmp_path / "combined.pem"
    combined.write_bytes(leaf.chain_pem + leaf.key_pem)
    with meshlib.Client(environ={**SERVICES, "MESHLIB_TLS_CERT_FILE": str(combined)}) as client:
        assert set(client.tls_contexts) == {"PAYMENTS", "BILLING"}


def test_contexts_are_tls_1_2_plus_verifying_and_shared_by_equal_settings(files: dict[str, str]) -> None:
    env = {
        **SERVICES,
        "MESHLIB_SERVICE_LEGACY": "static://127.0.0.1:1",
        "MESHLIB_SERVICE_LEGACY__TLS_VERIFY": "false",
        "MESHLIB_TLS_CA_FILE": files["ca"],
    }
    with meshlib.Client(environ=env) as client:
        contexts = client.tls_contexts
        assert contexts["PAYMENTS"] is contexts["BILLING"]  # one CA load, one watch
        for context in (contexts["PAYMENTS"], contexts["PAYMENTS"].current):
            assert context.minimum_version is ssl.TLSVersion.TLSv1_2
            assert context.verify_mode is ssl.CERT_REQUIRED
            assert context.check_hostname
        legacy = contexts["LEGACY"].current
        assert (legacy.verify_mode, legacy.check_hostname) == (ssl.CERT_NONE, False)
        assert legacy.minimum_version is ssl.TLSVersion.TLSv1_2


def test_a_spiffe_id_replaces_the_host_name_check_but_not_chain_verification() -> None:
    with meshlib.Client(environ={**SERVICES, "MESHLIB_TLS_SERVER_ID": "spiffe://prod.example"}) as client:
        inner = client.tls_contexts["PAYMENTS"].current
        assert (inner.verify_mode, inner.check_hostname) == (ssl.CERT_REQUIRED, False)


def test_service_config_and_tls_argument_in_code(files: dict[str, str]) -> None:
    mesh_wide = TLSSettings(ca_file=files["ca"])
    own = TLSSettings(ca_file=files["ca"], cert_file=files["cert"], key_file=files["key"])
    services = {
        "payments": "static://127.0.0.1:1",
        "billing": ServiceConfig("billing", "static://127.0.0.1:2", tls=own),
    }
    with meshlib.Client(services=services, tls=mesh_wide) as client:
        assert client.tls_contexts["PAYMENTS"].settings == mesh_wide
        assert client.tls_contexts["BILLING"].settings == own
    with pytest.raises(meshlib.ConfigError, match=r"TLSSettings\.key_file"):
        TLSSettings(key_file="k.pem")


def test_a_user_transport_is_used_as_is_and_tls_settings_are_reported_unused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    env = {**SERVICES, "MESHLIB_TLS_SERVER_ID": "spiffe://td"}
    with caplog.at_level(logging.WARNING, logger="meshlib"), meshlib.Client(environ=env, transport=transport) as c:
        assert c.get("https://payments/").status_code == 200
        assert c.tls_contexts == {}
    assert any("are not applied" in r.getMessage() for r in caplog.records)


def test_every_tls_suffix_works_per_service(files: dict[str, str]) -> None:
    samples = {
        "TLS_CA_FILE": ("ca_file", files["ca"]),
        "TLS_CERT_FILE": ("cert_file", files["cert"]),
        "TLS_KEY_FILE": ("key_file", files["key"]),
        "TLS_SERVER_NAME": ("server_name", "payments.internal"),
        "TLS_SERVER_ID": ("server_id", "spiffe://prod.example/ns/pay/sa/payments"),
        "TLS_VERIFY": ("verify", False),
    }
    assert set(samples) == {suffix for suffix in SERVICE_SETTINGS if suffix.startswith("TLS_")}
    for suffix, (attr, value) in samples.items():
        env = {**SERVICES, f"MESHLIB_SERVICE_PAYMENTS__{suffix}": str(value).lower()}
        if suffix == "TLS_KEY_FILE":
            env["MESHLIB_SERVICE_PAYMENTS__TLS_CERT_FILE"] = files["cert"]
        settings = MeshConfig.from_env(env).tls_for("PAYMENTS")
        assert settings is not None
        assert getattr(settings, attr) == value
        assert settings.variable(attr) == f"MESHLIB_SERVICE_PAYMENTS__{suffix}"
        assert MeshConfig.from_env(env).tls_for("BILLING") is None
