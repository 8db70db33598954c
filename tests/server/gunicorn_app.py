"""The WSGI app of ``tests/server/test_gunicorn.py``: a module-level ``meshlib.Client`` built at import.

Served with ``gunicorn --preload``, this module is imported by the master, which builds the client and sends
one request with it (so its pool holds a keep-alive connection and its discovery thread runs), then forks the
workers: exactly the deployment of issue 10 (item 1). Each request to the app is forwarded to the mesh
service ``users`` with the same path; the answer says which worker answered and what the backend echoed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import meshlib

client = meshlib.Client()  # configured by MESHLIB_* in the environment (the test sets them)
MASTER = os.getpid()
WARM = client.get("http://users/warm").json()["path"]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Forward ``PATH_INFO`` to ``http://users``; answer ``{pid, master, path, endpoint}``."""
    response = client.get(f"http://users{environ['PATH_INFO']}")
    body = json.dumps(
        {
            "pid": os.getpid(),
            "master": MASTER,
            "path": response.json()["path"],
            "endpoint": response.extensions["meshlib.endpoint"],
        }
    ).encode()
    start_response("200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))])
    return [body]
