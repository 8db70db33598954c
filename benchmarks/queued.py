"""How long a hung endpoint keeps 1,000 concurrent async calls past their deadline: meshlib against raw httpx.

``python -m benchmarks.queued [--calls N] [--deadline S] [--library httpx|httpx2]`` (about 1-2 minutes: the
raw client is the slow one). Issue 10, item 8.

A peer that accepts connections and never answers (``tests/servers/hostile.py`` in ``silent`` mode, in its
own process so its threads do not compete with the client's event loop for the GIL) gets ``N`` calls at once
from one ``AsyncClient`` with a deadline of ``S`` seconds:

* ``raw`` -- the library's ``AsyncClient(timeout=S)`` on the peer's address: calls beyond the pool's 100
  connections queue inside the HTTP core's pool;
* ``meshlib`` -- ``meshlib.AsyncClient`` with ``MESHLIB_TIMEOUT=S`` on ``static://`` the peer: they queue for
  a slot in meshlib beyond twice the pool's connections, bounded by the deadline.

Reported per variant: when the first, median and last call ended (seconds after they started, against the
deadline) and what they ended with; then the ratio of the last call's end, raw / meshlib, in the same run.
Measured 2026-11-30 on the 2-core build machine (N=1000, S=2): raw httpx 53.4 s (first ended at 26 s),
meshlib 2.6 s (first at 2.01 s): 20x; a second run: 31.9 s against 2.37 s, 13.5x. With up to twice the
pool's connections let into the pool (``QUEUE_FACTOR``): 31.2 s against 2.84 s, 11x.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER = (
    "import sys; from tests.servers.hostile import Hostile; h = Hostile('silent').__enter__(); "
    "print(h.address, flush=True); sys.stdin.read()"
)


async def _run(
    variant: str, library: str, calls: int, deadline: float, address: str
) -> tuple[list[float], Counter[str]]:
    import importlib

    import meshlib

    lib: Any = importlib.import_module(library)
    if variant == "raw":
        client: Any = lib.AsyncClient(timeout=deadline)
        url = f"http://{address}/"
    else:
        module: Any = importlib.import_module(f"meshlib.{library}")
        client = module.AsyncClient(
            services={"svc": f"static://{address}"}, environ={"MESHLIB_TIMEOUT": f"{deadline}s"}
        )
        url = "http://svc/"
    ended: list[float] = []
    outcomes: Counter[str] = Counter()
    async with client:
        start = time.monotonic()

        async def call() -> None:
            try:
                await client.get(url)
                outcomes["answered"] += 1
            except Exception as exc:
                outcomes[type(exc).__name__] += 1
            ended.append(time.monotonic() - start)

        await asyncio.gather(*(call() for _ in range(calls)))
    del meshlib
    return sorted(ended), outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--deadline", type=float, default=2.0)
    parser.add_argument("--library", default="httpx", choices=("httpx", "httpx2"))
    args = parser.parse_args()
    import logging

    logging.getLogger("meshlib").setLevel(logging.ERROR)  # the breaker opening on the hung peer is expected
    last: dict[str, float] = {}
    for variant in ("raw", "meshlib"):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        peer = subprocess.Popen(
            [sys.executable, "-c", PEER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert peer.stdout is not None
            address = peer.stdout.readline().strip()
            ended, outcomes = asyncio.run(_run(variant, args.library, args.calls, args.deadline, address))
        finally:
            peer.kill()
            peer.wait()
        last[variant] = ended[-1]
        median = ended[len(ended) // 2]
        print(
            f"{variant:8} deadline {args.deadline:.1f} s: first ended {ended[0]:.2f} s, median {median:.2f} s, "
            f"last {ended[-1]:.2f} s; {dict(outcomes)}"
        )
    print(f"last call ended, raw / meshlib: {last['raw'] / last['meshlib']:.1f}x")


if __name__ == "__main__":
    main()
