"""The balancer registry: names, construction, injection."""

from __future__ import annotations

import random

import pytest

from meshlib import balance
from meshlib.balance import BALANCERS, make_balancer
from meshlib.balance.base import Balancer, BalancerOptions, EndpointStats
from meshlib.config import LB_NAMES
from meshlib.discovery.base import Endpoint

pytestmark = pytest.mark.one_library


def test_registry_names() -> None:
    assert list(BALANCERS) == [
        "p2c_ewma",
        "round_robin",
        "least_request",
        "random",
        "ring_hash",
        "weighted_round_robin",
    ]
    assert set(BALANCERS) == set(LB_NAMES)
    for name, cls in BALANCERS.items():
        assert cls.name == name
        assert issubclass(cls, Balancer)


def test_all_is_exported() -> None:
    for name in balance.__all__:
        assert hasattr(balance, name)


def test_make_balancer_injects_options_clock_and_rng() -> None:
    options = BalancerOptions(ring_size=8)
    rng = random.Random(1)

    def clock() -> float:
        return 42.0

    for name in BALANCERS:
        b = make_balancer(name, options, clock=clock, rng=rng)
        assert type(b) is BALANCERS[name]
        assert b.options is options
        assert b.clock is clock
        assert b.rng is rng
        stats = [EndpointStats(Endpoint("10.0.6.1", 80), clock=clock)]
        assert b.build(stats).pick() is stats[0]


def test_make_balancer_defaults() -> None:
    b = make_balancer("p2c_ewma")
    assert b.options == BalancerOptions()
    assert isinstance(b.rng, random.Random)


def test_unknown_balancer() -> None:
    with pytest.raises(KeyError, match=r"unknown balancer 'maglev'.*p2c_ewma"):
        make_balancer("maglev")
