"""The admin endpoint: Envoy-admin-style ``/status`` and ``/metrics`` on loopback, for ``meshlib status``.

Opt in with ``MESHLIB_ADMIN_ADDR=127.0.0.1:9901`` (loopback only: :mod:`meshlib._config.parse` refuses anything
else, as Envoy's docs say its admin must never be exposed). Every ``meshlib.Client`` / ``AsyncClient``
created with it registers with a small HTTP server running on one daemon thread (a non-blocking loop with
per-connection deadlines and bounds, so no peer can hold a thread: :mod:`meshlib._admin_http`):

* ``GET /status`` -- JSON: ``{"meshlib": version, "pid": ..., "clients": [client.mesh_status().to_dict()...],
  "inbound": [the inbound middleware's policy files (``FileSourceStatus.to_dict()``)...]}``;
* ``GET /metrics`` -- meshlib's metrics in Prometheus text format, through the OpenTelemetry Prometheus
  exporter when it is installed (``pip install 'meshlib[prometheus]'``); else 404 saying so. The registered
  clients' instruments, and the inbound middleware's ``http.server.*`` of the whole process (a process-wide
  server sink, :func:`meshlib.telemetry.metrics.add_process_server_sink`, while the server runs);
* ``GET /`` -- the list of the above.

**One server per address per process.** Clients that name the same address share one server, which lists
them all; it holds them by weak reference (a client that is collected disappears from ``/status``), starts
with the first and stops when the last one closes. Port ``0`` picks a free port (logged, and readable as
``client.admin_address``).

**A busy port is not fatal.** When another process already listens there -- typically the other workers of
a pre-forking server started with the same environment -- the client logs one WARNING and works without an
admin endpoint: a debugging aid must never take an application down. Give each process its own port (or
``:0``) to see them all.

**Per process, across fork() too.** A forked child (gunicorn ``--preload`` workers, ``multiprocessing``)
inherits the server object but not its thread: the child does not serve it, and its inherited copy of the
listening socket is closed in the child (the parent keeps serving on it). ``/status`` carries the ``pid``
of the process whose state it shows, so the master's answer is never mistaken for a worker's. A client
built in the child registers as usual (a port the parent holds is busy: use ``:0`` or a port per worker).

**Loopback is checked twice**: the bind address, and the ``Host`` header of each request (a browser page
on some web site could otherwise reach the endpoint through DNS rebinding); other hosts get 403. Nothing is
logged per request.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from meshlib.control.file import reported
from meshlib.status import status_of

if TYPE_CHECKING:  # telemetry (OpenTelemetry) and http.server are imported by the first admin server
    from meshlib._admin_http import AdminHTTPServer
    from meshlib.telemetry.client import ClientTelemetry
    from meshlib.telemetry.metrics import MeshMetrics

__all__ = ["AdminServer", "attach", "detach", "running"]

logger = logging.getLogger("meshlib.admin")

HostPort = tuple[str, int]

#: What ``/metrics`` answers when the Prometheus exporter is not installed.
METRICS_HINT = (
    "meshlib: /metrics needs the OpenTelemetry Prometheus exporter: "
    "pip install 'meshlib[prometheus]' (opentelemetry-exporter-prometheus and prometheus-client)\n"
)


def _loopback_host(header: str | None) -> bool:
    """Whether a ``Host`` header names this machine's loopback (or is absent, as from HTTP/1.0 tools)."""
    if not header:
        return True
    host = header.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AdminServer:
    """One admin HTTP server and the clients it reports (weakly held)."""

    def __init__(self, address: HostPort, **limits: Any) -> None:
        """Listen on ``address`` and serve from a daemon thread; ``limits`` override the HTTP server's timeouts
        and bounds (``head_timeout``, ``write_timeout``, ``max_head_bytes``, ``max_connections``: see
        :mod:`meshlib._admin_http`)."""
        self._lock = threading.Lock()
        self._clients: dict[int, tuple[weakref.ref[Any], str]] = {}
        self._pid = os.getpid()
        # http.server is imported here, by the first admin server, not by ``import meshlib``.
        from meshlib._admin_http import AdminHTTPServer

        self._server: AdminHTTPServer = AdminHTTPServer(address, **limits)
        self.address: HostPort = self._server.server_address
        try:
            self._prometheus = _Prometheus.create()
            self._thread = threading.Thread(
                target=self._server.serve, name=f"meshlib-admin-{self.address[1]}", daemon=True
            )
            self._server.admin = self
            self._thread.start()
        except BaseException:
            self._server.close_unstarted()
            raise
        logger.info(
            "admin endpoint listening on http://%s/ (/status, /metrics%s)",
            _format(self.address),
            "" if self._prometheus is not None else ": exporter not installed",
        )

    @property
    def serving(self) -> bool:
        """Whether this process serves it (a forked child inherits the object, not the thread that serves)."""
        return self._pid == os.getpid()

    @property
    def metrics(self) -> MeshMetrics | None:
        """The instruments ``/metrics`` exports (``None`` without the Prometheus exporter)."""
        return None if self._prometheus is None else self._prometheus.metrics

    def add(self, transport: Any, kind: str, telemetry: ClientTelemetry) -> None:
        """Report ``transport`` (a client's mesh) in ``/status`` and, through ``telemetry``, ``/metrics``."""
        with self._lock:
            self._clients[id(transport)] = (weakref.ref(transport), kind)
        if self.metrics is not None:
            telemetry.add_sink(self.metrics)

    def remove(self, transport: Any, telemetry: ClientTelemetry) -> bool:
        """Stop reporting ``transport``; ``True`` when no client is left."""
        if self.metrics is not None:
            telemetry.remove_sink(self.metrics)
        with self._lock:
            self._clients.pop(id(transport), None)
            self._prune()
            return not self._clients

    def _prune(self) -> None:
        for key in [key for key, (ref, _) in self._clients.items() if ref() is None]:
            del self._clients[key]

    def status(self) -> dict[str, Any]:
        """What ``/status`` answers."""
        from meshlib import __version__

        with self._lock:
            self._prune()
            clients = [(ref(), kind) for ref, kind in self._clients.values()]
        return {
            "meshlib": __version__,
            "pid": os.getpid(),
            "clients": [
                status_of(mesh.services, kind, mesh.routes_view(), mesh.xds, mesh.consul).to_dict()
                for mesh, kind in clients
                if mesh is not None
            ],
            "inbound": [source.to_dict() for source in reported()],
        }

    def config_dump(self) -> dict[str, Any]:
        """What ``/config_dump`` answers: every live xDS client of this process, CSDS-shaped
        (:func:`meshlib.control.xds.dump.config_dump`); ``{"config": []}`` without one (xDS unused or its extra
        not installed, in which case nothing is imported)."""
        import sys

        if "meshlib.control.xds.client" not in sys.modules:
            return {"config": []}
        from meshlib.control.xds.client import live_clients
        from meshlib.control.xds.dump import config_dump

        return {"config": [config for client in live_clients() for config in config_dump(client)["config"]]}

    def metrics_text(self) -> tuple[bytes, str] | None:
        """``/metrics`` body and content type, or ``None`` when the exporter is missing."""
        return None if self._prometheus is None else self._prometheus.render()

    @property
    def connections(self) -> int:
        """Connections the HTTP server holds right now (for tests and diagnostics)."""
        return self._server.connections

    def close(self) -> None:
        """Stop serving: the listener and every open connection are closed and the server thread ends."""
        self._server.close()
        self._thread.join(timeout=5)
        if self._prometheus is not None:
            self._prometheus.close()
        logger.info("admin endpoint on http://%s/ stopped", _format(self.address))


class _Prometheus:
    """A private meter provider whose reader is the OpenTelemetry Prometheus exporter, on its own registry."""

    def __init__(self, provider: Any, registry: Any, generate: Any, content_type: str) -> None:
        from meshlib.telemetry.metrics import MeshMetrics, ServerMetrics, _meter, add_process_server_sink

        self._provider = provider
        self._registry = registry
        self._generate = generate
        self._content_type = content_type
        self.metrics = MeshMetrics(_meter(provider))
        # The inbound middleware's metrics of this process (meshlib.server) are served here too.
        self.server_metrics = ServerMetrics(_meter(provider))
        add_process_server_sink(self.server_metrics)

    @classmethod
    def create(cls) -> _Prometheus | None:
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from opentelemetry.sdk.metrics import MeterProvider
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        except ImportError:
            return None
        registry = CollectorRegistry(auto_describe=True)
        reader = PrometheusMetricReader(disable_target_info=True, registry=registry)
        provider = MeterProvider(metric_readers=[reader])
        return cls(provider, registry, generate_latest, CONTENT_TYPE_LATEST)

    def render(self) -> tuple[bytes, str]:
        body: bytes = self._generate(self._registry)
        return body, self._content_type

    def close(self) -> None:
        from meshlib.telemetry.metrics import remove_process_server_sink

        remove_process_server_sink(self.server_metrics)
        self._provider.shutdown()


def _format(address: HostPort) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LOCK = threading.Lock()
#: Running servers by the address they were asked for (port 0 included), so clients that ask alike share.
_SERVERS: dict[HostPort, AdminServer] = {}


def attach(transport: Any, telemetry: ClientTelemetry, address: HostPort, kind: str) -> AdminServer | None:
    """Register a client's mesh with the admin server at ``address``, starting it if needed.

    Returns ``None`` (after one WARNING) when the port is taken by someone else: the client works on.
    """
    with _LOCK:
        server = _SERVERS.get(address)
        if server is None:
            try:
                server = AdminServer(address)
            except OSError as error:
                logger.warning(
                    "admin endpoint not started: cannot listen on %s (%s); another process probably serves it. "
                    "This client works without one; give each process its own MESHLIB_ADMIN_ADDR port (or :0)",
                    _format(address),
                    error.strerror or error,
                )
                return None
            _SERVERS[address] = server
        server.add(transport, kind, telemetry)
        return server


def detach(server: AdminServer, transport: Any, telemetry: ClientTelemetry) -> None:
    """Unregister a closing client; the last one to leave stops the server."""
    if not server.serving:  # inherited across fork(): the parent's to stop (shutdown() here would wait forever)
        return
    with _LOCK:
        if not server.remove(transport, telemetry):
            return
        for key, running_server in list(_SERVERS.items()):
            if running_server is server:
                del _SERVERS[key]
        server.close()  # under the lock: a client attaching next finds the port free again


def _after_fork_in_child() -> None:
    """In a forked child: forget the parent's servers and close the child's copies of their listening sockets."""
    global _LOCK  # noqa: PLW0603 (replaced, not reset: a lock held by a thread the child lacks stays held)
    _LOCK = threading.Lock()  # another thread of the parent may have held it at the fork
    for server in _SERVERS.values():
        server._server.forget_in_child()  # the child's copies of its sockets; the parent keeps serving on them
    _SERVERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def running() -> dict[HostPort, AdminServer]:
    """The admin servers of this process, by requested address (for tests and diagnostics)."""
    with _LOCK:
        return dict(_SERVERS)
