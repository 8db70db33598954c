"""S1 -- overhead of meshlib against raw httpx: the "free mesh" test.

One nginx endpoint answering 1 KiB. meshlib uses its defaults, every policy on but idle: static discovery
of the one endpoint, P2C peak EWMA, retries (1) within a budget, breaker, outlier detection, concurrency
limit, deadline (15 s) stamped as ``grpc-timeout``. Raw httpx talks to the same nginx with its own pool.
Closed loop at concurrency 1 and 16, sync (``Client``, threads) and async (``AsyncClient``, tasks), then
sync open loop at half the raw c=1 peak rate for latency without coordinated omission.

Targets (issue 6): client CPU per request <= 1.05x raw httpx; p50 added <= 10 µs (judged at c=1, where
latency is not queueing).
"""

from __future__ import annotations

import asyncio
import functools
import math
from pathlib import Path
from typing import Any

import httpx

import meshlib
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median, median_row, ratio
from benchmarks.load import OK, Outcome, closed_async, closed_sync, open_sync
from benchmarks.report import bar_chart
from benchmarks.servers import Nginx

VARIANTS = ("httpx", "meshlib")
CONFIGS = (("sync", 1), ("sync", 16), ("async", 1), ("async", 16))


def _sync_sender(variant: str, port: int) -> tuple[httpx.Client, Any]:
    if variant == "httpx":
        client = httpx.Client()
        url = f"http://127.0.0.1:{port}/"
    else:
        client = meshlib.Client(services={"bench": f"static://127.0.0.1:{port}"}, environ={})
        url = "http://bench/"

    def send() -> None:
        if client.get(url).status_code != 200:
            raise RuntimeError("bad status")

    return client, send


def _async_client(variant: str, port: int) -> tuple[httpx.AsyncClient, str]:
    if variant == "httpx":
        return httpx.AsyncClient(), f"http://127.0.0.1:{port}/"
    return meshlib.AsyncClient(services={"bench": f"static://127.0.0.1:{port}"}, environ={}), "http://bench/"


def _closed(mode: str, concurrency: int, variant: str, port: int, duration: float) -> dict[str, Any]:
    if mode == "sync":
        client, send = _sync_sender(variant, port)
        with client:
            result = closed_sync(send, concurrency=concurrency, duration=duration)
    else:

        async def run() -> Any:
            client, url = _async_client(variant, port)
            async with client:

                async def send() -> None:
                    if (await client.get(url)).status_code != 200:
                        raise RuntimeError("bad status")

                return await closed_async(send, concurrency=concurrency, duration=duration)

        result = asyncio.run(run())
    s = result.hist.summary_us()
    return {
        "rps": result.rps,
        "cpu_us": result.cpu_us_per_request(),
        "p50_us": s["p50_us"],
        "p99_us": s["p99_us"],
        "p999_us": s["p999_us"],
        "errors": result.errors,
    }


def _closed_one(variant: str, repeat: int, *, mode: str, c: int, port: int, d: float) -> dict[str, Any]:
    return _closed(mode, c, variant, port, d)


def _open(variant: str, port: int, rate: float, duration: float) -> dict[str, Any]:
    client, send = _sync_sender(variant, port)
    with client:
        for _ in range(50):
            send()

        def one() -> Outcome:
            send()
            return OK

        result = open_sync(one, lambda exc: Outcome(False), rate=rate, duration=duration, workers=8)
    s = result.hist().summary_us()
    return {
        "rps": len(result.latency) / result.elapsed,
        "cpu_us": result.cpu.client / len(result.latency) * 1e6,
        "p50_us": s["p50_us"],
        "p99_us": s["p99_us"],
        "p999_us": s["p999_us"],
        "errors": len(result.ok) - sum(result.ok),
    }


def run(ctx: Context) -> ScenarioResult:
    """Measure every config, interleaved; rows per variant plus the meshlib/httpx ratio row."""
    repeats = max(ctx.repeats, 3 if ctx.quick else 5)
    duration = ctx.scale(1.5, 0.3)
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    series: dict[str, Any] = {}
    with Nginx(1, ctx.pinning.server_prefix) as nginx:
        port = nginx.ports[0]
        configs: list[tuple[str, int, dict[str, list[dict[str, Any]]]]] = []
        for mode, conc in CONFIGS:
            one = functools.partial(_closed_one, mode=mode, c=conc, port=port, d=duration)
            runs = interleave(VARIANTS, repeats, one)
            configs.append((f"{mode} c={conc} closed", conc, runs))
        raw_c1 = median(r["rps"] for r in configs[0][2]["httpx"])
        rate = round(raw_c1 / 2, -1) if not math.isnan(raw_c1) else 500.0
        runs = interleave(VARIANTS, repeats, lambda v, r: _open(v, port, rate, ctx.scale(2.0, 0.5)))
        configs.append((f"sync open {rate:.0f}/s", 1, runs))
    for name, conc, runs in configs:
        rows.extend({"config": name, "variant": v, **median_row(runs[v])} for v in VARIANTS)
        pairs = list(zip(runs["meshlib"], runs["httpx"], strict=True))
        cpu_ratio = median(ratio(m["cpu_us"], h["cpu_us"]) for m, h in pairs)
        added_cpu = median(m["cpu_us"] - h["cpu_us"] for m, h in pairs)
        added_p50 = median(m["p50_us"] - h["p50_us"] for m, h in pairs)
        added_p99 = median(m["p99_us"] - h["p99_us"] for m, h in pairs)
        rps_ratio = median(ratio(m["rps"], h["rps"]) for m, h in pairs)
        rows.append(
            {
                "config": name,
                "variant": "meshlib/httpx",
                "rps": rps_ratio,
                "cpu_us": cpu_ratio,
                "p50_us": added_p50,
                "p99_us": added_p99,
                "p999_us": math.nan,
                "errors": 0,
                "added_cpu_us": added_cpu,
            }
        )
        series[name] = {"cpu_ratio": cpu_ratio, "added_cpu_us": added_cpu, "added_p50_us": added_p50}
        if "closed" in name:
            checks.append(
                Check(
                    f"CPU/request ratio, {name}", "<= 1.05x", cpu_ratio, cpu_ratio <= 1.05, "x", f"{added_cpu:+.0f} µs"
                )
            )
        if conc == 1:
            checks.append(Check(f"p50 added, {name}", "<= 10 µs", added_p50, added_p50 <= 10, " µs"))
    return ScenarioResult(
        "s1",
        "overhead vs raw httpx (1 nginx endpoint, all policies on, idle)",
        ["config", "variant", "rps", "cpu_us", "p50_us", "p99_us", "p999_us", "errors", "added_cpu_us"],
        rows,
        checks,
        notes=[
            "ratio rows: rps and cpu_us are meshlib/httpx ratios; p50_us/p99_us are meshlib minus httpx (µs)",
            f"{repeats} interleaved repeats of {duration}s per variant; medians",
        ],
        series=series,
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """CPU per request of httpx and meshlib for every config."""
    groups = sorted({r["config"] for r in result.rows}, key=[r["config"] for r in result.rows].index)
    values: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for g in groups:
        for v in VARIANTS:
            values[v].append(next(r["cpu_us"] for r in result.rows if r["config"] == g and r["variant"] == v))
    path = out / "s1_cpu_per_request.png"
    ok = bar_chart(path, "S1: client CPU per request (µs), raw httpx vs meshlib", groups, values, "µs CPU / request")
    return [path] if ok else []
