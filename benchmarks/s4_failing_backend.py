"""S4 -- one failing backend of 10: retries within a budget, breaker and outlier ejection at work.

Ten meshlib.testing backends (own process) answer in ~5 ms (lognormal). From the first request on,
backend 0 fails in one of three ways: fast 503s, refused connections (the port stays bound but refuses),
or hangs (accepts, never answers within the deadline). An ``AsyncClient`` sends open-loop 300 requests/s of
idempotent GETs with ``MESHLIB_TIMEOUT=1s`` and ``MESHLIB_PER_TRY_TIMEOUT=250ms`` (so a hung attempt leaves
time to retry elsewhere); everything else is meshlib's default: 1 retry, retry budget 20% + 10/s,
breaker and outlier ejection after 5 consecutive failures. The comparison is raw ``httpx.AsyncClient``
rotating over the ten URLs itself (1 s timeout, no retries): what the application gets without a mesh.

Measured per run (fresh client each time): effective success, attempts per request, and how many
attempts the failing backend received before meshlib excluded it (breaker open or ejected).

Targets (issue 6): success >= 99.99% for 503 and refused, >= 99.9% for hangs; attempts per request
<= 1.12; ejection within 5 failures.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import httpx

import meshlib
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median, median_row
from benchmarks.load import Outcome, open_async
from benchmarks.report import bar_chart
from benchmarks.s3_slow_backend import outcome_of, outcome_of_error
from benchmarks.servers import BackendProcess

MODES = ("503", "refused", "hang")
VARIANTS = ("httpx", "meshlib")
RATE = 300.0
HEALTHY = {"lognormal": [0.005, 0.3], "body_size": 64}
MESH_ENV = {"MESHLIB_TIMEOUT": "1s", "MESHLIB_PER_TRY_TIMEOUT": "250ms"}


def _fail(backends: BackendProcess, mode: str) -> None:
    if mode == "503":
        backends.set(0, status=503, body_size=16)
    elif mode == "refused":
        backends.refuse(0)
    else:
        backends.set(0, delay=30.0, body_size=16)


def _heal(backends: BackendProcess) -> None:
    backends.accept(0)
    backends.set(None, **HEALTHY)


async def _meshlib_run(backends: BackendProcess, mode: str, duration: float) -> dict[str, Any]:
    target = "static://" + ",".join(backends.addresses)
    failing = ("127.0.0.1", backends.ports[0])
    async with meshlib.AsyncClient(services={"bench": target}, environ=MESH_ENV) as client:
        await client.get("http://bench/")  # discovery and first connection before the clock starts
        _fail(backends, mode)
        service = client.mesh.services["BENCH"]
        assert service.active is not None
        every = list(service.active.stats.values())
        stats = service.active.stats[failing]
        base_all = sum(s.requests for s in every)
        base_failing = stats.requests
        excluded: dict[str, float] = {}

        def note_exclusion() -> None:
            if not excluded and failing in service.unhealthy():
                excluded["attempts"] = stats.requests - base_failing

        async def send() -> Outcome:
            response = await client.get("http://bench/")
            note_exclusion()
            return outcome_of(response)

        def on_error(exc: BaseException) -> Outcome:
            note_exclusion()
            return outcome_of_error(exc)

        result = await open_async(send, on_error, rate=RATE, duration=duration)
        attempts = sum(s.requests for s in every) - base_all
        to_failing = stats.requests - base_failing
    n = len(result.latency)
    return {
        "requests": n,
        "good": sum(result.ok),
        "success_pct": 100.0 * sum(result.ok) / n,
        "attempts": attempts / n,
        "to_failing": to_failing,
        "excluded": bool(excluded),
        # Failures the backend caused before meshlib stopped sending to it: until its exclusion (breaker
        # open or ejected), or all it got when the balancer avoided it without ever excluding it.
        "failures_to_exclusion": excluded.get("attempts", float(to_failing)),
        "p50_ms": result.hist().percentiles((50,))[0] * 1e3,
        "p99_ms": result.hist().percentiles((99,))[0] * 1e3,
        "p999_ms": result.hist().percentiles((99.9,))[0] * 1e3,
    }


async def _httpx_run(backends: BackendProcess, mode: str, duration: float) -> dict[str, Any]:
    urls = itertools.cycle(f"http://{a}/" for a in backends.addresses)
    async with httpx.AsyncClient(timeout=1.0) as client:
        _fail(backends, mode)

        async def send() -> Outcome:
            response = await client.get(next(urls))
            return Outcome(response.status_code < 400)

        result = await open_async(send, lambda exc: Outcome(False), rate=RATE, duration=duration)
    n = len(result.latency)
    return {
        "requests": n,
        "good": sum(result.ok),
        "success_pct": 100.0 * sum(result.ok) / n,
        "attempts": 1.0,
        "to_failing": float(n // len(backends.ports)),
        "excluded": False,
        "failures_to_exclusion": float("nan"),
        "p50_ms": result.hist().percentiles((50,))[0] * 1e3,
        "p99_ms": result.hist().percentiles((99,))[0] * 1e3,
        "p999_ms": result.hist().percentiles((99.9,))[0] * 1e3,
    }


def run(ctx: Context) -> ScenarioResult:
    """Each failure mode, meshlib and raw httpx interleaved, fresh client per run."""
    duration = ctx.scale(5.0, 2.0)
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    with BackendProcess(10, HEALTHY, ctx.pinning.server_prefix) as backends:
        for mode in MODES:

            def one(variant: str, repeat: int, mode: str = mode) -> dict[str, Any]:
                _heal(backends)
                runner = _meshlib_run if variant == "meshlib" else _httpx_run
                try:
                    return asyncio.run(runner(backends, mode, duration))
                finally:
                    _heal(backends)

            runs = interleave(VARIANTS, ctx.repeats, one)
            for variant in VARIANTS:
                row = {"mode": mode, "variant": variant, **median_row(runs[variant])}
                total = sum(r["requests"] for r in runs[variant])
                good = sum(r["good"] for r in runs[variant])
                row["success_pct"] = 100.0 * good / total
                row["failed"] = total - good
                rows.append(row)
            mesh = rows[-1]
            need = 99.9 if mode == "hang" else 99.99
            checks.append(
                Check(
                    f"success, {mode}",
                    f">= {need}%",
                    mesh["success_pct"],
                    mesh["success_pct"] >= need,
                    "%",
                    f"{mesh['failed']:.0f} failed; raw httpx {rows[-2]['success_pct']:.2f}%",
                )
            )
            attempts = max(r["attempts"] for r in runs["meshlib"])
            checks.append(Check(f"attempts/request, {mode}", "<= 1.12", attempts, attempts <= 1.12, "", "worst run"))
            worst = max(r["failures_to_exclusion"] for r in runs["meshlib"])
            found = median(r["failures_to_exclusion"] for r in runs["meshlib"])
            excluded = sum(1 for r in runs["meshlib"] if r["excluded"])
            checks.append(
                Check(
                    f"failures before exclusion, {mode}",
                    "<= 5",
                    worst,
                    worst <= 5,
                    "",
                    f"median {found:.0f}, worst run shown; excluded in {excluded}/{len(runs['meshlib'])} runs",
                )
            )
    return ScenarioResult(
        "s4",
        "one failing backend of 10 (503 / refused / hang), 300 rps open loop",
        [
            "mode",
            "variant",
            "success_pct",
            "failed",
            "attempts",
            "failures_to_exclusion",
            "to_failing",
            "p50_ms",
            "p99_ms",
            "p999_ms",
        ],
        rows,
        checks,
        notes=[
            f"{duration:.0f}s runs, {ctx.repeats} interleaved repeats; success pooled, other columns medians",
            "meshlib: MESHLIB_TIMEOUT=1s, MESHLIB_PER_TRY_TIMEOUT=250ms, other settings default; "
            "httpx: client-side rotation over the 10 URLs, 1 s timeout, no retries",
            "failures_to_exclusion: attempts the failing backend got before its breaker opened or it was "
            "ejected (all it got, when the balancer steered around it without excluding it); "
            "attempts: meshlib's per-endpoint attempt counters / requests",
        ],
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Failed requests per mode, raw httpx vs meshlib (log scale)."""
    values = {
        v: [next(r["failed"] for r in result.rows if r["mode"] == m and r["variant"] == v) + 0.5 for m in MODES]
        for v in VARIANTS
    }
    path = out / "s4_failed_requests.png"
    ok = bar_chart(
        path, "S4: failed requests per mode (+0.5 for the log scale)", list(MODES), values, "failed", log=True
    )
    return [path] if ok else []
