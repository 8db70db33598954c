"""The HTTP library the suite runs against: httpx, or httpx2 under ``MESHLIB_HTTP_LIBRARY=httpx2``.

Tests write ``from tests.httplib import httpx`` and use the name as they would use httpx; ``./dev.sh test``
runs the whole suite once per library, and ``meshlib.Client`` follows the same variable (see
:mod:`meshlib`). ``ONLY_HTTPX`` skips the few tests about httpx-only integrations (the
opentelemetry-instrumentation-httpx package, the httpx-aiohttp inner transport).
"""

from __future__ import annotations

import os

import pytest

LIBRARY = os.environ.get("MESHLIB_HTTP_LIBRARY", "").strip().lower() or "httpx"

if LIBRARY == "httpx2":
    import httpx2 as httpx
else:
    import httpx

ONLY_HTTPX = pytest.mark.skipif(LIBRARY != "httpx", reason=f"an httpx-only integration (running on {LIBRARY})")

__all__ = ["LIBRARY", "ONLY_HTTPX", "httpx"]
