"""Behaviour backends in their own process: ``python -m benchmarks.backend --count 11 --behavior '{...}'``.

Hosts ``count`` :class:`meshlib.testing.Backend` servers on loopback, in a process of their own so they do
not share the client's GIL (and can be pinned to the server CPU). The parent drives them over stdin/stdout,
one JSON object per line, and gets one JSON line back per command:

* ``{"op": "behavior", "index": i | null, ...spec}`` -- set one backend's (or every backend's) behaviour;
  spec keys: ``status``, ``delay`` (s), ``lognormal`` ([median_s, sigma] or null), ``stall`` ([probability,
  seconds] or null: that share of requests, a seeded draw, waits ``seconds`` instead of the lognormal), ``drop``,
  ``body_size``, ``fail_fraction`` and ``fail_status`` (a gray failure: that share answered at once with that
  status)
* ``{"op": "refuse", "index": i}`` / ``{"op": "accept", "index": i}`` -- stop / resume accepting connections
* ``{"op": "counts"}`` -- requests received per backend; ``{"op": "reset"}`` zeroes them
* ``{"op": "hangups"}`` -- per backend, requests whose client hung up before the answer (0 where the
  installed meshlib.testing does not count them)
* ``{"op": "records", "index": i, "header": name}`` -- ``[received_at, header value]`` per recorded request
  (``received_at`` is ``time.monotonic()``, comparable across processes on Linux)
* ``{"op": "quit"}``

The first line printed is ``{"ports": [...], "pid": ...}`` once every backend accepts connections.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from typing import Any

from meshlib.testing import Backend, Behavior, lognormal_delay


def behavior_from(spec: dict[str, Any], seed: int) -> Behavior:
    """A :class:`Behavior` from a JSON spec (see the module docstring); ``seed`` varies the lognormal draw."""
    lognormal = spec.get("lognormal")
    delay_fn = lognormal_delay(float(lognormal[0]), float(lognormal[1]), seed=seed) if lognormal else None
    stall = spec.get("stall")
    if stall:
        delay_fn = stall_delay(float(stall[0]), float(stall[1]), delay_fn, seed=seed)
    return Behavior(
        status=int(spec.get("status", 200)),
        delay=float(spec.get("delay", 0.0)),
        delay_fn=delay_fn,
        drop=bool(spec.get("drop", False)),
        body=b"x" * int(spec.get("body_size", 64)),
        fail_fraction=float(spec.get("fail_fraction", 0.0)),
        fail_status=int(spec.get("fail_status", 500)),
    )


def stall_delay(
    probability: float, seconds: float, otherwise: Callable[[], float] | None, *, seed: int
) -> Callable[[], float]:
    """A ``delay_fn``: with ``probability`` (a seeded draw) the request stalls ``seconds``, else ``otherwise()``
    (or no extra delay). Models S8's tail: rare stalls (a GC pause, a cold cache) on any endpoint."""
    rng = random.Random(seed + 7919)

    def draw() -> float:
        if rng.random() < probability:
            return seconds
        return otherwise() if otherwise is not None else 0.0

    return draw


def main(argv: list[str] | None = None) -> None:
    """Start the backends, announce their ports, then serve commands until ``quit`` or EOF."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--behavior", default="{}", help="initial behaviour spec (JSON)")
    parser.add_argument("--max-records", type=int, default=200_000)
    args = parser.parse_args(argv)
    spec = json.loads(args.behavior)
    backends = [
        Backend(f"b{i}", behavior=behavior_from(spec, seed=i), max_records=args.max_records) for i in range(args.count)
    ]
    for backend in backends:
        backend.start()
    print(json.dumps({"ports": [b.port for b in backends], "pid": os.getpid()}), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            reply = handle(backends, command)
            print(json.dumps(reply), flush=True)
            if command.get("op") == "quit":
                break
    finally:
        for backend in backends:
            backend.stop()


def handle(backends: list[Backend], command: dict[str, Any]) -> Any:
    """Apply one control command; returns the JSON-ready reply."""
    op = command.get("op")
    index = command.get("index")
    targets = backends if index is None else [backends[int(index)]]
    if op == "behavior":
        for k, backend in enumerate(targets):
            backend.behavior = behavior_from(command, seed=int(command.get("seed", k)))
        return {"ok": True}
    if op == "refuse":
        for backend in targets:
            backend.refuse()
        return {"ok": True}
    if op == "accept":
        for backend in targets:
            backend.accept()
        return {"ok": True}
    if op == "counts":
        return [b.count for b in backends]
    if op == "hangups":
        return [int(getattr(b, "hangups", 0)) for b in backends]
    if op == "reset":
        for backend in backends:
            backend.reset()
        return {"ok": True}
    if op == "records":
        header = str(command.get("header", "")).lower()
        return [[r.received_at, r.headers.get(header)] for b in targets for r in b.requests]
    if op == "quit":
        return {"ok": True}
    return {"error": f"unknown op {op!r}"}


if __name__ == "__main__":
    main()
