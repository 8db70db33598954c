"""Hostile configuration values: each is a :class:`ConfigError` naming the variable, never another exception,
never a silently wrong setting, and never a message that shows a secret.

Also the Go duration syntax (``1h30m``, ``500us``...) and its cap, and the Consul agent's credentials kept out
of errors, ``mesh_status()`` and logs when the agent (or a proxy in front of it) echoes them back.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import threading
from pathlib import Path

import pytest

import meshlib
from meshlib._config.parse import MAX_DURATION
from meshlib.config import MeshConfig, ResilienceSettings, ServiceConfig, parse_duration
from meshlib.discovery import DiscoverySettings, build_resolver
from meshlib.discovery.consul import ConsulAgent
from meshlib.discovery.consul.agent import _redact
from meshlib.testing import Backend, Behavior
from tests.conftest import BackendFactory

SECRET = "s3cr3t-7f2a-token"
PASSWORD = "pa55-w0rd-9c1e"
SVC = {"MESHLIB_SERVICE_PAYMENTS": "static://10.0.0.5:8080"}


@pytest.fixture(autouse=True)
def no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CONSUL_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("CONSUL_"):
            monkeypatch.delenv(name)


# --- numbers, ports, addresses, header names: ConfigError, not ValueError/OverflowError ----------------------


@pytest.mark.parametrize(
    ("env", "variable", "expected"),
    [
        # int() refuses more than 4,300 digits with a ValueError of its own
        ({"MESHLIB_RETRIES": "9" * 5000}, "MESHLIB_RETRIES", "at most 18"),
        ({**SVC, "MESHLIB_SERVICE_PAYMENTS__MAX_INFLIGHT": "9" * 5000}, "MESHLIB_SERVICE_PAYMENTS__MAX_INFLIGHT", "18"),
        # float(10**400) overflows in the retry budget
        ({"MESHLIB_RETRY_BUDGET_MIN_PER_SECOND": "9" * 400}, "MESHLIB_RETRY_BUDGET_MIN_PER_SECOND", "at most 18"),
        ({"MESHLIB_RETRY_BUDGET_MIN_PER_SECOND": "9" * 18}, "MESHLIB_RETRY_BUDGET_MIN_PER_SECOND", "1,000,000,000"),
        ({"MESHLIB_MAX_INFLIGHT": "1" + "0" * 12}, "MESHLIB_MAX_INFLIGHT", "at most 1,000,000,000"),
        # str.isdigit() accepts superscripts and full-width digits; int() then fails or accepts them
        ({"MESHLIB_ADMIN_ADDR": "127.0.0.1:\u00b2"}, "MESHLIB_ADMIN_ADDR", "loopback address and port"),
        ({"MESHLIB_ADMIN_ADDR": "127.0.0.1:\uff19\uff19\uff10\uff11"}, "MESHLIB_ADMIN_ADDR", "loopback address"),
        ({"MESHLIB_DNS_SERVERS": "127.0.0.1:\uff15\uff13"}, "MESHLIB_DNS_SERVERS", "nameserver IP addresses"),
        ({"MESHLIB_DNS_SERVERS": "[::1]:\u00b2"}, "MESHLIB_DNS_SERVERS", "nameserver IP addresses"),
        ({"MESHLIB_BREAKER_FAILURES": "\uff15"}, "MESHLIB_BREAKER_FAILURES", "ASCII digits"),
        ({"MESHLIB_RETRY_BUDGET_PERCENT": "\uff12\uff10%"}, "MESHLIB_RETRY_BUDGET_PERCENT", "a fraction"),
        ({"MESHLIB_OUTLIER_MAX_PERCENT": "9" * 400}, "MESHLIB_OUTLIER_MAX_PERCENT", "a percentage"),
        # '::1:5353' is a valid IPv6 address: silently port 53 of the wrong address before
        ({"MESHLIB_DNS_SERVERS": "::1:5353"}, "MESHLIB_DNS_SERVERS", "write [::1]:5353 for port 5353"),
        ({"MESHLIB_DNS_SERVERS": "10.0.0.1,fe80::1:53"}, "MESHLIB_DNS_SERVERS", "ambiguous"),
        # header names are RFC 9110 tokens, per service too (never checked before)
        (
            {**SVC, "MESHLIB_SERVICE_PAYMENTS__HASH_HEADER": "x user\r\nX-Evil: 1"},
            "MESHLIB_SERVICE_PAYMENTS__HASH_HEADER",
            "RFC 9110 token",
        ),
        ({"MESHLIB_HASH_HEADER": "x-user\r\nX-Evil: 1"}, "MESHLIB_HASH_HEADER", "RFC 9110 token"),
        ({**SVC, "MESHLIB_SERVICE_PAYMENTS__HASH_HEADER": "x-user:"}, "MESHLIB_SERVICE_PAYMENTS__HASH_HEADER", "token"),
        # durations: '9'*400 was infinity; above threading.TIMEOUT_MAX a background wait raised later
        ({"MESHLIB_TIMEOUT": "9" * 400}, "MESHLIB_TIMEOUT", "at most 64 characters"),
        ({"MESHLIB_DNS_TTL_MAX": "9" * 20}, "MESHLIB_DNS_TTL_MAX", "at most 720h"),
        ({"MESHLIB_TLS_RELOAD_INTERVAL": f"{int(threading.TIMEOUT_MAX) + 1}"}, "MESHLIB_TLS_RELOAD_INTERVAL", "720h"),
        ({"MESHLIB_DISCOVERY_MAX_STALE": "721h"}, "MESHLIB_DISCOVERY_MAX_STALE", "at most 720h"),
        ({"MESHLIB_BREAKER_RESET": "2562048h"}, "MESHLIB_BREAKER_RESET", "at most 720h"),
        ({"MESHLIB_EWMA_DECAY": "inf"}, "MESHLIB_EWMA_DECAY", "a duration"),
        ({"MESHLIB_EWMA_DECAY": "nan"}, "MESHLIB_EWMA_DECAY", "a duration"),
        ({"MESHLIB_DNS_TIMEOUT": "1e400"}, "MESHLIB_DNS_TIMEOUT", "a duration"),
        ({"MESHLIB_DNS_TIMEOUT": "-1h30m"}, "MESHLIB_DNS_TIMEOUT", "not a negative duration"),
        ({"MESHLIB_DNS_TIMEOUT": "\uff12s"}, "MESHLIB_DNS_TIMEOUT", "a duration"),
        ({"MESHLIB_DNS_TIMEOUT": "1h 30m"}, "MESHLIB_DNS_TIMEOUT", "a duration"),
        ({"MESHLIB_DNS_TIMEOUT": "1d"}, "MESHLIB_DNS_TIMEOUT", "a duration"),
        ({"MESHLIB_DNS_TIMEOUT": "0ns"}, "MESHLIB_DNS_TIMEOUT", "greater than zero"),
    ],
)
def test_hostile_values_are_config_errors_naming_the_variable(
    env: dict[str, str], variable: str, expected: str
) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        MeshConfig.from_env(env)
    message = str(info.value)
    assert info.value.variable == variable
    assert message.startswith(f"{variable}=") and expected in message
    assert "\r" not in message and "\n" not in message  # control characters are shown escaped
    assert len(message) < 800  # a 5,000-digit value is shown cut, with its length


def test_a_long_value_is_shown_cut_with_its_length() -> None:
    with pytest.raises(meshlib.ConfigError, match=r"\.\.\. \(5000 characters\)"):
        MeshConfig.from_env({"MESHLIB_RETRIES": "9" * 5000})


def test_a_hostile_port_in_a_target_fails_at_client_construction() -> None:
    for target in ("static://10.0.0.5:\uff18\uff10", "static://10.0.0.5:\u00b2", f"dns://users.internal:{'9' * 5000}"):
        with pytest.raises(meshlib.ConfigError) as info:
            meshlib.Client(environ={"MESHLIB_SERVICE_PAYMENTS": target})
        assert info.value.variable == "MESHLIB_SERVICE_PAYMENTS"


def test_dns_servers_ipv6_forms() -> None:
    config = MeshConfig.from_env({"MESHLIB_DNS_SERVERS": "::1, [::1]:5353, [::1:5353], 2001:db8::1, 10.0.0.1:53"})
    assert config.dns_servers == (("::1", 53), ("::1", 5353), ("::1:5353", 53), ("2001:db8::1", 53), ("10.0.0.1", 53))


def test_settings_classes_refuse_unbounded_values_given_directly() -> None:
    """What the parsers refuse, the classes refuse too when built in code (no ``float()`` overflow either)."""
    hostile: list[tuple[type[object], dict[str, object], str]] = [
        (
            ResilienceSettings,
            {"retry_budget_min_per_second": 10**400},
            "ResilienceSettings.retry_budget_min_per_second",
        ),
        (ResilienceSettings, {"max_inflight": 10**10}, "ResilienceSettings.max_inflight"),
        (ResilienceSettings, {"breaker_reset": 10**400}, "ResilienceSettings.breaker_reset"),
        (ResilienceSettings, {"outlier_max_ejection": math.inf}, "ResilienceSettings.outlier_max_ejection"),
        (MeshConfig, {"tls_reload_interval": threading.TIMEOUT_MAX * 2}, "MeshConfig.tls_reload_interval"),
        (MeshConfig, {"ttl_max": math.inf}, "MeshConfig.ttl_max"),
        (MeshConfig, {"dns_timeout": math.nan}, "MeshConfig.dns_timeout"),
        (MeshConfig, {"hash_header": "x user\r\nX-Evil: 1"}, "MeshConfig.hash_header"),
        (ServiceConfig, {"name": "p", "target": "static://a:1", "hash_header": "a b"}, "ServiceConfig.hash_header"),
    ]
    for cls, kwargs, variable in hostile:
        with pytest.raises(meshlib.ConfigError) as info:
            cls(**kwargs)
        assert info.value.variable == variable
    assert MeshConfig(tls_reload_interval=0).tls_reload_interval == 0  # 0: never reload
    assert ResilienceSettings(breaker_reset=MAX_DURATION).breaker_reset == MAX_DURATION


# --- Go durations ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        # the forms accepted before
        ("2", 2.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("5m", 300.0),
        ("1h", 3600.0),
        (".5", 0.5),
        ("1.5 s", 1.5),
        # Go's time.ParseDuration, as Consul, Envoy and Linkerd configurations write them
        ("1h30m", 5400.0),
        ("500us", 0.0005),
        ("500\u00b5s", 0.0005),
        ("500\u03bcs", 0.0005),
        ("300000ms", 300.0),
        ("1500000000ns", 1.5),
        ("2h45m30.5s", 9930.5),
        ("1m0.5s", 60.5),
        ("1.s", 1.0),
        ("+10s", 10.0),
        ("720h", MAX_DURATION),
        ("43200m", MAX_DURATION),
    ],
)
def test_durations_accept_go_syntax(raw: str, seconds: float) -> None:
    assert parse_duration("X", raw) == pytest.approx(seconds, rel=1e-12)


def test_go_durations_from_the_environment() -> None:
    config = MeshConfig.from_env(
        {
            **SVC,
            "MESHLIB_DNS_TTL_MAX": "1h30m",
            "MESHLIB_TLS_RELOAD_INTERVAL": "0",
            "MESHLIB_SERVICE_PAYMENTS__TIMEOUT": "1m30s",
            "MESHLIB_SERVICE_PAYMENTS__BREAKER_RESET": "300000ms",
        }
    )
    assert config.ttl_max == 5400.0 and config.tls_reload_interval == 0.0
    assert config.policy_for("PAYMENTS").timeout == 90.0
    assert config.resilience_for("PAYMENTS").breaker_reset == 300.0


def test_the_duration_cap_is_below_every_platform_timeout_max() -> None:
    assert MAX_DURATION == 30 * 86400 and MAX_DURATION < threading.TIMEOUT_MAX
    with pytest.raises(meshlib.ConfigError):
        parse_duration("X", "720h1ns")


# --- Consul: secrets never shown ---------------------------------------------------------------------------


def _client_error(env: dict[str, str]) -> meshlib.ConfigError:
    with pytest.raises(meshlib.ConfigError) as info:
        meshlib.Client(environ={"MESHLIB_SERVICE_PAYMENTS": "consul://payments", **env})
    return info.value


@pytest.mark.parametrize(
    "address",
    [
        f"http://user:{SECRET}@127.0.0.1:8500",
        f"https://{SECRET}@consul.internal",
        f"user:{SECRET}@127.0.0.1:8500",
        f"http://user:{SECRET.replace('-', '%2D')}@127.0.0.1:8500",
    ],
)
def test_credentials_in_consul_http_addr_are_refused_without_echoing_them(address: str) -> None:
    error = _client_error({"CONSUL_HTTP_ADDR": address})
    assert error.variable == "CONSUL_HTTP_ADDR"
    assert "CONSUL_HTTP_AUTH" in str(error) and "<redacted>@" in str(error)
    assert SECRET not in str(error) and "%2D" not in str(error) and "user" not in str(error.value)


@pytest.mark.parametrize(
    "target",
    [
        f"consul://payments?token={SECRET}",
        f"consul://payments?TOKEN={SECRET}",
        f"consul://payments?%74oken={SECRET}&tag=a",
        f"consul://payments?tag=a&token={SECRET.replace('-', '%2D')}",
        f"consul://payments?token={SECRET.replace('-', '+')}",
        f"consul://payments?x-consul-token={SECRET}",
        f"consul://payments?Acl_Token={SECRET}",
    ],
)
def test_a_token_in_the_target_is_refused_in_any_spelling(target: str) -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        build_resolver("payments", target, DiscoverySettings(environ={}), variable="MESHLIB_SERVICE_PAYMENTS")
    message = str(info.value)
    assert info.value.variable == "MESHLIB_SERVICE_PAYMENTS" and "CONSUL_HTTP_TOKEN" in message
    assert "<redacted>" in message
    for form in (SECRET, SECRET.replace("-", "%2D"), SECRET.replace("-", "+"), "7f2a"):
        assert form not in message


def test_user_info_in_any_target_is_redacted() -> None:
    for target in (f"consul://admin:{SECRET}@payments", f"static://admin:{SECRET}@10.0.0.5:8080"):
        with pytest.raises(meshlib.ConfigError) as info:
            build_resolver("payments", target, DiscoverySettings(environ={}), variable="MESHLIB_SERVICE_PAYMENTS")
        assert SECRET not in str(info.value) and "<redacted>@" in str(info.value)


def test_consul_address_with_a_superscript_port_is_a_config_error() -> None:
    for address in ("127.0.0.1:\u00b2", "http://127.0.0.1:\uff18\uff15\uff10\uff10", f"127.0.0.1:{'9' * 5000}"):
        assert _client_error({"CONSUL_HTTP_ADDR": address}).variable == "CONSUL_HTTP_ADDR"


@pytest.mark.parametrize("bad", ["\r\nX-Evil: 1", "\n", "\x00", "\x7f", "\x1b[31m"])
def test_a_token_with_control_characters_is_refused_without_showing_it(bad: str, tmp_path: Path) -> None:
    token = f"{SECRET}{bad}tail"
    error = _client_error({"CONSUL_HTTP_TOKEN": token})
    assert error.variable == "CONSUL_HTTP_TOKEN" and "control characters" in str(error)
    assert SECRET not in str(error) and "tail" not in str(error) and "Evil" not in str(error)
    token_file = tmp_path / "token"
    token_file.write_text(f"{token}\n")
    error = _client_error({"CONSUL_HTTP_TOKEN_FILE": str(token_file)})
    assert error.variable == "CONSUL_HTTP_TOKEN_FILE" and str(token_file) in str(error)
    assert SECRET not in str(error) and "tail" not in str(error)
    error = _client_error({"CONSUL_HTTP_AUTH": f"user:{token}"})
    assert error.variable == "CONSUL_HTTP_AUTH" and SECRET not in str(error)


def test_agent_secrets_cover_transformed_forms() -> None:
    agent = ConsulAgent.from_env({"CONSUL_HTTP_TOKEN": "a/b c", "CONSUL_HTTP_AUTH": f"me:{PASSWORD}"})
    basic = base64.b64encode(f"me:{PASSWORD}".encode()).decode()
    assert {"a/b c", "a%2Fb%20c", "a%2Fb+c", PASSWORD, basic}.issubset(agent.secrets())


BASIC = base64.b64encode(f"me:{PASSWORD}".encode()).decode()
#: What an agent, or a proxy in front of it, may send back in an error body: the request's credentials.
ECHOES = {
    "headers": f"upstream rejected the request; headers: Authorization: Basic {BASIC}\r\nX-Consul-Token: {SECRET}",
    "json": json.dumps({"error": "denied", "headers": {"authorization": f"Basic {BASIC}", "x-consul-token": SECRET}}),
    "query": f"bad request GET /v1/health/service/payments?token={SECRET}&password={PASSWORD}",
    # the secret straddles the 300-character cut of a body in a message: redacted before it is cut
    "cut": "x" * 290 + f" {SECRET} Basic {BASIC}",
}
#: The secrets and fragments of them that must not appear (the cut one would leave its first characters).
_FORMS = (SECRET, SECRET[:9], PASSWORD, BASIC.rstrip("="), BASIC[:9])


@pytest.fixture(params=sorted(ECHOES))
def echoing_agent(request: pytest.FixtureRequest, start_backends: BackendFactory) -> tuple[dict[str, str], Backend]:
    """A "Consul agent" answering every query 500 with the caller's credentials in the body, and the client's
    environment pointing at it, with a token and basic auth."""
    body = ECHOES[request.param].encode()
    (agent,) = start_backends(1, behavior=Behavior(status=500, body=body), prefix="consul")
    env = {
        "MESHLIB_SERVICE_PAYMENTS": "consul://payments",
        "CONSUL_HTTP_ADDR": agent.address,
        "CONSUL_HTTP_TOKEN": SECRET,
        "CONSUL_HTTP_AUTH": f"me:{PASSWORD}",
    }
    return env, agent


def _assert_sent(agent: Backend) -> None:
    """The agent did receive the credentials it echoes: they were sent, just never shown."""
    request = agent.requests[0]
    assert request.headers["x-consul-token"] == SECRET
    assert request.headers["authorization"] == f"Basic {BASIC}"


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for form in _FORMS:
            assert form not in text


def test_an_agent_echoing_credentials_never_shows_them(
    echoing_agent: tuple[dict[str, str], Backend], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env, agent = echoing_agent
    with meshlib.Client(environ=env) as client:
        with pytest.raises(meshlib.NoEndpointsError) as info:
            client.get("http://payments/")
        status = json.dumps(client.mesh_status().to_dict())
    message = str(info.value)
    assert "Consul answered HTTP 500" in message and "<redacted" in message  # the echo is there, redacted
    assert "<redacted" in status and "<redacted" in caplog.text
    _assert_sent(agent)
    _assert_no_secret(message, repr(info.value), status, caplog.text)


@pytest.mark.anyio
async def test_an_agent_echoing_credentials_never_shows_them_async(
    echoing_agent: tuple[dict[str, str], Backend], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env, agent = echoing_agent
    async with meshlib.AsyncClient(environ=env) as client:
        with pytest.raises(meshlib.NoEndpointsError) as info:
            await client.get("http://payments/")
        status = json.dumps(client.mesh_status().to_dict())
    message = str(info.value)
    assert "Consul answered HTTP 500" in message and "<redacted" in message
    assert "<redacted" in status and "<redacted" in caplog.text
    _assert_sent(agent)
    _assert_no_secret(message, repr(info.value), status, caplog.text)


def test_foreign_credentials_in_an_agent_answer_are_redacted() -> None:
    """Credentials that are not ours (a proxy's, another client's) are redacted by their shape."""
    text = _redact(
        'Authorization: Basic Zm9vOmJhcmJheg== "x-consul-token": "other-token-123" Bearer eyJhbGciOiJIUzI1 '
        "GET /v1/kv?token=abcdef123 proxy-authorization=Digest abc",
        (),
    )
    for secret in ("Zm9vOmJhcmJheg", "other-token-123", "eyJhbGciOiJIUzI1", "abcdef123", "Digest abc"):
        assert secret not in text
    assert text.count("<redacted>") == 5
