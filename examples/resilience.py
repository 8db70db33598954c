"""One backend of three failing, and callers see no error; then a deadline shared by a scope of calls.

    .venv/bin/python examples/resilience.py

Starts three ``api`` backends on loopback with :mod:`meshlib.testing` (the loopback servers meshlib's own tests
use); ``api-3`` answers every request with a fast ``503``. A ``meshlib.httpx.Client`` with the mesh's default
resilience settings (``environ={}``: your ``MESHLIB_*`` variables are ignored) sends a series of GETs to
``http://api/``, balanced by ``round_robin`` so the failing backend keeps getting its turn until it is taken out:

* each ``503`` is retried once on another endpoint (a GET is idempotent; the retry budget has room), so the
  caller gets a ``200``;
* after 5 consecutive failures the endpoint's circuit breaker opens and outlier detection ejects it (30 s):
  the balancer stops picking it and no more retries are needed.

Then a policy scope with a deadline: ``with meshlib.policy(deadline=0.5)`` gives every mesh call made inside it
one shared deadline, 0.5 s from entering the scope. A fast call inside it carries the time left to the backend
in ``grpc-timeout``; a call to ``slow`` (a backend that takes 2 s) is cut at the deadline with
``meshlib.DeadlineExceeded`` (an ``httpx.TimeoutException``): no attempt runs past it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import httpx

import meshlib
from meshlib.testing import Backend, Behavior, start_backends

REQUESTS = 30
DEADLINE = 0.5
SLOW_ANSWER = 2.0


@dataclass(frozen=True)
class Outcome:
    """What the run showed (the deadline fields are filled in by the second part)."""

    requests: int
    caller_errors: int
    retried_requests: int
    failing_backend_attempts: int
    failing_endpoint: str
    breaker: str
    ejected: bool
    grpc_timeout_seen: str = ""
    deadline_error: str = ""
    deadline_elapsed: float = 0.0


def failing_backend(client: meshlib.httpx.Client, backends: Sequence[Backend]) -> Outcome:
    """Send ``REQUESTS`` GETs to ``api`` while ``api-3`` answers 503; count what the callers saw."""
    errors = retried = 0
    for number in range(1, REQUESTS + 1):
        try:
            response = client.get("http://api/work")
        except httpx.HTTPError as exc:
            errors += 1
            print(f"request {number:2}: error {exc!r}")
            continue
        if response.status_code >= 500:
            errors += 1
        attempts = response.extensions["meshlib.attempts"]
        if attempts > 1:
            retried += 1
            print(
                f"request {number:2}: {response.status_code} from {response.json()['backend']} "
                f"after {attempts} attempts (the first went to api-3 and got 503)"
            )
    failing = backends[2]
    (service,) = [s for s in client.mesh_status().services if s.name == "api"]
    (endpoint,) = [e for e in service.endpoints if e.address == failing.address]
    print(
        f"{REQUESTS} requests, {errors} errors seen by callers, {retried} retried; "
        f"api-3 received {failing.count} attempts, then: breaker {endpoint.breaker}, "
        f"{'ejected' if endpoint.ejected else 'not ejected'}; retries made {service.budget.retries}, "
        f"refused by the budget {service.budget.exhausted}"
    )
    return Outcome(
        requests=REQUESTS,
        caller_errors=errors,
        retried_requests=retried,
        failing_backend_attempts=failing.count,
        failing_endpoint=failing.address,
        breaker=endpoint.breaker,
        ejected=endpoint.ejected,
    )


def shared_deadline(client: meshlib.httpx.Client, api: Sequence[Backend]) -> tuple[str, str, float]:
    """Two calls in one ``meshlib.policy(deadline=...)`` scope: one fast, one that would take too long."""
    started = time.monotonic()
    with meshlib.policy(deadline=DEADLINE):
        response = client.get("http://api/fast")
        (received,) = [r for backend in api for r in backend.requests if r.path == "/fast"]
        budget = received.headers.get("grpc-timeout", "")
        print(f"in the scope: GET http://api/fast -> {response.status_code}, the backend got grpc-timeout: {budget}")
        try:
            client.get("http://slow/report")
        except meshlib.DeadlineExceeded as exc:
            elapsed = time.monotonic() - started
            print(f"in the scope: GET http://slow/report -> DeadlineExceeded after {elapsed:.2f} s: {exc}")
            return budget, type(exc).__name__, elapsed
    raise AssertionError("the slow call finished inside its deadline")


def run() -> Outcome:
    """Start the backends, run both parts, stop everything."""
    with (
        start_backends(names=["api-1", "api-2", "api-3"]) as api,
        Backend("slow", behavior=Behavior(delay=SLOW_ANSWER)) as slow,
    ):
        api[2].behavior = Behavior(status=503)
        services = {"api": "static://" + ",".join(api.addresses), "slow": f"static://{slow.address}"}
        with meshlib.httpx.Client(services=services, lb="round_robin", environ={}) as client:
            outcome = failing_backend(client, api)
            budget, error, elapsed = shared_deadline(client, api)
    return replace(outcome, grpc_timeout_seen=budget, deadline_error=error, deadline_elapsed=elapsed)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; exit 0 when callers saw no error, api-3 was taken out and the deadline held."""
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None).parse_args(argv)
    outcome = run()
    ok = (
        outcome.caller_errors == 0
        and (outcome.ejected or outcome.breaker == "open")
        and outcome.deadline_error == "DeadlineExceeded"
        and outcome.deadline_elapsed < SLOW_ANSWER
    )
    print("resilience: OK" if ok else "resilience: UNEXPECTED RESULT")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
