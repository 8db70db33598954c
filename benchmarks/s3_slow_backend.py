"""S3 -- one slow backend out of 11: round_robin vs least_request vs p2c_ewma (Linkerd's 2016 experiment).

Eleven meshlib.testing backends (own process, server CPU) answer after a lognormal delay (median 20 ms,
sigma 0.2: a tight spread). An ``AsyncClient`` sends an open-loop 300 requests/s with a 500 ms timeout
(``MESHLIB_TIMEOUT``; every other setting meshlib's default). During the slow window one backend answers
in 1 s, past the timeout. Each balancer gets a fresh client per run; runs are interleaved and repeated.

Scaling, to fit the 2-minute bound with three balancers x three repeats: Linkerd slowed one backend for
30 s of a 60 s run at 300 rps with a 1 s timeout; here a run is 12 s with the backend slow from 3 s to
9 s (``--quick``: 6 s, slow from 1.5 s to 4.5 s), 3,600 requests per run, 10,800 per balancer.

Targets (issue 6): p2c_ewma >= 99.9% of requests succeed within the timeout, and p99 during the slow
window <= 2x the healthy p99.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

import meshlib
from benchmarks.harness import Check, Context, Histogram, ScenarioResult, interleave, median, median_row
from benchmarks.load import OpenResult, Outcome, open_async
from benchmarks.report import line_chart
from benchmarks.servers import BackendProcess

BALANCERS = ("round_robin", "least_request", "p2c_ewma")
RATE = 300.0
TIMEOUT = 0.5
HEALTHY = {"lognormal": [0.020, 0.2], "body_size": 64}
SLOW = {"delay": 1.0, "body_size": 64}


def outcome_of(response: httpx.Response) -> Outcome:
    """Success, attempts and endpoint of a meshlib response."""
    return Outcome(
        response.status_code < 400,
        int(response.extensions.get("meshlib.attempts", 1)),
        str(response.extensions.get("meshlib.endpoint", "")),
    )


def outcome_of_error(exc: BaseException) -> Outcome:
    """A failed call; its endpoint is the last one tried when meshlib's error says (``DeadlineExceeded``).

    Attempts are not recoverable from every error (a ``CircuitOpenError`` lists all endpoints, not
    attempts), so scenarios that count attempts read meshlib's per-endpoint ``requests`` counters instead.
    """
    tried = getattr(exc, "endpoints", None) or []
    if isinstance(exc, meshlib.DeadlineExceeded) and tried:
        return Outcome(False, len(tried), str(tried[-1]))
    return Outcome(False, 1, type(exc).__name__)


async def _one_run(
    lb: str, backends: BackendProcess, duration: float, window: tuple[float, float]
) -> tuple[OpenResult, str]:
    backends.set(None, **HEALTHY)
    target = "static://" + ",".join(backends.addresses)
    slow_address = backends.addresses[0]
    state = {"slow": False, "done": False}

    def at(t: float) -> None:
        if not state["slow"] and t >= window[0]:
            state["slow"] = True
            backends.set(0, **SLOW)
        elif state["slow"] and not state["done"] and t >= window[1]:
            state["done"] = True
            backends.set(0, **HEALTHY)

    async with meshlib.AsyncClient(services={"bench": target}, lb=lb, environ={"MESHLIB_TIMEOUT": "500ms"}) as client:

        async def send() -> Outcome:
            response = await client.get("http://bench/")
            return outcome_of(response)

        result = await open_async(send, outcome_of_error, rate=RATE, duration=duration, at=at)
    return result, slow_address


def _metrics(result: OpenResult, slow: str, duration: float, window: tuple[float, float]) -> dict[str, Any]:
    healthy = result.select(0.5, window[0])
    slow_idx = result.select(*window)
    after_1s = result.select(window[0] + 1.0, window[1])
    n = len(result.latency)
    good = sum(1 for i in range(n) if result.ok[i] and result.latency[i] <= TIMEOUT)
    good_slow = sum(1 for i in slow_idx if result.ok[i] and result.latency[i] <= TIMEOUT)
    healthy_p99, healthy_p999 = result.hist(healthy).percentiles((99, 99.9))
    slow_p50, slow_p99, slow_p999 = result.hist(slow_idx).percentiles((50, 99, 99.9))
    to_slow = sum(1 for i in slow_idx if result.endpoints[i] == slow)
    to_slow_late = sum(1 for i in after_1s if result.endpoints[i] == slow)
    return {
        "requests": n,
        "good": good,
        "good_slow": good_slow,
        "slow_requests": len(slow_idx),
        "success_pct": 100.0 * good / n,
        "slow_window_success_pct": 100.0 * good_slow / max(1, len(slow_idx)),
        "healthy_p99_ms": healthy_p99 * 1e3,
        "healthy_p999_ms": healthy_p999 * 1e3,
        "slow_p50_ms": slow_p50 * 1e3,
        "slow_p99_ms": slow_p99 * 1e3,
        "slow_p999_ms": slow_p999 * 1e3,
        "p99_ratio": slow_p99 / healthy_p99,
        "to_slow_pct": 100.0 * to_slow / max(1, len(slow_idx)),
        "to_slow_after_1s": to_slow_late,
        "attempts": result.mean_attempts(),
        "client_cpu_us": result.cpu.client / n * 1e6,
    }


def _timeline(result: OpenResult, step: float = 0.5) -> tuple[list[float], list[float]]:
    """p99 latency (ms) per ``step`` seconds of schedule time."""
    buckets: dict[int, Histogram] = {}
    for t, lat in zip(result.intended, result.latency, strict=True):
        buckets.setdefault(int(t / step), Histogram()).record(lat)
    keys = sorted(buckets)
    return [k * step + step / 2 for k in keys], [buckets[k].percentiles((99,))[0] * 1e3 for k in keys]


def run(ctx: Context) -> ScenarioResult:
    """Every balancer through the same slow window, interleaved and repeated."""
    duration = ctx.scale(12.0, 6.0)
    window = (duration / 4, duration * 3 / 4)
    timelines: dict[str, tuple[list[float], list[float]]] = {}
    with BackendProcess(11, HEALTHY, ctx.pinning.server_prefix) as backends:

        def one(lb: str, repeat: int) -> dict[str, Any]:
            result, slow = asyncio.run(_one_run(lb, backends, duration, window))
            timelines[lb] = _timeline(result)
            return _metrics(result, slow, duration, window)

        runs = interleave(BALANCERS, ctx.repeats, one)
    rows = []
    checks = []
    for lb in BALANCERS:
        row = {"balancer": lb, **median_row(runs[lb])}
        total = sum(r["requests"] for r in runs[lb])
        row["success_pct"] = 100.0 * sum(r["good"] for r in runs[lb]) / total
        slow_total = sum(r["slow_requests"] for r in runs[lb])
        row["slow_window_success_pct"] = 100.0 * sum(r["good_slow"] for r in runs[lb]) / max(1, slow_total)
        row["failed"] = total - sum(r["good"] for r in runs[lb])
        rows.append(row)
    p2c = rows[-1]
    checks.append(
        Check(
            "p2c_ewma success within 500 ms",
            ">= 99.9%",
            p2c["success_pct"],
            p2c["success_pct"] >= 99.9,
            "%",
            f"{p2c['failed']:.0f} of {sum(r['requests'] for r in runs['p2c_ewma'])} failed",
        )
    )
    ratio_p99 = median(r["p99_ratio"] for r in runs["p2c_ewma"])
    checks.append(
        Check(
            "p2c_ewma slow-window p99 / healthy p99",
            "<= 2x",
            ratio_p99,
            ratio_p99 <= 2.0,
            "x",
            f"{p2c['slow_p99_ms']:.1f} ms vs {p2c['healthy_p99_ms']:.1f} ms",
        )
    )
    return ScenarioResult(
        "s3",
        "one slow backend (1 s) of 11, 300 rps open loop, 500 ms timeout",
        [
            "balancer",
            "success_pct",
            "slow_window_success_pct",
            "failed",
            "healthy_p99_ms",
            "slow_p50_ms",
            "slow_p99_ms",
            "slow_p999_ms",
            "p99_ratio",
            "to_slow_pct",
            "to_slow_after_1s",
            "attempts",
            "client_cpu_us",
        ],
        rows,
        checks,
        notes=[
            f"run {duration:.0f}s, backend 0 slow from {window[0]:.1f}s to {window[1]:.1f}s; "
            f"{ctx.repeats} interleaved repeats per balancer; success pooled over repeats, latencies medians",
            "scaled down from Linkerd's 60 s run / 30 s slow window to stay under 2 minutes",
            "to_slow_pct: share of slow-window requests answered (or failed) by the slow backend",
        ],
        series={"timeline_p99_ms": timelines, "window": list(window)},
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """p99 latency over time per balancer (last repeat), slow window shaded."""
    window = result.series["window"]
    path = out / "s3_p99_timeline.png"
    ok = line_chart(
        path,
        "S3: p99 latency per 0.5 s (one backend slow in the shaded window)",
        result.series["timeline_p99_ms"],
        "seconds",
        "p99 latency (ms)",
        log=True,
        spans=[(window[0], window[1], "backend 0 answers in 1 s")],
    )
    return [path] if ok else []
