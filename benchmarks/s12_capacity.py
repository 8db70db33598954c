"""S12 heterogeneous capacity (``s12``) -- weighted_round_robin on ORCA reports against p2c_ewma and round robin.

``python -m benchmarks s12`` (about 4 minutes; ``--quick`` about 1). Issue 16. ``s12slots``
(:mod:`benchmarks.s12_slots`) is the same with capacity from parallelism: 4/8/16 slots, every request 200 ms.

Three capacity-limited backends (:mod:`benchmarks.capacity`, own process) of speeds 1, 2 and 4: each works on at
most 4 requests at once and queues the rest in arrival order, a request taking 200, 100 and 50 ms, so they serve
20, 40 and 80 requests/s (140 together: the client's own core, not the backends, would limit above a few hundred
per second on this 2-core machine). Every answer carries an ORCA load report (gRFC A51's HTTP form,
``endpoint-load-metrics: TEXT cpu_utilization=U, rps_fractional=Q`` over the last second; ``Q / U`` is the
backend's capacity). One ``meshlib.httpx.AsyncClient`` (``MESHLIB_TIMEOUT=2s``, 1,000 connections per endpoint so
the pool limits nothing) sends open loop: a warmup of 10 s at 40 % of the capacity (56/s: under every backend's
capacity even split equally, as it is while A58's blackout lasts), then 15 s measured at 70 % (98/s). Without the
gentler warmup, round robin during the blackout overloads the 1x backend, its requests time out and the breaker and
outlier detection eject it for 30 s, which then measures ejection, not weighting.

A58's blackout period (10 s by default: an endpoint's weight is ignored until it has reported that long) is
shortened to 2 s with ``MESHLIB_WRR_BLACKOUT_PERIOD``, set both in the client's ``environ=`` and, for the run, in
this process's ``os.environ`` (meshlib before wip-16's fix read the ``MESHLIB_WRR_*`` settings from ``os.environ``
only). The warmup (10 s) covers the blackout plus several 1 s weight updates.

Variants, each a fresh client, interleaved over the repeats (order rotating): ``weighted_round_robin``,
``p2c_ewma`` (the default) and ``round_robin`` (the reference: a third each, so the 1x backend gets 33/s against
its 20/s and its queue grows for the whole run). Between runs the backends drain their queues.

Reported per variant: each backend's share of the answered requests in the measured window (from the endpoint
meshlib names on each response), p50/p99/p99.9 of all measured requests (failures count at their latency), errors.
Targets (issue 16): WRR shares within +-10 % (relative) of the capacity ratio 1:2:4 (14.3 / 28.6 / 57.1 %), and
WRR's p99 at most 0.8x p2c_ewma's in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import meshlib
import meshlib.httpx
from benchmarks.capacity import CapacityProcess
from benchmarks.harness import Check, Context, Histogram, ScenarioResult, interleave, median, median_row, ratio
from benchmarks.load import Outcome, open_async
from benchmarks.report import bar_chart
from benchmarks.s10_overload import _outcome

VARIANTS = ("weighted_round_robin", "p2c_ewma", "round_robin")
SPEEDS = (1.0, 2.0, 4.0)
SLOTS = 4
SERVICE_TIME = 0.2
LOAD = 0.7
#: The warmup's load: 40 % of 140/s is 56/s, under the 1x backend's 20/s even split three ways.
WARMUP_LOAD = 0.4
TIMEOUT = 2.0
BLACKOUT = "2s"


@contextlib.contextmanager
def _process_env(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block (meshlib reads ``MESHLIB_WRR_*`` only from there)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _one_run(lb: str, backends: Any, warmup: float, measured: float) -> dict[str, Any]:
    env = {
        "MESHLIB_TIMEOUT": f"{TIMEOUT:g}s",
        "MESHLIB_LB": lb,
        "MESHLIB_WRR_BLACKOUT_PERIOD": os.environ["MESHLIB_WRR_BLACKOUT_PERIOD"],
    }
    limits = meshlib.httpx.httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    client = meshlib.httpx.AsyncClient(
        services={"svc": "static://" + ",".join(backends.addresses)}, environ=env, limits=limits
    )

    async def send() -> Outcome:
        response = await client.get("http://svc/")
        endpoint = str(response.extensions.get("meshlib.endpoint", ""))
        return Outcome(response.status_code == 200, 1, endpoint if response.status_code == 200 else "error")

    async with client:
        # warmup below every backend's capacity even at equal shares (A58's blackout: round robin meanwhile)
        await open_async(send, _outcome, rate=WARMUP_LOAD * backends.capacity, duration=warmup)
        result = await open_async(send, _outcome, rate=LOAD * backends.capacity, duration=measured)
        weights: dict[str, float] = {}
        if lb == "weighted_round_robin":
            service = client.mesh.services["SVC"]
            active = service.active
            picker = active.pickers[0] if active is not None and hasattr(active, "pickers") else None
            endpoint_weights = getattr(picker, "endpoint_weights", None)
            if callable(endpoint_weights):
                weights = {str(e.address): w for e, w in endpoint_weights().items()}
    await asyncio.to_thread(_drain, backends)
    window = result.select()
    hist = Histogram(result.latency[i] for i in window)
    answered = Counter(result.endpoints[i] for i in window if result.ok[i])
    total = sum(answered.values()) or 1
    p50, p99, p999 = hist.percentiles([50, 99, 99.9])
    row: dict[str, Any] = {"variant": lb, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "p999_ms": p999 * 1e3}
    for speed, address in zip(SPEEDS, backends.addresses, strict=True):
        row[f"share_{speed:g}x_pct"] = 100.0 * answered[address] / total
        if weights:
            row[f"weight_{speed:g}x"] = weights.get(address, math.nan)
    row["errors"] = len(window) - sum(1 for i in window if result.ok[i])
    row["requests"] = len(window)
    return row


class _SlotBackends(contextlib.ExitStack):
    """The ``slots`` shape: one backend per speed, ``speed x SLOTS`` slots each, all at ``SERVICE_TIME``."""

    def __init__(self, prefix: tuple[str, ...]) -> None:
        super().__init__()
        self.parts = [CapacityProcess(1, int(s * SLOTS), SERVICE_TIME, prefix, orca=True) for s in SPEEDS]

    def __enter__(self) -> _SlotBackends:
        super().__enter__()
        for part in self.parts:
            self.enter_context(part)
        return self

    @property
    def addresses(self) -> list[str]:
        return [part.addresses[0] for part in self.parts]

    @property
    def capacities(self) -> list[float]:
        return [part.capacity for part in self.parts]

    @property
    def capacity(self) -> float:
        return sum(self.capacities)

    def stats(self) -> dict[str, list[int]]:
        merged: dict[str, list[int]] = {}
        for part in self.parts:
            for key, values in part.stats().items():
                merged.setdefault(key, []).extend(values)
        return merged


def _drain(backends: Any) -> None:
    """Wait until the backends have served every queued request (abandoned ones included)."""
    deadline = time.monotonic() + 120.0
    while sum(backends.stats()["pending"]) and time.monotonic() < deadline:
        time.sleep(0.1)


def ideal_shares() -> list[float]:
    """The capacity ratio as percentages (1:2:4 -> 14.3 / 28.6 / 57.1)."""
    return [100.0 * s / sum(SPEEDS) for s in SPEEDS]


def measure(
    warmup: float = 10.0,
    measured: float = 15.0,
    repeats: int = 3,
    variants: tuple[str, ...] = VARIANTS,
    server_prefix: tuple[str, ...] = (),
    *,
    blackout: str = BLACKOUT,
    shape: str = "speed",
) -> ScenarioResult:
    """Every variant ``repeats`` times, interleaved, in one run; medians and the checks."""
    with (
        _process_env({"MESHLIB_WRR_BLACKOUT_PERIOD": blackout}),
        (
            _SlotBackends(server_prefix)
            if shape == "slots"
            else CapacityProcess(0, SLOTS, SERVICE_TIME, server_prefix, speeds=SPEEDS, orca=True)
        ) as backends,
    ):
        capacities = backends.capacities
        runs = interleave(variants, repeats, lambda v, r: asyncio.run(_one_run(v, backends, warmup, measured)))
    rows = [median_row(runs[v]) for v in variants]
    by_name = {row["variant"]: row for row in rows}
    ideal = ideal_shares()
    checks: list[Check] = []
    wrr = by_name.get("weighted_round_robin")
    if wrr is not None:
        shares = [wrr[f"share_{s:g}x_pct"] for s in SPEEDS]
        rel = [abs(v - i) / i * 100.0 for v, i in zip(shares, ideal, strict=True)]
        pts = [abs(v - i) for v, i in zip(shares, ideal, strict=True)]
        checks.append(
            Check(
                "WRR shares vs capacity ratio (worst, relative)",
                "<= 10% relative",
                max(rel),
                max(rel) <= 10.0,
                "%",
                "shares "
                + " / ".join(f"{v:.1f}" for v in shares)
                + " % vs "
                + " / ".join(f"{i:.1f}" for i in ideal)
                + f" %; worst {max(pts):.1f} points off",
            )
        )
        p2c = by_name.get("p2c_ewma")
        if p2c is not None:
            # the ratio per repeat (WRR and p2c_ewma of the same repeat ran back to back), then the median
            per_repeat = [
                ratio(w["p99_ms"], p["p99_ms"])
                for w, p in zip(runs["weighted_round_robin"], runs["p2c_ewma"], strict=True)
            ]
            value = median(per_repeat)
            checks.append(
                Check(
                    "WRR p99 / p2c_ewma p99",
                    "<= 0.8x",
                    value,
                    value <= 0.8,
                    "x",
                    f"{wrr['p99_ms']:.0f} ms vs {p2c['p99_ms']:.0f} ms (medians); per repeat "
                    + ", ".join(f"{x:.2f}" for x in per_repeat),
                )
            )
    share_cols = [f"share_{s:g}x_pct" for s in SPEEDS]
    return ScenarioResult(
        "s12" if shape == "speed" else f"s12{shape}",
        f"heterogeneous capacity ({shape}): {'/'.join(f'{s:g}x' for s in SPEEDS)} = "
        f"{'/'.join(f'{c:.0f}' for c in capacities)} req/s (ORCA reports), offered {LOAD:.0%} "
        f"({LOAD * sum(capacities):.0f}/s) open loop",
        ["variant", *share_cols, "p50_ms", "p99_ms", "p999_ms", "errors", "requests", "repeats"],
        rows,
        checks,
        notes=[
            f"{repeats} interleaved repeats per variant, medians; warmup {warmup:g} s at {WARMUP_LOAD:.0%}, "
            f"measured {measured:g} s at {LOAD:.0%}; "
            f"MESHLIB_WRR_BLACKOUT_PERIOD={blackout} (client environ= and os.environ)",
            f"ideal shares {' / '.join(f'{i:.1f}' for i in ideal)} %; shares of answered requests by the "
            "endpoint meshlib names; latency of every measured request from its intended start",
            (
                f"shape 'slots': speed x {SLOTS} slots per backend, {SERVICE_TIME * 1000:.0f} ms per request"
                if shape == "slots"
                else f"shape 'speed': {SLOTS} slots per backend, {SERVICE_TIME * 1000:.0f} ms / speed per request"
            )
            + ", FIFO queue beyond",
        ],
        series={v: runs[v] for v in variants},
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks s12`` runs it."""
    return measure(ctx.scale(10.0, 4.0), ctx.scale(15.0, 5.0), ctx.repeats, VARIANTS, tuple(ctx.pinning.server_prefix))


def run_slots(ctx: Context) -> ScenarioResult:
    """``python -m benchmarks s12slots``: the same with capacity from parallelism (4/8/16 slots) at one speed."""
    return measure(
        ctx.scale(10.0, 4.0),
        ctx.scale(15.0, 5.0),
        ctx.repeats,
        VARIANTS,
        tuple(ctx.pinning.server_prefix),
        shape="slots",
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Traffic shares per backend for each balancer against the capacity ratio; p99 per balancer."""
    paths: list[Path] = []
    rows = {row["variant"]: row for row in result.rows}
    groups = [f"{s:g}x" for s in SPEEDS]
    series = {"capacity ratio": ideal_shares()}
    series.update({v: [row[f"share_{s:g}x_pct"] for s in SPEEDS] for v, row in rows.items()})
    name = result.name
    path = out / f"{name}_shares.png"
    if bar_chart(path, "S12: share of requests per backend (capacity 1x/2x/4x)", groups, series, "%"):
        paths.append(path)
    path = out / f"{name}_latency.png"
    lat = {v: [row["p50_ms"], row["p99_ms"], row["p999_ms"]] for v, row in rows.items()}
    if bar_chart(path, "S12: latency at 70% of capacity", ["p50", "p99", "p99.9"], lat, "ms", log=True):
        paths.append(path)
    return paths
