"""S1 -- overhead of meshlib against the raw client of the same HTTP library: the "free mesh" test.

One nginx endpoint answering 1 KiB. meshlib uses its defaults, every policy on but idle: static discovery
of the one endpoint, P2C peak EWMA, retries (1) within a budget, breaker, outlier detection, concurrency
limit, deadline (15 s) stamped as ``grpc-timeout``. The raw clients talk to the same nginx with their own
pools. Four variants, interleaved in the same run (the order rotates each repeat):

* ``httpx``           raw ``httpx.Client`` / ``httpx.AsyncClient``
* ``meshlib.httpx``   ``meshlib.httpx.Client`` / ``AsyncClient`` (subclasses of httpx's)
* ``httpx2``          raw ``httpx2.Client`` / ``httpx2.AsyncClient`` (Pydantic's maintained fork, same API)
* ``meshlib.httpx2``  ``meshlib.httpx2.Client`` / ``AsyncClient`` (subclasses of httpx2's)

The httpx2 variants are skipped, with a note, when httpx2 is not importable. Closed loop at concurrency 1
and 16, sync (``Client``, threads) and async (``AsyncClient``, tasks), then sync open loop at half the raw
httpx c=1 peak rate for latency without coordinated omission.

Targets (issue 6, restated for two libraries): client CPU per request <= 1.05x the raw client of the same
library; p50 added <= 10 µs (judged at c=1, where latency is not queueing). Sync c=1 is the headline.
``meshlib.httpx2`` is also compared with raw ``httpx``: what a user leaving plain httpx for the mesh on
httpx2 actually gets.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

import meshlib.httpx
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median, median_row, ratio
from benchmarks.load import OK, Outcome, closed_async, closed_sync, open_sync
from benchmarks.optional import HTTPX2, HTTPX2_MISSING, MESH_HTTPX2
from benchmarks.report import bar_chart
from benchmarks.servers import Nginx

BASE = ("httpx", "meshlib.httpx")
SECOND = ("httpx2", "meshlib.httpx2")
CONFIGS = (("sync", 1), ("sync", 16), ("async", 1), ("async", 16))
#: (meshlib variant, raw variant, checked against the target): ratio rows, in table order.
PAIRS = (
    ("meshlib.httpx", "httpx", True),
    ("meshlib.httpx2", "httpx2", True),
    ("meshlib.httpx2", "httpx", True),  # the user's real choice: plain httpx -> meshlib on httpx2
    ("httpx2", "httpx", False),  # the libraries themselves, for reading the line above
)
HEADLINE = "sync c=1 closed"


def variants() -> tuple[str, ...]:
    """The variants this run can measure: the httpx2 ones only when httpx2 imports."""
    return BASE + (SECOND if HTTPX2 is not None else ())


def _url(variant: str, port: int) -> str:
    return "http://bench/" if variant.startswith("meshlib") else f"http://127.0.0.1:{port}/"


def _mesh_kwargs(port: int) -> dict[str, Any]:
    return {"services": {"bench": f"static://127.0.0.1:{port}"}, "environ": {}}


def _sync_client(variant: str, port: int) -> Any:
    if variant == "httpx":
        return httpx.Client()
    if variant == "meshlib.httpx":
        return meshlib.httpx.Client(**_mesh_kwargs(port))
    if variant == "httpx2":
        return HTTPX2.Client()
    return MESH_HTTPX2.Client(**_mesh_kwargs(port))


def _async_client(variant: str, port: int) -> Any:
    if variant == "httpx":
        return httpx.AsyncClient()
    if variant == "meshlib.httpx":
        return meshlib.httpx.AsyncClient(**_mesh_kwargs(port))
    if variant == "httpx2":
        return HTTPX2.AsyncClient()
    return MESH_HTTPX2.AsyncClient(**_mesh_kwargs(port))


def _sync_sender(variant: str, port: int) -> tuple[Any, Any]:
    client = _sync_client(variant, port)
    url = _url(variant, port)

    def send() -> None:
        if client.get(url).status_code != 200:
            raise RuntimeError("bad status")

    return client, send


def _closed(mode: str, concurrency: int, variant: str, port: int, duration: float) -> dict[str, Any]:
    if mode == "sync":
        client, send = _sync_sender(variant, port)
        with client:
            result = closed_sync(send, concurrency=concurrency, duration=duration)
    else:

        async def run() -> Any:
            client = _async_client(variant, port)
            url = _url(variant, port)
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


def _ratio_row(config: str, num: str, den: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of the per-repeat ratios and differences of ``num`` against ``den`` (same repeat, seconds apart)."""
    pairs = list(zip(runs[num], runs[den], strict=True))
    return {
        "config": config,
        "variant": f"{num}/{den}",
        "rps": median(ratio(m["rps"], h["rps"]) for m, h in pairs),
        "cpu_us": median(ratio(m["cpu_us"], h["cpu_us"]) for m, h in pairs),
        "p50_us": median(m["p50_us"] - h["p50_us"] for m, h in pairs),
        "p99_us": median(m["p99_us"] - h["p99_us"] for m, h in pairs),
        "p999_us": math.nan,
        "errors": 0,
        "added_cpu_us": median(m["cpu_us"] - h["cpu_us"] for m, h in pairs),
    }


def _checks(config: str, conc: int, row: dict[str, Any]) -> list[Check]:
    label = f"{row['variant']}, {config}"
    cpu, added_cpu, p50 = row["cpu_us"], row["added_cpu_us"], row["p50_us"]
    checks = []
    if "closed" in config:
        checks.append(Check(f"CPU/request {label}", "<= 1.05x", cpu, cpu <= 1.05, "x", f"{added_cpu:+.0f} µs"))
    if conc == 1:
        checks.append(Check(f"p50 added {label}", "<= 10 µs", p50, p50 <= 10, " µs"))
    return checks


def _headline(rows: Sequence[dict[str, Any]]) -> list[str]:
    notes = []
    for num, den, _ in PAIRS:
        row = next((r for r in rows if r["config"] == HEADLINE and r["variant"] == f"{num}/{den}"), None)
        if row is not None:
            notes.append(
                f"headline {HEADLINE}: {num}/{den} CPU/request {row['cpu_us']:.3f}x "
                f"({row['added_cpu_us']:+.0f} µs), p50 {row['p50_us']:+.0f} µs, rps {row['rps']:.3f}x"
            )
    return notes


def run(ctx: Context) -> ScenarioResult:
    """Measure every config, all variants interleaved; rows per variant plus the ratio rows."""
    names = variants()
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
            runs = interleave(names, repeats, one)
            configs.append((f"{mode} c={conc} closed", conc, runs))
        raw_c1 = median(r["rps"] for r in configs[0][2]["httpx"])
        rate = round(raw_c1 / 2, -1) if not math.isnan(raw_c1) else 500.0
        runs = interleave(names, repeats, lambda v, r: _open(v, port, rate, ctx.scale(2.0, 0.5)))
        configs.append((f"sync open {rate:.0f}/s", 1, runs))
    for name, conc, runs in configs:
        medians = [{"config": name, "variant": v, **median_row(runs[v])} for v in names]
        rows.extend(medians)
        series[name] = {r["variant"]: r["cpu_us"] for r in medians}
        for num, den, checked in PAIRS:
            if num not in runs or den not in runs:
                continue
            row = _ratio_row(name, num, den, runs)
            rows.append(row)
            series[name][f"{num}/{den}"] = {
                "cpu_ratio": row["cpu_us"],
                "added_cpu_us": row["added_cpu_us"],
                "added_p50_us": row["p50_us"],
            }
            if checked and (den != "httpx" or num == "meshlib.httpx" or name == HEADLINE):
                checks.extend(_checks(name, conc, row))
    notes = [
        "ratio rows (a/b): rps and cpu_us are a/b ratios; p50_us/p99_us and added_cpu_us are a minus b (µs)",
        "meshlib.httpx2/httpx is the user's real choice (plain httpx -> meshlib on httpx2); checked at the headline",
        f"{repeats} interleaved repeats of {duration}s per variant; medians (ratios: median of per-repeat ratios)",
        *_headline(rows),
    ]
    if HTTPX2_MISSING:
        print(f"  S1: {HTTPX2_MISSING}", flush=True)
        notes.append(HTTPX2_MISSING)
    return ScenarioResult(
        "s1",
        "overhead vs the raw client of the same library (1 nginx endpoint, all policies on, idle)",
        ["config", "variant", "rps", "cpu_us", "p50_us", "p99_us", "p999_us", "errors", "added_cpu_us"],
        rows,
        checks,
        notes=notes,
        series=series,
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """CPU per request of every variant for every config."""
    groups = list(result.series)
    names = [v for v in (*BASE, *SECOND) if all(v in result.series[g] for g in groups)]
    values = {v: [float(result.series[g][v]) for g in groups] for v in names}
    path = out / "s1_cpu_per_request.png"
    ok = bar_chart(path, "S1: client CPU per request (µs), raw clients vs meshlib", groups, values, "µs CPU / request")
    return [path] if ok else []
