"""The optional HTTP library the scenarios compare when it is installed: httpx2 (Python >= 3.11).

``HTTPX2`` and ``MESH_HTTPX2`` are the modules ``httpx2`` and ``meshlib.httpx2``, or ``None`` when httpx2 is
missing; ``HTTPX2_MISSING`` then says why, for the scenario's notes (empty when it is installed).
"""

from __future__ import annotations

from typing import Any

HTTPX2: Any
MESH_HTTPX2: Any
try:
    import httpx2 as HTTPX2

    import meshlib.httpx2 as MESH_HTTPX2
except ImportError as exc:  # pragma: no cover - httpx2 is optional (the httpx2 extra)
    HTTPX2 = MESH_HTTPX2 = None
    HTTPX2_MISSING = f"httpx2 variants skipped: {exc} (pip install 'meshlib[httpx2]')"
else:
    HTTPX2_MISSING = ""
