"""What ``import meshlib`` costs against importing the HTTP library itself, in fresh processes.

``python -m benchmarks.import_time [--repeats N] [--importtime-runs K] [--compare DIR] [--out FILE]`` (about
30 s with the defaults). Target: ``import meshlib`` at most 40 ms more than ``import httpx``.

Each variant is a fresh ``python -c '<statement>'`` (the interpreter running this module), timed by the
parent from spawn to exit: what a CLI, a test run or a worker start-up pays. One untimed round comes first
(so every ``.pyc`` is written), then ``N`` timed rounds, interleaved, the order rotating each round, so
drift and other processes on the machine hit every variant alike. Variants:

* ``python`` -- ``pass``: interpreter start-up and ``site``, the floor every other row includes;
* ``httpx`` -- ``import httpx``;
* ``httpx2`` -- ``import httpx2``, when it is installed (it needs Python >= 3.11);
* ``meshlib`` -- ``import meshlib`` (which imports httpx);
* ``meshlib@<dir>`` -- with ``--compare DIR``: ``import meshlib`` from another checkout (``DIR`` holds its
  ``meshlib/``; e.g. ``git worktree add /tmp/main main``), for a before/after in the same rounds.

Reported: median and p90 of each variant's wall time, the same minus the ``python`` floor (the import
alone), its CPU time (the child's user + system time: less disturbed by other processes than wall time,
which includes waiting for a CPU), and ``meshlib - httpx``: the difference of the two within each round
(paired, so both saw the same machine), its median and p90, and the ratio of the medians. The target is
judged on the wall-time median. ``meshlib`` is always this checkout's (the repository root goes first on
``PYTHONPATH``; the path is printed), whatever is installed in the venv; children run with bytecode caching
on (``PYTHONDONTWRITEBYTECODE`` removed), as an installed package is.

Then ``python -X importtime -c 'import httpx; import meshlib'`` runs ``K`` times (median per module). httpx
comes first so that what it imports anyway (``ssl``, ``logging``, ``email``...) is charged to it; what is
left under ``meshlib`` is what meshlib adds. Reported: the 15 modules of that subtree with the largest
cumulative time, each with the module that imported it first, and for each heavy dependency
(dnspython, OpenTelemetry, tenacity, pybreaker, cryptography, asyncio, ssl...) its cumulative time and the
meshlib module whose top-level import pulled it in. ``-X importtime`` charges a module to its *first*
importer only, and its own overhead inflates small modules: use it to attribute, and the wall times to judge.

Results go to ``docs/performance/import_time.json``. A benchmark, not a test: nothing here fails on a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from benchmarks.harness import Histogram, Pinning, fmt, render_table
from benchmarks.report import machine, write_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "performance" / "import_time.json"
#: ``import meshlib`` may cost at most this much more than ``import httpx`` (milliseconds, medians).
TARGET_MS = 40.0
#: name -> statement run by ``python -c``; ``httpx2`` is dropped when not installed.
VARIANTS = {
    "python": "pass",
    "httpx": "import httpx",
    "httpx2": "import httpx2",
    "meshlib": "import meshlib",
}
#: Dependencies whose import cost is attributed to the meshlib module that pulled them in. A name is a
#: top-level package (every ``name.*`` module counts) or one stdlib module.
HEAVY = (
    "dns",
    "opentelemetry",
    "tenacity",
    "pybreaker",
    "cryptography",
    "asyncio",
    "concurrent.futures",
    "subprocess",
    "ssl",
    "http.server",
    "typing_extensions",
    "importlib.metadata",
    "httpcore",
    "anyio",
    "h11",
)
TOP = 15
#: What ``-X importtime`` runs: httpx first, so the ``meshlib`` subtree is what meshlib adds to it.
IMPORTTIME_STATEMENT = "import httpx; import meshlib"


def _env() -> dict[str, str]:
    """The children's environment: this checkout first on ``PYTHONPATH`` (the venv may hold another meshlib)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # measured with .pyc files, as deployed (the warm-up writes them)
    return env


def _run(python: str, args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([python, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{python} {' '.join(args)} failed ({done.returncode}):\n{done.stderr.strip()}")
    return done


def _timed(python: str, statement: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds from spawning ``python -c statement`` to its exit, and the CPU seconds (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    _run(python, ["-c", statement], env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child was reaped: its whole usage is in
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(
    python: str, variants: dict[str, str], repeats: int, env: dict[str, str]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds per variant: one untimed warm-up round, then ``repeats`` rounds, order rotating."""
    names = list(variants)
    for name in names:
        _run(python, ["-c", variants[name]], env)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in [*names[k:], *names[:k]]:
            seconds, cpu_seconds = _timed(python, variants[name], env)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    return wall, cpu


# --------------------------------------------------------------------------------------------- importtime


@dataclasses.dataclass
class Module:
    """One ``-X importtime`` line: times in microseconds, depth in the tree, who imported it first."""

    name: str
    self_us: float
    cumulative_us: float
    depth: int
    parent: str | None = None
    meshlib_importer: str | None = None  # nearest meshlib module above it (itself if it is one)


def parse_importtime(stderr: str) -> list[Module]:
    """The modules of one ``-X importtime`` report, in its order (a module's imports come before it)."""
    modules: list[Module] = []
    waiting: dict[int, list[int]] = {}  # depth -> modules at that depth not yet given their parent
    parents: dict[int, int] = {}  # module -> the module that imported it (indices: names can repeat)
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        fields = line[len("import time:") :].split("|")
        if len(fields) != 3 or not fields[0].strip().isdigit():
            continue  # the header
        raw = fields[2].rstrip()
        name = raw.lstrip()
        depth = (len(raw) - len(name) - 1) // 2
        index = len(modules)
        modules.append(Module(name, float(fields[0]), float(fields[1]), depth))
        for child in waiting.pop(depth + 1, []):
            parents[child] = index
        waiting.setdefault(depth, []).append(index)
    for index, m in enumerate(modules):
        up = parents.get(index)
        m.parent = modules[up].name if up is not None else None
        cursor: int | None = index
        while cursor is not None and not _is_meshlib(modules[cursor].name):
            cursor = parents.get(cursor)
        m.meshlib_importer = modules[cursor].name if cursor is not None else None
    return modules


def _is_meshlib(name: str) -> bool:
    return name == "meshlib" or name.startswith("meshlib.")


def importtime(python: str, statement: str, runs: int, env: dict[str, str]) -> list[Module]:
    """``-X importtime`` of ``statement``, ``runs`` times: the first run's tree with each module's median times."""
    reports = [
        _keyed(parse_importtime(_run(python, ["-X", "importtime", "-c", statement], env).stderr)) for _ in range(runs)
    ]
    first = reports[0]
    for key, m in first.items():
        m.self_us = statistics.median(report[key].self_us for report in reports if key in report)
        m.cumulative_us = statistics.median(report[key].cumulative_us for report in reports if key in report)
    return list(first.values())


def _keyed(modules: Sequence[Module]) -> dict[tuple[str, int], Module]:
    """Modules by (name, occurrence): a package's ``__init__`` that imports one of its submodules while that
    submodule is being imported (``a.b`` -> ``a`` -> ``a.b``) shows the submodule twice."""
    seen: dict[str, int] = {}
    keyed: dict[tuple[str, int], Module] = {}
    for m in modules:
        n = seen.get(m.name, 0)
        seen[m.name] = n + 1
        keyed[(m.name, n)] = m
    return keyed


def _in(name: str, package: str) -> bool:
    """Whether module ``name`` is part of ``package`` (its C accelerator ``_package`` included)."""
    return name in (package, "_" + package) or name.startswith(package + ".")


def heavy_dependencies(modules: Sequence[Module]) -> list[dict[str, Any]]:
    """For each :data:`HEAVY` dependency that was imported: its cost and which meshlib modules pulled it in.

    A dependency's entry points are its modules imported by a module outside it; their cumulative times add
    up to its cost (including what it imports first, e.g. dnspython's ``importlib.metadata``).
    """
    found: list[dict[str, Any]] = []
    for package in HEAVY:
        entries = [m for m in modules if _in(m.name, package) and not (m.parent and _in(m.parent, package))]
        if not entries:
            continue
        importers: dict[str, float] = {}
        for m in entries:
            importer = m.meshlib_importer or "(not meshlib)"
            key = importer if m.parent in (None, importer) else f"{importer} (via {m.parent})"
            importers[key] = importers.get(key, 0.0) + m.cumulative_us / 1000
        found.append(
            {
                "dependency": package,
                "cumulative_ms": round(sum(m.cumulative_us for m in entries) / 1000, 2),
                "imported_by": {k: round(v, 2) for k, v in sorted(importers.items(), key=lambda kv: -kv[1])},
            }
        )
    return found


# --------------------------------------------------------------------------------------------- report


def _ms(values: Sequence[float]) -> tuple[float, float]:
    """Median and p90 (nearest rank, as the other scenarios) of ``values`` in seconds, as milliseconds."""
    if not values:
        return math.nan, math.nan
    (p90,) = Histogram(values).percentiles((90,))
    return statistics.median(values) * 1000, p90 * 1000


def _paired(samples: dict[str, list[float]], a: str, b: str) -> list[float]:
    """``a - b`` within each round."""
    return [x - y for x, y in zip(samples[a], samples[b], strict=True)]


def summarise(
    variants: dict[str, str], wall: dict[str, list[float]], cpu: dict[str, list[float]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Table rows (one per variant, then ``<meshlib> - httpx`` for each meshlib) and the headline comparison."""
    rows: list[dict[str, Any]] = []
    for name, values in wall.items():
        median_ms, p90_ms = _ms(values)
        cpu_ms, cpu_p90 = _ms(cpu[name])
        rows.append(
            {
                "variant": name,
                "statement": variants[name],
                "median ms": median_ms,
                "p90 ms": p90_ms,
                "min ms": min(values) * 1000,
                "-python ms": _ms(_paired(wall, name, "python"))[0] if name != "python" else math.nan,
                "cpu ms": cpu_ms,
                "cpu p90 ms": cpu_p90,
            }
        )
    for name in [n for n in wall if n.startswith("meshlib")]:
        diffs = _paired(wall, name, "httpx")
        diff_ms, diff_p90 = _ms(diffs)
        cpu_diff_ms, cpu_diff_p90 = _ms(_paired(cpu, name, "httpx"))
        rows.append(
            {
                "variant": f"{name} - httpx",
                "statement": "paired, per round",
                "median ms": diff_ms,
                "p90 ms": diff_p90,
                "min ms": min(diffs) * 1000,
                "cpu ms": cpu_diff_ms,
                "cpu p90 ms": cpu_diff_p90,
            }
        )
    diff_ms, diff_p90 = _ms(_paired(wall, "meshlib", "httpx"))
    cpu_diff_ms = _ms(_paired(cpu, "meshlib", "httpx"))[0]
    meshlib_ms, httpx_ms, floor_ms = (_ms(wall[name])[0] for name in ("meshlib", "httpx", "python"))
    headline = {
        "meshlib_minus_httpx_median_ms": diff_ms,
        "meshlib_minus_httpx_p90_ms": diff_p90,
        "meshlib_minus_httpx_cpu_median_ms": cpu_diff_ms,
        "meshlib_over_httpx_wall_ratio": meshlib_ms / httpx_ms,
        "meshlib_over_httpx_import_ratio": (meshlib_ms - floor_ms) / (httpx_ms - floor_ms),
        "target_ms": TARGET_MS,
        "verdict": "PASS" if diff_ms <= TARGET_MS else "MISS",
    }
    if "httpx2" in wall:
        headline["httpx2_minus_httpx_median_ms"] = _ms(_paired(wall, "httpx2", "httpx"))[0]
    return rows, headline


def _print_importtime(modules: Sequence[Module], heavy: Sequence[dict[str, Any]]) -> None:
    top = sorted(modules, key=lambda m: -m.cumulative_us)[:TOP]
    rows = [
        {
            "module": m.name,
            "cumulative ms": m.cumulative_us / 1000,
            "self ms": m.self_us / 1000,
            "imported by": m.parent or "(top)",
        }
        for m in top
    ]
    print(f"\n-X importtime -c '{IMPORTTIME_STATEMENT}', meshlib's subtree: top {TOP} by cumulative time (median)")
    print(render_table(["module", "cumulative ms", "self ms", "imported by"], rows))
    print("\nheavy dependencies: cumulative ms, and the meshlib module whose import pulled each in")
    for dep in heavy:
        print(f"  {dep['dependency']:<20} {fmt(dep['cumulative_ms']):>7} ms")
        for importer, ms in dep["imported_by"].items():
            print(f"      {fmt(ms):>7} ms  {importer}")


def _where(python: str, env: dict[str, str], statement: str = "import meshlib") -> str:
    return _run(python, ["-c", f"{statement}; print(meshlib.__file__)"], env).stdout.strip()


def _installed(python: str, module: str, env: dict[str, str]) -> bool:
    if python == sys.executable:
        return find_spec(module) is not None
    check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", check], env=env, check=False).returncode == 0


def _versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in ("httpx", "httpx2", "httpcore", "opentelemetry-api", "dnspython", "cryptography", "tenacity"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Measure, print the tables, write the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.import_time", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per variant (default 30)")
    parser.add_argument("--importtime-runs", type=int, default=5, help="-X importtime runs (median; default 5)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure (default: this one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file (default %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also time `import meshlib` from another checkout (e.g. a `git worktree` of main), in the same rounds",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.importtime_runs < 1:
        parser.error("--repeats and --importtime-runs must be >= 1")

    env = _env()
    variants = {k: v for k, v in VARIANTS.items() if k != "httpx2" or _installed(args.python, "httpx2", env)}
    where = _where(args.python, env)
    shown = dict(variants)  # the statements as the table shows them
    for other in args.compare:
        statement = f"import sys; sys.path.insert(0, {str(other.resolve())!r}); import meshlib"
        name = f"meshlib@{other.resolve().name}"
        variants[name] = statement
        shown[name] = f"import meshlib from {other.resolve()}"
        print(f"compared: meshlib from {_where(args.python, env, statement)}")
    print(f"meshlib from {where}; python {args.python}; {args.repeats} interleaved rounds")
    if "httpx2" not in variants:
        print("httpx2 is not installed: not measured (pip install httpx2; Python >= 3.11)")
    load_before = _loadavg()
    began = time.monotonic()
    wall, cpu = measure(args.python, variants, args.repeats, env)
    everything = importtime(args.python, IMPORTTIME_STATEMENT, args.importtime_runs, env)
    modules = [m for m in everything if m.meshlib_importer is not None]
    heavy = heavy_dependencies(modules)
    rows, headline = summarise(shown, wall, cpu)
    seconds = time.monotonic() - began

    columns = ["variant", "statement", "median ms", "p90 ms", "min ms", "-python ms", "cpu ms", "cpu p90 ms"]
    print("\na fresh `python -c <statement>`: wall time (spawn to exit), that minus `pass`, and its CPU time")
    print(render_table(columns, rows))
    print(
        f"\n  [{headline['verdict']}] meshlib - httpx: median {fmt(headline['meshlib_minus_httpx_median_ms'])} ms, "
        f"p90 {fmt(headline['meshlib_minus_httpx_p90_ms'])} ms  target <= {TARGET_MS:.0f} ms"
    )
    print(
        f"  meshlib / httpx: {headline['meshlib_over_httpx_wall_ratio']:.2f}x wall, "
        f"{headline['meshlib_over_httpx_import_ratio']:.2f}x import alone (minus the python floor)"
    )
    _print_importtime(modules, heavy)
    load_after = _loadavg()
    print(f"\nload average before/after: {load_before} / {load_after}; took {seconds:.0f} s")

    if not args.no_write:
        info = machine(Pinning(False, "not pinned (one process at a time)", ()))
        info["packages"] = {**info["packages"], **_versions()}
        write_json(
            args.out,
            {
                "name": "import_time",
                "title": "import meshlib vs import httpx, fresh processes",
                "command": "python -m benchmarks.import_time " + " ".join(argv if argv is not None else sys.argv[1:]),
                "meshlib_path": where,
                "repeats": args.repeats,
                "importtime_runs": args.importtime_runs,
                "seconds": round(seconds, 1),
                "load_average_before_after": [load_before, load_after],
                "machine": info,
                "headline": _round(headline),
                "rows": _round(rows),
                "wall_ms": {k: [round(v * 1000, 2) for v in vs] for k, vs in wall.items()},
                "cpu_ms": {k: [round(v * 1000, 2) for v in vs] for k, vs in cpu.items()},
                "importtime_statement": IMPORTTIME_STATEMENT,
                "importtime_top": [
                    {
                        "module": m.name,
                        "cumulative_ms": round(m.cumulative_us / 1000, 2),
                        "self_ms": round(m.self_us / 1000, 2),
                        "imported_by": m.parent,
                        "meshlib_importer": m.meshlib_importer,
                    }
                    for m in sorted(modules, key=lambda m: -m.cumulative_us)[:TOP]
                ],
                "importtime_meshlib_modules": [
                    {
                        "module": m.name,
                        "cumulative_ms": round(m.cumulative_us / 1000, 2),
                        "self_ms": round(m.self_us / 1000, 2),
                        "imported_by": m.parent,
                    }
                    for m in modules
                    if _is_meshlib(m.name)
                ],
                "heavy_dependencies": heavy,
            },
        )
        print(f"wrote {args.out}")
    return 0


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 2)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


if __name__ == "__main__":
    raise SystemExit(main())
