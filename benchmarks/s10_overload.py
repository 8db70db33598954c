"""S10 overload -- offered twice what the backends can serve: the fixed in-flight limit against the adaptive one.

``python -m benchmarks s10overload`` (about 6 minutes; ``--quick`` about 2). Issue 15.

Four capacity-limited backends (:mod:`benchmarks.capacity`, their own process): each serves at most 10
requests at once for 500 ms each and queues the rest in arrival order, so together they serve
``4 * 10 / 0.5 = 80`` requests/s. One ``meshlib.httpx.AsyncClient`` (``MESHLIB_TIMEOUT=2s``, default retries,
1,000 connections per endpoint so the pool limits nothing) calls them open loop (requests scheduled at a
constant rate, latency measured from the intended start: no coordinated omission):

1. **unloaded**: half the capacity (40/s) for 15 s; its last 10 s give the unloaded p99 (same client, same
   run). It is also the normal traffic an adaptive limit grows on before an overload (from its initial 20
   it climbs about 1 per window of 2 x RTT, here 1 s, while at least half of it is used);
2. **overload**: twice the capacity (160/s) for 20 s, measured over its last 14 s (after 6 s to settle).

Variants, each with a fresh client, interleaved over repeats (the order rotating): ``fixed`` (the defaults:
``MESHLIB_MAX_INFLIGHT`` 1024, breakers and ejection on), ``fixed-nobreaker`` (the same with breakers and
ejection off: what the queue alone does) and ``adaptive`` (``MESHLIB_ADAPTIVE_CONCURRENCY=1``, default
settings). Between runs the backends drain their queues. The client's rates are kept low because the
machine is 2 shared cores: at a few hundred requests/s the client's own CPU, not the backends, would limit.

Reported per variant: goodput (answers within the timeout, per second) against the capacity, what the
backends served (abandoned requests included), the p50/p99 of the accepted (answered) requests and their
ratio to the unloaded p99, the shares refused (``OverloadedError``), timed out, refused by open breakers
(``CircuitOpenError``) and otherwise failed, and the limit at the end.

Targets (issue 15): with adaptive concurrency, goodput at least 90% of capacity and the p99 of accepted
requests at most 2x the unloaded p99. Without it: reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import meshlib
import meshlib.httpx
from benchmarks.capacity import CapacityProcess
from benchmarks.harness import Check, Context, Histogram, ScenarioResult, interleave, median, median_row, ratio
from benchmarks.load import OpenResult, Outcome, open_async
from benchmarks.report import line_chart

VARIANTS = ("fixed", "fixed-nobreaker", "adaptive")
OK = Outcome(True, endpoint="ok")
TIMEOUT = 2.0


@dataclasses.dataclass(frozen=True)
class Params:
    """The scenario's knobs (the smoke test shrinks them)."""

    backends: int = 4
    slots: int = 10
    service_time: float = 0.5
    unloaded: float = 15.0
    overload: float = 20.0
    settle: float = 6.0
    repeats: int = 3
    load: float = 2.0
    variants: tuple[str, ...] = VARIANTS

    @property
    def capacity(self) -> float:
        """Requests per second the backends serve together."""
        return self.backends * self.slots / self.service_time


def _outcome(exc: BaseException) -> Outcome:
    if isinstance(exc, meshlib.OverloadedError):
        return Outcome(False, 0, "overloaded")
    if isinstance(exc, meshlib.CircuitOpenError):
        return Outcome(False, 0, "circuit-open")
    if isinstance(exc, meshlib.httpx.httpx.TimeoutException):  # DeadlineExceeded is one too
        return Outcome(False, 1, "timeout")
    return Outcome(False, 1, "error")


async def _one_run(variant: str, params: Params, backends: CapacityProcess) -> dict[str, Any]:
    env = {"MESHLIB_TIMEOUT": f"{TIMEOUT}s"}
    if variant == "adaptive":
        env["MESHLIB_ADAPTIVE_CONCURRENCY"] = "1"
    elif variant == "fixed-nobreaker":  # what the queue alone does: no breaker trips, no ejection
        env["MESHLIB_BREAKER_FAILURES"] = env["MESHLIB_OUTLIER_FAILURES"] = "1000000000"
    limits = meshlib.httpx.httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    client = meshlib.httpx.AsyncClient(
        services={"svc": "static://" + ",".join(backends.addresses)}, environ=env, limits=limits
    )
    service = client.mesh.services["SVC"]
    limit_series: tuple[list[float], list[float]] = ([], [])
    last = [-1.0]

    def at(t: float) -> None:  # called per scheduled request: sample the limit 4 times a second
        if t - last[0] >= 0.25:
            last[0] = t
            limit_series[0].append(round(t, 2))
            limit_series[1].append(float(service.limit.max_inflight))

    async def send() -> Outcome:
        response = await client.get("http://svc/")
        return OK if response.status_code == 200 else Outcome(False, 1, f"status-{response.status_code}")

    async with client:
        unloaded = await open_async(send, _outcome, rate=params.capacity / 2, duration=params.unloaded)
        backends.reset()
        started = time.perf_counter()
        loaded = await open_async(send, _outcome, rate=params.capacity * params.load, duration=params.overload, at=at)
        served = sum(backends.stats()["served"])
        served_rps = served / (time.perf_counter() - started)
        status = client.mesh_status().services[0]
    await asyncio.to_thread(_drain, backends)
    return _metrics(
        variant,
        params,
        unloaded=unloaded,
        loaded=loaded,
        served_rps=served_rps,
        status=status,
        limit_series=limit_series,
    )


def _drain(backends: CapacityProcess) -> None:
    """Wait until the backends have served every queued request (abandoned ones included)."""
    deadline = time.monotonic() + 120.0
    while sum(backends.stats()["pending"]) and time.monotonic() < deadline:
        time.sleep(0.1)


def _metrics(
    variant: str,
    params: Params,
    *,
    unloaded: OpenResult,
    loaded: OpenResult,
    served_rps: float,
    status: Any,
    limit_series: tuple[list[float], list[float]],
) -> dict[str, Any]:
    base = unloaded.select(unloaded.intended[-1] / 3)  # its last two thirds: connections open, the limit grown
    unloaded_p99 = Histogram(unloaded.latency[i] for i in base if unloaded.endpoints[i] == "ok").percentiles([99])[0]
    window = loaded.select(params.settle)
    seconds = params.overload - params.settle
    tags = [loaded.endpoints[i] for i in window]
    accepted = Histogram(loaded.latency[i] for i in window if loaded.endpoints[i] == "ok")
    good = sum(1 for i in window if loaded.endpoints[i] == "ok" and loaded.latency[i] <= TIMEOUT)
    goodput = good / seconds
    p99 = accepted.percentiles([99])[0]
    n = len(window)
    return {
        "variant": variant,
        "goodput_rps": goodput,
        "goodput_pct": 100.0 * goodput / params.capacity,
        "served_rps": served_rps,
        "unloaded_p99_ms": unloaded_p99 * 1000.0,
        "p50_ms": accepted.percentiles([50])[0] * 1000.0,
        "p99_ms": p99 * 1000.0,
        "p99_ratio": ratio(p99, unloaded_p99),
        "refused_pct": 100.0 * tags.count("overloaded") / n,
        "timeout_pct": 100.0 * tags.count("timeout") / n,
        "circuit_open_pct": 100.0 * tags.count("circuit-open") / n,
        "error_pct": 100.0 * (n - sum(tags.count(t) for t in ("ok", "overloaded", "timeout", "circuit-open"))) / n,
        "limit": status.adaptive.limit if status.adaptive is not None else status.budget.max_inflight,
        "limit_series": limit_series,
        "p99_series": _p99_per_second(loaded),
    }


def _p99_per_second(result: OpenResult) -> tuple[list[float], list[float]]:
    """p99 (ms) of the answered requests scheduled in each second of the run."""
    xs: list[float] = []
    ys: list[float] = []
    second = 0
    while True:
        indices = result.select(second, second + 1)
        if not indices:
            break
        hist = Histogram(result.latency[i] for i in indices if result.endpoints[i] == "ok")
        xs.append(second + 0.5)
        ys.append(hist.percentiles([99])[0] * 1000.0 if len(hist) else float("nan"))
        second += 1
    return xs, ys


def measure(params: Params, server_prefix: tuple[str, ...] = ()) -> ScenarioResult:
    """Run every variant ``params.repeats`` times (interleaved) and compare them."""
    series: dict[str, Any] = {}
    with CapacityProcess(params.backends, params.slots, params.service_time, server_prefix) as backends:

        def one(variant: str, repeat: int) -> dict[str, Any]:
            row = asyncio.run(_one_run(variant, params, backends))
            series[f"{variant}_p99_ms"] = row.pop("p99_series")
            series[f"{variant}_limit"] = row.pop("limit_series")
            return row

        runs = interleave(params.variants, params.repeats, one)
    rows = [{"variant": v, **median_row(runs[v])} for v in params.variants]
    by_name = {row["variant"]: row for row in rows}
    nan = {"goodput_pct": math.nan, "goodput_rps": math.nan, "p99_ms": math.nan, "p99_ratio": math.nan}
    adaptive = by_name.get("adaptive", {**nan, "unloaded_p99_ms": math.nan})
    fixed, unguarded = by_name.get("fixed", nan), by_name.get("fixed-nobreaker", nan)
    goodput = median(r["goodput_pct"] for r in runs.get("adaptive", ()))
    p99_ratio = median(r["p99_ratio"] for r in runs.get("adaptive", ()))
    checks = [
        Check(
            "adaptive: goodput / capacity",
            ">= 90%",
            goodput,
            goodput >= 90.0,
            "%",
            f"{adaptive['goodput_rps']:.0f} of {params.capacity:.0f} req/s; fixed: {fixed['goodput_pct']:.0f}%, "
            f"without breakers {unguarded['goodput_pct']:.0f}%",
        ),
        Check(
            "adaptive: accepted p99 / unloaded p99",
            "<= 2x",
            p99_ratio,
            p99_ratio <= 2.0,
            "x",
            f"{adaptive['p99_ms']:.0f} ms vs {adaptive['unloaded_p99_ms']:.0f} ms; "
            f"fixed without breakers: {unguarded['p99_ms']:.0f} ms ({unguarded['p99_ratio']:.1f}x)",
        ),
    ]
    return ScenarioResult(
        "s10overload",
        f"{params.load:g}x overload: {params.backends} backends x {params.slots} slots x "
        f"{params.service_time * 1000:.0f} ms = {params.capacity:.0f} req/s, "
        f"offered {params.capacity * params.load:.0f}/s open loop, {TIMEOUT:g} s timeout",
        [
            "variant",
            "goodput_rps",
            "goodput_pct",
            "served_rps",
            "unloaded_p99_ms",
            "p50_ms",
            "p99_ms",
            "p99_ratio",
            "refused_pct",
            "timeout_pct",
            "circuit_open_pct",
            "error_pct",
            "limit",
        ],
        rows,
        checks,
        notes=[
            f"{params.repeats} interleaved repeats per variant, medians; overload measured over its last "
            f"{params.overload - params.settle:g} s of {params.overload:g} s; unloaded p99 at "
            f"{params.capacity / 2:.0f} req/s in the same client, just before",
            "goodput: answers within the timeout per second; served_rps: what the backends served (abandoned "
            "requests included); p50/p99: answered requests only; limit: the adaptive limit at the end "
            "(fixed: MESHLIB_MAX_INFLIGHT)",
        ],
        series=series,
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks s10overload`` runs it."""
    params = Params(
        repeats=ctx.repeats, unloaded=ctx.scale(15.0, 8.0), overload=ctx.scale(20.0, 10.0), settle=ctx.scale(6.0, 4.0)
    )
    return measure(params, tuple(ctx.pinning.server_prefix))


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """p99 of the answered requests per second under overload, and the adaptive limit (last repeat)."""
    paths: list[Path] = []
    series = result.series
    path = out / "s10overload_p99.png"
    lines = {v: tuple(series[f"{v}_p99_ms"]) for v in VARIANTS if f"{v}_p99_ms" in series}
    if line_chart(path, "S10 overload: p99 of answered requests", lines, "s", "ms", log=True):
        paths.append(path)
    path = out / "s10overload_limit.png"
    if "adaptive_limit" in series and line_chart(
        path, "S10 overload: adaptive concurrency limit", {"limit": tuple(series["adaptive_limit"])}, "s", "requests"
    ):
        paths.append(path)
    return paths
