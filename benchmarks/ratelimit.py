"""What one :meth:`RateLimiter.check` costs, admitted and refused: ``python -m benchmarks.ratelimit [--checks N]``.

Each case runs ``N`` checks (default 200,000) on the real monotonic clock, ``--repeats`` times (best repeat
reported, in microseconds per check, wall time of one thread; the limiter takes its lock on every check):

* ``allowed, total + identity`` -- a known caller under both limits (the common case);
* ``allowed, override`` -- a caller named in an override (one dictionary lookup more before the lock);
* ``allowed, no identity`` -- the shared no-identity bucket;
* ``refused, identity`` -- a caller over its own limit (nothing consumed anywhere);
* ``refused, total`` -- everyone over the server's total;
* ``allowed, new identity at the bound`` -- a new caller each check with the table at 10,000 full buckets
  (forgets the oldest: the eviction path);
* ``refused, new identity, busy table`` -- a new caller each check, table full of busy buckets.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from meshlib.security.ratelimit import Limit, Override, RateLimiter, RateLimits

ALICE = "spiffe://prod.example/ns/shop/sa/alice"
WEB = "spiffe://prod.example/ns/shop/sa/web"
HUGE = Limit(1e9, burst=10**12)  # never refuses within a benchmark


def _time(check: Callable[[], object], checks: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(checks):
            check()
        best = min(best, time.perf_counter() - start)
    return best / checks * 1e6


def main(argv: list[str] | None = None) -> int:
    """Run every case and print its cost per check."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ratelimit", description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    n, r = args.checks, args.repeats

    both = RateLimiter(RateLimits(total=HUGE, identity=HUGE, overrides=(Override(HUGE, (WEB,)),)))
    slow = Limit(1e-6)  # one request, then refused for ~11 days
    over_identity = RateLimiter(RateLimits(total=HUGE, identity=slow))
    over_identity.check(ALICE)
    over_total = RateLimiter(RateLimits(total=slow, identity=HUGE))
    over_total.check(ALICE)
    churn = RateLimiter(RateLimits(total=HUGE, identity=Limit(1e9)))  # buckets full again after 1 ns
    busy = RateLimiter(RateLimits(total=HUGE, identity=slow))
    for index in range(10_000):
        churn.check(f"spiffe://prod.example/ns/load/sa/warm{index}")
        busy.check(f"spiffe://prod.example/ns/load/sa/warm{index}")
    names = [f"spiffe://prod.example/ns/load/sa/c{index}" for index in range(n * r)]
    fresh = iter(names)
    fresh_busy = iter(names)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("allowed, total + identity", lambda: both.check(ALICE)),
        ("allowed, override", lambda: both.check(WEB)),
        ("allowed, no identity", lambda: both.check(None)),
        ("refused, identity", lambda: over_identity.check(ALICE)),
        ("refused, total", lambda: over_total.check(ALICE)),
        ("allowed, new identity at the bound", lambda: churn.check(next(fresh))),
        ("refused, new identity, busy table", lambda: busy.check(next(fresh_busy))),
    ]
    print(f"RateLimiter.check, best of {r} x {n:,} checks, one thread")
    for label, check in cases:
        print(f"  {label:<38} {_time(check, n, r):6.2f} us/check")
    assert not over_identity.check(ALICE).allowed and not over_total.check(ALICE).allowed
    assert len(churn) <= 10_000 and len(busy) == 10_000
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
