"""``meshlib demo``: latency-aware balancing against round robin, on real loopback backends, in a few seconds.

Why a demo at all: the point of ``p2c_ewma`` (meshlib's default, Linkerd's and Finagle's) is that a slow
endpoint stops getting traffic without anyone configuring anything. That is easiest to believe when seen on
real sockets, so this module starts five HTTP backends in-process with :mod:`meshlib.testing` -- three
healthy ones (lognormal latency, ~5 ms median), one slow one (80-150 ms) and one that answers every request
with 503 -- and sends the same workload through ``meshlib.Client`` twice, first balanced by ``p2c_ewma``,
then by ``round_robin``. Nothing outside the process is needed and the user's ``MESHLIB_*`` environment is
ignored, so the result does not depend on the machine's configuration.

While a phase runs, a table of each endpoint's share of traffic, p50/p99 latency, errors and in-flight
requests is redrawn in place about five times a second when stdout is a terminal; otherwise (or with
``live=False``) the table is printed once at the end of each phase. A comparison of the two balancers
closes the run.

The mesh core does not retry yet, so the 503s reach the caller and are counted as errors here; nor does it
treat failures as a load signal yet (outlier detection comes later), so neither balancer avoids the failing
backend. The demo says so rather than hiding it.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import httpx

from meshlib.call import EXT_ENDPOINT
from meshlib.client import Client
from meshlib.config import service_key
from meshlib.testing import Backend, BackendGroup, Behavior, lognormal_delay

__all__ = ["DemoOptions", "PhaseResult", "run_demo"]

#: The logical name every demo request addresses; the backends are its endpoints.
SERVICE = "demo-api"
BALANCERS = ("p2c_ewma", "round_robin")
#: Redraw period of the live table: ~5 frames per second is smooth enough and costs nothing measurable.
REFRESH_SECONDS = 0.2
#: Row label for requests that failed before any endpoint answered (connection errors).
NO_ENDPOINT = "(no answer)"

# Roles, as the comparison names them.
HEALTHY = "healthy"
SLOW = "slow"
FAILING = "failing"


@dataclass(frozen=True)
class DemoOptions:
    """What ``meshlib demo`` was asked to do: requests per balancer, concurrent callers, live view or not."""

    requests: int = 1500
    concurrency: int = 8
    live: bool = True
    seed: int = 7


@dataclass(frozen=True)
class BackendSpec:
    """One demo backend: its name, its role in the comparison, and how it answers."""

    name: str
    role: str
    behavior: Behavior


def backend_specs(seed: int) -> list[BackendSpec]:
    """The five demo backends: three healthy, one slow, one failing.

    The failing one answers with the same latency as the healthy ones, so the balancers get no latency hint
    from it: the comparison then shows what failures alone do to each balancer today.
    """
    slow_rng = random.Random(seed + 100)

    def slow_extra() -> float:
        return slow_rng.uniform(0.0, 0.070)

    healthy = [
        BackendSpec(f"healthy-{i}", HEALTHY, Behavior(delay_fn=lognormal_delay(0.005, 0.5, seed=seed + i)))
        for i in (1, 2, 3)
    ]
    return [
        *healthy,
        BackendSpec("slow", SLOW, Behavior(delay=0.080, delay_fn=slow_extra)),
        BackendSpec("failing", FAILING, Behavior(status=503, delay_fn=lognormal_delay(0.005, 0.5, seed=seed + 9))),
    ]


@dataclass(frozen=True)
class Fleet:
    """The started demo backends, addressable by the ``host:port`` a mesh response reports."""

    group: BackendGroup
    names: dict[str, str]  # address -> backend name
    roles: dict[str, str]  # backend name -> role

    @property
    def target(self) -> str:
        """The ``static://`` discovery target listing every backend."""
        return "static://" + ",".join(self.group.addresses)


@contextlib.contextmanager
def start_fleet(specs: Sequence[BackendSpec]) -> Iterator[Fleet]:
    """Start one loopback :class:`~meshlib.testing.Backend` per spec; stop them all on exit."""
    group = BackendGroup(Backend(spec.name, behavior=spec.behavior) for spec in specs)
    with group:
        yield Fleet(
            group=group,
            names={backend.address: backend.name for backend in group},
            roles={spec.name: spec.role for spec in specs},
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class _Tally:
    """Latencies and errors seen by callers for one endpoint (guarded by the recorder's lock)."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0


class Recorder:
    """Collects what the calling threads observed: per backend, each request's latency and outcome.

    Callers measure latency themselves (request sent to body read), which is what an application feels,
    rather than reading the balancer's internal estimate. One lock, held for an append only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[str, _Tally] = {}
        self.started = time.monotonic()

    def record(self, backend: str, latency: float, *, error: bool) -> None:
        """Count one finished request against ``backend``."""
        with self._lock:
            tally = self._tallies.setdefault(backend, _Tally())
            tally.latencies.append(latency)
            tally.errors += error

    def snapshot(self) -> dict[str, tuple[list[float], int]]:
        """A copy of every backend's latencies and error count, safe to read while requests go on."""
        with self._lock:
            return {name: (list(t.latencies), t.errors) for name, t in self._tallies.items()}


def send_one(client: Client, url: str, names: dict[str, str], recorder: Recorder) -> None:
    """Send one request through the mesh and record which backend answered, how fast, and if it failed.

    A 5xx counts as an error: the mesh does not retry yet, so it is exactly what the caller got.
    """
    start = time.perf_counter()
    try:
        response = client.get(url)
    except httpx.HTTPError:
        recorder.record(NO_ENDPOINT, time.perf_counter() - start, error=True)
        return
    latency = time.perf_counter() - start
    address = response.extensions.get(EXT_ENDPOINT, "")
    recorder.record(names.get(address, address or NO_ENDPOINT), latency, error=response.status_code >= 500)


@dataclass(frozen=True)
class EndpointRow:
    """One line of the table: what one backend got and how it answered."""

    name: str
    role: str
    requests: int
    share: float
    p50: float
    p99: float
    errors: int
    inflight: int


def inflight_by_name(client: Client, names: dict[str, str]) -> dict[str, int]:
    """In-flight requests per backend as the mesh counts them (the balancer's own view of load)."""
    service = client.mesh.services[service_key(SERVICE)]
    active = service.active
    if active is None:
        return {}
    return {names.get(s.endpoint.address, s.endpoint.address): s.inflight for s in active.stats.values()}


def build_rows(fleet: Fleet, recorder: Recorder, inflight: dict[str, int]) -> list[EndpointRow]:
    """Table rows for every backend (in fleet order), plus one for requests no endpoint answered, if any."""
    seen = recorder.snapshot()
    total = sum(len(latencies) for latencies, _ in seen.values())
    order = [backend.name for backend in fleet.group] + sorted(set(seen) - set(fleet.roles))
    rows = []
    for name in order:
        latencies, errors = seen.get(name, ([], 0))
        rows.append(
            EndpointRow(
                name=name,
                role=fleet.roles.get(name, "?"),
                requests=len(latencies),
                share=len(latencies) / total if total else 0.0,
                p50=percentile(latencies, 50),
                p99=percentile(latencies, 99),
                errors=errors,
                inflight=inflight.get(name, 0),
            )
        )
    return rows


@dataclass(frozen=True)
class PhaseResult:
    """The outcome of one balancer's run: per-backend rows and the totals the comparison shows."""

    balancer: str
    rows: list[EndpointRow]
    elapsed: float
    p50: float
    p99: float

    @property
    def total(self) -> int:
        """Requests sent in this phase."""
        return sum(row.requests for row in self.rows)

    @property
    def error_rate(self) -> float:
        """Share of requests that failed (5xx or no answer)."""
        return sum(row.errors for row in self.rows) / self.total if self.total else 0.0

    def share(self, role: str) -> float:
        """Share of this phase's requests that went to backends with ``role``."""
        return sum(row.share for row in self.rows if row.role == role)


# --- rendering ----------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def render_table(title: str, rows: Sequence[EndpointRow], done: int, total: int, elapsed: float) -> list[str]:
    """The per-endpoint table as lines of text (no trailing newlines)."""
    header = f"{'endpoint':<12} {'role':<8} {'requests':>8} {'share':>7} {'p50':>9} {'p99':>9}"
    lines = [f"{title}: {done}/{total} requests, {elapsed:.1f} s", f"  {header} {'errors':>7} {'in-flight':>9}"]
    lines.extend(
        f"  {row.name:<12} {row.role:<8} {row.requests:>8} {row.share:>7.1%} {_ms(row.p50):>9} {_ms(row.p99):>9}"
        f" {row.errors:>7} {row.inflight:>9}"
        for row in rows
    )
    return lines


def render_comparison(results: Sequence[PhaseResult]) -> list[str]:
    """The closing comparison: one column per balancer, the rows a reader should compare."""
    metrics: list[tuple[str, Callable[[PhaseResult], str]]] = [
        ("requests", lambda r: str(r.total)),
        ("share to slow backend", lambda r: f"{r.share(SLOW):.1%}"),
        ("share to failing backend", lambda r: f"{r.share(FAILING):.1%}"),
        ("p50 latency", lambda r: _ms(r.p50)),
        ("p99 latency", lambda r: _ms(r.p99)),
        ("error rate", lambda r: f"{r.error_rate:.1%}"),
        ("total time", lambda r: f"{r.elapsed:.2f} s"),
        ("throughput", lambda r: f"{r.total / r.elapsed:.0f} req/s" if r.elapsed > 0 else "-"),
    ]
    lines = ["Comparison", "  " + f"{'':<26}" + "".join(f"{r.balancer:>14}" for r in results)]
    lines.extend("  " + f"{label:<26}" + "".join(f"{value(r):>14}" for r in results) for label, value in metrics)
    lines += [
        "",
        "  p2c_ewma (the default) compares the latency x in-flight of two random endpoints and drains the slow one",
        "  after its first slow answer; round_robin keeps sending it 1 request in 5, and callers wait for them.",
        "  Neither avoids the failing backend yet: a fast 503 is not a latency signal, and the mesh does not retry",
        "  or eject failing endpoints yet (retries and outlier detection come later), so 503s reach the caller.",
        "  Callers and backends share one Python process here, so the balancer that finishes more requests per",
        "  second also queues more on the CPU: compare p99 and total time more than p50.",
    ]
    return lines


class PhaseView(Protocol):
    """Where a phase's progress goes: redrawn live, or printed once at the end."""

    def update(self, lines: list[str]) -> None:
        """Show the current table (may be ignored)."""

    def finish(self, lines: list[str]) -> None:
        """Show the final table of the phase."""


class PlainView:
    """For pipes, logs and tests: print the table once, when the phase ends."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def update(self, lines: list[str]) -> None:
        """Nothing: a pipe would only collect noise."""

    def finish(self, lines: list[str]) -> None:
        """Print the final table."""
        print("\n".join(lines), file=self._out, flush=True)


class LiveView:
    """For terminals: redraw the table in place with ANSI escapes (cursor up N lines, clear to end)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._drawn = 0

    def update(self, lines: list[str]) -> None:
        """Replace the previously drawn table with ``lines``."""
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self._out.write(up + "\x1b[J" + "\n".join(lines) + "\n")
        self._out.flush()
        self._drawn = len(lines)

    def finish(self, lines: list[str]) -> None:
        """Draw the final table and leave it on screen."""
        self.update(lines)
        self._drawn = 0


@contextlib.contextmanager
def hidden_cursor(out: TextIO, enabled: bool) -> Iterator[None]:
    """Hide the terminal cursor while the live table redraws (restored even on Ctrl-C)."""
    if not enabled:
        yield
        return
    out.write("\x1b[?25l")
    try:
        yield
    finally:
        out.write("\x1b[?25h")
        out.flush()


# --- running ------------------------------------------------------------------------------------------------


def wait_all(futures: Sequence[Future[None]], tick: Callable[[], None]) -> None:
    """Wait for every future, calling ``tick`` every :data:`REFRESH_SECONDS` (to redraw the view).

    On Ctrl-C (or a bug in a worker) the requests not yet started are cancelled, so the demo stops at once
    instead of draining the whole queue while the executor shuts down.
    """
    pending = set(futures)
    try:
        while pending:
            finished, pending = wait(pending, timeout=REFRESH_SECONDS, return_when=FIRST_EXCEPTION)
            for future in finished:
                future.result()  # a bug in the demo itself should surface, not be counted as an error
            tick()
    except BaseException:
        for future in pending:
            future.cancel()
        raise


def run_phase(balancer: str, fleet: Fleet, options: DemoOptions, view: PhaseView) -> PhaseResult:
    """Send ``options.requests`` requests through a fresh ``meshlib.Client`` balanced by ``balancer``.

    A fresh client per phase so neither balancer inherits the other's latency history. ``environ={}`` keeps
    the user's ``MESHLIB_*`` variables out of the demo. The main thread redraws the view while a pool of
    ``options.concurrency`` threads sends.
    """
    title = f"[{balancer}] {SERVICE} -> {len(fleet.group)} endpoints, {options.concurrency} concurrent callers"
    recorder = Recorder()
    url = f"http://{SERVICE}/work"
    with (
        Client(services={SERVICE: fleet.target}, lb=balancer, environ={}) as client,
        ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="meshlib-demo") as pool,
    ):

        def table() -> list[str]:
            rows = build_rows(fleet, recorder, inflight_by_name(client, fleet.names))
            done = sum(row.requests for row in rows)
            return render_table(title, rows, done, options.requests, time.monotonic() - recorder.started)

        futures: list[Future[None]] = [
            pool.submit(send_one, client, url, fleet.names, recorder) for _ in range(options.requests)
        ]
        wait_all(futures, lambda: view.update(table()))
        elapsed = time.monotonic() - recorder.started
        rows = build_rows(fleet, recorder, inflight_by_name(client, fleet.names))
        view.finish(render_table(title, rows, sum(r.requests for r in rows), options.requests, elapsed))
    every = [latency for latencies, _ in recorder.snapshot().values() for latency in latencies]
    return PhaseResult(balancer, rows, elapsed, percentile(every, 50), percentile(every, 99))


def describe(fleet: Fleet, options: DemoOptions) -> list[str]:
    """The opening lines: what is about to run, on which addresses."""
    lines = [
        f"meshlib demo: {len(fleet.group)} loopback backends as service {SERVICE!r}, "
        f"{options.requests} requests per balancer, {options.concurrency} concurrent callers",
    ]
    detail = {HEALTHY: "~5 ms lognormal", SLOW: "80-150 ms", FAILING: "503 to every request, ~5 ms"}
    lines.extend(
        f"  {backend.name:<12} {backend.address:<22} {detail[fleet.roles[backend.name]]}" for backend in fleet.group
    )
    return lines


def run_demo(options: DemoOptions = DemoOptions(), out: TextIO | None = None) -> list[PhaseResult]:
    """Run both phases on the same backends, print each table and the comparison; return the results."""
    stream = out if out is not None else sys.stdout
    live = options.live and stream.isatty()
    results: list[PhaseResult] = []
    with start_fleet(backend_specs(options.seed)) as fleet, hidden_cursor(stream, live):
        print("\n".join(describe(fleet, options)), file=stream, flush=True)
        for balancer in BALANCERS:
            print(file=stream)
            view: PhaseView = LiveView(stream) if live else PlainView(stream)
            results.append(run_phase(balancer, fleet, options, view))
    print(file=stream)
    print("\n".join(render_comparison(results)), file=stream, flush=True)
    return results
