"""S8 -- hedging: how much of a stall tail a budgeted hedge cuts, what it costs, and where it must not act.

Six :mod:`meshlib.testing` backends (own process, server CPU) answer after a small base latency (lognormal,
median 2 ms, sigma 0.25); 2 % of requests, a seeded draw per backend, stall 250 ms instead (a GC pause, a cold
cache: any endpoint, any time). An ``AsyncClient`` sends an open-loop 200 requests/s (:func:`benchmarks.load.
open_async`, latency from each request's intended start). Three parts, each variant with a fresh client:

* **tail** (interleaved repeats): ``no hedging`` vs ``hedge p95`` (``MESHLIB_HEDGE_MAX_ATTEMPTS=2``,
  ``MESHLIB_HEDGE_DELAY=p95``: the delay is the service's observed p95, the default 5 % extra-load budget)
  vs ``hedge 30ms`` (a fixed delay). Each run first sends a warmup (3 s; discarded) so the latency window
  holds its 100 samples and the budget its first deposits, then measures. Latency percentiles are pooled over
  the repeats (p99.9 of ~9,000 requests). Extra attempts = what the backends received (their own counters,
  independent of meshlib) minus requests sent, as a share of requests. Hedges sent/won/cancelled and refused
  by the budget come from meshlib's OpenTelemetry counters (``meshlib.client.hedges.*``, an in-memory reader).
* **outage**: S5's total outage (every backend answers 503) with hedging on and breakers and outlier ejection
  off (S5's "budget only"): a 503 is non-fatal, so each one calls for the next hedge at once; only the hedge
  budget (and the retry budget behind it) limits them. Amplification = backend requests / caller requests.
* **POST**: the same stall load as POSTs, each carrying a unique ``x-bench-id``, hedging on with an aggressive
  fixed delay (5 ms, 3 attempts) and no opt-in: the backends' recorded requests must show no id twice. The
  same load with ``MESHLIB_HEDGE_NON_IDEMPOTENT=true`` is the control: it shows the check can see duplicates.

Targets (issue 15): p99 <= 0.3x and p99.9 <= 0.5x of the no-hedging run; extra attempts <= 5 % of requests;
outage amplification <= 1.3x; 0 duplicate non-idempotent requests.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import meshlib
from benchmarks.harness import Check, Context, Histogram, ScenarioResult, interleave, median_row
from benchmarks.load import Outcome, open_async
from benchmarks.report import bar_chart
from benchmarks.s3_slow_backend import outcome_of, outcome_of_error
from benchmarks.s5_outage import BUDGET_ONLY
from benchmarks.servers import BackendProcess

BACKENDS = 6
RATE = 200.0
STALL_SHARE = 0.02
STALL_SECONDS = 0.250
STALLY = {"lognormal": [0.002, 0.25], "stall": [STALL_SHARE, STALL_SECONDS], "body_size": 64}
TIMEOUT = "2s"
ID_HEADER = "x-bench-id"
HEDGE_COUNTERS = ("sent", "won", "cancelled", "budget_exhausted")

#: Tail variants: name -> MESHLIB_* settings of the client.
VARIANTS: dict[str, dict[str, str]] = {
    "no hedging": {},
    "hedge p95": {"MESHLIB_HEDGE_MAX_ATTEMPTS": "2", "MESHLIB_HEDGE_DELAY": "p95"},
    "hedge 30ms": {"MESHLIB_HEDGE_MAX_ATTEMPTS": "2", "MESHLIB_HEDGE_DELAY": "30ms"},
}
#: Outage variants (every backend 503, breakers and ejection off).
OUTAGES: dict[str, dict[str, str]] = {
    "outage, hedge p95 x2": {**BUDGET_ONLY, "MESHLIB_HEDGE_MAX_ATTEMPTS": "2", "MESHLIB_HEDGE_DELAY": "p95"},
    "outage, hedge 30ms x5": {**BUDGET_ONLY, "MESHLIB_HEDGE_MAX_ATTEMPTS": "5", "MESHLIB_HEDGE_DELAY": "30ms"},
}
_POST_HEDGE = {"MESHLIB_HEDGE_MAX_ATTEMPTS": "3", "MESHLIB_HEDGE_DELAY": "5ms"}
#: POST variants: name -> (settings, is the target checked on it).
POSTS: dict[str, tuple[dict[str, str], bool]] = {
    "POST, hedging on, no opt-in": (_POST_HEDGE, True),
    "POST, opt-in (control)": ({**_POST_HEDGE, "MESHLIB_HEDGE_NON_IDEMPOTENT": "true"}, False),
}


# --------------------------------------------------------------------------------------------- counters


class HedgeMeter:
    """meshlib's ``meshlib.client.hedges.*`` counters of one client, read through an in-memory OpenTelemetry reader.

    Without the OpenTelemetry SDK (or before hedging reports them) every reading is NaN: the scenario still
    runs and reports the backends' counts.
    """

    def __init__(self) -> None:
        self.provider: Any = None
        self._reader: Any = None
        try:
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        except ImportError:  # pragma: no cover - the SDK is in the bench extra
            return
        self._reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self._reader])

    def read(self) -> dict[str, float]:
        """Cumulative value of each hedge counter so far (NaN where nothing was reported)."""
        found: dict[str, float] = {}
        data = self._reader.get_metrics_data() if self._reader is not None else None
        for resource in getattr(data, "resource_metrics", None) or ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    prefix, dot, key = metric.name.rpartition(".")
                    if dot and prefix.endswith(".hedges"):  # meshlib.client.hedges.<counter>
                        found[key] = found.get(key, 0.0) + sum(p.value for p in metric.data.data_points)
        return {key: found.get(key, math.nan) for key in HEDGE_COUNTERS}

    def shutdown(self) -> None:
        """Stop the provider (its reader holds no thread, but be tidy)."""
        if self.provider is not None:
            self.provider.shutdown()


def _delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: after[k] - (0.0 if math.isnan(before[k]) else before[k]) for k in HEDGE_COUNTERS}


# --------------------------------------------------------------------------------------------- one run


async def _load(
    target: str,
    env: Mapping[str, str],
    *,
    rate: float,
    duration: float,
    warmup: float,
    backends: BackendProcess,
    method: str = "GET",
) -> tuple[Any, dict[str, float]]:
    """Warm up (discarded), zero the backends' counters, then measure; returns the open-loop result and the
    hedge counters of the measured part."""
    meter = HedgeMeter()
    counter = iter(range(1 << 62))
    try:
        async with meshlib.AsyncClient(
            services={"bench": target},
            environ={"MESHLIB_TIMEOUT": TIMEOUT, **env},
            meter_provider=meter.provider,
        ) as client:

            async def send() -> Outcome:
                if method == "GET":
                    response = await client.get("http://bench/")
                else:
                    response = await client.post(
                        "http://bench/", headers={ID_HEADER: str(next(counter))}, content=b"order"
                    )
                return outcome_of(response)

            if warmup > 0:
                await open_async(send, outcome_of_error, rate=rate, duration=warmup)
            backends.reset()
            before = meter.read()
            result = await open_async(send, outcome_of_error, rate=rate, duration=duration)
            hedges = _delta(meter.read(), before)
    finally:
        meter.shutdown()
    return result, hedges


def _tail_run(
    backends: BackendProcess, env: Mapping[str, str], rate: float, duration: float, warmup: float
) -> tuple[dict[str, Any], Histogram]:
    backends.set(None, **STALLY)
    target = "static://" + ",".join(backends.addresses)
    result, hedges = asyncio.run(_load(target, env, rate=rate, duration=duration, warmup=warmup, backends=backends))
    requests = len(result.latency)
    received = sum(backends.counts())
    hist = result.hist()
    p50, p99, p999 = hist.percentiles((50, 99, 99.9))
    return {
        "requests": requests,
        "errors": requests - sum(result.ok),
        "backend_requests": received,
        "extra": received - requests,
        "extra_pct": 100.0 * (received - requests) / requests,
        "p50_ms": p50 * 1e3,
        "p99_ms": p99 * 1e3,
        "p999_ms": p999 * 1e3,
        "max_ms": max(result.latency) * 1e3,
        "attempts_mean": result.mean_attempts(),
        "hedges_sent": hedges["sent"],
        "hedges_won": hedges["won"],
        "cancelled": hedges["cancelled"],
        "budget_refused": hedges["budget_exhausted"],
        "hangups": sum(backends.hangups()),
        "client_cpu_us": result.cpu.client / requests * 1e6,
    }, hist


def _outage_run(backends: BackendProcess, env: Mapping[str, str], rate: float, duration: float) -> dict[str, Any]:
    backends.set(None, status=503, body_size=16)
    target = "static://" + ",".join(backends.addresses)
    try:
        result, hedges = asyncio.run(_load(target, env, rate=rate, duration=duration, warmup=0.0, backends=backends))
    finally:
        backends.set(None, **STALLY)
    requests = len(result.latency)
    received = sum(backends.counts())
    return {
        "requests": requests,
        "backend_requests": received,
        "amplification": received / requests,
        "hedges_sent": hedges["sent"],
        "budget_refused": hedges["budget_exhausted"],
    }


def _post_run(backends: BackendProcess, env: Mapping[str, str], rate: float, duration: float) -> dict[str, Any]:
    backends.set(None, **STALLY)
    target = "static://" + ",".join(backends.addresses)
    result, hedges = asyncio.run(
        _load(target, env, rate=rate, duration=duration, warmup=0.0, backends=backends, method="POST")
    )
    ids = [value for _, value in backends.records(None, ID_HEADER) if value is not None]
    requests = len(result.latency)
    return {
        "requests": requests,
        "backend_requests": sum(backends.counts()),
        "recorded_ids": len(ids),
        "duplicates": len(ids) - len(set(ids)),
        "hedges_sent": hedges["sent"],
        "p99_ms": result.hist().percentiles((99,))[0] * 1e3,
    }


# --------------------------------------------------------------------------------------------- scenario


def _pooled_row(name: str, runs: Sequence[dict[str, Any]], hist: Histogram) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, **median_row(runs)}
    p50, p99, p999 = hist.percentiles((50, 99, 99.9))
    requests = sum(r["requests"] for r in runs)
    extra = sum(r["extra"] for r in runs)
    row.update(
        {
            "requests": requests,
            "errors": sum(r["errors"] for r in runs),
            "p50_ms": p50 * 1e3,
            "p99_ms": p99 * 1e3,
            "p999_ms": p999 * 1e3,
            "extra_pct": 100.0 * extra / requests,
            "worst_extra_pct": max(r["extra_pct"] for r in runs),
        }
    )
    for key in ("hedges_sent", "hedges_won", "cancelled", "budget_refused", "hangups"):
        row[key] = sum(r[key] for r in runs)
    return row


def measure(
    prefix: Sequence[str] = (),
    *,
    repeats: int = 3,
    rate: float = RATE,
    duration: float = 15.0,
    warmup: float = 3.0,
    outage_duration: float = 4.0,
    post_duration: float = 4.0,
) -> ScenarioResult:
    """The three parts with these sizes (``python -m benchmarks s8`` passes the full ones; tests tiny ones)."""
    hists: dict[str, Histogram] = {name: Histogram() for name in VARIANTS}
    with BackendProcess(BACKENDS, STALLY, prefix) as backends:

        def tail(name: str, repeat: int) -> dict[str, Any]:
            row, hist = _tail_run(backends, VARIANTS[name], rate, duration, warmup)
            hists[name].merge(hist)
            return row

        tails = interleave(list(VARIANTS), repeats, tail)
        outages = interleave(
            list(OUTAGES), repeats, lambda name, r: _outage_run(backends, OUTAGES[name], rate, outage_duration)
        )
        posts = interleave(
            list(POSTS), repeats, lambda name, r: _post_run(backends, POSTS[name][0], rate, post_duration)
        )

    rows = [_pooled_row(name, tails[name], hists[name]) for name in VARIANTS]
    base = rows[0]
    checks: list[Check] = []
    for row in rows[1:]:
        name = row["variant"]
        p99_ratio = row["p99_ms"] / base["p99_ms"]
        p999_ratio = row["p999_ms"] / base["p999_ms"]
        row["p99_ratio"], row["p999_ratio"] = p99_ratio, p999_ratio
        checks += [
            Check(
                f"{name}: p99 / no-hedging p99",
                "<= 0.3x",
                p99_ratio,
                p99_ratio <= 0.3,
                "x",
                f"{row['p99_ms']:.1f} ms vs {base['p99_ms']:.1f} ms",
            ),
            Check(
                f"{name}: p99.9 / no-hedging p99.9",
                "<= 0.5x",
                p999_ratio,
                p999_ratio <= 0.5,
                "x",
                f"{row['p999_ms']:.1f} ms vs {base['p999_ms']:.1f} ms",
            ),
            Check(
                f"{name}: extra attempts",
                "<= 5%",
                row["extra_pct"],
                row["extra_pct"] <= 5.0,
                "%",
                f"pooled; worst run {row['worst_extra_pct']:.2f}%",
            ),
        ]
    for name in OUTAGES:
        runs = outages[name]
        worst = max(r["amplification"] for r in runs)
        row = {"variant": name, **median_row(runs), "max_amplification": worst}
        row["requests"] = sum(r["requests"] for r in runs)
        row["backend_requests"] = sum(r["backend_requests"] for r in runs)
        row["hedges_sent"] = sum(r["hedges_sent"] for r in runs)
        row["budget_refused"] = sum(r["budget_refused"] for r in runs)
        rows.append(row)
        checks.append(Check(f"{name}: amplification", "<= 1.3x", worst, worst <= 1.3, "x", "worst run"))
    for name, (_, checked) in POSTS.items():
        runs = posts[name]
        row = {"variant": name, **median_row(runs)}
        for key in ("requests", "backend_requests", "recorded_ids", "duplicates", "hedges_sent"):
            row[key] = sum(r[key] for r in runs)
        rows.append(row)
        if checked:
            dupes = float(row["duplicates"])
            note = f"{row['recorded_ids']} ids recorded for {row['requests']} requests"
            checks.append(Check(f"{name}: duplicate POSTs", "0", dupes, dupes == 0, "", note))
    return ScenarioResult(
        "s8",
        f"hedging: {BACKENDS} backends, {STALL_SHARE:.0%} of requests stall {STALL_SECONDS * 1e3:.0f} ms, "
        f"{rate:.0f} rps open loop",
        [
            "variant",
            "requests",
            "errors",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "p99_ratio",
            "p999_ratio",
            "extra_pct",
            "worst_extra_pct",
            "hedges_sent",
            "hedges_won",
            "cancelled",
            "budget_refused",
            "hangups",
            "client_cpu_us",
            "amplification",
            "max_amplification",
            "duplicates",
        ],
        rows,
        checks,
        notes=[
            f"tail: {duration:.0f} s measured after a {warmup:.0f} s warmup per run, {repeats} interleaved repeats; "
            "percentiles and extra attempts pooled over the repeats, counters summed",
            "extra_pct = (requests the backends received - requests sent) / requests sent (backend counters); "
            "hedges_*/cancelled/budget_refused: meshlib.client.hedges.* counters; hangups: requests whose client hung "
            "up before the answer (cancelled losers); client_cpu_us: the client process's CPU per request (median run)",
            f"outage: every backend 503, breakers and ejection off, {outage_duration:.0f} s, no warmup; "
            "amplification = backend requests / caller requests (worst run checked)",
            f"POST: {post_duration:.0f} s of stall load as POSTs with a unique {ID_HEADER}; hedging 3 attempts "
            "at 5 ms; duplicates = ids the backends recorded more than once (the control opts in)",
        ],
    )


def run(ctx: Context) -> ScenarioResult:
    """Full sizes, or ``--quick`` ones."""
    return measure(
        ctx.pinning.server_prefix,
        repeats=ctx.repeats,
        duration=ctx.scale(15.0, 4.0),
        warmup=ctx.scale(3.0, 1.5),
        outage_duration=ctx.scale(4.0, 2.0),
        post_duration=ctx.scale(4.0, 2.0),
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """p50 / p99 / p99.9 per tail variant (log scale)."""
    rows = [r for r in result.rows if r["variant"] in VARIANTS]
    groups = [r["variant"] for r in rows]
    values = {
        "p50": [r["p50_ms"] for r in rows],
        "p99": [r["p99_ms"] for r in rows],
        "p99.9": [r["p999_ms"] for r in rows],
    }
    path = out / "s8_hedging.png"
    title = "S8: latency with 2% of requests stalling 250 ms (open loop, 200 rps)"
    ok = bar_chart(path, title, groups, values, "ms", log=True)
    return [path] if ok else []
