"""S9 gray failure (``s9gray``) -- one endpoint of 10 fails 30 % of requests with fast 500s (issue 15).

Ten meshlib.testing backends (own process) answer in ~5 ms (lognormal). When the load starts, backend 0 turns
gray: 30 % of its requests are answered at once with a 500 (spread evenly, never two in a row, so neither its
breaker nor consecutive-failure ejection ever fires: only a rate-based detector can find it). An ``AsyncClient``
sends open-loop idempotent GETs with round robin (every endpoint gets its share, as Envoy's default balancer
gives it; p2c_ewma steers around fast errors by itself), ``MESHLIB_RETRY_ON=500,502,503,504`` (a fast 500 is
retried on another endpoint) and ``MESHLIB_TIMEOUT=1s``.

Variants, interleaved in one run: ``ejection`` -- success-rate ejection with Envoy's defaults except the interval,
shortened to 1 s so a run is short, and the request volume scaled with it (10 attempts per endpoint per 1 s
interval: the default 100 per 10 s); ``off`` -- the same with success-rate ejection off
(``MESHLIB_OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT=0``), for the ratios.

Measured per run: when backend 0 was ejected (seconds since it turned gray, and in intervals), caller success
(with retries), attempts per request, and the share of attempts that reached the gray endpoint.

Targets (issue 15): ejected within 2 intervals; caller success with retries >= 99.9 %.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import meshlib
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median_row
from benchmarks.load import Outcome, open_async
from benchmarks.report import bar_chart
from benchmarks.s3_slow_backend import outcome_of, outcome_of_error
from benchmarks.servers import BackendProcess

VARIANTS = ("off", "ejection")
RATE = 300.0
INTERVAL = 1.0
HEALTHY = {"lognormal": [0.005, 0.3], "body_size": 64}
GRAY = {**HEALTHY, "fail_fraction": 0.3, "fail_status": 500}
MESH_ENV = {
    "MESHLIB_TIMEOUT": "1s",
    "MESHLIB_LB": "round_robin",
    "MESHLIB_RETRY_ON": "500,502,503,504",
    "MESHLIB_OUTLIER_INTERVAL": f"{INTERVAL:g}s",
    "MESHLIB_OUTLIER_SUCCESS_RATE_REQUEST_VOLUME": "10",
}
VARIANT_ENV = {"off": {"MESHLIB_OUTLIER_SUCCESS_RATE_ENFORCEMENT_PERCENT": "0"}, "ejection": {}}


async def _run(backends: BackendProcess, variant: str, rate: float, duration: float) -> dict[str, Any]:
    target = "static://" + ",".join(backends.addresses)
    gray = ("127.0.0.1", backends.ports[0])
    env = {**MESH_ENV, **VARIANT_ENV[variant]}
    async with meshlib.AsyncClient(services={"bench": target}, environ=env) as client:
        await client.get("http://bench/")  # discovery and first connection before the clock starts
        service = client.mesh.services["BENCH"]
        assert service.active is not None
        every = list(service.active.stats.values())
        stats = service.active.stats[gray]
        base_all, base_gray = sum(s.requests for s in every), stats.requests
        backends.set(0, **GRAY)
        started = time.perf_counter()
        ejected: dict[str, float] = {}
        errors: Counter[str] = Counter()

        def note_ejection() -> None:
            if not ejected and gray in service.detector.ejected():
                ejected["after_s"] = time.perf_counter() - started
                ejected["attempts"] = stats.requests - base_gray

        async def send() -> Outcome:
            response = await client.get("http://bench/")
            note_ejection()
            if response.status_code >= 400:
                errors[str(response.status_code)] += 1
            return outcome_of(response)

        def on_error(exc: BaseException) -> Outcome:
            note_ejection()
            errors[type(exc).__name__] += 1
            return outcome_of_error(exc)

        result = await open_async(send, on_error, rate=rate, duration=duration)
        attempts = sum(s.requests for s in every) - base_all
        to_gray = stats.requests - base_gray
        reasons = service.detector.reasons()
    n = len(result.latency)
    after = ejected.get("after_s", float("nan"))
    return {
        "requests": n,
        "good": sum(result.ok),
        "success_pct": 100.0 * sum(result.ok) / n,
        "attempts": attempts / n,
        "gray_share_pct": 100.0 * to_gray / attempts,
        "ejected_after_s": after,
        "ejected_after_intervals": after / INTERVAL,
        "gray_attempts_to_ejection": ejected.get("attempts", float("nan")),
        "reason": reasons.get(gray, "-"),
        "errors": dict(errors),
        "p50_ms": result.hist().percentiles((50,))[0] * 1e3,
        "p99_ms": result.hist().percentiles((99,))[0] * 1e3,
        "p999_ms": result.hist().percentiles((99.9,))[0] * 1e3,
    }


def measure(rate: float, duration: float, repeats: int, server_prefix: tuple[str, ...] = ()) -> ScenarioResult:
    """Both variants, interleaved, ``repeats`` runs each of ``duration`` s at ``rate`` requests/s."""
    rows: list[dict[str, Any]] = []
    with BackendProcess(10, HEALTHY, server_prefix) as backends:

        def one(variant: str, repeat: int) -> dict[str, Any]:
            backends.set(None, **HEALTHY)
            try:
                return asyncio.run(_run(backends, variant, rate, duration))
            finally:
                backends.set(None, **HEALTHY)

        runs = interleave(VARIANTS, repeats, one)
    for variant in VARIANTS:
        row = {"variant": variant, **median_row(runs[variant])}
        total = sum(r["requests"] for r in runs[variant])
        good = sum(r["good"] for r in runs[variant])
        row["success_pct"] = 100.0 * good / total
        row["failed"] = total - good
        row["reason"] = ", ".join(sorted({r["reason"] for r in runs[variant]}))
        errors: Counter[str] = Counter()
        for r in runs[variant]:
            errors.update(r["errors"])
        row["errors"] = ", ".join(f"{kind} x{n}" for kind, n in errors.most_common(3)) or "-"
        rows.append(row)
    off, on = rows
    worst = max(r["ejected_after_intervals"] for r in runs["ejection"])
    ejected_runs = sum(1 for r in runs["ejection"] if r["ejected_after_s"] == r["ejected_after_s"])
    checks = [
        Check(
            "ejected within",
            "<= 2 intervals",
            worst,
            ejected_runs == len(runs["ejection"]) and worst <= 2.0,
            " intervals",
            f"worst run; interval {INTERVAL:g} s; ejected in {ejected_runs}/{len(runs['ejection'])} runs "
            f"(reason {on['reason']}), median {on['ejected_after_intervals']:.2f}",
        ),
        Check(
            "caller success with retries",
            ">= 99.9%",
            on["success_pct"],
            on["success_pct"] >= 99.9,
            "%",
            f"{on['failed']:.0f} failed; without ejection {off['success_pct']:.3f}%",
        ),
        Check(
            "attempts/request, ejection vs off",
            "< 1",
            on["attempts"] / off["attempts"],
            on["attempts"] < off["attempts"],
            "x",
            f"{on['attempts']:.4f} vs {off['attempts']:.4f}; gray endpoint's share of attempts "
            f"{on['gray_share_pct']:.2f}% vs {off['gray_share_pct']:.2f}%",
        ),
    ]
    return ScenarioResult(
        "s9gray",
        f"gray failure: 1 endpoint of 10 fails 30% with fast 500s, {rate:.0f} rps open loop",
        [
            "variant",
            "success_pct",
            "failed",
            "attempts",
            "gray_share_pct",
            "ejected_after_s",
            "ejected_after_intervals",
            "gray_attempts_to_ejection",
            "reason",
            "errors",
            "p50_ms",
            "p99_ms",
            "p999_ms",
        ],
        rows,
        checks,
        notes=[
            f"{duration:.0f}s runs, {repeats} interleaved repeats; success pooled, other columns medians",
            f"MESHLIB_OUTLIER_INTERVAL={INTERVAL:g}s (default 10 s, shortened so a run is short) and "
            "MESHLIB_OUTLIER_SUCCESS_RATE_REQUEST_VOLUME=10 (the default 100 per 10 s, scaled with the interval); "
            "other outlier settings default (minimum hosts 5, stdev factor 1900, enforcement 100)",
            "MESHLIB_LB=round_robin, MESHLIB_RETRY_ON=500,502,503,504, MESHLIB_TIMEOUT=1s, 1 retry (default); "
            "the gray backend fails every 3rd-4th request (never two in a row): no breaker or consecutive ejection",
            "ejected_after: from the moment backend 0 turned gray to the first request that saw it ejected; the "
            "sweep runs every interval from the client's first request, so the phase varies by up to 1 interval",
        ],
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks s9gray`` runs it."""
    return measure(RATE, ctx.scale(10.0, 4.0), ctx.repeats, ctx.pinning.server_prefix)


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Attempts that reached the gray endpoint, with and without ejection (percent of all attempts)."""
    path = out / "s9gray_gray_share.png"
    values = {"gray endpoint's share of attempts (%)": [row["gray_share_pct"] for row in result.rows]}
    ok = bar_chart(path, "S9 gray failure: attempts sent to the gray endpoint", list(VARIANTS), values, "%")
    return [path] if ok else []
