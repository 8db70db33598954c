"""Z2 -- one caller floods a rate-limited server; do the others still get through?

Issue 12's target: *others keep at least 99% success while one caller floods*. A real uvicorn server
(:mod:`benchmarks.limited`, its own process, on loopback) runs
``ASGIInboundMiddleware(app, hooks=[PeerIdentityHook(resolve=<x-caller header>), RateLimitHook(limits)])`` with
limits read by :func:`~meshlib.security.ratelimit.parse_rate_limits` from a Linkerd ``HTTPLocalRateLimitPolicy``:
a per-identity limit (default 200 requests/s) and a total limit (default 2000 requests/s).

* **The flooder** (:mod:`benchmarks.flooder`, its own process): one identity, ``connections`` keep-alive
  connections sending back to back, as fast as the server answers.
* **The others**: ``callers`` well-behaved identities (default 5), each sending open loop at ``rate`` requests/s
  (default 20, well below its limit), latency measured from each request's intended start (no coordinated
  omission). Two variants: plain ``httpx.AsyncClient`` (success means a 200 on the *first* try), then
  ``meshlib.AsyncClient`` with its default retry policy, which honours ``Retry-After`` on a 429 (success after
  backoff; mean attempts reported).

Each variant runs a *quiet* phase (the others alone) then a *flood* phase (the others while the flooder floods),
``duration`` seconds each, against the same server: the latency ratio flood/quiet is measured minutes apart at
most. Reported per phase: the others' success share, 429s and errors, p50/p99 latency; the flooder's requests/s
answered, its 429 share and admitted requests/s; the server's CPU use.

What bounds the result: the server is one event loop on one core, and the flooder keeps it busy (its CPU use
is reported), so the others' latency in the flood phase is mostly queueing behind the flooder's requests in
that loop, not the limiter (a 429 costs a few µs of limiter work: ``python -m benchmarks.ratelimit``). Under
``python -m benchmarks`` the server runs on CPU 0 and this process and the flooder (which inherits its
affinity) share CPU 1; standalone the operating system places them (``--pin`` pins as the harness does).

``python -m benchmarks z2`` (``Z2_DURATION`` sets the phase length, default 10 s; ``--quick``: 3 s) or
``python -m benchmarks.z2_flood [--duration S] [--callers N] [--rate R] [--connections C] [--identity-rps N]
[--total-rps N] [--pin]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

import meshlib
from benchmarks.harness import Check, Context, CpuMeter, Histogram, ScenarioResult, pin_client, ratio, render_result
from benchmarks.load import OpenResult, Outcome, open_async
from benchmarks.report import bar_chart
from benchmarks.servers import ROOT, _child_env, _Process, free_ports, wait_listening

TARGET = 0.99
FLOODER = "spiffe://cluster.local/ns/load/sa/flooder"
VARIANTS = ("httpx, first try", "meshlib, retries")
PHASES = ("quiet", "flood")

LIMITS = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: bench, namespace: shop}}
spec:
  targetRef: {{group: policy.linkerd.io, kind: Server, name: bench-http}}
  total: {{requestsPerSecond: {total}}}
  identity: {{requestsPerSecond: {identity}}}
"""


@dataclasses.dataclass(frozen=True)
class Params:
    """What one run does (defaults: the full run)."""

    duration: float = 10.0
    callers: int = 5
    rate: float = 20.0
    connections: int = 4
    pipeline: int = 16
    nice: int = 10
    identity_rps: int = 200
    total_rps: int = 2000
    timeout: float = 10.0

    def validate(self) -> None:
        """Refuse parameters that cannot make a meaningful run, naming the value."""
        if self.duration <= 0 or self.callers < 1 or self.rate <= 0 or self.connections < 1 or self.pipeline < 1:
            raise ValueError(f"Z2 parameters must be positive: {self}")
        if self.rate * self.duration < 1:
            raise ValueError(f"Z2: rate x duration = {self.rate * self.duration:g}; each caller needs >= 1 request")


def caller_id(k: int) -> str:
    """The SPIFFE ID of well-behaved caller ``k``."""
    return f"spiffe://cluster.local/ns/shop/sa/caller-{k}"


class LimitedServer(_Process):
    """:mod:`benchmarks.limited` in its own process, with the limits written to a temporary file."""

    def __init__(self, params: Params, prefix: Sequence[str] = ()) -> None:
        self.params = params
        self.prefix = tuple(prefix)
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> LimitedServer:
        self._dir = tempfile.TemporaryDirectory(prefix="meshlib-z2-")
        limits = Path(self._dir.name) / "ratelimit.yaml"
        limits.write_text(LIMITS.format(total=self.params.total_rps, identity=self.params.identity_rps))
        self.port = free_ports(1)[0]
        command = [sys.executable, "-m", "benchmarks.limited", "--port", str(self.port), "--limits", str(limits)]
        self.proc = subprocess.Popen([*self.prefix, *command], cwd=ROOT, env=_child_env(), stdout=subprocess.DEVNULL)
        wait_listening([self.port], timeout=20, proc=self.proc)
        return self

    def _stop(self) -> None:
        super()._stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class Flooder:
    """:mod:`benchmarks.flooder` in its own process: connected at start, flooding from :meth:`go`."""

    def __init__(self, port: int, params: Params) -> None:
        command = [sys.executable, "-m", "benchmarks.flooder", "--port", str(port), "--caller", FLOODER]
        command += ["--connections", str(params.connections), "--duration", str(params.duration)]
        command += ["--pipeline", str(params.pipeline), "--nice", str(params.nice)]
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=_child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"flooder did not start (said {line!r}, exit status {self.proc.wait()})")

    def go(self) -> None:
        """Start flooding (for ``duration`` seconds)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        """The flooder's counts once it is done."""
        out, _ = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"flooder exited with {self.proc.returncode}")
        data: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return data

    def kill(self) -> None:
        """Stop it (by its pid) if it is still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _sender(variant: str, port: int, k: int, params: Params) -> tuple[Any, Callable[[], Any]]:
    """(client, send) for well-behaved caller ``k`` of ``variant``."""
    headers = {"x-caller": caller_id(k)}
    if variant == "httpx, first try":
        client: Any = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=params.timeout)

        async def send() -> Outcome:
            response = await client.get("/")
            return Outcome(response.status_code == 200, 1, str(response.status_code))

        return client, send
    services = {"limited": f"static://127.0.0.1:{port}"}
    client = meshlib.AsyncClient(services=services, headers=headers, environ={}, timeout=params.timeout)

    async def send_mesh() -> Outcome:
        response = await client.get("http://limited/")
        attempts = int(response.extensions.get("meshlib.attempts", 1))
        return Outcome(response.status_code == 200, attempts, str(response.status_code))

    return client, send_mesh


def _error(exc: BaseException) -> Outcome:
    return Outcome(False, 1, type(exc).__name__)


async def _others(senders: list[Callable[[], Any]], params: Params) -> list[OpenResult]:
    """Every well-behaved caller open loop at ``rate``, their schedules staggered evenly."""

    async def one(k: int, send: Callable[[], Any]) -> OpenResult:
        await asyncio.sleep(k / (params.rate * len(senders)))
        return await open_async(send, _error, rate=params.rate, duration=params.duration)

    return list(await asyncio.gather(*(one(k, s) for k, s in enumerate(senders))))


async def _variant(variant: str, server: LimitedServer, params: Params) -> dict[str, dict[str, Any]]:
    pairs = [_sender(variant, server.port, k, params) for k in range(params.callers)]
    senders = [send for _, send in pairs]
    phases: dict[str, dict[str, Any]] = {}
    try:
        for send in senders:  # connect and warm up
            await send()
        for phase in PHASES:
            flooder = Flooder(server.port, params) if phase == "flood" else None
            try:
                meter = CpuMeter({"server": server.pid})
                meter.start()
                if flooder is not None:
                    flooder.go()
                started = time.perf_counter()
                results = await _others(senders, params)
                elapsed = time.perf_counter() - started
                meter.stop()
                flood = flooder.result(timeout=params.duration + 30) if flooder is not None else None
            finally:
                if flooder is not None:
                    flooder.kill()
            phases[phase] = _summarise(results, flood, meter.servers["server"] / elapsed, meter.client / elapsed)
    finally:
        for client, _ in pairs:
            await client.aclose()
    return phases


def _summarise(
    results: list[OpenResult], flood: dict[str, Any] | None, server_cpu: float, client_cpu: float
) -> dict[str, Any]:
    hist = Histogram()
    sent = ok = refused = errors = attempts = 0
    for result in results:
        hist.merge(result.hist())
        for i, good in enumerate(result.ok):
            sent += 1
            ok += good
            attempts += result.attempts[i]
            tag = result.endpoints[i]
            refused += tag == "429"
            errors += not tag.isdigit()
    summary = hist.summary_us()
    row: dict[str, Any] = {
        "others_sent": sent,
        "others_ok_pct": ok / sent * 100 if sent else math.nan,
        "others_429": refused,
        "others_errors": errors,
        "attempts": attempts / sent if sent else math.nan,
        "p50_ms": summary["p50_us"] / 1e3,
        "p99_ms": summary["p99_us"] / 1e3,
        "server_cpu_pct": server_cpu * 100,
        "others_cpu_pct": client_cpu * 100,
        "flood_rps": math.nan,
        "flood_429_pct": math.nan,
        "flood_ok_rps": math.nan,
    }
    if flood is not None:
        statuses = {int(k): int(v) for k, v in flood["statuses"].items()}
        answered = sum(statuses.values())
        row["flood_rps"] = answered / flood["elapsed"]
        row["flood_429_pct"] = statuses.get(429, 0) / answered * 100 if answered else math.nan
        row["flood_ok_rps"] = statuses.get(200, 0) / flood["elapsed"]
        row["flood_errors"] = flood["errors"]
    return row


def measure(params: Params, server_prefix: Sequence[str] = ()) -> ScenarioResult:
    """Both variants, quiet then flood, against one server; rows per phase, checks on the flood phases."""
    params.validate()
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    series: dict[str, Any] = {}
    with LimitedServer(params, server_prefix) as server:
        for variant in VARIANTS:
            phases = asyncio.run(_variant(variant, server, params))
            for phase in PHASES:
                row = {"variant": variant, "phase": phase, **phases[phase]}
                row["p99_vs_quiet"] = ratio(row["p99_ms"], phases["quiet"]["p99_ms"])
                rows.append(row)
            flood = phases["flood"]
            series[variant] = {p: phases[p]["p99_ms"] for p in PHASES}
            what = "first try" if variant.startswith("httpx") else "after backoff"
            share = flood["others_ok_pct"] / 100
            checks.append(
                Check(
                    f"others' success while one floods ({what})", f">= {TARGET:.0%}", share * 100, share >= TARGET, " %"
                )
            )
    notes = [
        f"limits (HTTPLocalRateLimitPolicy): identity {params.identity_rps}/s, total {params.total_rps}/s; "
        f"{params.callers} well-behaved callers at {params.rate:g}/s each (open loop), {params.duration:g} s per "
        f"phase; flooder: own process at nice {params.nice}, {params.connections} connections x {params.pipeline} "
        "pipelined requests, back to back",
        "others_ok_pct: 200 answers / requests sent (httpx: first try; meshlib: after its retries, default policy); "
        "p50/p99 from each request's intended start; flood_rps: flooder answers/s; flood_ok_rps: its 200s/s",
        "server_cpu_pct: the uvicorn process's CPU over the phase (100 = one core): what bounds the flood; "
        "others_cpu_pct: this process's (the well-behaved callers')",
    ]
    return ScenarioResult(
        "z2",
        "one caller floods a rate-limited uvicorn server: the others' success and latency",
        [
            "variant",
            "phase",
            "others_sent",
            "others_ok_pct",
            "others_429",
            "others_errors",
            "attempts",
            "p50_ms",
            "p99_ms",
            "p99_vs_quiet",
            "flood_rps",
            "flood_429_pct",
            "flood_ok_rps",
            "server_cpu_pct",
            "others_cpu_pct",
        ],
        rows,
        checks,
        notes=notes,
        series=series,
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks z2`` runs it (``Z2_DURATION`` overrides the phase length)."""
    duration = float(os.environ.get("Z2_DURATION", ctx.scale(10.0, 3.0)))
    return measure(Params(duration=duration), ctx.pinning.server_prefix)


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """The others' p99 latency, quiet and flooded, per variant."""
    variants = list(result.series)
    values = {p: [float(result.series[v].get(p, math.nan)) for v in variants] for p in PHASES}
    path = out / "z2_others_p99.png"
    ok = bar_chart(path, "Z2: well-behaved callers' p99 (ms), quiet vs one caller flooding", variants, values, "ms")
    return [path] if ok else []


def main(argv: list[str] | None = None) -> int:
    """Run Z2 alone and print its table and checks (exit status 0 whatever the verdicts)."""
    defaults = Params()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.z2_flood", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds per phase")
    parser.add_argument("--callers", type=int, default=defaults.callers, help="well-behaved callers")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="requests/s of each well-behaved caller")
    parser.add_argument("--connections", type=int, default=defaults.connections, help="the flooder's connections")
    parser.add_argument(
        "--pipeline", type=int, default=defaults.pipeline, help="flooder requests in flight per connection"
    )
    parser.add_argument("--nice", type=int, default=defaults.nice, help="the flooder's nice increment")
    parser.add_argument("--identity-rps", type=int, default=defaults.identity_rps, help="per-identity limit")
    parser.add_argument("--total-rps", type=int, default=defaults.total_rps, help="total limit")
    parser.add_argument("--pin", action="store_true", help="this process on CPU 1, the server on CPU 0")
    args = parser.parse_args(argv)
    params = Params(
        duration=args.duration,
        callers=args.callers,
        rate=args.rate,
        connections=args.connections,
        pipeline=args.pipeline,
        nice=args.nice,
        identity_rps=args.identity_rps,
        total_rps=args.total_rps,
    )
    try:
        params.validate()
    except ValueError as error:
        parser.error(str(error))
    prefix = pin_client().server_prefix if args.pin else ()
    started = time.perf_counter()
    result = measure(params, prefix)
    result.seconds = time.perf_counter() - started
    print(render_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
