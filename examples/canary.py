"""A canary rollout by editing a routes file while traffic flows: 100/0 -> 90/10 -> 50/50 -> 0/100.

    .venv/bin/python examples/canary.py

Starts two loopback backends with :mod:`meshlib.testing`, ``payments-v1`` (the stable version) and
``payments-v2`` (the canary), and writes a Gateway API ``HTTPRoute`` for ``payments`` into a temporary
``routes.yaml``. A ``meshlib.Client`` reads it from ``MESHLIB_ROUTES_FILE`` (passed as ``environ=``, so your
shell's ``MESHLIB_*`` variables do not interfere) and a thread sends ``GET http://payments/charge`` without
pause. The main thread then rewrites the file, atomically (write a temporary file, then rename it over the old
one), with the weights 90/10, then 50/50, then 0/100: the client's watcher picks each version up within
``MESHLIB_ROUTES_RELOAD_INTERVAL`` (100 ms here, 1 s by default), and the script waits until
``client.mesh_status().routes.version`` names it.

Every response says which version of the file routed it: the route's ``ResponseHeaderModifier`` sets
``x-split: <v1>/<v2>``, so the shares printed for a step count exactly the requests that step's table routed,
even the ones in flight while the file changed. The script prints each step as it completes and exits 0 when
every request succeeded, each step's shares are near its weights, and the ``x-canary: 1`` testers' rule sent
its request to v2 even while v2 had weight 0.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import meshlib
from meshlib.testing import Backend

#: The weights (payments-v1, payments-v2) of each version of the file, in order.
STEPS = ((100, 0), (90, 10), (50, 50), (0, 100))
#: Requests each version of the file routes before the next edit.
REQUESTS_PER_STEP = 400
#: How long to wait for the client to apply an edit before giving up (it takes about one reload interval).
APPLY_TIMEOUT = 10.0

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: payments-canary}}
spec:
  parentRefs: [{{group: "", kind: Service, name: payments}}]   # calls to http(s)://payments/...
  rules:
  # Testers reach the canary with a header. The rule repeats the path match: by the spec's precedence a longer
  # path match outranks a header match, so without it the split rule below would win.
  - matches: [{{path: {{type: PathPrefix, value: /charge}}, headers: [{{name: x-canary, value: "1"}}]}}]
    backendRefs: [{{name: payments-v2}}]
  - matches: [{{path: {{type: PathPrefix, value: /charge}}}}]
    backendRefs: [{{name: payments-v1, weight: {v1}}}, {{name: payments-v2, weight: {v2}}}]
    filters:
    - type: ResponseHeaderModifier                             # which version of the file routed the call
      responseHeaderModifier: {{set: [{{name: x-split, value: "{v1}/{v2}"}}]}}
"""


def write_routes(path: Path, v1: int, v2: int) -> None:
    """Replace the routes file atomically, as Kubernetes does with a ConfigMap (the watcher never sees half)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(ROUTE.format(v1=v1, v2=v2))
    os.replace(temporary, path)


@dataclass
class Traffic:
    """What the traffic thread saw: responses by (the x-split of the table that routed them, backend)."""

    seen: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    progress: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.progress = threading.Condition(self.lock)

    def routed_by(self, split: str) -> dict[str, int]:
        """Responses per backend among those the table ``split`` routed."""
        with self.lock:
            return {backend: n for (label, backend), n in self.seen.items() if label == split}


def send_traffic(client: meshlib.Client, traffic: Traffic, stop: threading.Event) -> None:
    """Send GETs one after another until ``stop``; count each answer under the table that routed it."""
    while not stop.is_set():
        try:
            response = client.get("http://payments/charge")
            label, backend = response.headers.get("x-split", "?"), response.headers.get("x-backend", "?")
            failed = None if response.status_code == 200 else f"status {response.status_code} from {backend}"
        except Exception as exc:  # any failure is what this example is about: count it, keep going
            label = backend = "?"
            failed = repr(exc)
        with traffic.progress:
            if failed is None:
                traffic.seen[(label, backend)] += 1
            else:
                traffic.failures.append(failed)
            traffic.progress.notify_all()


def wait_for_version(client: meshlib.Client, previous: str | None) -> str:
    """The routes version the client serves once it is no longer ``previous`` (polling ``mesh_status()``)."""
    deadline = time.monotonic() + APPLY_TIMEOUT
    while True:
        routes = client.mesh_status().routes
        if routes is not None and routes.version != previous:
            return routes.version
        if time.monotonic() > deadline:
            raise TimeoutError(f"the routes file was not applied within {APPLY_TIMEOUT:g} s (version {previous})")
        time.sleep(0.02)  # polling a status snapshot: nothing to wait on


@dataclass(frozen=True)
class Step:
    """One version of the file: its weights, its version, and what the requests it routed got."""

    v1_weight: int
    v2_weight: int
    version: str
    counts: dict[str, int]
    applied_after: float

    @property
    def total(self) -> int:
        """Requests this version routed."""
        return sum(self.counts.values())

    def share(self, backend: str) -> float:
        """Share (0-1) of this version's requests that ``backend`` answered."""
        return self.counts.get(backend, 0) / self.total if self.total else 0.0


@dataclass(frozen=True)
class Outcome:
    """The whole rollout: each step, the requests that failed, and where the testers' request went."""

    steps: list[Step]
    failures: list[str]
    tester_backend: str


def run(requests_per_step: int = REQUESTS_PER_STEP) -> Outcome:
    """Start the backends and the client, roll the canary out under traffic, stop everything."""
    steps: list[Step] = []
    with (
        Backend("payments-v1") as v1,
        Backend("payments-v2") as v2,
        tempfile.TemporaryDirectory(prefix="meshlib-canary-") as folder,
    ):
        path = Path(folder) / "routes.yaml"
        write_routes(path, *STEPS[0])
        environ = {
            "MESHLIB_ROUTES_FILE": str(path),
            "MESHLIB_ROUTES_RELOAD_INTERVAL": "100ms",
            "MESHLIB_SERVICE_PAYMENTS_V1": f"static://{v1.address}",
            "MESHLIB_SERVICE_PAYMENTS_V2": f"static://{v2.address}",
        }
        print(f"payments-v1 at {v1.address}, payments-v2 at {v2.address}; routes in {path}")
        traffic = Traffic()
        stop = threading.Event()
        with meshlib.Client(environ=environ) as client:
            tester = client.get("http://payments/charge", headers={"x-canary": "1"}).headers["x-backend"]
            print(f"GET /charge with x-canary: 1 -> {tester} (the testers' rule, whatever the weights)")
            sender = threading.Thread(target=send_traffic, args=(client, traffic, stop), name="traffic")
            sender.start()
            try:
                version: str | None = None
                for number, (w1, w2) in enumerate(STEPS):
                    edited = time.monotonic()
                    if number:
                        write_routes(path, w1, w2)
                    version = wait_for_version(client, version)
                    applied_after = time.monotonic() - edited
                    how = "initial file" if not number else f"file edited, applied after {applied_after * 1000:.0f} ms"
                    print(f"step {number}: payments-v1 {w1} / payments-v2 {w2}: version {version} ({how})")
                    split = f"{w1}/{w2}"
                    with traffic.progress:
                        traffic.progress.wait_for(
                            lambda s=split: (
                                sum(traffic.seen[(s, b)] for b in ("payments-v1", "payments-v2")) >= requests_per_step
                                or bool(traffic.failures)
                            ),
                            30,
                        )
                    step = Step(w1, w2, version, traffic.routed_by(split), applied_after)
                    steps.append(step)
                    print(
                        f"  {step.total} requests routed by it: "
                        + ", ".join(
                            f"{name} {step.counts.get(name, 0)} ({step.share(name):.1%})"
                            for name in ("payments-v1", "payments-v2")
                        )
                        + f"; failed so far: {len(traffic.failures)}",
                        flush=True,
                    )
            finally:
                stop.set()
                sender.join(30)
    # Requests still in flight when a step ended were counted under it afterwards: report the final counts.
    steps = [replace(s, counts=traffic.routed_by(f"{s.v1_weight}/{s.v2_weight}")) for s in steps]
    return Outcome(steps=steps, failures=list(traffic.failures), tester_backend=tester)


def near(step: Step) -> bool:
    """Whether a step's observed shares are what its weights promise: exact at 0 and 100, else within five
    standard deviations of the binomial draw (about 12 points at 50/50 over 400 requests)."""
    expected = step.v2_weight / (step.v1_weight + step.v2_weight)
    observed = step.share("payments-v2")
    if expected in (0.0, 1.0):
        return observed == expected
    return step.total > 0 and abs(observed - expected) <= 5 * math.sqrt(expected * (1 - expected) / step.total)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rollout; exit 0 when no request failed and every step's shares matched its weights."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=REQUESTS_PER_STEP, help="requests per step")
    args = parser.parse_args(argv)
    outcome = run(args.requests)
    ok = not outcome.failures and outcome.tester_backend == "payments-v2" and all(near(s) for s in outcome.steps)
    total = sum(step.total for step in outcome.steps)
    print(f"{total} requests over {len(outcome.steps)} versions of the file, {len(outcome.failures)} failed")
    for failure in outcome.failures[:5]:
        print(f"  failed: {failure}")
    print("canary: OK" if ok else "canary: UNEXPECTED RESULT")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
