"""C1 -- chain change to traffic: how long after Consul's discovery chain changes the traffic follows it.

Issue 14 says *a chain change moves traffic within one blocking-query round trip*; this measures it as X1
(:mod:`benchmarks.x1_push`) measures an xDS push. The Consul double (``tests/servers/consul.py``,
``ConsulEmulator(jitter=False)``, in this process) holds two instances of service ``web``, ``Service.Meta.version``
``v1`` and ``v2``, each a backend in a child process (:class:`~benchmarks.servers.BackendProcess`, pinned to the
server CPU when the harness pins). A ``meshlib.Client`` calls ``consul+chain://web`` under steady open-loop load
(``--rate`` requests/s, X1's ``_Load``). The chain is a ``service-splitter`` over the two version subsets
(``tests.servers.consul_chains.split``), starting at 100/0; each flip is one ``consul.set_chain()`` to 0/100, then
100/0 again, ...

Two modes, each with a client of its own:

* ``paced`` -- meshlib's default blocking-query pacing (Consul's guidance: a token bucket of 2 tokens, one more
  every 15 s, per watch). A change is seen at once by the blocking query in flight; the query after it waits for a
  token, so flips are spaced ``--interval`` s (default 16) apart to measure the mechanism as a real rollout meets
  it. Closer flips show the rate limit as delay, by design (``--interval 5`` shows it).
* ``unpaced`` -- ``meshlib.control.consul.source.WATCH_OPTIONS = WatchOptions(refill=0)`` (no rate limit): the
  mechanism itself, over ``--flips`` flips.

Per flip, from the moment ``set_chain()`` returns:

* ``first``: the first request answered by the new version (its completion time);
* ``all``: from when on every request lands there (the send time of the first request from which every later one
  of the flip's window went to the new version);
* the stages, from instrumented methods of this client: the chain watch accepting the new chain (its thread), the
  apply thread's swap (``apply_control_plane`` returning), the new version's target watch receiving its instances
  (only on a flip to a version not watched yet: the version flipped away from lingers, ``CHAIN_LINGER``, so after
  the first flip each flip is a route-table swap alone).

Reported: p50/p99/max of each, per mode, and failed requests (there must be none).

``python -m benchmarks c1`` or ``python -m benchmarks.c1_chain [--flips 40] [--paced-flips 3] [--interval 16]
[--rate 500] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Check, Context, Histogram, ScenarioResult, render_result
from benchmarks.servers import BackendProcess
from benchmarks.x1_push import _Load

TARGET_MS = 100.0
SERVICE = "web"
URL = "http://web/c1"
VERSIONS = ("v1", "v2")
STAGES = ("chain received", "swap", "target query at Consul", "target instances received", "all", "first")
perf = time.perf_counter

Record = tuple[float, float, str]


class _ChainLoad(_Load):
    """X1's open loop, calling ``http://web/c1``."""

    def _work(self) -> None:
        while self._jobs.get() is not None:
            sent = perf()
            try:
                response = self.client.get(URL)
                where = response.headers.get("x-backend", "?") if response.status_code == 200 else "!error"
            except Exception:
                where = "!error"
            with self._lock:
                self.records.append((sent, perf(), where))


class _Stages:
    """Times of the stages of a flip, from instance-patched methods of one client's Consul chain source (and the
    Consul double's request log: when a target watch's first, plain, query arrives)."""

    def __init__(self, client: Any, consul: Any) -> None:
        self.chain: list[float] = []
        self.swaps: list[float] = []
        self.targets: list[tuple[float, str]] = []
        self.queries: list[tuple[float, str]] = []
        mesh = client.mesh
        source = mesh.consul
        (chain,) = source._chains.values()  # the one consul+chain:// service
        loop = chain.loop
        accept = loop.query.accept
        apply = mesh.apply_control_plane
        watch_target = source._watch_target

        def timed_accept(reply: Any) -> None:
            self.chain.append(perf())  # the chain watch has the reply (also when the index moved for another reason)
            accept(reply)

        def timed_apply(*args: Any, **kwargs: Any) -> None:
            apply(*args, **kwargs)
            self.swaps.append(perf())

        def timed_watch_target(target: Any) -> Any:
            watch = watch_target(target)
            deliver = watch.deliver
            if getattr(deliver, "_c1", False):
                return watch
            subset = str(target.id).split(".", 1)[0]

            def timed_deliver(answer: Any, error: Any) -> None:
                if answer is not None:
                    self.targets.append((perf(), subset))
                deliver(answer, error)

            timed_deliver._c1 = True  # type: ignore[attr-defined]
            watch.deliver = timed_deliver
            return watch

        record = consul._record

        def timed_record(method: str, path: str, params: Any, header: Any) -> None:
            if path.startswith("/v1/health/") and "index" not in params:
                subset = str(params.get("filter", [""])[0]).rpartition(" ")[2]
                self.queries.append((perf(), subset))
            record(method, path, params, header)

        loop.query.accept = timed_accept
        consul._record = timed_record
        mesh.apply_control_plane = timed_apply
        source._watch_target = timed_watch_target


def _split(to: str) -> dict[str, Any]:
    from tests.servers.consul_chains import split

    return split(SERVICE, {v: (100 if v == to else 0) for v in VERSIONS})


def _wait_moved(load: _Load, t0: float, backend: str, limit: float) -> None:
    """Until the 50 latest requests sent after the flip all landed on ``backend`` (or ``limit`` s)."""
    while perf() - t0 < limit:
        time.sleep(0.01)
        done = sorted(load.since(t0))
        if len(done) >= 50 and all(r[2] == backend for r in done[-50:]):
            return


def _run_mode(
    consul: Any,
    backend_of: dict[str, str],
    *,
    flips: int,
    rate: float,
    interval: float,
    options: Any,
) -> tuple[list[tuple[float, str]], list[Record], _Stages]:
    """One client (built with ``options`` as the watches' pacing, ``None``: the defaults) under load, ``flips``
    flips; the flips' (start, backend), the requests and the stage times."""
    import meshlib
    from meshlib.control.consul import source as chain_source

    consul.set_chain(SERVICE, _split("v1"))
    environ = {"CONSUL_HTTP_ADDR": consul.address, "MESHLIB_SERVICE_WEB": f"consul+chain://{SERVICE}"}
    saved = chain_source.WATCH_OPTIONS
    chain_source.WATCH_OPTIONS = options  # read when the client is built
    try:
        client = meshlib.Client(environ=environ)
    finally:
        chain_source.WATCH_OPTIONS = saved
    starts: list[tuple[float, str]] = []
    with client, contextlib.ExitStack() as cleanup:
        response = client.get(URL)  # waits for the first chain and its instances
        if response.headers.get("x-backend") != backend_of["v1"]:
            raise RuntimeError(f"the 100/0 chain answered from {response.headers.get('x-backend')!r}")
        stages = _Stages(client, consul)
        cleanup.callback(consul.__dict__.pop, "_record", None)  # the double's own method again
        with _ChainLoad(client, rate) as load:
            time.sleep(0.5)  # the load reaches its rate on the first chain
            # A paced flip may wait for the rate limit's token (up to 15 s) before it is even seen.
            limit = 3.0 if options is not None else interval + 20.0
            for i in range(flips):
                to = VERSIONS[(i + 1) % 2]
                consul.set_chain(SERVICE, _split(to))
                t0 = perf()
                starts.append((t0, backend_of[to]))
                _wait_moved(load, t0, backend_of[to], limit)
                if i + 1 < flips:
                    time.sleep(max(0.1, t0 + interval - perf()))  # each flip lands on a settled state
    return starts, load.records, stages


def measure(
    flips: int,
    rate: float,
    *,
    paced_flips: int = 3,
    interval: float = 16.0,
    prefix: tuple[str, ...] = (),
) -> ScenarioResult:
    """Both modes against one Consul double and one pair of backends (see the module docstring)."""
    from meshlib.discovery.consul.query import WatchOptions
    from tests.servers.consul import ConsulEmulator

    modes: dict[str, tuple[list[tuple[float, str]], list[Record], _Stages]] = {}
    with BackendProcess(2, prefix=prefix) as backends, ConsulEmulator(jitter=False) as consul:
        backend_of = dict(zip(VERSIONS, ("b0", "b1"), strict=True))
        for version, port in zip(VERSIONS, backends.ports, strict=True):
            consul.register(SERVICE, port, id=f"web-{version}", address="127.0.0.1", meta={"version": version})
        if paced_flips:
            modes["paced"] = _run_mode(
                consul, backend_of, flips=paced_flips, rate=rate, interval=interval, options=None
            )
        if flips:
            modes["unpaced"] = _run_mode(
                consul, backend_of, flips=flips, rate=rate, interval=0.0, options=WatchOptions(refill=0)
            )
    return _summarise(modes, rate=rate, interval=interval)


def _flip_stages(
    starts: list[tuple[float, str]], records: list[Record], stages: _Stages, subset_of: dict[str, str]
) -> tuple[dict[str, Histogram], int, int, int]:
    """The stage histograms of one mode, its failed requests, flips never moved, and requests."""
    found = {label: Histogram() for label in STAGES}
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
        found["first"].record(min(landed) - t0)
        last_other = max((k for k, r in enumerate(window) if r[2] != backend), default=-1)
        if last_other + 1 < len(window):
            found["all"].record(window[last_other + 1][0] - t0)
        else:
            missed += 1
        firsts: list[tuple[str, list[float]]] = [
            ("chain received", stages.chain),
            ("swap", stages.swaps),
            ("target query at Consul", [t for t, s in stages.queries if s == subset_of[backend]]),
            ("target instances received", [t for t, s in stages.targets if s == subset_of[backend]]),
        ]
        for label, times in firsts:
            seen = [t for t in times if t0 <= t < end]
            if seen:
                found[label].record(min(seen) - t0)
    return found, errors, missed, len(records)


def _summarise(
    modes: dict[str, tuple[list[tuple[float, str]], list[Record], _Stages]], *, rate: float, interval: float
) -> ScenarioResult:
    subset_of = {"b0": "v1", "b1": "v2"}
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    series: dict[str, list[float]] = {}
    notes: list[str] = []
    for mode, (starts, records, stages) in modes.items():
        found, errors, missed, total = _flip_stages(starts, records, stages, subset_of)
        for label, hist in found.items():
            p50, p99 = hist.percentiles((50, 99))
            rows.append(
                {
                    "mode": mode,
                    "from set_chain() returning to": label,
                    "flips": len(hist),
                    "p50_ms": p50 * 1e3,
                    "p99_ms": p99 * 1e3,
                    "max_ms": max(hist.samples) * 1e3 if len(hist) else float("nan"),
                }
            )
            series[f"{mode}: {label}"] = list(hist.samples)
        p99_all = found["all"].percentiles((99,))[0] * 1e3
        p99_first = found["first"].percentiles((99,))[0] * 1e3
        judged = mode == "unpaced" or interval >= 15.0
        when = "" if mode == "unpaced" else f" (flips {interval:g} s apart)"
        if judged:
            checks += [
                Check(
                    f"{mode}: chain change to 100% on the new version, p99{when}",
                    f"<= {TARGET_MS:.0f} ms",
                    p99_all,
                    p99_all <= TARGET_MS,
                    " ms",
                ),
                Check(
                    f"{mode}: chain change to first request on it, p99{when}",
                    f"<= {TARGET_MS:.0f} ms",
                    p99_first,
                    p99_first <= TARGET_MS,
                    " ms",
                ),
            ]
        else:
            notes.append(
                f"paced flips {interval:g} s apart are closer than the 15 s refill: the rate limit shows as "
                "delay (by design), so the target is not judged for them"
            )
        checks.append(Check(f"{mode}: failed requests", "0", float(errors), errors == 0))
        checks.append(Check(f"{mode}: flips not moved", "0", float(missed), missed == 0))
        pacing = (
            f"default pacing (2 tokens, one per 15 s), flips {interval:g} s apart"
            if mode == "paced"
            else "no rate limit (WatchOptions(refill=0)), each flip once the previous one moved + 0.1 s"
        )
        notes.append(
            f"{mode}: {len(starts)} flips alternating 100/0 <-> 0/100, {pacing}; {total:,} requests at "
            f"{rate:.0f} req/s open loop (16 sender threads), {errors} failed, {missed} flips not moved"
        )
    notes += [
        "first = completion of the first request served by the new version; all = send time of the first request "
        "from which every later one went there; stage rows: first occurrence after set_chain() (the chain watch "
        "accepting a reply, the apply thread's swap, the new version's target watch receiving its instances)",
        "a weight-0 leg is not routed: the first flip adds the new version's resolver service and starts its target "
        "watch (a plain /v1/health/service query, then a new connection); the version flipped away from lingers "
        "(CHAIN_LINGER, 60 s), so later flips are a route-table swap alone",
        "the Consul double has one index for everything: a flip also wakes the target watches (same answer)",
    ]
    return ScenarioResult(
        "c1",
        "Consul chain change to traffic: a flipped splitter under steady load",
        ["mode", "from set_chain() returning to", "flips", "p50_ms", "p99_ms", "max_ms"],
        rows,
        checks,
        notes=notes,
        series=series,
    )


def run(ctx: Context) -> ScenarioResult:
    """The scenario as ``python -m benchmarks c1`` runs it (about 50 s; 15 s with ``--quick``)."""
    flips, paced = (6, 1) if ctx.quick else (40, 3)
    return measure(flips, 500.0, paced_flips=paced, interval=16.0, prefix=ctx.pinning.server_prefix)


def plot(result: ScenarioResult, out: Path) -> list[Path]:
    """No plot: the table says it."""
    return []


def main(argv: list[str] | None = None) -> int:
    """Run C1 alone and print its table and checks (exit status 0 whatever the verdicts)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.c1_chain", description=__doc__.splitlines()[0])
    parser.add_argument("--flips", type=int, default=None, help="unpaced flips (default 40; 6 with --quick)")
    parser.add_argument(
        "--paced-flips", type=int, default=None, help="flips with the default pacing (default 3; 1 with --quick)"
    )
    parser.add_argument("--interval", type=float, default=16.0, help="seconds between paced flips")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second, open loop")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 15 s")
    args = parser.parse_args(argv)
    flips = args.flips if args.flips is not None else (6 if args.quick else 40)
    paced = args.paced_flips if args.paced_flips is not None else (1 if args.quick else 3)
    if flips < 0 or paced < 0 or flips + paced < 1 or args.rate <= 0 or args.interval < 0:
        parser.error("--flips and --paced-flips must be >= 0 (one of them >= 1), --rate > 0, --interval >= 0")
    logging.getLogger("meshlib").setLevel(logging.ERROR)  # as the runner does: warnings would flood the output
    started = perf()
    result = measure(flips, args.rate, paced_flips=paced, interval=args.interval)
    result.seconds = perf() - started
    print(render_result(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
