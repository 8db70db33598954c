"""S11 zones (``s11``) -- zone-aware routing: in-zone while healthy, Envoy's share when degraded, spill when empty.

``python -m benchmarks s11`` (about 2 minutes per repeat; ``--quick`` about 40 s). Issue 16.

Twelve meshlib.testing backends (own process, ~3.5 ms lognormal) in three zones of four, ``a``, ``b`` and ``c``.
Their endpoint set comes from a discovery scheme registered in this process, ``bench-zones://``, re-read every
50 ms (``MESHLIB_DNS_TTL_MIN=50ms``): changing what it answers is what a Consul health check going critical does to
a ``consul://`` service (the endpoint leaves the passing set), with no errors needed. One ``meshlib.AsyncClient``
in zone ``a`` (``MESHLIB_ZONE=a``, default balancer ``p2c_ewma``) sends open-loop GETs at a few hundred per second:

a. **healthy**: all twelve endpoints. Target: at least 95 % of requests answered in zone a.
b. **degraded**: discovery drops three of zone a's four endpoints. meshlib assumes the callers are spread like the
   most endpoints it has seen per zone (4/4/4: a third in each zone), so Envoy's formula keeps
   ``(1/9) / (4/12) = 33.3 %`` in zone a and spreads the rest by residual capacity. Target: that share +-2 points.
c. **empty**: zone a's last endpoint leaves discovery while the load runs. Target: no request fails, and the first
   request scheduled after the new set is applied (meshlib's INFO line "endpoints of service ... changed") already
   goes out of zone.

The ``control`` variant is phase a without ``MESHLIB_ZONE``: zones ignored, about a third in zone a. Shares come
from the backends' own request counters (reset between phases); phase c's "first request" from the endpoint each
response names (``meshlib.endpoint``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import meshlib
from benchmarks.harness import Check, Context, ScenarioResult, interleave, median, median_row
from benchmarks.load import Outcome, open_async
from benchmarks.report import bar_chart
from benchmarks.s3_slow_backend import outcome_of, outcome_of_error
from benchmarks.servers import BackendProcess
from meshlib.discovery import DiscoverySettings, Target, register_scheme
from meshlib.discovery.base import Endpoint, Resolution

ZONES = ("a", "b", "c")
PER_ZONE = 4
HEALTHY = {"lognormal": [0.0035, 0.3], "body_size": 64}
VARIANTS = ("zone", "control")
MESH_ENV = {"MESHLIB_SERVICE_BENCH": "bench-zones://bench", "MESHLIB_DNS_TTL_MIN": "50ms", "MESHLIB_TIMEOUT": "2s"}


@dataclasses.dataclass
class _Members:
    """What ``bench-zones://bench`` answers, re-read every 50 ms."""

    source: str = "bench-zones://bench"

    endpoints: tuple[Endpoint, ...] = ()

    def resolve(self) -> Resolution:
        return Resolution(endpoints=self.endpoints, ttl=0.05)

    async def aresolve(self) -> Resolution:
        return self.resolve()

    def close(self) -> None:
        pass


MEMBERS = _Members()


def _members(target: Target, settings: DiscoverySettings) -> _Members:
    return MEMBERS


register_scheme("bench-zones", _members, form="bench-zones://bench (benchmarks)", replace=True)


class _Applied(logging.Handler):
    """Notes when meshlib logs that the endpoint set changed to ``n`` endpoints (and when: ``perf_counter``)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen: dict[int, float] = {}
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("endpoints of service") and "changed" in record.msg:
            self.seen.setdefault(int(record.args[1]), time.perf_counter())  # type: ignore[index]

    async def wait(self, n: int, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while n not in self.seen:  # set from the client's refresh task on this loop: poll it
            if time.monotonic() > deadline:
                raise TimeoutError(f"the set of {n} endpoints was never applied")
            await asyncio.sleep(0.005)
        return self.seen[n]


def _set(zones: dict[str, list[str]]) -> None:
    MEMBERS.endpoints = tuple(
        Endpoint(host, int(port), zone=zone)
        for zone, group in zones.items()
        for host, port in (a.split(":") for a in group)
    )


def _shares(counts: list[int], zone_of: list[str]) -> dict[str, float]:
    total = sum(counts) or 1
    return {z: 100.0 * sum(c for c, zz in zip(counts, zone_of, strict=True) if zz == z) / total for z in ZONES}


async def _run(variant: str, backends: BackendProcess, rate: float, seconds: dict[str, float]) -> dict[str, Any]:
    addresses = backends.addresses
    zone_of = [ZONES[i // PER_ZONE] for i in range(len(addresses))]
    zone_by_addr = dict(zip(addresses, zone_of, strict=True))
    zones = {z: addresses[i * PER_ZONE : (i + 1) * PER_ZONE] for i, z in enumerate(ZONES)}
    _set(zones)
    env = dict(MESH_ENV)
    if variant == "zone":
        env["MESHLIB_ZONE"] = "a"
    log = logging.getLogger("meshlib.discovery")
    applied = _Applied()
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(applied)
    row: dict[str, Any] = {"variant": variant}
    try:
        async with meshlib.AsyncClient(environ=env) as client:

            async def send() -> Outcome:
                return outcome_of(await client.get("http://bench/"))

            for _ in range(200):  # discovery, connections and latency estimates before the clock starts
                await send()
            backends.reset()
            healthy = await open_async(send, outcome_of_error, rate=rate, duration=seconds["healthy"])
            shares = _shares(backends.counts(), zone_of)
            row.update(healthy_in_zone_pct=shares["a"], healthy_errors=len(healthy.ok) - sum(healthy.ok))
            if variant == "control":
                return row

            zones_b = {**zones, "a": zones["a"][:1]}
            _set(zones_b)
            await applied.wait(9)
            backends.reset()
            degraded = await open_async(send, outcome_of_error, rate=rate, duration=seconds["degraded"])
            shares = _shares(backends.counts(), zone_of)
            row.update(
                degraded_in_zone_pct=shares["a"],
                degraded_b_pct=shares["b"],
                degraded_c_pct=shares["c"],
                degraded_errors=len(degraded.ok) - sum(degraded.ok),
            )

            backends.reset()
            start = [0.0]
            change_at = seconds["empty"] / 4

            def at(t: float) -> None:
                if not start[0]:
                    start[0] = time.perf_counter() - t
                if t >= change_at and len(MEMBERS.endpoints) == 9:
                    _set({**zones, "a": []})

            empty = await open_async(send, outcome_of_error, rate=rate, duration=seconds["empty"], at=at)
            when = await applied.wait(8) - start[0]
            after = [i for i, t in enumerate(empty.intended) if t >= when]
            after_zones = Counter(zone_by_addr.get(empty.endpoints[i], "?") for i in after)
            first = zone_by_addr.get(empty.endpoints[after[0]], "?") if after else "?"
            row.update(
                empty_errors=len(empty.ok) - sum(empty.ok),
                empty_requests=len(empty.ok),
                empty_first_zone=first,
                empty_after_in_zone=after_zones["a"],
                empty_applied_after_ms=(when - change_at) * 1000.0,
            )
    finally:
        log.removeHandler(applied)
        log.setLevel(level)
    return row


def expected_degraded() -> float:
    """Envoy's in-zone share (%) for 1 of 9 healthy endpoints in zone a, callers spread 4/4/4."""
    return 100.0 * (1 / 9) / (PER_ZONE / (PER_ZONE * len(ZONES)))


def measure(
    rate: float = 300.0,
    seconds: dict[str, float] | None = None,
    repeats: int = 1,
    server_prefix: tuple[str, ...] = (),
) -> ScenarioResult:
    """Both variants ``repeats`` times, interleaved; medians."""
    secs = seconds or {"healthy": 10.0, "degraded": 20.0, "empty": 8.0}
    with BackendProcess(len(ZONES) * PER_ZONE, HEALTHY, server_prefix) as backends:
        runs = interleave(VARIANTS, repeats, lambda v, r: asyncio.run(_run(v, backends, rate, secs)))
    rows = [median_row(runs[v]) for v in VARIANTS]
    zone, control = rows
    expected = expected_degraded()
    healthy = median(r["healthy_in_zone_pct"] for r in runs["zone"])
    degraded = median(r["degraded_in_zone_pct"] for r in runs["zone"])
    empty_errors = max(r["empty_errors"] for r in runs["zone"])
    firsts = [r["empty_first_zone"] for r in runs["zone"]]
    spilled = all(f not in {"a", "?"} for f in firsts) and all(r["empty_after_in_zone"] == 0 for r in runs["zone"])
    checks = [
        Check(
            "healthy: in-zone share",
            ">= 95%",
            healthy,
            healthy >= 95.0,
            "%",
            f"control: {control['healthy_in_zone_pct']:.1f}%",
        ),
        Check(
            "1 of 4 healthy: in-zone share",
            f"{expected:.1f}% +-2 pt",
            degraded,
            abs(degraded - expected) <= 2.0,
            "%",
            f"b {zone['degraded_b_pct']:.1f}%, c {zone['degraded_c_pct']:.1f}%",
        ),
        Check(
            "empty: failures while spilling",
            "0, first request out of zone",
            float(empty_errors),
            empty_errors == 0 and spilled,
            "",
            f"first request after the change went to zone {'/'.join(firsts)}; "
            f"in zone a after it: {max(r['empty_after_in_zone'] for r in runs['zone'])}",
        ),
    ]
    return ScenarioResult(
        "s11",
        f"zones: 3 zones x {PER_ZONE} endpoints, client in zone a, {rate:.0f} req/s open loop, p2c_ewma",
        [
            "variant",
            "healthy_in_zone_pct",
            "degraded_in_zone_pct",
            "degraded_b_pct",
            "degraded_c_pct",
            "empty_errors",
            "empty_first_zone",
            "empty_after_in_zone",
            "empty_applied_after_ms",
            "repeats",
        ],
        rows,
        checks,
        notes=[
            f"phases {secs['healthy']:g} s healthy / {secs['degraded']:g} s degraded / {secs['empty']:g} s empty "
            f"(zone a emptied after {secs['empty'] / 4:g} s of it); {repeats} interleaved repeat(s), medians",
            "endpoints leave through discovery (a scheme registered in the benchmark, 50 ms refresh), as a Consul "
            "check going critical removes them: no errors, no breakers involved",
            "in-zone shares from the backends' own counters; Envoy's formula: (1/9 healthy in a) / (4/12 callers "
            "in a, assumed from the most endpoints seen per zone)",
        ],
        series={"zone": runs["zone"], "control": runs["control"]},
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks s11`` runs it."""
    seconds = {"healthy": ctx.scale(10.0, 4.0), "degraded": ctx.scale(20.0, 6.0), "empty": ctx.scale(8.0, 4.0)}
    return measure(300.0, seconds, ctx.repeats, tuple(ctx.pinning.server_prefix))


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """In-zone share per phase against its target."""
    path = out / "s11_zones.png"
    rows = {row["variant"]: row for row in result.rows}
    zone = rows["zone"]
    groups = ["healthy", "1 of 4 healthy in a", "a empty (after change)"]
    after = 0.0 if zone.get("empty_after_in_zone", 0) == 0 else float("nan")
    series = {
        "MESHLIB_ZONE=a": [zone["healthy_in_zone_pct"], zone["degraded_in_zone_pct"], after],
        "target": [95.0, expected_degraded(), 0.0],
        "no zone (control)": [rows["control"]["healthy_in_zone_pct"], float("nan"), float("nan")],
    }
    ok = bar_chart(path, "S11 zones: share of requests answered in the client's zone (a)", groups, series, "%")
    return [path] if ok else []
