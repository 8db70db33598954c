"""Shared measurement pieces: latency histogram, CPU meters, CPU pinning, interleaved repeats, results.

Why these choices:

* **Histogram**: latencies are kept as raw samples (8 bytes each; a scenario records at most a few hundred
  thousand) so percentiles are exact, and summarised as p50/p90/p99/p99.9 the way HdrHistogram reports
  them. numpy computes the percentiles when it is installed; a sorted list otherwise.
* **CPU**: the client's CPU comes from ``getrusage(RUSAGE_SELF)`` (all threads, microsecond resolution);
  servers' and proxies' CPU from ``/proc/<pid>/task/*/schedstat`` (nanoseconds, every thread), falling back
  to ``/proc/<pid>/stat`` (clock ticks) where schedstat is missing.
* **Pinning**: the client runs on CPU 1 and every server or proxy on CPU 0 (``taskset``), so they do not
  steal each other's cycles and CPU per request means the same thing in every variant.
* **Repeats**: variants run interleaved (the order rotates each repeat) so drift (thermal, noisy neighbours)
  hits them alike; the median of the repeats is reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
import statistics
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

_np: Any
try:  # optional: faster percentiles
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is in the bench extra
    _np = None

CLIENT_CPU = 1
SERVER_CPU = 0


# --------------------------------------------------------------------------------------------- histogram


class Histogram:
    """Latency samples (seconds) with HdrHistogram-style percentile summaries."""

    __slots__ = ("samples",)

    def __init__(self, samples: Iterable[float] = ()) -> None:
        self.samples = array("d", samples)

    def record(self, seconds: float) -> None:
        """Add one latency sample, in seconds."""
        self.samples.append(seconds)

    def merge(self, other: Histogram) -> None:
        """Add every sample of ``other``."""
        self.samples.extend(other.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def percentiles(self, ps: Sequence[float] = (50, 90, 99, 99.9)) -> list[float]:
        """The ``ps`` percentiles in seconds (NaN when empty); nearest-rank ("higher") like HdrHistogram."""
        if not self.samples:
            return [math.nan for _ in ps]
        if _np is not None:
            values = _np.frombuffer(self.samples, dtype=_np.float64)
            return [float(v) for v in _np.percentile(values, list(ps), method="higher")]
        ordered = sorted(self.samples)
        n = len(ordered)
        return [ordered[min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))] for p in ps]

    def summary_us(self) -> dict[str, float]:
        """``p50/p90/p99/p999/max/mean`` in microseconds, plus ``count``."""
        p50, p90, p99, p999 = self.percentiles()
        n = len(self.samples)
        return {
            "count": float(n),
            "p50_us": p50 * 1e6,
            "p90_us": p90 * 1e6,
            "p99_us": p99 * 1e6,
            "p999_us": p999 * 1e6,
            "max_us": (max(self.samples) * 1e6) if n else math.nan,
            "mean_us": (sum(self.samples) / n * 1e6) if n else math.nan,
        }


# --------------------------------------------------------------------------------------------- CPU


def self_cpu() -> float:
    """CPU seconds (user + system) used so far by this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def pid_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (all its threads); NaN if it cannot be read."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue
        if total > 0:
            return total
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, ValueError, IndexError):
        return math.nan


class CpuMeter:
    """CPU seconds used between :meth:`start` and :meth:`stop`, for this process and for some server pids."""

    def __init__(self, pids: Mapping[str, int] | None = None) -> None:
        self.pids = dict(pids or {})
        self._self0 = 0.0
        self._pid0: dict[str, float] = {}
        self.client = math.nan
        self.servers: dict[str, float] = {}

    def start(self) -> None:
        """Take the starting readings."""
        self._pid0 = {name: pid_cpu(pid) for name, pid in self.pids.items()}
        self._self0 = self_cpu()

    def stop(self) -> None:
        """Take the final readings: ``client`` and ``servers[name]`` hold CPU seconds used meanwhile."""
        self.client = self_cpu() - self._self0
        self.servers = {name: pid_cpu(pid) - self._pid0[name] for name, pid in self.pids.items()}


# --------------------------------------------------------------------------------------------- pinning


@dataclasses.dataclass(frozen=True)
class Pinning:
    """Where the client and servers run; ``server_prefix`` is prepended to server command lines."""

    pinned: bool
    note: str
    server_prefix: tuple[str, ...]


def pin_client() -> Pinning:
    """Pin this process to CPU 1 and tell servers to use CPU 0 (with ``taskset``), when the machine allows."""
    cpus = os.cpu_count() or 1
    taskset = shutil.which("taskset")
    if cpus < 2:
        return Pinning(False, f"not pinned: only {cpus} CPU", ())
    if not hasattr(os, "sched_setaffinity") or taskset is None:
        return Pinning(False, "not pinned: sched_setaffinity or taskset unavailable", ())
    try:
        os.sched_setaffinity(0, {CLIENT_CPU})
    except OSError as exc:
        return Pinning(False, f"not pinned: {exc}", ())
    return Pinning(True, f"client on CPU {CLIENT_CPU}, servers and proxies on CPU {SERVER_CPU}", (taskset, "-c", "0"))


# --------------------------------------------------------------------------------------------- repeats


def interleave(
    variants: Sequence[str], repeats: int, run: Callable[[str, int], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Run ``run(variant, repeat)`` for every variant ``repeats`` times, rotating the order each repeat."""
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(repeats):
        k = r % len(variants)
        for variant in [*variants[k:], *variants[:k]]:
            results[variant].append(run(variant, r))
    return results


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def median_row(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-key median over the repeats (numeric keys); other keys are taken from the first run."""
    row: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = median(float(run[key]) for run in runs)
        else:
            row[key] = value
    row["repeats"] = len(runs)
    return row


# --------------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class Check:
    """One target of a scenario: what was required, what was measured, PASS or MISS."""

    name: str
    target: str
    value: float
    passed: bool
    unit: str = ""
    note: str = ""

    @property
    def verdict(self) -> str:
        """``PASS``, ``MISS``, or ``n/a`` when the value could not be measured."""
        if math.isnan(self.value):
            return "n/a"
        return "PASS" if self.passed else "MISS"


@dataclasses.dataclass
class ScenarioResult:
    """What a scenario hands back: table rows, checks, free-form data for plots, notes."""

    name: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    checks: list[Check]
    notes: list[str] = dataclasses.field(default_factory=list)
    series: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN turned into ``None``)."""
        data: dict[str, Any] = {
            "name": self.name,
            "title": self.title,
            "seconds": round(self.seconds, 1),
            "columns": self.columns,
            "rows": self.rows,
            "checks": [dataclasses.asdict(c) | {"verdict": c.verdict} for c in self.checks],
            "notes": self.notes,
            "series": self.series,
        }
        return cast("dict[str, Any]", _clean(data))


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def fmt(value: Any) -> str:
    """A table cell: numbers with sensible precision, NaN as ``-``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        magnitude = abs(value)
        if 99.0 <= magnitude < 100.0:  # success rates: 99.9 vs 99.99 is the whole story
            return f"{value:.2f}"
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def render_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of ``rows`` restricted to ``columns``."""
    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out.extend("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
    return "\n".join(out)


def render_result(result: ScenarioResult) -> str:
    """The scenario's table, its checks with PASS/MISS, and its notes, as printed by ``python -m benchmarks``."""
    parts = [
        f"== {result.name.upper()}: {result.title}  ({result.seconds:.0f} s)",
        render_table(result.columns, result.rows),
    ]
    if result.checks:
        parts.append("")
        width = max(len(c.name) for c in result.checks)
        for c in result.checks:
            note = f"  ({c.note})" if c.note else ""
            parts.append(f"  [{c.verdict:4}] {c.name.ljust(width)}  {fmt(c.value)}{c.unit}  target {c.target}{note}")
    parts.extend(f"  note: {n}" for n in result.notes)
    return "\n".join(parts)


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is zero or either is NaN."""
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


@dataclasses.dataclass(frozen=True)
class Context:
    """What every scenario gets: mode, repeats, where to write, how servers are pinned."""

    quick: bool
    repeats: int
    out_dir: str
    pinning: Pinning

    def scale(self, full: float, quick: float) -> float:
        """``full`` normally, ``quick`` with ``--quick``."""
        return quick if self.quick else full
