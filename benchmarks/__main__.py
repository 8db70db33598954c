"""``python -m benchmarks [s1 s3 ...] [--quick] [--repeats N] [--out DIR]``: run scenarios, print, save.

Runs the named scenarios (all by default) one after another, prints each one's table with its targets and
PASS/MISS, and writes ``<out>/<scenario>.json``, PNG plots, ``machine.json`` and ``summary.json``
(default ``docs/performance/``). ``--quick`` is a ~2 minute smoke run: shorter runs, fewer requests, the
same code paths; its numbers are noisy and not for the docs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.harness import Context, ScenarioResult, pin_client, render_result
from benchmarks.report import machine, write_json, write_result

SCENARIOS = {
    "s1": "benchmarks.s1_overhead",
    "s2": "benchmarks.s2_sidecar",
    "s3": "benchmarks.s3_slow_backend",
    "s4": "benchmarks.s4_failing_backend",
    "s5": "benchmarks.s5_outage",
    "s6": "benchmarks.s6_scale",
    "s7": "benchmarks.s7_async_throughput",
    "s8": "benchmarks.s8_hedging",
    "s9": "benchmarks.s9_routes",
    "s9gray": "benchmarks.s9_gray",
    "s10": "benchmarks.s10_mirror",
    "s10overload": "benchmarks.s10_overload",
    "z1": "benchmarks.z1_denial",
    "z2": "benchmarks.z2_flood",
    "x1": "benchmarks.x1_push",
    "c1": "benchmarks.c1_chain",
    "slowstart": "benchmarks.slow_start",
    "s11": "benchmarks.s11_zones",
    "s12": "benchmarks.s12_capacity",
    "s12slots": "benchmarks.s12_slots",
}

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "performance"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the scenarios, write results; exit status 1 if a scenario crashed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"which to run (default: all of {', '.join(SCENARIOS)})")
    parser.add_argument("--quick", action="store_true", help="~2 minute smoke run (noisy numbers)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats per variant (default 3; 1 with --quick)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where JSON and PNG go")
    args = parser.parse_args(argv)
    names = [n.lower() for n in args.scenarios] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    # meshlib logs breaker and ejection changes as warnings; the scenarios count them instead.
    logging.getLogger("meshlib").setLevel(logging.ERROR)

    pinning = pin_client()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    info = machine(pinning)
    write_json(out / "machine.json", info)
    print(f"machine: {info['cpu_model']}, {info['cpus']} CPUs, Python {info['python']}; {pinning.note}")
    ctx = Context(quick=args.quick, repeats=repeats, out_dir=str(out), pinning=pinning)

    summary: dict[str, Any] = {}
    failed = False
    started = time.perf_counter()
    for name in names:
        module = importlib.import_module(SCENARIOS[name])
        t0 = time.perf_counter()
        load_before = _loadavg()
        try:
            result: ScenarioResult = module.run(ctx)
        except Exception:
            failed = True
            print(f"== {name.upper()} crashed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        result.seconds = time.perf_counter() - t0
        result.notes.append(
            f"load average before/after: {load_before} / {_loadavg()} (other processes share the machine)"
        )
        print(render_result(result), flush=True)
        write_result(out, result, info, args.quick)
        plots = module.plot(result, out)
        for path in plots:
            print(f"  plot: {path}")
        print()
        summary[name] = {
            "title": result.title,
            "seconds": round(result.seconds, 1),
            "checks": [
                {"name": c.name, "target": c.target, "value": c.value, "verdict": c.verdict} for c in result.checks
            ],
        }
    _merge_summary(out / "summary.json", summary, args.quick)
    print(f"total {time.perf_counter() - started:.0f} s; results in {out}")
    return 1 if failed else 0


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _merge_summary(path: Path, new: dict[str, Any], quick: bool) -> None:
    """Update summary.json with the scenarios just run, keeping the others' last results."""
    import json

    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("scenarios", {})
        except ValueError:
            old = {}
    for entry in new.values():
        entry["mode"] = "quick" if quick else "full"
    old.update(new)
    write_json(path, {"scenarios": dict(sorted(old.items()))})


if __name__ == "__main__":
    sys.exit(main())
