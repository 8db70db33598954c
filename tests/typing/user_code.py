"""Code a user writes against meshlib, type-checked by ``tests/test_typing.py`` (not run).

Each line marked ``# error`` must be reported by mypy --strict, as it would be for the library's own client;
every other line must check clean.
"""

import httpx

import meshlib
import meshlib.httpx

meshlib.Client(timout=5.0)  # error: a misspelt httpx argument
meshlib.httpx.AsyncClient(servics={})  # error: a misspelt mesh argument
meshlib.Client(limits="many")  # error: a value of the wrong type

client = meshlib.Client(timeout=5.0, services={"payments": "static://127.0.0.1:8080"}, lb="round_robin")
response: httpx.Response = client.get("http://payments/charge")
plain: httpx.Client = client  # a meshlib client is the library's client
try:
    client.get("http://payments/charge")
except meshlib.DeadlineExceeded as exc:
    budget: float | None = exc.timeout
