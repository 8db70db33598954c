"""xDS steering a client: the Listener -> RouteConfiguration -> Cluster -> ClusterLoadAssignment chain applied to
the mesh (gRFC A27/A28, for plain HTTP).

A service whose target is ``xds:///<name>`` (``MESHLIB_SERVICE_PAYMENTS=xds:///payments``) is reached through the
routes its control plane sends. One :class:`XdsSource` per client does the work, on one thread of its own:

* it watches the Listener :meth:`Bootstrap.listener_for` names for each such service, and the RouteConfiguration the
  Listener names (or takes the inline one); the virtual host is chosen by the target's name, as gRPC's data-plane
  authority; the result is a route table attached to the called host (``payments``);
* every cluster those routes name is watched on CDS and becomes a meshlib service ``xds-cluster:<name>`` with the
  cluster's balancer, in-flight limit (A32), outlier detection (A50) and upstream TLS (A29); its endpoints come from
  EDS (:class:`~meshlib.control.xds.eds_resolver.EdsResolver`), from DNS for a LOGICAL_DNS cluster (A37), or from
  each child in priority order for an aggregate cluster (A37);
* **nothing half-applies**: a table is installed (one swap, with the services it needs) only when every cluster it
  names has been answered (accepted, or known not to exist); until then the previous table keeps serving. A
  resource that is NACKed keeps its last accepted version (the ADS client's rule), so a bad push changes nothing;
  a cluster NACKed before any version of it was accepted counts as not answered (the table waits for a valid one);
* clusters no longer named are removed after the table without them is installed (calls in flight finish).

Before the first table, a call to an xDS service waits for it (bounded by the call's deadline), as a first
discovery answer is waited for. A Listener or RouteConfiguration the control plane says does not exist, or a
RouteConfiguration with no virtual host for the name, makes calls fail at once with that reason
(:class:`~meshlib.DiscoveryError`, what gRPC reports as UNAVAILABLE); a route table installed earlier keeps
serving until then.

Routes from ``MESHLIB_ROUTES_FILE`` and from xDS combine: xDS routes the hosts it is configured for, the file the
others (a file route for an xDS host is ignored, with a warning).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from meshlib._config.model import ServiceConfig, service_key
from meshlib.control.dynamic import Latch, Placeholder, merge_tables, take_batch
from meshlib.discovery import Target, build_resolver, scheme_of
from meshlib.discovery.base import DiscoverySettings
from meshlib.errors import ConfigError
from meshlib.routing.model import RouteTable
from meshlib.status import XdsResourceStatus, XdsServerStatus, XdsServiceStatus, XdsStatus

if TYPE_CHECKING:
    from meshlib._config.model import MeshConfig
    from meshlib.control.xds.bootstrap import Bootstrap, ListenerTarget
    from meshlib.control.xds.client import AdsClient, ResourceState
    from meshlib.control.xds.resources.cds import ClusterUpdate
    from meshlib.discovery.base import Resolver
    from meshlib.security.tls import TLSSettings

__all__ = ["FORM", "XdsSource", "XdsTarget", "from_target"]

logger = logging.getLogger("meshlib.control.xds")

FORM: Final = "xds:///listener-name or xds://authority/listener-name"
#: How deep aggregate clusters may nest (gRPC's limit, A37).
MAX_AGGREGATE_DEPTH: Final = 16
#: How long a cluster the routes stop naming keeps its watches and its service (seconds), and how many may
#: linger at once: a split flipped back (a canary rolled back, a 100/0 <-> 0/100 switch) then moves traffic with
#: no CDS and EDS round trip and no cold resolver. gRPC unsubscribes at once.
CLUSTER_LINGER: Final = 60.0
MAX_LINGERING: Final = 64


# -- the placeholder resolver of an xds:/// service ---------------------------------------------------------------


class XdsTarget(Placeholder):
    """The resolver of a service named ``xds:///<name>``: a placeholder, as such a service is reached through the
    routes xDS sends (to ``xds-cluster:*`` services), never through endpoints of its own (see
    :class:`~meshlib.control.dynamic.Placeholder`)."""

    def __init__(self, service: str, target: str) -> None:
        super().__init__(service, target, f"xDS {target}", "no route configuration from the xDS control plane yet")


def from_target(target: Target, settings: DiscoverySettings) -> XdsTarget:
    """The ``xds`` discovery scheme's factory: check the target's form (the bootstrap is checked by the client)."""
    rest = target.rest
    authority, slash, name = rest.partition("/")
    if not slash or not name or "?" in rest or "#" in rest:
        raise target.invalid("an xDS target naming a listener")
    del authority, settings
    return XdsTarget(target.service, target.uri)


# -- the source ---------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Host:
    """One ``xds:///`` service: its Listener, the RouteConfiguration that Listener names, and what came of them."""

    key: str
    name: str
    target: str
    authority: str
    listener: ListenerTarget
    client: AdsClient
    #: The configured service's placeholder resolver (``None``: a host found by ``MESHLIB_XDS=all``).
    placeholder: XdsTarget | None
    #: Set once the host is routed, or known not to be routable (calls wait on it until then).
    latch: Latch = dataclasses.field(default_factory=Latch)
    #: A host found by ``MESHLIB_XDS=all`` whose Listener is ``host:port``: its routes apply to that port only.
    port: int | None = None
    lds: ResourceState | None = None
    route_name: str | None = None
    rds: ResourceState | None = None
    cancel_rds: Callable[[], None] | None = None
    #: The routes last installed for this host: kept while a new RouteConfiguration is due or was rejected.
    last: RouteTable | None = None
    error: str | None = None
    version: str = ""
    #: The ring-hash header of each cluster its routes name (``rds.hash_headers``), from the last table.
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(eq=False)
class _Cluster:
    """One watched cluster: its CDS state, and what its live service (if any) was built from."""

    name: str
    client: AdsClient
    cancel: Callable[[], None]
    state: ResourceState | None = None
    #: (the ClusterUpdate, hash header) the installed service was built from (``None``: no service).
    installed: tuple[Any, ...] | None = None
    #: When the routes stopped naming it (``time.monotonic()``; ``None``: named): it lingers a while.
    unneeded_since: float | None = None


#: The short names ``mesh_status().xds`` and ``meshlib status`` give the four types.
TYPE_NAMES: Final = {
    "type.googleapis.com/envoy.config.listener.v3.Listener": "LDS",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "RDS",
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "CDS",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "EDS",
}


class XdsSource:
    """The xDS control plane of one client (see the module docstring).

    ``mesh`` is the client's mesh transport (held weakly: a client dropped unclosed is collected, and its
    finalizer closes this source). ``register_tls(service_key, settings)`` makes the TLS context a cluster's
    endpoints connect with (the client's pool factory); ``None``: clusters with TLS are refused.
    """

    def __init__(
        self,
        mesh: Any,
        config: MeshConfig,
        bootstrap: Bootstrap,
        *,
        register_tls: Callable[[str, TLSSettings], None] | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._mesh = weakref.ref(mesh)
        self._config = config
        self._bootstrap = bootstrap
        self._register_tls = register_tls
        self._client_options = dict(client_options or {})
        self._settings = DiscoverySettings(
            dns_servers=config.dns_servers, dns_timeout=config.dns_timeout, environ=config.environ
        )
        self._providers = {name: provider.files for name, provider in bootstrap.certificate_providers.items()}
        self._clients: dict[str, AdsClient] = {}
        self._hosts: dict[str, _Host] = {}
        self._clusters: dict[str, _Cluster] = {}
        self._events: queue.SimpleQueue[tuple[str, Any, Any] | None] = queue.SimpleQueue()
        self._status_lock = threading.Lock()
        self._applied = 0
        self._waiting: list[str] = []
        self._closed = False
        self._pid = os.getpid()
        for key, svc in config.services.items():
            if scheme_of(svc.target) != "xds":
                continue
            listener = bootstrap.listener_for(svc.target)
            path = svc.target.partition("://")[2].partition("/")[2]
            placeholder = mesh.services[key].resolver
            assert isinstance(placeholder, XdsTarget)
            self._hosts[key] = _Host(
                key,
                svc.name,
                svc.target,
                path,
                listener,
                self._client_for(listener.servers),
                placeholder,
                placeholder.pending,
            )
        #: ``MESHLIB_XDS=all``: every Listener of the control plane (a wildcard LDS subscription) is a host.
        self._all = config.xds == "all"
        self._wildcard_client = self._client_for(bootstrap.servers) if self._all else None
        #: Set when the first wildcard LDS answer is in (``all`` mode): until then calls to unknown hosts wait.
        self._first_listeners = Latch(f"xDS wildcard LDS ({bootstrap.servers[0].server_uri})")
        #: service key -> the latch of a host found by ``all`` whose routes are still due (replaced whole).
        self._due: Mapping[str, Latch] = {}
        self._thread: threading.Thread | None = None
        self._finalizer = weakref.finalize(mesh, XdsSource._stop_all, self._events, list(self._clients.values()))
        self._finalizer.atexit = False

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to every service's Listener and start applying what comes."""
        self._thread = threading.Thread(target=self._run, name="meshlib-xds-apply", daemon=True)
        self._thread.start()
        for host in self._hosts.values():
            self._watch_listener(host)
        if self._wildcard_client is not None:
            from meshlib.control.xds.client import LISTENER

            events = self._events
            self._wildcard_client.watch_all(LISTENER, lambda states: events.put(("lds*", None, states)))

    def pending_for(self, host: str) -> Latch | None:
        """``MESHLIB_XDS=all``: the latch a call to ``host`` (not otherwise in the mesh) waits on, or ``None``: it is
        decided (routed by xDS, or outside the mesh). Lock-free: called by the router on a lookup miss."""
        if not self._all:
            return None
        if not self._first_listeners.is_set():
            return self._first_listeners
        latch = self._due.get(service_key(host))
        return latch if latch is not None and not latch.is_set() else None

    def close(self) -> None:
        """End every ADS stream and the apply thread (the installed routes stay as they are)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        if self._pid != os.getpid():
            return  # a forked child that never resumed: the clients are the parent's
        XdsSource._stop_all(self._events, list(self._clients.values()))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    @staticmethod
    def _stop_all(events: queue.SimpleQueue[Any], clients: list[AdsClient]) -> None:
        events.put(None)
        for client in clients:
            client.close()

    def after_fork(self, mesh: Any) -> None:
        """In a forked child (only this thread runs): the mesh was rebuilt from configuration, so the streams are
        opened again in this process (the accepted resources are kept) and the current state is applied anew."""
        self._mesh = weakref.ref(mesh)
        self._pid = os.getpid()
        self._events = queue.SimpleQueue()
        self._status_lock = threading.Lock()
        self._finalizer = weakref.finalize(mesh, XdsSource._stop_all, self._events, list(self._clients.values()))
        self._finalizer.atexit = False
        if self._closed:
            return
        for host in self._hosts.values():
            if host.placeholder is not None:
                placeholder = mesh.services[host.key].resolver
                assert isinstance(placeholder, XdsTarget)
                host.placeholder = placeholder
                host.latch = placeholder.pending
        for cluster in self._clusters.values():
            cluster.installed = None  # the child's router has none of the parent's cluster services
        for client in self._clients.values():
            client.resume()
        self._thread = None
        self._thread = threading.Thread(target=self._run, name="meshlib-xds-apply", daemon=True)
        self._thread.start()
        self._events.put(("apply", None, None))
        for client in self._clients.values():
            client.start()

    # -- status -----------------------------------------------------------------------------------------------------

    @property
    def clients(self) -> list[AdsClient]:
        """The ADS clients (one per management server in use)."""
        return list(self._clients.values())

    def status(self) -> XdsStatus:
        """What ``mesh_status().xds`` shows: each control plane's stream with every resource subscribed on it
        (from :meth:`AdsClient.resources`), each service's routing, the updates applied and the clusters awaited."""
        servers = []
        for client in self._clients.values():
            connection = client.connection()
            resources = [
                XdsResourceStatus(
                    TYPE_NAMES.get(state.type_url, state.type_url.rpartition(".")[2]),
                    state.type_url,
                    state.name,
                    state.version,
                    state.status,
                    state.error,
                    state.updated_at,
                )
                for state in client.resources()
            ]
            servers.append(
                XdsServerStatus(
                    connection.server,
                    connection.connected,
                    connection.since,
                    connection.last_error,
                    connection.streams,
                    resources,
                )
            )
        with self._status_lock:
            hosts = [
                XdsServiceStatus(
                    host.name,
                    host.target,
                    host.listener.resource_name,
                    host.route_name,
                    host.error is None and host.latch.is_set(),
                    host.error,
                )
                for host in list(self._hosts.values())  # one C-level copy: the apply thread may add hosts
            ]
            return XdsStatus(servers, hosts, self._applied, list(self._waiting))

    # -- watches (any thread) ---------------------------------------------------------------------------------------

    def _client_for(self, servers: Iterable[Any]) -> AdsClient:
        from meshlib.control.xds import client as ads
        from meshlib.control.xds.bootstrap import channel_for
        from meshlib.control.xds.client import CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, ROUTE_CONFIGURATION
        from meshlib.control.xds.client import AdsClient as Ads
        from meshlib.control.xds.types import cluster_type, endpoints_type, listener_type, route_type

        server = next(iter(servers))
        client = self._clients.get(server.server_uri)
        if client is None:
            types: dict[str, Any] = {
                LISTENER: listener_type(),
                ROUTE_CONFIGURATION: route_type(),
                CLUSTER: cluster_type(self._providers),
                CLUSTER_LOAD_ASSIGNMENT: endpoints_type(),
            }
            client = Ads(
                server.server_uri,
                lambda: channel_for(server),
                node_proto(self._bootstrap),
                types,
                ignore_resource_deletion=server.ignore_resource_deletion,
                does_not_exist_timeout=ads.DOES_NOT_EXIST_TIMEOUT,  # read now: tests shorten it
                backoff=ads.BACKOFF,  # likewise
                **self._client_options,
            )
            self._clients[server.server_uri] = client
        return client

    def _post(self, kind: str, name: Any) -> Callable[[ResourceState], None]:
        events = self._events

        def watcher(state: ResourceState) -> None:
            events.put((kind, name, state))

        return watcher

    def _watch_listener(self, host: _Host) -> None:
        from meshlib.control.xds.client import LISTENER

        host.client.watch(LISTENER, host.listener.resource_name, self._post("lds", host.key))

    # -- the apply thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        events = self._events
        while True:
            lingering = any(cluster.unneeded_since is not None for cluster in self._clusters.values())
            try:
                item = events.get(timeout=CLUSTER_LINGER / 2 if lingering else None)
            except queue.Empty:  # time to retire clusters that lingered long enough
                item = ("linger", None, None)
            if item is None:
                return
            batch = take_batch(events, item)  # a burst of pushes is applied together: one swap
            if batch is None:
                return
            try:
                for kind, name, state in batch:
                    self._record(kind, name, state)
                self._apply()
            except Exception:
                logger.exception("applying an xDS update failed; the previous configuration keeps serving")

    def _record(self, kind: str, name: Any, state: Any) -> None:
        from meshlib.control.xds.client import ROUTE_CONFIGURATION

        if kind == "linger":
            return
        if kind == "lds*":
            self._listeners(state)
            return
        if kind == "lds":
            host = self._hosts[name]
            host.lds = state
            listener: Any = state.value
            wanted = (
                None if listener is None or listener.inline_route_config is not None else listener.route_config_name
            )
            if wanted != host.route_name:
                if host.cancel_rds is not None:
                    host.cancel_rds()
                host.route_name, host.rds, host.cancel_rds = wanted, None, None
                if wanted is not None:
                    host.cancel_rds = host.client.watch(ROUTE_CONFIGURATION, wanted, self._post("rds", (name, wanted)))
        elif kind == "rds":
            key, route_name = name
            found = self._hosts.get(key)
            if found is not None and found.route_name == route_name:
                found.rds = state
        elif kind == "cds":
            cluster = self._clusters.get(name)
            if cluster is not None:
                cluster.state = state

    def _host_routes(self, host: _Host) -> tuple[RouteTable | None, str | None]:
        """:meth:`_host_table`, except that while an answer is due, or when the newest one was rejected, the routes
        installed before keep serving (gRPC keeps a Listener's old route configuration until the new one comes)."""
        table, error, deleted = self._host_table(host)
        if table is None and not deleted and host.last is not None:
            return host.last, None
        return table, error

    def _host_table(self, host: _Host) -> tuple[RouteTable | None, str | None, bool]:
        """The routes of one service from its Listener and RouteConfiguration: (table, None, False); (None, why
        it cannot be routed, deleted: the control plane said a resource does not exist); or (None, None, False)
        while an answer is still due."""
        from meshlib.control.xds.resources.rds import NoVirtualHostError, hash_headers, to_route_table

        lds = host.lds
        if lds is None:
            return None, None, False
        if lds.value is None:
            if lds.status == "DOES_NOT_EXIST":
                return None, f"the xDS control plane has no Listener {host.listener.resource_name!r}", True
            return None, f"the Listener {host.listener.resource_name!r} was rejected: {lds.error}", False
        listener: Any = lds.value
        config = listener.inline_route_config
        version = f"lds:{lds.version}"
        if config is None:
            rds = host.rds
            if rds is None:
                return None, None, False
            if rds.value is None:
                if rds.status == "DOES_NOT_EXIST":
                    return None, f"the xDS control plane has no RouteConfiguration {host.route_name!r}", True
                return None, f"the RouteConfiguration {host.route_name!r} was rejected: {rds.error}", False
            config = rds.value
            version += f",rds:{rds.version}"
        try:
            table = to_route_table(
                config,
                listener_name=listener.name,
                http_filters=listener.http_filters,
                max_stream_duration_s=listener.max_stream_duration_s,
                authority=host.authority,
                version=version,
            )
        except NoVirtualHostError as error:
            return None, str(error), True
        host.hashes = hash_headers(config, host.authority)
        routes = table.services.get(service_key(host.authority))
        if routes is None:
            return None, None, False
        if host.port is not None:
            routes = {host.port: routes[None]}
        return RouteTable({host.key: routes}, table.source, version, table.routes), None, False

    def _apply(self) -> None:
        """Recompute the table from every service's state and install it with its clusters, or wait."""
        from meshlib.control.xds.client import CLUSTER
        from meshlib.control.xds.resources.rds import CLUSTER_PREFIX

        mesh = self._mesh()
        if mesh is None or self._closed:
            return
        parts: dict[str, RouteTable] = {}
        for name, host in self._hosts.items():
            table, error = self._host_routes(host)
            host.error = error
            if table is None and error is not None and host.placeholder is None:
                table = _unroutable(host, error)  # a host the control plane claims: fail, never pass through
            if table is not None:
                parts[name] = table
        named: set[str] = set()
        for table in parts.values():
            for routes in table.services.values():
                for host_routes in routes.values():
                    for _, rule in host_routes.entries:
                        for backend in rule.backends:
                            if backend.service is not None and backend.service.startswith(CLUSTER_PREFIX):
                                named.add(backend.service[len(CLUSTER_PREFIX) :])
        # Every cluster named, and the children of aggregate ones, watched; an answer due holds the table back.
        needed = self._closure(named)
        for name in needed:
            if name not in self._clusters:
                client = next(iter(self._clients.values()))
                cluster = _Cluster(name, client, lambda: None)
                self._clusters[name] = cluster
                cluster.cancel = client.watch(CLUSTER, name, self._post("cds", name))
        waiting = sorted(name for name in needed if _due(self._clusters[name].state))
        with self._status_lock:
            self._waiting = waiting
        for host in self._hosts.values():  # a service that cannot be routed fails its calls now, with the reason
            if host.error is not None and host.placeholder is not None:
                self._routed(host, host.error)
        if waiting:
            logger.debug("xDS: holding the new routes until CDS answers for %s", ", ".join(waiting))
            return
        hashes: dict[str, str] = {}
        for name, host in self._hosts.items():
            if name in parts:
                for cluster_name, header in host.hashes.items():
                    hashes.setdefault(cluster_name, header)
        added: dict[str, tuple[ServiceConfig, Resolver]] = {}
        replaced: dict[str, tuple[ServiceConfig, Resolver]] = {}
        dropped: list[str] = []  # services of clusters now known not to exist, or no longer named
        for name in sorted(named):
            cluster = self._clusters[name]
            update: Any = None if cluster.state is None else cluster.state.value
            key = service_key(CLUSTER_PREFIX + name)
            if update is None:  # known not to exist: its share of the routes answers 500 (an invalid backend)
                if cluster.installed is not None:
                    dropped.append(key)
                    cluster.installed = None
                continue
            leaves = tuple(self._leaves(name)) if update.kind == "AGGREGATE" else ()
            wanted = (update, hashes.get(name), leaves)
            if wanted == cluster.installed:
                continue
            built = self._service_for(name, update, hashes.get(name))
            if built is None:
                if cluster.installed is not None:
                    dropped.append(key)
                    cluster.installed = None
                continue
            (replaced if cluster.installed is not None else added)[key] = built
            cluster.installed = wanted
        mesh.apply_control_plane(merge_tables(parts.values(), "xds"), added, replaced)
        now = time.monotonic()
        for name in needed:
            self._clusters[name].unneeded_since = None
        unneeded = sorted(
            (name for name in self._clusters if name not in needed),
            key=lambda name: self._clusters[name].unneeded_since or now,
            reverse=True,
        )
        for index, name in enumerate(unneeded):
            cluster = self._clusters[name]
            if cluster.unneeded_since is None:
                cluster.unneeded_since = now
            alive = cluster.state is not None and cluster.state.value is not None and cluster.installed is not None
            if alive and index < MAX_LINGERING and now - cluster.unneeded_since < CLUSTER_LINGER:
                continue  # lingers: kept watched, its service ready, routed to by nothing
            del self._clusters[name]
            cluster.cancel()
            if cluster.installed is not None:
                dropped.append(service_key(CLUSTER_PREFIX + name))
        if dropped:
            mesh.remove_services(dropped)
        with self._status_lock:
            self._applied += 1
        for name, host in self._hosts.items():
            host.last = parts.get(name) if host.error is None else None
            if name in parts:
                self._routed(host, host.error)
        logger.debug("xDS: installed routes for %s (%d clusters)", ", ".join(sorted(parts)) or "no service", len(named))

    def _routed(self, host: _Host, why: str | None) -> None:
        placeholder = host.placeholder
        with self._status_lock:
            if why is not None and (placeholder is None or placeholder.why != why):
                logger.warning("xDS service %s (%s) cannot be routed: %s", host.name, host.target, why)
            if placeholder is not None:
                placeholder.why = why
        host.latch.set()

    def _listeners(self, states: Mapping[str, ResourceState]) -> None:
        """A wildcard LDS answer (``MESHLIB_XDS=all``): a host for each Listener named ``host`` or ``host:port``,
        hosts whose Listener went away dropped; calls to a new host wait for its routes."""
        from meshlib.control.xds.bootstrap import ListenerTarget

        client = self._wildcard_client
        assert client is not None
        configured = {host.listener.resource_name for host in self._hosts.values() if host.placeholder is not None}
        current = {name for name, host in self._hosts.items() if host.placeholder is None}
        wanted: dict[str, ResourceState] = {}
        for name, state in states.items():
            if name in configured or (state.value is None and state.status != "NACKED"):
                continue
            if _listener_host(name) is None:
                continue  # not a name a request host can have (an xdstp: name, a server listener...)
            wanted[name] = state
        for name in current - wanted.keys():
            host = self._hosts.pop(name)
            if host.cancel_rds is not None:
                host.cancel_rds()
            host.latch.set()
        for name, state in wanted.items():
            if name not in self._hosts:
                found = _listener_host(name)
                assert found is not None
                called, port = found
                target = ListenerTarget(name, tuple(self._bootstrap.servers))
                self._hosts[name] = _Host(
                    service_key(called), called, f"xds:///{name}", name, target, client, None, port=port
                )
            self._record("lds", name, state)
        mesh = self._mesh()
        self._due = {host.key: host.latch for host in self._hosts.values() if not host.latch.is_set()}
        if mesh is not None:
            mesh.refresh_routes()  # lookups cached before (an outside host that now has a Listener) start over
        self._first_listeners.set()

    def _closure(self, named: set[str]) -> set[str]:
        """``named`` and, for each aggregate cluster already answered, its children (depth-bounded)."""
        needed = set(named)
        frontier = list(named)
        for _ in range(MAX_AGGREGATE_DEPTH):
            following: list[str] = []
            for name in frontier:
                cluster = self._clusters.get(name)
                update: Any = None if cluster is None or cluster.state is None else cluster.state.value
                if update is not None and update.kind == "AGGREGATE":
                    for child in update.aggregate_clusters:
                        if child not in needed:
                            needed.add(child)
                            following.append(child)
            if not following:
                break
            frontier = following
        return needed

    def _service_for(
        self, name: str, update: ClusterUpdate, hash_header: str | None
    ) -> tuple[ServiceConfig, Resolver] | None:
        """The meshlib service of one cluster: its settings and its resolver (``None``: it cannot be used)."""
        from meshlib.control.xds.eds_resolver import EdsResolver
        from meshlib.control.xds.resources.rds import CLUSTER_PREFIX

        service = CLUSTER_PREFIX + name
        key = service_key(service)
        tls = None
        if update.tls is not None:
            try:
                tls = update.tls.tls_settings(self._providers)
            except Exception as error:  # never connect without the TLS the control plane asked for
                logger.error("xDS cluster %s: its upstream TLS cannot be set up (%s); not routing to it", name, error)
                return None
            if self._register_tls is None:
                logger.error("xDS cluster %s asks for upstream TLS, which this client cannot set up", name)
                return None
            self._register_tls(key, tls)
        client = self._clusters[name].client
        resolver: Resolver
        if update.kind == "EDS":
            resolver = EdsResolver(client, service, update.eds_service_name or name)
        elif update.kind == "LOGICAL_DNS":
            resolver = build_resolver(
                service, f"dns://{update.dns_host}:{update.dns_port}", self._settings, variable=f"xDS cluster {name}"
            )
        else:
            from meshlib.control.xds.aggregate import AggregateResolver

            resolver = AggregateResolver(self, service, name)
        lb = update.lb
        config = ServiceConfig(
            name=service,
            target=f"xds-cluster:///{name}",
            lb=lb,
            hash_header=hash_header,
            variable=f"xDS cluster {name}",
            resilience=update.resilience(self._config.resilience),
            tls=tls,
            tls_required=tls is not None,
        )
        return config, resolver

    def _leaves(self, name: str) -> list[ClusterUpdate]:
        """An aggregate cluster's leaf clusters in priority order (A37: depth first, each once)."""
        order: list[ClusterUpdate] = []
        seen: set[str] = set()

        def walk(current: str, depth: int) -> None:
            if current in seen or depth > MAX_AGGREGATE_DEPTH:
                return
            seen.add(current)
            cluster = self._clusters.get(current)
            update: Any = None if cluster is None or cluster.state is None else cluster.state.value
            if update is None:
                return
            if update.kind == "AGGREGATE":
                for child in update.aggregate_clusters:
                    walk(child, depth + 1)
            else:
                order.append(update)

        walk(name, 0)
        return order


def _due(state: ResourceState | None) -> bool:
    """Whether a cluster holds a new table back: no answer yet, or only rejected versions (a table naming a cluster
    the control plane sent wrong would half-apply; one the control plane says does not exist does not wait)."""
    return state is None or (state.value is None and state.status in ("REQUESTED", "NACKED"))


def _listener_host(name: str) -> tuple[str, int | None] | None:
    """The request host (and port) a Listener named ``host`` or ``host:port`` serves; ``None`` for other names."""
    if not name or "/" in name:
        return None
    host, colon, port = name.rpartition(":")
    if colon and port.isdigit() and host:
        if host.startswith("[") and host.endswith("]"):
            return host[1:-1], int(port)
        if ":" not in host:
            return host, int(port)
    return name, None


def _unroutable(host: _Host, why: str) -> RouteTable:
    """Routes that answer every call to ``host`` with 500 and ``why``: a host the control plane has a Listener for
    but whose routes cannot be used must fail, not pass through to wherever its name resolves."""
    from meshlib.routing.model import NO_FILTERS, Backend, HostRoutes, RouteMatch, Rule

    label = f"xds:{host.listener.resource_name}"
    match = RouteMatch()
    rule = Rule(label, 0, (match,), NO_FILTERS, (Backend(None, 1, invalid=why),))
    routes = HostRoutes(host.name, ((match, rule),), reads_query=False)
    return RouteTable({host.key: {host.port: routes}}, label, "", (label,))


def node_proto(bootstrap: Bootstrap) -> Any:
    """The bootstrap's node as an ``envoy.config.core.v3.Node`` (metadata as a protobuf ``Struct``)."""
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import json_format, struct_pb2  # type: ignore[import-untyped]

    node = bootstrap.node
    message = base_pb2.Node(
        id=node.id,
        cluster=node.cluster,
        user_agent_name=node.user_agent_name,
        user_agent_version=node.user_agent_version,
        client_features=list(node.client_features),
    )
    message.locality.region = node.locality.region
    message.locality.zone = node.locality.zone
    message.locality.sub_zone = node.locality.sub_zone
    if node.metadata:
        metadata = struct_pb2.Struct()
        json_format.ParseDict(_thaw(node.metadata), metadata)
        message.metadata.CopyFrom(metadata)
    return message


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def source_for(mesh: Any, config: MeshConfig, register_tls: Callable[[str, TLSSettings], None] | None) -> XdsSource:
    """The :class:`XdsSource` of a client with ``xds:`` targets or ``MESHLIB_XDS=all``: the bootstrap from the
    environment (:class:`~meshlib.ConfigError` naming the setting if there is none, or the ``xds`` extra is
    missing)."""
    from meshlib.control.xds.bootstrap import BOOTSTRAP_CONFIG_VARIABLE, BOOTSTRAP_FILE_VARIABLE

    first = next((svc for svc in config.services.values() if scheme_of(svc.target) == "xds"), None)
    variable, value = (
        ("MESHLIB_XDS", "all") if first is None else (first.variable or f"services[{first.name!r}]", first.target)
    )
    try:
        import envoy.config.listener.v3.listener_pb2  # noqa: F401
        import grpc  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            variable, value, f"the xds extra installed for xDS: pip install 'meshlib[xds]' ({error})"
        ) from None
    from meshlib.control.xds.bootstrap import from_env

    bootstrap = from_env(config.environ)
    if bootstrap is None:
        raise ConfigError(
            variable,
            value,
            f"an xDS bootstrap: set {BOOTSTRAP_FILE_VARIABLE} (a file) or {BOOTSTRAP_CONFIG_VARIABLE} (the JSON), "
            "as for gRPC's proxyless clients",
        )
    for svc in config.services.values():
        if scheme_of(svc.target) == "xds":
            try:
                bootstrap.listener_for(svc.target)
            except ConfigError as error:
                raise ConfigError(svc.variable or f"services[{svc.name!r}]", svc.target, error.expected) from None
    return XdsSource(mesh, config, bootstrap, register_tls=register_tls)
