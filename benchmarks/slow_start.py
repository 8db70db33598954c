"""Slow start (issue 16): a new endpoint's share of traffic over its slow-start window, per balancer.

``python -m benchmarks slowstart``. Pure simulation on injected time, no sockets and no wall clock: four warm
endpoints and one that joined at t=0; at each point of the window the clock is stopped and a closed loop keeps
20 requests in flight (oldest finishes first, every endpoint answering alike) while 6,000 picks are counted, so
the load-aware balancers (``p2c_ewma``, ``least_request``) see load. Its steady share is 20 %. A second
``p2c_ewma`` series has the warm endpoints measured at 100 ms while the newcomer is unmeasured (assumed to answer
in ``default_rtt``, 30 ms): the flood slow start exists to prevent.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from pathlib import Path

from benchmarks.harness import Check, Context, ScenarioResult
from benchmarks.report import line_chart
from meshlib.balance import make_balancer
from meshlib.balance.base import BalancerOptions, EndpointStats
from meshlib.balance.slow_start import SlowStart, slow_start_factor
from meshlib.discovery.base import Endpoint

BALANCERS = ("p2c_ewma", "least_request", "round_robin", "random")
WINDOW = 60.0
WARM = 4
CONCURRENCY = 20


class _Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def share(name: str, elapsed: float, picks: int, *, warm_rtt: float | None = None, on: bool = True) -> float:
    """The newcomer's share of ``picks`` made ``elapsed`` seconds after it joined (module docstring)."""
    clock = _Clock(1000.0 + elapsed)
    warm = [EndpointStats(Endpoint(f"10.0.0.{i}", 80), clock=clock) for i in range(WARM)]
    if warm_rtt is not None:
        for s in warm:
            s.begin()
            s.end(warm_rtt, clock.t)
    new = EndpointStats(Endpoint("10.0.0.99", 80), clock=clock)
    new.joined_at = 1000.0
    options = BalancerOptions(slow_start=SlowStart(window=WINDOW if on else 0.0))
    picker = make_balancer(name, options, clock=clock, rng=random.Random(11)).build([*warm, new])
    flight: deque[EndpointStats] = deque()
    counts: Counter[EndpointStats] = Counter()
    for _ in range(picks):
        if len(flight) >= CONCURRENCY:
            flight.popleft().end(0.010, clock.t)
        chosen = picker.pick()
        assert chosen is not None
        chosen.begin()
        flight.append(chosen)
        counts[chosen] += 1
    return 100.0 * counts[new] / picks


def measure(picks: int = 6000, step: float = 0.05) -> ScenarioResult:
    """Every balancer's newcomer share at each ``step`` of the window, to 1.2 windows."""
    points = [round(i * step, 4) for i in range(int(1.2 / step) + 1)]
    series: dict[str, list[float]] = {"fraction": points}
    for name in BALANCERS:
        series[name] = [share(name, p * WINDOW, picks) for p in points]
    series["p2c_ewma, peers at 100 ms"] = [share("p2c_ewma", p * WINDOW, picks, warm_rtt=0.1) for p in points]
    flood = share("p2c_ewma", 0.0, picks, warm_rtt=0.1, on=False)
    ideal = SlowStart(window=WINDOW)
    series["weight x factor"] = [100.0 * f / (WARM + f) for f in (slow_start_factor(ideal, p * WINDOW) for p in points)]
    rows = []
    checks = []
    at = {p: i for i, p in enumerate(points)}
    for name in (*BALANCERS, "p2c_ewma, peers at 100 ms"):
        values = series[name]
        steady = values[-1]
        row = {"balancer": name, **{f"{int(p * 100)}%": round(values[at[p]], 2) for p in (0.1, 0.5, 0.9, 1.0)}}
        rows.append(row)
        inside = [v for p, v in zip(points, values, strict=True) if p < 1.0]
        over = max(inside) - steady
        rising = values[at[0.1]] < values[at[0.5]] < values[at[0.9]]
        checks.append(
            Check(
                f"{name}: ramps, never above steady",
                "rising; <= steady + 1 pt",
                over,
                rising and over <= 1.0,
                " pt",
                f"10/50/90% of window: {row['10%']}/{row['50%']}/{row['90%']}%, steady {steady:.2f}%",
            )
        )
    rows.append({"balancer": "p2c_ewma, peers at 100 ms, slow start off", "10%": round(flood, 2)})
    return ScenarioResult(
        "slowstart",
        f"slow start: a new endpoint's share (%) over a {WINDOW:g} s window, {WARM} warm peers",
        ["balancer", "10%", "50%", "90%", "100%"],
        rows,
        checks,
        notes=[
            f"simulated on injected time: {picks} picks per point, {CONCURRENCY} in flight, seeded RNG",
            "aggression 1.0, min_weight_percent 10 (Envoy's defaults); steady share 20%",
            f"without slow start, p2c_ewma gives the unmeasured newcomer {flood:.1f}% when its peers measure 100 ms",
        ],
        series=series,
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks slowstart`` runs it."""
    return measure(picks=int(ctx.scale(6000, 2000)), step=ctx.scale(0.05, 0.1))


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """The newcomer's share against time in its window, one line per balancer."""
    path = out / "slow_start.png"
    xs = [p * 100.0 for p in result.series["fraction"]]
    lines = {name: (xs, ys) for name, ys in result.series.items() if name != "fraction"}
    ok = line_chart(
        path,
        "Slow start: a new endpoint's share of requests (4 warm peers; steady share 20%)",
        lines,
        "time since it joined (% of the slow-start window)",
        "share of requests (%)",
        spans=[(0.0, 100.0, "slow-start window")],
    )
    return [path] if ok else []
