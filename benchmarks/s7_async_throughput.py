"""S7 -- async throughput: ``AsyncClient`` at 16 and 128 concurrent requests vs raw ``httpx.AsyncClient``.

httpx's default async pool (httpcore + anyio) is known to be slow under concurrency (encode/httpx#3215).
meshlib's fast path is ``MESHLIB_INNER_TRANSPORT=aiohttp`` (here ``environ=``): each endpoint's pool is an
``httpx_aiohttp.AiohttpTransport`` with its own ``aiohttp.ClientSession``, built with the service's SSL context
and closed when the endpoint leaves (the ``bench`` extra installs ``httpx-aiohttp``): the same API, aiohttp's
connection pool underneath. Four variants against one nginx endpoint (1 KiB), closed loop:

* ``httpx``            raw ``httpx.AsyncClient()``
* ``meshlib``          ``meshlib.AsyncClient()`` with its default per-endpoint ``AsyncHTTPTransport``
* ``httpx+aiohttp``    raw ``httpx.AsyncClient(transport=AiohttpTransport())``
* ``meshlib+aiohttp``  ``meshlib.AsyncClient()`` with ``MESHLIB_INNER_TRANSPORT=aiohttp``: one aiohttp pool per
  endpoint, as in production (not the shared ``transport=`` form, which skips per-service TLS and closing)

Targets (issue 6): meshlib >= 1.0x raw httpx throughput with the default transport, >= 3x with the fast one.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import httpx

import meshlib
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median, median_row, ratio
from benchmarks.load import closed_async
from benchmarks.report import bar_chart
from benchmarks.servers import Nginx

AiohttpTransport: type[httpx.AsyncBaseTransport] | None
try:
    from httpx_aiohttp import AiohttpTransport
except ImportError:  # pragma: no cover - the bench extra installs it
    AiohttpTransport = None

BASE = ("httpx", "meshlib")
FAST = ("httpx+aiohttp", "meshlib+aiohttp")


def _client(variant: str, port: int) -> tuple[httpx.AsyncClient, str]:
    fast = variant.endswith("+aiohttp")
    if variant.startswith("meshlib"):
        environ = {"MESHLIB_INNER_TRANSPORT": "aiohttp"} if fast else {}
        client = meshlib.AsyncClient(services={"bench": f"static://127.0.0.1:{port}"}, environ=environ)
        return client, "http://bench/"
    kwargs: dict[str, Any] = {}
    if fast:
        assert AiohttpTransport is not None
        kwargs["transport"] = AiohttpTransport()
    return httpx.AsyncClient(**kwargs), f"http://127.0.0.1:{port}/"


def _run(variant: str, port: int, concurrency: int, duration: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        client, url = _client(variant, port)
        async with client:

            async def send() -> None:
                response = await client.get(url)
                if response.status_code != 200:
                    raise RuntimeError("bad status")

            result = await closed_async(send, concurrency=concurrency, duration=duration, warmup=concurrency * 4)
        s = result.hist.summary_us()
        return {
            "rps": result.rps,
            "cpu_us": result.cpu_us_per_request(),
            "p50_ms": s["p50_us"] / 1e3,
            "p99_ms": s["p99_us"] / 1e3,
            "p999_ms": s["p999_us"] / 1e3,
            "errors": result.errors,
        }

    return asyncio.run(go())


def _one(variant: str, repeat: int, *, port: int, c: int, d: float) -> dict[str, Any]:
    return _run(variant, port, c, d)


def run(ctx: Context) -> ScenarioResult:
    """Both concurrencies, every variant interleaved; ratios against raw httpx of the same repeat."""
    variants = BASE + (FAST if AiohttpTransport is not None else ())
    duration = ctx.scale(2.0, 0.5)
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    series: dict[str, Any] = {}
    with Nginx(1, ctx.pinning.server_prefix) as nginx:
        port = nginx.ports[0]
        for concurrency in (16, 128):
            runs = interleave(variants, ctx.repeats, functools.partial(_one, port=port, c=concurrency, d=duration))
            for variant in variants:
                row = {"concurrency": concurrency, "variant": variant, **median_row(runs[variant])}
                row["vs_httpx"] = median(
                    ratio(m["rps"], h["rps"]) for m, h in zip(runs[variant], runs["httpx"], strict=True)
                )
                rows.append(row)
            series[str(concurrency)] = {r["variant"]: r["rps"] for r in rows if r["concurrency"] == concurrency}
            base = next(r for r in rows if r["concurrency"] == concurrency and r["variant"] == "meshlib")
            checks.append(
                Check(
                    f"meshlib / httpx rps, c={concurrency}", ">= 1.0x", base["vs_httpx"], base["vs_httpx"] >= 1.0, "x"
                )
            )
            if AiohttpTransport is not None:
                fast = next(r for r in rows if r["concurrency"] == concurrency and r["variant"] == "meshlib+aiohttp")
                checks.append(
                    Check(
                        f"meshlib+aiohttp / httpx rps, c={concurrency}",
                        ">= 3x",
                        fast["vs_httpx"],
                        fast["vs_httpx"] >= 3.0,
                        "x",
                    )
                )
    notes = [f"{ctx.repeats} interleaved repeats of {duration}s; medians; vs_httpx = rps / raw httpx rps"]
    if AiohttpTransport is None:
        notes.append("httpx-aiohttp not installed: fast-transport variants skipped (pip install -e '.[bench]')")
    return ScenarioResult(
        "s7",
        "async throughput, closed loop, 1 nginx endpoint",
        ["concurrency", "variant", "rps", "vs_httpx", "cpu_us", "p50_ms", "p99_ms", "p999_ms", "errors"],
        rows,
        checks,
        notes=notes,
        series=series,
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Requests per second per variant at both concurrencies."""
    groups = [f"c={c}" for c in result.series]
    variants = list(next(iter(result.series.values())))
    values = {v: [result.series[c][v] for c in result.series] for v in variants}
    path = out / "s7_throughput.png"
    ok = bar_chart(path, "S7: AsyncClient throughput (requests/s)", groups, values, "requests / s")
    return [path] if ok else []
