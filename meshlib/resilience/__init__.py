"""Resilience decisions shared by the sync and async transports: no I/O, no sleeping, injected clocks.

* :mod:`~meshlib.resilience.classify`: the one classifier (what an outcome is, and whether it was sent);
* :mod:`~meshlib.resilience.budget`: how many retries (a Finagle retry budget per service);
* :mod:`~meshlib.resilience.breaker`: per-endpoint circuit breakers over pybreaker, never locked across I/O;
* :mod:`~meshlib.resilience.outlier`: Envoy-style ejection of failing endpoints, and panic mode;
* :mod:`~meshlib.resilience.limit`: a per-service cap on requests in flight.

Each piece knows nothing of the others (as tower's layers); :mod:`meshlib.transport` wires them.
"""

from meshlib.resilience.breaker import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    BreakerListener,
    EndpointBreaker,
)
from meshlib.resilience.budget import RetryBudget
from meshlib.resilience.classify import (
    DEFAULT_RETRY_STATUSES,
    IDEMPOTENCY_KEY_HEADER,
    IDEMPOTENT_METHODS,
    RETRY_AFTER_CAP,
    Classification,
    Outcome,
    classify_exception,
    classify_response,
    may_resend,
    parse_retry_after,
    should_retry,
)
from meshlib.resilience.hedging import HedgePolicy, HedgeSettings
from meshlib.resilience.limit import ConcurrencyLimit
from meshlib.resilience.outlier import FailurePercentageEjection, OutlierDetector, SuccessRateEjection

__all__ = [
    "DEFAULT_RETRY_STATUSES",
    "IDEMPOTENCY_KEY_HEADER",
    "IDEMPOTENT_METHODS",
    "RETRY_AFTER_CAP",
    "STATE_CLOSED",
    "STATE_HALF_OPEN",
    "STATE_OPEN",
    "BreakerListener",
    "Classification",
    "ConcurrencyLimit",
    "EndpointBreaker",
    "FailurePercentageEjection",
    "HedgePolicy",
    "HedgeSettings",
    "OutlierDetector",
    "Outcome",
    "RetryBudget",
    "SuccessRateEjection",
    "classify_exception",
    "classify_response",
    "may_resend",
    "parse_retry_after",
    "should_retry",
]
