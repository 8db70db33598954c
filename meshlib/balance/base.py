"""What every balancer shares: per-endpoint load statistics and the Balancer/Picker split.

As in grpc-go, a :class:`Balancer` is the slow path: it is handed the whole endpoint set whenever
membership changes and builds an immutable :class:`Picker` (cumulative weights, hash ring, schedule).
The request path only calls ``Picker.pick``, which does no I/O, takes no lock, and reads live load from
:class:`EndpointStats`. Time and randomness are injected (``clock``, ``rng``) so tests need no sleeping.
"""

from __future__ import annotations

import math
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshlib.balance.slow_start import SlowStart
from meshlib.discovery.base import Endpoint

if TYPE_CHECKING:
    from meshlib.balance.orca import LoadReport
    from meshlib.balance.wrr import WrrSettings

Clock = Callable[[], float]

#: Linkerd's and Finagle's defaults for peak EWMA: an unmeasured endpoint is assumed to answer in 30 ms,
#: and measurements decay with a 10 s time constant.
DEFAULT_RTT = 0.030
DEFAULT_DECAY = 10.0

_exp = math.exp


class EndpointStats:
    """Live load of one endpoint as this client sees it: in-flight requests and peak-EWMA latency.

    Updated by the transport around each request (``begin``/``end``); read by pickers. The lock guards
    only the few arithmetic operations of an update, never I/O. One instance per endpoint per client, kept
    across discovery refreshes while the endpoint stays in the set, so its history survives.

    ``joined_at``: when (the balancer's clock) the endpoint joined a set that already existed, or ``None`` for
    one present in the service's first set. Set by the service when it admits the endpoint; slow start
    (:mod:`meshlib.balance.slow_start`) ramps the share of endpoints whose ``joined_at`` is within its window.
    """

    __slots__ = (
        "_cost",
        "_decay",
        "_lock",
        "_stamp",
        "endpoint",
        "failures",
        "inflight",
        "invalid_reports",
        "joined_at",
        "load_report",
        "load_report_time",
        "requests",
        "weight_report",
        "weight_report_time",
        "weight_since",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        default_rtt: float = DEFAULT_RTT,
        decay: float = DEFAULT_DECAY,
        clock: Clock = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self.inflight = 0
        self._cost = default_rtt
        self._stamp = clock()
        self._decay = decay
        self.requests = 0
        self.failures = 0
        self.joined_at: float | None = None
        #: The last valid ORCA load report this endpoint sent (:mod:`meshlib.balance.orca`) and when
        #: (``clock`` time); kept only when the service's balancer wants load reports.
        self.load_report: LoadReport | None = None
        self.load_report_time = -math.inf
        #: Reports that were present but malformed (ignored, logged at DEBUG).
        self.invalid_reports = 0
        #: gRFC A58's weight state: the last report with positive QPS and utilization, when it came
        #: (``last_updated``), and since when such reports have arrived without a gap (``non_empty_since``,
        #: ``inf`` when none: the balancer resets it when the weight expires).
        self.weight_report: LoadReport | None = None
        self.weight_report_time = -math.inf
        self.weight_since = math.inf

    def record_report(self, report: LoadReport | None, now: float) -> None:
        """Keep a load report the endpoint sent at ``now``; ``None`` counts a malformed one (ignored).

        A report with positive QPS and utilization also updates A58's weight state (one that lacks either is
        kept for status only, as A58's ``UpdateWeight`` ignores it).
        """
        with self._lock:
            if report is None:
                self.invalid_reports += 1
                return
            self.load_report = report
            self.load_report_time = now
            if report.rps_fractional > 0.0 and report.load_utilization > 0.0:
                if self.weight_since == math.inf:
                    self.weight_since = now
                self.weight_report = report
                self.weight_report_time = now

    def begin(self) -> None:
        """Count one request as in flight to this endpoint."""
        with self._lock:
            self.inflight += 1
            self.requests += 1

    def end(self, rtt: float, now: float, *, failed: bool = False, error: bool = False) -> None:
        """Record a finished request's latency (seconds) into the peak EWMA and drop it from in-flight.

        Peak EWMA (Finagle ``PeakEwma``): a latency above the current estimate replaces it at once, so a
        slow endpoint is noticed after one request; lower latencies are blended in with weight
        ``exp(-elapsed/decay)`` on the old value, so recovery is gradual.

        ``error``: the answer was an error (a 4xx or 5xx status, a connection failure or a timeout). An error
        never makes the endpoint look faster: its latency may raise the estimate but is not blended in
        below it, and the estimate's idle decay starts again from now. Otherwise an endpoint answering
        instant errors (a 404 from a misrouted deployment, a refused connection) would win every
        comparison and draw most of the traffic. ``failed`` (it counts against the endpoint: 5xx,
        connection failure, timeout) is only counted here, for status views.
        """
        with self._lock:
            self.inflight -= 1
            if failed:
                self.failures += 1
            if rtt > self._cost:
                self._cost = rtt
            elif not error:
                elapsed = max(now - self._stamp, 0.0)
                w = math.exp(-elapsed / self._decay)
                self._cost = self._cost * w + rtt * (1.0 - w)
            self._stamp = now

    def cost(self, now: float) -> float:
        """Peak-EWMA latency decayed to ``now`` (seconds); unlocked read, exact enough for balancing."""
        elapsed = now - self._stamp
        if elapsed <= 0.0:
            return self._cost
        # Decay towards zero while idle, as Finagle does, so an endpoint that was slow once is retried.
        return self._cost * math.exp(-elapsed / self._decay)

    def load(self, now: float) -> float:
        """Finagle's peak-EWMA load: latency estimate times (in-flight + 1), divided by weight."""
        # ``cost(now)`` inlined and no ``max()``: this runs twice per P2C pick; 185 ns instead of 270 ns.
        cost = self._cost
        elapsed = now - self._stamp
        if elapsed > 0.0:
            cost *= _exp(-elapsed / self._decay)
        weight = self.endpoint.weight
        return cost * (self.inflight + 1) / (weight if weight > 1 else 1)

    def __repr__(self) -> str:
        return f"EndpointStats({self.endpoint.address}, inflight={self.inflight}, cost={self._cost:.4f})"


class Picker(ABC):
    """An immutable view of one endpoint set that picks an endpoint per request."""

    @abstractmethod
    def pick(self, *, key: bytes | None = None, exclude: Container[Endpoint] = ()) -> EndpointStats | None:
        """Choose one endpoint, never one in ``exclude``; ``None`` when every endpoint is excluded.

        ``key`` is the request's hash key (ring_hash uses it; others ignore it).
        """


@dataclass(frozen=True, slots=True)
class BalancerOptions:
    """Tunables shared by the balancers; defaults cite their sources in :class:`~meshlib._config.model.MeshConfig`."""

    default_rtt: float = DEFAULT_RTT
    decay: float = DEFAULT_DECAY
    ring_size: int = 1024
    #: Ramp newly joined endpoints (off unless its window is set); ring_hash ignores it.
    slow_start: SlowStart = field(default_factory=SlowStart)
    #: ``weighted_round_robin``'s settings; ``None``: from the ``MESHLIB_WRR_*`` variables when it is built.
    wrr: WrrSettings | None = None


class Balancer(ABC):
    """Builds pickers for one algorithm. Stateless apart from the injected clock and RNG."""

    name: str = ""
    #: Whether this balancer reads ORCA load reports: only then does an attempt's lease parse the
    #: ``endpoint-load-metrics`` response header (:meth:`EndpointStats.record_report`), so others pay nothing.
    wants_load_reports: bool = False

    def __init__(
        self,
        options: BalancerOptions | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or BalancerOptions()
        self.clock = clock
        self.rng = rng or random.Random()

    @abstractmethod
    def build(self, endpoints: Sequence[EndpointStats]) -> Picker:
        """Build a picker over ``endpoints`` (non-empty, lowest SRV priority group already selected)."""
