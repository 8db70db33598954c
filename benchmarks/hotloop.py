"""A request loop to profile: ``python -m benchmarks.hotloop --variant meshlib --mode sync [--profile]``.

Starts nginx (1 KiB answers), then sends closed-loop requests for ``--seconds`` through raw httpx, raw
httpx2, meshlib.httpx (``--variant meshlib``) or meshlib.httpx2, sync or async, with the default or the
aiohttp inner transport, and prints requests/s and client CPU per request. ``--profile`` wraps the loop in
pyinstrument and prints its call tree; for a native view, run it under py-spy instead::

    py-spy record -o /tmp/s1.svg -- .venv/bin/python -m benchmarks.hotloop --variant meshlib --seconds 10

This is how the profiles quoted in docs/performance.md were taken.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import time
from collections.abc import Callable
from typing import Any

import httpx

import meshlib.httpx
from benchmarks.harness import CpuMeter, Histogram, pin_client
from benchmarks.load import ClosedResult, closed_async, closed_sync
from benchmarks.servers import Nginx

VARIANTS = ("httpx", "meshlib", "meshlib.httpx", "httpx2", "meshlib.httpx2")


def _library(variant: str) -> Any:
    """The module whose ``Client``/``AsyncClient`` the variant uses."""
    if variant in ("meshlib", "meshlib.httpx"):
        return meshlib.httpx
    if variant in ("httpx2", "meshlib.httpx2"):
        return importlib.import_module(variant)
    return httpx


def _client(variant: str, mode: str, port: int, **kwargs: Any) -> tuple[Any, str]:
    cls = getattr(_library(variant), "Client" if mode == "sync" else "AsyncClient")
    if variant.startswith("meshlib"):
        return cls(services={"bench": f"static://127.0.0.1:{port}"}, environ={}, **kwargs), "http://bench/"
    return cls(**kwargs), f"http://127.0.0.1:{port}/"


def _async_client(variant: str, transport: str, port: int) -> tuple[Any, str]:
    kwargs: dict[str, Any] = {}
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        kwargs["transport"] = AiohttpTransport()
    return _client(variant, "async", port, **kwargs)


def _inline(send: Callable[[], object], seconds: float) -> ClosedResult:
    """Closed loop at concurrency 1 on the calling thread."""
    for _ in range(50):
        send()
    hist = Histogram()
    meter = CpuMeter()
    meter.start()
    t0 = time.perf_counter()
    end = t0 + seconds
    while (now := time.perf_counter()) < end:
        send()
        hist.record(time.perf_counter() - now)
    meter.stop()
    return ClosedResult(len(hist), 0, time.perf_counter() - t0, hist, meter)


def loop(  # noqa: PLR0917
    variant: str, mode: str, transport: str, concurrency: int, seconds: float, port: int
) -> ClosedResult:
    """One closed-loop run against ``port``."""
    if mode == "sync":
        client, url = _client(variant, "sync", port)
        with client:
            if concurrency == 1:  # on this thread, so pyinstrument (which samples one thread) sees it
                return _inline(lambda: client.get(url), seconds)
            return closed_sync(lambda: client.get(url), concurrency=concurrency, duration=seconds)

    async def go() -> ClosedResult:
        aclient, aurl = _async_client(variant, transport, port)
        async with aclient:

            async def send() -> None:
                await aclient.get(aurl)

            return await closed_async(send, concurrency=concurrency, duration=seconds)

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, start nginx, run (and optionally profile) the loop, print the result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="meshlib", help="meshlib is meshlib.httpx")
    parser.add_argument("--mode", choices=("sync", "async"), default="sync")
    parser.add_argument("--transport", choices=("default", "aiohttp"), default="default")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument call tree")
    args = parser.parse_args(argv)
    pinning = pin_client()
    with Nginx(1, pinning.server_prefix) as nginx:

        def run() -> ClosedResult:
            return loop(args.variant, args.mode, args.transport, args.concurrency, args.seconds, nginx.ports[0])

        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0002, async_mode="disabled")
            profiler.start()
            result = run()
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False, show_all=False))
        else:
            result = run()
    print(
        f"{args.variant} {args.mode} {args.transport} c={args.concurrency}: {result.rps:.0f} rps, "
        f"{result.cpu_us_per_request():.0f} µs CPU/request, p50 {result.hist.percentiles((50,))[0] * 1e6:.0f} µs"
    )


if __name__ == "__main__":
    main()
