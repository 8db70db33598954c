"""``register_balancer``: classes or dotted paths, imported when a name is first used."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshlib import balance
from meshlib.balance import BALANCERS, make_balancer, register_balancer
from meshlib.balance.round_robin import RoundRobin

pytestmark = pytest.mark.one_library


@pytest.fixture
def registry() -> Iterator[None]:
    saved = dict(balance._REGISTERED)
    yield
    balance._REGISTERED.clear()
    balance._REGISTERED.update(saved)


def test_builtins_are_registered_by_path() -> None:
    assert balance._REGISTERED == {
        "p2c_ewma": "meshlib.balance.p2c.P2CPeakEwma",
        "round_robin": "meshlib.balance.round_robin.RoundRobin",
        "least_request": "meshlib.balance.least_request.LeastRequest",
        "random": "meshlib.balance.random.WeightedRandom",
        "ring_hash": "meshlib.balance.ring_hash.RingHash",
        "weighted_round_robin": "meshlib.balance.wrr.WeightedRoundRobin",
    }
    assert "p2c_ewma" in BALANCERS
    assert "maglev" not in BALANCERS
    assert len(BALANCERS) == 6
    with pytest.raises(TypeError):
        BALANCERS["x"] = RoundRobin  # type: ignore[index]


def test_the_classes_of_all_are_module_attributes() -> None:
    from meshlib.balance import RingHash

    assert RingHash is BALANCERS["ring_hash"]
    assert balance.RoundRobin is RoundRobin
    with pytest.raises(AttributeError, match="Maglev"):
        _ = balance.Maglev  # type: ignore[attr-defined]


@pytest.mark.usefixtures("registry")
def test_register_a_class_or_a_path() -> None:
    class Sticky(RoundRobin):
        name = "sticky"

    register_balancer("sticky", Sticky)
    assert type(make_balancer("sticky")) is Sticky
    assert list(BALANCERS)[-1] == "sticky"
    with pytest.raises(ValueError, match="already registered"):
        register_balancer("sticky", "meshlib.balance.round_robin.RoundRobin")
    register_balancer("sticky", "meshlib.balance.round_robin.RoundRobin", replace=True)
    assert BALANCERS["sticky"] is RoundRobin


@pytest.mark.usefixtures("registry")
def test_bad_registrations() -> None:
    with pytest.raises(TypeError, match="Balancer subclass"):
        register_balancer("x", object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dotted path"):
        register_balancer("x", "RoundRobin")
    with pytest.raises(ValueError, match="invalid balancer name"):
        register_balancer("", RoundRobin)
    register_balancer("gone", "tests_no_such_module.Balancer")
    with pytest.raises(ImportError, match="balancer 'gone' is registered as"):
        make_balancer("gone")
    register_balancer("notone", "meshlib.balance.base.BalancerOptions")
    with pytest.raises(TypeError, match="not a Balancer subclass"):
        BALANCERS["notone"]
