"""The admin endpoint's HTTP server and request handler (:mod:`meshlib.admin`).

Kept apart so that :mod:`http.server` is imported by the first admin server a process starts
(``MESHLIB_ADMIN_ADDR``), not by ``import meshlib``.
"""

from __future__ import annotations

import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from meshlib.admin import METRICS_HINT, HostPort, _loopback_host, logger

if TYPE_CHECKING:
    from meshlib.admin import AdminServer

__all__ = ["AdminHTTPServer"]


class AdminHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server on ``address`` (IPv4 or IPv6) answering for its :class:`AdminServer`."""

    daemon_threads = True
    admin: AdminServer

    def __init__(self, address: HostPort) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: AdminHTTPServer
    server_version = "meshlib-admin"

    def do_GET(self) -> None:
        if not _loopback_host(self.headers.get("Host")):
            self._answer(403, b"meshlib admin answers requests for loopback hosts only\n", "text/plain")
            return
        path = self.path.split("?", 1)[0]
        admin = self.server.admin
        if path == "/status":
            body = json.dumps(admin.status(), indent=2).encode() + b"\n"
            self._answer(200, body, "application/json")
        elif path == "/metrics":
            text = admin.metrics_text()
            if text is None:
                self._answer(404, METRICS_HINT.encode(), "text/plain")
            else:
                self._answer(200, text[0], text[1])
        elif path == "/":
            self._answer(
                200, b"meshlib admin\n  /status   JSON snapshot of every client\n  /metrics  Prometheus\n", "text/plain"
            )
        else:
            self._answer(404, b"not found: try /status or /metrics\n", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # never a log line per request
        logger.debug("admin %s " + format, self.address_string(), *args)
