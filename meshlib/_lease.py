"""An attempt's lease: everything one attempt holds, given back exactly once on every path.

grpc-go's ``PickResult.Done`` and tower's concurrency permit are the model. When the call plan picks an
endpoint it takes a :class:`Lease`, and the lease owns the attempt's bookkeeping:

* the endpoint's load (``EndpointStats.begin``/``end``: in-flight count and peak-EWMA latency);
* the breaker's half-open probe, when the pick took it (given back unused if the attempt ends without a
  verdict, so a cancelled probe does not leave the breaker refusing forever);
* the verdict, fed once to the endpoint's breaker and the service's outlier detector (:meth:`judge`);
* the call's in-flight slot (``MESHLIB_MAX_INFLIGHT``, or the adaptive limit), when the attempt's response is
  the one the caller gets (:attr:`permit`): it is held until that response's body is closed, and given back with
  the attempt's latency, the sample an adaptive limit learns from;
* the endpoint's pool when the endpoint has left discovery meanwhile: the last lease to end closes it;
* the endpoint's ORCA load report, when the service's balancer wants one (``weighted_round_robin``): the response
  headers handed to :meth:`judge` are read for ``endpoint-load-metrics`` only then, so other balancers pay nothing.

:meth:`release` gives all of that back and runs once, whichever path comes first: an error, a retried answer
closed, cancellation, the body read to its end or closed, or a response dropped without closing. The last is
:meth:`drop`, called from a stream's ``__del__``: the garbage collector may run it inside any lock the thread
holds, so it only queues the release, and the mesh runs queued releases before its next call (and on close).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshlib._testmode import MODE as _TESTING
from meshlib.resilience.classify import Outcome

if TYPE_CHECKING:
    from meshlib._service import HostPort, Service
    from meshlib.balance.base import EndpointStats
    from meshlib.resilience.adaptive import AdaptiveConcurrencyLimit
    from meshlib.resilience.classify import Classification
    from meshlib.resilience.limit import ConcurrencyLimit

__all__ = ["Lease", "LeaseHome"]


class LeaseHome:
    """Where a mesh's leases hand back what outlives them: idle pools to close, releases queued by the GC."""

    __slots__ = ("close_pool", "closed", "dropped")

    def __init__(self, close_pool: Callable[[Any], None]) -> None:
        #: Closes a retired endpoint's pool once its last lease ends (the driver's way: now, or on the loop).
        self.close_pool = close_pool
        #: Releases queued by :meth:`Lease.drop`; the mesh runs them before its next call (:meth:`settle`).
        self.dropped: deque[Callable[[], None]] = deque()
        #: Set by the mesh's ``close()``: no attempt starts after it, and pools still in use are closed by the
        #: last lease that ends on them.
        self.closed = False

    def settle(self) -> None:
        """Run the releases the garbage collector queued (cheap when there are none: one truth test)."""
        dropped = self.dropped
        while dropped:
            try:
                release = dropped.popleft()
            except IndexError:  # another thread took the last one
                return
            release()


class Lease:
    """One attempt's hold on an endpoint. Made by the plan when it picks; released exactly once."""

    __slots__ = (
        "address",
        "error",
        "failed",
        "gate",
        "home",
        "judged",
        "permit",
        "released",
        "rtt",
        "service",
        "started",
        "stats",
        "transport",
    )

    def __init__(self, service: Service[Any], stats: EndpointStats, transport: Any, home: LeaseHome) -> None:
        endpoint = stats.endpoint
        self.service = service
        self.stats = stats
        self.address: HostPort = (endpoint.host, endpoint.port)
        self.transport = transport
        self.home = home
        #: The call's in-flight slot, handed to this lease when its response goes to the caller; released with
        #: the attempt's :attr:`rtt` (send to response headers), the adaptive limit's latency sample.
        self.permit: ConcurrencyLimit | AdaptiveConcurrencyLimit | None = None
        #: The endpoint's connection slot (async driver, :meth:`AsyncMeshTransport._send`): held until the body
        #: is closed, because the connection is busy until then.
        self.gate: Any = None
        self.judged = False
        self.released = False
        self.failed = True
        self.error = False
        self.rtt = 0.0
        stats.begin()
        self.started = time.monotonic()

    def judge(self, verdict: Classification, headers: Any = None) -> None:
        """Record the attempt's verdict (once): latency until now, the breaker, outlier detection.

        ``headers``: the response's headers, when there is a response; the endpoint's ORCA load report is read from
        them when the service's balancer wants load reports (never raises: a malformed report is counted).
        """
        self.rtt = time.monotonic() - self.started
        if headers is not None and self.service.balancer.wants_load_reports:
            self._read_load_report(headers)
        self.judged = True
        self.failed = failed = verdict.endpoint_failure
        # For the balancer, any error answer (4xx included) is one that must not make the endpoint look fast.
        status = verdict.status
        self.error = failed or (status is not None and status >= 400)
        if _TESTING.enabled:  # meshlib.testing.set_testing: no breaker, no ejection
            return
        service = self.service
        address = self.address
        if failed:
            service.breaker_for(address).record_failure()
        else:
            breaker = service.breakers.get(address)  # none yet: the endpoint never failed, nothing to reset
            if breaker is not None:
                if verdict.sent or verdict.outcome is Outcome.SUCCESS:
                    breaker.record_success()
                else:
                    breaker.release()
        service.detector.record(address, failed)

    def _read_load_report(self, headers: Any) -> None:
        """Hand the endpoint's ORCA load report in ``headers`` (if any) to its stats; a malformed one is counted."""
        from meshlib.balance.orca import INVALID, read_load_report  # only balancers that want reports import it

        report = read_load_report(headers)
        if report is not None:  # stamped with the balancer's clock, the one its weights are judged by
            self.stats.record_report(None if report is INVALID else report, self.service.balancer.clock())

    def release(self) -> None:
        """Give everything back (idempotent: the first call does it, later calls do nothing)."""
        if self.released:
            return
        self.released = True
        if not self.judged:  # interrupted: no verdict on the endpoint; give back a probe the pick took
            self.rtt = time.monotonic() - self.started
            breaker = self.service.breakers.get(self.address)
            if breaker is not None:
                breaker.release()
        self.stats.end(self.rtt, self.started + self.rtt, failed=self.failed, error=self.error)
        permit, self.permit = self.permit, None
        if permit is not None:  # only the final answer's lease holds it, judged: its rtt is the limit's sample
            permit.release(self.rtt)
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.release()
        service = self.service
        if service.retiring or self.home.closed:
            idle = service.retire(self.stats)
            if idle is not None:
                self.home.close_pool(idle)

    def drop(self) -> None:
        """The response holding this lease was garbage-collected unclosed: release before the next call."""
        if not self.released:
            self.home.dropped.append(self.release)
