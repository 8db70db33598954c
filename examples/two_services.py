"""Two services calling each other through meshlib by logical name, on loopback, with the standard library only.

    .venv/bin/python examples/two_services.py

starts two instances of a ``users`` service and one ``frontend`` service in this process (each a
``http.server.ThreadingHTTPServer`` on a free loopback port). The frontend's handler calls
``http://users/users/<id>`` through a ``meshlib.httpx.Client``; the caller reaches the frontend as
``http://frontend/profile/<id>``, also through meshlib. Nobody but the two clients' configuration knows a port.
A few requests are made, the script prints which ``users`` instance answered each, and exits.

The same code also runs each service as its own process, configured from ``MESHLIB_*`` environment variables
the way a deployment would be (see ``examples/env_config.sh``)::

    two_services.py users --name users-1 --port 18081
    MESHLIB_SERVICE_USERS=static://127.0.0.1:18081,127.0.0.1:18082 two_services.py frontend --port 18080
    MESHLIB_SERVICE_FRONTEND=static://127.0.0.1:18080 two_services.py call --requests 6
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

import meshlib

#: A tiny application: request path -> (status, JSON body).
App = Callable[[str], tuple[int, dict[str, Any]]]

USER_NAMES = ("ada", "grace", "barbara", "frances", "radia")


def users_app(instance: str) -> App:
    """The ``users`` service: ``GET /users/<id>`` answers the user, and which instance served it."""

    def handle(path: str) -> tuple[int, dict[str, Any]]:
        if path == "/healthz":
            return 200, {"ok": True}
        if not path.startswith("/users/") or not path[len("/users/") :].isdigit():
            return 404, {"error": f"no route for {path}"}
        user_id = int(path[len("/users/") :])
        return 200, {"id": user_id, "name": USER_NAMES[user_id % len(USER_NAMES)], "instance": instance}

    return handle


def frontend_app(users: httpx.Client) -> App:
    """The ``frontend`` service: ``GET /profile/<id>`` asks ``users`` by logical name through meshlib."""

    def handle(path: str) -> tuple[int, dict[str, Any]]:
        if path == "/healthz":
            return 200, {"ok": True}
        if not path.startswith("/profile/"):
            return 404, {"error": f"no route for {path}"}
        try:
            response = users.get(f"http://users/users/{path[len('/profile/') :]}")
        except httpx.HTTPError as exc:
            return 502, {"error": f"users unavailable: {exc}"}
        user = response.json()
        # The mesh says which endpoint answered; the users service says so too, in its body.
        return response.status_code, {"user": user, "users_endpoint": response.extensions.get("meshlib.endpoint")}

    return handle


def handler_for(app: App) -> type[BaseHTTPRequestHandler]:
    """An ``http.server`` request handler class that serves ``app`` as JSON over keep-alive HTTP/1.1."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            status, body = app(self.path)
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the example prints its own summary."""

    return Handler


@contextmanager
def serving(app: App, port: int = 0) -> Iterator[int]:
    """Serve ``app`` on ``127.0.0.1:port`` (0: any free port) in a background thread; yield the port."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler_for(app))
    thread = threading.Thread(target=server.serve_forever, name=f"http-{server.server_port}", daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def call_frontend(caller: httpx.Client, requests: int) -> list[str]:
    """Ask ``http://frontend/profile/<i>`` a few times; print and return which users instance answered each."""
    answered = []
    for user_id in range(1, requests + 1):
        response = caller.get(f"http://frontend/profile/{user_id}")
        response.raise_for_status()
        body = response.json()
        instance = body["user"]["instance"]
        answered.append(instance)
        print(
            f"GET http://frontend/profile/{user_id} -> {body['user']['name']!r}, served by {instance} "
            f"({body['users_endpoint']}) via frontend at {response.extensions['meshlib.endpoint']}"
        )
    return answered


def run_all(requests: int = 6) -> list[str]:
    """Start users x2 and frontend in-process, call the frontend ``requests`` times, stop everything."""
    with serving(users_app("users-1")) as port_1, serving(users_app("users-2")) as port_2:
        # round_robin so a handful of requests visibly alternates; leave it out to get p2c_ewma, the default.
        users = meshlib.httpx.Client(
            services={"users": f"static://127.0.0.1:{port_1},127.0.0.1:{port_2}"}, lb="round_robin"
        )
        with users, serving(frontend_app(users)) as frontend_port:
            caller = meshlib.httpx.Client(services={"frontend": f"static://127.0.0.1:{frontend_port}"})
            with caller:
                answered = call_frontend(caller, requests)
    print(f"users instances that answered: {', '.join(sorted(set(answered)))}")
    return answered


def serve_forever(app: App, port: int) -> int:
    """Run one service in the foreground until interrupted (the one-service-per-process mode)."""
    with serving(app, port) as bound:
        print(f"listening on 127.0.0.1:{bound}", flush=True)
        with suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


def wait_until_up(caller: httpx.Client, url: str, timeout: float = 10.0) -> None:
    """Poll ``url`` until it answers, for scripts that start the services a moment before calling them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            caller.get(url).raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    """All in one process by default; ``users`` / ``frontend`` / ``call`` run one role, configured from env."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    roles = parser.add_subparsers(dest="role")
    users = roles.add_parser("users", help="serve one users instance")
    users.add_argument("--name", default="users-1")
    users.add_argument("--port", type=int, default=18081)
    frontend = roles.add_parser("frontend", help="serve the frontend; MESHLIB_SERVICE_USERS says where users is")
    frontend.add_argument("--port", type=int, default=18080)
    call = roles.add_parser("call", help="call the frontend; MESHLIB_SERVICE_FRONTEND says where it is")
    call.add_argument("--requests", type=int, default=6)
    parser.add_argument("--requests", type=int, default=6, help="requests in the all-in-one run")
    args = parser.parse_args(argv)

    if args.role == "users":
        return serve_forever(users_app(args.name), args.port)
    if args.role == "frontend":
        with meshlib.httpx.Client() as users_client:  # MESHLIB_SERVICE_USERS, MESHLIB_LB, ... from the environment
            return serve_forever(frontend_app(users_client), args.port)
    if args.role == "call":
        with meshlib.httpx.Client() as caller:  # MESHLIB_SERVICE_FRONTEND from the environment
            wait_until_up(caller, "http://frontend/healthz")
            call_frontend(caller, args.requests)
        return 0
    run_all(args.requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
