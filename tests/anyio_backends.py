"""``anyio_backend`` under both asyncio and trio, for modules whose async tests must hold under each.

Import the fixture into the module (``from tests.anyio_backends import asyncio_and_trio``); the suite's
default (tests/conftest.py) is asyncio only.
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"], name="anyio_backend")
def asyncio_and_trio(request: pytest.FixtureRequest) -> str:
    """Each async test of the module runs once under asyncio and once under trio."""
    return str(request.param)
