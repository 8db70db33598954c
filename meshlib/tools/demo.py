"""``meshlib demo``: latency-aware balancing, retries, breakers and outlier ejection, on real loopback backends.

Why a demo at all: the point of ``p2c_ewma`` (meshlib's default, Linkerd's and Finagle's) is that a slow
endpoint stops getting traffic without anyone configuring anything, and the point of the resilience layer is
that a failing endpoint stops hurting callers the same way. Both are easiest to believe when seen on real
sockets, so this module starts five HTTP backends in-process with :mod:`meshlib.testing` -- three healthy
ones (lognormal latency, ~5 ms median), one slow one (80-150 ms) and one that answers every request with a
fast 503 -- and sends the same workload through ``meshlib.Client`` twice, first balanced by ``p2c_ewma``,
then by ``round_robin``. Each phase gets a fresh client, so neither balancer inherits the other's latency
history, breakers or ejections. Nothing outside the process is needed and the user's ``MESHLIB_*`` mesh
settings are ignored (the configuration is ``MeshConfig.from_env({})``), so the result does not depend on the
machine's configuration: the mesh runs with its defaults (1 retry within a budget of 20 % of requests + 10/s,
breaker and outlier ejection after 5 consecutive failures, ejection for 30 s). Only ``MESHLIB_HTTP_LIBRARY``
counts: it picks httpx or httpx2, as for any ``meshlib.Client``.

Two levels are measured, because retries make them differ:

* **attempts**, per endpoint: every request the mesh sent to an endpoint (first tries and retries), timed
  from send to response headers by a thin wrapper around the client's inner transport (``transport=``), and
  counted as an error when it failed at the endpoint (5xx, connection failure). Next to them, the mesh's own
  view of the endpoint from ``client.mesh_status()``: breaker state, ejected or not, requests in flight.
* **calls**, per phase: what the application saw -- latency (request sent to body read), errors (a 5xx or an
  exception after the mesh's retries) and attempts per call (retry amplification), plus the retries the
  retry budget granted and refused (``mesh_status()``'s retry budget).

The demo is an application of meshlib's public API (see :mod:`meshlib.tools`): ``meshlib.Client`` -- so
``MESHLIB_HTTP_LIBRARY=httpx2`` runs it on httpx2, the attempt recorder wrapping a transport of whichever
library the client reports in ``client.http_library`` -- ``meshlib.MeshConfig``, ``mesh_status()`` and the
loopback backends of :mod:`meshlib.testing`.

While a phase runs, the table is redrawn in place about five times a second when stdout is a terminal;
otherwise (or with ``live=False``) it is printed once at the end of each phase. The mesh's resilience log
lines (breaker opened, endpoint ejected) are shown as the table's events instead of going to stderr, where
they would break the redraw. A comparison of the two balancers follows.

A last phase shows a traffic split (:func:`run_split_phase`): two more backends become the services
``demo-api-v1`` and ``demo-api-v2``, and a Gateway API HTTPRoute in a temporary ``MESHLIB_ROUTES_FILE`` splits
calls to ``demo-api`` between them 90/10; the file is then rewritten to 50/50 while the callers keep sending,
and the table shows the share each version of the file gave each backend (the new version is awaited in
``mesh_status().routes.version``).

The hedging phase (:func:`run_hedge_phase`) ends the demo: three backends of ``demo-tail`` answer in ~3 ms but
stall 150 ms on 3 % of requests (any of them, at random, so no balancer can avoid it); one client sends the same
calls without, then with, ``meshlib.policy(hedge=meshlib.HedgePolicy(max_attempts=2, percentile=0.95))``, and the
table shows p50/p99 of each, the hedges sent and won (``mesh_status()``) and the extra load (the backends' counts).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

import meshlib
from meshlib.status import ServiceStatus
from meshlib.testing import Backend, BackendGroup, Behavior, lognormal_delay

__all__ = ["DemoOptions", "HedgeResult", "PhaseResult", "SplitResult", "run_demo", "run_hedge_phase", "run_split_phase"]

#: The logical name every demo request addresses; the backends are its endpoints.
SERVICE = "demo-api"
BALANCERS = ("p2c_ewma", "round_robin")
#: Redraw period of the live table: ~5 frames per second is smooth enough and costs nothing measurable.
REFRESH_SECONDS = 0.2
#: Events (breaker and ejection log lines) shown under a table: the most recent ones, so its height stays bounded.
MAX_EVENTS = 6
#: The logger whose lines become the table's events.
EVENTS_LOGGER = "meshlib.resilience"

#: Breaker states as ``mesh_status()`` reports them (:class:`meshlib.status.EndpointStatus`).
BREAKER_CLOSED = "closed"
BREAKER_OPEN = "open"

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
    from it: only failure accounting (breaker, outlier detection) and retries can keep it from hurting callers.
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
    """The started demo backends, addressable by the ``host:port`` the mesh sends to."""

    group: BackendGroup
    names: dict[str, str]  # address -> backend name
    roles: dict[str, str]  # backend name -> role

    @property
    def target(self) -> str:
        """The ``static://`` discovery target listing every backend."""
        return "static://" + ",".join(self.group.addresses)

    def readable(self, message: str) -> str:
        """``message`` with endpoint addresses (as the mesh's log lines spell them) replaced by backend names."""
        message = message.replace(f" for {SERVICE}:", ":")  # one service here: its name is noise
        for backend in self.group:
            message = message.replace(f"{SERVICE}/{backend.address}", backend.name)
            message = message.replace(repr((backend.host, backend.port)), backend.name)
            message = message.replace(backend.address, backend.name)
        return message


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
    """Latencies and errors of one endpoint's attempts (guarded by the recorder's lock)."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0


@dataclass(frozen=True)
class CallTotals:
    """What the callers of one phase saw, so far."""

    calls: int
    errors: int
    latencies: list[float]


class Recorder:
    """Collects what one phase observed: each attempt per endpoint, each call, and the mesh's events.

    Latencies are measured from outside the mesh (attempts by :class:`AttemptRecorder`, calls by the caller
    threads), rather than read from the balancer's internal estimate. One lock, held for an append only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: dict[str, _Tally] = {}
        self._call_latencies: list[float] = []
        self._call_errors = 0
        self._events: list[str] = []
        self.started = time.monotonic()

    def attempt(self, endpoint: str, latency: float, *, error: bool) -> None:
        """Count one attempt the mesh sent to ``endpoint``."""
        with self._lock:
            tally = self._attempts.setdefault(endpoint, _Tally())
            tally.latencies.append(latency)
            tally.errors += error

    def call(self, latency: float, *, error: bool) -> None:
        """Count one finished call, as the application saw it (after the mesh's retries)."""
        with self._lock:
            self._call_latencies.append(latency)
            self._call_errors += error

    def event(self, message: str) -> None:
        """Note one mesh event (a log line), stamped with the time since the phase started."""
        line = f"+{time.monotonic() - self.started:.2f} s  {message}"
        with self._lock:
            self._events.append(line)

    def attempts(self) -> dict[str, tuple[list[float], int]]:
        """A copy of every endpoint's attempt latencies and error count, safe to read while requests go on."""
        with self._lock:
            return {name: (list(t.latencies), t.errors) for name, t in self._attempts.items()}

    def calls(self) -> CallTotals:
        """A copy of the call totals."""
        with self._lock:
            latencies = list(self._call_latencies)
            return CallTotals(len(latencies), self._call_errors, latencies)

    def events(self) -> list[str]:
        """Every event so far, oldest first."""
        with self._lock:
            return list(self._events)


class AttemptRecorder:
    """The client's inner transport (``transport=``): sends through an inner transport and records every attempt.

    The mesh hands each attempt to its endpoint's inner transport with the endpoint's address in the URL, so
    this sees exactly what each endpoint got, retries included. Latency runs to the response headers, as the
    mesh's own EWMA measures it.

    It works with either HTTP library: it only forwards ``handle_request`` and ``close``, and the transport it
    forwards to is made by :meth:`bind` once the client exists, from the library the client says it uses
    (``client.http_library``), so requests and responses stay that library's own.
    """

    def __init__(self, names: dict[str, str], recorder: Recorder) -> None:
        self._inner: Any = None
        self._names = names
        self._recorder = recorder

    def bind(self, library: str) -> None:
        """Send through a new ``HTTPTransport`` of ``library`` (``"httpx"`` or ``"httpx2"``, the client's)."""
        self._inner = importlib.import_module(library).HTTPTransport()

    def handle_request(self, request: Any) -> Any:
        """Send one attempt and count it against the endpoint it went to."""
        if self._inner is None:
            raise RuntimeError("AttemptRecorder.bind(client.http_library) was not called")
        address = f"{request.url.host}:{request.url.port}"
        name = self._names.get(address, address)
        start = time.perf_counter()
        try:
            response = self._inner.handle_request(request)
        except Exception:
            self._recorder.attempt(name, time.perf_counter() - start, error=True)
            raise
        self._recorder.attempt(name, time.perf_counter() - start, error=response.status_code >= 500)
        return response

    def close(self) -> None:
        """Close the wrapped transport's pool."""
        if self._inner is not None:
            self._inner.close()

    # What the libraries' ``BaseTransport`` does: the client enters and exits its transport with itself.
    def __enter__(self) -> AttemptRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _EventHandler(logging.Handler):
    """Turns the mesh's resilience log lines into the recorder's events, with backend names for addresses."""

    def __init__(self, fleet: Fleet, recorder: Recorder) -> None:
        super().__init__(logging.INFO)
        self._fleet = fleet
        self._recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._recorder.event(self._fleet.readable(record.getMessage()))
        except Exception:  # a logging handler must never raise into the request path
            self.handleError(record)


@contextlib.contextmanager
def mesh_events(fleet: Fleet, recorder: Recorder) -> Iterator[None]:
    """Route the ``meshlib.resilience`` log lines (INFO and up) to ``recorder`` instead of stderr, for a while.

    They would otherwise scroll through the live table (Python's last-resort handler prints WARNINGs to
    stderr); as events they are shown under it. The logger's level, propagation and handlers are restored.
    """
    log = logging.getLogger(EVENTS_LOGGER)
    handler = _EventHandler(fleet, recorder)
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def send_one(client: meshlib.Client, url: str, recorder: Recorder) -> None:
    """Send one call through the mesh and record how long the caller waited and whether it failed.

    A 5xx here is what the caller got after the mesh's retries, as is an exception of the client's HTTP
    library (every endpoint's breaker open, deadline exceeded, ...): both count as caller errors.
    """
    errors = (importlib.import_module(client.http_library).HTTPError, meshlib.MeshError)
    start = time.perf_counter()
    try:
        response = client.get(url)
    except errors:
        recorder.call(time.perf_counter() - start, error=True)
        return
    recorder.call(time.perf_counter() - start, error=response.status_code >= 500)


@dataclass(frozen=True)
class EndpointHealth:
    """The mesh's view of one endpoint: requests in flight, breaker state, ejected by outlier detection."""

    inflight: int = 0
    breaker: str = "-"
    ejected: bool = False
    trips: int = 0


def service_status(client: meshlib.Client, name: str = SERVICE) -> ServiceStatus | None:
    """The demo service in a fresh ``client.mesh_status()`` snapshot (``None``: not in it)."""
    return next((service for service in client.mesh_status().services if service.name == name), None)


def health_by_name(service: ServiceStatus | None, names: dict[str, str]) -> dict[str, EndpointHealth]:
    """Every endpoint's :class:`EndpointHealth`, by backend name, from the service's ``mesh_status()`` entry."""
    if service is None:
        return {}
    return {
        names.get(endpoint.address, endpoint.address): EndpointHealth(
            inflight=endpoint.inflight,
            breaker=endpoint.breaker,
            ejected=endpoint.ejected,
            trips=endpoint.breaker_opens,
        )
        for endpoint in service.endpoints
    }


def retries_of(service: ServiceStatus | None) -> tuple[int, int]:
    """The retries the service's retry budget granted and refused so far (from ``mesh_status()``)."""
    if service is None:
        return 0, 0
    return service.budget.retries, service.budget.exhausted


@dataclass(frozen=True)
class EndpointRow:
    """One line of the table: what one endpoint got, how it answered, and how the mesh sees it."""

    name: str
    role: str
    attempts: int
    share: float
    p50: float
    p99: float
    errors: int
    breaker: str
    ejected: bool
    inflight: int


def build_rows(fleet: Fleet, recorder: Recorder, health: dict[str, EndpointHealth]) -> list[EndpointRow]:
    """Table rows for every backend (in fleet order), plus any address no backend has (none expected)."""
    seen = recorder.attempts()
    total = sum(len(latencies) for latencies, _ in seen.values())
    order = [backend.name for backend in fleet.group] + sorted(set(seen) - set(fleet.roles))
    rows = []
    for name in order:
        latencies, errors = seen.get(name, ([], 0))
        state = health.get(name, EndpointHealth())
        rows.append(
            EndpointRow(
                name=name,
                role=fleet.roles.get(name, "?"),
                attempts=len(latencies),
                share=len(latencies) / total if total else 0.0,
                p50=percentile(latencies, 50),
                p99=percentile(latencies, 99),
                errors=errors,
                breaker=state.breaker,
                ejected=state.ejected,
                inflight=state.inflight,
            )
        )
    return rows


@dataclass(frozen=True)
class PhaseResult:
    """The outcome of one balancer's run: per-endpoint rows, what callers saw, what the mesh did."""

    balancer: str
    rows: list[EndpointRow]
    elapsed: float
    #: Calls made (requests the application sent) and how many failed for the application.
    calls: int
    caller_errors: int
    #: Latency percentiles of the calls (what the application waited, retries included).
    p50: float
    p99: float
    #: Retries the retry budget granted and refused.
    retries: int
    refused: int
    #: Backends whose breaker opened or that outlier detection ejected during the phase.
    removed: frozenset[str]
    #: The mesh settings the phase ran with (the defaults: the user's environment is ignored).
    settings: meshlib.ResilienceSettings
    events: list[str]

    @property
    def total(self) -> int:
        """Calls made in this phase."""
        return self.calls

    @property
    def attempts(self) -> int:
        """Attempts the endpoints received, first tries and retries."""
        return sum(row.attempts for row in self.rows)

    @property
    def attempts_per_call(self) -> float:
        """Retry amplification: attempts per call (1.0 when nothing was retried)."""
        return self.attempts / self.calls if self.calls else 0.0

    @property
    def error_rate(self) -> float:
        """Share of calls that failed for the caller (a 5xx or an exception, after retries)."""
        return self.caller_errors / self.calls if self.calls else 0.0

    def share(self, role: str) -> float:
        """Share of this phase's attempts that went to backends with ``role``."""
        return sum(row.share for row in self.rows if row.role == role)

    def role_attempts(self, role: str) -> int:
        """Attempts that went to backends with ``role``."""
        return sum(row.attempts for row in self.rows if row.role == role)

    def removed_role(self, role: str) -> bool:
        """Whether every backend with ``role`` was taken out of rotation (breaker opened or ejected)."""
        names = [row.name for row in self.rows if row.role == role]
        return bool(names) and all(name in self.removed for name in names)

    def state(self, role: str) -> str:
        """The final mesh state of the backends with ``role``: ``ejected``, the breaker state if not closed, both,
        or ``in rotation``."""
        rows = [row for row in self.rows if row.role == role]
        parts = []
        if rows and all(row.ejected for row in rows):
            parts.append("ejected")
        if rows and all(row.breaker not in (BREAKER_CLOSED, "-") for row in rows):
            parts.append(rows[0].breaker if len({row.breaker for row in rows}) == 1 else "not closed")
        return ", ".join(parts) or "in rotation"


# --- rendering ----------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def _percent(ratio: float) -> str:
    return f"{ratio * 100:g} %"


def render_table(
    title: str,
    rows: Sequence[EndpointRow],
    *,
    calls: CallTotals,
    retries: tuple[int, int],
    events: Sequence[str],
    total: int,
    elapsed: float,
) -> list[str]:
    """The per-endpoint table, the callers' summary and the latest events, as lines (no trailing newlines)."""
    header = (
        f"{'endpoint':<9} {'attempts':>8} {'share':>6} {'p50':>8} {'p99':>8} {'errors':>6}"
        f" {'breaker':<9} {'ejected':<7} {'in-flight':>9}"
    )
    lines = [f"{title}: {calls.calls}/{total} requests, {elapsed:.1f} s", f"  {header}"]
    lines.extend(
        f"  {row.name:<9} {row.attempts:>8} {row.share:>6.1%} {_ms(row.p50):>8} {_ms(row.p99):>8} {row.errors:>6}"
        f" {row.breaker:<9} {'yes' if row.ejected else 'no':<7} {row.inflight:>9}"
        for row in rows
    )
    attempts = sum(row.attempts for row in rows)
    granted, refused = retries
    rate = calls.errors / calls.calls if calls.calls else 0.0
    per_call = f"{attempts / calls.calls:.3f}" if calls.calls else "-"
    lines += [
        f"  callers: {calls.calls} requests, {calls.errors} errors ({rate:.1%}), "
        f"p50 {_ms(percentile(calls.latencies, 50))}, p99 {_ms(percentile(calls.latencies, 99))}",
        f"  retries: {granted} ({per_call} attempts per request), {refused} refused by the retry budget",
    ]
    if events:
        shown = list(events[-MAX_EVENTS:])
        if len(events) > len(shown):
            shown.insert(0, f"... {len(events) - len(shown)} earlier")
        lines.append("  events:")
        lines.extend(f"    {event}" for event in shown)
    return lines


def render_comparison(results: Sequence[PhaseResult]) -> list[str]:
    """The closing comparison: one column per balancer, the rows a reader should compare, and what they mean."""
    metrics: list[tuple[str, Callable[[PhaseResult], str]]] = [
        ("requests", lambda r: str(r.calls)),
        ("caller error rate", lambda r: f"{r.error_rate:.1%}"),
        ("attempts per request", lambda r: f"{r.attempts_per_call:.3f}"),
        ("retries", lambda r: str(r.retries)),
        ("retries refused by budget", lambda r: str(r.refused)),
        ("share to slow backend", lambda r: f"{r.share(SLOW):.1%}"),
        ("share to failing backend", lambda r: f"{r.share(FAILING):.1%}"),
        ("failing backend attempts", lambda r: str(r.role_attempts(FAILING))),
        ("failing backend at end", lambda r: r.state(FAILING)),
        ("p50 latency", lambda r: _ms(r.p50)),
        ("p99 latency", lambda r: _ms(r.p99)),
        ("total time", lambda r: f"{r.elapsed:.2f} s"),
        ("throughput", lambda r: f"{r.calls / r.elapsed:.0f} req/s" if r.elapsed > 0 else "-"),
    ]
    lines = ["Comparison (shares are of attempts; latencies and errors as callers saw them)"]
    lines.append("  " + f"{'':<26}" + "".join(f"{r.balancer:>15}" for r in results))
    lines.extend("  " + f"{label:<26}" + "".join(f"{value(r):>15}" for r in results) for label, value in metrics)
    return [*lines, "", *explain(results)]


def _each(results: Sequence[PhaseResult], value: Callable[[PhaseResult], object], unit: str) -> str:
    """``"5 attempts with p2c_ewma and 7 with round_robin"``: how the notes cite this run's numbers."""
    parts = [f"{value(r)}{f' {unit}' if i == 0 else ''} with {r.balancer}" for i, r in enumerate(results)]
    return " and ".join(parts) if len(parts) <= 2 else ", ".join(parts)


def explain(results: Sequence[PhaseResult], width: int = 106) -> list[str]:
    """The notes under the comparison, with this run's numbers in them, wrapped to ``width`` columns."""
    if not results:
        return []
    settings = results[0].settings
    stayed = [r.balancer for r in results if not r.removed_role(FAILING)]
    if stayed:
        taken_out = f"it stayed in rotation with {', '.join(stayed)} (see the events above)."
    else:
        taken_out = (
            f"after {settings.outlier_failures} consecutive failures outlier detection ejected it (for "
            f"{settings.outlier_base_ejection:g} s) and its breaker opened: it got "
            f"{_each(results, lambda r: r.role_attempts(FAILING), 'attempts')}, not 1 in 5."
        )
    budget = (
        f"the retry budget ({_percent(settings.retry_budget_fraction)} of requests + "
        f"{settings.retry_budget_min_per_second}/s)"
    )
    if any(r.refused for r in results):
        refused = _each(results, lambda r: r.refused, "refused")
        retried = f"Its 503s were retried on another endpoint until {budget} ran out ({refused})"
    else:
        retried = f"Each of its 503s (to a GET, which is idempotent) was retried on another endpoint, within {budget}"
    notes = [
        "p2c_ewma (the default) compares latency x in-flight of two random endpoints and drains the slow one after "
        "its first slow answers; round_robin keeps giving it its turn (1 in 4 once the failing one is out), and "
        "callers wait for those: see p99 and total time.",
        f"The failing backend answers 503 as fast as a healthy one, so latency never steers away from it; instead "
        f"{taken_out}",
        f"{retried}, so callers saw {_each(results, lambda r: r.caller_errors, 'errors')}: without retries and "
        "ejection, round_robin would have failed 1 request in 5.",
        "Callers and backends share one Python process here, so the balancer that finishes more requests per second "
        "also queues more on the CPU: compare p99 and total time more than p50.",
    ]
    return [line for note in notes for line in textwrap.wrap(note, width, initial_indent="- ", subsequent_indent="  ")]


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
    """For terminals: redraw the table in place with ANSI escapes (cursor up N lines, clear to end).

    Frames are clipped to the terminal's width: a wrapped line would take two rows and the next frame, moving
    up one row per line, would leave the top of this one on screen. The final frame is drawn whole.
    """

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._drawn = 0

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self._out.fileno()).columns
        except (AttributeError, OSError, ValueError):  # not a real terminal (a test's stand-in)
            columns = 0
        # A pseudo-terminal may report 0 columns: then $COLUMNS, or 80.
        return columns if columns > 0 else shutil.get_terminal_size().columns

    def _draw(self, lines: list[str]) -> None:
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self._out.write(up + "\x1b[J" + "\n".join(lines) + "\n")
        self._out.flush()
        self._drawn = len(lines)

    def update(self, lines: list[str]) -> None:
        """Replace the previously drawn table with ``lines`` (clipped to the terminal's width)."""
        width = max(self._width() - 1, 20)
        self._draw([line[:width] for line in lines])

    def finish(self, lines: list[str]) -> None:
        """Draw the final table, unclipped, and leave it on screen."""
        self._draw(lines)
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
    """Send ``options.requests`` calls through a fresh ``meshlib.Client`` balanced by ``balancer``.

    A fresh client per phase so neither balancer inherits the other's latency history, breakers, ejections
    or retry budget. Its configuration is read from an empty environment (``MeshConfig.from_env({})``), which
    keeps the user's ``MESHLIB_*`` variables out of the demo and tells the phase the settings it ran with. The
    main thread redraws the view (and notes which endpoints the mesh took out) while a pool of
    ``options.concurrency`` threads sends.
    """
    title = f"[{balancer}] {SERVICE}, {options.concurrency} callers"
    recorder = Recorder()
    url = f"http://{SERVICE}/work"
    config = meshlib.MeshConfig.from_env({}, services={SERVICE: fleet.target}, lb=balancer)
    own = config.service(SERVICE)  # the service's own settings, if any, else the mesh's (as the client applies them)
    settings = own.resilience if own is not None and own.resilience is not None else config.resilience
    recorder_transport = AttemptRecorder(fleet.names, recorder)
    transport: Any = recorder_transport  # a transport of either library: typed for neither
    removed: set[str] = set()
    with (
        mesh_events(fleet, recorder),
        meshlib.Client(config=config, transport=transport) as client,
        ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="meshlib-demo") as pool,
    ):
        recorder_transport.bind(client.http_library)

        def table(elapsed: float | None = None) -> list[str]:
            service = service_status(client)
            health = health_by_name(service, fleet.names)
            removed.update(name for name, h in health.items() if h.ejected or h.trips or h.breaker == BREAKER_OPEN)
            rows = build_rows(fleet, recorder, health)
            retries = retries_of(service)
            if elapsed is None:
                elapsed = time.monotonic() - recorder.started
            return render_table(
                title,
                rows,
                calls=recorder.calls(),
                retries=retries,
                events=recorder.events(),
                total=options.requests,
                elapsed=elapsed,
            )

        futures: list[Future[None]] = [pool.submit(send_one, client, url, recorder) for _ in range(options.requests)]
        wait_all(futures, lambda: view.update(table()))
        elapsed = time.monotonic() - recorder.started
        view.finish(table(elapsed))
        service = service_status(client)
        rows = build_rows(fleet, recorder, health_by_name(service, fleet.names))
        retries, refused = retries_of(service)
    calls = recorder.calls()
    return PhaseResult(
        balancer=balancer,
        rows=rows,
        elapsed=elapsed,
        calls=calls.calls,
        caller_errors=calls.errors,
        p50=percentile(calls.latencies, 50),
        p99=percentile(calls.latencies, 99),
        retries=retries,
        refused=refused,
        removed=frozenset(removed),
        settings=settings,
        events=recorder.events(),
    )


def describe(fleet: Fleet, options: DemoOptions) -> list[str]:
    """The opening lines: what is about to run, on which addresses, and how to read the tables."""
    lines = [
        f"meshlib demo: {len(fleet.group)} loopback backends as service {SERVICE!r}, "
        f"{options.requests} requests per balancer, {options.concurrency} concurrent callers",
    ]
    detail = {HEALTHY: "~5 ms lognormal", SLOW: "80-150 ms", FAILING: "503 to every request, ~5 ms"}
    lines.extend(
        f"  {backend.name:<12} {backend.address:<22} {detail[fleet.roles[backend.name]]}" for backend in fleet.group
    )
    defaults = meshlib.MeshConfig.from_env({})  # what the demo's clients run with: no variable, every default
    mesh, policy = defaults.resilience, defaults.policy
    statuses = "/".join(str(status) for status in sorted(policy.retry_on or ()))
    lines += [
        f"Mesh defaults: {policy.retries} retry on {statuses} and connect failures within a retry budget "
        f"({_percent(mesh.retry_budget_fraction)} of requests",
        f"+ {mesh.retry_budget_min_per_second}/s); the breaker opens after {mesh.breaker_failures} consecutive "
        f"failures, outlier detection ejects ({mesh.outlier_base_ejection:g} s) after {mesh.outlier_failures}.",
        "Per endpoint: attempts it received (first tries and retries), their latency to headers and errors",
        "(5xx, connection failures), breaker state, ejected or not. 'callers': what the application saw.",
    ]
    return lines


def run_demo(options: DemoOptions = DemoOptions(), out: TextIO | None = None) -> list[PhaseResult]:
    """Run both balancer phases on the same backends, print each table and the comparison, then the traffic
    split phase (:func:`run_split_phase`) and the hedging phase (:func:`run_hedge_phase`); return the balancer
    phases' results."""
    stream = out if out is not None else sys.stdout
    live = options.live and stream.isatty()
    results: list[PhaseResult] = []
    with hidden_cursor(stream, live):
        with start_fleet(backend_specs(options.seed)) as fleet:
            print("\n".join(describe(fleet, options)), file=stream, flush=True)
            for balancer in BALANCERS:
                print(file=stream)
                view: PhaseView = LiveView(stream) if live else PlainView(stream)
                results.append(run_phase(balancer, fleet, options, view))
        print(file=stream)
        print("\n".join(render_comparison(results)), file=stream, flush=True)
        print(file=stream)
        run_split_phase(options, LiveView(stream) if live else PlainView(stream))
        print(file=stream)
        run_hedge_phase(options, LiveView(stream) if live else PlainView(stream))
    return results


# --- the traffic split phase ------------------------------------------------------------------------------

#: The two versions the split phase's routes file divides ``SERVICE`` between (each a service of one backend).
SPLIT_BACKENDS = (f"{SERVICE}-v1", f"{SERVICE}-v2")
#: The weights (v1, v2) of each version of the routes file, in order: a canary, then half the traffic.
SPLIT_STEPS = ((90, 10), (50, 50))
#: Requests each version of the file routes (at most ``DemoOptions.requests``).
SPLIT_REQUESTS = 500
#: How long the phase waits for the client to apply an edit of the file (it takes one reload interval).
SPLIT_APPLY_TIMEOUT = 10.0
#: How often the split phase's client checks the routes file (the default is 1 s; quicker for a demo).
SPLIT_RELOAD_INTERVAL = "100ms"
#: The response header the route sets: which version of the file (its weights) routed a call.
SPLIT_HEADER = "x-demo-split"

SPLIT_ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {service}-split}}
spec:
  parentRefs: [{{group: "", kind: Service, name: {service}}}]
  rules:
  - backendRefs: [{{name: {v1}, weight: {w1}}}, {{name: {v2}, weight: {w2}}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{set: [{{name: {header}, value: "{w1}/{w2}"}}]}}
"""


def split_route(w1: int, w2: int) -> str:
    """The routes file of one step: every call to ``SERVICE`` split ``w1``/``w2`` between its two versions."""
    v1, v2 = SPLIT_BACKENDS
    return SPLIT_ROUTE.format(service=SERVICE, v1=v1, v2=v2, w1=w1, w2=w2, header=SPLIT_HEADER)


def write_atomically(path: str, text: str) -> None:
    """Replace the file at ``path`` by writing a sibling and renaming it over (the watcher never sees half)."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


@dataclass(frozen=True)
class SplitStep:
    """One version of the routes file: its weights, its version (``mesh_status()``) and what it routed."""

    weights: tuple[int, int]
    version: str
    #: Calls this version routed, by the backend that answered them.
    counts: dict[str, int]

    @property
    def label(self) -> str:
        """``"90/10"``."""
        return f"{self.weights[0]}/{self.weights[1]}"

    @property
    def total(self) -> int:
        """Calls this version of the file routed."""
        return sum(self.counts.values())

    def share(self, backend: str) -> float:
        """Share (0-1) of this version's calls that ``backend`` answered."""
        return self.counts.get(backend, 0) / self.total if self.total else 0.0


@dataclass(frozen=True)
class SplitResult:
    """The split phase: each step, and the calls that failed (for the callers) over the whole phase."""

    steps: list[SplitStep]
    calls: int
    errors: int


class SplitTally:
    """Calls of the split phase by (version of the file that routed them, backend), and failures. One lock."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self._seen: dict[tuple[str, str], int] = {}
        self.errors = 0

    def record(self, split: str | None, backend: str | None) -> None:
        """One call: answered by ``backend`` as routed by ``split`` (``None``: it failed)."""
        with self.changed:
            if split is None or backend is None:
                self.errors += 1
            else:
                self._seen[(split, backend)] = self._seen.get((split, backend), 0) + 1
            self.changed.notify_all()

    def routed_by(self, split: str) -> dict[str, int]:
        """Calls per backend among those the version ``split`` of the file routed."""
        with self.changed:
            return {backend: n for (label, backend), n in self._seen.items() if label == split}

    def calls(self) -> int:
        """Every call made so far, failed ones included."""
        with self.changed:
            return sum(self._seen.values()) + self.errors


def send_until(client: meshlib.Client, url: str, tally: SplitTally, stop: threading.Event) -> None:
    """One caller of the split phase: GET ``url`` until ``stop``, recording which version routed each call."""
    errors = (importlib.import_module(client.http_library).HTTPError, meshlib.MeshError)
    while not stop.is_set():
        try:
            response = client.get(url)
        except errors:
            tally.record(None, None)
            continue
        ok = response.status_code < 500
        tally.record(response.headers.get(SPLIT_HEADER) if ok else None, response.headers.get("x-backend"))


def render_split(steps: Sequence[SplitStep], tally: SplitTally, path: str, options: DemoOptions) -> list[str]:
    """The split phase's table: one line per version of the file applied so far, then what callers saw."""
    v1, v2 = SPLIT_BACKENDS
    lines = [
        f"[split] {SERVICE} routed by a routes file (MESHLIB_ROUTES_FILE={path}), {options.concurrency} callers",
        f"  {'weights':<8} {'version':<13} {'requests':>8} {v1:>17} {v2:>17}",
    ]
    for step in steps:
        cells = [f"{step.counts.get(name, 0):>6} ({step.share(name):6.1%})" for name in SPLIT_BACKENDS]
        lines.append(f"  {step.label:<8} {step.version:<13} {step.total:>8} {cells[0]:>17} {cells[1]:>17}")
    calls = tally.calls()
    lines.append(f"  callers: {calls} requests, {tally.errors} errors, while the file was edited under them")
    return lines


def wait_for_version(client: meshlib.Client, previous: str | None, tick: Callable[[], None]) -> str:
    """The routes version the client serves once it is no longer ``previous`` (``mesh_status()``, polled every
    :data:`REFRESH_SECONDS` with ``tick`` to redraw); ``TimeoutError`` after :data:`SPLIT_APPLY_TIMEOUT`."""
    deadline = time.monotonic() + SPLIT_APPLY_TIMEOUT
    while True:
        routes = client.mesh_status().routes
        if routes is not None and routes.version != previous:
            return routes.version
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo's routes file was not applied within {SPLIT_APPLY_TIMEOUT:g} s")
        tick()
        time.sleep(REFRESH_SECONDS / 4)  # a status snapshot is polled: there is no event to wait on


def run_split_phase(options: DemoOptions, view: PhaseView) -> SplitResult:
    """A routes file splits ``SERVICE`` 90/10 between two versions, then is edited to 50/50 while callers send.

    Two loopback backends become the services ``demo-api-v1`` and ``demo-api-v2``; ``demo-api`` itself is
    only the parent of a Gateway API HTTPRoute in a temporary ``MESHLIB_ROUTES_FILE``. ``options.concurrency``
    callers send until each version of the file has routed ``min(options.requests, SPLIT_REQUESTS)`` calls;
    the file is rewritten (atomically) between the two steps and the phase waits for ``mesh_status()`` to show
    the new version. Each answer carries the weights of the version that routed it (a response header the
    route sets), so a step's shares count exactly that version's calls. Like the balancer phases it ignores
    the user's ``MESHLIB_*`` settings.
    """
    per_step = min(options.requests, SPLIT_REQUESTS)
    tally = SplitTally()
    steps: list[SplitStep] = []
    stop = threading.Event()
    with (
        BackendGroup(Backend(name) for name in SPLIT_BACKENDS) as group,
        tempfile.TemporaryDirectory(prefix="meshlib-demo-") as folder,
    ):
        path = os.path.join(folder, "routes.yaml")
        write_atomically(path, split_route(*SPLIT_STEPS[0]))
        environ = {"MESHLIB_ROUTES_FILE": path, "MESHLIB_ROUTES_RELOAD_INTERVAL": SPLIT_RELOAD_INTERVAL}
        services = {backend.name: f"static://{backend.address}" for backend in group}
        config = meshlib.MeshConfig.from_env(environ, services=services)
        callers: list[threading.Thread] = []
        with meshlib.Client(config=config) as client:

            def table() -> list[str]:
                shown = [*steps]
                if current is not None:
                    shown.append(SplitStep(current[0], current[1], tally.routed_by(current[2])))
                return render_split(shown, tally, path, options)

            current: tuple[tuple[int, int], str, str] | None = None
            try:
                version: str | None = None
                for number, weights in enumerate(SPLIT_STEPS):
                    if number:
                        write_atomically(path, split_route(*weights))
                    version = wait_for_version(client, version, lambda: view.update(table()))
                    label = f"{weights[0]}/{weights[1]}"
                    current = (weights, version, label)
                    if not callers:
                        for i in range(options.concurrency):
                            caller = threading.Thread(
                                target=send_until,
                                args=(client, f"http://{SERVICE}/work", tally, stop),
                                name=f"meshlib-demo-split-{i}",
                                daemon=True,
                            )
                            caller.start()
                            callers.append(caller)

                    def step_done(label: str = label) -> bool:
                        return sum(tally.routed_by(label).values()) >= per_step

                    done = False
                    while not done:  # redraw every REFRESH_SECONDS until this version routed its share of calls
                        with tally.changed:
                            done = tally.changed.wait_for(step_done, REFRESH_SECONDS)
                        view.update(table())
                    steps.append(SplitStep(weights, version, {}))
                    current = None
            finally:
                stop.set()
                for caller in callers:
                    caller.join(30)
        # Calls in flight when a step ended were counted under it afterwards: the final counts.
        steps[:] = [SplitStep(s.weights, s.version, tally.routed_by(s.label)) for s in steps]
    view.finish([*table(), *split_notes(steps)])
    return SplitResult(steps=list(steps), calls=tally.calls(), errors=tally.errors)


def split_notes(steps: Sequence[SplitStep], width: int = 106) -> list[str]:
    """What to read in the split table, with this run's numbers."""
    if not steps:
        return []
    v2 = SPLIT_BACKENDS[1]
    observed = ", ".join(f"{step.share(v2):.1%} for weights {step.label}" for step in steps)
    notes = [
        f"Each call drew its backend by the rule's weights: {v2} answered {observed}. The weights changed by "
        "editing the file under the running client: no restart, and calls in flight finished on the table they "
        "started with (each share counts only the calls that version of the file routed).",
        "See docs/routing.md for the model and a canary walk-through, and examples/canary.py for a full rollout.",
    ]
    return [line for note in notes for line in textwrap.wrap(note, width, initial_indent="- ", subsequent_indent="  ")]


# --- the hedging phase ------------------------------------------------------------------------------------

#: The service of the hedging phase: every instance of it stalls on some requests to its one endpoint.
HEDGE_SERVICE = "demo-tail"
HEDGE_BACKENDS = 3
#: Share of requests that stall (a seeded draw per backend) and for how long; the others take ~3 ms.
HEDGE_STALL_SHARE = 0.03
HEDGE_STALL_SECONDS = 0.150
#: Calls per half of the phase (at most ``DemoOptions.requests``), after :data:`HEDGE_WARMUP` uncounted ones.
HEDGE_REQUESTS = 600
#: Calls before each half is measured: they fill the latency window the p95 delay is read from (it needs 100).
HEDGE_WARMUP = 120
#: The policy of the second half: a second attempt when the first has not answered by the service's p95.
HEDGE_POLICY = meshlib.HedgePolicy(max_attempts=2, percentile=0.95)
#: The hedge budget of the phase's client (``MESHLIB_HEDGE_MAX_EXTRA_LOAD``; the default is 0.05). A p95 trigger
#: fires on ~5 % of calls by definition, so a 5 % budget runs dry in any burst of slow calls (a loaded machine
#: makes them) and leaves stalls unhedged; at 10 % the trigger, not the cap, decides, and the run is repeatable.
HEDGE_MAX_EXTRA_LOAD = 0.10


def stall_delay(seed: int) -> Callable[[], float]:
    """A backend's ``delay_fn``: :data:`HEDGE_STALL_SECONDS` on :data:`HEDGE_STALL_SHARE` of requests (a seeded
    draw), else a lognormal ~3 ms. Any instance, any request: no endpoint is slower than another, so latency-aware
    balancing cannot steer around it; only a second copy of the request can."""
    rng = random.Random(seed)
    base = lognormal_delay(0.003, 0.3, seed=seed + 1)

    def draw() -> float:
        return HEDGE_STALL_SECONDS if rng.random() < HEDGE_STALL_SHARE else base()

    return draw


@dataclass(frozen=True)
class HedgeHalf:
    """One half of the hedging phase, as the callers and the backends saw it."""

    label: str
    calls: int
    errors: int
    p50: float
    p99: float
    #: Requests the backends received for these calls (their own counters: first attempts and hedges).
    attempts: int
    #: Hedges sent and won (a hedge, not the original, answered), from ``mesh_status()``; ``None``: not reported.
    sent: int | None
    won: int | None

    @property
    def extra_load(self) -> float:
        """Requests the backends received beyond one per call, as a share of calls."""
        return (self.attempts - self.calls) / self.calls if self.calls else 0.0


@dataclass(frozen=True)
class HedgeResult:
    """The hedging phase: without, then with hedging, on the same backends and client."""

    halves: list[HedgeHalf]
    #: The hedge delay ``mesh_status()`` reported at the end (seconds), ``None`` if not reported.
    delay: float | None


def hedge_counters(client: meshlib.Client) -> tuple[int, int, float | None]:
    """(hedges sent, hedges won, delay in seconds of the last hedging call) of :data:`HEDGE_SERVICE`, from
    ``mesh_status()`` (the delay is ``None`` while the latency window is cold)."""
    service = service_status(client, HEDGE_SERVICE)
    if service is None:
        return 0, 0, None
    hedge = service.hedge
    return hedge.sent, hedge.won, None if hedge.delay_ms is None else hedge.delay_ms / 1000


def render_hedging(halves: Sequence[HedgeHalf], options: DemoOptions, delay: float | None = None) -> list[str]:
    """The hedging table: one line per half, as the other tables print latencies and shares."""
    lines = [
        f"[hedging] {HEDGE_SERVICE}: {HEDGE_BACKENDS} backends, {HEDGE_STALL_SHARE:.0%} of requests stall "
        f"{HEDGE_STALL_SECONDS * 1000:.0f} ms (any backend), {options.concurrency} callers",
        f"  {'':<16} {'requests':>8} {'errors':>6} {'p50':>8} {'p99':>9} {'attempts':>8} {'hedges':>6} {'won':>5}"
        f" {'extra load':>10}",
    ]
    for half in halves:
        sent = "-" if half.sent is None else str(half.sent)
        won = "-" if half.won is None else str(half.won)
        lines.append(
            f"  {half.label:<16} {half.calls:>8} {half.errors:>6} {_ms(half.p50):>8} {_ms(half.p99):>9}"
            f" {half.attempts:>8} {sent:>6} {won:>5} {half.extra_load:>10.1%}"
        )
    if delay is not None:
        lines.append(f"  hedge delay now {_ms(delay)} (the service's p95 over the last 30 s)")
    return lines


def hedge_notes(halves: Sequence[HedgeHalf], width: int = 106) -> list[str]:
    """What to read in the hedging table, with this run's numbers."""
    if len(halves) < 2:
        return []
    off, on = halves[0], halves[1]
    notes = [
        f"The same calls, first plain, then inside meshlib.policy(hedge=HedgePolicy(max_attempts=2, "
        f"percentile=0.95)): a call not answered by the service's p95 latency sends a second copy to another "
        f"backend and keeps the first answer; the loser is cancelled. p99 went from {_ms(off.p99)} to "
        f"{_ms(on.p99)}, for {on.extra_load:.1%} more requests at the backends (their own counts).",
        f"Hedges are capped by their own budget (Finagle's maxExtraLoad: 5% of requests by default, "
        f"{HEDGE_MAX_EXTRA_LOAD:.0%} here, so that the p95 trigger rather than the cap decides) and also draw on "
        "the retry budget; a POST is never hedged without an opt-in. See docs/resilience.md.",
    ]
    return [line for note in notes for line in textwrap.wrap(note, width, initial_indent="- ", subsequent_indent="  ")]


def run_hedge_phase(options: DemoOptions, view: PhaseView) -> HedgeResult:
    """:data:`HEDGE_BACKENDS` backends of :data:`HEDGE_SERVICE` stall on some requests; the same number of calls
    goes through one client without, then with, :data:`HEDGE_POLICY` (a ``meshlib.policy()`` scope per call).

    Each half first sends :data:`HEDGE_WARMUP` uncounted calls (so the p95 window is warm and the hedge budget has
    its first deposits), then ``min(options.requests, HEDGE_REQUESTS)`` measured ones from ``options.concurrency``
    threads. Attempts are the backends' own request counts; hedges sent and won come from ``mesh_status()``.
    Like the other phases it ignores the user's ``MESHLIB_*`` settings.
    """
    count = min(options.requests, HEDGE_REQUESTS)
    halves: list[HedgeHalf] = []
    delay: float | None = None
    specs = [
        Backend(f"tail-{i}", behavior=Behavior(delay_fn=stall_delay(options.seed * 31 + i)))
        for i in range(1, HEDGE_BACKENDS + 1)
    ]
    with BackendGroup(specs) as group:
        config = meshlib.MeshConfig.from_env(
            {"MESHLIB_HEDGE_MAX_EXTRA_LOAD": str(HEDGE_MAX_EXTRA_LOAD)},
            services={HEDGE_SERVICE: "static://" + ",".join(group.addresses)},
        )
        url = f"http://{HEDGE_SERVICE}/report"
        with (
            meshlib.Client(config=config) as client,
            ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="meshlib-demo-hedge") as pool,
        ):
            for label, hedge in (("without hedging", None), ("with hedging", HEDGE_POLICY)):
                recorder = Recorder()

                def call(sink: Recorder, hedge: meshlib.HedgePolicy | None = hedge) -> None:
                    if hedge is None:
                        send_one(client, url, sink)
                        return
                    with meshlib.policy(hedge=hedge):
                        send_one(client, url, sink)

                wait_all([pool.submit(call, Recorder()) for _ in range(HEDGE_WARMUP)], lambda: None)
                before_count = group.total_count

                def table(current: str = label, sink: Recorder = recorder, start: int = before_count) -> list[str]:
                    totals = sink.calls()
                    live = HedgeHalf(
                        current,
                        totals.calls,
                        totals.errors,
                        percentile(totals.latencies, 50),
                        percentile(totals.latencies, 99),
                        group.total_count - start,
                        None,
                        None,
                    )
                    return render_hedging([*halves, live], options)

                sent0, won0, _ = hedge_counters(client)
                futures = [pool.submit(call, recorder) for _ in range(count)]
                wait_all(futures, lambda: view.update(table()))
                sent1, won1, delay = hedge_counters(client)
                totals = recorder.calls()
                halves.append(
                    HedgeHalf(
                        label,
                        totals.calls,
                        totals.errors,
                        percentile(totals.latencies, 50),
                        percentile(totals.latencies, 99),
                        group.total_count - before_count,
                        sent1 - sent0,
                        won1 - won0,
                    )
                )
    view.finish([*render_hedging(halves, options, delay), *hedge_notes(halves)])
    return HedgeResult(halves, delay)
