"""Instructions per request, mesh against raw, counted by callgrind: ``python -m benchmarks.instructions``.

Wall and CPU time on a shared 2-core VM swing by 10-40 %; instruction counts do not (``valgrind
--tool=callgrind`` counts the same for the same code and inputs, whatever else the machine does). This measures
the client layer alone: each variant sends ``GET`` requests through an in-process transport that returns a
1 KiB streamed body (no sockets), so what differs between raw and mesh is exactly meshlib's work on the request
path (routing, the call plan, the lease, the tracked body). The per-request count is the difference between a
run of ``N_LONG`` and one of ``N_SHORT`` requests divided by their difference, so start-up and warm-up cancel.

Variants: raw httpx, ``meshlib.httpx``, raw httpx2, ``meshlib.httpx2`` (the httpx2 pair is skipped when httpx2
is not installed). Output: a table and ``docs/performance/instructions.json``. Needs ``valgrind`` (Debian).
About four minutes on two cores.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

N_SHORT, N_LONG = 500, 1500
OUT = Path(__file__).resolve().parent.parent / "docs" / "performance" / "instructions.json"

_CHILD = """
import importlib, sys
library, variant, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lib = importlib.import_module(library)
class Canned(lib.BaseTransport):
    def handle_request(self, request):
        return lib.Response(200, stream=lib.ByteStream(b"x" * 1024))
if variant == "raw":
    client, url = lib.Client(transport=Canned()), "http://127.0.0.1:8080/"
else:
    mesh = importlib.import_module("meshlib." + library)
    client = mesh.Client(services={"svc": "static://127.0.0.1:8080"}, environ={}, transport=Canned())
    url = "http://svc/"
for _ in range(200 + n):
    client.get(url)
"""


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
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = re.search(r"refs:\s*([\d,]+)", result.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output: {result.stderr[-500:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    libraries = ["httpx"] + (["httpx2"] if importlib.util.find_spec("httpx2") else [])
    jobs = [(lib, variant, n) for lib in libraries for variant in ("raw", "mesh") for n in (N_SHORT, N_LONG)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: _count(*job), jobs), strict=True))
    rows: dict[str, dict[str, float]] = {}
    for lib in libraries:
        per = {v: (counts[(lib, v, N_LONG)] - counts[(lib, v, N_SHORT)]) / (N_LONG - N_SHORT) for v in ("raw", "mesh")}
        rows[lib] = {"raw": per["raw"], "mesh": per["mesh"], "added": per["mesh"] - per["raw"]}
        rows[lib]["ratio"] = per["mesh"] / per["raw"]
    print(f"{'library':8} {'raw/req':>10} {'mesh/req':>10} {'added':>9} {'ratio':>7}")
    for lib, row in rows.items():
        print(f"{lib:8} {row['raw']:>10,.0f} {row['mesh']:>10,.0f} {row['added']:>9,.0f} {row['ratio']:>7.3f}")
    if "httpx2" in rows:
        cross = rows["httpx2"]["mesh"] / rows["httpx"]["raw"]
        print(f"meshlib.httpx2 against raw httpx: {cross:.3f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"instructions_per_request": rows, "n": [N_SHORT, N_LONG]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
