"""S2 -- meshlib against a local sidecar: httpx -> HAProxy -> nginx vs meshlib -> nginx.

Path A is what a sidecar mesh does: the application's plain httpx client talks to a local HAProxy (Debian,
HTTP mode, keep-alive both sides, one thread, round robin), which balances over the backends. Path B is
meshlib balancing in-process (P2C peak EWMA, all policies on). Raw httpx straight to one nginx port is
measured too, as the client's own floor. All run against the same nginx process serving ``n`` ports (2 and
10 backends), sync ``Client``, closed loop at concurrency 1 (latency) and 16 (throughput). CPU per request
counts the client (getrusage) plus the proxy (/proc) -- the cost a sidecar adds to every pod; nginx's CPU
is the same work in every path and is reported apart.

Targets (issue 6): meshlib lower latency at p50 and p99, and lower total CPU per request (client + proxy).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import httpx

import meshlib
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median, median_row, ratio
from benchmarks.load import closed_sync
from benchmarks.report import bar_chart
from benchmarks.servers import HAProxy, Nginx

VARIANTS = ("httpx+haproxy", "meshlib", "httpx direct")
#: The two paths compared; "httpx direct" (raw httpx to the first nginx port, no balancing) is a reference
#: that shows what the client alone costs, so a tail both direct paths share is not blamed on the mesh.
COMPARED = VARIANTS[:2]


def _run(variant: str, nginx: Nginx, proxy: HAProxy, concurrency: int, duration: float) -> dict[str, Any]:
    if variant == "meshlib":
        target = "static://" + ",".join(nginx.addresses)
        client: httpx.Client = meshlib.Client(services={"bench": target}, environ={})
        url = "http://bench/"
    elif variant == "httpx direct":
        client = httpx.Client()
        url = f"http://{nginx.addresses[0]}/"
    else:
        client = httpx.Client()
        url = f"http://127.0.0.1:{proxy.port}/"

    def send() -> None:
        if client.get(url).status_code != 200:
            raise RuntimeError("bad status")

    with client:
        result = closed_sync(
            send, concurrency=concurrency, duration=duration, pids={"proxy": proxy.pid, "nginx": nginx.pid}
        )
    s = result.hist.summary_us()
    proxy_cpu = result.cpu_us_per_request("proxy") if variant == "httpx+haproxy" else 0.0
    client_cpu = result.cpu_us_per_request()
    return {
        "rps": result.rps,
        "client_cpu_us": client_cpu,
        "proxy_cpu_us": proxy_cpu,
        "total_cpu_us": client_cpu + proxy_cpu,
        "nginx_cpu_us": result.cpu_us_per_request("nginx"),
        "p50_us": s["p50_us"],
        "p99_us": s["p99_us"],
        "p999_us": s["p999_us"],
        "errors": result.errors,
    }


def _one(variant: str, repeat: int, *, nginx: Nginx, proxy: HAProxy, c: int, d: float) -> dict[str, Any]:
    return _run(variant, nginx, proxy, c, d)


def run(ctx: Context) -> ScenarioResult:
    """2 and 10 backends x concurrency 1 and 16, HAProxy path vs meshlib, interleaved."""
    duration = ctx.scale(2.0, 0.4)
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    series: dict[str, Any] = {}
    for n in (2, 10):
        with Nginx(n, ctx.pinning.server_prefix) as nginx, HAProxy(nginx.addresses, ctx.pinning.server_prefix) as proxy:
            for concurrency in (1, 16):
                name = f"{n} backends c={concurrency}"
                one = functools.partial(_one, nginx=nginx, proxy=proxy, c=concurrency, d=duration)
                runs = interleave(VARIANTS, ctx.repeats, one)
                rows.extend({"config": name, "variant": v, **median_row(runs[v])} for v in VARIANTS)
                pairs = list(zip(runs["meshlib"], runs["httpx+haproxy"], strict=True))
                p50_gain = median(h["p50_us"] - m["p50_us"] for m, h in pairs)
                p99_gain = median(h["p99_us"] - m["p99_us"] for m, h in pairs)
                cpu_ratio = median(ratio(m["total_cpu_us"], h["total_cpu_us"]) for m, h in pairs)
                rps_ratio = median(ratio(m["rps"], h["rps"]) for m, h in pairs)
                rows.append(
                    {
                        "config": name,
                        "variant": "meshlib vs proxy",
                        "rps": rps_ratio,
                        "total_cpu_us": cpu_ratio,
                        "p50_us": -p50_gain,
                        "p99_us": -p99_gain,
                    }
                )
                series[name] = {"p50_gain_us": p50_gain, "p99_gain_us": p99_gain, "cpu_ratio": cpu_ratio}
                checks.append(Check(f"p50 below proxy path, {name}", "> 0 µs", p50_gain, p50_gain > 0, " µs"))
                checks.append(Check(f"p99 below proxy path, {name}", "> 0 µs", p99_gain, p99_gain > 0, " µs"))
                checks.append(Check(f"total CPU/request ratio, {name}", "< 1.0x", cpu_ratio, cpu_ratio < 1.0, "x"))
    return ScenarioResult(
        "s2",
        "meshlib vs httpx -> HAProxy sidecar -> nginx",
        [
            "config",
            "variant",
            "rps",
            "client_cpu_us",
            "proxy_cpu_us",
            "total_cpu_us",
            "nginx_cpu_us",
            "p50_us",
            "p99_us",
            "p999_us",
            "errors",
        ],
        rows,
        checks,
        notes=[
            "httpx direct: raw httpx to one nginx port, no proxy, no balancing: the client's own floor "
            "(at c=16 its tail is the 16 client threads sharing one CPU and the GIL)",
            "nginx_cpu_us is not in total_cpu_us: nginx does the same work on both paths (it measures lower "
            "behind HAProxy, which shares its CPU and wakes it without a cross-CPU wakeup)",
            "'meshlib vs proxy' rows: rps and total_cpu_us are meshlib/proxy-path ratios; "
            "p50_us/p99_us are meshlib minus proxy path (negative = meshlib faster)",
            f"{ctx.repeats} interleaved repeats of {duration}s; medians; sync Client, closed loop",
        ],
        series=series,
    )


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """Total CPU per request and p50 of both paths per config."""
    groups = [r["config"] for r in result.rows if r["variant"] == "meshlib"]
    paths = []
    for metric, label in (("total_cpu_us", "µs CPU / request (client + proxy)"), ("p50_us", "p50 latency (µs)")):
        values = {
            v: [next(r[metric] for r in result.rows if r["config"] == g and r["variant"] == v) for g in groups]
            for v in COMPARED
        }
        path = out / f"s2_{metric}.png"
        if bar_chart(path, f"S2: {label}, HAProxy sidecar vs meshlib", groups, values, label):
            paths.append(path)
    return paths
