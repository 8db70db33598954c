"""S7 -- async throughput: ``AsyncClient`` at 16 and 128 concurrent requests, httpx and httpx2, raw and meshlib.

httpx's default async pool (httpcore + anyio) is known to be slow under concurrency (encode/httpx#3215).
meshlib's fast path on httpx is ``inner_transport="aiohttp"`` (or ``MESHLIB_INNER_TRANSPORT=aiohttp``): each
endpoint's pool is an ``httpx_aiohttp.AiohttpTransport`` with its own ``aiohttp.ClientSession``, built with the
service's SSL context and closed when the endpoint leaves (the ``bench`` extra installs ``httpx-aiohttp``).
httpx2 (Pydantic's maintained fork of httpx) has its own async pool and no aiohttp option; whether the aiohttp
option still beats meshlib on httpx2 decides whether it is worth keeping. Variants against one nginx endpoint
(1 KiB), closed loop, interleaved:

* ``httpx``                  raw ``httpx.AsyncClient()``
* ``meshlib.httpx``          ``meshlib.httpx.AsyncClient()`` with its default per-endpoint ``AsyncHTTPTransport``
* ``httpx+aiohttp``          raw ``httpx.AsyncClient(transport=AiohttpTransport())``
* ``meshlib.httpx+aiohttp``  ``meshlib.httpx.AsyncClient(inner_transport="aiohttp")``: one aiohttp pool per
  endpoint, as in production (not the shared ``transport=`` form, which skips per-service TLS and closing)
* ``httpx2``                 raw ``httpx2.AsyncClient()``
* ``meshlib.httpx2``         ``meshlib.httpx2.AsyncClient()``

The aiohttp variants are skipped without httpx-aiohttp, the httpx2 ones without httpx2 (with a note).

Targets (issue 6): meshlib >= 1.0x the raw client of its library with the default transport, >= 3x raw httpx
with the aiohttp one. Reported: ``meshlib.httpx+aiohttp`` against ``meshlib.httpx2`` (keep the aiohttp option
only if it still wins).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

import meshlib.httpx
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median, median_row, ratio
from benchmarks.load import closed_async
from benchmarks.optional import HTTPX2, HTTPX2_MISSING, MESH_HTTPX2
from benchmarks.report import bar_chart
from benchmarks.servers import Nginx

AiohttpTransport: type[httpx.AsyncBaseTransport] | None
try:
    from httpx_aiohttp import AiohttpTransport
except ImportError:  # pragma: no cover - the bench extra installs it
    AiohttpTransport = None


WARMUP_ROUNDS = 4
BASE = ("httpx", "meshlib.httpx")
FAST = ("httpx+aiohttp", "meshlib.httpx+aiohttp")
SECOND = ("httpx2", "meshlib.httpx2")
#: The raw client each variant is judged against ("vs_raw").
RAW = {
    "httpx": "httpx",
    "meshlib.httpx": "httpx",
    "httpx+aiohttp": "httpx+aiohttp",
    "meshlib.httpx+aiohttp": "httpx+aiohttp",
    "httpx2": "httpx2",
    "meshlib.httpx2": "httpx2",
}


def variants() -> tuple[str, ...]:
    """The variants this run can measure."""
    return BASE + (FAST if AiohttpTransport is not None else ()) + (SECOND if HTTPX2 is not None else ())


def _client(variant: str, port: int) -> tuple[Any, str]:
    mesh = {"services": {"bench": f"static://127.0.0.1:{port}"}, "environ": {}}
    direct = f"http://127.0.0.1:{port}/"
    if variant == "httpx":
        return httpx.AsyncClient(), direct
    if variant == "meshlib.httpx":
        return meshlib.httpx.AsyncClient(**mesh), "http://bench/"
    if variant == "httpx+aiohttp":
        assert AiohttpTransport is not None
        return httpx.AsyncClient(transport=AiohttpTransport()), direct
    if variant == "meshlib.httpx+aiohttp":
        return meshlib.httpx.AsyncClient(inner_transport="aiohttp", **mesh), "http://bench/"
    if variant == "httpx2":
        return HTTPX2.AsyncClient(), direct
    return MESH_HTTPX2.AsyncClient(**mesh), "http://bench/"


def _run(variant: str, port: int, concurrency: int, duration: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        client, url = _client(variant, port)
        async with client:

            async def send() -> None:
                response = await client.get(url)
                if response.status_code != 200:
                    raise RuntimeError("bad status")

            # Warm up in rounds of ``concurrency``: one burst of 4 x 128 requests overloads httpx's 100-connection
            # pool (5 s pool timeouts) and nginx's accept queue (connect timeouts), and those real connect
            # failures can open meshlib's breaker before the measurement starts.
            for _ in range(WARMUP_ROUNDS):
                await asyncio.gather(*(_swallow(send) for _ in range(concurrency)))
            result = await closed_async(send, concurrency=concurrency, duration=duration, warmup=0)
        s = result.hist.summary_us()
        ok = len(result.hist)
        return {
            "rps": ok / result.elapsed if result.elapsed > 0 else 0.0,  # successful requests only
            "cpu_us": result.cpu.client / ok * 1e6 if ok else float("nan"),
            "p50_ms": s["p50_us"] / 1e3,
            "p99_ms": s["p99_us"] / 1e3,
            "p999_ms": s["p999_us"] / 1e3,
            "errors": result.errors,
        }

    return asyncio.run(go())


async def _swallow(send: Callable[[], Awaitable[None]]) -> None:
    with contextlib.suppress(Exception):
        await send()


def _one(variant: str, repeat: int, *, port: int, c: int, d: float) -> dict[str, Any]:
    return _run(variant, port, c, d)


def _vs(runs: dict[str, list[dict[str, Any]]], num: str, den: str) -> float:
    """Median over repeats of ``num``'s rps / ``den``'s rps in the same repeat."""
    return median(ratio(a["rps"], b["rps"]) for a, b in zip(runs[num], runs[den], strict=True))


def run(ctx: Context) -> ScenarioResult:
    """Both concurrencies, every variant interleaved; ratios against the raw clients of the same repeat."""
    names = variants()
    duration = ctx.scale(2.0, 0.5)
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    series: dict[str, Any] = {}
    notes: list[str] = []
    with Nginx(1, ctx.pinning.server_prefix) as nginx:
        port = nginx.ports[0]
        for concurrency in (16, 128):
            runs = interleave(names, ctx.repeats, functools.partial(_one, port=port, c=concurrency, d=duration))
            for variant in names:
                row = {"concurrency": concurrency, "variant": variant, **median_row(runs[variant])}
                row["vs_httpx"] = _vs(runs, variant, "httpx")
                row["vs_raw"] = _vs(runs, variant, RAW[variant])
                rows.append(row)
            series[str(concurrency)] = {r["variant"]: r["rps"] for r in rows if r["concurrency"] == concurrency}
            for mesh in ("meshlib.httpx", "meshlib.httpx2"):
                if mesh in runs:
                    raw = RAW[mesh]
                    value = _vs(runs, mesh, raw)
                    checks.append(Check(f"{mesh} / {raw} rps, c={concurrency}", ">= 1.0x", value, value >= 1.0, "x"))
            if "meshlib.httpx+aiohttp" in runs:
                value = _vs(runs, "meshlib.httpx+aiohttp", "httpx")
                checks.append(
                    Check(f"meshlib.httpx+aiohttp / httpx rps, c={concurrency}", ">= 3x", value, value >= 3.0, "x")
                )
            if "meshlib.httpx+aiohttp" in runs and "meshlib.httpx2" in runs:
                value = _vs(runs, "meshlib.httpx+aiohttp", "meshlib.httpx2")
                series[str(concurrency)]["aiohttp_vs_httpx2"] = value
                checks.append(
                    Check(
                        f"meshlib.httpx+aiohttp / meshlib.httpx2 rps, c={concurrency}",
                        "> 1.0x",
                        value,
                        value > 1.0,
                        "x",
                        "aiohttp option still wins" if value > 1.0 else "aiohttp option no longer wins",
                    )
                )
    notes.append(
        f"{ctx.repeats} interleaved repeats of {duration}s after {WARMUP_ROUNDS} warm-up rounds of c requests; "
        "medians; rps and cpu_us count successful requests only; vs_httpx = rps / raw httpx rps, "
        "vs_raw = rps / rps of the raw client of the same library and transport (median of per-repeat ratios)"
    )
    if AiohttpTransport is None:
        notes.append("httpx-aiohttp not installed: aiohttp variants skipped (pip install -e '.[bench]')")
    if HTTPX2_MISSING:
        print(f"  S7: {HTTPX2_MISSING}", flush=True)
        notes.append(HTTPX2_MISSING)
    return ScenarioResult(
        "s7",
        "async throughput, closed loop, 1 nginx endpoint, httpx and httpx2",
        ["concurrency", "variant", "rps", "vs_httpx", "vs_raw", "cpu_us", "p50_ms", "p99_ms", "p999_ms", "errors"],
        rows,
        checks,
        notes=notes,
        series=series,
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Requests per second per variant at both concurrencies."""
    groups = [f"c={c}" for c in result.series]
    first = next(iter(result.series.values()))
    names = [v for v in first if v in RAW]
    values = {v: [result.series[c][v] for c in result.series] for v in names}
    path = out / "s7_throughput.png"
    ok = bar_chart(path, "S7: AsyncClient throughput (requests/s)", groups, values, "requests / s")
    return [path] if ok else []
