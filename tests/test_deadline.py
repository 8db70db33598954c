"""Deadline header encoding (gRPC's grpc-timeout format) and the inbound decoders."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlib.deadline import (
    DEADLINE_HEADER,
    budget_from_headers,
    deadline_scope,
    decode_envoy_timeout,
    decode_finagle_deadline,
    decode_timeout,
    encode_timeout,
)
from meshlib.policy import current_deadline

pytestmark = pytest.mark.one_library

GRPC_TIMEOUT = re.compile(r"[0-9]{1,8}[HMSmun]")
UNIT_SECONDS = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "S": 1.0, "M": 60.0, "H": 3600.0}


def test_header_name() -> None:
    assert DEADLINE_HEADER == "grpc-timeout"


@pytest.mark.parametrize(
    ("seconds", "encoded"),
    [
        (0.05, "50000000n"),
        (0.1, "100000u"),
        (0.3, "300000u"),
        (1.5, "1500000u"),
        (15.0, "15000000u"),
        (300.0, "300000m"),
        (100_000.0, "100000S"),
        (100_000_000.0, "1666666M"),
        (0.0, "0n"),
        (-1.0, "0n"),
        (math.inf, "99999999H"),
        (1e20, "99999999H"),
    ],
)
def test_encode_picks_the_finest_unit_that_fits(seconds: float, encoded: str) -> None:
    assert encode_timeout(seconds) == encoded


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError, match="NaN"):
        encode_timeout(math.nan)


@given(st.floats(min_value=0, max_value=99_999_999 * 3600.0, allow_nan=False))
def test_round_trip_within_unit_precision_and_never_more(seconds: float) -> None:
    encoded = encode_timeout(seconds)
    assert GRPC_TIMEOUT.fullmatch(encoded), encoded  # at most 8 digits, one unit
    decoded = decode_timeout(encoded)
    assert decoded is not None
    unit = UNIT_SECONDS[encoded[-1]]
    # rounded down to the unit (after rounding to the nearest ns): never more than the caller had
    assert decoded <= seconds + 1e-9 + seconds * 1e-12
    assert seconds - decoded <= unit + seconds * 1e-12


@given(st.integers(min_value=0, max_value=99_999_999), st.sampled_from(sorted(UNIT_SECONDS)))
def test_decode_every_valid_value(value: int, unit: str) -> None:
    assert decode_timeout(f"{value}{unit}") == pytest.approx(value * UNIT_SECONDS[unit])


@pytest.mark.parametrize(
    "value",
    ["", "S", "10", "123456789S", "1.5S", "-1S", "10s", "10 S", "10SS", "\u0661\u0660S", "10x", "0x10S", "+5S", "1_0S"],
)
def test_decode_garbage_is_none(value: str) -> None:
    assert decode_timeout(value) is None


@given(st.text(max_size=20))
def test_decode_never_raises(value: str) -> None:
    result = decode_timeout(value)
    assert result is None or result >= 0
    assert decode_envoy_timeout(value) is None or (decode_envoy_timeout(value) or 0) > 0
    decode_finagle_deadline(value)


def test_decode_tolerates_surrounding_spaces() -> None:
    assert decode_timeout(" 250m ") == 0.25


def test_envoy_millis() -> None:
    assert decode_envoy_timeout("1500") == 1.5
    assert decode_envoy_timeout("0") is None  # Envoy: 0 disables the timeout
    assert decode_envoy_timeout("1.5") is None
    assert decode_envoy_timeout("-5") is None


def test_finagle_deadline_is_absolute_epoch_nanoseconds() -> None:
    now = 1_700_000_000.0
    header = f"{int(now * 1e9)} {int((now + 2.5) * 1e9)}"
    assert decode_finagle_deadline(header, now=lambda: now) == pytest.approx(2.5)
    expired = f"{int((now - 9) * 1e9)} {int((now - 1) * 1e9)}"
    assert decode_finagle_deadline(expired, now=lambda: now) == 0.0
    assert decode_finagle_deadline("12", now=lambda: now) is None
    assert decode_finagle_deadline("a b", now=lambda: now) is None


def test_budget_from_headers_takes_the_smallest_recognised_value() -> None:
    headers = [
        ("Content-Type", "text/plain"),
        ("Grpc-Timeout", "2S"),
        ("x-envoy-expected-rq-timeout-ms", "1500"),
        ("x-envoy-upstream-rq-timeout-ms", "garbage"),
    ]
    assert budget_from_headers(headers) == 1.5
    assert budget_from_headers([("grpc-timeout", "nonsense")]) is None
    assert budget_from_headers([]) is None


def test_deadline_scope_sets_a_shrinking_deadline() -> None:
    with deadline_scope(5.0):
        outer = current_deadline()
        assert outer is not None
        with deadline_scope(50.0):
            assert current_deadline() == outer
    assert current_deadline() is None


@given(st.floats(min_value=1e-9, max_value=1e7, allow_nan=False, allow_infinity=False))
def test_encode_fast_path_agrees_with_the_general_rule(seconds: float) -> None:
    nanos = round(seconds * 1e9)
    for unit, size in (("n", 1), ("u", 1_000), ("m", 1_000_000), ("S", 10**9), ("M", 60 * 10**9), ("H", 3600 * 10**9)):
        if nanos // size <= 99_999_999:
            assert encode_timeout(seconds) == f"{nanos // size}{unit}"
            return
