"""X1 -- push to traffic: how long after the control plane pushes a new split the traffic follows it.

Issue 13's target: *p99 <= 100 ms from the push to the traffic*. A ``meshlib.Client`` calls ``xds:///payments``
steered by the ADS double (``tests/servers/xds.py``, in this process) with steady open-loop load (``--rate``
requests/s, sent by a pool of threads at their scheduled times). Two clusters, ``pay-v1`` and ``pay-v2``, each one
backend (in a child process, pinned to the server CPU when the harness pins). The RouteConfiguration starts at
100/0; each push flips it (0/100, then 100/0 again, ...) with one ``XdsServer.set(ROUTE_CONFIGURATION, ...)``.
Clusters and endpoints stay on the server, so a flip is what a real rollout costs: a weight-0 cluster is not
watched, so the client subscribes to the new cluster's CDS and EDS resources when the routes name it.

Per push, from the moment ``set()`` returns:

* ``first``: the first request answered by the new backend (its completion time);
* ``all``: from when on every request lands there (the send time of the first request from which every later one
  of the push's window went to the new backend);
* the stages on the way, from instrumented methods of this client: the ADS thread receiving the RDS response, the
  CDS response, the apply thread's swap (``apply_control_plane`` returning), the EDS response.

Reported: p50/p99/max of each over ``--pushes`` pushes, and failed requests (there must be none).

``python -m benchmarks x1`` or ``python -m benchmarks.x1_push [--pushes 60] [--rate 500]``.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Check, Context, Histogram, ScenarioResult, render_result
from benchmarks.servers import BackendProcess

TARGET_MS = 100.0
V1, V2 = "pay-v1", "pay-v2"
perf = time.perf_counter


class _Load:
    """Open loop: a dispatcher releases a request every ``1/rate`` s; ``workers`` threads send them.

    Each request is kept as (send time, completion time, backend name or ``!error``)."""

    def __init__(self, client: Any, rate: float, workers: int = 16) -> None:
        self.client = client
        self.rate = rate
        self.records: list[tuple[float, float, str]] = []
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[float | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        self._dispatcher = threading.Thread(target=self._dispatch, daemon=True)

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        self._dispatcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._dispatcher.join(10)
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(10)

    def _dispatch(self) -> None:
        start = perf()
        i = 0
        while not self._stop.is_set():
            due = start + i / self.rate
            delay = due - perf()
            if delay > 0:
                time.sleep(delay)
            self._jobs.put(due)
            i += 1

    def _work(self) -> None:
        while self._jobs.get() is not None:
            sent = perf()
            try:
                response = self.client.get("http://payments/x1")
                where = response.headers.get("x-backend", "?") if response.status_code == 200 else "!error"
            except Exception:
                where = "!error"
            with self._lock:
                self.records.append((sent, perf(), where))

    def since(self, t0: float) -> list[tuple[float, float, str]]:
        with self._lock:
            return [r for r in self.records if r[0] >= t0]


def _routes(weights: dict[str, int]) -> Any:
    from tests.servers import xds_resources as r

    route = r.route(prefix="/", weighted_clusters=weights)
    return r.route_configuration("payments-routes", [r.virtual_host("vh", ["payments"], [route])])


def measure(pushes: int, rate: float, prefix: tuple[str, ...] = ()) -> ScenarioResult:
    """Run the load, push ``pushes`` flips, and summarise (see the module docstring)."""
    import meshlib
    from meshlib.control.xds.client import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION
    from tests.servers import xds_resources as r
    from tests.servers.xds import XdsServer

    with BackendProcess(2, prefix=prefix) as backends, XdsServer() as xds:
        name = {V1: "b0", V2: "b1"}
        assignments = [
            r.cluster_load_assignment(c, [r.locality([r.endpoint("127.0.0.1", p)])])
            for c, p in zip((V1, V2), backends.ports, strict=True)
        ]
        xds.set(CLUSTER_LOAD_ASSIGNMENT, assignments)
        xds.set(CLUSTER, [r.cluster(V1), r.cluster(V2)])
        xds.set(ROUTE_CONFIGURATION, [_routes({V1: 100, V2: 0})])
        xds.set(LISTENER, [r.listener("payments", rds="payments-routes")])
        environ = {"GRPC_XDS_BOOTSTRAP_CONFIG": xds.bootstrap_json(), "MESHLIB_SERVICE_PAYMENTS": "xds:///payments"}
        with meshlib.Client(environ=environ) as client:
            client.get("http://payments/warm")
            received: list[tuple[float, str]] = []
            swaps: list[float] = []
            ads = client.mesh.xds.clients[0]
            on_response, apply = ads._on_response, client.mesh.apply_control_plane

            def timed_response(response: Any) -> None:
                received.append((perf(), response.type_url))
                on_response(response)

            def timed_apply(*args: Any) -> None:
                apply(*args)
                swaps.append(perf())

            ads._on_response = timed_response
            client.mesh.apply_control_plane = timed_apply
            starts: list[tuple[float, str]] = []
            with _Load(client, rate) as load:
                time.sleep(0.5)  # the load reaches its rate on the first split
                for i in range(pushes):
                    target = V2 if i % 2 == 0 else V1
                    weights = {V1: 0, V2: 100} if target == V2 else {V1: 100, V2: 0}
                    xds.set(ROUTE_CONFIGURATION, [_routes(weights)])
                    t0 = perf()
                    starts.append((t0, name[target]))
                    _wait_moved(load, t0, name[target])
                    time.sleep(0.1)  # a gap between pushes: each one lands on a settled state
    return _summarise(starts, load.records, received=received, swaps=swaps, rate=rate, pushes=pushes)


def _wait_moved(load: _Load, t0: float, backend: str, limit: float = 3.0) -> None:
    """Until the 50 latest requests sent after the push all landed on ``backend`` (or ``limit`` s)."""
    while perf() - t0 < limit:
        time.sleep(0.01)
        done = sorted(load.since(t0))
        if len(done) >= 50 and all(r[2] == backend for r in done[-50:]):
            return


def _summarise(
    starts: list[tuple[float, str]],
    records: list[tuple[float, float, str]],
    *,
    received: list[tuple[float, str]],
    swaps: list[float],
    rate: float,
    pushes: int,
) -> ScenarioResult:
    from meshlib.control.xds.client import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, ROUTE_CONFIGURATION

    stages: dict[str, Histogram] = {
        k: Histogram() for k in ("RDS received", "CDS received", "swap", "EDS received", "first", "all")
    }
    kinds = {ROUTE_CONFIGURATION: "RDS received", CLUSTER: "CDS received", CLUSTER_LOAD_ASSIGNMENT: "EDS received"}
    errors = sum(1 for r in records if r[2] == "!error")
    missed = 0
    ordered = sorted(records)
    for i, (t0, backend) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else float("inf")
        window = [r for r in ordered if t0 <= r[0] < end]
        landed = [r[1] for r in window if r[2] == backend]
        if not landed:
            missed += 1
            continue
        stages["first"].record(min(landed) - t0)
        last_other = max((k for k, r in enumerate(window) if r[2] != backend), default=-1)
        if last_other + 1 < len(window):
            stages["all"].record(window[last_other + 1][0] - t0)
        else:
            missed += 1
        for url, label in kinds.items():
            seen = [t for t, u in received if u == url and t0 <= t < end]
            if seen:
                stages[label].record(min(seen) - t0)
        swapped = [t for t in swaps if t0 <= t < end]
        if swapped:
            stages["swap"].record(min(swapped) - t0)
    rows = []
    for label, hist in stages.items():
        p50, p99 = hist.percentiles((50, 99))
        rows.append(
            {
                "from set() returning to": label,
                "pushes": len(hist),
                "p50_ms": p50 * 1e3,
                "p99_ms": p99 * 1e3,
                "max_ms": max(hist.samples) * 1e3 if len(hist) else float("nan"),
            }
        )
    p99_all = stages["all"].percentiles((99,))[0] * 1e3
    p99_first = stages["first"].percentiles((99,))[0] * 1e3
    checks = [
        Check("push to 100% on the new backend, p99", f"<= {TARGET_MS:.0f} ms", p99_all, p99_all <= TARGET_MS, " ms"),
        Check("push to first request on it, p99", f"<= {TARGET_MS:.0f} ms", p99_first, p99_first <= TARGET_MS, " ms"),
        Check("failed requests", "0", float(errors), errors == 0),
    ]
    notes = [
        f"{pushes} pushes alternating 100/0 <-> 0/100 under {rate:.0f} req/s open loop (16 sender threads); "
        f"{len(records):,} requests, {errors} failed, {missed} pushes not moved within 3 s",
        "first = completion of the first request served by the new backend; all = send time of the first request "
        "from which every later one went there; stage rows: first occurrence after the push (ADS thread receiving "
        "a response, the apply thread's swap)",
        "a weight-0 cluster is not in the routes: the first flip to it subscribes to its CDS and EDS resources "
        "(two round trips to the control plane); later flips find it lingering (watched, its service ready)",
    ]
    series = {label: list(hist.samples) for label, hist in stages.items()}
    return ScenarioResult(
        "x1",
        "xDS push to traffic: a flipped split under steady load",
        ["from set() returning to", "pushes", "p50_ms", "p99_ms", "max_ms"],
        rows,
        checks,
        notes=notes,
        series=series,
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks x1`` runs it."""
    return measure(int(ctx.scale(60, 10)), 500.0, ctx.pinning.server_prefix)


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """No plot: the table says it."""
    return []


def main(argv: list[str] | None = None) -> int:
    """Run X1 alone and print its table and checks (exit status 0 whatever the verdicts)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.x1_push", description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=60, help="pushes, alternating 0/100 and 100/0")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second, open loop")
    args = parser.parse_args(argv)
    if args.pushes < 1 or args.rate <= 0:
        parser.error("--pushes must be >= 1 and --rate > 0")
    logging.getLogger("meshlib").setLevel(logging.ERROR)  # as the runner does: warnings would flood the output
    started = perf()
    result = measure(args.pushes, args.rate)
    result.seconds = perf() - started
    print(render_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
