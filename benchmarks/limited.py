"""The rate-limited server of Z2: ``python -m benchmarks.limited --port P --limits FILE``.

uvicorn with meshlib's protocol class (:mod:`meshlib.server.uvicorn`: httptools when installed, else h11; it turns
Nagle's algorithm off, without which uvicorn's separate head and body writes wait for delayed ACKs) serving a
one-route ASGI app that answers ``200 ok``,
wrapped in ``ASGIInboundMiddleware(app, hooks=[PeerIdentityHook(resolve=...), RateLimitHook(limits)])``. The
caller's SPIFFE ID is read from the ``x-caller`` header (the resolver stands in for mTLS, which would make the
benchmark measure TLS instead of the limiter); the limits come from a Linkerd ``HTTPLocalRateLimitPolicy``
document read with :func:`~meshlib.security.ratelimit.parse_rate_limits`. One process, one event loop: its core
is what bounds how many requests a flood can make it handle.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from meshlib.security.ratelimit import parse_rate_limits
from meshlib.server.middleware import ASGIInboundMiddleware, InboundRequest, PeerIdentityHook
from meshlib.server.ratelimit import RateLimitHook

CALLER_HEADER = "x-caller"
_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
_BODY = {"type": "http.response.body", "body": b"ok"}


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    """Answer ``200 ok`` at once (lifespan events are acknowledged by uvicorn with lifespan off)."""
    if scope["type"] == "http":
        await send(_START)
        await send(_BODY)


def caller(request: InboundRequest) -> str | None:
    """The caller's SPIFFE ID, from the ``x-caller`` header."""
    return request.header(CALLER_HEADER)


def build(limits_file: str) -> ASGIInboundMiddleware:
    """The app wrapped in the peer identity and rate limit hooks, limits read from ``limits_file``."""
    limits = parse_rate_limits(Path(limits_file).read_bytes(), source=limits_file)
    return ASGIInboundMiddleware(app, hooks=[PeerIdentityHook(resolve=caller), RateLimitHook(limits)])


def main(argv: list[str] | None = None) -> None:
    """Serve until terminated."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.limited", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--limits", required=True, help="an HTTPLocalRateLimitPolicy YAML file")
    args = parser.parse_args(argv)
    import uvicorn

    from meshlib.server import uvicorn as protocols

    logging.getLogger("meshlib").setLevel(logging.ERROR)
    http = getattr(protocols, "HttpToolsProtocol", protocols.H11Protocol)
    config = uvicorn.Config(
        build(args.limits),
        host="127.0.0.1",
        port=args.port,
        http=http,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
