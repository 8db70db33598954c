"""The runnable examples in examples/ keep working."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.httplib import ONLY_HTTPX

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (and pickling) look a class's module up there
    spec.loader.exec_module(module)
    return module


def test_two_services_reach_both_users_instances_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("two_services")
    assert example.main([]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("GET http://frontend/profile/")]
    assert len(lines) == 6
    assert sum("served by users-1" in line for line in lines) == 3  # round_robin alternates
    assert sum("served by users-2" in line for line in lines) == 3
    assert "users instances that answered: users-1, users-2" in out


@ONLY_HTTPX  # the snippet is written for httpx, the default library (httpx.MockTransport, meshlib.Client)
def test_getting_started_mock_transport_snippet_passes() -> None:
    """The MockTransport example in docs/getting-started.md is run as written, so it cannot rot."""
    text = (EXAMPLES.parent / "docs" / "getting-started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    (snippet,) = [block for block in blocks if "def test_charge_goes_to_payments" in block]
    namespace: dict[str, object] = {}
    exec(compile(snippet, "docs/getting-started.md", "exec"), namespace)
    test = namespace["test_charge_goes_to_payments"]
    assert callable(test)
    test()


def test_mtls_authenticates_both_sides_and_refuses_a_wrong_identity_unsent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = load_example("mtls")
    assert example.main([]) == 0
    out = capsys.readouterr().out
    assert "GET https://payments/charge -> answered by payments-1" in out
    assert "GET https://users/users/7 -> answered by users-1" in out
    # What the client verified, and what each server verified of the client (mutual TLS).
    assert "server presented spiffe://example.org/ns/shop/sa/payments" in out
    assert "server presented spiffe://example.org/ns/shop/sa/users" in out
    assert out.count("it saw the caller as spiffe://example.org/ns/shop/sa/frontend") == 2
    # The mismatched expectation fails in the handshake: nothing reached the server.
    assert (
        "expecting spiffe://example.org/ns/shop/sa/billing -> ConnectError: "
        "presented spiffe://example.org/ns/shop/sa/payments" in out
    )
    assert "requests payments received from that client: 0" in out
    assert "mutual TLS with SPIFFE IDs: OK" in out


def test_resilience_keeps_callers_error_free_and_holds_the_scope_deadline() -> None:
    example = load_example("resilience")
    outcome = example.run()
    assert outcome.caller_errors == 0
    assert outcome.retried_requests >= 1
    assert outcome.failing_backend_attempts <= 6  # out after 5 consecutive failures (a probe at most besides)
    assert outcome.breaker == "open" or outcome.ejected
    assert re.fullmatch(r"[1-9][0-9]{0,7}[un]", outcome.grpc_timeout_seen)  # what was left of the 0.5 s
    assert outcome.deadline_error == "DeadlineExceeded"
    assert example.DEADLINE - 0.05 <= outcome.deadline_elapsed < example.DEADLINE + 0.5


def test_resilience_main_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("resilience")
    assert example.main([]) == 0
    out = capsys.readouterr().out
    assert f"{example.REQUESTS} requests, 0 errors seen by callers" in out
    assert "resilience: OK" in out


def test_canary_rollout_moves_traffic_by_editing_the_routes_file_with_no_failed_request(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = load_example("canary")
    assert example.main(["--requests", "200"]) == 0  # main checks every step's shares against its weights
    out = capsys.readouterr().out
    assert "GET /charge with x-canary: 1 -> payments-v2" in out
    steps = re.findall(r"^step (\d): payments-v1 (\d+) / payments-v2 (\d+): version ([0-9a-f]{12})", out, re.MULTILINE)
    assert [(n, v1, v2) for n, v1, v2, _ in steps] == [
        ("0", "100", "0"),
        ("1", "90", "10"),
        ("2", "50", "50"),
        ("3", "0", "100"),
    ]
    assert len({version for *_, version in steps}) == 4  # each edit was applied as a new version
    shares = re.findall(r"^  (\d+) requests routed by it: payments-v1 (\d+) .*payments-v2 (\d+) ", out, re.MULTILINE)
    assert len(shares) == 4 and all(int(total) >= 200 for total, _, _ in shares)
    assert shares[0][2] == "0" and shares[3][1] == "0"  # 100/0 and 0/100 are exact
    assert 0 < int(shares[1][2]) < int(shares[2][2]) < int(shares[3][2])
    assert re.search(r"^\d+ requests over 4 versions of the file, 0 failed$", out, re.MULTILINE)
    assert "canary: OK" in out


def test_zero_trust_allows_checkout_denies_reporting_and_rate_limits_checkout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("uvicorn", reason="uvicorn is in the dev extra")
    example = load_example("zero_trust")
    assert example.main([]) == 0
    out = capsys.readouterr().out
    assert "checkout  GET /orders/42     -> 200" in out
    assert "checkout  GET /admin/stats   -> 403 RBAC: access denied" in out
    assert "reporting GET /orders/42 x3  -> [403, 403, 403] RBAC: access denied" in out
    burst = re.search(r"GET /orders x8 +-> \[([0-9, ]+)\]", out)
    assert burst is not None
    statuses = [int(s) for s in burst.group(1).split(", ")]
    assert statuses.count(429) >= 4 and set(statuses) == {200, 429}  # 2 left of the burst of 3 (a refill or two)
    assert "Retry-After: 1" in out
    assert re.search(r"retries=2 -> 200 after [2-3] attempts", out)  # a 429 first, then admitted after waiting
    assert "GET /orders/42 from spiffe://example.org/ns/shop/sa/checkout" in out
    assert "reporting" not in out.split("the handler ran")[1].split("server counters")[0]  # never reached the app
    assert "meshlib.server.authz{meshlib.authz.decision=deny} 3" in out  # reporting: no ALLOW policy matched
    assert "meshlib.server.authz{meshlib.authz.decision=deny,meshlib.authz.policy=shop/no-admin} 1" in out
    assert "zero trust inbound: OK" in out


def test_consul_native_billing_allowed_reporting_denied_over_connect_mtls(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("uvicorn", reason="uvicorn is in the dev extra")
    example = load_example("consul_native")
    assert example.main([]) == 0
    out = capsys.readouterr().out
    billing = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/billing"
    assert f"billing   GET /charge -> 200 (payments-1 saw {billing})" in out  # billing's Consul leaf, verified
    assert "reporting GET /charge -> 403 RBAC: access denied" in out  # the intention "* deny"
    assert re.search(
        rf"billing   GET /charge -> 200 \(payments-dr-1 saw {re.escape(billing)}\); call \d+ .*, 0 failed", out
    )
    handlers = out.split("the callers they saw:")[1].split("consul native")[0]
    assert handlers.split() == ["payments-1", "<-", billing, "payments-dr-1", "<-", billing]  # reporting never ran
    assert "consul native: OK" in out
