"""The ``meshlib`` command: ``demo`` end to end on loopback backends, ``resolve`` against env configuration."""

from __future__ import annotations

import io
import re

import pytest

import meshlib
from meshlib.cli import main
from meshlib.demo import DemoOptions, percentile, run_demo


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


def test_demo_runs_both_balancers_and_p2c_avoids_the_slow_backend(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--requests", "300", "--no-live"]) == 0
    out = capsys.readouterr().out
    assert "[p2c_ewma]" in out
    assert "[round_robin]" in out
    assert "Comparison" in out
    assert "\x1b[" not in out  # --no-live (and not a TTY): plain tables only
    assert comparison_row(out, "requests") == (300, 300)
    p2c_slow, rr_slow = comparison_row(out, "share to slow backend")
    assert rr_slow == pytest.approx(20.0)  # round robin: exactly 1 request in 5 to each of 5 endpoints
    # p2c_ewma drains the slow endpoint after its first slow answers (typically 1-3%; 10% leaves a wide margin).
    assert p2c_slow < rr_slow / 2
    # The failing endpoint answers every request with 503 and the mesh does not retry yet: each is an error.
    p2c_failing, rr_failing = comparison_row(out, "share to failing backend")
    p2c_errors, rr_errors = comparison_row(out, "error rate")
    assert (p2c_errors, rr_errors) == (p2c_failing, rr_failing)
    for label in ("p50 latency", "p99 latency", "total time"):
        comparison_row(out, label)


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
