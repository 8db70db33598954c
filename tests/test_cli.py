"""The ``meshlib`` command: ``demo`` end to end on loopback backends, ``resolve`` against env configuration."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest

import meshlib
from meshlib.config import ResilienceSettings
from meshlib.tools.cli import main
from meshlib.tools.demo import (
    HEDGE_MAX_EXTRA_LOAD,
    HEDGE_WARMUP,
    DemoOptions,
    EndpointRow,
    PhaseResult,
    percentile,
    render_comparison,
    run_demo,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``MESHLIB_*`` variable from the machine running the tests leaks into them."""
    import os

    for name in list(os.environ):
        if name.startswith("MESHLIB_"):
            monkeypatch.delenv(name)


def comparison_row(output: str, label: str) -> tuple[float, float]:
    """The (p2c_ewma, round_robin) numbers of one row of the demo's closing comparison."""
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(?:%| ms| s)?\s+([\d.]+)", output, re.MULTILINE)
    assert match is not None, f"no {label!r} row in:\n{output}"
    return float(match.group(1)), float(match.group(2))


def comparison_text(output: str, label: str) -> str:
    """The rest of the line of one row of the demo's closing comparison, as text."""
    match = re.search(rf"^\s+{re.escape(label)}\s+(.+)$", output, re.MULTILINE)
    assert match is not None, f"no {label!r} row in:\n{output}"
    return match.group(1)


def test_demo_runs_both_balancers_p2c_avoids_slow_and_retries_hide_the_failing_backend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    concurrency = DemoOptions().concurrency
    assert main(["demo", "--requests", "300", "--no-live"]) == 0
    out = capsys.readouterr().out
    assert "[p2c_ewma]" in out
    assert "[round_robin]" in out
    assert "Comparison" in out
    assert "\x1b[" not in out  # --no-live (and not a TTY): plain tables only
    assert comparison_row(out, "requests") == (300, 300)

    # Slow backend: round robin gives it its turn among the endpoints in rotation (1 in 4 once the failing one
    # is ejected, so ~25 %); p2c_ewma drains it after its first slow answers (typically 1-3 % here).
    p2c_slow, rr_slow = comparison_row(out, "share to slow backend")
    assert rr_slow >= 19.0
    assert p2c_slow < rr_slow / 2

    # Failing backend: ejected (and its breaker opened) after 5 consecutive 503s, under both balancers. At most
    # concurrency - 1 more attempts can have picked it before the 5th failure was recorded; without ejection
    # round robin would have sent it 60 of the 300.
    for attempts in comparison_row(out, "failing backend attempts"):
        assert 5 <= attempts <= 4 + concurrency
    assert comparison_text(out, "failing backend at end").split().count("ejected,") == 2

    # Every one of those 503s (a GET) was retried on another endpoint: the budget (20 % of requests + a floor
    # of 10/s over 10 s, i.e. >= 100 retries) cannot run out on at most 12 retries, so callers see no error.
    assert comparison_row(out, "retries refused by budget") == (0, 0)
    for rate in comparison_row(out, "caller error rate"):
        assert rate < 2.0
    for per_request in comparison_row(out, "attempts per request"):
        assert 1.0 < per_request <= 1.0 + (4 + concurrency) / 300 + 1e-9
    for label in ("p50 latency", "p99 latency", "total time", "retries"):
        comparison_row(out, label)
    assert "so callers saw" in out

    # The split phase: a routes file splits demo-api 90/10 between two versions, then is edited to 50/50 while
    # callers send. Each version of the file routed its 300 calls (min(--requests, 500)); the shares are binomial
    # draws (sd 1.7 and 2.9 points over 300 calls): the bounds are more than 4 sd wide.
    assert "[split] demo-api routed by a routes file (MESHLIB_ROUTES_FILE=" in out
    steps = re.findall(
        r"^  (\d+/\d+)\s+([0-9a-f]{12})\s+(\d+)\s+(\d+) \(\s*[\d.]+%\)\s+(\d+) \(\s*[\d.]+%\)$", out, re.MULTILINE
    )
    assert [step[0] for step in steps] == ["90/10", "50/50"]
    assert steps[0][1] != steps[1][1]  # the edit was applied as a new version of the file
    shares = []
    for _, _, total, v1, v2 in steps:
        assert int(total) >= 300 and int(v1) + int(v2) == int(total)
        shares.append(100 * int(v2) / int(total))
    assert 3.0 <= shares[0] <= 20.0
    assert 35.0 <= shares[1] <= 65.0
    match = re.search(r"^  callers: (\d+) requests, (\d+) errors, while the file was edited under them$", out, re.M)
    assert match is not None and int(match.group(1)) >= 600 and match.group(2) == "0"

    # The hedging phase: the same 300 calls (min(--requests, 600)) without, then with, a p95 hedge policy.
    assert "[hedging] demo-tail: 3 backends" in out
    ms = r"[\d.]+ ms"
    half = rf"^  (without hedging|with hedging)\s+(\d+)\s+(\d+)\s+{ms}\s+{ms}\s+(\d+)\s+(\d+)\s+(\d+)\s+[\d.]+%$"
    halves = {label: tuple(int(n) for n in numbers) for label, *numbers in re.findall(half, out, re.MULTILINE)}
    assert set(halves) == {"without hedging", "with hedging"}
    calls, errors, attempts, sent, won = halves["without hedging"]
    assert (calls, errors, attempts, sent, won) == (300, 0, 300, 0, 0)  # one request per call, nothing hedged
    calls, errors, attempts, sent, won = halves["with hedging"]
    assert calls == 300 and errors == 0
    # ~3 % of the calls stall 150 ms, far above the p95 delay: some were hedged (P(no stall in 420 calls) ~ 3e-6).
    assert sent >= 1
    # Hedges are capped by their budget (10 % here of the calls that may hedge, warmup included; no reserve);
    # every extra request a backend received is a hedge (nothing fails, so nothing is retried); a win is a hedge's.
    assert sent <= HEDGE_MAX_EXTRA_LOAD * (HEDGE_WARMUP + 300)
    assert 0 <= attempts - calls <= sent
    assert won <= sent
    assert "p99 went from" in out


def test_demo_ignores_the_users_mesh_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Honoured, these would fail the demo (invalid balancer) or let every 503 reach the caller (no retries).
    monkeypatch.setenv("MESHLIB_LB", "fastest")
    monkeypatch.setenv("MESHLIB_RETRIES", "0")
    monkeypatch.setenv("MESHLIB_SERVICE_DEMO_API__OUTLIER_FAILURES", "1000")
    results = run_demo(DemoOptions(requests=60, concurrency=4, live=False), io.StringIO())
    for result in results:
        assert result.total == 60
        assert result.refused == 0
        assert result.caller_errors == 0
        assert result.settings.outlier_failures == 5
        # Round robin sends it 1 request in 5 until it is out: 12 of 60, so it is ejected in this phase.
        if result.balancer == "round_robin":
            assert result.removed_role("failing")
            assert result.retries == result.role_attempts("failing") >= 5


def test_demo_redraws_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    results = run_demo(DemoOptions(requests=60, concurrency=4), screen)
    assert [r.balancer for r in results] == ["p2c_ewma", "round_robin"]
    assert all(r.total == 60 for r in results)
    text = screen.getvalue()
    assert "\x1b[J" in text  # each frame clears what the previous one drew
    assert text.count("\x1b[?25l") == text.count("\x1b[?25h") == 1  # cursor hidden, then restored
    # The mesh's log lines were shown as events (not written to stderr through the redraw), then given back.
    log = logging.getLogger("meshlib.resilience")
    assert log.propagate
    assert not log.handlers
    assert "ejected failing" in text
    assert text.count("[split] demo-api") >= 2  # the split phase's table was redrawn too, then finished
    assert text.count("[hedging] demo-tail") >= 2  # and the hedging phase's


def test_comparison_notes_cite_the_runs_numbers() -> None:
    def phase(balancer: str, failing_attempts: int, errors: int, refused: int) -> PhaseResult:
        rows = [
            EndpointRow("healthy-1", "healthy", 100, 0.9, 0.005, 0.01, 0, "closed", False, 0),
            EndpointRow("failing", "failing", failing_attempts, 0.1, 0.005, 0.01, failing_attempts, "open", True, 0),
        ]
        return PhaseResult(
            balancer=balancer,
            rows=rows,
            elapsed=1.0,
            calls=100,
            caller_errors=errors,
            p50=0.005,
            p99=0.01,
            retries=failing_attempts - refused,
            refused=refused,
            removed=frozenset({"failing"}),
            settings=ResilienceSettings(),
            events=[],
        )

    text = " ".join(" ".join(render_comparison([phase("p2c_ewma", 5, 0, 0), phase("round_robin", 7, 2, 2)])).split())
    assert "it got 5 attempts with p2c_ewma and 7 with round_robin" in text
    assert "callers saw 0 errors with p2c_ewma and 2 with round_robin" in text
    assert "ran out (0 refused with p2c_ewma and 2 with round_robin)" in text
    assert re.search(r"failing backend at end\s+ejected, open\s+ejected, open", text)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_resolve_prints_the_endpoints(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESHLIB_SERVICE_PAYMENTS", "static://127.0.0.1:1,127.0.0.1:2")
    assert main(["resolve", "payments"]) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1:1" in out
    assert "127.0.0.1:2" in out
    assert "p2c_ewma" in out


def test_resolve_unknown_service_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHLIB_SERVICE_PAYMENTS", "static://127.0.0.1:1")
    assert main(["resolve", "user-api"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "MESHLIB_SERVICE_USER_API" in captured.err
    assert "payments" in captured.err  # what is configured, to spot a typo
    assert "Traceback" not in captured.err


def test_resolve_bad_config_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MESHLIB_SERVICE_PAYMENTS", "static://127.0.0.1:1")
    monkeypatch.setenv("MESHLIB_LB", "fastest")
    assert main(["resolve", "payments"]) == 2
    err = capsys.readouterr().err
    assert "MESHLIB_LB" in err
    assert "fastest" in err
    assert "Traceback" not in err


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"meshlib {meshlib.__version__}"
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err
    assert main(["demo", "--requests", "0"]) == 2
    assert "--requests" in capsys.readouterr().err


AUTHZ_POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/checkout"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/charge"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
"""


def test_authz_lists_the_policies_and_decides_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    path = tmp_path / "authz.yaml"
    path.write_text(AUTHZ_POLICIES)
    assert main(["authz", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 policies (1 DENY, 1 ALLOW, 0 AUDIT)" in out and "shop/deny-admin" in out

    checkout = "spiffe://cluster.local/ns/shop/sa/checkout"
    assert main(["authz", "--file", str(path), "POST", "/charge?x=1", "--peer", checkout]) == 0
    assert "ALLOW" in capsys.readouterr().out.splitlines()[-2]

    monkeypatch.setenv("MESHLIB_AUTHZ_FILE", str(path))  # the default file
    assert main(["authz", "POST", "/charge", "--json"]) == 1  # no identity: the ALLOW policy does not match
    decision = json.loads(capsys.readouterr().out)["decision"]
    assert decision == {
        "allowed": False,
        "status": 403,
        "policy": None,
        "action": None,
        "rule": None,
        "reason": "denied: no ALLOW policy matched",
        "audit_policy": None,
    }
    assert main(["authz", "GET", "/public/../admin/users", "--peer", checkout, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["decision"]["policy"] == "shop/deny-admin"  # normalized path


def test_authz_bad_file_and_usage_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(AUTHZ_POLICIES.replace("action: DENY", "action: REJECT"))
    assert main(["authz", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "document 2" in err and "spec.action='REJECT'" in err
    assert main(["authz"]) == 2
    assert "MESHLIB_AUTHZ_FILE" in capsys.readouterr().err
    path.write_text(AUTHZ_POLICIES)
    assert main(["authz", "--file", str(path), "GET"]) == 2
    assert "METHOD and PATH" in capsys.readouterr().err
    assert main(["authz", "--file", str(path), "GET", "/x", "--peer", "checkout"]) == 2
    assert "SPIFFE ID" in capsys.readouterr().err
    assert main(["authz", "--file", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read it" in capsys.readouterr().err
