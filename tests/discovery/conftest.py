"""Fixtures for discovery tests: a real dnsmasq on loopback with a known set of records.

Without dnsmasq the tests that need it are skipped, with the reason, on a developer machine; in CI
(``CI=true``) they fail instead, so a CI image that lost dnsmasq cannot pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.servers.dnsmasq import DNSMASQ, Dnsmasq, SrvRecord, find_dnsmasq

#: The records the ``dnsmasq`` fixture starts with (tests change them with ``set_records``).
HOSTS = {
    "users.internal": ["127.0.0.1", "127.0.0.2", "::1"],
    "web1.users.internal": ["127.0.0.11"],
    "web2.users.internal": ["127.0.0.12", "::12"],
    "web3.users.internal": ["127.0.0.13"],
    "v4only.internal": ["127.0.0.4"],
}
SRV = [
    SrvRecord("_http._tcp.users.internal", "web1.users.internal", 8081, priority=10, weight=60),
    SrvRecord("_http._tcp.users.internal", "web2.users.internal", 8082, priority=10, weight=20),
    SrvRecord("_http._tcp.users.internal", "web3.users.internal", 8083, priority=20, weight=0),
    # Consul DNS interface shapes: "<tag>.<service>.service.consul" and "_<service>._<tag>.service.consul".
    SrvRecord("primary.payments.service.consul", "web1.users.internal", 9001, priority=1, weight=1),
    SrvRecord("_payments._primary.service.consul", "web2.users.internal", 9002, priority=1, weight=1),
]
TTL = 45
SRV_TTL = 30


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_dnsmasq() -> str:
    """The dnsmasq binary, or skip (fail under ``CI=true``) with the reason."""
    binary = find_dnsmasq()
    if binary is None:
        reason = f"dnsmasq not found at {DNSMASQ} or on PATH (install Debian package dnsmasq-base)"
        if _in_ci():
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    return binary


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests using the ``dnsmasq`` fixture get the ``dnsmasq`` marker (``-m "not dnsmasq"`` deselects them)."""
    for item in items:
        if "dnsmasq" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.dnsmasq)


@pytest.fixture
def dnsmasq() -> Iterator[Dnsmasq]:
    """A started :class:`Dnsmasq` serving :data:`HOSTS` (TTL 45 s) and :data:`SRV` (TTL 30 s); stopped after."""
    with Dnsmasq(
        hosts=HOSTS, srv=SRV, ttl=TTL, srv_ttl=SRV_TTL, domains=("internal", "consul"), binary=require_dnsmasq()
    ) as server:
        yield server
