"""What ``import meshlib`` leaves unimported, and that each lazily loaded piece loads when first used.

Module sets, not timings (those are ``python -m benchmarks.import_time``'s job): each check runs in a fresh
interpreter, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Loaded by the first service, TLS identity check or admin server that needs them, never by ``import meshlib``.
NOT_ON_IMPORT = (
    "dns",
    "dns.asyncresolver",
    "meshlib.discovery.static",
    "meshlib.discovery.dns",
    "meshlib.discovery.consul",
    "meshlib.balance.p2c",
    "meshlib.balance.round_robin",
    "meshlib.balance.least_request",
    "meshlib.balance.random",
    "meshlib.balance.ring_hash",
    "meshlib.balance.wrr",
    "meshlib.balance.orca",
    "cryptography",
    "http.server",
    "meshlib._admin_http",
)


def loaded_after(code: str, modules: tuple[str, ...] = NOT_ON_IMPORT) -> set[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_meshlib_leaves_schemes_balancers_x509_and_admin_server_unloaded() -> None:
    assert loaded_after("import meshlib") == set()


def test_a_plain_client_loads_its_scheme_and_balancer_only() -> None:
    code = (
        "import meshlib\n"
        "client = meshlib.Client(services={'users': 'static://127.0.0.1:9'}, environ={})\n"
        "client.close()"
    )
    assert loaded_after(code) == {"meshlib.discovery.static", "meshlib.balance.p2c", "meshlib.balance.random"}


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("dns://users.internal:80", {"dns", "dns.asyncresolver", "meshlib.discovery.static", "meshlib.discovery.dns"}),
        ("consul://users", {"meshlib.discovery.consul"}),
    ],
)
def test_a_scheme_is_imported_by_its_first_target(target: str, expected: set[str]) -> None:
    code = (
        "from meshlib.discovery import DiscoverySettings, build_resolver\n"
        f"build_resolver('users', {target!r}, DiscoverySettings(environ={{}}), variable='V').close()"
    )
    assert loaded_after(code) == expected


def test_the_admin_server_is_imported_by_the_first_admin_endpoint() -> None:
    code = (
        "import meshlib\n"
        "client = meshlib.Client(services={'users': 'static://127.0.0.1:9'},"
        " environ={'MESHLIB_ADMIN_ADDR': '127.0.0.1:0'})\n"
        "client.close()"
    )
    assert {"http.server", "meshlib._admin_http"} <= loaded_after(code)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ("TLSSettings()", set()),
        # A SPIFFE ID to check: cryptography is imported with the context, not by the first handshake.
        ("TLSSettings(server_id='spiffe://prod.example')", {"cryptography"}),
    ],
)
def test_cryptography_is_imported_by_contexts_that_check_x509(settings: str, expected: set[str]) -> None:
    code = f"from meshlib.security.tls import TLSSettings, build_context\nbuild_context({settings})"
    assert loaded_after(code, ("cryptography",)) == expected
