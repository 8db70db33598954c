"""Deadline propagation across hops: the remaining budget as a request header, and back into a scope.

Outgoing mesh requests carry the time left of their call in ``grpc-timeout`` (:data:`DEADLINE_HEADER`), in
gRPC's relative format (PROTOCOL-HTTP2.md): ``TimeoutValue TimeoutUnit``, an ASCII integer of at most 8 digits
followed by ``H`` (hours), ``M`` (minutes), ``S`` (seconds), ``m`` (ms), ``u`` (µs) or ``n`` (ns). A
*relative* budget needs no synchronised clocks (Finagle's absolute header does), and gRPC servers and
proxies already understand it. meshlib writes the finest unit that fits in 8 digits and rounds *down*, so
the next hop never receives more time than the caller had.

On the inbound side (:mod:`meshlib.server`) these headers are accepted, and the smallest budget wins:

============================================  ===================================================================
``grpc-timeout``                              gRPC format above. ``0n`` means already expired.
``x-envoy-expected-rq-timeout-ms``            integer ms; what Envoy tells the app behind it (route or header
                                              timeout). ``0`` means "no timeout", as in Envoy.
``x-envoy-upstream-rq-timeout-ms``            integer ms; Envoy's per-request route-timeout override. ``0``
                                              means "no timeout", as in Envoy.
``Finagle-Ctx-com.twitter.finagle.Deadline``  ``"<timestamp_ns> <deadline_ns>"``, absolute Unix-epoch ns
                                              (Finagle's ``HttpDeadline``); converted with this host's wall
                                              clock, so clock skew shifts it.
============================================  ===================================================================

Decoders return ``None`` for anything malformed and never raise: a garbage header from a client must not
fail the request, it just sets no deadline.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable

from meshlib.policy import PolicyScope, policy

__all__ = [
    "DEADLINE_HEADER",
    "ENVOY_EXPECTED_TIMEOUT_HEADER",
    "ENVOY_TIMEOUT_HEADER",
    "FINAGLE_DEADLINE_HEADER",
    "INBOUND_HEADERS",
    "MAX_HEADER_LENGTH",
    "budget_from_headers",
    "deadline_scope",
    "decode_envoy_timeout",
    "decode_finagle_deadline",
    "decode_timeout",
    "encode_timeout",
]

#: The header meshlib stamps on outgoing mesh requests: gRPC's relative timeout.
DEADLINE_HEADER = "grpc-timeout"
ENVOY_EXPECTED_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"
ENVOY_TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
FINAGLE_DEADLINE_HEADER = "finagle-ctx-com.twitter.finagle.deadline"

_MAX_VALUE = 99_999_999  # 8 digits
#: Longest deadline header value decoded: the longest valid one (Finagle's two 19-digit numbers) fits easily.
MAX_HEADER_LENGTH = 64
# (unit, nanoseconds per unit), finest first.
_UNITS: tuple[tuple[str, int], ...] = (
    ("n", 1),
    ("u", 1_000),
    ("m", 1_000_000),
    ("S", 1_000_000_000),
    ("M", 60_000_000_000),
    ("H", 3_600_000_000_000),
)
_SECONDS_PER_UNIT = {unit: ns / 1e9 for unit, ns in _UNITS}
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_MILLIS = re.compile(r"[0-9]{1,18}")
_NANOS = re.compile(r"-?[0-9]{1,19}")


def encode_timeout(seconds: float) -> str:
    """``seconds`` as a ``grpc-timeout`` value: finest unit that fits 8 digits, rounded down.

    ``1.5`` -> ``"1500000u"``, ``0.25`` -> ``"250000u"``, ``15`` -> ``"15000000u"``, ``300`` -> ``"300000m"``.
    A negative budget encodes as ``"0n"`` (expired); one beyond ``99999999H`` (or infinite) is clamped to it,
    though a caller with no deadline should simply not send the header. NaN raises ``ValueError``.
    """
    if 0.0 < seconds < 100.0:  # the common case, without the general loop (NaN fails the comparison)
        nanos = round(seconds * 1e9)  # to the nearest ns first, so 0.3 s is 300000u and not 299999u
        if 99_999_999 < nanos <= 99_999_999_999:  # too many ns for 8 digits, few enough us
            return f"{nanos // 1000}u"
    if math.isnan(seconds):
        raise ValueError("cannot encode a NaN timeout")
    if seconds <= 0:
        return "0n"
    if math.isinf(seconds):
        return f"{_MAX_VALUE}H"
    nanos = round(seconds * 1e9)  # to the nearest ns first, so 0.3 s is 300000u and not 299999u
    for unit, size in _UNITS:
        value = nanos // size
        if value <= _MAX_VALUE:
            return f"{value}{unit}"
    return f"{_MAX_VALUE}H"


def decode_timeout(value: str) -> float | None:
    """Seconds from a ``grpc-timeout`` value (``"250m"`` -> 0.25), or ``None`` if it is malformed.

    Strict to the gRPC grammar (1 to 8 digits, one unit letter, surrounding spaces ignored). Never raises.
    """
    if not isinstance(value, str):
        return None
    match = _GRPC_TIMEOUT.fullmatch(value.strip())
    if match is None:
        return None
    return int(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]


def decode_envoy_timeout(value: str) -> float | None:
    """Seconds from an Envoy ``x-envoy-*-timeout-ms`` value; ``None`` if malformed or ``0`` (no timeout)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _MILLIS.fullmatch(text) is None:
        return None
    millis = int(text)
    return None if millis == 0 else millis / 1000.0


def decode_finagle_deadline(value: str, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds left from Finagle's ``"<timestamp_ns> <deadline_ns>"`` (absolute, epoch ns); ``None`` if bad.

    The result may be negative (expired) and is clamped to 0; ``now`` returns wall-clock epoch seconds.
    """
    if not isinstance(value, str):
        return None
    parts = value.split()
    if len(parts) != 2 or not all(_NANOS.fullmatch(part) for part in parts):
        return None
    deadline_ns = int(parts[1])
    return max(0.0, deadline_ns / 1e9 - now())


#: Inbound header (lower case) -> decoder of its value into remaining seconds.
INBOUND_HEADERS: dict[str, Callable[[str], float | None]] = {
    DEADLINE_HEADER: decode_timeout,
    ENVOY_EXPECTED_TIMEOUT_HEADER: decode_envoy_timeout,
    ENVOY_TIMEOUT_HEADER: decode_envoy_timeout,
    FINAGLE_DEADLINE_HEADER: decode_finagle_deadline,
}


def budget_from_headers(headers: Iterable[tuple[str, str]]) -> float | None:
    """The smallest budget (seconds) among the recognised deadline headers in ``headers``, or ``None``.

    ``headers`` is ``(name, value)`` pairs, names in any case. Unknown headers, malformed values and values
    longer than :data:`MAX_HEADER_LENGTH` (a client's, unread) are ignored.
    """
    budget: float | None = None
    for name, value in headers:
        decode = INBOUND_HEADERS.get(name.lower())
        if decode is None or len(value) > MAX_HEADER_LENGTH:
            continue
        seconds = decode(value)
        if seconds is not None and (budget is None or seconds < budget):
            budget = seconds
    return budget


def deadline_scope(seconds: float) -> PolicyScope:
    """A :func:`~meshlib.policy.policy` scope with ``deadline=seconds``: calls inside get at most that long.

    Like every deadline it only shrinks what an enclosing scope allows. Usable as ``with``, ``async with``
    or a decorator.
    """
    return policy(deadline=seconds)
