"""S5 -- total outage: how much extra load retries add, one layer and across a three-process chain.

Every backend fails (fast 503s, or refused connections) for the whole run. Open loop, 200 requests/s for
one layer and 100 requests/s for the chain (whose two Python tiers share the server CPU with the
backends), ``MESHLIB_TIMEOUT=1s`` at the top.

* **one layer**: an ``AsyncClient`` -> 5 backends.
* **chain**: the harness (A, an ``AsyncClient``) -> B -> C -> 5 backends, where B and C are separate
  processes (:mod:`benchmarks.tier`: uvicorn + ``meshlib.server.DeadlineMiddleware`` + ``AsyncClient``),
  so each layer retries on its own and the deadline travels as ``grpc-timeout``.

Each configuration runs with meshlib's defaults and again with breakers and outlier ejection switched off
(``MESHLIB_BREAKER_FAILURES`` and ``MESHLIB_OUTLIER_FAILURES`` set very high), which leaves the retry budget
alone to limit amplification. Tiers are restarted for every run so no breaker state carries over.

Amplification = attempts that reached the bottom / requests the top sent. "Late" = attempts that arrived
at any layer after the top caller's deadline (each request carries it as ``x-bench-deadline``, a
``time.monotonic()`` value: the clock is system-wide on Linux).

Targets (issue 6): amplification <= 1.1x end to end; zero attempts started after the deadline.
Anchors: naive 3 retries per layer = 4x per layer, 64x over 3 layers (Google SRE); a 10% budget ~1.1x.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import meshlib
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median_row
from benchmarks.load import Outcome, open_async
from benchmarks.report import bar_chart
from benchmarks.s3_slow_backend import outcome_of, outcome_of_error
from benchmarks.servers import BackendProcess, TierProcess
from benchmarks.tier import CountingTransport

RATE = 200.0
#: The chain runs at half the rate: B and C are Python processes sharing the one server CPU with the
#: backends, and at 200 requests/s they saturate it, which measures queueing rather than retries.
CHAIN_RATE = 100.0
TIMEOUT = 1.0
BUDGET_ONLY = {"MESHLIB_BREAKER_FAILURES": "1000000", "MESHLIB_OUTLIER_FAILURES": "1000000"}
BUDGET_10 = {**BUDGET_ONLY, "MESHLIB_RETRY_BUDGET_PERCENT": "10%"}
#: name -> (failure mode, chain?, extra MESHLIB_* settings for every layer)
CONFIGS: dict[str, tuple[str, bool, dict[str, str]]] = {
    "1 layer, 503": ("503", False, {}),
    "1 layer, refused": ("refused", False, {}),
    "1 layer, 503, budget only": ("503", False, BUDGET_ONLY),
    "1 layer, 503, budget only 10%": ("503", False, BUDGET_10),
    "3 layers, 503": ("503", True, {}),
    "3 layers, 503, budget only": ("503", True, BUDGET_ONLY),
}


async def _drive(target: str, env: dict[str, str], duration: float, rate: float) -> tuple[int, CountingTransport]:
    """Open-loop load from the top (A); returns the requests sent and A's attempt counter."""
    counter = CountingTransport()
    async with meshlib.AsyncClient(
        services={"bench": target}, environ={"MESHLIB_TIMEOUT": "1s", **env}, transport=counter
    ) as client:

        async def send() -> Outcome:
            deadline = time.monotonic() + TIMEOUT
            response = await client.get("http://bench/", headers={"x-bench-deadline": repr(deadline)})
            return outcome_of(response)

        result = await open_async(send, outcome_of_error, rate=rate, duration=duration)
    await counter.aclose()
    return len(result.latency), counter


def _late(records: list[tuple[float, str | None]]) -> int:
    return sum(1 for received, deadline in records if deadline is not None and received > float(deadline))


def _run_once(backends: BackendProcess, ctx: Context, name: str, duration: float) -> dict[str, Any]:
    mode, chain, env = CONFIGS[name]
    backends.reset()
    if mode == "503":
        backends.set(None, status=503, body_size=16)
    else:
        for i in range(len(backends.ports)):
            backends.refuse(i)
    bottom_target = "static://" + ",".join(backends.addresses)
    try:
        with contextlib.ExitStack() as stack:
            tiers: list[TierProcess] = []
            target = bottom_target
            if chain:
                c = stack.enter_context(TierProcess(bottom_target, env, ctx.pinning.server_prefix))
                b = stack.enter_context(TierProcess(f"static://{c.address}", env, ctx.pinning.server_prefix))
                tiers = [b, c]
                target = f"static://{b.address}"
            requests, top = asyncio.run(_drive(target, env, duration, CHAIN_RATE if chain else RATE))
            stats = [t.stats() for t in tiers]
    finally:
        for i in range(len(backends.ports)):
            backends.accept(i)
        backends.set(None, status=200, body_size=16)
    # Attempts toward the backends: the last meshlib layer's attempt counter (refused connects included).
    bottom = stats[-1]["attempts"] if chain else top.attempts
    late_arrivals = _late(backends.records(None, "x-bench-deadline")) + sum(s["late_arrivals"] for s in stats)
    return {
        "requests": requests,
        "a_attempts": top.attempts,
        "b_attempts": stats[0]["attempts"] if chain else float("nan"),
        "c_attempts": stats[1]["attempts"] if chain else float("nan"),
        "backend_received": sum(backends.counts()),
        "amplification": bottom / requests,
        "late_starts": top.late + sum(s["late_starts"] for s in stats),
        "late_starts_abc": "/".join(str(x) for x in [top.late, *(s["late_starts"] for s in stats)]),
        "late_arrivals": late_arrivals,
    }


def run(ctx: Context) -> ScenarioResult:
    """Every configuration, repeated; medians of the per-run amplification."""
    duration = ctx.scale(4.0, 2.0)
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    with BackendProcess(5, {"status": 503, "body_size": 16}, ctx.pinning.server_prefix) as backends:
        names = list(CONFIGS)
        runs = interleave(names, ctx.repeats, lambda name, r: _run_once(backends, ctx, name, duration))
    for name in names:
        row = {"config": name, **median_row(runs[name])}
        row["late_starts"] = sum(r["late_starts"] for r in runs[name])
        row["late_arrivals"] = sum(r["late_arrivals"] for r in runs[name])
        row["max_amplification"] = max(r["amplification"] for r in runs[name])
        rows.append(row)
        checks.append(
            Check(
                f"amplification, {name}",
                "<= 1.1x",
                row["max_amplification"],
                row["max_amplification"] <= 1.1,
                "x",
                "worst run",
            )
        )
    late = sum(r["late_starts"] for r in rows)
    checks.append(Check("attempts started after the deadline, all layers", "0", float(late), late == 0))
    return ScenarioResult(
        "s5",
        "total outage: retry amplification, 1 layer (200 rps) and A -> B -> C chain (100 rps)",
        [
            "config",
            "requests",
            "a_attempts",
            "b_attempts",
            "c_attempts",
            "backend_received",
            "amplification",
            "max_amplification",
            "late_starts",
            "late_starts_abc",
            "late_arrivals",
        ],
        rows,
        checks,
        notes=[
            f"{duration:.0f}s runs, {ctx.repeats} interleaved repeats; medians (late_*: sums; max_amplification: "
            "worst run)",
            "x_attempts: attempts layer x started (its meshlib client's inner-transport calls, refused connects "
            "included); amplification = attempts of the last layer / requests of A",
            "budget only: breakers and outlier ejection off, so only the retry budget (default 20% + 10/s; "
            "or 10%) limits retries",
            "late_starts: attempts started after the top deadline (the target), late_starts_abc per layer "
            "(first repeat); late_arrivals: requests that "
            "reached a tier or backend after it (queueing in a busy receiver, not a meshlib decision)",
            "tiers answer 503 when their own call fails, as an ordinary service would",
        ],
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Amplification per configuration."""
    groups = [r["config"].replace(", ", "\n") for r in result.rows]
    values = {"meshlib": [r["amplification"] for r in result.rows]}
    path = out / "s5_amplification.png"
    ok = bar_chart(path, "S5: attempts at the bottom per top-level request (total outage)", groups, values, "x")
    return [path] if ok else []
