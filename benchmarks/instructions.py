"""Instructions per request, mesh against raw, counted by callgrind: ``python -m benchmarks.instructions``.

Wall and CPU time on a shared 2-core VM swing by 10-40 %; instruction counts do not (``valgrind
--tool=callgrind`` counts the same for the same code and inputs, whatever else the machine does). This measures
the client layer alone: each variant sends ``GET`` requests through an in-process transport that returns a
1 KiB streamed body (no sockets), so what differs between raw and mesh is exactly meshlib's work on the request
path (routing, the call plan, the lease, the tracked body). The per-request count is the difference between a
run of ``N_LONG`` and one of ``N_SHORT`` requests divided by their difference, so start-up and warm-up cancel.

Variants: raw httpx, ``meshlib.httpx``, raw httpx2, ``meshlib.httpx2`` (the httpx2 pair is skipped when httpx2
is not installed); and the routing pair of S9 (``--only routes``): meshlib sending S9's request
(``/api/orders?region=eu&page=2``, ``x-tenant``) without a route table and with S9's 50-rule table whose last
rule matches, so the difference is exactly what matching and routing cost.
Output: a table and ``docs/performance/instructions.json``. Needs ``valgrind`` (Debian). About four minutes on
two cores (``--only routes``: about two).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

N_SHORT, N_LONG = 500, 1500
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "performance" / "instructions.json"

_CHILD = """
import importlib, sys
library, variant, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lib = importlib.import_module(library)
class Canned(lib.BaseTransport):
    def handle_request(self, request):
        return lib.Response(200, stream=lib.ByteStream(b"x" * 1024))
headers = None
if variant == "raw":
    client, url = lib.Client(transport=Canned()), "http://127.0.0.1:8080/"
elif variant == "mesh":
    mesh = importlib.import_module("meshlib." + library)
    client = mesh.Client(services={"svc": "static://127.0.0.1:8080"}, environ={}, transport=Canned())
    url = "http://svc/"
else:  # "routed-none" / "routed-1" / "routed-50": S9's request, without a table, with 1 rule, with 50 rules
    from benchmarks import route_tables
    mesh = importlib.import_module("meshlib." + library)
    client = mesh.Client(services={"bench": "static://127.0.0.1:8080"}, environ={}, transport=Canned())
    if variant == "routed-50":
        client.mesh.install_routes(route_tables.fifty_rules())
    elif variant == "routed-1":
        client.mesh.install_routes(route_tables.one_rule())
    url, headers = "http://bench" + route_tables.PATH, route_tables.HEADERS
for _ in range(200 + n):
    client.get(url, headers=headers)
"""

#: Which pairs to count: ``base`` (raw vs mesh), ``routes`` (mesh without vs with S9's 50-rule table).
SETS = {"base": ("raw", "mesh"), "routes": ("routed-none", "routed-1", "routed-50")}


def _count(library: str, variant: str, n: int) -> int:
    """Instructions callgrind counted for one child process sending ``n`` requests (after 200 of warm-up)."""
    result = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-c",
            _CHILD,
            *(
                library,
                variant,
                str(n),
            ),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    found = re.search(r"refs:\s*([\d,]+)", result.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output: {result.stderr[-500:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", choices=sorted(SETS), help="count one pair only (the other's last result is kept in the JSON)"
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    libraries = ["httpx"] + (["httpx2"] if importlib.util.find_spec("httpx2") else [])
    sets = [args.only] if args.only else list(SETS)
    jobs = [(lib, v, n) for lib in libraries for name in sets for v in SETS[name] for n in (N_SHORT, N_LONG)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: _count(*job), jobs), strict=True))

    def per(lib: str, v: str) -> float:
        return (counts[(lib, v, N_LONG)] - counts[(lib, v, N_SHORT)]) / (N_LONG - N_SHORT)

    old: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    data: dict[str, Any] = {"n": [N_SHORT, N_LONG]}
    if "base" in sets:
        rows: dict[str, dict[str, float]] = {}
        for lib in libraries:
            raw, mesh = per(lib, "raw"), per(lib, "mesh")
            rows[lib] = {"raw": raw, "mesh": mesh, "added": mesh - raw, "ratio": mesh / raw}
        print(f"{'library':8} {'raw/req':>10} {'mesh/req':>10} {'added':>9} {'ratio':>7}")
        for lib, row in rows.items():
            print(f"{lib:8} {row['raw']:>10,.0f} {row['mesh']:>10,.0f} {row['added']:>9,.0f} {row['ratio']:>7.3f}")
        if "httpx2" in rows:
            cross = rows["httpx2"]["mesh"] / rows["httpx"]["raw"]
            print(f"meshlib.httpx2 against raw httpx: {cross:.3f}")
        data["instructions_per_request"] = rows
    elif "instructions_per_request" in old:
        data["instructions_per_request"] = old["instructions_per_request"]
    if "routes" in sets:
        routed: dict[str, dict[str, float]] = {}
        for lib in libraries:
            none, one, fifty = per(lib, "routed-none"), per(lib, "routed-1"), per(lib, "routed-50")
            routed[lib] = {
                "no_table": none,
                "table_1_rule": one,
                "table_50_rules": fifty,
                "added_1": one - none,
                "added": fifty - none,
            }
        print(
            f"{'library':8} {'no table':>10} {'1 rule':>10} {'50 rules':>10} {'added 1':>9} {'added 50':>9}"
            "   (S9's request, meshlib)"
        )
        for lib, row in routed.items():
            print(
                f"{lib:8} {row['no_table']:>10,.0f} {row['table_1_rule']:>10,.0f} {row['table_50_rules']:>10,.0f} "
                f"{row['added_1']:>9,.0f} {row['added']:>9,.0f}"
            )
        data["routes_50_rules"] = routed
    elif "routes_50_rules" in old:
        data["routes_50_rules"] = old["routes_50_rules"]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
