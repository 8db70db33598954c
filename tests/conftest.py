"""Fixtures shared by every test: real loopback backends, and the asyncio backend for anyio tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from meshlib.testing import Backend, Behavior


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


BackendFactory = Callable[..., list[Backend]]


@pytest.fixture
def start_backends() -> Iterator[BackendFactory]:
    """``start_backends(n, behavior=..., prefix=...)`` starts n real HTTP backends on loopback, stopped after."""
    started: list[Backend] = []

    def start(n: int, behavior: Behavior | None = None, prefix: str = "b", **kwargs: object) -> list[Backend]:
        group = [Backend(f"{prefix}{i}", behavior=behavior or Behavior(), **kwargs).start() for i in range(n)]  # type: ignore[arg-type]
        started.extend(group)
        return group

    yield start
    for backend in started:
        backend.stop()


def static_target(backends: list[Backend]) -> str:
    """A ``static://`` target listing the given backends."""
    return "static://" + ",".join(b.address for b in backends)
