"""Fixtures for TLS tests: a PKI in a temporary directory, HTTPS backends on loopback, sync/async callers."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib.testing import Backend
from tests.httplib import httpx
from tests.security.pki import CA, Leaf, server_context

TLSBackendFactory = Callable[..., Backend]


@pytest.fixture
def ca() -> CA:
    """The CA that signs servers (and, in mTLS tests, clients)."""
    return CA("mesh CA")


@pytest.fixture
def tls_backend(tmp_path: Path) -> Iterator[TLSBackendFactory]:
    """``tls_backend(leaf, client_ca=None)``: a started HTTPS backend presenting ``leaf``, stopped after."""
    started: list[Backend] = []

    def start(
        leaf: Leaf, *, client_ca: CA | None = None, name: str = "tls", context: ssl.SSLContext | None = None
    ) -> Backend:
        ctx = context or server_context(leaf, tmp_path, client_ca=client_ca)
        backend = Backend(name, ssl_context=ctx).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


def mesh_env(backend: Backend, service: str = "PAYMENTS", **settings: str) -> dict[str, str]:
    """``MESHLIB_SERVICE_<service>=static://backend`` plus ``MESHLIB_<key>=value`` for each setting."""
    env = {f"MESHLIB_SERVICE_{service}": f"static://{backend.address}"}
    env.update({f"MESHLIB_{key}": value for key, value in settings.items()})
    return env


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Each TLS behaviour is checked through ``meshlib.Client`` and ``meshlib.AsyncClient``."""
    return str(request.param)


def fetch(mode: str, url: str, *, environ: Mapping[str, str], **kwargs: Any) -> httpx.Response:
    """GET ``url`` through a fresh meshlib client of ``mode`` (``sync`` or ``async``); the body is read."""
    if mode == "sync":
        with meshlib.Client(environ=environ, **kwargs) as client:
            return client.get(url)

    async def run() -> httpx.Response:
        async with meshlib.AsyncClient(environ=environ, **kwargs) as client:
            return await client.get(url)

    return asyncio.run(run())
