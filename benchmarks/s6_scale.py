"""S6 -- scale: 10,000 endpoints from discovery with 1% churn per second.

Four measurements:

1. **pick cost** at 10 and at 10,000 endpoints: the balancer's ``pick`` alone, and the whole per-attempt
   decision (``Call.attempt``: deadline, exclusions, pick, breaker, outgoing request), P2C peak EWMA.
2. **memory per endpoint**: ``tracemalloc`` growth (and RSS growth) when a service applies 10,000
   endpoints, with meshlib's default per-endpoint pooled transport and with one shared transport.
3. **update apply time**: ``Service.apply`` of a 1%-churned 10,000-endpoint set, outside any load.
4. **live churn**: an ``AsyncClient`` whose service comes from a discovery source (registered as
   ``benchcat://``, a blocking "watch" source like Consul's blocking queries) listing 10,000 endpoints, 1%
   of them replaced every second, while it sends an open-loop 200 requests/s. A probe task sleeping 1 ms
   in a loop measures how long the event loop stalls when an update is applied; errors are counted.

The data path needs real servers: the catalog's endpoints are distinct loopback aliases
(``127.x.y.z:port``) of 4 real backends, and the client's inner transport rewrites the alias to
127.0.0.1 before connecting (all loopback; nothing listens on the aliases themselves).

Targets (issue 6): pick cost at 10k <= 2x at 10; memory per endpoint reported; updates applied without
stalling the event loop more than a few ms (judged: <= 5 ms); no request errors caused by churn.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx

import meshlib
from benchmarks.harness import Check, Context, Histogram, ScenarioResult, median, ratio
from benchmarks.load import Outcome, open_async
from benchmarks.report import bar_chart
from benchmarks.s3_slow_backend import outcome_of, outcome_of_error
from benchmarks.servers import BackendProcess
from meshlib._http import library
from meshlib._lease import LeaseHome
from meshlib._plan import Call
from meshlib._service import Service
from meshlib.discovery import Target, register_scheme
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution
from meshlib.discovery.cache import Snapshot

N_BIG = 10_000
LIB = library("httpx")
HOME = LeaseHome(lambda pool: None)  # decision timing only: no pool is ever retired
N_SMALL = 10
CHURN = 0.01


def alias(i: int, port: int) -> Endpoint:
    """The ``i``-th distinct loopback alias (127.x.y.z), on ``port``."""
    return Endpoint(host=f"127.{1 + (i >> 16) % 250}.{(i >> 8) & 255}.{i & 255}", port=port)


class Catalog:
    """An in-process service catalog: ``n`` endpoints, ``churn()`` replaces a share of them."""

    def __init__(self, n: int, ports: list[int], seed: int = 1) -> None:
        self.ports = ports
        self.next_id = n
        self.endpoints = [alias(i, ports[i % len(ports)]) for i in range(n)]
        self.version = 1
        self.changed_at = 0.0
        self.rng = random.Random(seed)
        self.waiters: list[asyncio.Future[None]] = []

    def churn(self, share: float) -> None:
        """Replace ``share`` of the endpoints by new ones and wake the watchers."""
        for k in self.rng.sample(range(len(self.endpoints)), int(len(self.endpoints) * share)):
            self.endpoints[k] = alias(self.next_id, self.ports[self.next_id % len(self.ports)])
            self.next_id += 1
        self.version += 1
        self.changed_at = time.perf_counter()
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


CATALOGS: dict[str, Catalog] = {}


class CatalogResolver:
    """A watch-style resolver over a :class:`Catalog`: ``aresolve`` blocks until the catalog changes."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.seen = 0

    def resolve(self) -> Resolution:
        """The current endpoints (sync callers; not used by the async benchmark)."""
        catalog = CATALOGS[self.name]
        self.seen = catalog.version
        return Resolution(endpoints=tuple(catalog.endpoints), ttl=None, watch=True)

    async def aresolve(self) -> Resolution:
        """The endpoints, once they differ from the last answer (a blocking query)."""
        catalog = CATALOGS[self.name]
        while catalog.version == self.seen:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            catalog.waiters.append(waiter)
            await waiter
        self.seen = catalog.version
        return Resolution(endpoints=tuple(catalog.endpoints), ttl=None, watch=True)

    def close(self) -> None:
        """Nothing to release."""


def _factory(target: Target, settings: DiscoverySettings) -> CatalogResolver:
    return CatalogResolver(target.rest, target.uri)


register_scheme("benchcat", _factory, form="benchcat://name", replace=True)


class AliasTransport(httpx.AsyncBaseTransport):
    """Sends a request for ``127.x.y.z:port`` to ``127.0.0.1:port`` through one shared pooled transport."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=200, max_keepalive_connections=64))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(host="127.0.0.1")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


# --------------------------------------------------------------------------------------------- offline parts


def _service(shared: bool) -> tuple[meshlib.AsyncClient, Service[Any]]:
    """A client's ``big`` service, built by meshlib itself: default per-endpoint transports, or one shared."""
    CATALOGS.setdefault("big", Catalog(N_SMALL, [8000]))
    kwargs: dict[str, Any] = {"transport": httpx.AsyncHTTPTransport()} if shared else {}
    client = meshlib.AsyncClient(services={"big": "benchcat://big"}, environ={}, **kwargs)
    return client, client.mesh.services["BIG"]


def _close(client: meshlib.AsyncClient) -> None:
    asyncio.run(client.aclose())


def _snapshot(endpoints: list[Endpoint], version: int) -> Snapshot:
    return Snapshot(endpoints=tuple(endpoints), fetched_at=time.monotonic(), version=version)


def _per_call_ns(fn: Any, seconds: float) -> float:
    """Nanoseconds per call of ``fn`` (best of 3 timed batches)."""
    best = float("inf")
    batch = 2000
    for _ in range(3):
        end = time.perf_counter() + seconds / 3
        calls = 0
        t0 = time.perf_counter_ns()
        while time.perf_counter() < end:
            for _ in range(batch):
                fn()
            calls += batch
        best = min(best, (time.perf_counter_ns() - t0) / calls)
    return best


def _pick_costs(seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    request = httpx.Request("GET", "http://big/")
    for n in (N_SMALL, N_BIG):
        client, service = _service(shared=True)
        service.apply(_snapshot([alias(i, 8000) for i in range(n)], 1))
        active = service.active
        assert active is not None
        out[f"pick_ns_{n}"] = _per_call_ns(lambda a=active: a.pick(None, ()), seconds)

        def decide(a: Any = active, s: Any = service, lib: Any = LIB, home: Any = HOME) -> None:
            Call(lib, s, request, home).attempt(a).lease.release()

        out[f"decision_ns_{n}"] = _per_call_ns(decide, seconds)
        _close(client)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _memory() -> dict[str, float]:
    out: dict[str, float] = {}
    endpoints = [alias(i, 8000) for i in range(N_BIG)]
    for shared in (False, True):
        label = "shared" if shared else "pooled"
        client, service = _service(shared)
        snapshot = _snapshot(endpoints, 1)
        gc.collect()
        rss0 = _rss_bytes()
        service.apply(snapshot)
        gc.collect()
        out[f"rss_mb_{label}"] = (_rss_bytes() - rss0) / 1e6
        _close(client)
        client, service = _service(shared)
        gc.collect()
        tracemalloc.start()
        snap0 = tracemalloc.take_snapshot()
        service.apply(snapshot)
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename"))
        tracemalloc.stop()
        out[f"bytes_per_endpoint_{label}"] = grown / N_BIG
        _close(client)
    return out


def _apply_times(updates: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for shared in (False, True):
        label = "shared" if shared else "pooled"
        catalog = Catalog(N_BIG, [8000])
        client, service = _service(shared)
        service.apply(_snapshot(catalog.endpoints, 1))
        times = []
        for v in range(updates):
            catalog.churn(CHURN)
            snapshot = _snapshot(catalog.endpoints, v + 2)
            t0 = time.perf_counter()
            service.apply(snapshot)
            times.append(time.perf_counter() - t0)
        out[f"apply_ms_{label}"] = median(times) * 1e3
        out[f"apply_max_ms_{label}"] = max(times) * 1e3
        _close(client)
    return out


# --------------------------------------------------------------------------------------------- live churn


async def _live(backends: BackendProcess, duration: float) -> dict[str, Any]:
    catalog = Catalog(N_BIG, backends.ports)
    CATALOGS["big"] = catalog
    transport = AliasTransport()
    applies: list[float] = []
    shifts: list[float] = []
    lags = Histogram()
    running = True
    async with meshlib.AsyncClient(services={"big": "benchcat://big"}, environ={}, transport=transport) as client:
        await client.get("http://big/")
        service = client.mesh.services["BIG"]
        original_apply = service.apply

        def timed_apply(snapshot: Snapshot) -> list[Any]:
            t0 = time.perf_counter()
            try:
                return original_apply(snapshot)
            finally:
                applies.append(time.perf_counter() - t0)

        service.apply = timed_apply  # type: ignore[method-assign]

        async def probe() -> None:
            last_active = service.active
            while running:
                t0 = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.record(max(0.0, time.perf_counter() - t0 - 0.001))
                if service.active is not last_active:
                    last_active = service.active
                    shifts.append(time.perf_counter() - catalog.changed_at)

        async def churn() -> None:
            while running:
                await asyncio.sleep(1.0)
                if running:
                    catalog.churn(CHURN)

        async def send() -> Outcome:
            return outcome_of(await client.get("http://big/"))

        tasks = [asyncio.ensure_future(probe()), asyncio.ensure_future(churn())]
        result = await open_async(send, outcome_of_error, rate=200.0, duration=duration)
        running = False
        await asyncio.gather(*tasks)
    await transport.aclose()
    n = len(result.latency)
    (p99,) = lags.percentiles((99,))
    return {
        "requests": n,
        "errors": n - sum(result.ok),
        "updates": len(applies),
        "live_apply_ms": median(applies) * 1e3,
        "live_apply_max_ms": max(applies, default=float("nan")) * 1e3,
        "loop_lag_p99_ms": p99 * 1e3,
        "loop_stall_max_ms": max(lags.samples, default=float("nan")) * 1e3,
        "shift_ms": median(shifts) * 1e3,
        "request_p99_ms": result.hist().percentiles((99,))[0] * 1e3,
    }


def run(ctx: Context) -> ScenarioResult:
    """Offline measurements, then the live churn run."""
    values: dict[str, Any] = {}
    values.update(_pick_costs(ctx.scale(1.5, 0.3)))
    values.update(_memory())
    values.update(_apply_times(5 if ctx.quick else 10))
    with BackendProcess(4, {"body_size": 64}, ctx.pinning.server_prefix) as backends:
        values.update(asyncio.run(_live(backends, ctx.scale(15.0, 5.0))))
    pick_ratio = ratio(values[f"pick_ns_{N_BIG}"], values[f"pick_ns_{N_SMALL}"])
    decision_ratio = ratio(values[f"decision_ns_{N_BIG}"], values[f"decision_ns_{N_SMALL}"])
    rows = [
        {"metric": "pick (P2C peak EWMA), ns", "at 10": values["pick_ns_10"], "at 10k": values["pick_ns_10000"]},
        {
            "metric": "whole attempt decision, ns",
            "at 10": values["decision_ns_10"],
            "at 10k": values["decision_ns_10000"],
        },
        {"metric": "bytes/endpoint, pooled transport each", "at 10k": values["bytes_per_endpoint_pooled"]},
        {"metric": "bytes/endpoint, shared transport", "at 10k": values["bytes_per_endpoint_shared"]},
        {
            "metric": "RSS growth MB, pooled / shared",
            "at 10": values["rss_mb_pooled"],
            "at 10k": values["rss_mb_shared"],
        },
        {
            "metric": "apply 1% churn, ms (median / max), pooled",
            "at 10": values["apply_ms_pooled"],
            "at 10k": values["apply_max_ms_pooled"],
        },
        {
            "metric": "apply 1% churn, ms (median / max), shared",
            "at 10": values["apply_ms_shared"],
            "at 10k": values["apply_max_ms_shared"],
        },
        {
            "metric": "live: updates applied / request errors",
            "at 10": float(values["updates"]),
            "at 10k": float(values["errors"]),
        },
        {
            "metric": "live: apply ms (median / max)",
            "at 10": values["live_apply_ms"],
            "at 10k": values["live_apply_max_ms"],
        },
        {
            "metric": "live: loop lag p99 / max stall, ms",
            "at 10": values["loop_lag_p99_ms"],
            "at 10k": values["loop_stall_max_ms"],
        },
        {"metric": "live: catalog change -> new set serving, ms", "at 10k": values["shift_ms"]},
    ]
    checks = [
        Check("pick cost 10k / 10", "<= 2x", pick_ratio, pick_ratio <= 2.0, "x"),
        Check("whole attempt decision 10k / 10", "<= 2x", decision_ratio, decision_ratio <= 2.0, "x"),
        Check(
            "event-loop stall while applying updates",
            "<= 5 ms",
            values["loop_stall_max_ms"],
            values["loop_stall_max_ms"] <= 5.0,
            " ms",
            f"live apply max {values['live_apply_max_ms']:.1f} ms",
        ),
        Check("request errors during churn", "0", float(values["errors"]), values["errors"] == 0),
    ]
    return ScenarioResult(
        "s6",
        "10,000 endpoints from discovery, 1% churn per second",
        ["metric", "at 10", "at 10k"],
        rows,
        checks,
        notes=[
            "pooled: meshlib's default (one pooled httpx.AsyncHTTPTransport per endpoint); "
            "shared: one transport passed as transport=",
            "live run: AsyncClient, 200 rps open loop, 1% churn each second, watch-style discovery source; "
            "loop stall = oversleep of a 1 ms sleep loop on the same event loop",
            "anchors: P2C pick 365 ns at 10k, 1.8 ms per 1% update (performance.md); Istio sidecar 40-60 MB",
        ],
        series=values,
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Pick and decision cost at 10 and 10k endpoints."""
    v = result.series
    path = out / "s6_pick_cost.png"
    ok = bar_chart(
        path,
        "S6: per-attempt cost at 10 vs 10,000 endpoints (ns)",
        ["pick", "whole attempt decision"],
        {
            "10 endpoints": [v["pick_ns_10"], v["decision_ns_10"]],
            "10,000": [v["pick_ns_10000"], v["decision_ns_10000"]],
        },
        "ns",
    )
    return [path] if ok else []
