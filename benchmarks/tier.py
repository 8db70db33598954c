"""A middle service of the S5 chain: ``python -m benchmarks.tier --port P --next static://host:port``.

An ASGI app served by uvicorn, wrapped in :class:`meshlib.server.DeadlineMiddleware`, whose only route
calls the next hop (the logical service ``next``) through a ``meshlib.AsyncClient`` and answers with the
status it got: 503 when that call failed with an exception, the way an ordinary service passes an
upstream failure on. So the chain A -> B -> C -> backends shows what meshlib's retries, budgets and
deadline propagation do across layers, with nothing benchmark-specific in the middle.

It counts what it sees: inbound requests, inbound requests that arrived after the top caller's deadline
(the ``x-bench-deadline`` header, a ``time.monotonic()`` value, which is system-wide on Linux), the
outbound attempts meshlib started and those started after that deadline (:class:`CountingTransport`).
``GET /__stats`` returns the counters as JSON, ``GET /__reset`` zeroes them.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

import meshlib
from meshlib.server import DeadlineMiddleware

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

DEADLINE_HEADER = b"x-bench-deadline"


class CountingTransport(httpx.AsyncBaseTransport):
    """An inner transport that counts the attempts meshlib starts, and those started after the deadline.

    Wraps one shared ``httpx.AsyncHTTPTransport`` (passed to ``meshlib.AsyncClient(transport=...)``). An
    attempt is "late" when it starts after the ``x-bench-deadline`` its request carries: the exact
    definition of the S5 target, measured where the attempt is made, whatever the connection then does.
    """

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.attempts = 0
        self.late = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.attempts += 1
        deadline = request.headers.get("x-bench-deadline")
        if deadline is not None and time.monotonic() > float(deadline):
            self.late += 1
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Tier:
    """The ASGI app: forward to ``next`` through meshlib, count arrivals and attempts."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.client: meshlib.AsyncClient | None = None
        self.transport = CountingTransport()
        self.stats = {"received": 0, "late_arrivals": 0, "failed": 0}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope.get("path", "/")
        if path == "/__stats":
            stats = {**self.stats, "attempts": self.transport.attempts, "late_starts": self.transport.late}
            await _answer(send, 200, json.dumps(stats).encode())
            return
        if path == "/__reset":
            self.stats = dict.fromkeys(self.stats, 0)
            self.transport.attempts = self.transport.late = 0
            await _answer(send, 200, b"{}")
            return
        now = time.monotonic()
        self.stats["received"] += 1
        deadline = dict(scope.get("headers", ())).get(DEADLINE_HEADER)
        headers = {}
        if deadline is not None:
            headers["x-bench-deadline"] = deadline.decode()
            if now > float(deadline):
                self.stats["late_arrivals"] += 1
        if self.client is None:  # created on the serving loop
            self.client = meshlib.AsyncClient(services={"next": self.target}, transport=self.transport)
        try:
            response = await self.client.get("http://next/", headers=headers)
            status = response.status_code
        except Exception:
            self.stats["failed"] += 1
            status = 503
        await _answer(send, status, b"tier")


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    """Serve the tier until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--next", required=True, help="discovery target of the next hop")
    args = parser.parse_args(argv)
    import uvicorn

    logging.getLogger("meshlib").setLevel(logging.ERROR)  # breakers and ejections are expected here
    app = DeadlineMiddleware(Tier(args.next))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="off", access_log=False, http="h11"
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
