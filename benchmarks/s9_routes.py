"""S9 -- CPU per request added by routing: the same request through meshlib without routes and with route tables.

Same backend as S1 (one nginx endpoint answering 1 KiB); meshlib with its defaults, sync ``Client`` and async
``AsyncClient``, on httpx and on httpx2. Every variant sends the same request, ``GET http://bench/api/orders?
region=eu&page=2`` with an ``x-tenant: acme`` header (:mod:`benchmarks.route_tables`), so only the routing
differs:

* ``none``    no route table: the call goes to the service ``bench`` (the S1 path)
* ``1 rule``  one rule, ``PathPrefix /api``, to ``bench``
* ``50 rules`` 50 rules, the request matching the last one; the 49 before it miss on the path, a header, a
  query parameter, a regular expression or the method
* ``50+split`` the 50-rule table whose last rule splits 90/10 between ``bench`` and ``bench-canary`` (the same
  nginx) and sets a request header (``RequestHeaderModifier``)

A difference of a few µs is far below what whole runs on this machine resolve (S1 moves 10-30% between runs,
i.e. 100 µs and more), so the variants are interleaved finely instead: every client is open at once and
warm, and the run is ``rounds`` rounds of ``batch`` back-to-back requests per variant (closed loop, c=1), the
order rotating each round. Each round gives each variant's process CPU per request (``time.process_time``,
nanosecond clock); the reported difference is the median over rounds of the per-round difference from
``none`` of the same library, measured a fraction of a second apart.

Target (issue 11): the 50-rule table adds at most 5 µs per request to S1. ``python -m benchmarks.instructions``
counts the same difference in instructions (no noise at all).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import meshlib.httpx
from benchmarks import route_tables
from benchmarks.harness import Check, Context, Histogram, ScenarioResult, median
from benchmarks.optional import HTTPX2, HTTPX2_MISSING, MESH_HTTPX2
from benchmarks.report import bar_chart
from benchmarks.servers import Nginx

TABLES: dict[str, Callable[[], Any] | None] = {
    "none": None,
    "1 rule": route_tables.one_rule,
    "50 rules": route_tables.fifty_rules,
    "50+split": lambda: route_tables.fifty_rules(split=True),
}
TARGET_US = 5.0
WARMUP = 200


def libraries() -> tuple[tuple[str, Any], ...]:
    """(name, meshlib client module) of each library this run can measure."""
    found: list[tuple[str, Any]] = [("meshlib.httpx", meshlib.httpx)]
    if HTTPX2 is not None:
        found.append(("meshlib.httpx2", MESH_HTTPX2))
    return tuple(found)


def _client(module: Any, mode: str, port: int, tables: str) -> Any:
    cls = module.Client if mode == "sync" else module.AsyncClient
    target = f"static://127.0.0.1:{port}"
    client = cls(services={"bench": target, "bench-canary": target}, environ={})
    build = TABLES[tables]
    if build is not None:
        client.mesh.install_routes(build())
    client.mesh.rng = random.Random(11)  # the 90/10 draws are the same sequence in every run
    return client


def _order(names: Sequence[str], r: int) -> list[str]:
    k = r % len(names)
    return [*names[k:], *names[:k]]


def _sync_rounds(
    clients: dict[str, Any], rounds: int, batch: int
) -> tuple[dict[str, list[float]], dict[str, Histogram]]:
    url = "http://bench" + route_tables.PATH
    headers = route_tables.HEADERS
    cpu: dict[str, list[float]] = {v: [] for v in clients}
    hists = {v: Histogram() for v in clients}
    for client in clients.values():
        for _ in range(WARMUP):
            client.get(url, headers=headers)
    names = list(clients)
    perf, cpu_now = time.perf_counter, time.process_time
    for r in range(rounds):
        for variant in _order(names, r):
            client, hist = clients[variant], hists[variant]
            c0 = cpu_now()
            for _ in range(batch):
                t0 = perf()
                if client.get(url, headers=headers).status_code != 200:
                    raise RuntimeError(f"{variant}: bad status")
                hist.record(perf() - t0)
            cpu[variant].append((cpu_now() - c0) / batch * 1e6)
    return cpu, hists


async def _async_rounds(
    clients: dict[str, Any], rounds: int, batch: int
) -> tuple[dict[str, list[float]], dict[str, Histogram]]:
    url = "http://bench" + route_tables.PATH
    headers = route_tables.HEADERS
    cpu: dict[str, list[float]] = {v: [] for v in clients}
    hists = {v: Histogram() for v in clients}
    for client in clients.values():
        for _ in range(WARMUP):
            await client.get(url, headers=headers)
    names = list(clients)
    perf, cpu_now = time.perf_counter, time.process_time
    for r in range(rounds):
        for variant in _order(names, r):
            client, hist = clients[variant], hists[variant]
            c0 = cpu_now()
            for _ in range(batch):
                t0 = perf()
                if (await client.get(url, headers=headers)).status_code != 200:
                    raise RuntimeError(f"{variant}: bad status")
                hist.record(perf() - t0)
            cpu[variant].append((cpu_now() - c0) / batch * 1e6)
    return cpu, hists


def _measure(mode: str, port: int, rounds: int, batch: int) -> tuple[dict[str, list[float]], dict[str, Histogram]]:
    clients = {f"{lib}|{t}": _client(module, mode, port, t) for lib, module in libraries() for t in TABLES}
    if mode == "sync":
        try:
            return _sync_rounds(clients, rounds, batch)
        finally:
            for client in clients.values():
                client.close()

    async def go() -> tuple[dict[str, list[float]], dict[str, Histogram]]:
        try:
            return await _async_rounds(clients, rounds, batch)
        finally:
            for client in clients.values():
                await client.aclose()

    return asyncio.run(go())


def run(ctx: Context) -> ScenarioResult:
    """Both modes, every library and table interleaved round by round; differences against ``none``."""
    rounds = int(ctx.scale(120, 12)) * max(1, ctx.repeats // 3)
    batch = int(ctx.scale(40, 20))
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    series: dict[str, Any] = {}
    with Nginx(1, ctx.pinning.server_prefix) as nginx:
        port = nginx.ports[0]
        measured = {
            mode: _measure(mode, port, rounds // (2 if mode == "async" else 1), batch) for mode in ("sync", "async")
        }
    for mode, (cpu, hists) in measured.items():
        for lib, _ in libraries():
            base = cpu[f"{lib}|none"]
            for tables in TABLES:
                mine = cpu[f"{lib}|{tables}"]
                added = median(m - b for m, b in zip(mine, base, strict=True))
                s = hists[f"{lib}|{tables}"].summary_us()
                rows.append(
                    {
                        "config": f"{mode} c=1",
                        "library": lib,
                        "routes": tables,
                        "cpu_us": median(mine),
                        "added_cpu_us": added if tables != "none" else 0.0,
                        "p50_us": s["p50_us"],
                        "p99_us": s["p99_us"],
                        "rounds": len(mine),
                    }
                )
                series.setdefault(f"{mode} {lib}", {})[tables] = added if tables != "none" else 0.0
                if tables == "50 rules":
                    checks.append(
                        Check(
                            f"50-rule table added CPU/request, {lib}, {mode}",
                            f"<= {TARGET_US:.0f} µs",
                            added,
                            added <= TARGET_US,
                            " µs",
                        )
                    )
    notes = [
        f"{rounds} rounds (async: {rounds // 2}) of {batch} requests per variant, order rotating each round, after "
        f"{WARMUP} warm-up requests each; cpu_us = median over rounds of process CPU per request; added_cpu_us = "
        "median over rounds of (variant - none of the same library, same round)",
        "p50_us/p99_us: per-request wall latency pooled over rounds (closed loop c=1)",
        f"request: GET http://bench{route_tables.PATH} with x-tenant: acme; the 50-rule table's match is its last rule",
    ]
    if HTTPX2_MISSING:
        notes.append(HTTPX2_MISSING)
    return ScenarioResult(
        "s9",
        "CPU per request added by route tables (1 nginx endpoint, c=1, finely interleaved)",
        ["config", "library", "routes", "cpu_us", "added_cpu_us", "p50_us", "p99_us", "rounds"],
        rows,
        checks,
        notes=notes,
        series=series,
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Added CPU per request of each table, per library and mode."""
    groups = list(result.series)
    tables = [t for t in TABLES if t != "none"]
    values = {t: [float(result.series[g].get(t, float("nan"))) for g in groups] for t in tables}
    path = out / "s9_added_cpu.png"
    ok = bar_chart(
        path,
        f"S9: CPU per request added by routing (µs; target 50 rules <= {TARGET_US:.0f})",
        groups,
        values,
        "µs CPU / request",
    )
    return [path] if ok else []
